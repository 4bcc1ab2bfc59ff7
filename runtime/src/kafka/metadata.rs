//! Metadata and DescribeCluster: which brokers exist and which partitions they lead.

use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeClusterRequest, DescribeClusterResponse, MetadataRequest, MetadataResponse,
    TopicName,
};

use super::apis::RequestContext;
use super::{str_bytes, Broker};
use crate::log::manager::Topic;

pub fn metadata(broker: &Broker, ctx: &RequestContext, req: MetadataRequest) -> MetadataResponse {
    // v0: an empty list means all topics; v1+: null means all topics.
    let wanted: Option<Vec<String>> = match req.topics {
        None => None,
        Some(t) if t.is_empty() && ctx.version == 0 => None,
        Some(t) => Some(
            t.into_iter()
                .filter_map(|t| match t.name {
                    Some(n) => Some(n.0.to_string()),
                    None => broker
                        .log
                        .topic_by_id(t.topic_id)
                        .map(|t| t.name.to_string()),
                })
                .collect(),
        ),
    };
    let allow_create = ctx.version < 4 || req.allow_auto_topic_creation;
    let topics = match wanted {
        None => broker
            .log
            .topics()
            .iter()
            .map(|t| topic_metadata(broker, t))
            .collect(),
        Some(names) => names
            .into_iter()
            .map(|name| match broker.topic_or_create(&name, allow_create) {
                Ok(t) => topic_metadata(broker, &t),
                Err(code) => MetadataResponseTopic::default()
                    .with_name(Some(TopicName(str_bytes(name))))
                    .with_error_code(code.code()),
            })
            .collect(),
    };
    MetadataResponse::default()
        .with_brokers(vec![MetadataResponseBroker::default()
            .with_node_id(BrokerId(broker.node_id))
            .with_host(str_bytes(broker.advertised_host.clone()))
            .with_port(broker.advertised_port)])
        .with_cluster_id(Some(str_bytes(broker.cluster_id.clone())))
        .with_controller_id(BrokerId(broker.node_id))
        .with_topics(topics)
}

fn topic_metadata(broker: &Broker, t: &Topic) -> MetadataResponseTopic {
    let node = BrokerId(broker.node_id);
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(str_bytes(t.name.to_string()))))
        .with_topic_id(t.id)
        .with_is_internal(t.is_internal())
        .with_partitions(
            t.partitions
                .iter()
                .map(|p| {
                    MetadataResponsePartition::default()
                        .with_partition_index(p.id)
                        .with_leader_id(node)
                        .with_leader_epoch(t.leader_epoch)
                        .with_replica_nodes(vec![node])
                        .with_isr_nodes(vec![node])
                })
                .collect(),
        )
}

pub fn describe_cluster(broker: &Broker, _req: DescribeClusterRequest) -> DescribeClusterResponse {
    DescribeClusterResponse::default()
        .with_cluster_id(str_bytes(broker.cluster_id.clone()))
        .with_controller_id(BrokerId(broker.node_id))
        .with_brokers(vec![DescribeClusterBroker::default()
            .with_broker_id(BrokerId(broker.node_id))
            .with_host(str_bytes(broker.advertised_host.clone()))
            .with_port(broker.advertised_port)])
}
