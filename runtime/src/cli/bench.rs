//! `weir bench`: produce then consume N records of S bytes over the Kafka protocol on loopback,
//! batching and pipelining like librdkafka, and report records/s, MB/s, produce latency and the
//! daemon's CPU per MB. By default it starts its own daemon (this same binary) on a scratch
//! directory so the daemon's CPU time can be read from /proc; `--brokers` targets a running one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{CreateTopicsRequest, FetchRequest, ProduceRequest, TopicName};
use kafka_protocol::records::Compression;
use serde_json::json;
use tokio::sync::Semaphore;

use super::consume::fetch_request;
use super::produce::{parse_acks, parse_compression};
use crate::client::{check, Connection};
use crate::kafka::str_bytes;
use crate::log::batch::{complete_batches, BatchBuilder};

#[derive(clap::Args, Clone)]
pub struct BenchArgs {
    /// Records to produce (then consume).
    #[arg(long, short = 'n', default_value_t = 2_000_000)]
    pub records: u64,
    /// Value size in bytes.
    #[arg(long, short = 's', default_value_t = 100)]
    pub record_size: usize,
    #[arg(long, short = 'p', default_value_t = 1)]
    pub partitions: i32,
    /// 1, all or 0.
    #[arg(long, default_value = "1")]
    pub acks: String,
    /// Create the topic with flush.messages=1: every acknowledgement waits for fsync.
    #[arg(long)]
    pub fsync: bool,
    #[arg(long, default_value = "none")]
    pub compression: String,
    /// Bytes of records per produce batch (librdkafka's batch.size is 1000000).
    #[arg(long, default_value_t = 256 * 1024)]
    pub batch_bytes: usize,
    /// Produce requests in flight on the connection.
    #[arg(long, default_value_t = 5)]
    pub in_flight: usize,
    /// Use a running broker instead of starting one; the daemon's CPU is then not reported
    /// unless --daemon-pid is given.
    #[arg(long)]
    pub brokers: Option<String>,
    #[arg(long)]
    pub daemon_pid: Option<u32>,
    /// Scratch directory for the daemon started by the benchmark (removed afterwards).
    #[arg(long, default_value = "./weir-bench-data")]
    pub data_dir: PathBuf,
    /// Also measure the disk's sequential write rate with dd (MiB written; 0 to skip).
    #[arg(long, default_value_t = 1024)]
    pub disk_baseline_mib: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The daemon started for the benchmark; killed and cleaned up on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_daemon(dir: &std::path::Path) -> Result<(Daemon, String)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = &std::path::absolute(dir)?;
    let kafka = format!("127.0.0.1:{}", free_port()?);
    let http = format!("127.0.0.1:{}", free_port()?);
    let child = Command::new(std::env::current_exe()?)
        .args(["serve", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--kafka-addr", &kafka, "--http-addr", &http])
        .env("WEIR_LOG", "warn")
        // Started in its own empty directory, so that no ./pipelines is picked up.
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the daemon")?;
    let daemon = Daemon {
        child,
        dir: dir.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if Connection::connect(&kafka).await.is_ok() {
            return Ok((daemon, kafka));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the daemon did not start listening on {kafka}")
}

/// CPU seconds (user + system) used so far by `pid`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Peak resident memory of `pid` in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Sequential write rate of the disk under `dir`, measured by dd with conv=fdatasync.
fn disk_write_rate(dir: &std::path::Path, mib: u64) -> Result<f64> {
    let file = dir.join("dd-baseline.tmp");
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fdatasync"])
        .output()
        .context("cannot run dd")?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stderr);
    // "1073741824 bytes (1.1 GB, 1.0 GiB) copied, 1.234 s, 870 MB/s"
    let secs: f64 = text
        .split(", ")
        .find_map(|part| part.strip_suffix(" s").and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| anyhow!("cannot parse dd output: {text}"))?;
    Ok((mib as f64 * 1024.0 * 1024.0) / secs / 1e6)
}

struct PhaseResult {
    seconds: f64,
    records: u64,
    bytes: u64,
    daemon_cpu: Option<f64>,
}

impl PhaseResult {
    fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.seconds
    }
    fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e6
    }
    fn cpu_per_mb_ms(&self) -> Option<f64> {
        self.daemon_cpu
            .map(|c| c * 1000.0 / (self.bytes as f64 / 1e6))
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let acks = parse_acks(&args.acks)?;
    let codec = parse_compression(&args.compression)?;
    if args.record_size == 0 || args.records == 0 || args.partitions < 1 {
        bail!("records, record size and partitions must be positive");
    }
    let (_daemon, brokers, pid) = match &args.brokers {
        Some(b) => (None, b.clone(), args.daemon_pid),
        None => {
            let (d, addr) = start_daemon(&args.data_dir).await?;
            let pid = d.child.id();
            (Some(d), addr, Some(pid))
        }
    };
    let disk = if args.disk_baseline_mib > 0 {
        let dir = if args.brokers.is_some() {
            std::env::temp_dir()
        } else {
            args.data_dir.clone()
        };
        Some(disk_write_rate(&dir, args.disk_baseline_mib)?)
    } else {
        None
    };
    let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let mut conn = Connection::connect(&brokers).await?;
    let mut configs = vec![];
    if args.fsync {
        configs.push(
            CreatableTopicConfig::default()
                .with_name(str_bytes("flush.messages"))
                .with_value(Some(str_bytes("1"))),
        );
    }
    let resp = conn
        .call(
            &CreateTopicsRequest::default()
                .with_timeout_ms(30_000)
                .with_topics(vec![CreatableTopic::default()
                    .with_name(TopicName(str_bytes(topic.clone())))
                    .with_num_partitions(args.partitions)
                    .with_replication_factor(-1)
                    .with_configs(configs)]),
        )
        .await?;
    for t in &resp.topics {
        check(t.error_code, "create benchmark topic")?;
    }

    let (produce, latency) = produce_phase(&args, &brokers, &topic, acks, codec, pid).await?;
    let consume = consume_phase(&args, &brokers, &topic, pid).await?;
    let rss = pid.and_then(peak_rss_mib);

    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "weir bench: {} records x {} B, {} partition(s), acks={}, fsync={}, compression={}, batch {} B, {} in flight",
        args.records, args.record_size, args.partitions, args.acks, args.fsync, args.compression, args.batch_bytes, args.in_flight
    );
    println!(
        "{:<10} {:>14} {:>10} {:>10} {:>16}",
        "phase", "records/s", "MB/s", "seconds", "daemon CPU ms/MB"
    );
    for (name, r) in [("produce", &produce), ("consume", &consume)] {
        println!(
            "{:<10} {:>14.0} {:>10.1} {:>10.2} {:>16}",
            name,
            r.records_per_sec(),
            r.mb_per_sec(),
            r.seconds,
            r.cpu_per_mb_ms().map_or("-".into(), |v| format!("{v:.2}"))
        );
    }
    println!(
        "produce latency (request sent to acknowledged): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.value_at_quantile(0.999)),
        ms(latency.max())
    );
    if let Some(rss) = rss {
        println!("daemon peak RSS: {rss:.1} MiB");
    }
    if let Some(d) = disk {
        println!(
            "disk sequential write (dd, conv=fdatasync): {d:.1} MB/s; produce reached {:.0}% of it",
            produce.mb_per_sec() / d * 100.0
        );
    }
    if let Some(path) = &args.json {
        let phase = |r: &PhaseResult| {
            json!({
                "seconds": r.seconds, "records": r.records, "bytes": r.bytes,
                "records_per_sec": r.records_per_sec(), "mb_per_sec": r.mb_per_sec(),
                "daemon_cpu_seconds": r.daemon_cpu, "daemon_cpu_ms_per_mb": r.cpu_per_mb_ms(),
            })
        };
        let doc = json!({
            "records": args.records, "record_size": args.record_size, "partitions": args.partitions,
            "acks": args.acks, "fsync": args.fsync, "compression": args.compression,
            "batch_bytes": args.batch_bytes, "in_flight": args.in_flight,
            "produce": phase(&produce), "consume": phase(&consume),
            "produce_latency_ms": {
                "p50": ms(latency.value_at_quantile(0.5)), "p99": ms(latency.value_at_quantile(0.99)),
                "p999": ms(latency.value_at_quantile(0.999)), "max": ms(latency.max()),
            },
            "daemon_peak_rss_mib": rss,
            "disk_write_mb_per_sec": disk,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

async fn produce_phase(
    args: &BenchArgs,
    brokers: &str,
    topic: &str,
    acks: i16,
    codec: Compression,
    pid: Option<u32>,
) -> Result<(PhaseResult, Histogram<u64>)> {
    let conn = Connection::connect(brokers).await?;
    let (mut sender, mut receiver) = conn.into_split();
    let window = Arc::new(Semaphore::new(args.in_flight.max(1)));
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, i16)>();
    let acks_expected = acks != 0;
    // Responses come back in order: pair each with its send time.
    let reader = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            while let Some((sent_at, version)) = sent_rx.recv().await {
                if acks_expected {
                    let resp = receiver.recv::<ProduceRequest>(version).await?;
                    for t in resp.responses {
                        for p in t.partition_responses {
                            check(p.error_code, "produce")?;
                        }
                    }
                    let _ = hist.record(sent_at.elapsed().as_micros().max(1) as u64);
                }
                window.add_permits(1);
            }
            anyhow::Ok(hist)
        })
    };
    let value_template = vec![b'x'; args.record_size];
    let per_batch = (args.batch_bytes / (args.record_size + 10)).max(1) as u64;
    let cpu_before = pid.and_then(cpu_seconds);
    let started = Instant::now();
    let mut produced = 0u64;
    let mut partition = 0i32;
    let mut value = value_template;
    while produced < args.records {
        let n = per_batch.min(args.records - produced);
        let now = super::now_ms();
        let mut b = BatchBuilder::new(now);
        for i in 0..n {
            let stamp = 8.min(value.len());
            value[..stamp].copy_from_slice(&(produced + i).to_be_bytes()[..stamp]);
            b.push(None, Some(&value), &[], now);
        }
        produced += n;
        let req = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(str_bytes(topic)))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(b.finish(codec).into()))])]);
        partition = (partition + 1) % args.partitions;
        window.acquire().await?.forget();
        let version = sender.send(&req).await?;
        sender.flush().await?;
        sent_tx
            .send((Instant::now(), version))
            .map_err(|_| anyhow!("response reader stopped"))?;
    }
    drop(sent_tx);
    let hist = reader.await??;
    let seconds = started.elapsed().as_secs_f64();
    let daemon_cpu = match (cpu_before, pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok((
        PhaseResult {
            seconds,
            records: produced,
            bytes: produced * args.record_size as u64,
            daemon_cpu,
        },
        hist,
    ))
}

async fn consume_phase(
    args: &BenchArgs,
    brokers: &str,
    topic: &str,
    pid: Option<u32>,
) -> Result<PhaseResult> {
    let mut conn = Connection::connect(brokers).await?;
    let mut positions: BTreeMap<i32, i64> = (0..args.partitions).map(|p| (p, 0)).collect();
    let cpu_before = pid.and_then(cpu_seconds);
    let started = Instant::now();
    let mut consumed = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while consumed < args.records {
        if Instant::now() > deadline {
            bail!("consumed only {consumed} of {} records", args.records);
        }
        let req: FetchRequest = fetch_request(topic, &positions, 500, 1 << 20);
        let resp = conn.call(&req).await?;
        for t in resp.responses {
            for pd in t.partitions {
                check(pd.error_code, "fetch")?;
                let Some(records) = pd.records else { continue };
                for batch in complete_batches(&records) {
                    let pos = positions[&pd.partition_index];
                    if batch.next_offset() <= pos {
                        continue;
                    }
                    batch.check_integrity()?;
                    consumed += (batch.next_offset() - batch.base_offset().max(pos)) as u64;
                    positions.insert(pd.partition_index, batch.next_offset());
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let daemon_cpu = match (cpu_before, pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(PhaseResult {
        seconds,
        records: consumed,
        bytes: consumed * args.record_size as u64,
        daemon_cpu,
    })
}
