//! The loops that run a pipeline: one source task (source → topic, offsets in the same
//! transaction) and one task per sink (topic → sink), with retries, dead letters and status.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};
use weir_connectors::{ConnectorError, Record, Sink, SinkRecord, Source, SourceBatch};

use super::io::{ensure_output, Input, Outgoing, TopicReader, TopicWriter};
use super::offsets::OffsetStore;
use super::spec::{Delivery, PipelineSpec, SinkSpec, SourceSpec, Tolerance};
use super::topic::{TopicSink, TopicSource};
use super::transform::{Rejected, Transformed, Transforms};
use super::{Context, Status};
use crate::client::partitioner::partition_for_key;
use crate::group::CommittedOffset;
use crate::kafka::txn_cluster::Peers;
use weir_connectors::file::{FileSink, FileSource};
use weir_connectors::http::{HttpPollSource, HttpSink};
use weir_connectors::sql::{SqlSink, SqlSource};

/// Bytes a sink reads per partition per poll.
const SINK_READ_BYTES: u64 = 1 << 20;

/// Exponential backoff with full jitter, capped, for transient failures.
struct Backoff {
    attempt: u32,
    max_retries: u32,
    /// weir_pipeline_retries_total for the pipeline's stage.
    retries: prometheus::IntCounter,
}

impl Backoff {
    fn new(max_retries: u32, pipeline: &str, stage: &str) -> Backoff {
        Backoff {
            attempt: 0,
            max_retries,
            retries: crate::metrics::get()
                .pipeline_retries
                .with_label_values(&[pipeline, stage]),
        }
    }

    /// Waits before the next attempt; Err when the retries are used up, Ok(false) when the
    /// pipeline is stopping.
    async fn wait(
        &mut self,
        error: &anyhow::Error,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        self.attempt += 1;
        if self.max_retries > 0 && self.attempt > self.max_retries {
            bail!("gave up after {} attempts: {error:#}", self.attempt);
        }
        self.retries.inc();
        let cap_ms = (100u64 << self.attempt.min(8)).min(30_000);
        let ms = rand_below(cap_ms) + 10;
        tracing::warn!(attempt = self.attempt, retry_in_ms = ms, error = %format!("{error:#}"), "transient failure; retrying");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(true),
            _ = stop.changed() => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A cheap jitter source; backoff needs spread, not cryptographic randomness.
fn rand_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (nanos.wrapping_mul(6364136223846793005).rotate_left(17)) % n.max(1)
}

/// Failed records, with headers saying where and why, in the pipeline's dead-letter topic.
/// The source task writes them in its batch's transaction; sinks through their own writer.
pub struct DeadLetters {
    pipeline: String,
    topic: Arc<str>,
    writer: Option<TopicWriter>,
}

impl DeadLetters {
    pub async fn open(ctx: &Context, spec: &PipelineSpec) -> Result<DeadLetters> {
        let (topic, _) = ensure_output(ctx, &spec.dead_letter_topic(), Some(1)).await?;
        Ok(DeadLetters {
            pipeline: spec.name.clone(),
            topic,
            writer: None,
        })
    }

    /// Writes one failed record now (sinks: the record is already in a topic, so a repeat
    /// after a crash is the only risk).
    pub async fn send(
        &mut self,
        ctx: &Context,
        record: &Record,
        stage: &str,
        error: &str,
        origin: Option<(&str, i32, i64)>,
    ) -> Result<()> {
        let letter = self.letter(record, stage, error, 1, origin);
        if self.writer.is_none() {
            self.writer = Some(TopicWriter::open(ctx, None).await?);
        }
        let writer = self.writer.as_mut().expect("just opened");
        writer.write(&[letter], None).await
    }

    /// The dead-letter record for a failed one; `origin` is its topic position when it came
    /// from one.
    pub fn letter(
        &self,
        record: &Record,
        stage: &str,
        error: &str,
        attempt: u32,
        origin: Option<(&str, i32, i64)>,
    ) -> Outgoing {
        let mut r = record.clone();
        let mut add = |k: &str, v: String| r.headers.push((k.to_string(), Some(Bytes::from(v))));
        add("weir.pipeline", self.pipeline.clone());
        add("weir.stage", stage.to_string());
        add("weir.error", error.to_string());
        add("weir.attempt", attempt.to_string());
        if let Some((t, p, o)) = origin {
            add("weir.topic", t.to_string());
            add("weir.partition", p.to_string());
            add("weir.offset", o.to_string());
        }
        tracing::warn!(pipeline = %self.pipeline, stage, error, "record sent to the dead-letter topic");
        Outgoing {
            topic: self.topic.clone(),
            partition: 0,
            record: r,
        }
    }
}

/// Places records in the output topic's partitions: by the key field (Kafka's murmur2
/// partitioner) or round robin.
struct Router {
    topic: Arc<str>,
    partitions: i32,
    key_field: Option<String>,
    next: usize,
}

impl Router {
    fn route(&mut self, mut record: Record) -> Result<Outgoing, (Record, String)> {
        let n = self.partitions as usize;
        if let Some(field) = &self.key_field {
            match key_of(record.value.as_deref(), field) {
                Ok(key) => record.key = key,
                Err(message) => return Err((record, message)),
            }
        }
        let partition = match &record.key {
            Some(k) => partition_for_key(k, n as i32),
            None => {
                self.next = (self.next + 1) % n;
                self.next as i32
            }
        };
        Ok(Outgoing {
            topic: self.topic.clone(),
            partition,
            record,
        })
    }
}

/// The key a record gets from a JSON field: a string as is, other values as compact JSON; no
/// key when the field is absent or null.
fn key_of(value: Option<&[u8]>, field: &str) -> Result<Option<Bytes>, String> {
    let v: serde_json::Value = value
        .and_then(|v| serde_json::from_slice(v).ok())
        .ok_or_else(|| format!("topic.key '{field}' needs a JSON object value"))?;
    let serde_json::Value::Object(map) = v else {
        return Err(format!("topic.key '{field}' needs a JSON object value"));
    };
    Ok(match map.get(field) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(Bytes::from(s.clone())),
        Some(other) => Some(Bytes::from(other.to_string())),
    })
}

/// Source → output topic until `stop`.
pub async fn run_source(
    ctx: Context,
    spec: PipelineSpec,
    mounted: Option<Box<dyn Source>>,
    plugins: Vec<weir_wasm::Plugin>,
    status: Arc<Mutex<Status>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let transforms = Transforms::start(&spec.name, &plugins)?;
    let output_spec = spec
        .topic
        .clone()
        .ok_or_else(|| anyhow!("a source task needs an output topic"))?;
    let (output, partitions) =
        ensure_output(&ctx, &output_spec.name, output_spec.partitions).await?;
    let transactional_id =
        (spec.delivery == Delivery::ExactlyOnce).then(|| format!("weir-pipeline-{}", spec.name));
    // Opening the writer first fences an earlier instance and aborts its open transaction,
    // so the offset loaded next is the committed one.
    let writer = TopicWriter::open(&ctx, transactional_id).await?;
    let key = OffsetStore::key(&spec.name, None);
    let resume = ctx.offsets.load(&key).await?;
    let mut backoff = Backoff::new(spec.errors.max_retries, &spec.name, "source");
    let mut source = match mounted {
        Some(s) => s,
        None => loop {
            match open_source(&ctx, &spec).await {
                Ok(s) => break s,
                Err(ConnectorError::Transient(e)) => {
                    if !backoff.wait(&e, &mut stop).await? {
                        return Ok(());
                    }
                }
                Err(e) => bail!("source: {e}"),
            }
        },
    };
    loop {
        match source.start(resume.clone()).await {
            Ok(()) => break,
            Err(ConnectorError::Transient(e)) => {
                if !backoff.wait(&e, &mut stop).await? {
                    return Ok(());
                }
            }
            Err(e) => bail!("source: {e}"),
        }
    }
    backoff.reset();
    let committer = Committer {
        ctx: &ctx,
        spec: &spec,
        writer,
        key: Bytes::from(key),
        backoff,
        commit_seconds: crate::metrics::get()
            .pipeline_commit_seconds
            .with_label_values(&[spec.name.as_str(), "source"]),
        batch_seconds: crate::metrics::get()
            .pipeline_batch_seconds
            .with_label_values(&[spec.name.as_str()]),
        router: Router {
            topic: output,
            partitions,
            key_field: output_spec.key.clone(),
            next: 0,
        },
        dead_letters: None,
        status,
    };
    committer.status.lock().source_offset = resume;
    // A source that allows it is read ahead: the task reads the next batches while it commits
    // the one before, and its transforms run on a plugin thread of their own meanwhile. With
    // two cores, the plugins take one, reading and writing the log the other, and a commit's
    // waits for fsync overlap reading.
    let (mut inline, mut ahead) = if source.allows_read_ahead() {
        (None, Some(ReadAhead::start(&spec.name, transforms)?))
    } else {
        (Some(transforms), None)
    };
    let mut committer = Some(committer);
    // Set while a commit of a batch read ahead runs; it holds the committer until done.
    let mut committing: Option<Commit<'_>> = None;
    loop {
        // A finished commit is acknowledged first; reading ahead comes before starting the next
        // commit, so the plugins never wait for a batch the log already holds.
        let event = tokio::select! {
            biased;
            _ = stop.changed() => {
                // A transaction under way is finished, not dropped half-way.
                if let Some(commit) = committing.take() {
                    settle(commit.await, &mut committer, source.as_mut()).await?;
                }
                return Ok(());
            }
            finished = commit_finished(&mut committing) => Event::Committed(Box::new(finished)),
            b = source.next_batch(spec.batch_records), if ahead.as_ref().is_none_or(ReadAhead::has_room) => {
                Event::Read(b)
            }
            done = ReadAhead::next_done(&mut ahead), if committing.is_none() => Event::Transformed(done),
        };
        let read = match (event, ahead.as_mut()) {
            (Event::Committed(finished), _) => {
                if !settle(*finished, &mut committer, source.as_mut()).await? {
                    return Ok(());
                }
                continue;
            }
            (Event::Read(Ok(Some(b))), Some(ahead)) => {
                if let Some(c) = committer.as_mut() {
                    c.backoff.reset();
                }
                let origins = ahead
                    .transforms()
                    .then(|| source.last_batch_origins())
                    .flatten()
                    .map(|(t, o)| (t.to_string(), o.to_vec()));
                ahead.submit(b, origins);
                continue;
            }
            (Event::Transformed(done), _) => {
                committing = Some(start_commit(&mut committer, done?, &stop));
                continue;
            }
            (Event::Read(read), _) => {
                // Anything but a batch to read ahead: commit the batches read before it first,
                // so that batches and source offsets reach the log in order.
                loop {
                    let commit = match committing.take() {
                        Some(commit) => commit,
                        None if ahead.as_ref().is_some_and(ReadAhead::is_busy) => {
                            let done = tokio::select! {
                                _ = stop.changed() => return Ok(()),
                                done = ReadAhead::next_done(&mut ahead) => done?,
                            };
                            start_commit(&mut committer, done, &stop)
                        }
                        None => break,
                    };
                    if !settle(commit.await, &mut committer, source.as_mut()).await? {
                        return Ok(());
                    }
                }
                read
            }
        };
        let committer = committer.as_mut().expect("no commit under way");
        let batch = match read {
            Ok(Some(b)) => b,
            Ok(None) => {
                committer.status.lock().state = "finished".into();
                let _ = stop.changed().await;
                return Ok(());
            }
            Err(ConnectorError::Transient(e)) => {
                if !committer.backoff.wait(&e, &mut stop).await? {
                    return Ok(());
                }
                continue;
            }
            Err(ConnectorError::BadRecord { message, .. }) => {
                if spec.errors.tolerance == Tolerance::None {
                    bail!("source: {message}");
                }
                // The rejected input goes to the dead letters with the source offset past it,
                // in one transaction: written once, and never met again.
                let Some(rejected) = source.take_rejected() else {
                    tracing::warn!(pipeline = %spec.name, error = %message, "source skipped bad input");
                    continue;
                };
                let letters = committer.dead_letters().await?;
                let out = rejected
                    .records
                    .iter()
                    .map(|r| letters.letter(r, "source", &message, 1, None))
                    .collect::<Vec<_>>();
                let n = out.len() as u64;
                if !committer.write(out, &rejected.offset, &mut stop).await? {
                    return Ok(());
                }
                acknowledge(source.as_mut(), &rejected.offset).await;
                {
                    let mut status = committer.status.lock();
                    status.dead_letters += n;
                    status.source_offset = Some(rejected.offset);
                }
                continue;
            }
            Err(e) => bail!("source: {e}"),
        };
        committer.backoff.reset();
        let read_at = std::time::Instant::now();
        let t = inline
            .as_mut()
            .expect("batches read ahead are not transformed here");
        let (records, rejected) = if t.is_empty() {
            (batch.records, Vec::new())
        } else {
            let origins = source.last_batch_origins();
            // The guest calls are CPU work: keep them off the other tasks' worker thread.
            tokio::task::block_in_place(|| t.run(batch.records, origins))?
        };
        if !committer
            .transformed(records, rejected, &batch.offset, &mut stop)
            .await?
        {
            return Ok(());
        }
        acknowledge(source.as_mut(), &batch.offset).await;
        committer
            .batch_seconds
            .observe(read_at.elapsed().as_secs_f64());
        let mut status = committer.status.lock();
        status.source_lag = source.lag();
        status.source_offset = Some(batch.offset);
    }
}

/// Where a topic source read each record of a batch: the topic, and (partition, offset) per
/// record.
type Origins = (String, Vec<(i32, i64)>);

/// What woke the source loop.
enum Event<'a> {
    Committed(Box<Finished<'a>>),
    Transformed(Result<Done>),
    Read(weir_connectors::Result<Option<SourceBatch>>),
}

/// What the plugin thread hands back for a batch, with the source offset after the batch and
/// when the batch was read.
type Done = (Result<Transformed>, serde_json::Value, std::time::Instant);

/// A commit of a batch read ahead, under way: it holds the committer and hands it back with
/// whether the batch was written (false: the pipeline is stopping) and the source offset to
/// acknowledge.
type Commit<'a> = Pin<Box<dyn Future<Output = Finished<'a>> + Send + 'a>>;
type Finished<'a> = (Committer<'a>, Result<bool>, serde_json::Value);

/// Waits for the commit under way, if any (else never returns), and takes it out.
async fn commit_finished<'a>(slot: &mut Option<Commit<'a>>) -> Finished<'a> {
    let Some(commit) = slot.as_mut() else {
        return std::future::pending().await;
    };
    let finished = commit.await;
    *slot = None;
    finished
}

/// Starts committing a batch read ahead; the commit holds the committer until it is settled.
fn start_commit<'a>(
    committer: &mut Option<Committer<'a>>,
    done: Done,
    stop: &watch::Receiver<bool>,
) -> Commit<'a> {
    let c = committer.take().expect("no commit under way");
    Box::pin(c.commit_read_ahead(done, stop.clone()))
}

/// Takes the committer back from a finished commit and tells the source the batch is
/// committed. False when the pipeline is stopping.
async fn settle<'a>(
    (c, written, offset): Finished<'a>,
    committer: &mut Option<Committer<'a>>,
    source: &mut dyn Source,
) -> Result<bool> {
    let status = c.status.clone();
    *committer = Some(c);
    if !written? {
        return Ok(false);
    }
    acknowledge(source, &offset).await;
    let mut status = status.lock();
    status.source_lag = source.lag();
    status.source_offset = Some(offset);
    Ok(true)
}

/// Tells the source a batch is committed.
async fn acknowledge(source: &mut dyn Source, offset: &serde_json::Value) {
    if let Err(e) = source.committed(offset).await {
        tracing::warn!(error = %e, "source could not acknowledge a committed batch");
    }
}

/// Batches read ahead and not taken back to commit yet, at most this many: while the task
/// commits one batch, the plugins transform the next and the one after waits for them.
const BATCHES_AHEAD: usize = 2;

/// A source task's batches read ahead, in read order, and the plugin thread transforming them
/// (none without transforms).
struct ReadAhead {
    thread: Option<PluginThread>,
    in_flight: VecDeque<InFlight>,
}

impl ReadAhead {
    fn start(pipeline: &str, transforms: Transforms) -> Result<ReadAhead> {
        let thread = if transforms.is_empty() {
            None
        } else {
            Some(PluginThread::spawn(pipeline, transforms)?)
        };
        Ok(ReadAhead {
            thread,
            in_flight: VecDeque::new(),
        })
    }

    /// Whether batches go through transforms (which see each record's origin).
    fn transforms(&self) -> bool {
        self.thread.is_some()
    }

    fn has_room(&self) -> bool {
        self.in_flight.len() < BATCHES_AHEAD
    }

    fn is_busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    fn submit(&mut self, batch: SourceBatch, origins: Option<Origins>) {
        let (reply, rx) = oneshot::channel();
        match &self.thread {
            // A closed queue means the thread is gone; the dropped reply then reports it.
            Some(thread) => {
                let _ = thread.jobs.send((batch.records, origins, reply));
            }
            None => {
                let _ = reply.send(Ok((batch.records, Vec::new())));
            }
        }
        self.in_flight.push_back(InFlight {
            reply: rx,
            offset: batch.offset,
            read_at: std::time::Instant::now(),
        });
    }

    /// Waits for the oldest batch in flight to be transformed and takes it out (never
    /// returns when there is none).
    async fn next_done(ahead: &mut Option<ReadAhead>) -> Result<Done> {
        let Some(f) = ahead.as_mut().and_then(|a| a.in_flight.front_mut()) else {
            return std::future::pending().await;
        };
        let replied = (&mut f.reply).await;
        let f = ahead
            .as_mut()
            .and_then(|a| a.in_flight.pop_front())
            .expect("checked above");
        let result = replied.map_err(|_| anyhow!("the plugin thread stopped unexpectedly"))?;
        Ok((result, f.offset, f.read_at))
    }
}

/// The thread a source task's plugins run on while the task reads and commits other batches.
/// It runs at a lower CPU priority than the daemon's other threads: with as many busy threads
/// as cores, the log's reads, writes and fsync wake-ups go first and the plugins take the rest.
struct PluginThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// A batch and its origins, and where to send the result.
type Job = (
    Vec<Record>,
    Option<Origins>,
    oneshot::Sender<Result<Transformed>>,
);

/// How much lower the plugin thread's priority is (a nice value, 0 to 19).
const PLUGIN_THREAD_NICE: i32 = 10;

impl PluginThread {
    /// The thread owns the plugin instances; it ends when the task drops its queue.
    fn spawn(pipeline: &str, mut transforms: Transforms) -> Result<PluginThread> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("weir-plugins-{pipeline}"))
            .spawn(move || {
                lower_this_threads_priority();
                for (records, origins, reply) in queue {
                    // The task stopped waiting for it (it is stopping): skip the work.
                    if reply.is_closed() {
                        continue;
                    }
                    let origins = origins.as_ref().map(|(t, o)| (t.as_str(), o.as_slice()));
                    let result = transforms.run(records, origins);
                    let _ = reply.send(result);
                }
            })?;
        Ok(PluginThread { jobs })
    }
}

/// Raises the calling thread's nice value to [`PLUGIN_THREAD_NICE`]. Nice values are per thread
/// on Linux, and raising one's own needs no privilege; if it fails the plugins simply run at the
/// normal priority.
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    // SAFETY: plain system calls about the calling thread.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, PLUGIN_THREAD_NICE);
    }
}

/// Elsewhere nice values belong to the whole process: the plugins keep the normal priority.
#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}

/// A batch handed to the plugin thread.
struct InFlight {
    reply: oneshot::Receiver<Result<Transformed>>,
    offset: serde_json::Value,
    read_at: std::time::Instant,
}

/// Writes a source task's batches: the records routed to the output topic, dead letters, and
/// the source offset after each batch in the same transaction (exactly once), with retries.
struct Committer<'a> {
    ctx: &'a Context,
    spec: &'a PipelineSpec,
    writer: TopicWriter,
    /// The source's key in the offsets topic.
    key: Bytes,
    backoff: Backoff,
    /// weir_pipeline_commit_duration_seconds of the source stage.
    commit_seconds: prometheus::Histogram,
    /// weir_pipeline_batch_duration_seconds.
    batch_seconds: prometheus::Histogram,
    router: Router,
    dead_letters: Option<DeadLetters>,
    status: Arc<Mutex<Status>>,
}

impl<'a> Committer<'a> {
    async fn dead_letters(&mut self) -> Result<&mut DeadLetters> {
        dead_letters_for(self.ctx, self.spec, &mut self.dead_letters).await
    }

    /// The records to write for a batch: each record routed to its partition of the output
    /// topic, and the ones a stage rejected (or that cannot be routed) as dead letters. Err
    /// when the pipeline stops on errors. Also returns how many are dead letters.
    async fn assemble(
        &mut self,
        records: Vec<Record>,
        rejected: Vec<Rejected>,
    ) -> Result<(Vec<Outgoing>, u64)> {
        let stop_on_errors = self.spec.errors.tolerance == Tolerance::None;
        let mut out = Vec::with_capacity(records.len() + rejected.len());
        let mut failed = 0u64;
        for (record, stage, message) in rejected {
            if stop_on_errors {
                bail!("{stage}: {message}");
            }
            out.push(
                self.dead_letters()
                    .await?
                    .letter(&record, &stage, &message, 1, None),
            );
            failed += 1;
        }
        for r in records {
            match self.router.route(r) {
                Ok(o) => out.push(o),
                Err((record, message)) => {
                    if stop_on_errors {
                        bail!("topic: {message}");
                    }
                    out.push(
                        self.dead_letters()
                            .await?
                            .letter(&record, "topic", &message, 1, None),
                    );
                    failed += 1;
                }
            }
        }
        Ok((out, failed))
    }

    /// Commits a batch that went through the transforms (if any): its records and dead
    /// letters, and the source offset after it; then counts them. The caller tells the source
    /// (see [`acknowledge`]). False when the pipeline is stopping.
    async fn transformed(
        &mut self,
        records: Vec<Record>,
        rejected: Vec<Rejected>,
        offset: &serde_json::Value,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let (out, failed) = self.assemble(records, rejected).await?;
        let n = out.len() as u64;
        if !self.write(out, offset, stop).await? {
            return Ok(false);
        }
        let mut s = self.status.lock();
        s.records_in += n - failed;
        s.dead_letters += failed;
        Ok(true)
    }

    /// Commits a batch read ahead, as the plugin thread handed it back, while the task goes on
    /// reading: takes the committer and hands it back when done (see [`Commit`]).
    async fn commit_read_ahead(
        mut self,
        (result, offset, read_at): Done,
        mut stop: watch::Receiver<bool>,
    ) -> Finished<'a> {
        let written = match result {
            Ok((records, rejected)) => {
                self.transformed(records, rejected, &offset, &mut stop)
                    .await
            }
            Err(e) => Err(e),
        };
        if matches!(written, Ok(true)) {
            self.batch_seconds.observe(read_at.elapsed().as_secs_f64());
        }
        (self, written, offset)
    }

    /// Writes the records and the source offset after them (one transaction with exactly_once),
    /// retrying transient failures. The caller tells the source. False when the pipeline is
    /// stopping.
    async fn write(
        &mut self,
        out: Vec<Outgoing>,
        offset: &serde_json::Value,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let value = Bytes::from(serde_json::to_vec(offset)?);
        let committing = std::time::Instant::now();
        loop {
            let result = self
                .writer
                .write(&out, Some((self.key.clone(), value.clone())))
                .await;
            match result {
                Ok(()) => break,
                // Another instance runs the pipeline now; a restart reads where it got to.
                Err(e) if super::remote::is_fenced(&e) => return Err(e),
                Err(e) => {
                    if !self.backoff.wait(&e, stop).await? {
                        return Ok(false);
                    }
                }
            }
        }
        self.backoff.reset();
        self.commit_seconds
            .observe(committing.elapsed().as_secs_f64());
        Ok(true)
    }
}

async fn dead_letters_for<'a>(
    ctx: &Context,
    spec: &PipelineSpec,
    slot: &'a mut Option<DeadLetters>,
) -> Result<&'a mut DeadLetters> {
    if slot.is_none() {
        *slot = Some(DeadLetters::open(ctx, spec).await?);
    }
    Ok(slot.as_mut().expect("just set"))
}

/// The consumer group a sink commits to, so `weir group describe` shows its lag.
pub fn sink_group(pipeline: &str, index: usize) -> String {
    format!("weir-pipeline-{pipeline}-sink-{index}")
}

/// Input topic → sink until `stop`.
pub async fn run_sink(
    ctx: Context,
    spec: PipelineSpec,
    index: usize,
    status: Arc<Mutex<Status>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let input_name = spec.sink_input_topic().to_string();
    let input = Input::ensure(
        &ctx,
        &input_name,
        spec.topic.as_ref().and_then(|t| t.partitions),
    )
    .await?;
    let group = sink_group(&spec.name, index);
    let stage = format!("sinks[{index}]");
    let mut backoff = Backoff::new(spec.errors.max_retries, &spec.name, &stage);
    let commit_seconds = crate::metrics::get()
        .pipeline_commit_seconds
        .with_label_values(&[spec.name.as_str(), stage.as_str()]);
    let mut sink = loop {
        match open_sink(&ctx, &spec, index).await {
            Ok(s) => break s,
            Err(ConnectorError::Transient(e)) => {
                if !backoff.wait(&e, &mut stop).await? {
                    return Ok(());
                }
            }
            Err(e) => bail!("{stage}: {e}"),
        }
    };
    let stored = loop {
        match sink.start().await {
            Ok(s) => break s,
            Err(ConnectorError::Transient(e)) => {
                if !backoff.wait(&e, &mut stop).await? {
                    return Ok(());
                }
            }
            Err(e) => bail!("{stage}: {e}"),
        }
    };
    backoff.reset();
    // The group coordinator's connection, on a cluster.
    let peers = super::remote::peers();
    let mut start = loop {
        match committed_offsets(&ctx, &peers, &group, &input).await {
            Ok(s) => break s,
            Err(e) => {
                if !backoff.wait(&e, &mut stop).await? {
                    return Ok(());
                }
            }
        }
    };
    for (tp, offset) in stored {
        if tp.topic == input_name {
            start.insert(tp.partition, offset);
        }
    }
    let mut reader = TopicReader::open(&input, &start, false).await?;
    let mut dead_letters = None;
    loop {
        let polled = tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = reader.poll(SINK_READ_BYTES, Duration::from_millis(500)) => r,
        };
        let mut records: Vec<SinkRecord> = match polled {
            Ok(r) => r,
            Err(e) => {
                if !backoff.wait(&e, &mut stop).await? {
                    return Ok(());
                }
                continue;
            }
        };
        if records.is_empty() {
            continue;
        }
        let mut dead = 0u64;
        let committing = std::time::Instant::now();
        while !records.is_empty() {
            match sink.write(&records).await {
                Ok(()) => break,
                Err(ConnectorError::Fatal(e)) if super::remote::is_fenced(&e) => return Err(e),
                Err(ConnectorError::Transient(e)) => {
                    if !backoff.wait(&e, &mut stop).await? {
                        return Ok(());
                    }
                }
                Err(ConnectorError::BadRecord { index: i, message }) if i < records.len() => {
                    if spec.errors.tolerance == Tolerance::None {
                        bail!(
                            "{stage}: record at {}-{} offset {}: {message}",
                            records[i].position.topic,
                            records[i].position.partition,
                            records[i].offset
                        );
                    }
                    let bad = records.remove(i);
                    dead_letters_for(&ctx, &spec, &mut dead_letters)
                        .await?
                        .send(
                            &ctx,
                            &bad.record,
                            &stage,
                            &message,
                            Some((&bad.position.topic, bad.position.partition, bad.offset)),
                        )
                        .await?;
                    dead += 1;
                }
                Err(e) => bail!("{stage}: {e}"),
            }
        }
        backoff.reset();
        let written = records.len() as u64;
        if let Err(e) = commit_offsets(&ctx, &peers, &group, &input_name, reader.positions()).await
        {
            tracing::warn!(pipeline = %spec.name, group, error = %format!("{e:#}"), "cannot commit the sink's group offsets");
        }
        commit_seconds.observe(committing.elapsed().as_secs_f64());
        let mut s = status.lock();
        if let Some(n) = s.records_out.get_mut(index) {
            *n += written;
        }
        s.dead_letters += dead;
    }
}

/// The offsets a sink's group committed for its input, by partition.
async fn committed_offsets(
    ctx: &Context,
    peers: &Peers,
    group: &str,
    input: &Input,
) -> Result<BTreeMap<i32, i64>> {
    let partitions = input.partition_ids();
    let Some(broker) = &ctx.cluster else {
        let wanted = partitions
            .iter()
            .map(|p| (input.name().to_string(), *p))
            .collect();
        return Ok(ctx
            .groups
            .fetch_offsets(group, Some(wanted))
            .into_iter()
            .filter_map(|((_, p), o)| Some((p, o?.offset)))
            .collect());
    };
    super::remote::group_offsets(broker, peers, group, input.name(), &partitions).await
}

/// Commits a sink's read positions as its group's offsets (so `weir group describe` shows
/// its lag); the sink's own exactly-once offsets are stored with its output.
async fn commit_offsets(
    ctx: &Context,
    peers: &Peers,
    group: &str,
    topic: &str,
    positions: BTreeMap<i32, i64>,
) -> Result<()> {
    if let Some(broker) = &ctx.cluster {
        return super::remote::commit_group_offsets(broker, peers, group, topic, &positions).await;
    }
    let now = crate::now_ms();
    let offsets: Vec<((String, i32), CommittedOffset)> = positions
        .into_iter()
        .map(|(p, o)| {
            (
                (topic.to_string(), p),
                CommittedOffset {
                    offset: o,
                    leader_epoch: -1,
                    metadata: String::new(),
                    commit_timestamp: now,
                },
            )
        })
        .collect();
    ctx.groups
        .commit(group, "", None, -1, offsets, |_, _| true)
        .map(|_| ())
        .map_err(|e| anyhow!("{e:?}"))
}

/// Opens the pipeline's source (the HTTP push source is mounted by the manager instead).
async fn open_source(
    ctx: &Context,
    spec: &PipelineSpec,
) -> weir_connectors::Result<Box<dyn Source>> {
    Ok(match &spec.source {
        SourceSpec::File(c) => Box::new(FileSource::new(c.clone())?),
        SourceSpec::Sql(c) => Box::new(SqlSource::connect(c.clone()).await?),
        SourceSpec::HttpPoll(c) => Box::new(HttpPollSource::new(c.clone())?),
        SourceSpec::Topic(t) => {
            let topic = Input::existing(ctx, &t.name).ok_or_else(|| {
                ConnectorError::Transient(anyhow!("topic '{}' does not exist yet", t.name))
            })?;
            Box::new(TopicSource::new(topic, t.start_at))
        }
        SourceSpec::Http(_) => {
            return Err(ConnectorError::Fatal(anyhow!(
                "the HTTP source is mounted by the pipeline manager"
            )))
        }
    })
}

/// Opens sink `index` of the pipeline. Sinks that keep offsets of their own are named
/// `<pipeline>/<index>` there.
async fn open_sink(
    ctx: &Context,
    spec: &PipelineSpec,
    index: usize,
) -> weir_connectors::Result<Box<dyn Sink>> {
    let name = format!("{}/{index}", spec.name);
    Ok(match &spec.sinks[index] {
        SinkSpec::File(c) => Box::new(FileSink::new(c.clone())?),
        SinkSpec::Sql(c) => {
            let mut c = c.clone();
            c.name = name;
            Box::new(SqlSink::connect(c).await?)
        }
        SinkSpec::Http(c) => {
            let mut c = c.clone();
            c.name = name;
            Box::new(HttpSink::new(c)?)
        }
        SinkSpec::Topic(t) => {
            let target = ensure_output(ctx, &t.name, t.partitions)
                .await
                .map_err(ConnectorError::Transient)?;
            let writer = TopicWriter::open(
                ctx,
                Some(format!("weir-pipeline-{}-sink-{index}", spec.name)),
            )
            .await
            .map_err(ConnectorError::Transient)?;
            Box::new(TopicSink::new(
                target,
                writer,
                ctx.offsets.clone(),
                &spec.name,
                index,
                spec.sink_input_topic(),
            ))
        }
    })
}
