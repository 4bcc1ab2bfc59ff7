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
use std::sync::Arc;

use kafka_protocol::error::ResponseError;

use crate::log::manager::Topic;
use crate::security::acl::{Operation, ResourceType};

pub async fn metadata(
    broker: &Broker,
    ctx: &RequestContext,
    req: MetadataRequest,
) -> MetadataResponse {
    // v0: an empty list means all topics; v1+: null means all topics.
    let wanted: Option<Vec<String>> = match req.topics {
        None => None,
        Some(t) if t.is_empty() && ctx.version == 0 => None,
        Some(t) => Some(
            t.into_iter()
                .filter_map(|t| match t.name {
                    Some(n) => Some(n.0.to_string()),
                    None => topic_name_by_id(broker, t.topic_id),
                })
                .collect(),
        ),
    };
    let allow_create = ctx.version < 4 || req.allow_auto_topic_creation;
    let listing_all = wanted.is_none();
    let names = match wanted {
        Some(names) => names,
        None => match &broker.cluster {
            Some(c) => c.image().topics.keys().cloned().collect(),
            None => broker
                .log
                .topics()
                .iter()
                .map(|t| t.name.to_string())
                .collect(),
        },
    };
    let mut topics = Vec::with_capacity(names.len());
    for name in names {
        // Topics the principal may not describe are left out of a full listing and refused
        // when asked for by name; auto-creation needs Create as well.
        let described = broker.allowed(ctx, Operation::Describe, ResourceType::Topic, &name);
        if listing_all && !described {
            continue;
        }
        let may_create = allow_create && broker.may_create_topic(ctx, &name);
        let meta = if !described {
            Err(ResponseError::TopicAuthorizationFailed)
        } else {
            match broker.ensure_topic(&name, may_create).await {
                Ok(()) => topic_metadata(broker, &name),
                Err(ResponseError::UnknownTopicOrPartition)
                    if allow_create && broker.auto_create_topics && !may_create =>
                {
                    Err(ResponseError::TopicAuthorizationFailed)
                }
                Err(code) => Err(code),
            }
        };
        topics.push(meta.unwrap_or_else(|code| {
            MetadataResponseTopic::default()
                .with_name(Some(TopicName(str_bytes(name))))
                .with_error_code(code.code())
        }));
    }
    let (brokers, controller) = brokers(broker, &ctx.listener);
    MetadataResponse::default()
        .with_brokers(
            brokers
                .into_iter()
                .map(|(id, host, port, rack)| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(id))
                        .with_host(str_bytes(host))
                        .with_port(port)
                        .with_rack(rack.map(str_bytes))
                })
                .collect(),
        )
        .with_cluster_id(Some(str_bytes(cluster_id(broker))))
        .with_controller_id(BrokerId(controller))
        .with_topics(topics)
}

fn cluster_id(broker: &Broker) -> String {
    match &broker.cluster {
        Some(c) => c.image().cluster_id.clone(),
        None => broker.cluster_id.clone(),
    }
}

fn topic_name_by_id(broker: &Broker, id: uuid::Uuid) -> Option<String> {
    match &broker.cluster {
        Some(c) => c
            .image()
            .topics
            .iter()
            .find(|(_, t)| t.id == id)
            .map(|(n, _)| n.clone()),
        None => broker.log.topic_by_id(id).map(|t| t.name.to_string()),
    }
}

/// The brokers clients may use (id, host, port, rack), at their addresses on the listener the
/// client came in on, and the controller's id. In a cluster, as in Kafka, a fenced node is left
/// out: clients would only spend their time on it.
type BrokerEntry = (i32, String, i32, Option<String>);
fn brokers(broker: &Broker, listener: &str) -> (Vec<BrokerEntry>, i32) {
    match &broker.cluster {
        Some(c) => (
            c.image()
                .nodes
                .values()
                .filter(|n| !n.fenced)
                .map(|n| {
                    let (host, port) = n.endpoint(listener);
                    (n.id, host, port, n.rack.clone())
                })
                .collect(),
            c.raft_leader().unwrap_or(-1),
        ),
        None => {
            let (host, port) = broker.endpoint(listener);
            (vec![(broker.node_id, host, port, None)], broker.node_id)
        }
    }
}

fn topic_metadata(broker: &Broker, name: &str) -> Result<MetadataResponseTopic, ResponseError> {
    let topic = MetadataResponseTopic::default()
        .with_name(Some(TopicName(str_bytes(name.to_string()))))
        .with_is_internal(name.starts_with("__"));
    if let Some(c) = &broker.cluster {
        let image = c.image();
        let t = image
            .topics
            .get(name)
            .ok_or(ResponseError::UnknownTopicOrPartition)?;
        let live = |n: &i32| image.nodes.get(n).is_some_and(|n| !n.fenced);
        return Ok(topic.with_topic_id(t.id).with_partitions(
            t.partitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let ids = |v: &[i32]| v.iter().map(|n| BrokerId(*n)).collect::<Vec<_>>();
                    let offline: Vec<i32> =
                        p.replicas.iter().copied().filter(|n| !live(n)).collect();
                    // Handed over by this node, whose metadata has not caught up yet.
                    let (leader, leader_epoch, isr) = match c.replicas.handed_over(name, i as i32) {
                        Some((next, epoch)) => {
                            let isr: Vec<i32> =
                                p.isr.iter().copied().filter(|r| *r != c.node_id).collect();
                            (next, epoch, isr)
                        }
                        None => (p.leader, p.leader_epoch, p.isr.clone()),
                    };
                    MetadataResponsePartition::default()
                        .with_partition_index(i as i32)
                        .with_error_code(if leader < 0 {
                            ResponseError::LeaderNotAvailable.code()
                        } else {
                            0
                        })
                        .with_leader_id(BrokerId(leader))
                        .with_leader_epoch(leader_epoch)
                        .with_replica_nodes(ids(&p.replicas))
                        .with_isr_nodes(ids(&isr))
                        .with_offline_replicas(ids(&offline))
                })
                .collect(),
        ));
    }
    let t: Arc<Topic> = broker
        .log
        .topic(name)
        .ok_or(ResponseError::UnknownTopicOrPartition)?;
    let node = BrokerId(broker.node_id);
    Ok(topic.with_topic_id(t.id).with_partitions(
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
    ))
}

pub fn describe_cluster(
    broker: &Broker,
    ctx: &RequestContext,
    _req: DescribeClusterRequest,
) -> DescribeClusterResponse {
    require_on_cluster!(broker, ctx, Operation::Describe, DescribeClusterResponse);
    let (brokers, controller) = brokers(broker, &ctx.listener);
    DescribeClusterResponse::default()
        .with_cluster_id(str_bytes(cluster_id(broker)))
        .with_controller_id(BrokerId(controller))
        .with_brokers(
            brokers
                .into_iter()
                .map(|(id, host, port, rack)| {
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(id))
                        .with_host(str_bytes(host))
                        .with_port(port)
                        .with_rack(rack.map(str_bytes))
                })
                .collect(),
        )
}
