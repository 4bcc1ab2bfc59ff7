//! Per-topic log configuration: Kafka's names, Kafka's defaults, overridable per broker and topic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    Delete,
    Compact,
    CompactDelete,
}

/// The effective configuration of one topic.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub segment_bytes: u64,
    pub segment_ms: i64,
    pub max_message_bytes: usize,
    pub cleanup_policy: CleanupPolicy,
    pub flush_messages: i64,
    pub flush_ms: i64,
    pub index_interval_bytes: u64,
    pub delete_retention_ms: i64,
    pub min_cleanable_dirty_ratio: f64,
    /// With acks=all, the in-sync replicas a write needs (Kafka's min.insync.replicas).
    pub min_insync_replicas: i32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            max_message_bytes: 1_048_588,
            cleanup_policy: CleanupPolicy::Delete,
            flush_messages: i64::MAX,
            flush_ms: i64::MAX,
            index_interval_bytes: 4096,
            delete_retention_ms: 24 * 3600 * 1000,
            min_cleanable_dirty_ratio: 0.5,
            min_insync_replicas: 1,
        }
    }
}

/// Every topic-level key weir understands, with its documentation line.
pub const KEYS: &[(&str, &str)] = &[
    (
        "cleanup.policy",
        "delete, compact, or both (comma separated)",
    ),
    (
        "delete.retention.ms",
        "how long tombstones are kept on compacted topics",
    ),
    (
        "flush.messages",
        "fsync after this many records; 1 means fsync before every acknowledgement",
    ),
    (
        "flush.ms",
        "fsync when the oldest unflushed record is this old",
    ),
    (
        "index.interval.bytes",
        "bytes of log between two offset index entries",
    ),
    (
        "max.message.bytes",
        "largest record batch accepted, in bytes",
    ),
    (
        "min.insync.replicas",
        "with acks=all, a write fails with NOT_ENOUGH_REPLICAS unless this many replicas are in sync",
    ),
    (
        "retention.bytes",
        "delete old segments when the partition is larger than this; -1 for no limit",
    ),
    (
        "retention.ms",
        "delete segments whose newest record is older than this; -1 for no limit",
    ),
    ("segment.bytes", "roll a new segment file at this size"),
    ("segment.ms", "roll a new segment file after this time"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown topic config '{0}'")]
    Unknown(String),
    #[error("invalid value '{value}' for {key}: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
}

impl LogConfig {
    /// Applies `overrides` on top of `self`, rejecting unknown keys and bad values.
    pub fn with_overrides(
        &self,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut c = self.clone();
        for (k, v) in overrides {
            c.set(k, v)?;
        }
        Ok(c)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let invalid = |why: &str| ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        let int = || {
            value
                .trim()
                .parse::<i64>()
                .map_err(|_| invalid("not an integer"))
        };
        let positive = || {
            int().and_then(|v| {
                if v > 0 {
                    Ok(v)
                } else {
                    Err(invalid("must be > 0"))
                }
            })
        };
        let at_least_minus_one = || {
            int().and_then(|v| {
                if v >= -1 {
                    Ok(v)
                } else {
                    Err(invalid("must be >= -1"))
                }
            })
        };
        match key {
            "retention.ms" => self.retention_ms = at_least_minus_one()?,
            "retention.bytes" => self.retention_bytes = at_least_minus_one()?,
            "segment.bytes" => {
                let v = positive()?;
                if v < 14 {
                    return Err(invalid("must be at least 14"));
                }
                self.segment_bytes = v as u64;
            }
            "segment.ms" => self.segment_ms = positive()?,
            "max.message.bytes" => self.max_message_bytes = positive()? as usize,
            "flush.messages" => self.flush_messages = positive()?,
            "flush.ms" => {
                self.flush_ms = int().and_then(|v| {
                    if v >= 0 {
                        Ok(v)
                    } else {
                        Err(invalid("must be >= 0"))
                    }
                })?
            }
            "index.interval.bytes" => self.index_interval_bytes = positive()? as u64,
            "min.insync.replicas" => {
                self.min_insync_replicas = positive()?.min(i32::MAX as i64) as i32
            }
            "delete.retention.ms" => self.delete_retention_ms = int()?.max(0),
            "min.cleanable.dirty.ratio" => {
                let v: f64 = value.trim().parse().map_err(|_| invalid("not a number"))?;
                if !(0.0..=1.0).contains(&v) {
                    return Err(invalid("must be between 0 and 1"));
                }
                self.min_cleanable_dirty_ratio = v;
            }
            "cleanup.policy" => {
                let mut parts: Vec<&str> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                parts.sort();
                parts.dedup();
                self.cleanup_policy = match parts.as_slice() {
                    ["delete"] => CleanupPolicy::Delete,
                    ["compact"] => CleanupPolicy::Compact,
                    ["compact", "delete"] => CleanupPolicy::CompactDelete,
                    _ => return Err(invalid("expected delete, compact or compact,delete")),
                };
            }
            _ => return Err(ConfigError::Unknown(key.to_string())),
        }
        Ok(())
    }

    /// The value of `key` as Kafka prints it.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "retention.ms" => self.retention_ms.to_string(),
            "retention.bytes" => self.retention_bytes.to_string(),
            "segment.bytes" => self.segment_bytes.to_string(),
            "segment.ms" => self.segment_ms.to_string(),
            "max.message.bytes" => self.max_message_bytes.to_string(),
            "flush.messages" => self.flush_messages.to_string(),
            "flush.ms" => self.flush_ms.to_string(),
            "index.interval.bytes" => self.index_interval_bytes.to_string(),
            "delete.retention.ms" => self.delete_retention_ms.to_string(),
            "min.insync.replicas" => self.min_insync_replicas.to_string(),
            "min.cleanable.dirty.ratio" => self.min_cleanable_dirty_ratio.to_string(),
            "cleanup.policy" => match self.cleanup_policy {
                CleanupPolicy::Delete => "delete",
                CleanupPolicy::Compact => "compact",
                CleanupPolicy::CompactDelete => "compact,delete",
            }
            .to_string(),
            _ => return None,
        })
    }

    /// True when every acknowledgement must wait for fsync.
    pub fn fsync_before_ack(&self) -> bool {
        self.flush_messages == 1
    }

    pub fn compacts(&self) -> bool {
        matches!(
            self.cleanup_policy,
            CleanupPolicy::Compact | CleanupPolicy::CompactDelete
        )
    }

    pub fn deletes_old_segments(&self) -> bool {
        matches!(
            self.cleanup_policy,
            CleanupPolicy::Delete | CleanupPolicy::CompactDelete
        )
    }
}

/// Checks a topic name the way Kafka does.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("topic name '{name}' is not allowed"));
    }
    if name.len() > 249 {
        return Err("topic name is longer than 249 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name '{name}' contains '{c}'; allowed are ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_round_trip() {
        let o = BTreeMap::from([
            ("retention.ms".to_string(), "1000".to_string()),
            ("cleanup.policy".to_string(), "delete,compact".to_string()),
            ("flush.messages".to_string(), "1".to_string()),
        ]);
        let c = LogConfig::default().with_overrides(&o).unwrap();
        assert_eq!(c.retention_ms, 1000);
        assert_eq!(c.cleanup_policy, CleanupPolicy::CompactDelete);
        assert!(c.fsync_before_ack());
        for (k, _) in KEYS {
            let v = c.get(k).unwrap();
            let again = c
                .with_overrides(&BTreeMap::from([(k.to_string(), v)]))
                .unwrap();
            assert_eq!(again, c);
        }
    }

    #[test]
    fn rejects_bad_values() {
        let bad = |k: &str, v: &str| {
            LogConfig::default()
                .with_overrides(&BTreeMap::from([(k.to_string(), v.to_string())]))
                .is_err()
        };
        assert!(bad("retention.ms", "soon"));
        assert!(bad("segment.bytes", "0"));
        assert!(bad("cleanup.policy", "forever"));
        assert!(bad("no.such.key", "1"));
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_x-y").is_ok());
        assert!(validate_topic_name("bad name").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
    }
}
