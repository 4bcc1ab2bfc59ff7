//! Source offsets (and topic sinks' applied offsets) in the compacted internal topic
//! `__pipeline_offsets`: key `{"pipeline": NAME}` (or `{"pipeline": NAME, "sink": I}`), value
//! the JSON offset. With delivery exactly_once they are written in the same transaction as
//! the records they describe, so only committed offsets are ever read back. A single node
//! reads its own copy; a cluster node asks the topic's leader.

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use crate::kafka::Broker;
use crate::log::internal::InternalTopic;
use crate::log::manager::LogManager;
use crate::log::partition::Partition;

pub const TOPIC: &str = "__pipeline_offsets";

pub enum OffsetStore {
    Local(InternalTopic),
    Cluster(Arc<Broker>),
}

impl OffsetStore {
    pub fn open(log: &LogManager) -> Result<OffsetStore> {
        Ok(OffsetStore::Local(InternalTopic::open(log, TOPIC, &[])?))
    }

    /// The topic's partition in this node's log, on a single node.
    pub fn local_partition(&self) -> Option<Arc<Partition>> {
        match self {
            OffsetStore::Local(topic) => Some(topic.partition().clone()),
            OffsetStore::Cluster(_) => None,
        }
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
    pub async fn load(&self, key: &[u8]) -> Result<Option<serde_json::Value>> {
        let topic = match self {
            OffsetStore::Local(topic) => topic,
            OffsetStore::Cluster(broker) => return super::remote::load_offset(broker, key).await,
        };
        let partition = topic.partition();
        let open = partition.open_transactions();
        let uncommitted = |pid: i64, offset: i64| {
            partition.is_aborted(pid, offset)
                || open
                    .iter()
                    .any(|&(p, _, first)| p == pid && first <= offset)
        };
        let mut latest = None;
        topic.for_each_batch(|batch| {
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
