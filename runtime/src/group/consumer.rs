//! Groups of Kafka's consumer protocol (KIP-848, ConsumerGroupHeartbeat): the coordinator
//! computes every member's partitions itself, with a server-side assignor (`uniform` or
//! `range`), and hands them out in heartbeat responses.
//!
//! Epochs: the group epoch grows whenever a member joins or leaves, a subscription changes, or
//! a subscribed topic gains partitions or disappears; the target assignment is computed for it
//! at once (its epoch is the assignment epoch). Each member then moves to its target in steps, so
//! that no partition ever has two owners (Kafka's reconciliation): first it gives up what the
//! target takes away (UNREVOKED_PARTITIONS, its epoch unchanged), then it takes the new epoch
//! and every partition of its target that no other member still holds; the rest follows at a
//! later heartbeat, once released (UNRELEASED_PARTITIONS).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;

use super::GroupState;
use kafka_protocol::messages::{
    consumer_protocol_assignment, ConsumerProtocolAssignment, ConsumerProtocolSubscription,
    TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use serde::{Deserialize, Serialize};

/// (topic, partition).
pub type TopicPartition = (String, i32);
pub type Partitions = BTreeSet<TopicPartition>;

/// Server-side assignors, the default first (Kafka's group.consumer.assignors).
pub const ASSIGNORS: &[&str] = &["uniform", "range"];

/// Where a member stands in moving to its target assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Holds its whole target at the assignment epoch.
    Stable,
    /// Must give up `pending_revocation` before it gets anything new.
    UnrevokedPartitions,
    /// At the assignment epoch, waiting for partitions other members still hold.
    UnreleasedPartitions,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Stable => "Stable",
            MemberState::UnrevokedPartitions => "UnrevokedPartitions",
            MemberState::UnreleasedPartitions => "UnreleasedPartitions",
        }
    }
}

pub struct ConsumerMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout: Duration,
    pub subscribed_names: Vec<String>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    pub epoch: i32,
    pub previous_epoch: i32,
    pub state: MemberState,
    /// The partitions the member may consume now.
    pub assigned: Partitions,
    /// Partitions taken away that the member has not yet confirmed it gave up.
    pub pending_revocation: Partitions,
    /// The existing topics its subscription names or matches.
    pub resolved: BTreeSet<String>,
    regex: Option<regex::Regex>,
    session_deadline: Instant,
    revocation_deadline: Option<Instant>,
}

/// A ConsumerGroupHeartbeat request, topics by name. `None` fields did not change since the
/// member's last heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub subscribed_names: Option<Vec<String>>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    /// What the member says it owns.
    pub owned: Option<Partitions>,
    pub client_id: String,
    pub client_host: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub member_id: String,
    pub member_epoch: i32,
    /// The member's partitions, sent when they changed or the member said what it owns.
    pub assignment: Option<Partitions>,
    /// Whether the group's stored state changed (epochs, members, assignments).
    pub changed: bool,
}

/// A refused heartbeat: the error code and a message for the client's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: ResponseError,
    pub message: String,
}

pub fn refuse(error: ResponseError, message: impl Into<String>) -> Refusal {
    Refusal {
        error,
        message: message.into(),
    }
}

/// A consumer-protocol group as `__consumer_offsets` stores it (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerGroupRecord {
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub assignor: String,
    pub subscribed_topics: BTreeMap<String, i32>,
    pub target: BTreeMap<String, Vec<TopicPartition>>,
    pub members: Vec<ConsumerMemberRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerMemberRecord {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: u64,
    pub subscribed_names: Vec<String>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    pub epoch: i32,
    pub previous_epoch: i32,
    pub state: String,
    pub assigned: Vec<TopicPartition>,
    pub pending_revocation: Vec<TopicPartition>,
    pub resolved: Vec<String>,
}

/// Timers of the consumer protocol (Kafka's group.consumer.* settings).
#[derive(Debug, Clone, Copy)]
pub struct ConsumerSettings {
    pub session_timeout: Duration,
    pub heartbeat_interval: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            session_timeout: Duration::from_millis(45_000),
            heartbeat_interval: Duration::from_millis(5_000),
        }
    }
}

#[derive(Default)]
pub struct ConsumerGroup {
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub assignor: String,
    /// Each member's target partitions at the assignment epoch.
    pub target: BTreeMap<String, Partitions>,
    pub members: BTreeMap<String, ConsumerMember>,
    /// Partition counts of the subscribed topics, as of the group epoch.
    subscribed_topics: BTreeMap<String, i32>,
    /// The topic names members' subscriptions were last resolved against.
    resolved_against: BTreeSet<String>,
}

impl ConsumerGroup {
    /// A group whose epochs continue from `epoch` (a classic group's generation, say), so
    /// that epochs handed out never repeat.
    pub fn new(epoch: i32) -> ConsumerGroup {
        ConsumerGroup {
            epoch,
            assignment_epoch: epoch,
            assignor: ASSIGNORS[0].to_string(),
            ..Default::default()
        }
    }

    /// Kafka's group states: Empty, Reconciling while a member has not reached its target,
    /// else Stable (assignments are computed at once, so there is no Assigning).
    pub fn state(&self) -> GroupState {
        if self.members.is_empty() {
            GroupState::Empty
        } else if self.is_stable() {
            GroupState::Stable
        } else {
            GroupState::Reconciling
        }
    }

    pub fn is_stable(&self) -> bool {
        self.members
            .values()
            .all(|m| m.state == MemberState::Stable && m.epoch == self.assignment_epoch)
    }

    /// Whether a member subscribes to this topic.
    pub fn subscribes(&self, topic: &str) -> bool {
        self.members.values().any(|m| m.resolved.contains(topic))
    }

    /// Handles one heartbeat. `topics` is every topic a subscription may name, with its
    /// partition count.
    pub fn heartbeat(
        &mut self,
        mut hb: Heartbeat,
        topics: &BTreeMap<String, i32>,
        settings: &ConsumerSettings,
        now: Instant,
    ) -> Result<HeartbeatReply, Refusal> {
        if let Some(a) = &hb.server_assignor {
            if !ASSIGNORS.contains(&a.as_str()) {
                return Err(refuse(
                    ResponseError::UnsupportedAssignor,
                    format!("unknown assignor {a:?}; this coordinator has {ASSIGNORS:?}"),
                ));
            }
        }
        let regex = match &hb.subscribed_regex {
            Some(r) if !r.is_empty() => Some(compile(r)?),
            _ => None,
        };
        if hb.member_epoch < 0 {
            return self.leave(&hb);
        }
        let mut changed = false;
        if hb.member_epoch == 0 {
            if hb.subscribed_names.is_none() && hb.subscribed_regex.is_none() {
                return Err(refuse(
                    ResponseError::InvalidRequest,
                    "a joining member must give its subscribed topics or regex",
                ));
            }
            if hb.member_id.is_empty() {
                hb.member_id = uuid::Uuid::new_v4().to_string();
            }
            if let Some(i) = &hb.instance_id {
                if let Some(other) = self
                    .members
                    .values()
                    .find(|m| m.instance_id.as_ref() == Some(i) && m.member_id != hb.member_id)
                {
                    return Err(refuse(
                        ResponseError::UnreleasedInstanceId,
                        format!(
                            "instance id {i:?} is held by member {}, which has not left",
                            other.member_id
                        ),
                    ));
                }
            }
            // A member that joins again (after being fenced, or retrying a join whose answer
            // it lost) holds nothing: it starts over.
            self.members.remove(&hb.member_id);
            self.members.insert(
                hb.member_id.clone(),
                ConsumerMember {
                    member_id: hb.member_id.clone(),
                    instance_id: hb.instance_id.clone(),
                    rack_id: None,
                    client_id: String::new(),
                    client_host: String::new(),
                    rebalance_timeout: Duration::from_millis(hb.rebalance_timeout_ms.max(0) as u64),
                    subscribed_names: vec![],
                    subscribed_regex: None,
                    server_assignor: None,
                    epoch: 0,
                    previous_epoch: -1,
                    state: MemberState::Stable,
                    assigned: Partitions::new(),
                    pending_revocation: Partitions::new(),
                    resolved: BTreeSet::new(),
                    regex: None,
                    session_deadline: now,
                    revocation_deadline: None,
                },
            );
            changed = true;
        } else {
            let Some(m) = self.members.get(&hb.member_id) else {
                return Err(refuse(
                    ResponseError::UnknownMemberId,
                    format!("member {} is not in the group", hb.member_id),
                ));
            };
            if hb.member_epoch != m.epoch {
                let lost_reply = hb.member_epoch == m.previous_epoch
                    && hb.owned.as_ref().is_none_or(|o| o.is_subset(&m.assigned));
                if !lost_reply {
                    return Err(refuse(
                        ResponseError::FencedMemberEpoch,
                        format!(
                            "member {} sent epoch {}; its epoch is {}",
                            hb.member_id, hb.member_epoch, m.epoch
                        ),
                    ));
                }
            }
        }
        let m = self.members.get_mut(&hb.member_id).expect("member exists");
        let epoch_before = m.epoch;
        let assigned_before = m.assigned.clone();
        m.session_deadline = now + settings.session_timeout;
        m.client_id = hb.client_id.clone();
        m.client_host = hb.client_host.clone();
        if hb.rack_id.is_some() {
            m.rack_id = hb.rack_id.clone();
        }
        if hb.rebalance_timeout_ms >= 0 {
            m.rebalance_timeout = Duration::from_millis(hb.rebalance_timeout_ms as u64);
        }
        if let Some(names) = &hb.subscribed_names {
            let mut names = names.clone();
            names.sort();
            names.dedup();
            changed |= m.subscribed_names != names;
            m.subscribed_names = names;
        }
        if let Some(r) = &hb.subscribed_regex {
            let r = (!r.is_empty()).then(|| r.clone());
            changed |= m.subscribed_regex != r;
            m.subscribed_regex = r;
            m.regex = regex;
        }
        if hb.server_assignor.is_some() {
            changed |= m.server_assignor != hb.server_assignor;
            m.server_assignor = hb.server_assignor.clone();
        }
        // Subscriptions are matched again only when they or the set of topics changed.
        if changed || !topics.keys().eq(self.resolved_against.iter()) {
            self.resolve(topics);
        }
        let counts = self.subscribed_counts(topics);
        if changed || counts != self.subscribed_topics {
            self.subscribed_topics = counts;
            self.bump();
        }
        let group_epoch_before = self.epoch;
        let progress_before = self.progress(&hb.member_id);
        self.reconcile(&hb.member_id, hb.owned.as_ref(), now);
        let progress_after = self.progress(&hb.member_id);
        let m = &self.members[&hb.member_id];
        let moved = m.epoch != epoch_before || m.assigned != assigned_before;
        let send = hb.owned.is_some() || hb.member_epoch == 0 || moved;
        Ok(HeartbeatReply {
            member_id: m.member_id.clone(),
            member_epoch: m.epoch,
            assignment: send.then(|| m.assigned.clone()),
            changed: changed
                || moved
                || self.epoch != group_epoch_before
                || progress_before != progress_after,
        })
    }

    fn leave(&mut self, hb: &Heartbeat) -> Result<HeartbeatReply, Refusal> {
        let id = match &hb.instance_id {
            Some(i) if hb.member_id.is_empty() => self
                .members
                .values()
                .find(|m| m.instance_id.as_ref() == Some(i))
                .map(|m| m.member_id.clone()),
            _ => Some(hb.member_id.clone()),
        };
        let Some(id) = id.filter(|id| self.members.contains_key(id)) else {
            return Err(refuse(
                ResponseError::UnknownMemberId,
                format!("member {} is not in the group", hb.member_id),
            ));
        };
        self.remove(std::slice::from_ref(&id));
        Ok(HeartbeatReply {
            member_id: id,
            member_epoch: hb.member_epoch,
            assignment: None,
            changed: true,
        })
    }

    /// Where a member stands in its reconciliation.
    fn progress(&self, member_id: &str) -> Option<(MemberState, usize)> {
        self.members
            .get(member_id)
            .map(|m| (m.state, m.pending_revocation.len()))
    }

    /// The state to store in `__consumer_offsets`.
    pub fn record(&self) -> ConsumerGroupRecord {
        ConsumerGroupRecord {
            epoch: self.epoch,
            assignment_epoch: self.assignment_epoch,
            assignor: self.assignor.clone(),
            subscribed_topics: self.subscribed_topics.clone(),
            target: self
                .target
                .iter()
                .map(|(m, ps)| (m.clone(), ps.iter().cloned().collect()))
                .collect(),
            members: self
                .members
                .values()
                .map(|m| ConsumerMemberRecord {
                    member_id: m.member_id.clone(),
                    instance_id: m.instance_id.clone(),
                    rack_id: m.rack_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: m.rebalance_timeout.as_millis() as u64,
                    subscribed_names: m.subscribed_names.clone(),
                    subscribed_regex: m.subscribed_regex.clone(),
                    server_assignor: m.server_assignor.clone(),
                    epoch: m.epoch,
                    previous_epoch: m.previous_epoch,
                    state: m.state.name().to_string(),
                    assigned: m.assigned.iter().cloned().collect(),
                    pending_revocation: m.pending_revocation.iter().cloned().collect(),
                    resolved: m.resolved.iter().cloned().collect(),
                })
                .collect(),
        }
    }

    /// The group as stored; every member gets a full session (and rebalance timeout) from
    /// `now` to heartbeat the new coordinator.
    pub fn from_record(r: ConsumerGroupRecord, settings: &ConsumerSettings, now: Instant) -> Self {
        let members = r
            .members
            .into_iter()
            .map(|m| {
                let rebalance_timeout = Duration::from_millis(m.rebalance_timeout_ms);
                let state = match m.state.as_str() {
                    "UnrevokedPartitions" => MemberState::UnrevokedPartitions,
                    "UnreleasedPartitions" => MemberState::UnreleasedPartitions,
                    _ => MemberState::Stable,
                };
                let member = ConsumerMember {
                    regex: m.subscribed_regex.as_deref().and_then(|r| compile(r).ok()),
                    member_id: m.member_id.clone(),
                    instance_id: m.instance_id,
                    rack_id: m.rack_id,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    rebalance_timeout,
                    subscribed_names: m.subscribed_names,
                    subscribed_regex: m.subscribed_regex,
                    server_assignor: m.server_assignor,
                    epoch: m.epoch,
                    previous_epoch: m.previous_epoch,
                    state,
                    assigned: m.assigned.into_iter().collect(),
                    pending_revocation: m.pending_revocation.into_iter().collect(),
                    resolved: m.resolved.into_iter().collect(),
                    session_deadline: now + settings.session_timeout,
                    revocation_deadline: (state == MemberState::UnrevokedPartitions)
                        .then(|| now + rebalance_timeout),
                };
                (m.member_id, member)
            })
            .collect();
        ConsumerGroup {
            epoch: r.epoch,
            assignment_epoch: r.assignment_epoch,
            assignor: r.assignor,
            target: r
                .target
                .into_iter()
                .map(|(m, ps)| (m, ps.into_iter().collect()))
                .collect(),
            members,
            subscribed_topics: r.subscribed_topics,
            resolved_against: BTreeSet::new(),
        }
    }

    /// Removes members (left, or fenced by a timer) and reassigns what they held.
    fn remove(&mut self, ids: &[String]) {
        for id in ids {
            self.members.remove(id);
            self.target.remove(id);
        }
        let counts: BTreeMap<String, i32> = self
            .subscribed_topics
            .iter()
            .filter(|(t, _)| self.subscribes(t))
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        self.subscribed_topics = counts;
        self.bump();
    }

    /// Members past their session, or that kept revoked partitions past their rebalance
    /// timeout, are fenced; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                m.session_deadline <= now || m.revocation_deadline.is_some_and(|t| t <= now)
            })
            .map(|m| m.member_id.clone())
            .collect();
        if !expired.is_empty() {
            // What they held goes to members waiting for it, at their next heartbeat.
            self.remove(&expired);
        }
        expired
    }

    /// Re-reads every member's subscription against the topics that exist now.
    fn resolve(&mut self, topics: &BTreeMap<String, i32>) {
        self.resolved_against = topics.keys().cloned().collect();
        for m in self.members.values_mut() {
            m.resolved = topics
                .keys()
                .filter(|t| {
                    m.subscribed_names.iter().any(|n| n == *t)
                        || m.regex.as_ref().is_some_and(|r| r.is_match(t))
                })
                .cloned()
                .collect();
        }
    }

    fn subscribed_counts(&self, topics: &BTreeMap<String, i32>) -> BTreeMap<String, i32> {
        topics
            .iter()
            .filter(|(t, _)| self.subscribes(t))
            .map(|(t, n)| (t.clone(), *n))
            .collect()
    }

    /// A new group epoch, and the target assignment for it.
    fn bump(&mut self) {
        self.epoch += 1;
        self.assignor = self.chosen_assignor();
        let subscriptions: BTreeMap<String, BTreeSet<String>> = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.resolved.clone()))
            .collect();
        self.target = match self.assignor.as_str() {
            "range" => assign_range(&subscriptions, &self.subscribed_topics),
            _ => assign_uniform(&subscriptions, &self.subscribed_topics, &self.target),
        };
        self.assignment_epoch = self.epoch;
    }

    /// The assignor most members ask for (ties to the first in [`ASSIGNORS`]); the default
    /// when none asks.
    fn chosen_assignor(&self) -> String {
        let votes = |a: &str| {
            self.members
                .values()
                .filter(|m| m.server_assignor.as_deref() == Some(a))
                .count()
        };
        ASSIGNORS
            .iter()
            .enumerate()
            .max_by_key(|(i, a)| (votes(a), std::cmp::Reverse(*i)))
            .map_or(ASSIGNORS[0], |(_, a)| a)
            .to_string()
    }

    /// Moves a member one step towards its target (Kafka's CurrentAssignmentBuilder).
    fn reconcile(&mut self, member_id: &str, owned: Option<&Partitions>, now: Instant) {
        let held_by_others: Partitions = self
            .members
            .iter()
            .filter(|(id, _)| id.as_str() != member_id)
            .flat_map(|(_, m)| m.assigned.iter().chain(&m.pending_revocation))
            .cloned()
            .collect();
        let target = self.target.get(member_id).cloned().unwrap_or_default();
        let target_epoch = self.assignment_epoch;
        let Some(m) = self.members.get_mut(member_id) else {
            return;
        };
        if m.state == MemberState::UnrevokedPartitions {
            // Still holds a revoked partition (or did not say): wait.
            if owned.is_none_or(|o| m.pending_revocation.iter().any(|tp| o.contains(tp))) {
                return;
            }
            m.pending_revocation.clear();
            m.revocation_deadline = None;
            m.state = MemberState::Stable;
        }
        if m.epoch == target_epoch && m.state == MemberState::Stable {
            return;
        }
        let revoked: Partitions = m.assigned.difference(&target).cloned().collect();
        let still_owns_revoked = owned.is_none_or(|o| revoked.iter().any(|tp| o.contains(tp)));
        if !revoked.is_empty() && still_owns_revoked {
            m.assigned.retain(|tp| target.contains(tp));
            m.pending_revocation = revoked;
            m.state = MemberState::UnrevokedPartitions;
            m.revocation_deadline = Some(now + m.rebalance_timeout);
            return;
        }
        let wanted: Partitions = target.difference(&m.assigned).cloned().collect();
        let free: Partitions = wanted
            .iter()
            .filter(|tp| !held_by_others.contains(*tp))
            .cloned()
            .collect();
        let unreleased = free.len() < wanted.len();
        m.assigned.retain(|tp| target.contains(tp));
        m.assigned.extend(free);
        if m.epoch != target_epoch {
            m.previous_epoch = m.epoch;
            m.epoch = target_epoch;
        }
        m.state = if unreleased {
            MemberState::UnreleasedPartitions
        } else {
            MemberState::Stable
        };
    }

    /// An offset commit's check (KIP-848): the member exists and sends its current epoch.
    /// `transactional` commits answer ILLEGAL_GENERATION on a mismatch, as Kafka's do.
    pub fn check_commit(
        &self,
        member_id: &str,
        epoch: i32,
        transactional: bool,
    ) -> Result<(), ResponseError> {
        let m = self
            .members
            .get(member_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        if epoch == m.epoch {
            Ok(())
        } else if transactional {
            Err(ResponseError::IllegalGeneration)
        } else if epoch > m.epoch {
            Err(ResponseError::FencedMemberEpoch)
        } else {
            Err(ResponseError::StaleMemberEpoch)
        }
    }
}

/// A subscription as classic members state it (ConsumerProtocolSubscription v0, with its version
/// in front), for the classic protocol's DescribeGroups.
pub fn encode_subscription(topics: &BTreeSet<String>) -> Bytes {
    let s = ConsumerProtocolSubscription::default().with_topics(
        topics
            .iter()
            .map(|t| StrBytes::from_string(t.clone()))
            .collect(),
    );
    encode_versioned(&s)
}

/// An assignment as classic leaders hand it out (ConsumerProtocolAssignment v0).
pub fn encode_assignment(partitions: &Partitions) -> Bytes {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in partitions {
        by_topic.entry(t).or_default().push(*p);
    }
    let a = ConsumerProtocolAssignment::default().with_assigned_partitions(
        by_topic
            .into_iter()
            .map(|(t, ps)| {
                consumer_protocol_assignment::TopicPartition::default()
                    .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partitions(ps)
            })
            .collect(),
    );
    encode_versioned(&a)
}

fn encode_versioned(m: &impl Encodable) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i16(0);
    m.encode(&mut buf, 0).expect("version 0 encodes");
    buf.freeze()
}

/// A subscription regex, anchored as Kafka's (RE2/J `matches`) is: it must match the whole
/// topic name.
fn compile(r: &str) -> Result<regex::Regex, Refusal> {
    regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| {
        refuse(
            ResponseError::InvalidRegularExpression,
            format!("invalid subscription regex {r:?}: {e}"),
        )
    })
}

/// Every partition of `topics` that some member subscribes to.
fn subscribed_partitions(
    subscriptions: &BTreeMap<String, BTreeSet<String>>,
    topics: &BTreeMap<String, i32>,
) -> Vec<TopicPartition> {
    topics
        .iter()
        .filter(|(t, _)| subscriptions.values().any(|s| s.contains(*t)))
        .flat_map(|(t, n)| (0..*n).map(move |p| (t.clone(), p)))
        .collect()
}

/// Kafka's `uniform` assignor: partitions spread evenly over the members subscribed to them,
/// each member keeping what it had in `previous` up to its fair share.
pub fn assign_uniform(
    subscriptions: &BTreeMap<String, BTreeSet<String>>,
    topics: &BTreeMap<String, i32>,
    previous: &BTreeMap<String, Partitions>,
) -> BTreeMap<String, Partitions> {
    let mut out: BTreeMap<String, Partitions> = subscriptions
        .keys()
        .map(|m| (m.clone(), Partitions::new()))
        .collect();
    if subscriptions.is_empty() {
        return out;
    }
    let all = subscribed_partitions(subscriptions, topics);
    let share = all.len() / subscriptions.len();
    let mut one_more = all.len() % subscriptions.len();
    let mut taken = Partitions::new();
    for (member, subscribed) in subscriptions {
        let Some(had) = previous.get(member) else {
            continue;
        };
        let mut kept: Vec<&TopicPartition> = had
            .iter()
            .filter(|(t, p)| subscribed.contains(t) && topics.get(t).is_some_and(|n| p < n))
            .collect();
        let mut quota = share;
        if kept.len() > share && one_more > 0 {
            quota += 1;
            one_more -= 1;
        }
        kept.truncate(quota);
        for tp in kept {
            taken.insert(tp.clone());
            out.get_mut(member).expect("member").insert(tp.clone());
        }
    }
    for tp in all {
        if taken.contains(&tp) {
            continue;
        }
        let least_loaded = subscriptions
            .iter()
            .filter(|(_, s)| s.contains(&tp.0))
            .map(|(m, _)| m)
            .min_by_key(|m| (out[*m].len(), *m))
            .cloned();
        if let Some(m) = least_loaded {
            out.get_mut(&m).expect("member").insert(tp);
        }
    }
    out
}

/// Kafka's `range` assignor: per topic, members subscribed to it in id order take consecutive
/// ranges of partitions, the first ones one more when they do not divide evenly.
pub fn assign_range(
    subscriptions: &BTreeMap<String, BTreeSet<String>>,
    topics: &BTreeMap<String, i32>,
) -> BTreeMap<String, Partitions> {
    let mut out: BTreeMap<String, Partitions> = subscriptions
        .keys()
        .map(|m| (m.clone(), Partitions::new()))
        .collect();
    for (topic, &count) in topics {
        let members: Vec<&String> = subscriptions
            .iter()
            .filter(|(_, s)| s.contains(topic))
            .map(|(m, _)| m)
            .collect();
        if members.is_empty() {
            continue;
        }
        let share = count as usize / members.len();
        let one_more = count as usize % members.len();
        let mut next = 0i32;
        for (i, m) in members.into_iter().enumerate() {
            let len = (share + usize::from(i < one_more)) as i32;
            let partitions = out.get_mut(m).expect("member");
            partitions.extend((next..next + len).map(|p| (topic.clone(), p)));
            next += len;
        }
    }
    out
}

#[cfg(test)]
mod tests;
