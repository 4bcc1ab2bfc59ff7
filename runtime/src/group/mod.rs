//! The consumer group coordinator: membership, rebalances and committed offsets, for groups of
//! Kafka's classic protocol (assignments computed by the group leader, a client) and of its
//! consumer protocol (KIP-848: the coordinator assigns, see [`consumer`]). A group speaks one
//! protocol at a time; an empty group may switch.
//!
//! State per group follows Kafka's state machine: Empty → PreparingRebalance (members join) →
//! CompletingRebalance (the leader computes assignments) → Stable; Dead once deleted. Offsets and
//! group metadata are written to the compacted internal topic `__consumer_offsets` and replayed
//! at start-up (see [`store`]).

pub mod consumer;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::log::manager::LogManager;
use store::{GroupRecord, MemberRecord, OffsetStore};

/// Longest committed-offset metadata string accepted (Kafka's offset.metadata.max.bytes).
pub const MAX_METADATA_LEN: usize = 4096;

#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub initial_rebalance_delay: Duration,
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    pub consumer: consumer::ConsumerSettings,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            initial_rebalance_delay: Duration::from_millis(3000),
            min_session_timeout_ms: 6000,
            max_session_timeout_ms: 1_800_000,
            consumer: consumer::ConsumerSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    /// A consumer-protocol group whose members have not all reached their target assignment.
    Reconciling,
    Dead,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Reconciling => "Reconciling",
            GroupState::Dead => "Dead",
        }
    }
}

/// What a joining member learns when its join completes.
#[derive(Debug, Clone, Default)]
pub struct JoinOutcome {
    pub error: Option<ResponseError>,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Filled for the leader only: (member id, group instance id, protocol metadata).
    pub members: Vec<(String, Option<String>, Bytes)>,
}

impl JoinOutcome {
    fn error(e: ResponseError, member_id: &str) -> Self {
        JoinOutcome {
            error: Some(e),
            generation: -1,
            member_id: member_id.to_string(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SyncOutcome {
    pub error: Option<ResponseError>,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

impl SyncOutcome {
    fn error(e: ResponseError) -> Self {
        SyncOutcome {
            error: Some(e),
            ..Default::default()
        }
    }
}

/// A join request's fields.
pub struct JoinRequest {
    pub group_id: String,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a new dynamic member first gets MEMBER_ID_REQUIRED with its id (KIP-394).
    pub require_known_member_id: bool,
}

pub struct Member {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    heartbeat_deadline: Instant,
    awaiting_join: Option<oneshot::Sender<JoinOutcome>>,
    awaiting_sync: Option<oneshot::Sender<SyncOutcome>>,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp: i64,
}

pub struct Group {
    pub id: String,
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not yet joined, and when they expire.
    pending_members: HashMap<String, Instant>,
    /// group.instance.id → member id (static membership, KIP-345).
    static_members: HashMap<String, String>,
    pub offsets: BTreeMap<(String, i32), CommittedOffset>,
    rebalance_deadline: Option<Instant>,
    initial_delay_until: Option<Instant>,
    /// Set while the group speaks the consumer protocol (KIP-848).
    pub consumer: Option<consumer::ConsumerGroup>,
}

/// A member as the classic protocol's APIs describe it, whichever protocol the group speaks.
pub struct MemberView {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// The subscription (ConsumerProtocolSubscription bytes for consumers).
    pub metadata: Bytes,
    /// The assignment (ConsumerProtocolAssignment bytes for consumers).
    pub assignment: Bytes,
}

impl Group {
    fn new(id: &str) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol_name: None,
            leader: None,
            members: BTreeMap::new(),
            pending_members: HashMap::new(),
            static_members: HashMap::new(),
            offsets: BTreeMap::new(),
            rebalance_deadline: None,
            initial_delay_until: None,
            consumer: None,
        }
    }

    /// KIP-848's group type: "consumer" (assigned by the coordinator) or "classic".
    pub fn group_type(&self) -> &'static str {
        if self.consumer.is_some() {
            "consumer"
        } else {
            "classic"
        }
    }

    /// Whether the group has no members, in either protocol.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.consumer.as_ref().is_none_or(|c| c.members.is_empty())
    }

    /// Every member, described as the classic protocol does.
    pub fn member_views(&self) -> Vec<MemberView> {
        if let Some(c) = &self.consumer {
            return c
                .members
                .values()
                .map(|m| MemberView {
                    member_id: m.member_id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: consumer::encode_subscription(&m.resolved),
                    assignment: consumer::encode_assignment(&m.assigned),
                })
                .collect();
        }
        let protocol = self.protocol_name.clone().unwrap_or_default();
        self.members
            .values()
            .map(|m| MemberView {
                member_id: m.member_id.clone(),
                group_instance_id: m.group_instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                metadata: m.metadata_for(&protocol),
                assignment: m.assignment.clone(),
            })
            .collect()
    }

    /// Follows a consumer-protocol group's state after a change.
    fn consumer_changed(&mut self) {
        if let Some(c) = &self.consumer {
            self.state = c.state();
            self.generation = c.epoch;
            self.protocol_name = Some(c.assignor.clone());
        }
    }

    /// The protocols every member supports, in the order of the first member's preference.
    fn common_protocols(&self, extra: Option<&[(String, Bytes)]>) -> Vec<String> {
        let mut lists: Vec<Vec<&str>> = self
            .members
            .values()
            .map(|m| m.protocols.iter().map(|(n, _)| n.as_str()).collect())
            .collect();
        if let Some(e) = extra {
            lists.push(e.iter().map(|(n, _)| n.as_str()).collect());
        }
        let Some(first) = lists.first() else {
            return vec![];
        };
        first
            .iter()
            .filter(|p| lists.iter().all(|l| l.contains(p)))
            .map(|p| p.to_string())
            .collect()
    }

    /// Kafka's vote: each member picks its most preferred protocol that all support.
    fn select_protocol(&self) -> Option<String> {
        let candidates = self.common_protocols(None);
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some((n, _)) = m.protocols.iter().find(|(n, _)| candidates.contains(n)) {
                *votes.entry(n.as_str()).or_default() += 1;
            }
        }
        // Highest vote wins; ties go to the earliest in the common preference order.
        candidates
            .iter()
            .max_by_key(|c| {
                (
                    votes.get(c.as_str()).copied().unwrap_or(0),
                    std::cmp::Reverse(candidates.iter().position(|x| x == *c)),
                )
            })
            .cloned()
    }

    fn record(&self) -> GroupRecord {
        GroupRecord {
            protocol_type: self.protocol_type.clone(),
            generation: self.generation,
            protocol: self.protocol_name.clone(),
            leader: self.leader.clone(),
            members: self
                .members
                .values()
                .map(|m| MemberRecord {
                    member_id: m.member_id.clone(),
                    group_instance_id: m.group_instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    session_timeout_ms: m.session_timeout.as_millis() as i32,
                    rebalance_timeout_ms: m.rebalance_timeout.as_millis() as i32,
                    subscription: m
                        .metadata_for(self.protocol_name.as_deref().unwrap_or_default())
                        .to_vec(),
                    assignment: m.assignment.to_vec(),
                })
                .collect(),
            consumer: self.consumer.as_ref().map(|c| c.record()),
        }
    }
}

pub struct GroupCoordinator {
    groups: Mutex<HashMap<String, Group>>,
    /// Offsets committed in open transactions, per producer id: (group, partition, offset).
    pending_txn: Mutex<HashMap<i64, Vec<PendingOffset>>>,
    store: OffsetStore,
    settings: GroupSettings,
    /// Whether this node coordinates groups (always, for a single node).
    active: AtomicBool,
}

type PendingOffset = (String, (String, i32), CommittedOffset);

/// An offset to commit for one partition.
pub type PartitionOffset = ((String, i32), CommittedOffset);

/// Result of a commit for one partition.
pub type PartitionResult = ((String, i32), Option<ResponseError>);

/// Per partition of a commit: the error, or None when the offset is accepted.
fn screen_offsets(
    offsets: Vec<PartitionOffset>,
    topic_exists: impl Fn(&str, i32) -> bool,
) -> (Vec<PartitionResult>, Vec<PartitionOffset>) {
    let mut results = Vec::with_capacity(offsets.len());
    let mut accepted = Vec::new();
    for (tp, off) in offsets {
        let err = if !topic_exists(&tp.0, tp.1) {
            Some(ResponseError::UnknownTopicOrPartition)
        } else if off.metadata.len() > MAX_METADATA_LEN {
            Some(ResponseError::OffsetMetadataTooLarge)
        } else {
            None
        };
        if err.is_none() {
            accepted.push((tp.clone(), off));
        }
        results.push((tp, err));
    }
    (results, accepted)
}

impl GroupCoordinator {
    /// Opens the coordinator, replaying `__consumer_offsets`.
    pub fn open(log: Arc<LogManager>, settings: GroupSettings) -> anyhow::Result<GroupCoordinator> {
        let store = OffsetStore::open(log)?;
        let (groups, pending_txn) = Self::load(&store, &settings.consumer)?;
        Ok(GroupCoordinator {
            groups: Mutex::new(groups),
            pending_txn: Mutex::new(pending_txn),
            store,
            settings,
            active: AtomicBool::new(true),
        })
    }

    /// Replays `__consumer_offsets` into groups and offsets pending in transactions.
    #[allow(clippy::type_complexity)]
    fn load(
        store: &OffsetStore,
        consumer_settings: &consumer::ConsumerSettings,
    ) -> anyhow::Result<(HashMap<String, Group>, HashMap<i64, Vec<PendingOffset>>)> {
        let mut groups: HashMap<String, Group> = HashMap::new();
        let mut pending_txn: HashMap<i64, Vec<PendingOffset>> = HashMap::new();
        let now = Instant::now();
        store.replay(|event| match event {
            store::Replayed::Pending {
                producer_id,
                group,
                topic,
                partition,
                value,
            } => {
                pending_txn
                    .entry(producer_id)
                    .or_default()
                    .push((group, (topic, partition), value))
            }
            store::Replayed::Offset {
                group,
                topic,
                partition,
                value,
            } => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group));
                match value {
                    Some(v) => {
                        g.offsets.insert((topic, partition), v);
                    }
                    None => {
                        g.offsets.remove(&(topic, partition));
                    }
                }
            }
            store::Replayed::Group { group, value } => match value {
                Some(rec) => {
                    let g = groups
                        .entry(group.clone())
                        .or_insert_with(|| Group::new(&group));
                    g.generation = rec.generation;
                    g.protocol_type = rec.protocol_type;
                    g.protocol_name = rec.protocol;
                    g.leader = rec.leader;
                    g.members.clear();
                    g.static_members.clear();
                    for m in rec.members {
                        let session = Duration::from_millis(m.session_timeout_ms.max(0) as u64);
                        if let Some(i) = &m.group_instance_id {
                            g.static_members.insert(i.clone(), m.member_id.clone());
                        }
                        let protocol = g.protocol_name.clone().unwrap_or_default();
                        g.members.insert(
                            m.member_id.clone(),
                            Member {
                                member_id: m.member_id,
                                group_instance_id: m.group_instance_id,
                                client_id: m.client_id,
                                client_host: m.client_host,
                                session_timeout: session,
                                rebalance_timeout: Duration::from_millis(
                                    m.rebalance_timeout_ms.max(0) as u64,
                                ),
                                protocols: vec![(protocol, Bytes::from(m.subscription))],
                                assignment: Bytes::from(m.assignment),
                                // Members get a full session to come back after a restart.
                                heartbeat_deadline: now + session,
                                awaiting_join: None,
                                awaiting_sync: None,
                            },
                        );
                    }
                    g.state = if g.members.is_empty() {
                        GroupState::Empty
                    } else {
                        GroupState::Stable
                    };
                    g.consumer = rec
                        .consumer
                        .map(|c| consumer::ConsumerGroup::from_record(c, consumer_settings, now));
                    g.consumer_changed();
                }
                None => {
                    // A deleted group: its offsets were tombstoned too.
                    groups.remove(&group);
                }
            },
        })?;
        tracing::info!(groups = groups.len(), "consumer groups loaded");
        Ok((groups, pending_txn))
    }

    /// In a cluster, only the leader of `__consumer_offsets` coordinates groups: this node
    /// takes over (replaying the topic as this replica holds it) or hands over.
    pub fn set_active(&self, active: bool) -> anyhow::Result<()> {
        if active == self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        if active {
            let (groups, pending) = Self::load(&self.store, &self.settings.consumer)?;
            *self.groups.lock() = groups;
            *self.pending_txn.lock() = pending;
        } else {
            // Members waiting on a join or sync learn at once that they must look again.
            for g in self.groups.lock().values_mut() {
                for m in g.members.values_mut() {
                    if let Some(tx) = m.awaiting_join.take() {
                        let _ = tx.send(JoinOutcome::error(
                            ResponseError::NotCoordinator,
                            &m.member_id,
                        ));
                    }
                    if let Some(tx) = m.awaiting_sync.take() {
                        let _ = tx.send(SyncOutcome::error(ResponseError::NotCoordinator));
                    }
                }
            }
            self.groups.lock().clear();
            self.pending_txn.lock().clear();
        }
        self.active.store(active, Ordering::Release);
        tracing::info!(active, "group coordinator");
        Ok(())
    }

    /// NOT_COORDINATOR while another node coordinates groups.
    /// Whether this node coordinates groups now (always on a single node).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn check_active(&self) -> Result<(), ResponseError> {
        if self.active.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(ResponseError::NotCoordinator)
        }
    }

    fn persist_group(&self, g: &Group) {
        if let Err(e) = self.store.write_group(&g.id, Some(&g.record())) {
            tracing::error!(group = %g.id, error = %e, "cannot persist group metadata");
        }
    }

    /// Moves a group into PreparingRebalance (Kafka's prepareRebalance).
    fn prepare_rebalance(&self, g: &mut Group, now: Instant) {
        if g.state == GroupState::CompletingRebalance {
            for m in g.members.values_mut() {
                m.assignment = Bytes::new();
                if let Some(tx) = m.awaiting_sync.take() {
                    let _ = tx.send(SyncOutcome::error(ResponseError::RebalanceInProgress));
                }
            }
        }
        let was_empty = g.state == GroupState::Empty;
        g.state = GroupState::PreparingRebalance;
        let timeout = g
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        g.rebalance_deadline = Some(now + timeout);
        g.initial_delay_until = was_empty.then(|| now + self.settings.initial_rebalance_delay);
        tracing::debug!(group = %g.id, members = g.members.len(), "preparing rebalance");
    }

    /// Completes the join phase when every member has rejoined (after the initial delay), or at
    /// the rebalance deadline, dropping members that did not rejoin.
    fn maybe_complete_join(&self, g: &mut Group, now: Instant) {
        if g.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined = g.members.values().all(|m| m.awaiting_join.is_some());
        let delay_over = g.initial_delay_until.is_none_or(|t| now >= t);
        let deadline_passed = g.rebalance_deadline.is_some_and(|t| now >= t);
        if !((all_joined && delay_over) || deadline_passed) {
            return;
        }
        let missing: Vec<String> = g
            .members
            .iter()
            .filter(|(_, m)| m.awaiting_join.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in missing {
            self.remove_member(g, &id);
        }
        g.rebalance_deadline = None;
        g.initial_delay_until = None;
        if g.members.is_empty() {
            g.state = GroupState::Empty;
            g.generation += 1;
            g.leader = None;
            g.protocol_name = None;
            self.persist_group(g);
            return;
        }
        g.generation += 1;
        g.protocol_name = g.select_protocol();
        if g.leader.as_ref().is_none_or(|l| !g.members.contains_key(l)) {
            g.leader = g.members.keys().next().cloned();
        }
        g.state = GroupState::CompletingRebalance;
        let protocol = g.protocol_name.clone().unwrap_or_default();
        let leader = g.leader.clone().unwrap_or_default();
        let all: Vec<(String, Option<String>, Bytes)> = g
            .members
            .values()
            .map(|m| {
                (
                    m.member_id.clone(),
                    m.group_instance_id.clone(),
                    m.metadata_for(&protocol),
                )
            })
            .collect();
        for m in g.members.values_mut() {
            m.heartbeat_deadline = now + m.session_timeout;
            if let Some(tx) = m.awaiting_join.take() {
                let _ = tx.send(JoinOutcome {
                    error: None,
                    generation: g.generation,
                    protocol_type: g.protocol_type.clone(),
                    protocol_name: g.protocol_name.clone(),
                    leader: leader.clone(),
                    member_id: m.member_id.clone(),
                    members: if m.member_id == leader {
                        all.clone()
                    } else {
                        vec![]
                    },
                });
            }
        }
        tracing::info!(group = %g.id, generation = g.generation, members = g.members.len(), protocol = %protocol, "rebalance: join complete");
    }

    fn remove_member(&self, g: &mut Group, member_id: &str) {
        if let Some(mut m) = g.members.remove(member_id) {
            if let Some(i) = &m.group_instance_id {
                if g.static_members.get(i).is_some_and(|id| id == member_id) {
                    g.static_members.remove(i);
                }
            }
            if let Some(tx) = m.awaiting_join.take() {
                let _ = tx.send(JoinOutcome::error(
                    ResponseError::UnknownMemberId,
                    member_id,
                ));
            }
            if let Some(tx) = m.awaiting_sync.take() {
                let _ = tx.send(SyncOutcome::error(ResponseError::UnknownMemberId));
            }
        }
        if g.leader.as_deref() == Some(member_id) {
            g.leader = None;
        }
    }

    /// After members left or expired: rebalance, finish a pending join, or become Empty.
    fn membership_changed(&self, g: &mut Group, now: Instant) {
        match g.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                if g.members.is_empty() {
                    g.state = GroupState::Empty;
                    g.generation += 1;
                    g.leader = None;
                    g.protocol_name = None;
                    self.persist_group(g);
                } else {
                    self.prepare_rebalance(g, now);
                }
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(g, now),
            // Reconciling is a consumer-protocol state; classic members are not in such groups.
            GroupState::Empty | GroupState::Dead | GroupState::Reconciling => {}
        }
    }

    /// Handles JoinGroup; the returned receiver yields the outcome once the join completes.
    pub fn join(&self, req: JoinRequest) -> oneshot::Receiver<JoinOutcome> {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let reply = |outcome: JoinOutcome| {
            let (tx2, rx2) = oneshot::channel();
            let _ = tx2.send(outcome);
            rx2
        };
        if let Err(e) = self.check_active() {
            return reply(JoinOutcome::error(e, &req.member_id));
        }
        if !(self.settings.min_session_timeout_ms..=self.settings.max_session_timeout_ms)
            .contains(&req.session_timeout_ms)
        {
            return reply(JoinOutcome::error(
                ResponseError::InvalidSessionTimeout,
                &req.member_id,
            ));
        }
        if req.group_id.is_empty() {
            return reply(JoinOutcome::error(
                ResponseError::InvalidGroupId,
                &req.member_id,
            ));
        }
        let mut groups = self.groups.lock();
        let g = groups
            .entry(req.group_id.clone())
            .or_insert_with(|| Group::new(&req.group_id));
        if g.state == GroupState::Dead {
            return reply(JoinOutcome::error(
                ResponseError::CoordinatorNotAvailable,
                &req.member_id,
            ));
        }
        if let Some(c) = &g.consumer {
            if !c.members.is_empty() {
                return reply(JoinOutcome::error(
                    ResponseError::InconsistentGroupProtocol,
                    &req.member_id,
                ));
            }
            g.consumer = None;
            g.state = GroupState::Empty;
            g.protocol_name = None;
        }
        let protocol_mismatch = !g.members.is_empty()
            && (g.protocol_type.as_deref() != Some(req.protocol_type.as_str())
                || g.common_protocols(Some(&req.protocols)).is_empty());
        if req.protocols.is_empty() || protocol_mismatch {
            return reply(JoinOutcome::error(
                ResponseError::InconsistentGroupProtocol,
                &req.member_id,
            ));
        }
        let session = Duration::from_millis(req.session_timeout_ms as u64);
        let rebalance =
            Duration::from_millis(req.rebalance_timeout_ms.max(req.session_timeout_ms) as u64);
        let mut member_id = req.member_id.clone();

        if member_id.is_empty() {
            member_id = format!(
                "{}-{}",
                if req.client_id.is_empty() {
                    "member"
                } else {
                    &req.client_id
                },
                uuid::Uuid::new_v4()
            );
            match &req.group_instance_id {
                Some(instance) => {
                    if let Some(old_id) = g.static_members.get(instance).cloned() {
                        // A static member restarted: the new id replaces (fences) the old one,
                        // and in a Stable group with unchanged protocols no rebalance happens.
                        if let Some(mut old) = g.members.remove(&old_id) {
                            if let Some(t) = old.awaiting_join.take() {
                                let _ = t.send(JoinOutcome::error(
                                    ResponseError::FencedInstanceId,
                                    &old_id,
                                ));
                            }
                            if let Some(t) = old.awaiting_sync.take() {
                                let _ = t.send(SyncOutcome::error(ResponseError::FencedInstanceId));
                            }
                            let same = old.protocols == req.protocols;
                            old.member_id = member_id.clone();
                            old.protocols = req.protocols.clone();
                            old.session_timeout = session;
                            old.rebalance_timeout = rebalance;
                            old.heartbeat_deadline = now + session;
                            old.client_id = req.client_id.clone();
                            old.client_host = req.client_host.clone();
                            g.members.insert(member_id.clone(), old);
                            g.static_members.insert(instance.clone(), member_id.clone());
                            if g.leader.as_deref() == Some(old_id.as_str()) {
                                g.leader = Some(member_id.clone());
                            }
                            if g.state == GroupState::Stable && same {
                                self.persist_group(g);
                                let leader = g.leader.clone().unwrap_or_default();
                                return reply(JoinOutcome {
                                    error: None,
                                    generation: g.generation,
                                    protocol_type: g.protocol_type.clone(),
                                    protocol_name: g.protocol_name.clone(),
                                    leader,
                                    member_id,
                                    members: vec![],
                                });
                            }
                            let m = g.members.get_mut(&member_id).unwrap();
                            m.awaiting_join = Some(tx);
                            if g.state != GroupState::PreparingRebalance {
                                self.prepare_rebalance(g, now);
                            }
                            self.maybe_complete_join(g, now);
                            return rx;
                        }
                    }
                }
                None if req.require_known_member_id => {
                    g.pending_members.insert(member_id.clone(), now + session);
                    return reply(JoinOutcome::error(
                        ResponseError::MemberIdRequired,
                        &member_id,
                    ));
                }
                None => {}
            }
            self.add_member(g, &req, member_id, session, rebalance, tx, now);
            return rx;
        }

        if g.pending_members.remove(&member_id).is_some() {
            self.add_member(g, &req, member_id, session, rebalance, tx, now);
            return rx;
        }
        if let Some(instance) = &req.group_instance_id {
            if g.static_members
                .get(instance)
                .is_some_and(|id| *id != member_id)
            {
                return reply(JoinOutcome::error(
                    ResponseError::FencedInstanceId,
                    &member_id,
                ));
            }
        }
        let Some(m) = g.members.get_mut(&member_id) else {
            return reply(JoinOutcome::error(
                ResponseError::UnknownMemberId,
                &member_id,
            ));
        };
        let changed = m.protocols != req.protocols;
        m.protocols = req.protocols.clone();
        m.session_timeout = session;
        m.rebalance_timeout = rebalance;
        m.heartbeat_deadline = now + session;
        let is_leader = g.leader.as_deref() == Some(member_id.as_str());
        match g.state {
            GroupState::PreparingRebalance => {
                m.awaiting_join = Some(tx);
                self.maybe_complete_join(g, now);
            }
            GroupState::CompletingRebalance | GroupState::Stable
                if !(changed || is_leader && g.state == GroupState::Stable) =>
            {
                // The member missed its join response, or rejoined without changes.
                let leader = g.leader.clone().unwrap_or_default();
                let members = if is_leader {
                    let protocol = g.protocol_name.clone().unwrap_or_default();
                    g.members
                        .values()
                        .map(|m| {
                            (
                                m.member_id.clone(),
                                m.group_instance_id.clone(),
                                m.metadata_for(&protocol),
                            )
                        })
                        .collect()
                } else {
                    vec![]
                };
                let _ = tx.send(JoinOutcome {
                    error: None,
                    generation: g.generation,
                    protocol_type: g.protocol_type.clone(),
                    protocol_name: g.protocol_name.clone(),
                    leader,
                    member_id,
                    members,
                });
            }
            _ => {
                m.awaiting_join = Some(tx);
                self.prepare_rebalance(g, now);
                self.maybe_complete_join(g, now);
            }
        }
        rx
    }

    #[allow(clippy::too_many_arguments)]
    fn add_member(
        &self,
        g: &mut Group,
        req: &JoinRequest,
        member_id: String,
        session: Duration,
        rebalance: Duration,
        tx: oneshot::Sender<JoinOutcome>,
        now: Instant,
    ) {
        if g.members.is_empty() {
            g.protocol_type = Some(req.protocol_type.clone());
        }
        if let Some(i) = &req.group_instance_id {
            g.static_members.insert(i.clone(), member_id.clone());
        }
        g.members.insert(
            member_id.clone(),
            Member {
                member_id,
                group_instance_id: req.group_instance_id.clone(),
                client_id: req.client_id.clone(),
                client_host: req.client_host.clone(),
                session_timeout: session,
                rebalance_timeout: rebalance,
                protocols: req.protocols.clone(),
                assignment: Bytes::new(),
                heartbeat_deadline: now + session,
                awaiting_join: Some(tx),
                awaiting_sync: None,
            },
        );
        if g.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(g, now);
        }
        self.maybe_complete_join(g, now);
    }

    /// Checks member id, static instance id and generation as Kafka does.
    fn check_member(
        g: &Group,
        member_id: &str,
        instance: Option<&str>,
        generation: i32,
    ) -> Result<(), ResponseError> {
        if let Some(i) = instance {
            if g.static_members.get(i).is_some_and(|id| id != member_id) {
                return Err(ResponseError::FencedInstanceId);
            }
        }
        if !g.members.contains_key(member_id) {
            return Err(ResponseError::UnknownMemberId);
        }
        if generation != g.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &self,
        group_id: &str,
        member_id: &str,
        instance: Option<&str>,
        generation: i32,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
    ) -> oneshot::Receiver<SyncOutcome> {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.check_active() {
            let _ = tx.send(SyncOutcome::error(e));
            return rx;
        }
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group_id) else {
            let _ = tx.send(SyncOutcome::error(ResponseError::UnknownMemberId));
            return rx;
        };
        if let Err(e) = Self::check_member(g, member_id, instance, generation) {
            let _ = tx.send(SyncOutcome::error(e));
            return rx;
        }
        if protocol_type.is_some_and(|p| Some(p) != g.protocol_type.as_deref())
            || protocol_name.is_some_and(|p| Some(p) != g.protocol_name.as_deref())
        {
            let _ = tx.send(SyncOutcome::error(ResponseError::InconsistentGroupProtocol));
            return rx;
        }
        let now = Instant::now();
        if let Some(m) = g.members.get_mut(member_id) {
            m.heartbeat_deadline = now + m.session_timeout;
        }
        match g.state {
            GroupState::PreparingRebalance => {
                let _ = tx.send(SyncOutcome::error(ResponseError::RebalanceInProgress));
            }
            GroupState::Stable => {
                let m = &g.members[member_id];
                let _ = tx.send(SyncOutcome {
                    error: None,
                    protocol_type: g.protocol_type.clone(),
                    protocol_name: g.protocol_name.clone(),
                    assignment: m.assignment.clone(),
                });
            }
            GroupState::CompletingRebalance => {
                g.members.get_mut(member_id).unwrap().awaiting_sync = Some(tx);
                if g.leader.as_deref() == Some(member_id) {
                    let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
                    for m in g.members.values_mut() {
                        m.assignment = given.remove(&m.member_id).unwrap_or_default();
                    }
                    g.state = GroupState::Stable;
                    self.persist_group(g);
                    for m in g.members.values_mut() {
                        if let Some(t) = m.awaiting_sync.take() {
                            let _ = t.send(SyncOutcome {
                                error: None,
                                protocol_type: g.protocol_type.clone(),
                                protocol_name: g.protocol_name.clone(),
                                assignment: m.assignment.clone(),
                            });
                        }
                    }
                    tracing::info!(group = %g.id, generation = g.generation, "rebalance: group is stable");
                }
            }
            GroupState::Empty | GroupState::Dead | GroupState::Reconciling => {
                let _ = tx.send(SyncOutcome::error(ResponseError::UnknownMemberId));
            }
        }
        rx
    }

    pub fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        instance: Option<&str>,
        generation: i32,
    ) -> Option<ResponseError> {
        if let Err(e) = self.check_active() {
            return Some(e);
        }
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group_id) else {
            return Some(ResponseError::UnknownMemberId);
        };
        if let Err(e) = Self::check_member(g, member_id, instance, generation) {
            return Some(e);
        }
        let m = g.members.get_mut(member_id).unwrap();
        m.heartbeat_deadline = Instant::now() + m.session_timeout;
        match g.state {
            GroupState::PreparingRebalance => Some(ResponseError::RebalanceInProgress),
            GroupState::Empty | GroupState::Dead => Some(ResponseError::UnknownMemberId),
            _ => None,
        }
    }

    /// Handles a ConsumerGroupHeartbeat (KIP-848). `topics` holds every topic a subscription
    /// may name, with its partition count. An empty classic group becomes a consumer-protocol
    /// group; one with classic members refuses.
    pub fn consumer_heartbeat(
        &self,
        group_id: &str,
        hb: consumer::Heartbeat,
        topics: &BTreeMap<String, i32>,
    ) -> Result<consumer::HeartbeatReply, consumer::Refusal> {
        if let Err(e) = self.check_active() {
            return Err(consumer::refuse(e, "this node does not coordinate groups"));
        }
        if group_id.is_empty() {
            return Err(consumer::refuse(
                ResponseError::InvalidRequest,
                "the group id must not be empty",
            ));
        }
        let mut groups = self.groups.lock();
        if hb.member_epoch != 0 && groups.get(group_id).is_none_or(|g| g.consumer.is_none()) {
            // Unknown here (never joined, or this coordinator took over since): join again.
            return Err(consumer::refuse(
                ResponseError::UnknownMemberId,
                format!("member {} is not in group {group_id}", hb.member_id),
            ));
        }
        let g = groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id));
        if g.consumer.is_none() {
            if !g.members.is_empty() {
                return Err(consumer::refuse(
                    ResponseError::GroupIdNotFound,
                    format!("group {group_id} has members of the classic protocol; it is not a consumer group"),
                ));
            }
            g.consumer = Some(consumer::ConsumerGroup::new(g.generation));
            g.protocol_type = Some("consumer".into());
            g.leader = None;
        }
        let c = g.consumer.as_mut().expect("consumer group");
        let epoch = c.epoch;
        let reply = c.heartbeat(hb, topics, &self.settings.consumer, Instant::now());
        if c.epoch != epoch {
            tracing::info!(group = group_id, epoch = c.epoch, members = c.members.len(), assignor = %c.assignor, "new group epoch and target assignment");
        }
        g.consumer_changed();
        if reply.as_ref().is_ok_and(|r| r.changed) {
            self.persist_group(g);
        }
        reply
    }

    pub fn consumer_settings(&self) -> consumer::ConsumerSettings {
        self.settings.consumer
    }

    /// Removes members; returns a per-member error (None = left).
    pub fn leave(
        &self,
        group_id: &str,
        leaving: &[(String, Option<String>)],
    ) -> Result<Vec<Option<ResponseError>>, ResponseError> {
        self.check_active()?;
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group_id) else {
            return Err(ResponseError::UnknownMemberId);
        };
        let now = Instant::now();
        let mut results = Vec::with_capacity(leaving.len());
        let mut changed = false;
        for (member_id, instance) in leaving {
            let id = match instance {
                Some(i) => match g.static_members.get(i) {
                    Some(id) if member_id.is_empty() || id == member_id => Some(id.clone()),
                    Some(_) => {
                        results.push(Some(ResponseError::FencedInstanceId));
                        continue;
                    }
                    None => None,
                },
                None => g.members.contains_key(member_id).then(|| member_id.clone()),
            };
            match id {
                Some(id) => {
                    self.remove_member(g, &id);
                    changed = true;
                    results.push(None);
                }
                None => {
                    // A member that never got past MEMBER_ID_REQUIRED may leave too.
                    let pending = g.pending_members.remove(member_id).is_some();
                    results.push((!pending).then_some(ResponseError::UnknownMemberId));
                }
            }
        }
        if changed {
            self.membership_changed(g, now);
        }
        Ok(results)
    }

    /// Commits offsets; `generation < 0` with no member is a standalone (simple) consumer.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &self,
        group_id: &str,
        member_id: &str,
        instance: Option<&str>,
        generation: i32,
        offsets: Vec<PartitionOffset>,
        topic_exists: impl Fn(&str, i32) -> bool,
    ) -> Result<Vec<PartitionResult>, ResponseError> {
        self.check_active()?;
        if group_id.is_empty() {
            return Err(ResponseError::InvalidGroupId);
        }
        let mut groups = self.groups.lock();
        let g = match groups.get_mut(group_id) {
            Some(g) => g,
            None if generation < 0 => groups
                .entry(group_id.to_string())
                .or_insert_with(|| Group::new(group_id)),
            None => return Err(ResponseError::UnknownMemberId),
        };
        let simple = generation < 0 && g.is_empty();
        if let Some(c) = g.consumer.as_mut().filter(|_| !simple) {
            c.check_commit(member_id, generation, false)?;
        } else if !simple {
            Self::check_member(g, member_id, instance, generation)?;
            if g.state == GroupState::CompletingRebalance {
                return Err(ResponseError::RebalanceInProgress);
            }
            let m = g.members.get_mut(member_id).unwrap();
            m.heartbeat_deadline = Instant::now() + m.session_timeout;
        }
        let (results, accepted) = screen_offsets(offsets, topic_exists);
        if let Err(e) = self.store.write_offsets(group_id, &accepted) {
            tracing::error!(group = group_id, error = %e, "cannot persist offsets");
            // As Kafka answers: the client looks the coordinator up again and retries.
            return Err(ResponseError::NotCoordinator);
        }
        crate::metrics::get()
            .offset_commits
            .with_label_values(&[group_id])
            .inc_by(accepted.len() as u64);
        for (tp, off) in accepted {
            g.offsets.insert(tp, off);
        }
        Ok(results)
    }

    /// Commits offsets inside a producer's transaction (TxnOffsetCommit): written now, visible
    /// when the transaction commits. A member id and generation, when given, are checked as for
    /// a plain commit (KIP-447).
    #[allow(clippy::too_many_arguments)]
    pub fn txn_commit(
        &self,
        group_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        member_id: &str,
        instance: Option<&str>,
        generation: i32,
        offsets: Vec<PartitionOffset>,
        topic_exists: impl Fn(&str, i32) -> bool,
    ) -> Result<Vec<PartitionResult>, ResponseError> {
        self.check_active()?;
        if group_id.is_empty() {
            return Err(ResponseError::InvalidGroupId);
        }
        {
            let groups = self.groups.lock();
            if let Some(g) = groups.get(group_id) {
                if let Some(c) = g.consumer.as_ref().filter(|c| !c.members.is_empty()) {
                    if generation >= 0 {
                        c.check_commit(member_id, generation, true)?;
                    }
                } else if generation >= 0 && !g.members.is_empty() {
                    Self::check_member(g, member_id, instance, generation)?;
                }
            }
        }
        let (results, accepted) = screen_offsets(offsets, topic_exists);
        if let Err(e) =
            self.store
                .write_txn_offsets(group_id, producer_id, producer_epoch, &accepted)
        {
            tracing::debug!(group = group_id, error = %e, "transactional offset commit refused");
            return Err(crate::kafka::coordinator_error(
                crate::kafka::append_error_code(&e),
            ));
        }
        let mut pending = self.pending_txn.lock();
        let entry = pending.entry(producer_id).or_default();
        for (tp, off) in accepted {
            entry.push((group_id.to_string(), tp, off));
        }
        Ok(results)
    }

    /// Applies (commit) or drops (abort) the offsets a producer's transaction committed, once
    /// its marker is in `__consumer_offsets`.
    pub fn complete_txn(&self, producer_id: i64, commit: bool) {
        let Some(entries) = self.pending_txn.lock().remove(&producer_id) else {
            return;
        };
        if !commit {
            return;
        }
        let mut groups = self.groups.lock();
        for (group_id, tp, off) in entries {
            crate::metrics::get()
                .offset_commits
                .with_label_values(&[&group_id])
                .inc();
            groups
                .entry(group_id.clone())
                .or_insert_with(|| Group::new(&group_id))
                .offsets
                .insert(tp, off);
        }
    }

    /// Whether an open transaction holds an offset for this group and partition (OffsetFetch
    /// with require_stable answers UNSTABLE_OFFSET_COMMIT then).
    pub fn has_pending_txn_offset(&self, group_id: &str, topic: &str, partition: i32) -> bool {
        self.pending_txn
            .lock()
            .values()
            .flatten()
            .any(|(g, tp, _)| g == group_id && tp.0 == topic && tp.1 == partition)
    }

    /// Committed offsets of a group: all, or those of the given partitions (None if absent).
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        wanted: Option<Vec<(String, i32)>>,
    ) -> Vec<((String, i32), Option<CommittedOffset>)> {
        let groups = self.groups.lock();
        let g = groups.get(group_id);
        match wanted {
            Some(tps) => tps
                .into_iter()
                .map(|tp| {
                    let off = g.and_then(|g| g.offsets.get(&tp).cloned());
                    (tp, off)
                })
                .collect(),
            None => g
                .map(|g| {
                    g.offsets
                        .iter()
                        .map(|(tp, o)| (tp.clone(), Some(o.clone())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// (group id, protocol type, state) of every group.
    pub fn list(&self) -> Vec<(String, String, GroupState)> {
        let groups = self.groups.lock();
        let mut out: Vec<_> = groups
            .values()
            .filter(|g| g.state != GroupState::Dead)
            .map(|g| {
                (
                    g.id.clone(),
                    g.protocol_type.clone().unwrap_or_default(),
                    g.state,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Runs `f` on the group if it exists.
    pub fn with_group<R>(&self, group_id: &str, f: impl FnOnce(&Group) -> R) -> Option<R> {
        self.groups.lock().get(group_id).map(f)
    }

    /// Deletes an empty group and its offsets.
    pub fn delete_group(&self, group_id: &str) -> Option<ResponseError> {
        if let Err(e) = self.check_active() {
            return Some(e);
        }
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group_id) else {
            return Some(ResponseError::GroupIdNotFound);
        };
        if !g.is_empty() {
            return Some(ResponseError::NonEmptyGroup);
        }
        let tps: Vec<(String, i32)> = g.offsets.keys().cloned().collect();
        if let Err(e) = self
            .store
            .delete_offsets(group_id, &tps)
            .and_then(|_| self.store.write_group(group_id, None))
        {
            tracing::error!(group = group_id, error = %e, "cannot delete group");
            return Some(ResponseError::KafkaStorageError);
        }
        g.state = GroupState::Dead;
        groups.remove(group_id);
        tracing::info!(group = group_id, "deleted group");
        None
    }

    /// Deletes committed offsets of partitions the group is not consuming.
    pub fn delete_offsets(
        &self,
        group_id: &str,
        tps: Vec<(String, i32)>,
        subscribed: impl Fn(&Group, &str) -> bool,
    ) -> Result<Vec<PartitionResult>, ResponseError> {
        self.check_active()?;
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group_id) else {
            return Err(ResponseError::GroupIdNotFound);
        };
        let mut results = Vec::new();
        let mut doomed = Vec::new();
        for tp in tps {
            let consuming =
                subscribed(g, &tp.0) || g.consumer.as_ref().is_some_and(|c| c.subscribes(&tp.0));
            if !g.is_empty() && consuming {
                results.push((tp, Some(ResponseError::GroupSubscribedToTopic)));
            } else {
                doomed.push(tp.clone());
                results.push((tp, None));
            }
        }
        self.store
            .delete_offsets(group_id, &doomed)
            .map_err(|_| ResponseError::KafkaStorageError)?;
        for tp in doomed {
            g.offsets.remove(&tp);
        }
        Ok(results)
    }

    /// Expires members past their session, pending member ids, and completes due joins.
    pub fn tick(&self) {
        if self.check_active().is_err() {
            return;
        }
        let now = Instant::now();
        let mut groups = self.groups.lock();
        for g in groups.values_mut() {
            if let Some(c) = g.consumer.as_mut() {
                let fenced = c.expire(now);
                for id in &fenced {
                    tracing::info!(group = %g.id, member = %id, "member fenced: session or rebalance timeout");
                }
                if !fenced.is_empty() {
                    g.consumer_changed();
                    self.persist_group(g);
                }
                continue;
            }
            g.pending_members.retain(|_, deadline| *deadline > now);
            let expired: Vec<String> = g
                .members
                .values()
                .filter(|m| m.awaiting_join.is_none() && m.heartbeat_deadline <= now)
                .map(|m| m.member_id.clone())
                .collect();
            if !expired.is_empty() {
                for id in &expired {
                    tracing::info!(group = %g.id, member = %id, "member session expired");
                    self.remove_member(g, id);
                }
                self.membership_changed(g, now);
            }
            self.maybe_complete_join(g, now);
        }
    }

    /// Runs [`tick`] until shutdown.
    pub async fn run_timers(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => self.tick(),
                _ = shutdown.changed() => return,
            }
        }
    }
}
