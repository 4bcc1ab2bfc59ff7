//! Source and sink connectors for weir pipelines.
//!
//! A pipeline moves records from a [`Source`] into a topic, and from a topic into [`Sink`]s.
//! The runtime (in the `weir` crate) owns the topic side: it writes each source batch and the
//! source offset after it in one transaction, and hands sinks the records of a topic in
//! offset order. Connectors own the outside world: reading files, databases and HTTP
//! endpoints, and writing to them with the offsets they have applied, so that a restart
//! resumes exactly where the output stops.
//!
//! Each connector has a configuration struct that is deserialised straight from the pipeline
//! YAML (`deny_unknown_fields`, so a typo is an error naming the field).

pub mod http;
pub mod sql;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;

pub mod file;

/// A record as sources produce it and sinks receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Bytes>,
    /// None is a tombstone (only sinks see those).
    pub value: Option<Bytes>,
    /// Header values may be null, as in Kafka, which tells null from empty.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

impl Record {
    /// A record with a value and the current time.
    pub fn new(value: impl Into<Bytes>) -> Record {
        Record {
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp: now_ms(),
        }
    }
}

/// Where a record a sink receives sits in its topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

/// A topic record handed to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkRecord {
    pub record: Record,
    pub position: TopicPartition,
    pub offset: i64,
}

/// A batch read from a source, and the source's position just after its last record. The
/// runtime stores `offset` in the same transaction as the records and gives it back to
/// [`Source::start`] after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceBatch {
    pub records: Vec<Record>,
    pub offset: serde_json::Value,
}

/// The delivery guarantee a sink gives across crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// Offsets are stored atomically with the output: nothing is lost or written twice.
    ExactlyOnce,
    /// After a crash the last batch may be written again (the runtime's consumer group offset
    /// is the resume point).
    AtLeastOnce,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Worth retrying with backoff (connection refused, timeout, lock conflict, 5xx).
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// One record of the batch cannot be handled (bad JSON, a row the table refuses); the
    /// runtime routes it to the dead-letter topic or stops, as the pipeline says. From a sink,
    /// `index` is the record's place in the batch given to `write`; from a source it is 0 and
    /// the rejected input comes from [`Source::take_rejected`].
    #[error("record {index}: {message}")]
    BadRecord { index: usize, message: String },
    /// The connector cannot go on (bad configuration, missing permission).
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;

/// How far a source is behind its input, in the unit it can count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lag {
    /// Bytes of input not read yet (files).
    Bytes(u64),
    /// Records not read yet (topics; rows for SQL sources).
    Records(u64),
}

#[async_trait]
pub trait Source: Send {
    /// Starts reading just after `resume` (the offset of the last batch that reached the
    /// topic), or where the configuration says when there is none.
    async fn start(&mut self, resume: Option<serde_json::Value>) -> Result<()>;

    /// Waits for the next batch of at most `max_records` records. `Ok(None)` means the source
    /// has ended (a bounded source); an unbounded one waits for more input instead.
    async fn next_batch(&mut self, max_records: usize) -> Result<Option<SourceBatch>>;

    /// After [`Source::next_batch`] returned [`ConnectorError::BadRecord`]: the rejected input,
    /// as a one-record batch for the dead-letter topic (value = the raw bytes, headers saying
    /// where they came from) with the source offset just after it. Storing that offset with the
    /// dead letter (one transaction) moves the source past the bad input exactly once; a
    /// pipeline that stops on errors leaves it unstored, and a restart meets the error again.
    /// Sources whose errors carry nothing worth keeping return None (the default). The source
    /// goes on past the bad input on the next call whether or not this is taken.
    fn take_rejected(&mut self) -> Option<SourceBatch> {
        None
    }

    /// Where each record of the last batch was, for sources that read a topic: the topic, and
    /// (partition, offset) per record. Transforms see it. The default: None.
    fn last_batch_origins(&self) -> Option<(&str, &[(i32, i64)])> {
        None
    }

    /// Whether the runtime may call [`Source::next_batch`] again before the batches it returned
    /// are committed, and drop a `next_batch` future that has not finished (it must lose
    /// nothing then). The runtime then reads the next batches while the previous ones are being
    /// transformed and written. [`Source::committed`] is still called once per batch, in order.
    /// The default: false.
    fn allows_read_ahead(&self) -> bool {
        false
    }

    /// How far the source is behind its input now, for sources that can tell cheaply; None
    /// (the default) when it cannot, or cannot now.
    fn lag(&self) -> Option<Lag> {
        None
    }

    /// Everything up to `offset` is durable in the topic. Sources that can acknowledge
    /// upstream do it here; the default does nothing.
    async fn committed(&mut self, _offset: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
pub trait Sink: Send {
    /// The next offset to deliver per topic partition, as recorded with the output
    /// (exactly-once sinks); partitions not listed resume from the runtime's consumer group
    /// offset, or the beginning.
    async fn start(&mut self) -> Result<BTreeMap<TopicPartition, i64>>;

    /// Writes a batch (in offset order within each partition) and, for exactly-once sinks,
    /// records the offsets after it atomically with the data. Returns once it is durable.
    async fn write(&mut self, batch: &[SinkRecord]) -> Result<()>;

    fn guarantee(&self) -> Guarantee;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
