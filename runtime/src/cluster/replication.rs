//! Leader/follower replication of partitions, Kafka style.
//!
//! A follower fetches from its partitions' leaders over the Kafka protocol (Fetch with its
//! replica id; one connection and one request at a time per leader node, see `fetcher`) and
//! appends the leader's batches verbatim. The leader learns each follower's log
//! end from the offsets it fetches at, and moves the high watermark to the lowest log end among
//! the in-sync replicas; consumers never read past it and acks=all waits for it. The leader asks
//! the controller (a Raft proposal) to drop a replica that has not caught up within
//! `replica_lag_time_max` from the in-sync set, and to add it back once it has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::fetcher::{Addrs, Key, ReplicaFetcher};
use super::image::{ClusterImage, Command, NodeId};
use super::Proposer;
use crate::log::manager::LogManager;
use crate::log::partition::Partition;

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
    Follower { leader: NodeId, epoch: i32 },
}

/// The replication state of every partition this node hosts.
pub struct Replicas {
    node: NodeId,
    log: Arc<LogManager>,
    roles: Mutex<HashMap<Key, Role>>,
    /// Kafka listener of each node, for follower fetchers.
    addrs: Addrs,
    /// The fetcher of each node this node follows partitions from.
    fetchers: Mutex<HashMap<NodeId, Arc<ReplicaFetcher>>>,
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
            addrs: Addrs::default(),
            fetchers: Mutex::new(HashMap::new()),
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
                        Some(Role::Follower { leader, .. }) => {
                            self.unfollow(&key, leader);
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
                    if let Some(Role::Follower { leader, .. }) = roles.remove(&key) {
                        self.unfollow(&key, leader);
                    }
                    partition.become_follower(p.leader_epoch);
                    partition.set_replicated(true);
                    if p.leader < 0 {
                        continue;
                    }
                    self.follow(key.clone(), partition, p.leader, p.leader_epoch);
                    roles.insert(
                        key,
                        Role::Follower {
                            leader: p.leader,
                            epoch: p.leader_epoch,
                        },
                    );
                }
            }
        }
        roles.retain(|k, role| {
            let keep = seen.contains(k);
            if let (false, Role::Follower { leader, .. }) = (keep, &role) {
                self.unfollow(k, *leader);
            }
            keep
        });
    }

    pub fn stop_all(&self) {
        self.roles.lock().clear();
        for (_, fetcher) in self.fetchers.lock().drain() {
            fetcher.stop();
        }
    }

    /// Fetches the partition from `leader`, on the fetcher of that node.
    fn follow(&self, key: Key, partition: Arc<Partition>, leader: NodeId, epoch: i32) {
        self.fetchers
            .lock()
            .entry(leader)
            .or_insert_with(|| ReplicaFetcher::start(self.node, leader, self.addrs.clone()))
            .follow(key, partition, epoch);
    }

    /// Stops fetching the partition from `leader`; that fetcher stops once it follows nothing.
    fn unfollow(&self, key: &Key, leader: NodeId) {
        let mut fetchers = self.fetchers.lock();
        if let Some(fetcher) = fetchers.get(&leader) {
            if !fetcher.unfollow(key) {
                fetcher.stop();
                fetchers.remove(&leader);
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
}
