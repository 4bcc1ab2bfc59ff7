//! Leader/follower replication of partitions, Kafka style.
//!
//! A follower fetches from its partition's leader over the Kafka protocol (Fetch with its
//! replica id) and appends the leader's batches verbatim. The leader learns each follower's log
//! end from the offsets it fetches at, and moves the high watermark to the lowest log end among
//! the in-sync replicas; consumers never read past it and acks=all waits for it. The leader asks
//! the controller (a Raft proposal) to drop a replica that has not caught up within
//! `replica_lag_time_max` from the in-sync set, and to add it back once it has.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::{BrokerId, FetchRequest, OffsetForLeaderEpochRequest, TopicName};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::image::{ClusterImage, Command, NodeId};
use super::Proposer;
use crate::client::Connection;
use crate::kafka::str_bytes;
use crate::log::manager::LogManager;
use crate::log::partition::Partition;

type Key = (Arc<str>, i32);

/// One request to the leader, given up on after `FETCH_TIMEOUT`.
async fn call_leader<R: kafka_protocol::protocol::Request>(
    conn: &mut Connection,
    req: &R,
) -> Result<R::Response> {
    tokio::time::timeout(FETCH_TIMEOUT, conn.call(req))
        .await
        .map_err(|_| anyhow!("no answer from the leader within {FETCH_TIMEOUT:?}"))?
}

/// How long a follower waits for one answer from its leader (fetches park for 500 ms).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What the leader knows of one follower.
#[derive(Debug, Clone, Copy)]
struct FollowerProgress {
    /// The offset it last fetched at: everything below is in its log.
    log_end: i64,
    /// The last time its log end reached the leader's.
    caught_up_at: Instant,
}

impl LeaderState {
    /// How many replicas are in sync, the leader included.
    pub fn isr_len(&self) -> usize {
        self.isr.len()
    }

    fn handed_over(&self) -> NodeId {
        self.handed_over.load(Ordering::Acquire)
    }
}

/// No node: a leadership not handed over.
const NO_NODE: NodeId = -1;

pub struct LeaderState {
    pub epoch: i32,
    replicas: Vec<NodeId>,
    isr: Vec<NodeId>,
    followers: Mutex<HashMap<NodeId, FollowerProgress>>,
    /// A change (in-sync set, resignation) was proposed and not yet seen in the image.
    isr_change_pending: Mutex<bool>,
    /// The node the leadership was handed to (see `Replicas::resign`) while the image has not
    /// caught up; NO_NODE until then. Read on every produce and fetch, so an atomic.
    handed_over: AtomicI32,
}

enum Role {
    Leader(Arc<LeaderState>),
    Follower {
        leader: NodeId,
        epoch: i32,
        stop: watch::Sender<bool>,
    },
}

/// The replication state of every partition this node hosts.
pub struct Replicas {
    node: NodeId,
    log: Arc<LogManager>,
    roles: Mutex<HashMap<Key, Role>>,
    /// Kafka listener of each node, for follower fetchers.
    addrs: Mutex<BTreeMap<NodeId, String>>,
    routes: super::network::Routes,
    proposer: Arc<Proposer>,
    pub replica_lag_time_max: Duration,
}

impl Replicas {
    pub fn new(
        node: NodeId,
        log: Arc<LogManager>,
        proposer: Arc<Proposer>,
        replica_lag_time_max: Duration,
        routes: super::network::Routes,
    ) -> Arc<Replicas> {
        Arc::new(Replicas {
            node,
            log,
            roles: Mutex::new(HashMap::new()),
            addrs: Mutex::new(BTreeMap::new()),
            proposer,
            replica_lag_time_max,
            routes,
        })
    }

    /// Takes up the roles the image gives this node: leads, follows or drops each partition.
    pub fn apply(self: &Arc<Self>, image: &ClusterImage) {
        *self.addrs.lock() = image
            .nodes
            .values()
            .map(|n| (n.id, self.routes.to(&n.kafka_addr())))
            .collect();
        let mut roles = self.roles.lock();
        let mut seen = Vec::new();
        for (name, t) in &image.topics {
            let Some(local) = self.log.topic(name).filter(|l| l.id == t.id) else {
                continue;
            };
            for (i, p) in t.partitions.iter().enumerate() {
                if !p.replicas.contains(&self.node) {
                    continue;
                }
                let Some(partition) = local.partitions.get(i).cloned() else {
                    continue;
                };
                let key: Key = (local.name.clone(), i as i32);
                seen.push(key.clone());
                if !roles.contains_key(&key) && p.replicas.len() > 1 {
                    // Start from the last checkpointed high watermark (else the log start) and
                    // learn it again (from the followers as leader, from the leader as
                    // follower) rather than expose records no other replica has.
                    let start = partition
                        .checkpointed_high_watermark()
                        .unwrap_or_else(|| partition.log_start_offset());
                    partition.reset_high_watermark(start);
                }
                if p.leader == self.node {
                    let same = matches!(roles.get(&key), Some(Role::Leader(l)) if l.epoch == p.leader_epoch && l.isr == p.isr && l.replicas == p.replicas);
                    if same {
                        continue;
                    }
                    let mut followers = match roles.remove(&key) {
                        Some(Role::Leader(l)) if l.epoch == p.leader_epoch => {
                            l.followers.lock().clone()
                        }
                        Some(Role::Follower { stop, .. }) => {
                            let _ = stop.send(true);
                            HashMap::new()
                        }
                        _ => HashMap::new(),
                    };
                    // Followers not heard from yet hold the high watermark back, and leave the
                    // in-sync set if they stay silent for the lag time.
                    let now = Instant::now();
                    for r in p.isr.iter().filter(|r| **r != self.node) {
                        followers.entry(*r).or_insert(FollowerProgress {
                            log_end: -1,
                            caught_up_at: now,
                        });
                    }
                    if let Err(e) = partition.become_leader(p.leader_epoch) {
                        tracing::error!(topic = %name, partition = i, error = %e, "cannot record the new leader epoch");
                    }
                    partition.set_replicated(p.replicas.len() > 1);
                    let state = Arc::new(LeaderState {
                        epoch: p.leader_epoch,
                        replicas: p.replicas.clone(),
                        isr: p.isr.clone(),
                        followers: Mutex::new(followers),
                        isr_change_pending: Mutex::new(false),
                        handed_over: AtomicI32::new(NO_NODE),
                    });
                    self.update_high_watermark(&partition, &state);
                    roles.insert(key, Role::Leader(state));
                } else {
                    let same = matches!(roles.get(&key), Some(Role::Follower { leader, epoch, .. }) if *leader == p.leader && *epoch == p.leader_epoch);
                    if same {
                        continue;
                    }
                    if let Some(Role::Follower { stop, .. }) = roles.remove(&key) {
                        let _ = stop.send(true);
                    }
                    partition.become_follower(p.leader_epoch);
                    partition.set_replicated(true);
                    if p.leader < 0 {
                        continue;
                    }
                    let (stop, stopped) = watch::channel(false);
                    tokio::spawn(
                        self.clone()
                            .follow(partition, p.leader, p.leader_epoch, stopped),
                    );
                    roles.insert(
                        key,
                        Role::Follower {
                            leader: p.leader,
                            epoch: p.leader_epoch,
                            stop,
                        },
                    );
                }
            }
        }
        roles.retain(|k, role| {
            let keep = seen.contains(k);
            if let (false, Role::Follower { stop, .. }) = (keep, &role) {
                let _ = stop.send(true);
            }
            keep
        });
    }

    pub fn stop_all(&self) {
        for (_, role) in self.roles.lock().drain() {
            if let Role::Follower { stop, .. } = role {
                let _ = stop.send(true);
            }
        }
    }

    /// The leader state if this node leads the partition.
    pub fn leader(&self, topic: &str, partition: i32) -> Option<Arc<LeaderState>> {
        match self.roles.lock().get(&(Arc::from(topic), partition)) {
            Some(Role::Leader(l)) if l.handed_over() == NO_NODE => Some(l.clone()),
            _ => None,
        }
    }

    /// A follower fetched at `offset`: it holds everything below. Moves the high watermark.
    pub fn follower_fetched(
        self: &Arc<Self>,
        partition: &Arc<Partition>,
        state: &Arc<LeaderState>,
        follower: NodeId,
        offset: i64,
    ) {
        if !state.replicas.contains(&follower) {
            return;
        }
        let now = Instant::now();
        let leader_end = partition.log_end_offset();
        {
            let mut followers = state.followers.lock();
            let entry = followers.entry(follower).or_insert(FollowerProgress {
                log_end: offset,
                caught_up_at: now,
            });
            entry.log_end = offset;
            if offset >= leader_end {
                entry.caught_up_at = now;
            }
        }
        self.update_high_watermark(partition, state);
        // Back in sync: ask the controller to add it to the in-sync set.
        if !state.isr.contains(&follower) && offset >= partition.high_watermark() {
            let mut isr = state.isr.clone();
            isr.push(follower);
            self.propose_isr(partition, state, isr);
        }
    }

    /// The high watermark: the lowest log end among the in-sync replicas.
    pub fn update_high_watermark(&self, partition: &Partition, state: &LeaderState) {
        // KIP-966: nothing is committed while fewer replicas than min.insync.replicas are in
        // sync, so an acknowledged write is always on that many replicas.
        if (state.isr.len() as i32) < partition.config().min_insync_replicas {
            return;
        }
        let mut hw = partition.log_end_offset();
        let followers = state.followers.lock();
        for r in state.isr.iter().filter(|r| **r != self.node) {
            match followers.get(r) {
                Some(f) if f.log_end >= 0 => hw = hw.min(f.log_end),
                // Not heard from since this node became leader: nothing can be committed yet.
                _ => return,
            }
        }
        drop(followers);
        partition.advance_high_watermark(hw);
    }

    /// Every second: followers that have not caught up within the lag time leave the
    /// in-sync set.
    pub async fn run_isr_checks(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let leaders: Vec<(Key, Arc<LeaderState>)> = self
                .roles
                .lock()
                .iter()
                .filter_map(|(k, r)| match r {
                    Role::Leader(l) => Some((k.clone(), l.clone())),
                    _ => None,
                })
                .collect();
            for ((topic, p), state) in leaders {
                let Some(partition) = self.log.partition(&topic, p) else {
                    continue;
                };
                let leader_end = partition.log_end_offset();
                let now = Instant::now();
                let lagging: Vec<NodeId> = {
                    let followers = state.followers.lock();
                    state
                        .isr
                        .iter()
                        .copied()
                        .filter(|r| *r != self.node)
                        .filter(|r| match followers.get(r) {
                            Some(f) => {
                                f.log_end < leader_end
                                    && now.duration_since(f.caught_up_at)
                                        > self.replica_lag_time_max
                            }
                            None => false,
                        })
                        .collect()
                };
                if !lagging.is_empty() {
                    tracing::warn!(topic = %topic, partition = p, ?lagging, "replicas fell out of sync");
                    let isr = state
                        .isr
                        .iter()
                        .copied()
                        .filter(|r| !lagging.contains(r))
                        .collect();
                    self.propose_isr(&partition, &state, isr);
                }
            }
        }
    }

    fn propose_isr(&self, partition: &Arc<Partition>, state: &Arc<LeaderState>, isr: Vec<NodeId>) {
        let command = Command::AlterPartition {
            topic: partition.topic.to_string(),
            partition: partition.id,
            leader: self.node,
            leader_epoch: state.epoch,
            isr,
        };
        self.propose_change(state, command, || {});
    }

    /// This node could not write the partition's log (its disk is full or failing): another
    /// in-sync replica takes the leadership and this one leaves the in-sync set, so writes go
    /// on there. Once its disk takes writes again it catches up as a follower, rejoins the
    /// in-sync set, and the preferred leader comes back as after any failure.
    pub fn resign(&self, partition: &Arc<Partition>, state: &Arc<LeaderState>) {
        if state.isr.len() < 2 {
            return;
        }
        let command = Command::ResignLeader {
            topic: partition.topic.to_string(),
            partition: partition.id,
            leader: self.node,
            leader_epoch: state.epoch,
        };
        // The successor the command picks (the first other in-sync replica; a fenced one is
        // skipped, which only the image can tell).
        let Some(successor) = state.isr.iter().copied().find(|r| *r != self.node) else {
            return;
        };
        let handed = state.clone();
        let proposed = self.propose_change(state, command, move || {
            handed.handed_over.store(successor, Ordering::Release);
        });
        if proposed {
            tracing::warn!(topic = %partition.topic, partition = partition.id, epoch = state.epoch, "cannot write the partition's log: handing its leadership to another in-sync replica");
        }
    }

    /// The leader and epoch a partition this node handed over has now, while this node's own
    /// metadata has not caught up (its Raft storage may be on the disk that failed): Metadata
    /// answers with them, so that clients asking this node go to the new leader.
    pub fn handed_over(&self, topic: &str, partition: i32) -> Option<(NodeId, i32)> {
        match self.roles.lock().get(&(Arc::from(topic), partition)) {
            Some(Role::Leader(l)) if l.handed_over() != NO_NODE => {
                Some((l.handed_over(), l.epoch + 1))
            }
            _ => None,
        }
    }

    /// Proposes a change to a partition this node leads, one at a time per leadership; false
    /// when one is under way already. `committed` runs once the change is in the metadata.
    fn propose_change(
        &self,
        state: &Arc<LeaderState>,
        command: Command,
        committed: impl FnOnce() + Send + 'static,
    ) -> bool {
        {
            let mut pending = state.isr_change_pending.lock();
            if *pending {
                return false;
            }
            *pending = true;
        }
        let proposer = self.proposer.clone();
        let state = state.clone();
        tokio::spawn(async move {
            match proposer.propose_partition_change(command).await {
                Ok((_, Ok(()))) => committed(),
                Ok((_, Err(e))) => tracing::debug!(error = %e, "partition change refused"),
                Err(e) => tracing::warn!(error = %e, "partition change not committed"),
            }
            // The image brings a new LeaderState when the change took; else try again later.
            *state.isr_change_pending.lock() = false;
        });
        true
    }

    /// A follower's loop: truncate a divergent suffix, then fetch and append until stopped.
    async fn follow(
        self: Arc<Self>,
        partition: Arc<Partition>,
        leader: NodeId,
        epoch: i32,
        mut stop: watch::Receiver<bool>,
    ) {
        // Short at first: a new partition's leader may create it a moment after this node.
        let mut backoff = Duration::from_millis(10);
        let mut truncated = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let addr = self.addrs.lock().get(&leader).cloned();
            let result = match addr {
                None => Err(anyhow!("leader {leader} is not registered")),
                Some(addr) => {
                    tokio::select! {
                        r = self.fetch_loop(&partition, &addr, epoch, &mut truncated) => r,
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(topic = %partition.topic, partition = partition.id, leader, error = %e, "replica fetch failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn fetch_loop(
        &self,
        partition: &Partition,
        addr: &str,
        epoch: i32,
        truncated: &mut bool,
    ) -> Result<()> {
        let mut conn = Connection::connect(addr).await?;
        let topic = TopicName(str_bytes(partition.topic.to_string()));
        if !*truncated {
            self.truncate_divergent(&mut conn, partition, &topic, epoch)
                .await?;
            *truncated = true;
        }
        loop {
            let offset = partition.log_end_offset();
            let req = FetchRequest::default()
                .with_replica_id(BrokerId(self.node))
                .with_max_wait_ms(500)
                .with_min_bytes(1)
                .with_max_bytes(16 << 20)
                .with_session_epoch(-1)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(topic.clone())
                    .with_partitions(vec![FetchPartition::default()
                        .with_partition(partition.id)
                        .with_current_leader_epoch(epoch)
                        .with_fetch_offset(offset)
                        .with_log_start_offset(-1)
                        .with_partition_max_bytes(8 << 20)])]);
            // A leader that stopped answering (paused, cut off) is given up on, and the
            // connection made again.
            let resp = call_leader(&mut conn, &req).await?;
            crate::client::check(resp.error_code, "replica fetch")?;
            let pd = resp
                .responses
                .into_iter()
                .flat_map(|t| t.partitions)
                .find(|p| p.partition_index == partition.id)
                .ok_or_else(|| anyhow!("the leader's answer lacks the partition"))?;
            crate::client::check(pd.error_code, "replica fetch")?;
            if let Some(records) = pd.records.filter(|r| !r.is_empty()) {
                let whole: usize = crate::log::batch::complete_batches(&records)
                    .map(|b| b.bytes().len())
                    .sum();
                if whole > 0 {
                    partition.append_replica(&records[..whole])?;
                }
            }
            partition.advance_high_watermark(pd.high_watermark.min(partition.log_end_offset()));
        }
    }

    /// KIP-101/279: ask the leader where our latest epoch ends in its log and drop whatever we
    /// hold past that.
    async fn truncate_divergent(
        &self,
        conn: &mut Connection,
        partition: &Partition,
        topic: &TopicName,
        epoch: i32,
    ) -> Result<()> {
        let Some(ours) = partition.latest_epoch() else {
            return Ok(());
        };
        let req = OffsetForLeaderEpochRequest::default()
            .with_replica_id(BrokerId(self.node))
            .with_topics(vec![OffsetForLeaderTopic::default()
                .with_topic(topic.clone())
                .with_partitions(vec![OffsetForLeaderPartition::default()
                    .with_partition(partition.id)
                    .with_current_leader_epoch(epoch)
                    .with_leader_epoch(ours)])]);
        let resp = call_leader(conn, &req).await?;
        let answer = resp
            .topics
            .into_iter()
            .flat_map(|t| t.partitions)
            .find(|p| p.partition == partition.id)
            .ok_or_else(|| anyhow!("the leader's answer lacks the partition"))?;
        crate::client::check(answer.error_code, "OffsetForLeaderEpoch")?;
        let end = if answer.leader_epoch < 0 {
            // The leader knows no epoch this old: nothing here can be trusted to match.
            0
        } else {
            let (_, ours_end) = partition.end_offset_for_epoch(answer.leader_epoch);
            let ours_end = if ours_end < 0 {
                partition.log_end_offset()
            } else {
                ours_end
            };
            answer.end_offset.min(ours_end)
        };
        if end < partition.log_end_offset() {
            tracing::info!(topic = %partition.topic, partition = partition.id, from = partition.log_end_offset(), to = end, "truncating a divergent log suffix");
            partition.truncate_to(end)?;
        }
        Ok(())
    }
}
