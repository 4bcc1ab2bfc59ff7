//! Topics as a pipeline source and as a sink.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use weir_connectors::{
    ConnectorError, Guarantee, Record, Sink, SinkRecord, Source, SourceBatch, TopicPartition,
};

use super::io::{Input, Outgoing, TopicReader, TopicWriter};
use super::offsets::OffsetStore;
use super::spec::StartAt;
use crate::client::partitioner::partition_for_key;

/// Bytes read per partition per poll.
const READ_BYTES: u64 = 1 << 20;

/// Bytes to read for `records` more records: about 1 KiB each, at most [`READ_BYTES`].
fn read_bytes(records: usize) -> u64 {
    READ_BYTES.min(records as u64 * 1024)
}

/// Reads an existing topic (committed records only); the offset is the next offset per
/// partition.
pub struct TopicSource {
    topic: Input,
    start_at: StartAt,
    reader: Option<TopicReader>,
    /// Records read from the log but not handed over yet (a read can return more records than
    /// a batch may hold).
    pending: VecDeque<SinkRecord>,
    origins: Vec<(i32, i64)>,
}

impl TopicSource {
    pub fn new(topic: Input, start_at: StartAt) -> TopicSource {
        TopicSource {
            topic,
            start_at,
            reader: None,
            pending: VecDeque::new(),
            origins: Vec::new(),
        }
    }
}

fn positions_json(positions: &BTreeMap<i32, i64>) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = positions
        .iter()
        .map(|(p, o)| (p.to_string(), json!(o)))
        .collect();
    json!({ "partitions": map })
}

fn positions_from(value: Option<&serde_json::Value>) -> BTreeMap<i32, i64> {
    value
        .and_then(|v| v.get("partitions"))
        .and_then(|v| v.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(p, o)| Some((p.parse().ok()?, o.as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

#[async_trait]
impl Source for TopicSource {
    /// Committed records not handed out yet: those read and pending, and those not read.
    fn lag(&self) -> Option<weir_connectors::Lag> {
        let behind = self.reader.as_ref()?.records_behind() + self.pending.len() as u64;
        Some(weir_connectors::Lag::Records(behind))
    }

    async fn start(&mut self, resume: Option<serde_json::Value>) -> weir_connectors::Result<()> {
        let start = positions_from(resume.as_ref());
        let from_end = self.start_at == StartAt::End;
        let reader = TopicReader::open(&self.topic, &start, from_end)
            .await
            .map_err(ConnectorError::Transient)?;
        self.reader = Some(reader);
        Ok(())
    }

    async fn next_batch(
        &mut self,
        max_records: usize,
    ) -> weir_connectors::Result<Option<SourceBatch>> {
        let reader = self
            .reader
            .as_mut()
            .ok_or_else(|| ConnectorError::Fatal(anyhow!("topic source used before start")))?;
        let max_records = max_records.max(1);
        while self.pending.is_empty() {
            let records = reader
                .poll(read_bytes(max_records), Duration::from_millis(500))
                .await
                .map_err(ConnectorError::Transient)?;
            self.pending.extend(records);
        }
        // Fill the batch with what is already in the log rather than hand over the remains
        // of the last read alone: fewer, fuller batches (each one a transaction) go faster.
        // A read error here hands over what is pending; the next call's read reports it.
        while self.pending.len() < max_records {
            match reader
                .read_now(read_bytes(max_records - self.pending.len()))
                .await
            {
                Ok(records) if !records.is_empty() => self.pending.extend(records),
                _ => break,
            }
        }
        // No await from here on: a dropped call loses nothing (see allows_read_ahead).
        let n = self.pending.len().min(max_records);
        let records: Vec<SinkRecord> = self.pending.drain(..n).collect();
        self.origins = records
            .iter()
            .map(|r| (r.position.partition, r.offset))
            .collect();
        // Past everything read, except in partitions where records are still pending: there,
        // up to the first of them.
        let mut positions = reader.positions();
        for r in self.pending.iter().rev() {
            positions.insert(r.position.partition, r.offset);
        }
        Ok(Some(SourceBatch {
            records: records.into_iter().map(|r| r.record).collect(),
            offset: positions_json(&positions),
        }))
    }

    fn last_batch_origins(&self) -> Option<(&str, &[(i32, i64)])> {
        Some((self.topic.name(), &self.origins))
    }

    // The reader's positions move only in a read that has no await after it, and what it
    // returns goes straight into `pending`: a dropped next_batch loses nothing, and the offset
    // of each batch stands on its own. On a cluster a dropped read would also drop its
    // connection (the answer is not read), so the source is not read ahead there.
    fn allows_read_ahead(&self) -> bool {
        matches!(self.topic, Input::Local(_))
    }
}

/// Writes records into another topic, exactly once: the offsets it has applied are stored
/// in `__pipeline_offsets` in the same transaction as the records.
pub struct TopicSink {
    target: Arc<str>,
    partitions: i32,
    writer: TopicWriter,
    offsets: Arc<OffsetStore>,
    key: Bytes,
    input_topic: String,
    applied: BTreeMap<i32, i64>,
    next_partition: i32,
}

impl TopicSink {
    pub fn new(
        (target, partitions): (Arc<str>, i32),
        writer: TopicWriter,
        offsets: Arc<OffsetStore>,
        pipeline: &str,
        sink_index: usize,
        input_topic: &str,
    ) -> TopicSink {
        TopicSink {
            target,
            partitions,
            writer,
            offsets,
            key: Bytes::from(OffsetStore::key(pipeline, Some(sink_index))),
            input_topic: input_topic.to_string(),
            applied: BTreeMap::new(),
            next_partition: 0,
        }
    }

    fn partition_for(&mut self, record: &Record) -> i32 {
        let n = self.partitions;
        match &record.key {
            Some(k) => partition_for_key(k, n),
            None => {
                self.next_partition = (self.next_partition + 1) % n;
                self.next_partition
            }
        }
    }
}

#[async_trait]
impl Sink for TopicSink {
    async fn start(&mut self) -> weir_connectors::Result<BTreeMap<TopicPartition, i64>> {
        let stored = self
            .offsets
            .load(&self.key)
            .await
            .map_err(ConnectorError::Transient)?;
        self.applied = positions_from(stored.as_ref());
        Ok(self
            .applied
            .iter()
            .map(|(p, o)| {
                (
                    TopicPartition {
                        topic: self.input_topic.clone(),
                        partition: *p,
                    },
                    *o,
                )
            })
            .collect())
    }

    async fn write(&mut self, batch: &[SinkRecord]) -> weir_connectors::Result<()> {
        let mut out = Vec::with_capacity(batch.len());
        let mut applied = self.applied.clone();
        for r in batch {
            let partition = self.partition_for(&r.record);
            out.push(Outgoing {
                topic: self.target.clone(),
                partition,
                record: r.record.clone(),
            });
            applied.insert(r.position.partition, r.offset + 1);
        }
        let value = serde_json::to_vec(&positions_json(&applied)).expect("offsets serialise");
        self.writer
            .write(&out, Some((self.key.clone(), Bytes::from(value))))
            .await
            .map_err(|e| {
                // Another instance writes for this sink now: stop (see remote::Fenced).
                if super::remote::is_fenced(&e) {
                    ConnectorError::Fatal(e)
                } else {
                    ConnectorError::Transient(e)
                }
            })?;
        self.applied = applied;
        Ok(())
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::BatchBuilder;
    use crate::log::manager::{LogManager, Topic};
    use crate::pipeline::io::ensure_topic;
    use kafka_protocol::records::Compression;

    fn fill(topic: &Topic, partition: i32, values: std::ops::Range<usize>) {
        let now = crate::now_ms();
        let mut b = BatchBuilder::new(now);
        for v in values {
            b.push(None, Some(v.to_string().as_bytes()), &[], now);
        }
        topic.partitions[partition as usize]
            .append(&b.finish(Compression::None))
            .unwrap();
    }

    fn values(batch: &SourceBatch) -> Vec<String> {
        batch
            .records
            .iter()
            .map(|r| String::from_utf8(r.value.as_deref().unwrap().to_vec()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn batches_hold_at_most_max_records_and_resume_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(dir.path(), Default::default()).unwrap();
        let topic = ensure_topic(&log, "in", Some(2), 1).unwrap();
        fill(&topic, 0, 0..25);
        fill(&topic, 1, 100..110);

        let mut source = TopicSource::new(Input::Local(topic.clone()), StartAt::Beginning);
        source.start(None).await.unwrap();
        let first = source.next_batch(7).await.unwrap().unwrap();
        assert_eq!(first.records.len(), 7);
        let (name, origins) = source.last_batch_origins().unwrap();
        assert_eq!(name, "in");
        assert_eq!(origins.len(), 7);
        let mut seen = values(&first);

        // A restart from the first batch's offset hands over exactly what came after it.
        let mut resumed = TopicSource::new(Input::Local(topic.clone()), StartAt::Beginning);
        resumed.start(Some(first.offset.clone())).await.unwrap();
        while seen.len() < 35 {
            let b = resumed.next_batch(7).await.unwrap().unwrap();
            assert!(b.records.len() <= 7, "a batch of {}", b.records.len());
            assert_eq!(
                resumed.last_batch_origins().unwrap().1.len(),
                b.records.len()
            );
            seen.extend(values(&b));
        }
        let mut expected: Vec<String> = (0..25).chain(100..110).map(|v| v.to_string()).collect();
        seen.sort();
        expected.sort();
        assert_eq!(seen, expected, "every record once");

        // The source that read ahead goes on after its first batch, without repeating it.
        let mut rest = Vec::new();
        while rest.len() < 28 {
            rest.extend(values(&source.next_batch(7).await.unwrap().unwrap()));
        }
        assert!(rest.iter().all(|v| !values(&first).contains(v)));
        assert_eq!(rest.len(), 28);
    }

    #[tokio::test]
    async fn a_batch_is_filled_with_what_the_log_holds() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(dir.path(), Default::default()).unwrap();
        let topic = ensure_topic(&log, "in", Some(1), 1).unwrap();
        // Values of 3 KB, one per log batch: a read of about 1 KiB per record wanted returns
        // only a few of them at a time.
        let now = crate::now_ms();
        for i in 0..20 {
            let mut b = BatchBuilder::new(now);
            b.push(None, Some(format!("{i:03000}").as_bytes()), &[], now);
            topic.partitions[0]
                .append(&b.finish(Compression::None))
                .unwrap();
        }
        let mut source = TopicSource::new(Input::Local(topic.clone()), StartAt::Beginning);
        source.start(None).await.unwrap();
        let sizes: Vec<usize> = [
            source.next_batch(8).await.unwrap().unwrap(),
            source.next_batch(8).await.unwrap().unwrap(),
            source.next_batch(8).await.unwrap().unwrap(),
        ]
        .iter()
        .map(|b| b.records.len())
        .collect();
        assert_eq!(sizes, [8, 8, 4]);
    }
}
