//! The single-partition, compacted internal topics the coordinators keep their state in
//! (`__consumer_offsets`, `__transaction_state`): JSON keys and values, written with the
//! broker's own append path and read back in full at start.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use kafka_protocol::records::Compression;

use super::batch::{complete_batches, BatchBuilder, BatchView, ProducerFields};
use super::manager::LogManager;
use super::partition::{AppendError, AppendInfo, Partition};
use super::producer_state::Origin;
use crate::now_ms;

/// A record's key and value (None: a tombstone).
pub type KeyValue = (Vec<u8>, Option<Vec<u8>>);

/// An internal topic's configs: compacted, 100 MiB segments, plus `extra`.
pub fn internal_configs(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut all = BTreeMap::from([
        ("cleanup.policy".to_string(), "compact".to_string()),
        ("segment.bytes".to_string(), (100 << 20).to_string()),
    ]);
    for (k, v) in extra {
        all.insert(k.to_string(), v.to_string());
    }
    all
}

pub struct InternalTopic {
    partition: Arc<Partition>,
}

impl InternalTopic {
    /// Opens the topic, creating it compacted (plus `configs`) on first use.
    pub fn open(log: &LogManager, name: &str, configs: &[(&str, &str)]) -> Result<InternalTopic> {
        let topic = match log.topic(name) {
            Some(t) => t,
            None => log.create_topic(name, 1, -1, internal_configs(configs))?,
        };
        Ok(InternalTopic {
            partition: topic.partitions[0].clone(),
        })
    }

    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    /// Appends (key, value) records as one batch; a None value is a tombstone. Waits for the
    /// fsync when the topic asks for one.
    pub async fn append(
        &self,
        records: &[KeyValue],
        producer: ProducerFields,
    ) -> Result<Option<AppendInfo>, AppendError> {
        let info = self.append_unflushed(records, producer)?;
        if let Some(info) = info.filter(|i| i.needs_fsync) {
            self.partition.flush_to(info.last_offset + 1).await?;
        }
        Ok(info)
    }

    /// As [`append`], without waiting for an fsync (for topics that do not ask for one).
    pub fn append_unflushed(
        &self,
        records: &[KeyValue],
        producer: ProducerFields,
    ) -> Result<Option<AppendInfo>, AppendError> {
        if records.is_empty() {
            return Ok(None);
        }
        let now = now_ms();
        let mut b = BatchBuilder::new(now).with_producer(producer);
        for (key, value) in records {
            b.push(Some(key), value.as_deref(), &[], now);
        }
        let origin = if producer.producer_id >= 0 {
            Origin::Coordinator
        } else {
            Origin::Client
        };
        self.partition
            .append_as(&b.finish(Compression::None), origin)
            .map(Some)
    }

    /// Hands every batch of the topic, in order, to `f`: up to the log end, not the high
    /// watermark, since a coordinator taking over as leader keeps all its log holds (the other
    /// replicas truncate to it) and may not yet know how far the in-sync replicas reach.
    pub fn for_each_batch(&self, mut f: impl FnMut(BatchView<'_>) -> Result<()>) -> Result<()> {
        let name = &self.partition.topic;
        let mut offset = self.partition.log_start_offset();
        let end = self.partition.log_end_offset();
        while offset < end {
            let data = self.partition.read_replica(offset, 4 << 20)?;
            let Some(slice) = data.records else { break };
            let bytes = slice.read_bytes()?;
            let mut advanced = false;
            for batch in complete_batches(&bytes) {
                if batch.next_offset() > offset {
                    f(batch).with_context(|| format!("{name} offset {}", batch.base_offset()))?;
                }
                offset = batch.next_offset();
                advanced = true;
            }
            if !advanced {
                anyhow::bail!("{name}: cannot decode the batch at offset {offset}");
            }
        }
        Ok(())
    }
}
