//! Consumer group APIs: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! OffsetCommit, OffsetFetch, ListGroups, DescribeGroups, DeleteGroups, OffsetDelete.
//! The state machine lives in `crate::group`; this module translates requests and responses.

use bytes::{Buf, Bytes};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Decodable;

use super::apis::RequestContext;
use super::{str_bytes, Broker};
use crate::group::{CommittedOffset, GroupState, JoinRequest};
use crate::now_ms;
use crate::security::acl::{Operation, ResourceType};

const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;

fn code(e: Option<ResponseError>) -> i16 {
    e.map_or(0, |e| e.code())
}

/// FindCoordinator's check: Describe on the group or transactional id.
fn coordinator_key_refusal(
    broker: &Broker,
    ctx: &RequestContext,
    key_type: i8,
    key: &str,
) -> Option<ResponseError> {
    match key_type {
        KEY_TYPE_TRANSACTION => {
            broker.refusal(ctx, Operation::Describe, ResourceType::TransactionalId, key)
        }
        _ => broker.refusal(ctx, Operation::Describe, ResourceType::Group, key),
    }
}

pub fn find_coordinator(
    broker: &Broker,
    ctx: &RequestContext,
    req: FindCoordinatorRequest,
) -> FindCoordinatorResponse {
    // This node coordinates every group and every transactional id.
    let unsupported = !matches!(req.key_type, KEY_TYPE_GROUP | KEY_TYPE_TRANSACTION);
    let message = unsupported.then(|| {
        str_bytes(format!(
            "unknown coordinator key type {} (0: group, 1: transaction)",
            req.key_type
        ))
    });
    let error = if unsupported {
        ResponseError::InvalidRequest.code()
    } else {
        0
    };
    let (node, host, port) = coordinator_node(broker, req.key_type, &ctx.listener);
    let host = str_bytes(host);
    if ctx.version >= 4 {
        let coordinators = req
            .coordinator_keys
            .into_iter()
            .map(|key| {
                let refused = coordinator_key_refusal(broker, ctx, req.key_type, &key);
                let mut c = Coordinator::default()
                    .with_error_code(refused.map_or(error, |e| e.code()))
                    .with_error_message(message.clone())
                    .with_key(key);
                if refused.is_some() {
                    c = c.with_node_id(BrokerId(-1)).with_port(-1);
                } else if !unsupported {
                    c = c
                        .with_node_id(BrokerId(node))
                        .with_host(host.clone())
                        .with_port(port);
                } else {
                    c = c.with_node_id(BrokerId(-1)).with_port(-1);
                }
                c
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    let refused = coordinator_key_refusal(broker, ctx, req.key_type, &req.key);
    let mut r =
        FindCoordinatorResponse::default().with_error_code(refused.map_or(error, |e| e.code()));
    if ctx.version >= 1 {
        r.error_message = message;
    }
    if unsupported || refused.is_some() {
        r.with_node_id(BrokerId(-1)).with_port(-1)
    } else {
        r.with_node_id(BrokerId(node))
            .with_host(host)
            .with_port(port)
    }
}

/// The node that coordinates groups (or transactions): in a cluster, the leader of the
/// internal topic that holds their state.
fn coordinator_node(broker: &Broker, key_type: i8, listener: &str) -> (i32, String, i32) {
    let (host, port) = broker.endpoint(listener);
    let here = (broker.node_id, host, port);
    let Some(cluster) = &broker.cluster else {
        return here;
    };
    let topic = if key_type == KEY_TYPE_TRANSACTION {
        crate::txn::TOPIC
    } else {
        crate::group::store::TOPIC
    };
    let image = cluster.image();
    image
        .partition(topic, 0)
        .and_then(|p| image.nodes.get(&p.leader))
        .map_or(here, |n| {
            let (host, port) = n.endpoint(listener);
            (n.id, host, port)
        })
}

pub async fn join_group(
    broker: &Broker,
    ctx: &RequestContext,
    req: JoinGroupRequest,
) -> JoinGroupResponse {
    let v = ctx.version;
    if let Some(e) = broker.refusal(ctx, Operation::Read, ResourceType::Group, &req.group_id.0) {
        let mut r = JoinGroupResponse::default()
            .with_error_code(e.code())
            .with_generation_id(-1);
        r.protocol_name = Some(str_bytes(""));
        return r;
    }
    let rx = broker.groups.join(JoinRequest {
        group_id: req.group_id.0.to_string(),
        member_id: req.member_id.to_string(),
        group_instance_id: req.group_instance_id.as_ref().map(|s| s.to_string()),
        client_id: ctx.client_id.clone().unwrap_or_default(),
        client_host: format!("/{}", ctx.peer.ip()),
        session_timeout_ms: req.session_timeout_ms,
        rebalance_timeout_ms: if v >= 1 {
            req.rebalance_timeout_ms
        } else {
            req.session_timeout_ms
        },
        protocol_type: req.protocol_type.to_string(),
        protocols: req
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        require_known_member_id: v >= 4,
    });
    let outcome = rx.await.unwrap_or_else(|_| crate::group::JoinOutcome {
        error: Some(ResponseError::UnknownMemberId),
        generation: -1,
        ..Default::default()
    });
    let mut r = JoinGroupResponse::default()
        .with_error_code(code(outcome.error))
        .with_generation_id(outcome.generation)
        .with_leader(str_bytes(outcome.leader))
        .with_member_id(str_bytes(outcome.member_id))
        .with_members(
            outcome
                .members
                .into_iter()
                .map(|(id, instance, metadata)| {
                    JoinGroupResponseMember::default()
                        .with_member_id(str_bytes(id))
                        .with_group_instance_id(if v >= 5 {
                            instance.map(str_bytes)
                        } else {
                            None
                        })
                        .with_metadata(metadata)
                })
                .collect(),
        );
    // Before v7 the protocol name is a non-nullable string.
    r.protocol_name = Some(str_bytes(outcome.protocol_name.unwrap_or_default()));
    if v >= 7 {
        r.protocol_type = outcome.protocol_type.map(str_bytes);
    }
    r
}

pub async fn sync_group(
    broker: &Broker,
    ctx: &RequestContext,
    req: SyncGroupRequest,
) -> SyncGroupResponse {
    if let Some(e) = broker.refusal(ctx, Operation::Read, ResourceType::Group, &req.group_id.0) {
        return SyncGroupResponse::default().with_error_code(e.code());
    }
    let rx = broker.groups.sync(
        &req.group_id.0,
        &req.member_id,
        req.group_instance_id.as_deref(),
        req.generation_id,
        req.protocol_type.as_deref(),
        req.protocol_name.as_deref(),
        req.assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect(),
    );
    let outcome = rx.await.unwrap_or_else(|_| crate::group::SyncOutcome {
        error: Some(ResponseError::UnknownMemberId),
        ..Default::default()
    });
    let mut r = SyncGroupResponse::default()
        .with_error_code(code(outcome.error))
        .with_assignment(outcome.assignment);
    if ctx.version >= 5 {
        r.protocol_type = outcome.protocol_type.map(str_bytes);
        r.protocol_name = outcome.protocol_name.map(str_bytes);
    }
    r
}

pub fn heartbeat(
    broker: &Broker,
    ctx: &RequestContext,
    req: HeartbeatRequest,
) -> HeartbeatResponse {
    if let Some(e) = broker.refusal(ctx, Operation::Read, ResourceType::Group, &req.group_id.0) {
        return HeartbeatResponse::default().with_error_code(e.code());
    }
    let e = broker.groups.heartbeat(
        &req.group_id.0,
        &req.member_id,
        req.group_instance_id.as_deref(),
        req.generation_id,
    );
    HeartbeatResponse::default().with_error_code(code(e))
}

pub fn leave_group(
    broker: &Broker,
    ctx: &RequestContext,
    req: LeaveGroupRequest,
) -> LeaveGroupResponse {
    if let Some(e) = broker.refusal(ctx, Operation::Read, ResourceType::Group, &req.group_id.0) {
        return LeaveGroupResponse::default().with_error_code(e.code());
    }
    let leaving: Vec<(String, Option<String>)> = if ctx.version >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|s| s.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    match broker.groups.leave(&req.group_id.0, &leaving) {
        Err(e) => LeaveGroupResponse::default().with_error_code(e.code()),
        Ok(results) if ctx.version >= 3 => LeaveGroupResponse::default().with_members(
            req.members
                .into_iter()
                .zip(results)
                .map(|(m, e)| {
                    MemberResponse::default()
                        .with_member_id(m.member_id)
                        .with_group_instance_id(m.group_instance_id)
                        .with_error_code(code(e))
                })
                .collect(),
        ),
        Ok(results) => LeaveGroupResponse::default()
            .with_error_code(code(results.into_iter().next().flatten())),
    }
}

pub async fn offset_commit(
    broker: &Broker,
    ctx: &RequestContext,
    req: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let now = now_ms();
    let group_refused = broker.refusal(ctx, Operation::Read, ResourceType::Group, &req.group_id.0);
    let topic_refused =
        |topic: &str| broker.refusal(ctx, Operation::Read, ResourceType::Topic, topic);
    let mut refused_topics = Vec::new();
    let mut offsets = Vec::new();
    for t in &req.topics {
        if let Some(e) = topic_refused(&t.name.0) {
            refused_topics.push((t.name.0.to_string(), e));
            continue;
        }
        for p in &t.partitions {
            let epoch = if ctx.version >= 6 {
                p.committed_leader_epoch
            } else {
                -1
            };
            offsets.push((
                (t.name.0.to_string(), p.partition_index),
                requested_offset(
                    p.committed_offset,
                    epoch,
                    p.committed_metadata.as_deref(),
                    now,
                ),
            ));
        }
    }
    let mut result = match group_refused {
        Some(e) => Err(e),
        None => broker.groups.commit(
            &req.group_id.0,
            &req.member_id,
            req.group_instance_id.as_deref(),
            req.generation_id_or_member_epoch,
            offsets,
            |topic, p| broker.partition_exists(topic, p),
        ),
    };
    // In a cluster a commit is acknowledged once the in-sync replicas of the offsets topic
    // hold it, so it survives the coordinator's node.
    if result.is_ok() {
        if let Err(e) = broker.internal_replicated(crate::group::store::TOPIC).await {
            result = Err(e);
        }
    }
    let error_for = |topic: &str, p: i32| match refused_topics.iter().find(|(t, _)| t == topic) {
        Some((_, e)) if group_refused.is_none() => e.code(),
        _ => partition_code(&result, topic, p, |e| e),
    };
    let topics = req
        .topics
        .iter()
        .map(|t| {
            OffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(
                    t.partitions
                        .iter()
                        .map(|p| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(error_for(&t.name.0, p.partition_index))
                        })
                        .collect(),
                )
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

/// An offset as a commit request states it.
pub(super) fn requested_offset(
    offset: i64,
    leader_epoch: i32,
    metadata: Option<&str>,
    now: i64,
) -> CommittedOffset {
    CommittedOffset {
        offset,
        leader_epoch,
        metadata: metadata.unwrap_or_default().to_string(),
        commit_timestamp: now,
    }
}

/// The error code of one partition of a commit: the whole request's error (as `whole` maps
/// it), or the partition's own.
pub(super) fn partition_code(
    result: &Result<Vec<crate::group::PartitionResult>, ResponseError>,
    topic: &str,
    partition: i32,
    whole: impl Fn(ResponseError) -> ResponseError,
) -> i16 {
    match result {
        Err(e) => whole(*e).code(),
        Ok(results) => results
            .iter()
            .find(|((t, q), _)| t == topic && *q == partition)
            .map_or(0, |(_, e)| code(*e)),
    }
}

/// A topic's committed offsets per partition (None: nothing committed), or why the principal
/// may not see them.
type TopicOffsets = (
    String,
    Option<ResponseError>,
    Vec<(i32, Option<CommittedOffset>)>,
);

/// (topic, partitions) pairs asked for, or None for "all committed offsets".
type Wanted = Option<Vec<(String, Vec<i32>)>>;

/// The offsets asked for, by topic. Topics the principal may not describe are left out of
/// "all", and answered TOPIC_AUTHORIZATION_FAILED when named.
fn fetch_group_offsets(
    broker: &Broker,
    ctx: &RequestContext,
    group: &str,
    wanted: Wanted,
) -> Vec<TopicOffsets> {
    let described = |t: &str| broker.allowed(ctx, Operation::Describe, ResourceType::Topic, t);
    let named = wanted.is_some();
    let flat = wanted.map(|w| {
        w.into_iter()
            .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.clone(), p)))
            .collect::<Vec<_>>()
    });
    let mut by_topic: Vec<TopicOffsets> = Vec::new();
    for ((topic, p), off) in broker.groups.fetch_offsets(group, flat) {
        match by_topic.iter_mut().find(|(t, _, _)| *t == topic) {
            Some((_, None, ps)) => ps.push((p, off)),
            Some((_, Some(_), ps)) => ps.push((p, None)),
            None if described(&topic) => by_topic.push((topic, None, vec![(p, off)])),
            None if named => by_topic.push((
                topic,
                Some(ResponseError::TopicAuthorizationFailed),
                vec![(p, None)],
            )),
            None => {}
        }
    }
    by_topic
}

pub fn offset_fetch(
    broker: &Broker,
    ctx: &RequestContext,
    req: OffsetFetchRequest,
) -> OffsetFetchResponse {
    let v = ctx.version;
    if v >= 8 {
        let groups = req
            .groups
            .into_iter()
            .map(|g| {
                let wanted = g.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name.0.to_string(), t.partition_indexes))
                        .collect()
                });
                let group_id = g.group_id.0.to_string();
                if let Some(e) =
                    broker.refusal(ctx, Operation::Describe, ResourceType::Group, &group_id)
                {
                    return OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id)
                        .with_error_code(e.code());
                }
                let topics = fetch_group_offsets(broker, ctx, &group_id, wanted)
                    .into_iter()
                    .map(|(t, refused, ps)| {
                        let partitions = ps
                            .into_iter()
                            .map(|(p, o)| {
                                let (offset, epoch, meta) = o
                                    .map_or((-1, -1, String::new()), |o| {
                                        (o.offset, o.leader_epoch, o.metadata)
                                    });
                                let mut r = OffsetFetchResponsePartitions::default()
                                    .with_partition_index(p)
                                    .with_committed_offset(offset)
                                    .with_committed_leader_epoch(epoch)
                                    .with_metadata(Some(str_bytes(meta)));
                                if unstable(broker, req.require_stable, &group_id, &t, p) {
                                    r = r.with_committed_offset(-1).with_error_code(
                                        ResponseError::UnstableOffsetCommit.code(),
                                    );
                                }
                                if let Some(e) = refused {
                                    r.error_code = e.code();
                                }
                                r
                            })
                            .collect();
                        OffsetFetchResponseTopics::default()
                            .with_name(TopicName(str_bytes(t)))
                            .with_partitions(partitions)
                    })
                    .collect();
                OffsetFetchResponseGroup::default()
                    .with_group_id(g.group_id)
                    .with_topics(topics)
                    .with_error_code(code(broker.groups.check_active().err()))
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let wanted = req.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    if let Some(e) = broker.refusal(
        ctx,
        Operation::Describe,
        ResourceType::Group,
        &req.group_id.0,
    ) {
        return OffsetFetchResponse::default().with_error_code(e.code());
    }
    let topics = fetch_group_offsets(broker, ctx, &req.group_id.0, wanted)
        .into_iter()
        .map(|(t, refused, ps)| {
            OffsetFetchResponseTopic::default()
                .with_name(TopicName(str_bytes(t.clone())))
                .with_partitions(
                    ps.into_iter()
                        .map(|(p, o)| {
                            let (offset, epoch, meta) = o.map_or((-1, -1, String::new()), |o| {
                                (o.offset, o.leader_epoch, o.metadata)
                            });
                            let mut r = OffsetFetchResponsePartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(offset)
                                .with_metadata(Some(str_bytes(meta)));
                            if v >= 5 {
                                r.committed_leader_epoch = epoch;
                            }
                            if v >= 7 && unstable(broker, req.require_stable, &req.group_id, &t, p)
                            {
                                r.committed_offset = -1;
                                r.error_code = ResponseError::UnstableOffsetCommit.code();
                            }
                            if let Some(e) = refused {
                                r.error_code = e.code();
                            }
                            r
                        })
                        .collect(),
                )
        })
        .collect();
    let error = if v >= 2 {
        code(broker.groups.check_active().err())
    } else {
        0
    };
    OffsetFetchResponse::default()
        .with_topics(topics)
        .with_error_code(error)
}

/// KIP-447: a consumer asking for stable offsets must wait while a transaction holds one.
fn unstable(broker: &Broker, require_stable: bool, group: &str, topic: &str, p: i32) -> bool {
    require_stable && broker.groups.has_pending_txn_offset(group, topic, p)
}

pub fn list_groups(
    broker: &Broker,
    ctx: &RequestContext,
    req: ListGroupsRequest,
) -> ListGroupsResponse {
    // The cluster's Describe shows every group; otherwise those the principal may describe.
    let all = broker.allowed_on_cluster(ctx, Operation::Describe);
    let groups = broker
        .groups
        .list()
        .into_iter()
        .filter(|(id, _, _)| {
            all || broker.allowed(ctx, Operation::Describe, ResourceType::Group, id)
        })
        .filter(|(_, _, state)| {
            req.states_filter.is_empty()
                || req
                    .states_filter
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(state.name()))
        })
        .map(|(id, protocol_type, state)| {
            let kind = broker
                .groups
                .with_group(&id, |g| g.group_type())
                .unwrap_or("classic");
            (id, protocol_type, state, kind)
        })
        .filter(|(_, _, _, kind)| {
            req.types_filter.is_empty()
                || req
                    .types_filter
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(kind))
        })
        .map(|(id, protocol_type, state, kind)| {
            let mut g = ListedGroup::default()
                .with_group_id(GroupId(str_bytes(id)))
                .with_protocol_type(str_bytes(protocol_type));
            if ctx.version >= 4 {
                g.group_state = str_bytes(state.name());
            }
            if ctx.version >= 5 {
                g.group_type = str_bytes(kind);
            }
            g
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}

pub fn describe_groups(
    broker: &Broker,
    ctx: &RequestContext,
    req: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let groups = req
        .groups
        .into_iter()
        .map(|id| {
            if let Some(e) = broker.refusal(ctx, Operation::Describe, ResourceType::Group, &id.0) {
                return DescribedGroup::default()
                    .with_group_id(id)
                    .with_error_code(e.code());
            }
            let described = broker.groups.with_group(&id.0, |g| {
                // Consumer-protocol groups too, in the classic shape (Kafka answers
                // GROUP_ID_NOT_FOUND; clients that only know DescribeGroups see them this way).
                let members = g
                    .member_views()
                    .into_iter()
                    .map(|m| {
                        let mut d = DescribedGroupMember::default()
                            .with_member_id(str_bytes(m.member_id))
                            .with_client_id(str_bytes(m.client_id))
                            .with_client_host(str_bytes(m.client_host))
                            .with_member_metadata(m.metadata)
                            .with_member_assignment(m.assignment);
                        if ctx.version >= 4 {
                            d.group_instance_id = m.group_instance_id.map(str_bytes);
                        }
                        d
                    })
                    .collect();
                DescribedGroup::default()
                    .with_group_id(id.clone())
                    .with_group_state(str_bytes(g.state.name()))
                    .with_protocol_type(str_bytes(g.protocol_type.clone().unwrap_or_default()))
                    .with_protocol_data(str_bytes(g.protocol_name.clone().unwrap_or_default()))
                    .with_members(members)
            });
            // An unknown group is described as Dead, as Kafka does.
            described.unwrap_or_else(|| {
                DescribedGroup::default()
                    .with_group_id(id)
                    .with_group_state(str_bytes(GroupState::Dead.name()))
                    .with_error_code(code(broker.groups.check_active().err()))
            })
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

pub fn delete_groups(
    broker: &Broker,
    ctx: &RequestContext,
    req: DeleteGroupsRequest,
) -> DeleteGroupsResponse {
    let results = req
        .groups_names
        .into_iter()
        .map(|g| {
            let e = broker
                .refusal(ctx, Operation::Delete, ResourceType::Group, &g.0)
                .or_else(|| broker.groups.delete_group(&g.0));
            DeletableGroupResult::default()
                .with_group_id(g)
                .with_error_code(code(e))
        })
        .collect();
    DeleteGroupsResponse::default().with_results(results)
}

/// Topics a member's consumer-protocol subscription names.
fn subscribed_topics(metadata: &Bytes) -> Vec<String> {
    let mut buf = metadata.clone();
    if buf.remaining() < 2 {
        return vec![];
    }
    let version = buf.get_i16();
    ConsumerProtocolSubscription::decode(&mut buf, version)
        .map(|s| s.topics.into_iter().map(|t| t.to_string()).collect())
        .unwrap_or_default()
}

pub fn offset_delete(
    broker: &Broker,
    ctx: &RequestContext,
    req: OffsetDeleteRequest,
) -> OffsetDeleteResponse {
    if let Some(e) = broker.refusal(ctx, Operation::Delete, ResourceType::Group, &req.group_id.0) {
        return OffsetDeleteResponse::default().with_error_code(e.code());
    }
    let refused_topic = |t: &str| broker.refusal(ctx, Operation::Read, ResourceType::Topic, t);
    let tps: Vec<(String, i32)> = req
        .topics
        .iter()
        .filter(|t| refused_topic(&t.name.0).is_none())
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.0.to_string(), p.partition_index))
        })
        .collect();
    let result = broker
        .groups
        .delete_offsets(&req.group_id.0, tps, |g, topic| {
            g.protocol_type.as_deref() == Some("consumer")
                && g.members.values().any(|m| {
                    m.protocols
                        .iter()
                        .any(|(_, meta)| subscribed_topics(meta).iter().any(|t| t == topic))
                })
        });
    match result {
        Err(e) => OffsetDeleteResponse::default().with_error_code(e.code()),
        Ok(results) => {
            let topics = req
                .topics
                .into_iter()
                .map(|t| {
                    let name = t.name.0.to_string();
                    let refused = refused_topic(&name);
                    OffsetDeleteResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(
                            t.partitions
                                .into_iter()
                                .map(|p| {
                                    let e = results
                                        .iter()
                                        .find(|((tn, pi), _)| {
                                            *tn == name && *pi == p.partition_index
                                        })
                                        .and_then(|(_, e)| *e)
                                        .or(refused);
                                    OffsetDeleteResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(code(e))
                                })
                                .collect(),
                        )
                })
                .collect();
            OffsetDeleteResponse::default().with_topics(topics)
        }
    }
}
