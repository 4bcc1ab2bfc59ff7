//! Committed offsets and group metadata in the compacted internal topic `__consumer_offsets`.
//!
//! Keys and values are JSON so an operator can read the topic with `weir consume`:
//! `{"offset":{"group":..,"topic":..,"partition":..}}` → `{"offset":..,"leader_epoch":..,
//! "metadata":..,"commit_timestamp":..}` and `{"group":{"group":..}}` → the group's generation,
//! protocol, leader and members. A deletion is a tombstone (null value), so compaction keeps
//! exactly the latest state per key.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::CommittedOffset;
use crate::log::batch::{complete_batches, BatchBuilder};
use crate::log::manager::LogManager;
use crate::log::partition::Partition;
use crate::now_ms;
use kafka_protocol::records::Compression;

pub const TOPIC: &str = "__consumer_offsets";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Key {
    Offset {
        group: String,
        topic: String,
        partition: i32,
    },
    Group {
        group: String,
    },
}

#[derive(Serialize, Deserialize)]
struct OffsetValue {
    offset: i64,
    leader_epoch: i32,
    metadata: String,
    commit_timestamp: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub subscription: Vec<u8>,
    pub assignment: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRecord {
    pub protocol_type: Option<String>,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub members: Vec<MemberRecord>,
}

/// One decoded entry, in log order.
pub enum Replayed {
    Offset {
        group: String,
        topic: String,
        partition: i32,
        value: Option<CommittedOffset>,
    },
    Group {
        group: String,
        value: Option<GroupRecord>,
    },
}

pub struct OffsetStore {
    partition: Arc<Partition>,
}

impl OffsetStore {
    /// Opens (creating if needed) the internal topic.
    pub fn open(log: Arc<LogManager>) -> Result<OffsetStore> {
        let topic = match log.topic(TOPIC) {
            Some(t) => t,
            None => log.create_topic(
                TOPIC,
                1,
                -1,
                BTreeMap::from([
                    ("cleanup.policy".to_string(), "compact".to_string()),
                    ("segment.bytes".to_string(), (100 << 20).to_string()),
                ]),
            )?,
        };
        let partition = topic.partitions[0].clone();
        Ok(OffsetStore { partition })
    }

    fn append(&self, records: Vec<(Key, Option<Vec<u8>>)>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut b = BatchBuilder::new(now);
        for (key, value) in &records {
            let key = serde_json::to_vec(key)?;
            b.push(Some(&key), value.as_deref(), &[], now);
        }
        self.partition.append(&b.finish(Compression::None))?;
        Ok(())
    }

    pub fn write_offsets(
        &self,
        group: &str,
        offsets: &[((String, i32), CommittedOffset)],
    ) -> Result<()> {
        let mut records = Vec::with_capacity(offsets.len());
        for ((topic, partition), o) in offsets {
            let value = OffsetValue {
                offset: o.offset,
                leader_epoch: o.leader_epoch,
                metadata: o.metadata.clone(),
                commit_timestamp: o.commit_timestamp,
            };
            records.push((
                Key::Offset {
                    group: group.to_string(),
                    topic: topic.clone(),
                    partition: *partition,
                },
                Some(serde_json::to_vec(&value)?),
            ));
        }
        self.append(records)
    }

    pub fn delete_offsets(&self, group: &str, tps: &[(String, i32)]) -> Result<()> {
        let records = tps
            .iter()
            .map(|(topic, partition)| {
                (
                    Key::Offset {
                        group: group.to_string(),
                        topic: topic.clone(),
                        partition: *partition,
                    },
                    None,
                )
            })
            .collect();
        self.append(records)
    }

    pub fn write_group(&self, group: &str, record: Option<&GroupRecord>) -> Result<()> {
        let value = record.map(serde_json::to_vec).transpose()?;
        self.append(vec![(
            Key::Group {
                group: group.to_string(),
            },
            value,
        )])
    }

    /// Reads the whole topic in order, handing each entry to `f`.
    pub fn replay(&self, mut f: impl FnMut(Replayed)) -> Result<()> {
        let mut offset = self.partition.log_start_offset();
        let end = self.partition.high_watermark();
        while offset < end {
            let data = self.partition.read(offset, 4 << 20, true)?;
            let Some(slice) = data.records else { break };
            let bytes = slice.read_bytes()?;
            let mut advanced = false;
            for batch in complete_batches(&bytes) {
                let base = batch.base_offset();
                if !batch.is_control() {
                    let mut bad = None;
                    batch.for_each_record(|r| {
                        let at = base + r.offset_delta as i64;
                        if at < offset || bad.is_some() {
                            return;
                        }
                        match decode(r.key, r.value) {
                            Ok(Some(entry)) => f(entry),
                            Ok(None) => {}
                            Err(e) => bad = Some(e.context(format!("{TOPIC} offset {at}"))),
                        }
                    })?;
                    if let Some(e) = bad {
                        // A record this version cannot read is skipped, not fatal.
                        tracing::warn!(error = %format!("{e:#}"), "skipping unreadable record");
                    }
                }
                offset = batch.next_offset();
                advanced = true;
            }
            if !advanced {
                anyhow::bail!("{TOPIC}: cannot decode the batch at offset {offset}");
            }
        }
        Ok(())
    }
}

fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Option<Replayed>> {
    let Some(key) = key else { return Ok(None) };
    let key: Key = serde_json::from_slice(key).context("bad key")?;
    Ok(Some(match key {
        Key::Offset {
            group,
            topic,
            partition,
        } => {
            let value = match value {
                Some(v) => {
                    let v: OffsetValue = serde_json::from_slice(v).context("bad offset value")?;
                    Some(CommittedOffset {
                        offset: v.offset,
                        leader_epoch: v.leader_epoch,
                        metadata: v.metadata,
                        commit_timestamp: v.commit_timestamp,
                    })
                }
                None => None,
            };
            Replayed::Offset {
                group,
                topic,
                partition,
                value,
            }
        }
        Key::Group { group } => {
            let value = value
                .map(serde_json::from_slice)
                .transpose()
                .context("bad group value")?;
            Replayed::Group { group, value }
        }
    }))
}
