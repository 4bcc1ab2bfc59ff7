//! The controller: the node that leads the Raft quorum also watches the other nodes.
//!
//! Every node sends a heartbeat to the Raft leader twice a second. A node not heard from for
//! `session_timeout` is fenced (its partitions get new leaders from their in-sync replicas); a
//! fenced node heard from again is unfenced; and a partition whose preferred leader is back in
//! sync is handed back to it. All of these are Raft proposals, so a new controller takes over
//! where the last one stopped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::image::{Command, NodeId};
use super::Cluster;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: NodeId,
    pub incarnation: Uuid,
}

/// What the controller has heard from each node (kept only while this node leads Raft).
#[derive(Default)]
pub struct Liveness {
    last_seen: Mutex<HashMap<NodeId, (Uuid, Instant)>>,
    /// When this controller first saw each node fenced: only a heartbeat sent after that
    /// unfences it, so a node's last heartbeat before a controlled shutdown does not.
    fenced_since: Mutex<HashMap<NodeId, Instant>>,
    /// Set on this node when it shuts down: it sends no more heartbeats.
    pub(super) leaving: std::sync::atomic::AtomicBool,
}

impl Liveness {
    pub fn heard(&self, hb: &Heartbeat) {
        self.last_seen
            .lock()
            .insert(hb.id, (hb.incarnation, Instant::now()));
    }
}

impl Cluster {
    /// Sends this node's heartbeat to the voters until `stop`.
    pub(super) async fn run_heartbeats(
        self: Arc<Self>,
        incarnation: Uuid,
        mut stop: watch::Receiver<bool>,
    ) {
        let hb = Heartbeat {
            id: self.node_id,
            incarnation,
        };
        loop {
            if self
                .liveness
                .leaving
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return;
            }
            // To every voter, not just the one this node believes leads: a node with a stale
            // view of the leader is still heard by the controller.
            self.liveness.heard(&hb);
            let body = serde_json::to_vec(&hb).unwrap_or_default();
            let sends = self
                .voter_addrs()
                .into_iter()
                .filter(|(id, _)| *id != self.node_id)
                .map(|(_, addr)| {
                    self.http
                        .post(format!("http://{addr}/cluster/heartbeat"))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .timeout(Duration::from_millis(1000))
                        .send()
                });
            futures::future::join_all(sends).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// While this node leads Raft: fence silent nodes, unfence returning ones, move partitions
    /// back to their preferred leaders.
    pub(super) async fn run_controller(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut leading_since: Option<Instant> = None;
        let mut last_preferred_check = Instant::now();
        let mut known_leader = None;
        let mut incarnations: HashMap<NodeId, (Uuid, Instant)> = HashMap::new();
        let mut last_tick = Instant::now();
        // Whether the last round heard from no majority (said once, not every round).
        let mut cut_off = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // A controller that was itself stopped (SIGSTOP, a long stall) heard nobody
            // meanwhile, and may have been deposed without knowing yet: it starts over, giving
            // every node a full session, rather than fence everyone it did not hear.
            let stalled = last_tick.elapsed() > self.settings.session_timeout / 2;
            last_tick = Instant::now();
            let leader = self.raft_leader();
            if leader != known_leader {
                match leader {
                    Some(l) => tracing::info!(controller = l, "the metadata quorum has a leader"),
                    None => tracing::warn!("the metadata quorum has no leader"),
                }
                known_leader = leader;
            }
            if leader != Some(self.node_id) || stalled {
                if stalled && leading_since.is_some() {
                    tracing::warn!("the controller was stalled; every node gets a new session");
                }
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(|| {
                // A new controller gives every node a full session before fencing it.
                self.liveness.last_seen.lock().clear();
                self.liveness.fenced_since.lock().clear();
                Instant::now()
            });
            let image = self.image();
            let now = Instant::now();
            let timeout = self.settings.session_timeout;
            let mut proposals = Vec::new();
            {
                let seen = self.liveness.last_seen.lock();
                // A controller that hears from no majority of the voters (itself included) is
                // more likely cut off itself (it can send, not receive) than the others all
                // gone: it fences nobody rather than every node.
                let voters = self.voter_ids();
                let hearing = 1 + voters
                    .iter()
                    .filter(|id| **id != self.node_id)
                    .filter(|id| {
                        seen.get(id).is_some_and(|(inc, at)| {
                            image.nodes.get(id).is_some_and(|n| n.incarnation == *inc)
                                && now.duration_since(*at) <= timeout
                        })
                    })
                    .count();
                let may_fence = hearing > voters.len() / 2 || now.duration_since(since) <= timeout;
                if !may_fence && !cut_off {
                    tracing::warn!(
                        hearing,
                        voters = voters.len(),
                        "the controller hears from no majority of the voters: fencing nobody"
                    );
                }
                cut_off = !may_fence;
                let mut fenced_since = self.liveness.fenced_since.lock();
                fenced_since.retain(|id, _| image.nodes.get(id).is_some_and(|n| n.fenced));
                for n in image.nodes.values().filter(|n| n.fenced) {
                    fenced_since.entry(n.id).or_insert(now);
                }
                for n in image.nodes.values() {
                    let heard = seen
                        .get(&n.id)
                        .filter(|(inc, _)| *inc == n.incarnation)
                        .map(|(_, at)| *at);
                    let heard_since_fenced =
                        heard.is_some_and(|at| fenced_since.get(&n.id).is_none_or(|f| at > *f));
                    // A node's silence counts from the controller's start, or from when its
                    // current incarnation registered, whichever is later.
                    let (_, registered) = *incarnations
                        .entry(n.id)
                        .and_modify(|e| {
                            if e.0 != n.incarnation {
                                *e = (n.incarnation, now);
                            }
                        })
                        .or_insert((n.incarnation, since));
                    let silent_for = now.duration_since(heard.unwrap_or(registered.max(since)));
                    // The controller hears itself: it is running this.
                    if may_fence && !n.fenced && n.id != self.node_id && silent_for > timeout {
                        tracing::warn!(
                            node = n.id,
                            silent_ms = silent_for.as_millis() as u64,
                            "fencing a node that missed its heartbeats"
                        );
                        proposals.push(Command::FenceNode {
                            id: n.id,
                            incarnation: n.incarnation,
                        });
                    } else if n.fenced
                        && heard_since_fenced
                        && heard.is_some_and(|at| now.duration_since(at) < timeout)
                    {
                        tracing::info!(node = n.id, "unfencing a node that is back");
                        proposals.push(Command::UnfenceNode {
                            id: n.id,
                            incarnation: n.incarnation,
                        });
                    }
                }
            }
            for (name, t) in &image.topics {
                for (i, p) in t.partitions.iter().enumerate() {
                    let done = p.target.as_ref().is_some_and(|target| {
                        target.iter().all(|r| {
                            p.isr.contains(r) && image.nodes.get(r).is_some_and(|n| !n.fenced)
                        })
                    });
                    if done {
                        tracing::info!(topic = %name, partition = i, "reassignment complete");
                        proposals.push(Command::CompleteReassignment {
                            topic: name.clone(),
                            partition: i as i32,
                        });
                    }
                }
            }
            if last_preferred_check.elapsed() >= self.settings.preferred_leader_check {
                last_preferred_check = Instant::now();
                for (name, t) in &image.topics {
                    for (i, p) in t.partitions.iter().enumerate() {
                        let preferred = p.replicas[0];
                        let ready = p.leader != preferred
                            && p.isr.contains(&preferred)
                            && image.nodes.get(&preferred).is_some_and(|n| !n.fenced);
                        if ready {
                            proposals.push(Command::ElectPreferred {
                                topic: name.clone(),
                                partition: i as i32,
                                leader_epoch: p.leader_epoch,
                            });
                        }
                    }
                }
            }
            // Proposed on this node's Raft only, never forwarded: a controller deposed
            // meanwhile cannot have its decisions committed by its successor.
            for command in proposals {
                match self.proposer.propose_here(command).await {
                    super::ProposeReply::Applied { .. } => {}
                    super::ProposeReply::NotLeader { .. } => {
                        tracing::info!("no longer the controller: decisions dropped");
                        break;
                    }
                    super::ProposeReply::Failed(e) => {
                        tracing::warn!(error = %e, "controller proposal not committed")
                    }
                }
            }
        }
    }

    /// Controlled shutdown: ask to be fenced, so leadership moves to the other in-sync
    /// replicas before this node stops serving.
    pub async fn leave(&self) {
        let image = self.image();
        let Some(incarnation) = image.nodes.get(&self.node_id).map(|n| n.incarnation) else {
            return;
        };
        if !image
            .nodes
            .values()
            .any(|n| n.id != self.node_id && !n.fenced)
        {
            // The last node up: there is nobody to hand anything to.
            return;
        }
        // No heartbeat after this may unfence the node again.
        self.liveness
            .leaving
            .store(true, std::sync::atomic::Ordering::Release);
        let command = Command::FenceNode {
            id: self.node_id,
            incarnation,
        };
        match tokio::time::timeout(Duration::from_secs(10), self.run(command)).await {
            Ok(Ok(())) => tracing::info!("leadership moved to the other replicas"),
            Ok(Err(e)) => tracing::warn!(error = %e, "controlled shutdown: leadership not moved"),
            Err(_) => tracing::warn!("controlled shutdown: no quorum to move leadership"),
        }
    }
}
