//! Committed offsets and group metadata in the compacted internal topic `__consumer_offsets`.
//!
//! Keys and values are JSON so an operator can read the topic with `weir consume`:
//! `{"offset":{"group":..,"topic":..,"partition":..}}` → `{"offset":..,"leader_epoch":..,
//! "metadata":..,"commit_timestamp":..}` and `{"group":{"group":..}}` → the group's generation,
//! protocol, leader and members. A deletion is a tombstone (null value), so compaction keeps
//! exactly the latest state per key.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::CommittedOffset;
use crate::log::batch::ProducerFields;
use crate::log::internal::{InternalTopic, KeyValue};
use crate::log::manager::LogManager;
use crate::log::partition::AppendError;
use crate::log::producer_state::{marker_type, MARKER_COMMIT};

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
    /// A consumer-protocol group's state (KIP-848); absent for classic groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<super::consumer::ConsumerGroupRecord>,
}

/// One decoded entry, in log order. Offsets committed in a transaction appear when its commit
/// marker does; those of a transaction still open at the end come last, as `Pending`.
pub enum Replayed {
    Pending {
        producer_id: i64,
        group: String,
        topic: String,
        partition: i32,
        value: CommittedOffset,
    },
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
    topic: InternalTopic,
}

impl OffsetStore {
    /// Opens (creating if needed) the internal topic.
    pub fn open(log: Arc<LogManager>) -> Result<OffsetStore> {
        Ok(OffsetStore {
            topic: InternalTopic::open(&log, TOPIC, &[])?,
        })
    }

    fn append(&self, records: Vec<(Key, Option<Vec<u8>>)>) -> Result<()> {
        let records = encode_keys(records)?;
        self.topic
            .append_unflushed(&records, ProducerFields::NONE)?;
        Ok(())
    }

    /// Writes offsets committed inside a producer's transaction: they take effect with its
    /// commit marker.
    pub fn write_txn_offsets(
        &self,
        group: &str,
        producer_id: i64,
        producer_epoch: i16,
        offsets: &[((String, i32), CommittedOffset)],
    ) -> Result<(), AppendError> {
        let records = encode_keys(offset_records(group, offsets))
            .map_err(|e| AppendError::Io(std::io::Error::other(e)))?;
        let producer = ProducerFields {
            producer_id,
            producer_epoch,
            base_sequence: -1,
            transactional: true,
        };
        self.topic.append_unflushed(&records, producer)?;
        Ok(())
    }

    pub fn write_offsets(
        &self,
        group: &str,
        offsets: &[((String, i32), CommittedOffset)],
    ) -> Result<()> {
        self.append(offset_records(group, offsets))
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
        // Transactional offsets per producer, until their marker.
        let mut open: HashMap<i64, Vec<Replayed>> = HashMap::new();
        self.topic.for_each_batch(|batch| {
            if batch.is_control() {
                let commit = marker_type(&batch) == Some(MARKER_COMMIT);
                for entry in open.remove(&batch.producer_id()).unwrap_or_default() {
                    if commit {
                        f(entry);
                    }
                }
                return Ok(());
            }
            let mut bad = None;
            batch.for_each_record(|r| {
                if bad.is_some() {
                    return;
                }
                match decode(r.key, r.value) {
                    Ok(Some(entry)) if batch.is_transactional() => open
                        .entry(batch.producer_id())
                        .or_default()
                        .push(entry),
                    Ok(Some(entry)) => f(entry),
                    Ok(None) => {}
                    Err(e) => bad = Some(e),
                }
            })?;
            if let Some(e) = bad {
                // A record this version cannot read is skipped, not fatal.
                tracing::warn!(topic = TOPIC, offset = batch.base_offset(), error = %format!("{e:#}"), "skipping unreadable record");
            }
            Ok(())
        })?;
        for (producer_id, entries) in open {
            for entry in entries {
                if let Replayed::Offset {
                    group,
                    topic,
                    partition,
                    value: Some(value),
                } = entry
                {
                    f(Replayed::Pending {
                        producer_id,
                        group,
                        topic,
                        partition,
                        value,
                    });
                }
            }
        }
        Ok(())
    }
}

fn offset_records(
    group: &str,
    offsets: &[((String, i32), CommittedOffset)],
) -> Vec<(Key, Option<Vec<u8>>)> {
    offsets
        .iter()
        .map(|((topic, partition), o)| {
            let value = OffsetValue {
                offset: o.offset,
                leader_epoch: o.leader_epoch,
                metadata: o.metadata.clone(),
                commit_timestamp: o.commit_timestamp,
            };
            (
                Key::Offset {
                    group: group.to_string(),
                    topic: topic.clone(),
                    partition: *partition,
                },
                Some(serde_json::to_vec(&value).expect("offset values serialise")),
            )
        })
        .collect()
}

fn encode_keys(records: Vec<(Key, Option<Vec<u8>>)>) -> Result<Vec<KeyValue>> {
    records
        .into_iter()
        .map(|(k, v)| Ok((serde_json::to_vec(&k)?, v)))
        .collect()
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
