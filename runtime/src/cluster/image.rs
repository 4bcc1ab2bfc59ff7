//! The cluster image: what the Raft metadata quorum agrees on, and the commands that change it.
//!
//! Every node applies the same committed commands in the same order, so `apply` must be
//! deterministic: no clocks, no randomness (ids are chosen by the proposer and carried in the
//! command).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::security::acl::{AclBinding, Acls};
use crate::security::users::{self, CredentialChange, Credentials};
use crate::security::Endpoint;

/// Broker ids as Kafka clients see them.
pub type NodeId = i32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Where Kafka clients (and follower fetchers) connect.
    pub kafka_host: String,
    pub kafka_port: i32,
    /// The Raft and cluster RPC listener.
    pub cluster_addr: String,
    #[serde(default)]
    pub rack: Option<String>,
    /// Changes at every start of the node's process, so a restart is visible.
    pub incarnation: Uuid,
    /// Missed its heartbeats, or shut down: leads nothing and is in no in-sync set.
    #[serde(default)]
    pub fenced: bool,
    /// Addresses for clients by listener name; `kafka_host:kafka_port` is the first's.
    #[serde(default)]
    pub listeners: Vec<Endpoint>,
    /// Its HTTP API (`http://host:port` or `https://...`), where the HTTP sources of the
    /// pipelines it runs are served.
    #[serde(default)]
    pub http_url: Option<String>,
}

impl NodeInfo {
    /// `host:port` of the Kafka listener other nodes use (replication, markers, pipelines).
    pub fn kafka_addr(&self) -> String {
        format!("{}:{}", self.kafka_host, self.kafka_port)
    }

    /// The node's address for clients of `listener`, or its first listener's.
    pub fn endpoint(&self, listener: &str) -> (String, i32) {
        match self.listeners.iter().find(|e| e.listener == listener) {
            Some(e) => (e.host.clone(), e.port),
            None => (self.kafka_host.clone(), self.kafka_port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionImage {
    /// Replica nodes; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// -1 when no replica can lead.
    pub leader: NodeId,
    /// Bumped at every leader change.
    pub leader_epoch: i32,
    /// The in-sync replicas (always holds the leader while there is one).
    pub isr: Vec<NodeId>,
    /// A reassignment under way: the replicas the partition ends with once they are all in
    /// sync. Meanwhile `replicas` holds these and the ones being removed.
    #[serde(default)]
    pub target: Option<Vec<NodeId>>,
    /// The replicas before the reassignment (what cancelling it goes back to).
    #[serde(default)]
    pub original: Option<Vec<NodeId>>,
}

impl PartitionImage {
    /// A new partition on these replicas, all in sync, led by the first.
    fn on(replicas: Vec<NodeId>) -> PartitionImage {
        PartitionImage {
            leader: replicas[0],
            leader_epoch: 0,
            isr: replicas.clone(),
            replicas,
            target: None,
            original: None,
        }
    }
}

/// A replica list a client chose: not empty, distinct, and of registered nodes.
fn check_replicas(
    nodes: &BTreeSet<NodeId>,
    partition: &str,
    replicas: &[NodeId],
) -> Result<(), CommandError> {
    let unique: BTreeSet<_> = replicas.iter().collect();
    if replicas.is_empty() || unique.len() != replicas.len() {
        return Err(CommandError::InvalidReplicaAssignment(format!(
            "replicas {replicas:?} for {partition} must be distinct and not empty"
        )));
    }
    if let Some(n) = replicas.iter().find(|n| !nodes.contains(n)) {
        return Err(CommandError::InvalidReplicaAssignment(format!(
            "node {n} is not registered"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicImage {
    pub id: Uuid,
    /// Topic config overrides by Kafka name.
    pub configs: BTreeMap<String, String>,
    pub partitions: Vec<PartitionImage>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterImage {
    /// Chosen by the first node to register; every node reports it to clients.
    pub cluster_id: String,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub topics: BTreeMap<String, TopicImage>,
    /// Ids of deleted topics: a node deletes local data only for these, so an image that is
    /// merely behind never removes anything.
    pub deleted_topics: BTreeSet<Uuid>,
    /// Bumped by every command; nodes compare it to know what they have reconciled.
    pub version: u64,
    /// Producer ids are handed out in blocks, so every id is unique in the cluster.
    pub next_producer_id: i64,
    /// The last block each node reserved, [start, end).
    pub producer_id_blocks: BTreeMap<NodeId, (i64, i64)>,
    /// Users' SCRAM credentials (salted and hashed).
    #[serde(default)]
    pub scram_credentials: Credentials,
    /// The authorizer's ACLs.
    #[serde(default)]
    pub acls: Acls,
    /// The pipelines each node can run (the valid files of its pipelines directory).
    #[serde(default)]
    pub pipeline_offers: BTreeMap<NodeId, BTreeSet<String>>,
    /// Where each pipeline runs: one unfenced node among those that offer it.
    #[serde(default)]
    pub pipelines: BTreeMap<String, NodeId>,
    /// Pipelines paused through the API: they stay paused wherever they are placed.
    #[serde(default)]
    pub paused_pipelines: BTreeSet<String>,
}

/// A change to the image, proposed through Raft.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    RegisterNode(NodeInfo),
    CreateTopic {
        name: String,
        id: Uuid,
        partitions: i32,
        replication_factor: i32,
        configs: BTreeMap<String, String>,
        /// Creating a topic that exists is not an error (internal topics, auto-creation).
        if_missing: bool,
        /// Each partition's replicas as the client chose them (the first leads); None: the
        /// controller places them.
        #[serde(default)]
        assignments: Option<Vec<Vec<NodeId>>>,
    },
    DeleteTopic {
        name: String,
    },
    CreatePartitions {
        name: String,
        total: i32,
        /// The new partitions' replicas as the client chose them; None: placed as usual.
        #[serde(default)]
        assignments: Option<Vec<Vec<NodeId>>>,
    },
    SetTopicConfigs {
        name: String,
        configs: BTreeMap<String, String>,
    },
    /// The controller fences a node that missed its heartbeats, or a node shutting down asks
    /// for it: its partitions get new leaders from their in-sync replicas.
    FenceNode {
        id: NodeId,
        incarnation: Uuid,
    },
    /// A fenced node is heard from again: it may lead the partitions it alone can lead.
    UnfenceNode {
        id: NodeId,
        incarnation: Uuid,
    },
    /// Gives a partition back to its preferred leader (the first replica) once it is in sync.
    ElectPreferred {
        topic: String,
        partition: i32,
        leader_epoch: i32,
    },
    /// Moves a partition to other replicas (AlterPartitionReassignments); None cancels a
    /// reassignment under way. The new replicas follow the leader until they are in sync.
    Reassign {
        topic: String,
        partition: i32,
        replicas: Option<Vec<NodeId>>,
    },
    /// The controller ends a reassignment whose target replicas are all in sync.
    CompleteReassignment {
        topic: String,
        partition: i32,
    },
    /// A node reserves the next block of producer ids.
    AllocateProducerIds {
        node: NodeId,
        size: i64,
    },
    /// Creates, replaces or deletes users' SCRAM credentials (AlterUserScramCredentials).
    AlterScramCredentials {
        changes: Vec<CredentialChange>,
    },
    /// Adds ACLs (CreateAcls); adding one that exists changes nothing.
    CreateAcls {
        acls: Vec<AclBinding>,
    },
    /// Removes these ACLs (DeleteAcls, resolved against the image to the bindings it named).
    DeleteAcls {
        acls: Vec<AclBinding>,
    },
    /// A node tells which pipelines it can run; each pipeline is then placed on one node.
    OfferPipelines {
        node: NodeId,
        names: BTreeSet<String>,
    },
    /// Pauses or resumes a pipeline on whichever node runs it.
    PausePipeline {
        name: String,
        paused: bool,
    },
    /// A leader that cannot write its partition's log (a full or failing disk) hands the
    /// partition to another in-sync replica and leaves the in-sync set, as Kafka moves leaders
    /// off a failed log directory; refused unless it still leads in that epoch and another
    /// in-sync replica is up.
    ResignLeader {
        topic: String,
        partition: i32,
        leader: NodeId,
        leader_epoch: i32,
    },
    /// A leader changes its partition's in-sync set (Kafka's AlterPartition); refused unless
    /// it still leads in that epoch.
    AlterPartition {
        topic: String,
        partition: i32,
        leader: NodeId,
        leader_epoch: i32,
        isr: Vec<NodeId>,
    },
}

/// Why a command was refused; maps onto Kafka error codes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
    #[error("{0}")]
    InvalidReplicationFactor(String),
    #[error("{0}")]
    InvalidPartitions(String),
    #[error("{0}")]
    StaleLeader(String),
    #[error("node {0} restarted or is unknown")]
    StaleNode(NodeId),
    #[error("{0}")]
    InvalidReplicaAssignment(String),
    #[error("no reassignment is under way for {0}")]
    NoReassignmentInProgress(String),
    #[error("{0}")]
    InvalidVoterChange(String),
}

fn info_id(command: &Command) -> NodeId {
    match command {
        Command::RegisterNode(info) => info.id,
        _ => unreachable!(),
    }
}

impl ClusterImage {
    pub fn apply(&mut self, command: &Command) -> Result<(), CommandError> {
        self.version += 1;
        let applied = self.apply_command(command);
        // Nodes come, go and change what they offer: pipelines follow.
        if applied.is_ok() {
            self.place_pipelines();
        }
        applied
    }

    fn apply_command(&mut self, command: &Command) -> Result<(), CommandError> {
        match command {
            Command::RegisterNode(info) => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = info.incarnation.simple().to_string();
                }
                let mut info = info.clone();
                info.fenced = false;
                self.nodes.insert(info.id, info);
                self.unfence(info_id(command));
                Ok(())
            }
            Command::FenceNode { id, incarnation } => {
                match self.nodes.get_mut(id) {
                    Some(n) if n.incarnation == *incarnation => n.fenced = true,
                    _ => return Err(CommandError::StaleNode(*id)),
                }
                self.fence(*id);
                Ok(())
            }
            Command::PausePipeline { name, paused } => {
                if *paused {
                    self.paused_pipelines.insert(name.clone());
                } else {
                    self.paused_pipelines.remove(name);
                }
                Ok(())
            }
            Command::OfferPipelines { node, names } => {
                if !self.nodes.contains_key(node) {
                    return Err(CommandError::StaleNode(*node));
                }
                self.pipeline_offers.insert(*node, names.clone());
                Ok(())
            }
            Command::UnfenceNode { id, incarnation } => {
                match self.nodes.get_mut(id) {
                    Some(n) if n.incarnation == *incarnation => n.fenced = false,
                    _ => return Err(CommandError::StaleNode(*id)),
                }
                self.unfence(*id);
                Ok(())
            }
            Command::Reassign {
                topic,
                partition,
                replicas,
            } => {
                let nodes: BTreeSet<NodeId> = self.nodes.keys().copied().collect();
                let name = format!("{topic}-{partition}");
                if let Some(r) = replicas {
                    check_replicas(&nodes, &name, r)?;
                }
                let p = self.partition_mut(topic, *partition)?;
                let target = match replicas {
                    Some(r) => r.clone(),
                    None => p
                        .original
                        .clone()
                        .ok_or(CommandError::NoReassignmentInProgress(name))?,
                };
                let original = p.original.clone().unwrap_or_else(|| p.replicas.clone());
                let mut all = target.clone();
                all.extend(p.replicas.iter().filter(|r| !target.contains(r)));
                p.replicas = all;
                if target == original && p.replicas == original {
                    p.target = None;
                    p.original = None;
                } else {
                    p.target = Some(target);
                    p.original = Some(original);
                }
                Ok(())
            }
            Command::CompleteReassignment { topic, partition } => {
                let fenced = self.fenced_nodes();
                let name = format!("{topic}-{partition}");
                let p = self.partition_mut(topic, *partition)?;
                let Some(target) = p.target.clone() else {
                    return Err(CommandError::NoReassignmentInProgress(name));
                };
                if !target
                    .iter()
                    .all(|r| p.isr.contains(r) && !fenced.contains(r))
                {
                    return Err(CommandError::StaleLeader(format!(
                        "{name}: the new replicas {target:?} are not all in sync"
                    )));
                }
                p.isr = target.clone();
                if !target.contains(&p.leader) {
                    p.leader = target[0];
                    p.leader_epoch += 1;
                }
                p.replicas = target;
                p.target = None;
                p.original = None;
                Ok(())
            }
            Command::AlterScramCredentials { changes } => {
                users::apply(&mut self.scram_credentials, changes);
                Ok(())
            }
            Command::CreateAcls { acls } => {
                self.acls.extend(acls.iter().cloned());
                Ok(())
            }
            Command::DeleteAcls { acls } => {
                for acl in acls {
                    self.acls.remove(acl);
                }
                Ok(())
            }
            Command::AllocateProducerIds { node, size } => {
                let start = self.next_producer_id;
                self.next_producer_id += size.max(&1);
                self.producer_id_blocks
                    .insert(*node, (start, self.next_producer_id));
                Ok(())
            }
            Command::ElectPreferred {
                topic,
                partition,
                leader_epoch,
            } => {
                let fenced = self.fenced_nodes();
                let p = self.partition_mut(topic, *partition)?;
                let preferred = p.replicas[0];
                if p.leader_epoch != *leader_epoch
                    || p.leader == preferred
                    || !p.isr.contains(&preferred)
                    || fenced.contains(&preferred)
                {
                    return Err(CommandError::StaleLeader(format!(
                        "{topic}-{partition} cannot move to its preferred leader {preferred} now"
                    )));
                }
                p.leader = preferred;
                p.leader_epoch += 1;
                Ok(())
            }
            Command::CreateTopic {
                name,
                id,
                partitions,
                replication_factor,
                configs,
                if_missing,
                assignments,
            } => {
                if self.topics.contains_key(name) {
                    return if *if_missing {
                        Ok(())
                    } else {
                        Err(CommandError::TopicExists(name.clone()))
                    };
                }
                let partitions = match assignments {
                    Some(a) => self.assigned_partitions(name, 0, a, None)?,
                    None => {
                        let rf = self.replication_factor(*replication_factor)?;
                        let start = self.assignment_start();
                        (0..*partitions)
                            .map(|p| self.new_partition(start + p as usize, rf))
                            .collect()
                    }
                };
                self.topics.insert(
                    name.clone(),
                    TopicImage {
                        id: *id,
                        configs: configs.clone(),
                        partitions,
                    },
                );
                Ok(())
            }
            Command::DeleteTopic { name } => {
                let t = self
                    .topics
                    .remove(name)
                    .ok_or_else(|| CommandError::UnknownTopic(name.clone()))?;
                self.deleted_topics.insert(t.id);
                Ok(())
            }
            Command::CreatePartitions {
                name,
                total,
                assignments,
            } => {
                let t = self
                    .topics
                    .get(name)
                    .ok_or_else(|| CommandError::UnknownTopic(name.clone()))?;
                let current = t.partitions.len() as i32;
                if *total <= current {
                    return Err(CommandError::InvalidPartitions(format!(
                        "topic '{name}' has {current} partitions; the new count must be larger, got {total}"
                    )));
                }
                let rf = t.partitions[0].replicas.len();
                let added: Vec<_> = match assignments {
                    Some(a) if a.len() as i32 != total - current => {
                        return Err(CommandError::InvalidReplicaAssignment(format!(
                            "{} assignments for the {} new partitions of '{name}'",
                            a.len(),
                            total - current
                        )))
                    }
                    Some(a) => self.assigned_partitions(name, current, a, Some(rf))?,
                    None => {
                        let start = self.assignment_start();
                        (current..*total)
                            .map(|p| self.new_partition(start + p as usize, rf))
                            .collect()
                    }
                };
                self.topics.get_mut(name).unwrap().partitions.extend(added);
                Ok(())
            }
            Command::SetTopicConfigs { name, configs } => {
                let t = self
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| CommandError::UnknownTopic(name.clone()))?;
                t.configs = configs.clone();
                Ok(())
            }
            Command::ResignLeader {
                topic,
                partition,
                leader,
                leader_epoch,
            } => {
                let fenced = self.fenced_nodes();
                let p = self.partition_mut(topic, *partition)?;
                if p.leader != *leader || p.leader_epoch != *leader_epoch {
                    return Err(CommandError::StaleLeader(format!(
                        "{topic}-{partition} is led by {} in epoch {}, not by {leader} in epoch {leader_epoch}",
                        p.leader, p.leader_epoch
                    )));
                }
                let Some(next) = p
                    .isr
                    .iter()
                    .copied()
                    .find(|r| r != leader && !fenced.contains(r))
                else {
                    return Err(CommandError::StaleLeader(format!(
                        "no other in-sync replica of {topic}-{partition} can lead it"
                    )));
                };
                p.leader = next;
                p.leader_epoch += 1;
                p.isr.retain(|r| r != leader);
                Ok(())
            }
            Command::AlterPartition {
                topic,
                partition,
                leader,
                leader_epoch,
                isr,
            } => {
                let p = self.partition_mut(topic, *partition)?;
                if p.leader != *leader || p.leader_epoch != *leader_epoch {
                    return Err(CommandError::StaleLeader(format!(
                        "{topic}-{partition} is led by {} in epoch {}, not by {leader} in epoch {leader_epoch}",
                        p.leader, p.leader_epoch
                    )));
                }
                if !isr.contains(leader) || isr.iter().any(|r| !p.replicas.contains(r)) {
                    return Err(CommandError::StaleLeader(format!(
                        "in-sync set {isr:?} must hold the leader and only replicas of {topic}-{partition}"
                    )));
                }
                // Replica order, so equal sets compare equal.
                p.isr = p
                    .replicas
                    .iter()
                    .copied()
                    .filter(|r| isr.contains(r))
                    .collect();
                Ok(())
            }
        }
    }

    /// The replication factor a creation asks for (-1: the default, 3 or fewer nodes).
    fn replication_factor(&self, asked: i32) -> Result<usize, CommandError> {
        let nodes = self.placeable_nodes().len();
        if asked == -1 {
            return Ok(nodes.clamp(1, 3));
        }
        if asked < 1 {
            return Err(CommandError::InvalidReplicationFactor(format!(
                "replication factor must be at least 1, got {asked}"
            )));
        }
        if asked as usize > nodes {
            return Err(CommandError::InvalidReplicationFactor(format!(
                "replication factor {asked} is larger than the {nodes} available (registered, unfenced) node(s)"
            )));
        }
        Ok(asked as usize)
    }

    /// The nodes new replicas go to: the unfenced ones (a fenced node could neither lead nor
    /// follow), or every node while all are fenced (a whole-cluster start).
    fn placeable_nodes(&self) -> Vec<&NodeInfo> {
        let live: Vec<&NodeInfo> = self.nodes.values().filter(|n| !n.fenced).collect();
        if live.is_empty() {
            self.nodes.values().collect()
        } else {
            live
        }
    }

    /// Where a new topic's round-robin starts: spreads leaders across topics.
    fn assignment_start(&self) -> usize {
        self.topics.values().map(|t| t.partitions.len()).sum()
    }

    /// Replicas for the `n`th partition: round-robin over the nodes ordered so that racks
    /// alternate, so consecutive replicas of a partition sit on different racks where possible.
    fn new_partition(&self, n: usize, rf: usize) -> PartitionImage {
        let order = self.rack_alternating_nodes();
        PartitionImage::on((0..rf).map(|i| order[(n + i) % order.len()]).collect())
    }

    /// Partitions on the replicas a client chose (numbered from `first`): each list distinct,
    /// of registered nodes, and all of one length (`rf` when the topic has one already).
    fn assigned_partitions(
        &self,
        topic: &str,
        first: i32,
        assignments: &[Vec<NodeId>],
        rf: Option<usize>,
    ) -> Result<Vec<PartitionImage>, CommandError> {
        if assignments.is_empty() {
            return Err(CommandError::InvalidReplicaAssignment(format!(
                "no partitions assigned for '{topic}'"
            )));
        }
        let nodes: BTreeSet<NodeId> = self.nodes.keys().copied().collect();
        let rf = rf.unwrap_or(assignments[0].len());
        for (i, replicas) in assignments.iter().enumerate() {
            let name = format!("{topic}-{}", first + i as i32);
            check_replicas(&nodes, &name, replicas)?;
            if replicas.len() != rf {
                return Err(CommandError::InvalidReplicaAssignment(format!(
                    "{name} has {} replicas; every partition of '{topic}' must have {rf}",
                    replicas.len()
                )));
            }
        }
        Ok(assignments
            .iter()
            .cloned()
            .map(PartitionImage::on)
            .collect())
    }

    fn rack_alternating_nodes(&self) -> Vec<NodeId> {
        let mut by_rack: BTreeMap<Option<&str>, Vec<NodeId>> = BTreeMap::new();
        for n in self.placeable_nodes() {
            by_rack.entry(n.rack.as_deref()).or_default().push(n.id);
        }
        let mut order = Vec::with_capacity(self.nodes.len());
        let longest = by_rack.values().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            for ids in by_rack.values() {
                if let Some(id) = ids.get(i) {
                    order.push(*id);
                }
            }
        }
        order
    }

    /// Keeps each pipeline on its node while that node is unfenced and offers it; places the
    /// others on the unfenced offering node running the fewest (the lowest id on a tie).
    /// Pipelines that no live node offers are not placed anywhere. Moving a pipeline costs a
    /// restart of its source, so one moves only to even out loads that differ by two or more
    /// (the first node to offer is not left with them all).
    fn place_pipelines(&mut self) {
        let live: BTreeMap<NodeId, &BTreeSet<String>> = self
            .pipeline_offers
            .iter()
            .filter(|(id, _)| self.nodes.get(id).is_some_and(|n| !n.fenced))
            .map(|(id, names)| (*id, names))
            .collect();
        let offered: BTreeSet<&String> = self.pipeline_offers.values().flatten().collect();
        let mut kept: BTreeMap<String, NodeId> = BTreeMap::new();
        let mut load: BTreeMap<NodeId, usize> = live.keys().map(|id| (*id, 0)).collect();
        for (name, node) in &self.pipelines {
            if live.get(node).is_some_and(|names| names.contains(name)) {
                kept.insert(name.clone(), *node);
                *load.entry(*node).or_default() += 1;
            }
        }
        for name in offered {
            if kept.contains_key(name) {
                continue;
            }
            let choice = live
                .iter()
                .filter(|(_, names)| names.contains(name))
                .map(|(id, _)| *id)
                .min_by_key(|id| (load[id], *id));
            if let Some(node) = choice {
                kept.insert(name.clone(), node);
                *load.entry(node).or_default() += 1;
            }
        }
        // Each move narrows the gap between two nodes, so this ends.
        loop {
            let mut moved = false;
            for (name, node) in kept.clone() {
                let target = live
                    .iter()
                    .filter(|(_, names)| names.contains(&name))
                    .map(|(id, _)| *id)
                    .min_by_key(|id| (load[id], *id));
                if let Some(target) = target.filter(|t| load[t] + 1 < load[&node]) {
                    kept.insert(name, target);
                    *load.get_mut(&node).expect("a live node") -= 1;
                    *load.get_mut(&target).expect("a live node") += 1;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        self.pipelines = kept;
    }

    fn fenced_nodes(&self) -> BTreeSet<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.fenced)
            .map(|n| n.id)
            .collect()
    }

    /// Moves leadership away from a fenced node and drops it from every in-sync set. A
    /// partition whose only in-sync replica it was keeps it there and goes offline (leader
    /// -1), unless unclean.leader.election.enable lets another replica lead.
    fn fence(&mut self, id: NodeId) {
        let fenced = self.fenced_nodes();
        for t in self.topics.values_mut() {
            let unclean = t
                .configs
                .get("unclean.leader.election.enable")
                .is_some_and(|v| v == "true");
            for p in &mut t.partitions {
                if !p.replicas.contains(&id) {
                    continue;
                }
                let others: Vec<NodeId> = p.isr.iter().copied().filter(|r| *r != id).collect();
                if p.leader == id {
                    let next = others
                        .iter()
                        .copied()
                        .find(|r| !fenced.contains(r))
                        .or_else(|| {
                            unclean
                                .then(|| p.replicas.iter().copied().find(|r| !fenced.contains(r)))
                                .flatten()
                        });
                    p.leader_epoch += 1;
                    match next {
                        Some(n) => {
                            p.leader = n;
                            p.isr = if others.contains(&n) { others } else { vec![n] };
                        }
                        None => p.leader = -1,
                    }
                } else if p.isr.contains(&id) && !others.is_empty() {
                    p.isr = others;
                }
            }
        }
    }

    /// Offline partitions that this node can lead again get it as leader.
    fn unfence(&mut self, id: NodeId) {
        for t in self.topics.values_mut() {
            for p in &mut t.partitions {
                if p.leader < 0 && p.isr.contains(&id) {
                    p.leader = id;
                    p.leader_epoch += 1;
                    p.isr = vec![id];
                }
            }
        }
    }

    fn partition_mut(
        &mut self,
        topic: &str,
        partition: i32,
    ) -> Result<&mut PartitionImage, CommandError> {
        self.topics
            .get_mut(topic)
            .and_then(|t| t.partitions.get_mut(usize::try_from(partition).ok()?))
            .ok_or_else(|| CommandError::UnknownTopic(format!("{topic}-{partition}")))
    }

    pub fn partition(&self, topic: &str, p: i32) -> Option<&PartitionImage> {
        self.topics
            .get(topic)?
            .partitions
            .get(usize::try_from(p).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, rack: Option<&str>) -> Command {
        Command::RegisterNode(NodeInfo {
            id,
            kafka_host: "127.0.0.1".into(),
            kafka_port: 9092 + id,
            cluster_addr: format!("127.0.0.1:{}", 9500 + id),
            rack: rack.map(str::to_string),
            incarnation: Uuid::nil(),
            fenced: false,
            listeners: Vec::new(),
            http_url: None,
        })
    }

    fn create(name: &str, partitions: i32, rf: i32) -> Command {
        Command::CreateTopic {
            name: name.into(),
            id: Uuid::new_v4(),
            partitions,
            replication_factor: rf,
            configs: BTreeMap::new(),
            if_missing: false,
            assignments: None,
        }
    }

    #[test]
    fn each_pipeline_runs_on_one_live_node_that_offers_it() {
        let mut img = ClusterImage::default();
        for id in 1..=3 {
            img.apply(&node(id, None)).unwrap();
        }
        let offer = |node: NodeId, names: &[&str]| Command::OfferPipelines {
            node,
            names: names.iter().map(|n| n.to_string()).collect(),
        };
        img.apply(&offer(1, &["a", "b", "c"])).unwrap();
        img.apply(&offer(2, &["a", "b", "c"])).unwrap();
        img.apply(&offer(3, &["a", "b", "pinned"])).unwrap();
        let on = |img: &ClusterImage, name: &str| img.pipelines.get(name).copied();
        // Spread: the node offering first is not left with them all.
        assert_eq!(img.pipelines.len(), 4);
        let mut load = BTreeMap::new();
        for n in img.pipelines.values() {
            *load.entry(*n).or_insert(0) += 1;
        }
        assert!(load.values().all(|c| *c <= 2), "{:?}", img.pipelines);
        assert_eq!(on(&img, "pinned"), Some(3));
        // A fenced node's pipelines move to another node that offers them; what only it
        // offers runs nowhere until it is back.
        let before = img.pipelines.clone();
        img.apply(&Command::FenceNode {
            id: 3,
            incarnation: Uuid::nil(),
        })
        .unwrap();
        assert_eq!(on(&img, "pinned"), None);
        for (name, n) in &img.pipelines {
            assert_ne!(*n, 3);
            if before[name] != 3 {
                assert_eq!(before[name], *n, "{name} moved although its node is up");
            }
        }
        img.apply(&Command::UnfenceNode {
            id: 3,
            incarnation: Uuid::nil(),
        })
        .unwrap();
        assert_eq!(on(&img, "pinned"), Some(3));
        // A pipeline its node stops offering moves; one nobody offers is dropped.
        let c_node = on(&img, "c").unwrap();
        let other = if c_node == 1 { 2 } else { 1 };
        img.apply(&offer(c_node, &["a", "b"])).unwrap();
        assert_eq!(on(&img, "c"), Some(other));
        img.apply(&offer(other, &["a", "b"])).unwrap();
        assert_eq!(on(&img, "c"), None);
        // Unknown nodes cannot offer.
        assert!(img.apply(&offer(9, &["x"])).is_err());
    }

    #[test]
    fn clients_may_choose_the_replicas() {
        let mut img = ClusterImage::default();
        for id in 1..=3 {
            img.apply(&node(id, None)).unwrap();
        }
        let with = |a: Vec<Vec<NodeId>>| {
            let mut c = create("a", 0, -1);
            if let Command::CreateTopic { assignments, .. } = &mut c {
                *assignments = Some(a);
            }
            c
        };
        for bad in [
            vec![],
            vec![vec![1, 1]],
            vec![vec![1, 9]],
            vec![vec![1, 2], vec![3]],
        ] {
            assert!(
                matches!(
                    img.apply(&with(bad.clone())),
                    Err(CommandError::InvalidReplicaAssignment(_))
                ),
                "{bad:?}"
            );
        }
        img.apply(&with(vec![vec![3, 1], vec![2, 3]])).unwrap();
        let t = &img.topics["a"];
        assert_eq!((t.partitions[0].leader, t.partitions[1].leader), (3, 2));
        assert_eq!(t.partitions[1].isr, vec![2, 3]);
        let grow = |total, a: Vec<Vec<NodeId>>| Command::CreatePartitions {
            name: "a".into(),
            total,
            assignments: Some(a),
        };
        // One assignment per new partition, with the topic's replication factor.
        assert!(img.apply(&grow(4, vec![vec![1, 2]])).is_err());
        assert!(img.apply(&grow(3, vec![vec![1]])).is_err());
        img.apply(&grow(3, vec![vec![1, 2]])).unwrap();
        assert_eq!(img.topics["a"].partitions[2].replicas, vec![1, 2]);
    }

    #[test]
    fn replicas_are_spread_over_nodes_and_racks() {
        let mut img = ClusterImage::default();
        for (id, rack) in [(1, "a"), (2, "a"), (3, "b"), (4, "b")] {
            img.apply(&node(id, Some(rack))).unwrap();
        }
        img.apply(&create("t", 8, 2)).unwrap();
        let t = &img.topics["t"];
        let mut leaders = BTreeMap::new();
        for p in &t.partitions {
            assert_eq!(p.replicas.len(), 2);
            assert_eq!(p.leader, p.replicas[0]);
            assert_eq!(p.isr, p.replicas);
            let racks: BTreeSet<_> = p
                .replicas
                .iter()
                .map(|r| img.nodes[r].rack.clone())
                .collect();
            assert_eq!(racks.len(), 2, "{p:?} has both replicas on one rack");
            *leaders.entry(p.leader).or_insert(0) += 1;
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), [2, 2, 2, 2]);
    }

    #[test]
    fn new_replicas_go_to_unfenced_nodes_only() {
        let mut img = ClusterImage::default();
        for id in 1..=3 {
            img.apply(&node(id, None)).unwrap();
        }
        let incarnation = img.nodes[&2].incarnation;
        img.apply(&Command::FenceNode { id: 2, incarnation })
            .unwrap();
        img.apply(&create("t", 4, 2)).unwrap();
        for p in &img.topics["t"].partitions {
            assert!(!p.replicas.contains(&2), "{p:?} placed on the fenced node");
        }
        img.apply(&create("all", 1, -1)).unwrap();
        assert_eq!(img.topics["all"].partitions[0].replicas.len(), 2);
        assert!(matches!(
            img.apply(&create("three", 1, 3)),
            Err(CommandError::InvalidReplicationFactor(_))
        ));
    }

    #[test]
    fn commands_are_checked_and_deletions_remembered() {
        let mut img = ClusterImage::default();
        for id in 1..=3 {
            img.apply(&node(id, None)).unwrap();
        }
        assert!(matches!(
            img.apply(&create("t", 1, 4)),
            Err(CommandError::InvalidReplicationFactor(_))
        ));
        img.apply(&create("t", 2, -1)).unwrap();
        assert_eq!(img.topics["t"].partitions[0].replicas.len(), 3);
        assert_eq!(
            img.apply(&create("t", 1, 1)),
            Err(CommandError::TopicExists("t".into()))
        );
        let mut again = create("t", 1, 1);
        if let Command::CreateTopic { if_missing, .. } = &mut again {
            *if_missing = true;
        }
        img.apply(&again).unwrap();
        img.apply(&Command::CreatePartitions {
            name: "t".into(),
            total: 5,
            assignments: None,
        })
        .unwrap();
        assert_eq!(img.topics["t"].partitions.len(), 5);
        assert!(img
            .apply(&Command::CreatePartitions {
                name: "t".into(),
                total: 5,
                assignments: None,
            })
            .is_err());
        let id = img.topics["t"].id;
        img.apply(&Command::DeleteTopic { name: "t".into() })
            .unwrap();
        assert!(img.deleted_topics.contains(&id));
        assert!(img.topics.is_empty());
        assert_eq!(img.version, 10);
    }

    fn incarnation(img: &ClusterImage, id: NodeId) -> Uuid {
        img.nodes[&id].incarnation
    }

    #[test]
    fn fencing_moves_leadership_to_in_sync_replicas_and_back() {
        let mut img = ClusterImage::default();
        for id in 1..=3 {
            let mut c = node(id, None);
            if let Command::RegisterNode(info) = &mut c {
                info.incarnation = Uuid::new_v4();
            }
            img.apply(&c).unwrap();
        }
        img.apply(&create("t", 3, 3)).unwrap();
        let led_by_1 = img.topics["t"]
            .partitions
            .iter()
            .position(|p| p.leader == 1)
            .unwrap();
        // A stale incarnation (the node restarted since) is refused.
        assert_eq!(
            img.apply(&Command::FenceNode {
                id: 1,
                incarnation: Uuid::nil()
            }),
            Err(CommandError::StaleNode(1))
        );
        img.apply(&Command::FenceNode {
            id: 1,
            incarnation: incarnation(&img, 1),
        })
        .unwrap();
        for p in &img.topics["t"].partitions {
            assert_ne!(p.leader, 1);
            assert!(!p.isr.contains(&1), "{p:?}");
        }
        let p = &img.topics["t"].partitions[led_by_1];
        assert_eq!(p.leader_epoch, 1);
        assert!(p.isr.contains(&p.leader));
        // Fence the other two: the last in-sync replica stays in the set, the partition is
        // offline, and it comes back with that replica.
        img.apply(&Command::FenceNode {
            id: 2,
            incarnation: incarnation(&img, 2),
        })
        .unwrap();
        img.apply(&Command::FenceNode {
            id: 3,
            incarnation: incarnation(&img, 3),
        })
        .unwrap();
        assert!(img.topics["t"]
            .partitions
            .iter()
            .all(|p| p.leader == -1 && p.isr == [3]));
        img.apply(&Command::UnfenceNode {
            id: 1,
            incarnation: incarnation(&img, 1),
        })
        .unwrap();
        assert!(img.topics["t"].partitions.iter().all(|p| p.leader == -1));
        img.apply(&Command::UnfenceNode {
            id: 3,
            incarnation: incarnation(&img, 3),
        })
        .unwrap();
        assert!(img.topics["t"].partitions.iter().all(|p| p.leader == 3));
        // The preferred leader returns once it is in sync again.
        let epoch = img.topics["t"].partitions[led_by_1].leader_epoch;
        let elect = Command::ElectPreferred {
            topic: "t".into(),
            partition: led_by_1 as i32,
            leader_epoch: epoch,
        };
        assert!(img.apply(&elect).is_err(), "node 1 is not in sync yet");
        img.apply(&Command::AlterPartition {
            topic: "t".into(),
            partition: led_by_1 as i32,
            leader: 3,
            leader_epoch: epoch,
            isr: vec![3, 1],
        })
        .unwrap();
        img.apply(&elect).unwrap();
        let p = &img.topics["t"].partitions[led_by_1];
        assert_eq!(
            (p.leader, p.leader_epoch, p.isr.clone()),
            (1, epoch + 1, vec![1, 3])
        );
        // An in-sync change from a leader of an older epoch is refused.
        assert!(img
            .apply(&Command::AlterPartition {
                topic: "t".into(),
                partition: led_by_1 as i32,
                leader: 3,
                leader_epoch: epoch,
                isr: vec![3],
            })
            .is_err());
    }

    #[test]
    fn a_leader_that_cannot_write_hands_over_to_an_in_sync_replica() {
        let mut img = ClusterImage::default();
        for id in 1..=3 {
            img.apply(&node(id, None)).unwrap();
        }
        img.apply(&create("t", 1, 3)).unwrap();
        let p = img.topics["t"].partitions[0].clone();
        let resign = |leader, leader_epoch| Command::ResignLeader {
            topic: "t".into(),
            partition: 0,
            leader,
            leader_epoch,
        };
        // Only the leader, in its epoch.
        let other = p.isr.iter().copied().find(|r| *r != p.leader).unwrap();
        assert!(img.apply(&resign(other, p.leader_epoch)).is_err());
        assert!(img.apply(&resign(p.leader, p.leader_epoch - 1)).is_err());
        img.apply(&resign(p.leader, p.leader_epoch)).unwrap();
        let q = img.topics["t"].partitions[0].clone();
        assert_ne!(q.leader, p.leader);
        assert_eq!(q.leader_epoch, p.leader_epoch + 1);
        assert!(!q.isr.contains(&p.leader) && q.isr.contains(&q.leader));
        assert_eq!(q.isr.len(), 2);
        // The last in-sync replica has nobody to hand over to.
        img.apply(&Command::AlterPartition {
            topic: "t".into(),
            partition: 0,
            leader: q.leader,
            leader_epoch: q.leader_epoch,
            isr: vec![q.leader],
        })
        .unwrap();
        assert!(img.apply(&resign(q.leader, q.leader_epoch)).is_err());
        assert_eq!(img.topics["t"].partitions[0].leader, q.leader);
    }

    #[test]
    fn unclean_election_is_opt_in() {
        let mut img = ClusterImage::default();
        for id in 1..=2 {
            img.apply(&node(id, None)).unwrap();
        }
        let mut c = create("u", 1, 2);
        if let Command::CreateTopic { configs, .. } = &mut c {
            configs.insert("unclean.leader.election.enable".into(), "true".into());
        }
        img.apply(&c).unwrap();
        img.apply(&create("c", 1, 2)).unwrap();
        let leader = img.topics["c"].partitions[0].leader;
        let other = 3 - leader;
        for t in ["u", "c"] {
            let p = &mut img.topics.get_mut(t).unwrap().partitions[0];
            p.leader = leader;
            p.isr = vec![leader];
        }
        img.apply(&Command::FenceNode {
            id: leader,
            incarnation: Uuid::nil(),
        })
        .unwrap();
        assert_eq!(img.topics["c"].partitions[0].leader, -1);
        assert_eq!(img.topics["u"].partitions[0].leader, other);
    }

    #[test]
    fn producer_id_blocks_never_overlap() {
        let mut img = ClusterImage::default();
        img.apply(&Command::AllocateProducerIds {
            node: 1,
            size: 1000,
        })
        .unwrap();
        img.apply(&Command::AllocateProducerIds {
            node: 2,
            size: 1000,
        })
        .unwrap();
        img.apply(&Command::AllocateProducerIds {
            node: 1,
            size: 1000,
        })
        .unwrap();
        assert_eq!(img.producer_id_blocks[&2], (1000, 2000));
        assert_eq!(img.producer_id_blocks[&1], (2000, 3000));
    }

    #[test]
    fn reassignment_adds_then_removes_replicas() {
        let mut img = ClusterImage::default();
        for id in 1..=4 {
            img.apply(&node(id, None)).unwrap();
        }
        img.apply(&create("m", 1, 3)).unwrap();
        let before = img.topics["m"].partitions[0].clone();
        let leaving = before.leader;
        let target: Vec<NodeId> = (1..=4).filter(|n| *n != leaving).collect();
        let reassign = |r: Option<Vec<NodeId>>| Command::Reassign {
            topic: "m".into(),
            partition: 0,
            replicas: r,
        };
        assert!(img.apply(&reassign(Some(vec![1, 1]))).is_err());
        assert!(img.apply(&reassign(Some(vec![9]))).is_err());
        assert_eq!(
            img.apply(&reassign(None)),
            Err(CommandError::NoReassignmentInProgress("m-0".into()))
        );
        img.apply(&reassign(Some(target.clone()))).unwrap();
        let p = &img.topics["m"].partitions[0];
        assert_eq!(p.replicas.len(), 4, "{p:?}");
        assert_eq!(p.isr, before.isr, "the new replica is not in sync yet");
        let complete = Command::CompleteReassignment {
            topic: "m".into(),
            partition: 0,
        };
        assert!(img.apply(&complete).is_err(), "not in sync yet");
        let mut isr = before.isr.clone();
        isr.extend(target.iter().filter(|n| !before.isr.contains(n)));
        img.apply(&Command::AlterPartition {
            topic: "m".into(),
            partition: 0,
            leader: leaving,
            leader_epoch: 0,
            isr,
        })
        .unwrap();
        img.apply(&complete).unwrap();
        let p = &img.topics["m"].partitions[0];
        assert_eq!(p.replicas, target);
        assert_eq!(p.isr, target);
        assert_eq!((p.leader, p.leader_epoch), (target[0], 1));
        assert!(p.target.is_none() && p.original.is_none());
    }
}
