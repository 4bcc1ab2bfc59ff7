//! The Kafka wire protocol server: request decoding (the `kafka-protocol` crate), version
//! negotiation, and one handler module per group of APIs.

/// Returns CLUSTER_AUTHORIZATION_FAILED in a `$response` (a cluster-level API's answer) when
/// the request's principal may not do `$operation` on the cluster.
macro_rules! require_on_cluster {
    ($broker:expr, $ctx:expr, $operation:expr, $response:ty) => {
        if !$broker.allowed_on_cluster($ctx, $operation) {
            return <$response>::default()
                .with_error_code(
                    kafka_protocol::error::ResponseError::ClusterAuthorizationFailed.code(),
                )
                .with_error_message(Some($crate::kafka::str_bytes(format!(
                    "not authorized: {} on the cluster",
                    $operation
                ))));
        }
    };
}

mod acls;
mod admin;
pub mod apis;
mod consumer_groups;
mod epochs;
mod fetch;
pub mod fetch_encode;
pub mod fetch_session;
mod groups;
mod metadata;
mod produce;
mod reassign;
pub mod server;
mod txn;
pub mod txn_cluster;
mod users;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::protocol::StrBytes;

use uuid::Uuid;

use crate::cluster::image::{ClusterImage, Command, CommandError};
use crate::cluster::replication::LeaderState;
use crate::cluster::{Cluster, ClusterError};
use crate::group::GroupCoordinator;
use crate::log::batch::BatchError;
use crate::log::config::validate_topic_name;
use crate::log::config::LogConfig;
use crate::log::manager::{LogManager, Topic, TopicError, MAX_PARTITIONS};
use crate::log::partition::{AppendError, ReadError, Refusal};
use crate::log::producer_state::ProducerError;
use crate::security::acl::{Acls, Authorizer};
use crate::security::local::LocalFile;
use crate::security::users::LocalUsers;
use crate::security::Endpoint;
use crate::txn::TxnCoordinator;

/// The state every request handler sees.
pub struct Broker {
    pub node_id: i32,
    pub cluster_id: String,
    /// Where clients are told to connect, per listener; the first is the one other nodes use.
    pub endpoints: Vec<Endpoint>,
    pub log: Arc<LogManager>,
    pub groups: Arc<GroupCoordinator>,
    pub txns: Arc<TxnCoordinator>,
    pub auto_create_topics: bool,
    pub default_partitions: i32,
    /// The cluster this node belongs to; None for a single node.
    pub cluster: Option<Arc<Cluster>>,
    /// Connections to the other nodes of the cluster (transaction markers and checks).
    pub peers: txn_cluster::Peers,
    /// Users' SCRAM credentials on a single node (a cluster keeps them in its image).
    pub users: LocalUsers,
    /// Checks every request against the ACLs, when enabled.
    pub authorizer: Authorizer,
    /// The ACLs of a single node (a cluster keeps them in its image).
    pub acls: LocalFile<Acls>,
    /// Consumers' incremental fetch sessions (KIP-227).
    pub fetch_sessions: fetch_session::FetchSessions,
}

/// How far a group is behind on one partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub committed: i64,
    pub high_watermark: i64,
    pub lag: i64,
}

impl Broker {
    /// This node's address for clients of `listener` (the first listener's when unknown).
    pub fn endpoint(&self, listener: &str) -> (String, i32) {
        let e = self
            .endpoints
            .iter()
            .find(|e| e.listener == listener)
            .unwrap_or(&self.endpoints[0]);
        (e.host.clone(), e.port)
    }

    /// The topic, auto-created with the default partition count when allowed. In a cluster,
    /// a topic this node hosts no replica of answers NOT_LEADER_OR_FOLLOWER.
    pub async fn topic_or_create(
        &self,
        name: &str,
        allow_create: bool,
    ) -> Result<Arc<Topic>, ResponseError> {
        if let Some(t) = self.log.topic(name) {
            return Ok(t);
        }
        self.ensure_topic(name, allow_create).await?;
        self.log
            .topic(name)
            .ok_or(ResponseError::NotLeaderOrFollower)
    }

    /// Makes sure the topic exists (in the cluster, when there is one), auto-creating it when
    /// allowed.
    pub async fn ensure_topic(&self, name: &str, allow_create: bool) -> Result<(), ResponseError> {
        let exists = match &self.cluster {
            Some(c) => c.image().topics.contains_key(name),
            None => self.log.topic(name).is_some(),
        };
        if exists {
            return Ok(());
        }
        if validate_topic_name(name).is_err() {
            return Err(ResponseError::InvalidTopicException);
        }
        if !(allow_create && self.auto_create_topics) {
            return Err(ResponseError::UnknownTopicOrPartition);
        }
        match self
            .create_topic(name, self.default_partitions, -1, None, Default::default())
            .await
        {
            // Another request created it first.
            Ok(_) | Err(TopicError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(topic_error_code(&e)),
        }
    }

    /// Creates a topic: through the metadata quorum in a cluster, else in the local log.
    /// `assignments` are the replicas of each partition as the client chose them (they give
    /// the partition count). Returns the topic id and its effective config.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        assignments: Option<Vec<Vec<i32>>>,
        overrides: BTreeMap<String, String>,
    ) -> Result<(Uuid, LogConfig), TopicError> {
        let partitions = assignments.as_ref().map_or(partitions, |a| a.len() as i32);
        let Some(cluster) = &self.cluster else {
            self.check_local_assignments(assignments.as_deref())?;
            let t = self
                .log
                .create_topic(name, partitions, replication_factor, overrides)?;
            return Ok((t.id, t.config.clone()));
        };
        let config = self.validate_new_topic(
            name,
            partitions,
            replication_factor,
            assignments.as_deref(),
            &overrides,
        )?;
        let id = Uuid::new_v4();
        cluster
            .run(Command::CreateTopic {
                name: name.to_string(),
                id,
                partitions,
                replication_factor,
                configs: overrides,
                if_missing: false,
                assignments,
            })
            .await
            .map_err(cluster_error)?;
        Ok((id, config))
    }

    /// Checks a creation request without doing it; returns the effective config.
    pub fn validate_new_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        assignments: Option<&[Vec<i32>]>,
        overrides: &BTreeMap<String, String>,
    ) -> Result<LogConfig, TopicError> {
        let Some(cluster) = &self.cluster else {
            self.check_local_assignments(assignments)?;
            return self
                .log
                .validate_new_topic(name, partitions, replication_factor, overrides);
        };
        if let Some(a) = assignments {
            // The image decides, as it will when the command is applied: a dry run on a copy.
            let mut image = ClusterImage::clone(&cluster.image());
            image
                .apply(&Command::CreateTopic {
                    name: name.to_string(),
                    id: Uuid::nil(),
                    partitions,
                    replication_factor,
                    configs: overrides.clone(),
                    if_missing: false,
                    assignments: Some(a.to_vec()),
                })
                .map_err(|e| cluster_error(ClusterError::Refused(e)))?;
        }
        let config = self
            .log
            .validate_new_topic(name, partitions, -1, overrides)?;
        let image = cluster.image();
        if image.topics.contains_key(name) {
            return Err(TopicError::AlreadyExists(name.to_string()));
        }
        let nodes = image.nodes.len() as i32;
        if replication_factor != -1 && !(1..=nodes).contains(&replication_factor) {
            return Err(TopicError::InvalidReplicationFactor(format!(
                "replication factor {replication_factor} is not between 1 and the {nodes} registered node(s)"
            )));
        }
        Ok(config)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<Uuid, TopicError> {
        let Some(cluster) = &self.cluster else {
            return Ok(self.log.delete_topic(name)?.id);
        };
        let id = self
            .topic_id(name)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        cluster
            .run(Command::DeleteTopic {
                name: name.to_string(),
            })
            .await
            .map_err(cluster_error)?;
        Ok(id)
    }

    /// A single node places every replica on itself: assignments may only name it.
    fn check_local_assignments(&self, assignments: Option<&[Vec<i32>]>) -> Result<(), TopicError> {
        match assignments
            .into_iter()
            .flatten()
            .find(|a| a.as_slice() != [self.node_id])
        {
            Some(a) => Err(TopicError::InvalidReplicaAssignment(format!(
                "replicas {a:?}: this single node is node {}",
                self.node_id
            ))),
            None => Ok(()),
        }
    }

    pub async fn create_partitions(
        &self,
        name: &str,
        total: i32,
        assignments: Option<Vec<Vec<i32>>>,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let Some(cluster) = &self.cluster else {
            self.check_local_assignments(assignments.as_deref())?;
            return self.log.create_partitions(name, total, validate_only);
        };
        let current = cluster
            .image()
            .topics
            .get(name)
            .map(|t| t.partitions.len() as i32)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        if total <= current || total > MAX_PARTITIONS {
            return Err(TopicError::InvalidPartitions(format!(
                "topic '{name}' has {current} partitions; the new count must be larger and at most {MAX_PARTITIONS}, got {total}"
            )));
        }
        if validate_only {
            return Ok(());
        }
        cluster
            .run(Command::CreatePartitions {
                name: name.to_string(),
                total,
                assignments,
            })
            .await
            .map_err(cluster_error)
    }

    pub async fn set_topic_configs(
        &self,
        name: &str,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let Some(cluster) = &self.cluster else {
            return self.log.set_topic_configs(name, overrides, validate_only);
        };
        self.log.defaults().with_overrides(&overrides)?;
        if validate_only {
            return Ok(());
        }
        cluster
            .run(Command::SetTopicConfigs {
                name: name.to_string(),
                configs: overrides,
            })
            .await
            .map_err(cluster_error)
    }

    /// A topic's id, from the cluster image when there is one.
    pub fn topic_id(&self, name: &str) -> Option<Uuid> {
        match &self.cluster {
            Some(c) => c.image().topics.get(name).map(|t| t.id),
            None => self.log.topic(name).map(|t| t.id),
        }
    }

    /// Every topic a consumer may subscribe to (internal ones left out): its id and partition
    /// count, from the cluster image when there is one.
    pub fn topic_catalog(&self) -> BTreeMap<String, (Uuid, i32)> {
        let internal = |name: &str| name.starts_with("__");
        match &self.cluster {
            Some(c) => c
                .image()
                .topics
                .iter()
                .filter(|(name, _)| !internal(name))
                .map(|(name, t)| (name.clone(), (t.id, t.partitions.len() as i32)))
                .collect(),
            None => self
                .log
                .topics()
                .iter()
                .filter(|t| !internal(&t.name))
                .map(|t| (t.name.to_string(), (t.id, t.partitions.len() as i32)))
                .collect(),
        }
    }

    /// A topic's config overrides, from the cluster image when there is one.
    pub fn topic_overrides(&self, name: &str) -> Option<BTreeMap<String, String>> {
        match &self.cluster {
            Some(c) => c.image().topics.get(name).map(|t| t.configs.clone()),
            None => self.log.topic(name).map(|t| t.overrides.clone()),
        }
    }

    /// Whether a partition exists, in the cluster when there is one.
    pub fn partition_exists(&self, topic: &str, partition: i32) -> bool {
        match &self.cluster {
            Some(c) => c.image().partition(topic, partition).is_some(),
            None => self.log.partition(topic, partition).is_some(),
        }
    }

    /// In a cluster: waits until the in-sync replicas of an internal topic's partition hold
    /// everything this node wrote to it (its coordinator's acknowledgement point).
    pub async fn internal_replicated(&self, topic: &str) -> Result<(), ResponseError> {
        if self.cluster.is_none() {
            return Ok(());
        }
        let epoch = self
            .leadership(topic, 0)
            .map_err(|_| ResponseError::NotCoordinator)?
            .map(|s| s.epoch);
        let p = self
            .log
            .partition(topic, 0)
            .ok_or(ResponseError::NotCoordinator)?;
        let target = p.log_end_offset();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        produce::wait_replicated(&p, target, epoch, deadline)
            .await
            .map_err(coordinator_error)
    }

    /// In a cluster: this node's leadership of the partition, or NOT_LEADER_OR_FOLLOWER.
    /// A single node leads everything (None).
    pub fn leadership(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<Arc<LeaderState>>, ResponseError> {
        match &self.cluster {
            None => Ok(None),
            Some(c) => c
                .replicas
                .leader(topic, partition)
                .map(Some)
                .ok_or(ResponseError::NotLeaderOrFollower),
        }
    }

    /// A group's committed offsets against the high watermarks of the partitions this node
    /// leads (the others' are not known here).
    pub fn group_lag(&self, group: &str) -> Vec<PartitionLag> {
        let mut out = Vec::new();
        for ((topic, partition), committed) in self.groups.fetch_offsets(group, None) {
            let Some(committed) = committed else { continue };
            let Some(p) = self
                .log
                .topic(&topic)
                .and_then(|t| t.partitions.get(partition as usize).cloned())
            else {
                continue;
            };
            if self.leadership(&p.topic, p.id).is_err() {
                continue;
            }
            let high_watermark = p.high_watermark();
            out.push(PartitionLag {
                topic,
                partition,
                committed: committed.offset,
                high_watermark,
                lag: (high_watermark - committed.offset).max(0),
            });
        }
        out
    }

    /// A single node over an opened log and group coordinator, on 127.0.0.1:9092, with
    /// auto-creation on and no authorizer: the unit tests' and the fuzz harness's broker.
    pub fn local(
        dir: &Path,
        log: Arc<LogManager>,
        groups: Arc<GroupCoordinator>,
    ) -> anyhow::Result<Broker> {
        Ok(Broker {
            node_id: 0,
            cluster_id: "local".into(),
            endpoints: vec![Endpoint {
                listener: "PLAINTEXT".into(),
                host: "127.0.0.1".into(),
                port: 9092,
            }],
            txns: Arc::new(TxnCoordinator::open(
                log.clone(),
                groups.clone(),
                Default::default(),
            )?),
            groups,
            log,
            auto_create_topics: true,
            default_partitions: 1,
            cluster: None,
            peers: Default::default(),
            users: LocalUsers::open_users(dir)?,
            authorizer: Authorizer::new(&Default::default()),
            acls: LocalFile::open(dir, ACLS_FILE)?,
            fetch_sessions: fetch_session::FetchSessions::new(fetch_session::DEFAULT_SLOTS),
        })
    }

    #[cfg(test)]
    pub fn for_tests(dir: &Path) -> Broker {
        let log = Arc::new(LogManager::open(dir, Default::default()).unwrap());
        let groups = Arc::new(
            GroupCoordinator::open(
                log.clone(),
                crate::group::GroupSettings {
                    initial_rebalance_delay: std::time::Duration::ZERO,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        Broker::local(dir, log, groups).unwrap()
    }
}

/// Where a single node keeps its ACLs, under `<data-dir>/meta/`.
pub const ACLS_FILE: &str = "acls.json";

/// Reads the node's cluster id, creating one on first start.
pub fn load_cluster_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("meta").join("cluster-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            std::fs::create_dir_all(data_dir.join("meta"))?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            crate::log::write_atomically(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

pub fn topic_error_code(e: &TopicError) -> ResponseError {
    match e {
        TopicError::AlreadyExists(_) => ResponseError::TopicAlreadyExists,
        TopicError::Unknown(_) => ResponseError::UnknownTopicOrPartition,
        TopicError::InvalidName(_) => ResponseError::InvalidTopicException,
        TopicError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        TopicError::InvalidReplicationFactor(_) => ResponseError::InvalidReplicationFactor,
        TopicError::InvalidReplicaAssignment(_) => ResponseError::InvalidReplicaAssignment,
        TopicError::InvalidConfig(_) => ResponseError::InvalidConfig,
        TopicError::Io(_) => ResponseError::KafkaStorageError,
        TopicError::Unavailable(_) => ResponseError::RequestTimedOut,
    }
}

fn cluster_error(e: ClusterError) -> TopicError {
    match e {
        ClusterError::Unavailable(e) => TopicError::Unavailable(format!("{e:#}")),
        ClusterError::Refused(CommandError::TopicExists(n)) => TopicError::AlreadyExists(n),
        ClusterError::Refused(CommandError::UnknownTopic(n)) => TopicError::Unknown(n),
        ClusterError::Refused(CommandError::InvalidReplicationFactor(m)) => {
            TopicError::InvalidReplicationFactor(m)
        }
        ClusterError::Refused(CommandError::InvalidPartitions(m)) => {
            TopicError::InvalidPartitions(m)
        }
        ClusterError::Refused(CommandError::InvalidReplicaAssignment(m)) => {
            TopicError::InvalidReplicaAssignment(m)
        }
        ClusterError::Refused(
            e @ (CommandError::StaleLeader(_)
            | CommandError::StaleNode(_)
            | CommandError::NoReassignmentInProgress(_)
            | CommandError::InvalidVoterChange(_)),
        ) => TopicError::Unavailable(e.to_string()),
    }
}

pub fn append_error_code(e: &AppendError) -> ResponseError {
    match e {
        AppendError::Batch(BatchError::Corrupt(_)) => ResponseError::CorruptMessage,
        AppendError::Batch(BatchError::InvalidRecord(_)) => ResponseError::InvalidRecord,
        AppendError::Batch(BatchError::UnsupportedCompression(_)) => {
            ResponseError::UnsupportedCompressionType
        }
        AppendError::Batch(BatchError::TooLarge { .. }) => ResponseError::MessageTooLarge,
        AppendError::Producer(ProducerError::InvalidEpoch { .. }) => {
            ResponseError::InvalidProducerEpoch
        }
        AppendError::Producer(ProducerError::OutOfOrder { .. }) => {
            ResponseError::OutOfOrderSequenceNumber
        }
        AppendError::Producer(ProducerError::InvalidTxnState(_)) => ResponseError::InvalidTxnState,
        AppendError::OutOfOrderReplica { .. } => ResponseError::UnknownServerError,
        AppendError::NotLeader => ResponseError::NotLeaderOrFollower,
        AppendError::Io(_)
        | AppendError::AfterRefusal {
            refusal: Refusal::Storage,
            ..
        } => ResponseError::KafkaStorageError,
        AppendError::AfterRefusal {
            refusal: Refusal::NotEnoughReplicas,
            ..
        } => ResponseError::NotEnoughReplicas,
    }
}

/// How a group or transaction coordinator answers when a write of its own state fails, as
/// Kafka's coordinators answer: with errors clients retry after looking the coordinator up
/// again. KAFKA_STORAGE_ERROR or NOT_ENOUGH_REPLICAS there would end the client's attempt
/// instead (librdkafka makes the transaction abortable), though the coordinator may take the
/// same write a moment later.
pub fn coordinator_error(e: ResponseError) -> ResponseError {
    match e {
        ResponseError::UnknownTopicOrPartition
        | ResponseError::NotEnoughReplicas
        | ResponseError::NotEnoughReplicasAfterAppend
        | ResponseError::RequestTimedOut => ResponseError::CoordinatorNotAvailable,
        ResponseError::NotLeaderOrFollower | ResponseError::KafkaStorageError => {
            ResponseError::NotCoordinator
        }
        other => other,
    }
}

pub fn read_error_code(e: &ReadError) -> ResponseError {
    match e {
        ReadError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        ReadError::Io(_) => ResponseError::KafkaStorageError,
    }
}

pub fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// Reads exactly `len` bytes of a frame body. The buffer is filled straight from the reader,
/// without first zeroing it: a produce request or fetch response is written only once.
pub async fn read_body<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> std::io::Result<bytes::Bytes> {
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        if r.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_frame_body_arriving_in_pieces_is_read_whole_and_no_further() {
        let (mut tx, mut rx) = tokio::io::duplex(7);
        let sent: Vec<u8> = (0..100u8).collect();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(13) {
                tx.write_all(piece).await.unwrap();
            }
            tx
        });
        assert_eq!(
            super::read_body(&mut rx, 60).await.unwrap(),
            (0..60u8).collect::<Vec<_>>()
        );
        assert_eq!(
            super::read_body(&mut rx, 40).await.unwrap(),
            (60..100u8).collect::<Vec<_>>()
        );
        drop(writer.await.unwrap());
        let eof = super::read_body(&mut rx, 1).await.unwrap_err();
        assert_eq!(eof.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
