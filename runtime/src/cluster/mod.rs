//! A cluster of weir nodes: the Raft metadata quorum (openraft) that holds the cluster image,
//! and the reconciliation of each node's log with that image.
//!
//! `weir serve` without `--voters` runs none of this: the node is a cluster of one and owns
//! its metadata in `meta/topics.json`.

pub mod controller;
pub mod fetcher;
pub mod image;
pub mod network;
pub mod replication;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::log::manager::{LogManager, TopicError};
use image::{ClusterImage, Command, CommandError, NodeId, NodeInfo};
use network::{forward_proposal, ProposeReply};
use store::CommandOutcome;

openraft::declare_raft_types!(
    /// openraft's types for the metadata quorum.
    pub TypeConfig:
        D = Command,
        R = CommandOutcome,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// How this node takes part in a cluster (`--node-id`, `--cluster-addr`, `--voters`).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_id: NodeId,
    pub cluster_addr: String,
    /// The controller voters: node id → cluster address.
    pub voters: BTreeMap<NodeId, String>,
    pub rack: Option<String>,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// How long a metadata change may wait for a quorum before the client gets an error.
    pub propose_timeout: Duration,
    /// A follower that has not caught up for this long leaves the in-sync set
    /// (replica.lag.time.max.ms).
    pub replica_lag_time_max: Duration,
    /// A node not heard from for this long is fenced and loses its leaderships.
    pub session_timeout: Duration,
    /// How often the controller hands partitions back to their preferred leaders.
    pub preferred_leader_check: Duration,
    /// Addresses dialled in place of those other nodes registered.
    pub routes: network::Routes,
}

/// Parses `1@host:port,2@host:port`.
pub fn parse_voters(text: &str) -> Result<BTreeMap<NodeId, String>> {
    let mut voters = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('@')
            .ok_or_else(|| anyhow!("voter '{part}' is not of the form ID@HOST:PORT"))?;
        let id: NodeId = id
            .parse()
            .ok()
            .filter(|i| *i >= 0)
            .ok_or_else(|| anyhow!("voter '{part}': '{id}' is not a node id (0 or more)"))?;
        if !addr.contains(':') {
            bail!("voter '{part}': '{addr}' is not HOST:PORT");
        }
        if voters.insert(id, addr.to_string()).is_some() {
            bail!("voter id {id} is listed twice");
        }
    }
    if voters.is_empty() {
        bail!("the voter list is empty");
    }
    Ok(voters)
}

/// A change to the set of controller voters (Raft's membership). A voter added must have
/// joined as an observer first (a Raft learner, with the metadata); a voter removed stays an
/// observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoterChange {
    Add(NodeId),
    Remove(NodeId),
}

/// What only the Raft leader can do; any node forwards it there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderRequest {
    Propose(Command),
    ChangeVoters(VoterChange),
}

/// How long one Raft leader is given to commit a partition's change (see
/// `Proposer::propose_partition_change`).
const PARTITION_CHANGE_ATTEMPT: Duration = Duration::from_secs(3);

/// Proposes commands to the Raft leader, wherever it is.
pub struct Proposer {
    raft: Raft,
    http: reqwest::Client,
    timeout: Duration,
    routes: network::Routes,
}

impl Proposer {
    /// Carries the request out on this node's Raft; answers NotLeader when another node leads.
    pub async fn here(&self, request: LeaderRequest) -> ProposeReply {
        let written = match request {
            LeaderRequest::Propose(command) => self.raft.client_write(command).await,
            LeaderRequest::ChangeVoters(change) => {
                if let Err(refused) = self.check_voter_change(change) {
                    return ProposeReply::Applied {
                        index: 0,
                        outcome: CommandOutcome(Err(refused)),
                    };
                }
                let change = match change {
                    VoterChange::Add(id) => ChangeMembers::AddVoterIds([id as u64].into()),
                    VoterChange::Remove(id) => ChangeMembers::RemoveVoters([id as u64].into()),
                };
                // A removed voter stays a learner: it keeps following the metadata.
                self.raft
                    .change_membership(change, true)
                    .await
                    .map(|mut r| {
                        r.data = CommandOutcome(Ok(()));
                        r
                    })
            }
        };
        match written {
            Ok(r) => ProposeReply::Applied {
                index: r.log_id.index,
                outcome: r.data,
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                ProposeReply::NotLeader {
                    leader: f.leader_node,
                }
            }
            Err(e) => ProposeReply::Failed(e.to_string()),
        }
    }

    /// The Raft leader this node last heard from, when it is another node. Proposals go to it
    /// straight away, without this node's Raft: a node whose Raft storage cannot be written
    /// (a full disk) stalls its Raft, and must still be able to hand its partitions over.
    fn remote_leader(&self) -> Option<BasicNode> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader.filter(|l| *l != m.id)?;
        m.membership_config.membership().get_node(&leader).cloned()
    }

    /// Proposes a command on this node's Raft only (never forwarded).
    pub async fn propose_here(&self, command: Command) -> ProposeReply {
        self.here(LeaderRequest::Propose(command)).await
    }

    /// Refuses a voter change that cannot be made, judged on the membership this node knows
    /// (the leader's is the one that counts; on another node Raft answers ForwardToLeader).
    fn check_voter_change(&self, change: VoterChange) -> Result<(), CommandError> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let refuse = |why: String| Err(CommandError::InvalidVoterChange(why));
        match change {
            VoterChange::Add(id) if voters.contains(&(id as u64)) => {
                refuse(format!("node {id} is a voter already"))
            }
            VoterChange::Add(id) if membership.get_node(&(id as u64)).is_none() => refuse(format!(
                "node {id} has not joined the cluster (start it with --voters first)"
            )),
            VoterChange::Remove(id) if !voters.contains(&(id as u64)) => {
                refuse(format!("node {id} is not a voter"))
            }
            VoterChange::Remove(_) if voters.len() == 1 => {
                refuse("the last voter cannot be removed".into())
            }
            _ => Ok(()),
        }
    }

    /// Proposes through the leader, retrying while there is none, until the timeout. Returns
    /// the log index the command was committed at and its outcome.
    pub async fn propose(&self, command: Command) -> Result<(u64, Result<(), CommandError>)> {
        self.through_leader(LeaderRequest::Propose(command)).await
    }

    /// Proposes a change that is refused when made twice (it names the leader epoch it
    /// changes), giving each Raft leader at most `PARTITION_CHANGE_ATTEMPT` to commit it: a
    /// leader that stalls (its disk full) is soon replaced, and the change must not wait for
    /// it, or acks=all writes wait on an in-sync set that cannot shrink.
    pub async fn propose_partition_change(
        &self,
        command: Command,
    ) -> Result<(u64, Result<(), CommandError>)> {
        self.through_leader_within(LeaderRequest::Propose(command), PARTITION_CHANGE_ATTEMPT)
            .await
    }

    /// Carries a request out on the Raft leader, wherever it is, retrying while there is
    /// none, until the timeout.
    pub async fn through_leader(
        &self,
        request: LeaderRequest,
    ) -> Result<(u64, Result<(), CommandError>)> {
        self.through_leader_within(request, self.timeout).await
    }

    /// `through_leader`, with each forwarded attempt given at most `attempt`.
    async fn through_leader_within(
        &self,
        request: LeaderRequest,
        attempt: Duration,
    ) -> Result<(u64, Result<(), CommandError>)> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut last_error;
        loop {
            let forward = |leader: BasicNode| {
                let left = deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(attempt);
                let addr = self.routes.to(&leader.addr);
                let request = &request;
                async move {
                    match forward_proposal(&self.http, &addr, request, left).await {
                        Ok(r) => r,
                        Err(e) => ProposeReply::Failed(format!(
                            "forwarding to the Raft leader at {}: {e}",
                            leader.addr
                        )),
                    }
                }
            };
            let reply = match self.remote_leader() {
                Some(leader) => forward(leader).await,
                None => match self.here(request.clone()).await {
                    ProposeReply::NotLeader {
                        leader: Some(leader),
                    } => forward(leader).await,
                    other => other,
                },
            };
            match reply {
                ProposeReply::Applied { index, outcome } => return Ok((index, outcome.0)),
                ProposeReply::NotLeader { .. } => last_error = "no Raft leader yet".into(),
                ProposeReply::Failed(e) => last_error = e,
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "metadata change not committed within {:?}: {last_error}",
                    self.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// This node's handle on the cluster.
pub struct Cluster {
    pub node_id: NodeId,
    pub settings: ClusterSettings,
    raft: Raft,
    proposer: Arc<Proposer>,
    image: watch::Receiver<Arc<ClusterImage>>,
    /// The image version this node's log has been made to match.
    reconciled: watch::Sender<u64>,
    log: Arc<LogManager>,
    pub replicas: Arc<replication::Replicas>,
    http: reqwest::Client,
    liveness: Arc<controller::Liveness>,
}

/// The internal topics every cluster has from its start, with their configs.
pub fn internal_topics() -> Vec<(&'static str, BTreeMap<String, String>)> {
    [
        (crate::group::store::TOPIC, vec![]),
        (crate::txn::TOPIC, vec![("flush.messages", "1")]),
        (crate::pipeline::offsets::TOPIC, vec![]),
    ]
    .into_iter()
    .map(|(name, extra)| (name, crate::log::internal::internal_configs(&extra)))
    .collect()
}

impl Cluster {
    /// Opens the Raft storage, starts Raft and the cluster listener, and initialises the
    /// quorum on first start. Does not wait for a leader.
    pub async fn start(
        settings: ClusterSettings,
        log: Arc<LogManager>,
        this_node: NodeInfo,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Cluster>> {
        let dir = log.data_dir().join("raft");
        let log_store = store::LogStore::open(&dir)
            .with_context(|| format!("cannot open the Raft log in {}", dir.display()))?;
        let (machine, image) = store::StateMachine::open(&dir)
            .with_context(|| format!("cannot open the Raft snapshot in {}", dir.display()))?;
        let config = openraft::Config {
            cluster_name: "weir".into(),
            heartbeat_interval: settings.heartbeat_ms,
            // openraft waits its leader lease (the maximum below) and then its own randomised
            // timeout before standing for election: a silent leader is replaced after 1.25 to
            // 1.5 times the configured election timeout.
            election_timeout_min: settings.election_timeout_ms / 2,
            election_timeout_max: settings.election_timeout_ms * 3 / 4,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 100,
            ..Default::default()
        }
        .validate()
        .map_err(|e| anyhow!("invalid Raft settings: {e}"))?;
        weir_connectors::http::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        let raft = Raft::new(
            settings.node_id as u64,
            Arc::new(config),
            network::Network {
                http: http.clone(),
                routes: settings.routes.clone(),
            },
            log_store,
            machine,
        )
        .await
        .map_err(|e| anyhow!("cannot start Raft: {e}"))?;
        let proposer = Arc::new(Proposer {
            raft: raft.clone(),
            http: http.clone(),
            timeout: settings.propose_timeout,
            routes: settings.routes.clone(),
        });
        let liveness = Arc::new(controller::Liveness::default());
        let listener = tokio::net::TcpListener::bind(&settings.cluster_addr)
            .await
            .with_context(|| {
                format!("cannot listen for the cluster on {}", settings.cluster_addr)
            })?;
        let app = network::router(raft.clone(), proposer.clone(), liveness.clone());
        let mut stop_listener = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_listener.wait_for(|s| *s).await;
                })
                .await;
        });
        let new_quorum = settings.voters.contains_key(&settings.node_id)
            && !raft.is_initialized().await.map_err(|e| anyhow!("{e}"))?;
        if new_quorum && settings.voters.len() > 1 {
            refuse_local_topics(&log, &settings)?;
        }
        if new_quorum {
            let members: BTreeMap<u64, BasicNode> = settings
                .voters
                .iter()
                .map(|(id, addr)| (*id as u64, BasicNode { addr: addr.clone() }))
                .collect();
            // Every voter initialises with the same membership; the first log entry is then the
            // same everywhere, so it does not matter who comes first.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "Raft already initialised");
            }
        }
        // Asked of Raft's core, which has loaded the stored membership (its metrics may not
        // show it yet right after the start).
        let this = settings.node_id as u64;
        let known = raft
            .with_raft_state(move |st| {
                st.membership_state
                    .effective()
                    .membership()
                    .get_node(&this)
                    .is_some()
            })
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if !known && !settings.voters.contains_key(&settings.node_id) {
            // Not a voter: join the quorum as a learner, which receives the metadata. (A node
            // the membership knows already, as a learner or as a voter added since, does not
            // need to: it may well be one of the voters the quorum needs.)
            let voters: Vec<String> = settings
                .voters
                .values()
                .map(|a| settings.routes.to(a))
                .collect();
            let request = network::Join {
                id: settings.node_id,
                addr: settings.cluster_addr.clone(),
            };
            loop {
                match network::join(&proposer.http, &voters, &request).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "waiting to join the metadata quorum");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            tracing::info!("joined the metadata quorum as an observer");
        }
        let replicas = replication::Replicas::new(
            settings.node_id,
            log.clone(),
            proposer.clone(),
            settings.replica_lag_time_max,
            settings.routes.clone(),
        );
        tokio::spawn(replicas.clone().run_isr_checks(stop.clone()));
        let (reconciled, _) = watch::channel(0);
        let cluster = Arc::new(Cluster {
            node_id: settings.node_id,
            settings,
            raft,
            proposer,
            image,
            reconciled,
            log,
            replicas,
            http,
            liveness,
        });
        tokio::spawn(cluster.clone().run_reconciler(stop.clone()));
        let incarnation = this_node.incarnation;
        cluster.register(this_node).await?;
        tokio::spawn(cluster.clone().run_heartbeats(incarnation, stop.clone()));
        tokio::spawn(cluster.clone().run_controller(stop.clone()));
        cluster.adopt_local_topics().await?;
        cluster.ensure_internal_topics().await?;
        Ok(cluster)
    }

    /// Registers this node (its listeners and a new incarnation); waits for a quorum.
    async fn register(&self, info: NodeInfo) -> Result<()> {
        tracing::info!(node = info.id, "registering with the metadata quorum");
        loop {
            match self
                .proposer
                .propose(Command::RegisterNode(info.clone()))
                .await
            {
                Ok((index, _)) => {
                    self.wait_reconciled(index).await?;
                    tracing::info!(node = info.id, "registered");
                    return Ok(());
                }
                Err(e) => tracing::warn!(error = %e, "waiting for a metadata quorum"),
            }
        }
    }

    /// A single node restarted as the one voter of a new cluster brings its topics along:
    /// each local topic the image neither holds nor deleted is registered under its own id,
    /// with this node as its only replica, so its records, committed offsets and transactions
    /// stay where they are (more replicas come by reassignment once other nodes join). A
    /// sole voter does this at each start until it is done, so a crash in between loses
    /// nothing.
    async fn adopt_local_topics(&self) -> Result<()> {
        let image = self.image();
        let strays: Vec<_> = self
            .log
            .topics()
            .into_iter()
            .filter(|l| {
                !image.topics.contains_key(&*l.name) && !image.deleted_topics.contains(&l.id)
            })
            .collect();
        if strays.is_empty() {
            return Ok(());
        }
        if self.voter_ids() != BTreeSet::from([self.node_id]) {
            let names: Vec<&str> = strays.iter().map(|t| &*t.name).collect();
            tracing::warn!(topics = ?names, "local topics the cluster does not know stay unserved; {}", sole_voter_hint(&self.settings));
            return Ok(());
        }
        for t in strays {
            let partitions = t.partitions.len() as i32;
            self.run(Command::CreateTopic {
                name: t.name.to_string(),
                id: t.id,
                partitions,
                replication_factor: 1,
                configs: t.overrides.clone(),
                if_missing: true,
                assignments: Some(vec![vec![self.node_id]; partitions as usize]),
            })
            .await
            .map_err(|e| anyhow!("cannot bring topic {} into the cluster: {e}", t.name))?;
            tracing::info!(topic = %t.name, partitions, "a local topic joins the cluster on this node");
        }
        Ok(())
    }

    /// Creates the coordinators' internal topics once every voter has registered, so their
    /// replicas are spread over the whole initial cluster.
    async fn ensure_internal_topics(&self) -> Result<()> {
        let mut image = self.image.clone();
        let voters: BTreeSet<NodeId> = self.settings.voters.keys().copied().collect();
        let wanted = internal_topics();
        if wanted
            .iter()
            .all(|(n, _)| image.borrow().topics.contains_key(*n))
        {
            return Ok(());
        }
        tracing::info!("waiting for every voter to register");
        image
            .wait_for(|i| voters.iter().all(|v| i.nodes.contains_key(v)))
            .await?;
        for (name, configs) in wanted {
            let rf = voters.len().min(3) as i32;
            self.run(Command::CreateTopic {
                name: name.to_string(),
                id: Uuid::new_v4(),
                partitions: 1,
                replication_factor: rf,
                configs,
                if_missing: true,
                assignments: None,
            })
            .await
            .map_err(|e| anyhow!("cannot create {name}: {e}"))?;
        }
        Ok(())
    }

    /// The coordinators open their internal topics on every node, and lead them only where
    /// the image says. A node that is none of an internal topic's replicas (in clusters of
    /// more than three nodes) gets an empty local copy under the cluster's topic id, which
    /// nothing writes, rather than a topic of its own that clashes with the cluster's.
    pub fn host_internal_topics(&self) -> Result<()> {
        let image = self.image();
        for (name, _) in internal_topics() {
            let Some(t) = image.topics.get(name) else {
                continue;
            };
            if self.log.topic(name).is_none() {
                let partitions = t.partitions.len() as i32;
                match self
                    .log
                    .create_topic_with_id(name, t.id, partitions, t.configs.clone())
                {
                    Ok(_) | Err(TopicError::AlreadyExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// The current image.
    pub fn image(&self) -> Arc<ClusterImage> {
        self.image.borrow().clone()
    }

    /// Tells of every new image.
    pub fn watch_image(&self) -> watch::Receiver<Arc<ClusterImage>> {
        self.image.clone()
    }

    /// Adds or removes a controller voter (Raft's joint consensus), through the Raft leader.
    pub async fn change_voters(&self, change: VoterChange) -> Result<(), ClusterError> {
        let (_, outcome) = self
            .proposer
            .through_leader(LeaderRequest::ChangeVoters(change))
            .await
            .map_err(ClusterError::Unavailable)?;
        outcome.map_err(ClusterError::Refused)
    }

    /// The controller voters, from the Raft membership (which `--voters` only starts).
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .map(|v| v as NodeId)
            .collect()
    }

    /// The voters' cluster addresses, from the Raft membership.
    fn voter_addrs(&self) -> Vec<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let addrs = m
            .membership_config
            .nodes()
            .filter(|(n, _)| voters.contains(n))
            .map(|(n, node)| (*n as NodeId, node.addr.clone()))
            .collect();
        addrs
    }

    /// The node that leads the Raft quorum, if known.
    pub fn raft_leader(&self) -> Option<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .current_leader
            .map(|l| l as NodeId)
    }

    /// What `GET /cluster` and `weir cluster status` show: the nodes and their state, the
    /// Raft leader, and the partitions that are under-replicated or offline.
    pub fn status(&self) -> serde_json::Value {
        let image = self.image();
        let metrics = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = metrics.membership_config.voter_ids().collect();
        let mut under = Vec::new();
        let mut offline = Vec::new();
        for (name, t) in &image.topics {
            for (i, p) in t.partitions.iter().enumerate() {
                let entry = serde_json::json!({
                    "topic": name, "partition": i, "leader": p.leader,
                    "leader_epoch": p.leader_epoch, "replicas": p.replicas, "isr": p.isr,
                });
                if p.leader < 0 {
                    offline.push(entry);
                } else if p.isr.len() < p.replicas.len() {
                    under.push(entry);
                }
            }
        }
        let nodes: Vec<_> = image
            .nodes
            .values()
            .map(|n| {
                let leads = image
                    .topics
                    .values()
                    .flat_map(|t| &t.partitions)
                    .filter(|p| p.leader == n.id)
                    .count();
                serde_json::json!({
                    "id": n.id,
                    "kafka": n.kafka_addr(),
                    "cluster": n.cluster_addr,
                    "rack": n.rack,
                    "voter": voters.contains(&(n.id as u64)),
                    "fenced": n.fenced,
                    "leader_of": leads,
                })
            })
            .collect();
        serde_json::json!({
            "cluster_id": image.cluster_id,
            "node_id": self.node_id,
            "raft": {
                "leader": metrics.current_leader,
                "term": metrics.current_term,
                "state": format!("{:?}", metrics.state),
                "last_applied": metrics.last_applied.map(|l| l.index),
            },
            "nodes": nodes,
            "topics": image.topics.len(),
            "partitions": image.topics.values().map(|t| t.partitions.len()).sum::<usize>(),
            "under_replicated": under,
            "offline": offline,
            "pipelines": image.pipelines,
        })
    }

    /// Proposes a command and waits until this node's log reflects it.
    pub async fn run(&self, command: Command) -> Result<(), ClusterError> {
        let (index, outcome) = self
            .proposer
            .propose(command)
            .await
            .map_err(ClusterError::Unavailable)?;
        self.wait_reconciled(index)
            .await
            .map_err(ClusterError::Unavailable)?;
        outcome.map_err(ClusterError::Refused)
    }

    async fn wait_reconciled(&self, index: u64) -> Result<()> {
        self.raft
            .wait(Some(self.settings.propose_timeout))
            .applied_index_at_least(Some(index), "metadata change applied")
            .await
            .map_err(|e| anyhow!("metadata change not applied here: {e}"))?;
        let version = self.image.borrow().version;
        let mut reconciled = self.reconciled.subscribe();
        tokio::time::timeout(
            self.settings.propose_timeout,
            reconciled.wait_for(|v| *v >= version),
        )
        .await
        .map_err(|_| anyhow!("the local log did not catch up with the metadata in time"))??;
        Ok(())
    }

    /// Makes the local log match each new image: topics created, grown, reconfigured and
    /// deleted, and each partition's role (leader, follower) set.
    async fn run_reconciler(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut image = self.image.clone();
        loop {
            let current = image.borrow_and_update().clone();
            let log = self.log.clone();
            let img = current.clone();
            let node = self.node_id;
            match tokio::task::spawn_blocking(move || reconcile_topics(&log, &img, node)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot apply the cluster metadata"),
                Err(e) => tracing::error!(error = %e, "metadata reconciliation failed"),
            }
            self.replicas.apply(&current);
            // After `apply`, which stopped the fetchers of replicas this node lost.
            let (log, img) = (self.log.clone(), current.clone());
            match tokio::task::spawn_blocking(move || drop_lost_replicas(&log, &img, node)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot drop the data of a moved partition")
                }
                Err(e) => tracing::error!(error = %e, "dropping moved partitions failed"),
            }
            self.reconciled.send_replace(current.version);
            let stopping = tokio::select! {
                r = image.changed() => r.is_err(),
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                self.replicas.stop_all();
                let _ = self.raft.shutdown().await;
                return;
            }
        }
    }
}

/// A new quorum of several voters starts from no topics: a data directory that already holds
/// some (a single node's) would clash with the other voters' topics, so it is refused. Empty
/// internal topics (a single node creates them at its first start) hold nothing to keep: they
/// are deleted, so that the cluster's own take their place.
fn refuse_local_topics(log: &LogManager, settings: &ClusterSettings) -> Result<()> {
    let mut names = Vec::new();
    for t in log.topics() {
        if t.is_internal() && t.partitions.iter().all(|p| p.size_bytes() == 0) {
            log.delete_topic(&t.name)?;
        } else {
            names.push(t.name.to_string());
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    bail!(
        "{} holds topics of a node that is not part of this cluster ({}); {}",
        log.data_dir().display(),
        names.join(", "),
        sole_voter_hint(settings)
    )
}

fn sole_voter_hint(settings: &ClusterSettings) -> String {
    format!(
        "start this node as the only voter (--voters {}@{}) to bring them into a cluster, then add nodes",
        settings.node_id, settings.cluster_addr
    )
}

/// A metadata change that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0:#}")]
    Unavailable(anyhow::Error),
    #[error(transparent)]
    Refused(CommandError),
}

/// Creates, grows, reconfigures and deletes local topics to match the image. Local data is
/// deleted only for topic ids the image says were deleted.
fn reconcile_topics(log: &LogManager, image: &ClusterImage, node: NodeId) -> Result<()> {
    for local in log.topics() {
        let gone = match image.topics.get(&*local.name) {
            Some(t) => t.id != local.id && image.deleted_topics.contains(&local.id),
            None => image.deleted_topics.contains(&local.id),
        };
        if gone {
            log.delete_topic(&local.name)?;
        }
    }
    for (name, t) in &image.topics {
        let hosted = t.partitions.iter().any(|p| p.replicas.contains(&node));
        match log.topic(name) {
            None if hosted => {
                match log.create_topic_with_id(
                    name,
                    t.id,
                    t.partitions.len() as i32,
                    t.configs.clone(),
                ) {
                    Ok(_) | Err(TopicError::AlreadyExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None => {}
            Some(local) if local.id != t.id => {
                tracing::error!(topic = %name, local = %local.id, cluster = %t.id, "a local topic has the name of another topic in the cluster; leaving it alone");
            }
            Some(local) => {
                if local.partitions.len() < t.partitions.len() {
                    log.create_partitions(name, t.partitions.len() as i32, false)?;
                }
                if local.overrides != t.configs {
                    log.set_topic_configs(name, t.configs.clone(), false)?;
                }
            }
        }
    }
    Ok(())
}

/// Empties the local copy of every partition this node holds data of but no longer replicates
/// (moved away by a reassignment): nothing reads it any more, and it would only take disk.
fn drop_lost_replicas(log: &LogManager, image: &ClusterImage, node: NodeId) -> Result<()> {
    for (name, t) in &image.topics {
        let Some(local) = log.topic(name).filter(|l| l.id == t.id) else {
            continue;
        };
        for (p, partition) in t.partitions.iter().zip(&local.partitions) {
            if p.replicas.contains(&node) || partition.size_bytes() == 0 {
                continue;
            }
            tracing::info!(topic = %name, partition = partition.id, "this node no longer replicates the partition: dropping its data");
            partition.truncate_fully_and_start_at(0)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voter_lists_are_checked() {
        let v = parse_voters("1@127.0.0.1:9501, 2@127.0.0.1:9502").unwrap();
        assert_eq!(v[&2], "127.0.0.1:9502");
        for bad in ["", "1", "x@h:1", "1@nohostport", "1@h:1,1@h:2", "-1@h:1"] {
            assert!(parse_voters(bad).is_err(), "{bad}");
        }
    }
}
