//! Source offsets (and topic sinks' applied offsets) in the compacted internal topic
//! `__pipeline_offsets`: key `{"pipeline": NAME}` (or `{"pipeline": NAME, "sink": I}`), value
//! the JSON offset. With delivery exactly_once they are written in the same transaction as
//! the records they describe, so only committed offsets are ever read back.

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use crate::log::internal::InternalTopic;
use crate::log::manager::LogManager;
use crate::log::partition::Partition;

pub const TOPIC: &str = "__pipeline_offsets";

pub struct OffsetStore {
    topic: InternalTopic,
}

impl OffsetStore {
    pub fn open(log: &LogManager) -> Result<OffsetStore> {
        Ok(OffsetStore {
            topic: InternalTopic::open(log, TOPIC, &[])?,
        })
    }

    pub fn partition(&self) -> Arc<Partition> {
        self.topic.partition().clone()
    }

    /// The key of a pipeline's source offset, or of one of its topic sinks.
    pub fn key(pipeline: &str, sink: Option<usize>) -> Vec<u8> {
        let key = match sink {
            None => json!({ "pipeline": pipeline }),
            Some(i) => json!({ "pipeline": pipeline, "sink": i }),
        };
        serde_json::to_vec(&key).expect("JSON keys serialise")
    }

    /// The last committed offset stored under `key`: records of aborted transactions, and of
    /// transactions still open (other pipelines' batches in flight), are not committed.
    pub fn load(&self, key: &[u8]) -> Result<Option<serde_json::Value>> {
        let partition = self.topic.partition();
        let open = partition.open_transactions();
        let uncommitted = |pid: i64, offset: i64| {
            partition.is_aborted(pid, offset)
                || open
                    .iter()
                    .any(|&(p, _, first)| p == pid && first <= offset)
        };
        let mut latest = None;
        self.topic.for_each_batch(|batch| {
            if batch.is_control()
                || (batch.is_transactional()
                    && uncommitted(batch.producer_id(), batch.base_offset()))
            {
                return Ok(());
            }
            batch.for_each_record(|r| {
                if r.key == Some(key) {
                    latest = r.value.and_then(|v| serde_json::from_slice(v).ok());
                }
            })?;
            Ok(())
        })?;
        Ok(latest)
    }
}
