//! The consumer group protocol of KIP-848: ConsumerGroupHeartbeat and ConsumerGroupDescribe.
//! Clients name topics by id here; the coordinator (`crate::group::consumer`) works by name.

use std::collections::{BTreeMap, HashMap};

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::consumer_group_describe_response::{
    self as describe, DescribedGroup,
};
use kafka_protocol::messages::consumer_group_heartbeat_response::{self as heartbeat};
use kafka_protocol::messages::*;
use uuid::Uuid;

use super::apis::RequestContext;
use super::{str_bytes, Broker};
use crate::group::consumer::{Heartbeat, Partitions};
use crate::security::acl::{Operation, ResourceType};

/// Topics by name (id, partitions) and by id.
struct Catalog {
    by_name: BTreeMap<String, (Uuid, i32)>,
    by_id: HashMap<Uuid, String>,
}

impl Catalog {
    /// Every topic. Subscriptions are resolved against all of them, whoever heartbeats:
    /// resolving each member's against what its own principal may see would change the other
    /// members' subscriptions, and the group epoch, at every heartbeat of members whose
    /// principals differ. Named topics are checked against the member's ACLs instead.
    fn all(broker: &Broker) -> Catalog {
        Catalog::of(broker.topic_catalog())
    }

    /// The topics the principal may describe.
    fn visible(broker: &Broker, ctx: &RequestContext) -> Catalog {
        Catalog::of(
            broker
                .topic_catalog()
                .into_iter()
                .filter(|(t, _)| broker.allowed(ctx, Operation::Describe, ResourceType::Topic, t))
                .collect(),
        )
    }

    fn of(by_name: BTreeMap<String, (Uuid, i32)>) -> Catalog {
        let by_id = by_name
            .iter()
            .map(|(t, (id, _))| (*id, t.clone()))
            .collect();
        Catalog { by_name, by_id }
    }

    /// Partitions grouped by topic, in the shape each response's type takes; topics not in
    /// the catalog (deleted, or hidden from the principal) are left out.
    fn by_topic<T>(
        &self,
        partitions: &Partitions,
        make: impl Fn(&str, Uuid, Vec<i32>) -> T,
    ) -> Vec<T> {
        let mut grouped: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for (t, p) in partitions {
            grouped.entry(t).or_default().push(*p);
        }
        grouped
            .into_iter()
            .filter_map(|(t, ps)| self.by_name.get(t).map(|(id, _)| make(t, *id, ps)))
            .collect()
    }
}

pub fn consumer_group_heartbeat(
    broker: &Broker,
    ctx: &RequestContext,
    req: ConsumerGroupHeartbeatRequest,
) -> ConsumerGroupHeartbeatResponse {
    let refused = |error: ResponseError, message: String| {
        ConsumerGroupHeartbeatResponse::default()
            .with_error_code(error.code())
            .with_error_message(Some(str_bytes(message)))
            .with_member_epoch(-1)
    };
    let group_id = req.group_id.0.to_string();
    if let Some(e) = broker.refusal(ctx, Operation::Read, ResourceType::Group, &group_id) {
        return refused(e, format!("not allowed to read group {group_id}"));
    }
    let catalog = Catalog::all(broker);
    let names: Option<Vec<String>> = req
        .subscribed_topic_names
        .map(|ts| ts.into_iter().map(|t| t.0.to_string()).collect());
    if let Some(hidden) = names
        .iter()
        .flatten()
        .find(|t| !broker.allowed(ctx, Operation::Describe, ResourceType::Topic, t))
    {
        return refused(
            ResponseError::TopicAuthorizationFailed,
            format!("not allowed to describe topic {hidden}"),
        );
    }
    // Topics by id; ids this node does not know (deleted, or not yet seen) are not owned.
    let owned = req.topic_partitions.map(|tps| {
        tps.into_iter()
            .filter_map(|t| {
                catalog
                    .by_id
                    .get(&t.topic_id)
                    .map(|name| (name, t.partitions))
            })
            .flat_map(|(name, ps)| ps.into_iter().map(move |p| (name.clone(), p)))
            .collect::<Partitions>()
    });
    let hb = Heartbeat {
        member_id: req.member_id.to_string(),
        member_epoch: req.member_epoch,
        instance_id: req.instance_id.map(|s| s.to_string()),
        rack_id: req.rack_id.map(|s| s.to_string()),
        rebalance_timeout_ms: req.rebalance_timeout_ms,
        subscribed_names: names,
        subscribed_regex: req.subscribed_topic_regex.map(|s| s.to_string()),
        server_assignor: req.server_assignor.map(|s| s.to_string()),
        owned,
        client_id: ctx.client_id.clone().unwrap_or_default(),
        client_host: format!("/{}", ctx.peer.ip()),
    };
    let counts: BTreeMap<String, i32> = catalog
        .by_name
        .iter()
        .map(|(t, (_, n))| (t.clone(), *n))
        .collect();
    let interval = broker.groups.consumer_settings().heartbeat_interval;
    match broker.groups.consumer_heartbeat(&group_id, hb, &counts) {
        Err(r) => refused(r.error, r.message),
        Ok(reply) => ConsumerGroupHeartbeatResponse::default()
            .with_member_id(Some(str_bytes(reply.member_id)))
            .with_member_epoch(reply.member_epoch)
            .with_heartbeat_interval_ms(interval.as_millis() as i32)
            .with_assignment(reply.assignment.map(|a| {
                heartbeat::Assignment::default().with_topic_partitions(catalog.by_topic(
                    &a,
                    |_, id, ps| {
                        heartbeat::TopicPartitions::default()
                            .with_topic_id(id)
                            .with_partitions(ps)
                    },
                ))
            })),
    }
}

pub fn consumer_group_describe(
    broker: &Broker,
    ctx: &RequestContext,
    req: ConsumerGroupDescribeRequest,
) -> ConsumerGroupDescribeResponse {
    let catalog = Catalog::visible(broker, ctx);
    let assignment = |ps: &Partitions| {
        describe::Assignment::default().with_topic_partitions(catalog.by_topic(ps, |t, id, ps| {
            describe::TopicPartitions::default()
                .with_topic_id(id)
                .with_topic_name(TopicName(str_bytes(t)))
                .with_partitions(ps)
        }))
    };
    let groups = req
        .group_ids
        .into_iter()
        .map(|id| {
            let name = id.0.to_string();
            let failed = |e: ResponseError, message: String| {
                DescribedGroup::default()
                    .with_group_id(id.clone())
                    .with_error_code(e.code())
                    .with_error_message(Some(str_bytes(message)))
            };
            if let Some(e) = broker.refusal(ctx, Operation::Describe, ResourceType::Group, &name) {
                return failed(e, format!("not allowed to describe group {name}"));
            }
            if let Err(e) = broker.groups.check_active() {
                return failed(e, "this node does not coordinate groups".into());
            }
            let described = broker.groups.with_group(&name, |g| {
                let c = g.consumer.as_ref()?;
                let members = c
                    .members
                    .values()
                    .map(|m| {
                        describe::Member::default()
                            .with_member_id(str_bytes(m.member_id.clone()))
                            .with_instance_id(m.instance_id.clone().map(str_bytes))
                            .with_rack_id(m.rack_id.clone().map(str_bytes))
                            .with_member_epoch(m.epoch)
                            .with_client_id(str_bytes(m.client_id.clone()))
                            .with_client_host(str_bytes(m.client_host.clone()))
                            .with_subscribed_topic_names(
                                m.subscribed_names
                                    .iter()
                                    .map(|t| TopicName(str_bytes(t.clone())))
                                    .collect(),
                            )
                            .with_subscribed_topic_regex(m.subscribed_regex.clone().map(str_bytes))
                            .with_assignment(assignment(&m.assigned))
                            .with_target_assignment(assignment(
                                &c.target.get(&m.member_id).cloned().unwrap_or_default(),
                            ))
                            // 1: a member of the consumer protocol (0 would be classic).
                            .with_member_type(1)
                    })
                    .collect();
                Some(
                    DescribedGroup::default()
                        .with_group_id(id.clone())
                        .with_group_state(str_bytes(c.state().name()))
                        .with_group_epoch(c.epoch)
                        .with_assignment_epoch(c.assignment_epoch)
                        .with_assignor_name(str_bytes(c.assignor.clone()))
                        .with_members(members)
                        .with_authorized_operations(i32::MIN),
                )
            });
            match described {
                Some(Some(d)) => d,
                // Kafka's answer for a classic group; admin clients then ask DescribeGroups.
                Some(None) => failed(
                    ResponseError::GroupIdNotFound,
                    format!("group {name} is not a consumer group"),
                ),
                None => failed(
                    ResponseError::GroupIdNotFound,
                    format!("group {name} not found"),
                ),
            }
        })
        .collect();
    ConsumerGroupDescribeResponse::default().with_groups(groups)
}
