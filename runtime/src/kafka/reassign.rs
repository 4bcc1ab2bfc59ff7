//! AlterPartitionReassignments and ListPartitionReassignments: moving partitions to other
//! nodes of a cluster (see docs/cluster.md). A single node has nothing to move a partition to.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, BrokerId,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse, TopicName,
};

use super::apis::RequestContext;
use super::{str_bytes, Broker};
use crate::cluster::image::{Command, CommandError};
use crate::cluster::ClusterError;
use crate::security::acl::Operation;

pub async fn alter_partition_reassignments(
    broker: &Broker,
    ctx: &RequestContext,
    req: AlterPartitionReassignmentsRequest,
) -> AlterPartitionReassignmentsResponse {
    require_on_cluster!(
        broker,
        ctx,
        Operation::Alter,
        AlterPartitionReassignmentsResponse
    );
    let Some(cluster) = &broker.cluster else {
        return AlterPartitionReassignmentsResponse::default()
            .with_error_code(ResponseError::InvalidReplicaAssignment.code())
            .with_error_message(Some(str_bytes(
                "a single node has no other node to move partitions to",
            )));
    };
    let mut responses = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let replicas: Option<Vec<i32>> = p.replicas.map(|r| r.iter().map(|b| b.0).collect());
            let current = cluster
                .image()
                .partition(&t.name.0, p.partition_index)
                .map(|i| i.original.clone().unwrap_or_else(|| i.replicas.clone()));
            let result = match (&current, &replicas) {
                (None, _) => Err((
                    ResponseError::UnknownTopicOrPartition,
                    format!("unknown partition {}-{}", &*t.name.0, p.partition_index),
                )),
                (Some(c), Some(r))
                    if !req.allow_replication_factor_change && c.len() != r.len() =>
                {
                    Err((
                        ResponseError::InvalidReplicationFactor,
                        format!(
                            "the replication factor would change from {} to {}",
                            c.len(),
                            r.len()
                        ),
                    ))
                }
                _ => cluster
                    .run(Command::Reassign {
                        topic: t.name.0.to_string(),
                        partition: p.partition_index,
                        replicas,
                    })
                    .await
                    .map_err(|e| (code_of(&e), e.to_string())),
            };
            let mut r =
                ReassignablePartitionResponse::default().with_partition_index(p.partition_index);
            if let Err((code, message)) = result {
                r.error_code = code.code();
                r.error_message = Some(str_bytes(message));
            }
            partitions.push(r);
        }
        responses.push(
            ReassignableTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    AlterPartitionReassignmentsResponse::default()
        .with_allow_replication_factor_change(req.allow_replication_factor_change)
        .with_responses(responses)
}

fn code_of(e: &ClusterError) -> ResponseError {
    match e {
        ClusterError::Unavailable(_) => ResponseError::RequestTimedOut,
        ClusterError::Refused(CommandError::UnknownTopic(_)) => {
            ResponseError::UnknownTopicOrPartition
        }
        ClusterError::Refused(CommandError::NoReassignmentInProgress(_)) => {
            ResponseError::NoReassignmentInProgress
        }
        ClusterError::Refused(_) => ResponseError::InvalidReplicaAssignment,
    }
}

pub fn list_partition_reassignments(
    broker: &Broker,
    ctx: &RequestContext,
    req: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    require_on_cluster!(
        broker,
        ctx,
        Operation::Describe,
        ListPartitionReassignmentsResponse
    );
    let Some(cluster) = &broker.cluster else {
        return ListPartitionReassignmentsResponse::default();
    };
    let image = cluster.image();
    let wanted = |topic: &str, p: i32| match &req.topics {
        None => true,
        Some(ts) => ts
            .iter()
            .any(|t| &*t.name.0 == topic && t.partition_indexes.contains(&p)),
    };
    let ids = |v: &[i32]| v.iter().map(|n| BrokerId(*n)).collect::<Vec<_>>();
    let mut topics = Vec::new();
    for (name, t) in &image.topics {
        let ongoing: Vec<_> = t
            .partitions
            .iter()
            .enumerate()
            .filter(|(i, _)| wanted(name, *i as i32))
            .filter_map(|(i, p)| {
                let target = p.target.as_ref()?;
                let original = p.original.as_deref().unwrap_or(&p.replicas);
                let adding: Vec<i32> = target
                    .iter()
                    .copied()
                    .filter(|r| !original.contains(r))
                    .collect();
                let removing: Vec<i32> = original
                    .iter()
                    .copied()
                    .filter(|r| !target.contains(r))
                    .collect();
                Some(
                    OngoingPartitionReassignment::default()
                        .with_partition_index(i as i32)
                        .with_replicas(ids(&p.replicas))
                        .with_adding_replicas(ids(&adding))
                        .with_removing_replicas(ids(&removing)),
                )
            })
            .collect();
        if !ongoing.is_empty() {
            topics.push(
                OngoingTopicReassignment::default()
                    .with_name(TopicName(str_bytes(name.clone())))
                    .with_partitions(ongoing),
            );
        }
    }
    ListPartitionReassignmentsResponse::default().with_topics(topics)
}
