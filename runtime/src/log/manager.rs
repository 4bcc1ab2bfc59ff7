//! The set of topics on this node: creation, deletion, partition growth, config changes, and the
//! background flush/retention/checkpoint loop.
//!
//! Topic metadata lives in `<data-dir>/meta/topics.json`, replaced atomically on every change;
//! partition data lives in `<data-dir>/<topic>-<partition>/`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::config::{validate_topic_name, ConfigError, LogConfig};
use super::partition::Partition;
use super::write_atomically;

/// Hard cap on partitions per topic, so one request cannot exhaust file descriptors.
pub const MAX_PARTITIONS: i32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("topic '{0}' already exists")]
    AlreadyExists(String),
    #[error("unknown topic '{0}'")]
    Unknown(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidPartitions(String),
    #[error("{0}")]
    InvalidReplicationFactor(String),
    #[error("{0}")]
    InvalidReplicaAssignment(String),
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
    /// The cluster's metadata quorum could not take the change in time.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TopicRecord {
    id: Uuid,
    partitions: i32,
    #[serde(default)]
    configs: BTreeMap<String, String>,
    #[serde(default)]
    leader_epoch: i32,
}

pub struct Topic {
    pub name: Arc<str>,
    pub id: Uuid,
    /// Configs set on the topic itself (the rest come from broker defaults).
    pub overrides: BTreeMap<String, String>,
    pub config: LogConfig,
    pub partitions: Vec<Arc<Partition>>,
    pub leader_epoch: i32,
}

impl Topic {
    pub fn is_internal(&self) -> bool {
        self.name.starts_with("__")
    }
    fn record(&self) -> TopicRecord {
        TopicRecord {
            id: self.id,
            partitions: self.partitions.len() as i32,
            configs: self.overrides.clone(),
            leader_epoch: self.leader_epoch,
        }
    }
}

pub struct LogManager {
    data_dir: PathBuf,
    defaults: LogConfig,
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    /// Serialises metadata changes so topics.json always matches the map.
    changes: Mutex<()>,
}

fn partition_dir(data_dir: &Path, topic: &str, p: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{p}"))
}

impl LogManager {
    /// Opens every topic under `data_dir`, recovering partitions that were not cleanly flushed.
    pub fn open(data_dir: &Path, defaults: LogConfig) -> anyhow::Result<LogManager> {
        std::fs::create_dir_all(data_dir.join("meta"))?;
        // Partitions of deleted topics whose removal was interrupted.
        for entry in std::fs::read_dir(data_dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "deleted") {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        let records: BTreeMap<String, TopicRecord> =
            match std::fs::read(data_dir.join("meta").join("topics.json")) {
                Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
                    anyhow::anyhow!("cannot read {}/meta/topics.json: {e}", data_dir.display())
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => return Err(e.into()),
            };
        let mut topics = HashMap::new();
        let started = Instant::now();
        for (name, rec) in records {
            let config = defaults.with_overrides(&rec.configs)?;
            let name: Arc<str> = Arc::from(name.as_str());
            let mut partitions = Vec::new();
            for p in 0..rec.partitions {
                let (partition, report) = Partition::open(
                    &partition_dir(data_dir, &name, p),
                    name.clone(),
                    p,
                    config.clone(),
                    rec.leader_epoch,
                )?;
                if report.recovered_segments > 0 {
                    tracing::debug!(topic = %name, partition = p, ?report, "recovered partition");
                }
                partitions.push(Arc::new(partition));
            }
            let topic = Topic {
                name: name.clone(),
                id: rec.id,
                overrides: rec.configs,
                config,
                partitions,
                leader_epoch: rec.leader_epoch,
            };
            topics.insert(name, Arc::new(topic));
        }
        tracing::info!(
            topics = topics.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "log loaded"
        );
        Ok(LogManager {
            data_dir: data_dir.to_path_buf(),
            defaults,
            topics: RwLock::new(topics),
            changes: Mutex::new(()),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn defaults(&self) -> &LogConfig {
        &self.defaults
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().get(name).cloned()
    }

    pub fn topic_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.topics.read().values().find(|t| t.id == id).cloned()
    }

    pub fn partition(&self, topic: &str, p: i32) -> Option<Arc<Partition>> {
        self.topics
            .read()
            .get(topic)?
            .partitions
            .get(usize::try_from(p).ok()?)
            .cloned()
    }

    /// All topics, sorted by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self.topics.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn persist(&self, topics: &HashMap<Arc<str>, Arc<Topic>>) -> std::io::Result<()> {
        let records: BTreeMap<&str, TopicRecord> =
            topics.iter().map(|(n, t)| (&**n, t.record())).collect();
        let json = serde_json::to_vec_pretty(&records).map_err(std::io::Error::other)?;
        write_atomically(&self.data_dir.join("meta").join("topics.json"), &json)
    }

    /// Checks a creation request without doing it; returns the effective config.
    pub fn validate_new_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        overrides: &BTreeMap<String, String>,
    ) -> Result<LogConfig, TopicError> {
        validate_topic_name(name).map_err(TopicError::InvalidName)?;
        if self.topics.read().contains_key(name) {
            return Err(TopicError::AlreadyExists(name.to_string()));
        }
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(TopicError::InvalidPartitions(format!(
                "partition count must be between 1 and {MAX_PARTITIONS}, got {partitions}"
            )));
        }
        if replication_factor != -1 && replication_factor != 1 {
            return Err(TopicError::InvalidReplicationFactor(format!(
                "replication factor {replication_factor} is larger than the 1 available broker"
            )));
        }
        Ok(self.defaults.with_overrides(overrides)?)
    }

    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        overrides: BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        self.create_topic_as(
            name,
            Uuid::new_v4(),
            partitions,
            replication_factor,
            overrides,
        )
    }

    /// Creates the local copy of a topic the cluster metadata created (which checked the
    /// replication factor and chose the id).
    pub fn create_topic_with_id(
        &self,
        name: &str,
        id: Uuid,
        partitions: i32,
        overrides: BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        self.create_topic_as(name, id, partitions, -1, overrides)
    }

    fn create_topic_as(
        &self,
        name: &str,
        id: Uuid,
        partitions: i32,
        replication_factor: i32,
        overrides: BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        let _guard = self.changes.lock();
        let config = self.validate_new_topic(name, partitions, replication_factor, &overrides)?;
        let name: Arc<str> = Arc::from(name);
        let mut parts = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let dir = partition_dir(&self.data_dir, &name, p);
            // Leftovers of an older topic with this name never leak into the new one.
            let _ = std::fs::remove_dir_all(&dir);
            let (partition, _) = Partition::open(&dir, name.clone(), p, config.clone(), 0)?;
            parts.push(Arc::new(partition));
        }
        let topic = Arc::new(Topic {
            name: name.clone(),
            id,
            overrides,
            config,
            partitions: parts,
            leader_epoch: 0,
        });
        let mut next = self.topics.read().clone();
        next.insert(name.clone(), topic.clone());
        self.persist(&next)?;
        *self.topics.write() = next;
        tracing::info!(topic = %name, partitions, "created topic");
        Ok(topic)
    }

    pub fn delete_topic(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        let _guard = self.changes.lock();
        let mut next = self.topics.read().clone();
        let topic = next
            .remove(name)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        self.persist(&next)?;
        *self.topics.write() = next;
        for p in &topic.partitions {
            // Rename first so a new topic with the same name starts clean even if removal is slow.
            let doomed = p
                .dir()
                .with_extension(format!("{}.deleted", topic.id.simple()));
            if std::fs::rename(p.dir(), &doomed).is_ok() {
                let _ = std::fs::remove_dir_all(&doomed);
            }
        }
        tracing::info!(topic = %name, "deleted topic");
        Ok(topic)
    }

    pub fn create_partitions(
        &self,
        name: &str,
        total: i32,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let _guard = self.changes.lock();
        let topic = self
            .topic(name)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        let current = topic.partitions.len() as i32;
        if total <= current {
            return Err(TopicError::InvalidPartitions(format!(
                "topic '{name}' has {current} partitions; the new count must be larger, got {total}"
            )));
        }
        if total > MAX_PARTITIONS {
            return Err(TopicError::InvalidPartitions(format!(
                "partition count must be at most {MAX_PARTITIONS}"
            )));
        }
        if validate_only {
            return Ok(());
        }
        let mut partitions = topic.partitions.clone();
        for p in current..total {
            let dir = partition_dir(&self.data_dir, name, p);
            let _ = std::fs::remove_dir_all(&dir);
            let (partition, _) = Partition::open(
                &dir,
                topic.name.clone(),
                p,
                topic.config.clone(),
                topic.leader_epoch,
            )?;
            partitions.push(Arc::new(partition));
        }
        self.replace(Topic {
            name: topic.name.clone(),
            id: topic.id,
            overrides: topic.overrides.clone(),
            config: topic.config.clone(),
            partitions,
            leader_epoch: topic.leader_epoch,
        })
    }

    /// Replaces a topic's config overrides (validated first) and applies them to its partitions.
    pub fn set_topic_configs(
        &self,
        name: &str,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let _guard = self.changes.lock();
        let topic = self
            .topic(name)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        let config = self.defaults.with_overrides(&overrides)?;
        if validate_only {
            return Ok(());
        }
        for p in &topic.partitions {
            p.set_config(config.clone());
        }
        self.replace(Topic {
            name: topic.name.clone(),
            id: topic.id,
            overrides,
            config,
            partitions: topic.partitions.clone(),
            leader_epoch: topic.leader_epoch,
        })
    }

    fn replace(&self, topic: Topic) -> Result<(), TopicError> {
        let mut next = self.topics.read().clone();
        next.insert(topic.name.clone(), Arc::new(topic));
        self.persist(&next)?;
        *self.topics.write() = next;
        Ok(())
    }

    fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics
            .read()
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect()
    }

    /// Flush policy every `tick`, retention every `retention_every` (Kafka's
    /// log.retention.check.interval.ms), a recovery checkpoint every `checkpoint_every`;
    /// returns when `shutdown` fires, after a final checkpoint of every partition.
    pub async fn run_maintenance(
        self: Arc<Self>,
        tick: Duration,
        retention_every: Duration,
        checkpoint_every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last_checkpoint = Instant::now();
        let mut last_retention = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => break,
            }
            let with_retention = last_retention.elapsed() >= retention_every;
            if with_retention {
                last_retention = Instant::now();
            }
            for p in self.all_partitions() {
                if let Err(e) = p.maintain(with_retention).await {
                    tracing::error!(topic = %p.topic, partition = p.id, error = %e, "flush/retention failed");
                }
            }
            if last_checkpoint.elapsed() >= checkpoint_every {
                self.checkpoint_all().await;
                last_checkpoint = Instant::now();
            }
        }
        self.checkpoint_all().await;
    }

    /// Compacts partitions of compacted topics every `interval` until `shutdown` fires.
    /// `max_keys` bounds the cleaner's key map (memory ≈ 40 bytes a key).
    pub async fn run_cleaner(
        self: Arc<Self>,
        interval: Duration,
        max_keys: usize,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            for p in self.all_partitions() {
                if !p.config().compacts() {
                    continue;
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                let part = p.clone();
                match tokio::task::spawn_blocking(move || part.compact(now, max_keys)).await {
                    Ok(Ok(Some(_))) => crate::metrics::get().compactions.inc(),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(topic = %p.topic, partition = p.id, error = %e, "compaction failed")
                    }
                    Err(e) => {
                        tracing::error!(topic = %p.topic, partition = p.id, error = %e, "compaction task failed")
                    }
                }
            }
        }
    }

    /// Flushes every partition and writes its recovery point.
    pub async fn checkpoint_all(&self) {
        for p in self.all_partitions() {
            if let Err(e) = p.checkpoint().await {
                tracing::error!(topic = %p.topic, partition = p.id, error = %e, "checkpoint failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = LogManager::open(dir.path(), LogConfig::default()).unwrap();
        let cfg = BTreeMap::from([("retention.ms".to_string(), "5000".to_string())]);
        m.create_topic("orders", 3, -1, cfg).unwrap();
        assert!(matches!(
            m.create_topic("orders", 1, -1, BTreeMap::new()),
            Err(TopicError::AlreadyExists(_))
        ));
        assert!(matches!(
            m.create_topic("bad name", 1, -1, BTreeMap::new()),
            Err(TopicError::InvalidName(_))
        ));
        assert!(matches!(
            m.create_topic("x", 1, 3, BTreeMap::new()),
            Err(TopicError::InvalidReplicationFactor(_))
        ));
        m.create_partitions("orders", 5, false).unwrap();
        m.create_topic("gone", 1, 1, BTreeMap::new()).unwrap();
        m.delete_topic("gone").unwrap();
        drop(m);
        let m = LogManager::open(dir.path(), LogConfig::default()).unwrap();
        let t = m.topic("orders").unwrap();
        assert_eq!(t.partitions.len(), 5);
        assert_eq!(t.config.retention_ms, 5000);
        assert!(m.topic("gone").is_none());
        assert!(!dir.path().join("gone-0").exists());
    }
}
