//! The workloads (OpenMessaging-Benchmark style) and the drivers that run them against any
//! system through two small traits, so every system gets the same payloads, batch sizes and
//! number of requests in flight.
//!
//! Each (workload, system) measurement has three phases on a fresh server instance:
//!
//! 1. **produce**: as fast as possible for `produce_secs` (or until `max_produce_bytes`), batches
//!    of about `batch_bytes`, round-robin over the partitions, `in_flight` batches unacknowledged;
//! 2. **catch-up**: one consumer reads everything produced, from the start;
//! 3. **tail**: a fresh topic; a producer at a fixed rate (`rate` records/s, one small batch per
//!    millisecond) stamps the send time into each record, a tailing consumer computes
//!    now − stamp: the end-to-end latency.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// When a record must be acknowledged before the producer counts it as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledged once the leader has the record (Kafka acks=1; page cache).
    Ack1,
    /// Acknowledged after fsync (weir: acks=all with flush.messages=1).
    Fsync,
    /// Acknowledged once all three replicas have the record: a three-node weir cluster, a topic
    /// with replication factor 3 and min.insync.replicas=3, acks=all (page cache, no fsync).
    Rf3,
}

#[derive(Clone, Debug)]
pub struct Workload {
    pub partitions: usize,
    pub record_size: usize,
    pub durability: Durability,
}

impl Workload {
    pub fn name(&self) -> String {
        format!(
            "{}p-{}-{}",
            self.partitions,
            size_label(self.record_size),
            match self.durability {
                Durability::Ack1 => "acks1",
                Durability::Fsync => "fsync",
                Durability::Rf3 => "acksall-rf3",
            }
        )
    }

    pub fn describe(&self) -> String {
        format!(
            "1 topic x {} partition{}, {} records, {}",
            self.partitions,
            if self.partitions == 1 { "" } else { "s" },
            size_label(self.record_size),
            match self.durability {
                Durability::Ack1 => "acks=1",
                Durability::Fsync => "acks=all, fsync before ack",
                Durability::Rf3 => {
                    "acks=all, 3 replicas on a 3-node cluster (server figures: the 3 nodes added up)"
                }
            }
        )
    }

    /// The full suite: 1, 6 and 16 partitions with 100 B and 1 KiB records at acks=1, the
    /// fsync-before-ack mode on one partition, and acks=all on three replicas with 1 and 6
    /// partitions (next to their single-replica acks=1 counterparts).
    pub fn full_suite() -> Vec<Workload> {
        let mut out = vec![];
        for (partitions, durability) in [
            (1, Durability::Ack1),
            (1, Durability::Fsync),
            (1, Durability::Rf3),
            (6, Durability::Ack1),
            (6, Durability::Rf3),
            (16, Durability::Ack1),
        ] {
            for record_size in [100, 1024] {
                out.push(Workload {
                    partitions,
                    record_size,
                    durability,
                });
            }
        }
        out
    }

    /// The smoke suite: the headline workload and the fsync mode, 100-byte records.
    pub fn smoke_suite() -> Vec<Workload> {
        [Durability::Ack1, Durability::Fsync]
            .map(|durability| Workload {
                partitions: 1,
                record_size: 100,
                durability,
            })
            .to_vec()
    }
}

pub fn size_label(bytes: usize) -> String {
    if bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

/// How long and how hard each phase runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub produce_secs: f64,
    pub max_produce_bytes: u64,
    pub tail_secs: f64,
    pub rate: u64,
    pub batch_bytes: usize,
    pub in_flight: usize,
    /// Bytes per partition per read (weir: partition_max_bytes; Redis: XREAD COUNT; NATS: pull
    /// batch), converted to records for the peers.
    pub fetch_bytes: usize,
}

impl Settings {
    /// Records per produce batch: what fits in `batch_bytes` with ~10 bytes of framing each.
    pub fn records_per_batch(&self, record_size: usize) -> usize {
        (self.batch_bytes / (record_size + 10)).max(1)
    }

    pub fn records_per_fetch(&self, record_size: usize) -> usize {
        (self.fetch_bytes / record_size).max(1)
    }
}

/// Record values: `[send time in ns since EPOCH: u64 BE][sequence: u64 BE]` then filler bytes.
pub const MIN_RECORD_SIZE: usize = 16;

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// Latency in µs of a record stamped by [`Batch::build`].
pub fn latency_us(value: &[u8]) -> Option<u64> {
    let stamp = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    Some(now_ns().saturating_sub(stamp) / 1000)
}

/// `count` records of `record_size` bytes for one partition, stamped with the time of building.
pub struct Batch {
    pub partition: usize,
    pub record_size: usize,
    pub data: Bytes,
}

impl Batch {
    pub fn build(partition: usize, record_size: usize, count: usize, first_seq: u64) -> Batch {
        let mut buf = BytesMut::with_capacity(record_size * count);
        let stamp = now_ns();
        for i in 0..count {
            buf.put_u64(stamp);
            buf.put_u64(first_seq + i as u64);
            buf.put_bytes(b'x', record_size - MIN_RECORD_SIZE);
        }
        Batch {
            partition,
            record_size,
            data: buf.freeze(),
        }
    }

    pub fn count(&self) -> usize {
        self.data.len() / self.record_size
    }

    /// The records, as cheap slices of one buffer.
    pub fn records(&self) -> impl Iterator<Item = Bytes> + '_ {
        (0..self.count()).map(|i| {
            self.data
                .slice(i * self.record_size..(i + 1) * self.record_size)
        })
    }
}

/// Resolves to the instant the acknowledgement of a batch arrived.
pub type Ack = Pin<Box<dyn Future<Output = Result<Instant>> + Send>>;

/// The producing side of a system.
pub trait Producer {
    /// Sends `batch` now; the returned future resolves once every record in it is acknowledged.
    /// Acknowledgements are observed by a task of the producer, not by whoever awaits the
    /// future, so a busy driver does not inflate the measured latency.
    fn send(&mut self, batch: Batch) -> impl Future<Output = Result<Ack>> + Send;
}

/// The consuming side of a system, reading every partition from the start.
pub trait Consumer: Send + 'static {
    /// Waits up to about 100 ms for records and passes each record's value to `f`; returns the
    /// number of records passed.
    fn poll(
        &mut self,
        f: &mut (dyn FnMut(&[u8]) + Send),
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// A running system under test.
pub trait System {
    type P: Producer + Send;
    type C: Consumer;
    /// Creates a topic (or its equivalent) with `partitions` partitions.
    fn create_topic(&mut self, topic: &str, partitions: usize) -> impl Future<Output = Result<()>>;
    fn producer(&mut self, topic: &str, partitions: usize)
        -> impl Future<Output = Result<Self::P>>;
    fn consumer(&mut self, topic: &str, partitions: usize)
        -> impl Future<Output = Result<Self::C>>;
    /// The server processes (for CPU and memory figures): one, or a cluster's nodes.
    fn servers(&self) -> &[crate::proc::Server];
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub samples: u64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_us(h: &Histogram<u64>) -> Percentiles {
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            samples: h.len(),
        }
    }

    pub fn json(&self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "p999": self.p999, "max": self.max, "samples": self.samples})
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

/// One throughput phase.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub cpu: CpuUse,
}

/// CPU seconds spent during a phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    pub server: Option<f64>,
    /// This process: the benchmark's clients.
    pub client: Option<f64>,
    /// Every other user-space process on the machine: a noisy neighbour shows up here.
    pub other: Option<f64>,
    /// Time the hypervisor ran something else on our virtual CPUs.
    pub steal: Option<f64>,
}

impl Phase {
    pub fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.seconds
    }

    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e6
    }

    /// Server CPU milliseconds per MB of record values.
    pub fn server_cpu_ms_per_mb(&self) -> Option<f64> {
        self.cpu
            .server
            .map(|c| c * 1000.0 / (self.bytes as f64 / 1e6))
    }

    /// Client (this process) CPU milliseconds per MB of record values.
    pub fn client_cpu_ms_per_mb(&self) -> Option<f64> {
        self.cpu
            .client
            .map(|c| c * 1000.0 / (self.bytes as f64 / 1e6))
    }

    pub fn json(&self) -> Value {
        json!({
            "records": self.records, "bytes": self.bytes, "seconds": self.seconds,
            "records_per_sec": self.records_per_sec(), "mb_per_sec": self.mb_per_sec(),
            "server_cpu_seconds": self.cpu.server,
            "server_cpu_ms_per_mb": self.server_cpu_ms_per_mb(),
            "client_cpu_seconds": self.cpu.client,
            "client_cpu_ms_per_mb": self.client_cpu_ms_per_mb(),
            "other_cpu_seconds": self.cpu.other,
            "steal_seconds": self.cpu.steal,
        })
    }
}

/// The tail phase.
#[derive(Clone, Debug, Default)]
pub struct Tail {
    pub target_rate: u64,
    pub produced: u64,
    pub received: u64,
    pub seconds: f64,
    pub end_to_end: Percentiles,
    pub produce_request: Percentiles,
    pub cpu: CpuUse,
}

impl Tail {
    pub fn json(&self) -> Value {
        json!({
            "target_rate": self.target_rate, "produced": self.produced, "received": self.received,
            "seconds": self.seconds,
            "achieved_rate": self.produced as f64 / self.seconds,
            "end_to_end_ms": self.end_to_end.json(),
            "produce_request_ms": self.produce_request.json(),
            "server_cpu_seconds": self.cpu.server,
            "client_cpu_seconds": self.cpu.client,
            "other_cpu_seconds": self.cpu.other,
            "steal_seconds": self.cpu.steal,
        })
    }
}

/// Everything measured for one system on one workload.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    pub produce: Phase,
    pub produce_request: Percentiles,
    pub catch_up: Phase,
    pub tail: Tail,
    pub peak_rss_mib: Option<f64>,
}

/// Runs in which other processes used more than this share of a CPU in some phase are noisy.
pub const NOISY: f64 = 0.1;

impl Measurement {
    /// The most CPU other processes used during a phase, as a share of one CPU.
    pub fn noise(&self) -> f64 {
        let share = |cpu: &CpuUse, secs: f64| cpu.other.unwrap_or(0.0) / secs.max(1e-9);
        share(&self.produce.cpu, self.produce.seconds)
            .max(share(&self.catch_up.cpu, self.catch_up.seconds))
            .max(share(&self.tail.cpu, self.tail.seconds))
    }

    /// What a row shows for repeated runs: the [`median`](Self::median) of the quiet runs (see
    /// [`NOISY`]), or of all runs when none was quiet (then `true`: the figures are noisy).
    pub fn representative(runs: &[Measurement]) -> (Measurement, bool) {
        let quiet: Vec<Measurement> = runs
            .iter()
            .filter(|m| m.noise() <= NOISY)
            .cloned()
            .collect();
        if quiet.is_empty() {
            (Measurement::median(runs), true)
        } else {
            (Measurement::median(&quiet), false)
        }
    }

    /// The median of repeated runs: each throughput phase from the run with the median rate,
    /// the tail from the run with the median end-to-end p99, the highest peak RSS.
    pub fn median(runs: &[Measurement]) -> Measurement {
        fn pick<T: Clone>(
            runs: &[Measurement],
            key: impl Fn(&Measurement) -> f64,
            get: impl Fn(&Measurement) -> T,
        ) -> T {
            let mut sorted: Vec<&Measurement> = runs.iter().collect();
            sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
            get(sorted[(sorted.len() - 1) / 2])
        }
        let (produce, produce_request) = pick(
            runs,
            |m| m.produce.records_per_sec(),
            |m| (m.produce.clone(), m.produce_request),
        );
        Measurement {
            produce,
            produce_request,
            catch_up: pick(
                runs,
                |m| m.catch_up.records_per_sec(),
                |m| m.catch_up.clone(),
            ),
            tail: pick(runs, |m| m.tail.end_to_end.p99, |m| m.tail.clone()),
            peak_rss_mib: runs.iter().filter_map(|m| m.peak_rss_mib).reduce(f64::max),
        }
    }
}

/// Runs the three phases on `sys`.
pub async fn measure<S: System>(sys: &mut S, w: &Workload, s: &Settings) -> Result<Measurement> {
    let topic = unique_name("bench");
    sys.create_topic(&topic, w.partitions).await?;
    let mut producer = sys.producer(&topic, w.partitions).await?;
    let usage = Usage::start(sys.servers());
    let pace = Pace::Max {
        secs: s.produce_secs,
        max_bytes: s.max_produce_bytes,
    };
    let (records, seconds, request_latency) = produce(&mut producer, w, s, pace).await?;
    drop(producer);
    let produce = Phase {
        records,
        bytes: records * w.record_size as u64,
        seconds,
        cpu: usage.finish(sys.servers()),
    };

    let mut consumer = sys.consumer(&topic, w.partitions).await?;
    let usage = Usage::start(sys.servers());
    let started = Instant::now();
    let mut read = 0u64;
    let deadline = started + Duration::from_secs(600);
    while read < records {
        if Instant::now() > deadline {
            bail!("catch-up read only {read} of {records} records in 600 s");
        }
        read += consumer.poll(&mut |_| {}).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(consumer);
    let cpu = usage.finish(sys.servers());
    if read != records {
        bail!("catch-up read {read} records, {records} were produced");
    }
    let catch_up = Phase {
        records,
        bytes: records * w.record_size as u64,
        seconds,
        cpu,
    };

    let tail = tail(sys, w, s).await?;
    Ok(Measurement {
        produce,
        produce_request: Percentiles::from_us(&request_latency),
        catch_up,
        tail,
        peak_rss_mib: crate::proc::peak_rss_mib(sys.servers()),
    })
}

/// The tail phase: a paced producer and a tailing consumer measuring end-to-end latency.
async fn tail<S: System>(sys: &mut S, w: &Workload, s: &Settings) -> Result<Tail> {
    let topic = unique_name("tail");
    sys.create_topic(&topic, w.partitions).await?;
    let mut consumer = sys.consumer(&topic, w.partitions).await?;
    let mut producer = sys.producer(&topic, w.partitions).await?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None::<u64>);
    let reader = tokio::spawn(async move {
        let mut hist = histogram();
        let mut received = 0u64;
        let mut expected = None;
        let mut grace = None;
        loop {
            if let Some(total) = *stop_rx.borrow_and_update() {
                expected = Some(total);
                grace.get_or_insert_with(|| Instant::now() + Duration::from_secs(10));
            }
            if expected.is_some_and(|t| received >= t) {
                break;
            }
            if grace.is_some_and(|g| Instant::now() > g) {
                break;
            }
            received += consumer
                .poll(&mut |v| {
                    if let Some(us) = latency_us(v) {
                        let _ = hist.record(us.max(1));
                    }
                })
                .await?;
        }
        anyhow::Ok((received, hist))
    });
    let pace = Pace::Rate {
        per_sec: s.rate,
        secs: s.tail_secs,
    };
    let usage = Usage::start(sys.servers());
    let produced = produce(&mut producer, w, s, pace).await;
    let total = produced.as_ref().map_or(0, |p| p.0);
    let _ = stop_tx.send(Some(total));
    let (received, hist) = reader.await.context("tail consumer panicked")??;
    let cpu = usage.finish(sys.servers());
    let (produced, seconds, request_latency) = produced?;
    if received < produced {
        bail!("the tailing consumer received {received} of {produced} records within 10 s");
    }
    Ok(Tail {
        target_rate: s.rate,
        produced,
        received,
        seconds,
        end_to_end: Percentiles::from_us(&hist),
        produce_request: Percentiles::from_us(&request_latency),
        cpu,
    })
}

#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// As fast as the window of in-flight batches allows.
    Max { secs: f64, max_bytes: u64 },
    /// `per_sec` records per second, one batch per millisecond.
    Rate { per_sec: u64, secs: f64 },
}

/// Produces to `p`; returns (records, seconds, per-batch acknowledgement latency in µs).
pub async fn produce<P: Producer>(
    p: &mut P,
    w: &Workload,
    s: &Settings,
    pace: Pace,
) -> Result<(u64, f64, Histogram<u64>)> {
    let mut hist = histogram();
    let mut window = FuturesOrdered::new();
    let mut partition = 0usize;
    let mut sent = 0u64;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let count = match pace {
            Pace::Max { secs, max_bytes } => {
                if started.elapsed().as_secs_f64() >= secs
                    || sent * w.record_size as u64 >= max_bytes
                {
                    break;
                }
                s.records_per_batch(w.record_size)
            }
            Pace::Rate { per_sec, secs } => {
                ticker.tick().await;
                let elapsed = started.elapsed().as_secs_f64();
                if elapsed >= secs {
                    break;
                }
                let due = (elapsed * per_sec as f64) as u64;
                if due <= sent {
                    continue;
                }
                ((due - sent) as usize).min(s.records_per_batch(w.record_size))
            }
        };
        if window.len() >= s.in_flight {
            if let Some((at, ack)) = window.next().await {
                record_ack(&mut hist, at, ack)?;
            }
        }
        let batch = Batch::build(partition, w.record_size, count, sent);
        partition = (partition + 1) % w.partitions;
        sent += count as u64;
        let at = Instant::now();
        let ack = p.send(batch).await?;
        window.push_back(async move { (at, ack.await) });
    }
    while let Some((at, ack)) = window.next().await {
        record_ack(&mut hist, at, ack)?;
    }
    Ok((sent, started.elapsed().as_secs_f64(), hist))
}

fn record_ack(hist: &mut Histogram<u64>, sent_at: Instant, ack: Result<Instant>) -> Result<()> {
    let acked_at = ack?;
    let us = acked_at.saturating_duration_since(sent_at).as_micros() as u64;
    let _ = hist.record(us.max(1));
    Ok(())
}

/// CPU time of the servers (together), of this process and of everything else over a phase.
struct Usage {
    server: Option<f64>,
    client: Option<f64>,
    others: HashMap<u32, f64>,
    steal: Option<f64>,
}

/// The pids that are not "other processes": the servers' and this one.
fn ours(servers: &[crate::proc::Server]) -> Vec<u32> {
    let mut pids: Vec<u32> = servers.iter().map(crate::proc::Server::pid).collect();
    pids.push(std::process::id());
    pids
}

impl Usage {
    fn start(servers: &[crate::proc::Server]) -> Usage {
        Usage {
            server: crate::proc::servers_cpu_seconds(servers),
            client: crate::proc::cpu_seconds("self"),
            others: crate::proc::other_processes_cpu(&ours(servers)),
            steal: crate::proc::steal_seconds(),
        }
    }

    fn finish(self, servers: &[crate::proc::Server]) -> CpuUse {
        let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        let others = crate::proc::other_processes_cpu(&ours(servers));
        let other = others
            .iter()
            .map(|(pid, t)| (t - self.others.get(pid).copied().unwrap_or(0.0)).max(0.0))
            .sum();
        CpuUse {
            server: diff(self.server, crate::proc::servers_cpu_seconds(servers)),
            client: diff(self.client, crate::proc::cpu_seconds("self")),
            other: Some(other),
            steal: diff(self.steal, crate::proc::steal_seconds()),
        }
    }
}

/// A name unique to this run, usable as a Kafka topic, Redis key and NATS stream name.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_stamped_records() {
        let b = Batch::build(3, 100, 7, 40);
        assert_eq!((b.partition, b.count(), b.data.len()), (3, 7, 700));
        let records: Vec<Bytes> = b.records().collect();
        assert_eq!(records.len(), 7);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.len(), 100);
            assert_eq!(
                u64::from_be_bytes(r[8..16].try_into().unwrap()),
                40 + i as u64
            );
            assert!(r[16..].iter().all(|&c| c == b'x'));
            assert!(latency_us(r).unwrap() < 10_000_000);
        }
        assert_eq!(latency_us(b"short"), None);
    }

    #[test]
    fn workload_names_are_unique() {
        let mut names: Vec<String> = Workload::full_suite().iter().map(Workload::name).collect();
        assert!(names.contains(&"1p-100B-acks1".to_string()));
        assert!(names.contains(&"16p-1KiB-acks1".to_string()));
        assert!(names.contains(&"1p-100B-fsync".to_string()));
        assert!(names.contains(&"6p-1KiB-acksall-rf3".to_string()));
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn median_of_runs() {
        let run = |produce: f64, catch_up: f64, p99: f64, rss: f64| {
            let mut m = Measurement::default();
            m.produce.records = produce as u64;
            m.produce.seconds = 1.0;
            m.catch_up.records = catch_up as u64;
            m.catch_up.seconds = 1.0;
            m.tail.end_to_end.p99 = p99;
            m.peak_rss_mib = Some(rss);
            m
        };
        let m = Measurement::median(&[
            run(3.0, 10.0, 0.5, 9.0),
            run(1.0, 30.0, 0.1, 12.0),
            run(2.0, 20.0, 0.3, 8.0),
        ]);
        assert_eq!(m.produce.records, 2);
        assert_eq!(m.catch_up.records, 20);
        assert_eq!(m.tail.end_to_end.p99, 0.3);
        assert_eq!(m.peak_rss_mib, Some(12.0));
        assert_eq!(
            Measurement::median(&[run(5.0, 1.0, 1.0, 1.0)])
                .produce
                .records,
            5
        );
    }

    #[test]
    fn noisy_runs_are_left_out_when_a_quiet_one_exists() {
        let run = |produce: u64, other: f64| {
            let mut m = Measurement::default();
            m.produce.records = produce;
            m.produce.seconds = 1.0;
            m.produce.cpu.other = Some(other);
            m.catch_up.seconds = 1.0;
            m.tail.seconds = 1.0;
            m
        };
        let (m, noisy) = Measurement::representative(&[run(1, 0.9), run(5, 0.0), run(2, 0.5)]);
        assert_eq!((m.produce.records, noisy), (5, false));
        let (m, noisy) = Measurement::representative(&[run(1, 0.9), run(3, 0.8), run(2, 0.5)]);
        assert_eq!((m.produce.records, noisy), (2, true));
    }

    #[test]
    fn batch_and_fetch_sizes() {
        let s = Settings {
            produce_secs: 1.0,
            max_produce_bytes: 1 << 20,
            tail_secs: 1.0,
            rate: 10_000,
            batch_bytes: 256 * 1024,
            in_flight: 5,
            fetch_bytes: 1 << 20,
        };
        assert_eq!(s.records_per_batch(100), 2383);
        assert_eq!(s.records_per_batch(1 << 20), 1);
        assert_eq!(s.records_per_fetch(1024), 1024);
    }
}
