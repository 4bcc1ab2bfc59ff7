//! The Kafka wire protocol server: request decoding (the `kafka-protocol` crate), version
//! negotiation, and one handler module per group of APIs.

mod admin;
pub mod apis;
mod epochs;
mod fetch;
pub mod fetch_encode;
mod groups;
mod metadata;
mod produce;
pub mod server;
mod txn;

use std::path::Path;
use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::protocol::StrBytes;

use crate::group::GroupCoordinator;
use crate::log::batch::BatchError;
use crate::log::config::validate_topic_name;
use crate::log::manager::{LogManager, Topic, TopicError};
use crate::log::partition::{AppendError, ReadError};
use crate::log::producer_state::ProducerError;
use crate::txn::TxnCoordinator;

/// The state every request handler sees.
pub struct Broker {
    pub node_id: i32,
    pub cluster_id: String,
    /// Host and port clients are told to connect to.
    pub advertised_host: String,
    pub advertised_port: i32,
    pub log: Arc<LogManager>,
    pub groups: Arc<GroupCoordinator>,
    pub txns: Arc<TxnCoordinator>,
    pub auto_create_topics: bool,
    pub default_partitions: i32,
}

impl Broker {
    /// The topic, auto-created with the default partition count when allowed.
    pub fn topic_or_create(
        &self,
        name: &str,
        allow_create: bool,
    ) -> Result<Arc<Topic>, ResponseError> {
        if let Some(t) = self.log.topic(name) {
            return Ok(t);
        }
        if validate_topic_name(name).is_err() {
            return Err(ResponseError::InvalidTopicException);
        }
        if !(allow_create && self.auto_create_topics) {
            return Err(ResponseError::UnknownTopicOrPartition);
        }
        match self
            .log
            .create_topic(name, self.default_partitions, -1, Default::default())
        {
            Ok(t) => Ok(t),
            // Another request created it first.
            Err(TopicError::AlreadyExists(_)) => self
                .log
                .topic(name)
                .ok_or(ResponseError::UnknownTopicOrPartition),
            Err(e) => Err(topic_error_code(&e)),
        }
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
        Broker {
            node_id: 0,
            cluster_id: "test-cluster".into(),
            advertised_host: "127.0.0.1".into(),
            advertised_port: 9092,
            txns: Arc::new(
                TxnCoordinator::open(log.clone(), groups.clone(), Default::default()).unwrap(),
            ),
            groups,
            log,
            auto_create_topics: true,
            default_partitions: 1,
        }
    }
}

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
        TopicError::InvalidConfig(_) => ResponseError::InvalidConfig,
        TopicError::Io(_) => ResponseError::KafkaStorageError,
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
        AppendError::Io(_) => ResponseError::KafkaStorageError,
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
