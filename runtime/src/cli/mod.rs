//! Command-line tools that talk to a node over the Kafka protocol.

pub mod bench;
pub mod cluster;
pub mod consume;
pub mod group;
pub mod plugin;
pub mod produce;
pub mod topic;
pub mod txn;

use anyhow::{bail, Result};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{MetadataRequest, TopicName};

use crate::client::{check, Connection};
use crate::kafka::str_bytes;
pub use crate::now_ms;

#[derive(clap::Args, Clone)]
pub struct ConnectArgs {
    /// Broker address (host:port)
    #[arg(
        long,
        short = 'b',
        global = true,
        default_value = "127.0.0.1:9092",
        env = "WEIR_BROKERS"
    )]
    pub brokers: String,
}

/// Partition ids of `topic`; creates it when the broker auto-creates topics and `create` is set.
pub async fn topic_partitions(
    conn: &mut Connection,
    topic: &str,
    create: bool,
) -> Result<Vec<i32>> {
    let resp = conn
        .call(
            &MetadataRequest::default()
                .with_topics(Some(vec![
                    MetadataRequestTopic::default().with_name(Some(TopicName(str_bytes(topic))))
                ]))
                .with_allow_auto_topic_creation(create),
        )
        .await?;
    let Some(t) = resp.topics.into_iter().next() else {
        bail!("broker returned no metadata for topic '{topic}'");
    };
    check(t.error_code, &format!("topic '{topic}'"))?;
    let mut ids: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
    ids.sort_unstable();
    if ids.is_empty() {
        bail!("topic '{topic}' has no partitions");
    }
    Ok(ids)
}
