//! Transactions across the nodes of a cluster. The coordinator (the leader of
//! `__transaction_state`) has each partition's leader write its markers with WriteTxnMarkers,
//! as Kafka's coordinator does, and asks the leaders for their open transactions with
//! DescribeProducers (to find hanging ones); a partition leader checks a transactional batch
//! against a coordinator on another node with DescribeTransactions (KIP-890's verification).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::anyhow;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_producers_request::TopicRequest;
use kafka_protocol::messages::write_txn_markers_request::{
    WritableTxnMarker, WritableTxnMarkerTopic,
};
use kafka_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
};
use kafka_protocol::messages::{
    DescribeProducersRequest, DescribeTransactionsRequest, ProducerId, TopicName, TransactionalId,
    WriteTxnMarkersRequest, WriteTxnMarkersResponse,
};
use kafka_protocol::protocol::Request;
use parking_lot::Mutex;

use super::apis::RequestContext;
use super::{str_bytes, Broker};
use crate::client::Connection;
use crate::cluster::image::{Command, NodeId};
use crate::cluster::Cluster;
use crate::log::producer_state::ActiveProducer;
use crate::security::acl::{Operation, ResourceType, CLUSTER_NAME};
use crate::txn::{ClusterLink, Marker, ProducerRef};

/// How long one request to another node may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a marker is retried (leaders move, nodes restart) before the coordinator's timers
/// take over.
const MARKER_DEADLINE: Duration = Duration::from_secs(15);

/// One connection to each other node's Kafka listener, made on first use and again after an
/// error; requests to one node go one at a time, each given `timeout` to be answered.
pub struct Peers {
    conns: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
    timeout: Duration,
}

impl Default for Peers {
    fn default() -> Peers {
        Peers::new(CALL_TIMEOUT)
    }
}

impl Peers {
    pub fn new(timeout: Duration) -> Peers {
        Peers {
            conns: Default::default(),
            timeout,
        }
    }

    pub async fn call<R: Request>(
        &self,
        cluster: &Cluster,
        node: NodeId,
        req: &R,
    ) -> anyhow::Result<R::Response> {
        let addr = {
            let image = cluster.image();
            let n = image
                .nodes
                .get(&node)
                .ok_or_else(|| anyhow!("node {node} is not registered"))?;
            cluster.settings.routes.to(&n.kafka_addr())
        };
        let slot = self.conns.lock().entry(node).or_default().clone();
        let timeout = self.timeout;
        // The wait for the connection counts too: calls queued behind calls to a node that
        // does not answer must not wait one timeout each, one after the other.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut slot = tokio::time::timeout_at(deadline, slot.lock())
            .await
            .map_err(|_| {
                anyhow!("node {node} busy: no answer to earlier calls within {timeout:?}")
            })?;
        // The connection is out of its slot while in use and goes back only after a whole
        // answer: a call dropped half-way (or failed) leaves a fresh connection to the next.
        let mut conn = slot.take();
        let result = tokio::time::timeout_at(deadline, async {
            let c = match &mut conn {
                Some(c) => c,
                None => conn.insert(Connection::connect(&addr).await?),
            };
            c.call(req).await
        })
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer from node {node} within {timeout:?}")));
        if result.is_ok() {
            *slot = conn;
        }
        result
    }
}

/// WriteTxnMarkers: the coordinator's markers, written by this node as the partitions' leader
/// and held by their in-sync replicas before the answer.
pub async fn write_txn_markers(
    broker: &Broker,
    ctx: &RequestContext,
    req: WriteTxnMarkersRequest,
) -> WriteTxnMarkersResponse {
    // Only nodes (or principals acting for the cluster) write markers.
    let refused = broker.refusal(
        ctx,
        Operation::ClusterAction,
        ResourceType::Cluster,
        CLUSTER_NAME,
    );
    let mut results = Vec::with_capacity(req.markers.len());
    for m in req.markers {
        let marker = Marker {
            producer_id: m.producer_id.0,
            producer_epoch: m.producer_epoch,
            commit: m.transaction_result,
        };
        let mut topics = Vec::with_capacity(m.topics.len());
        for t in m.topics {
            let mut partitions = Vec::with_capacity(t.partition_indexes.len());
            for p in t.partition_indexes {
                let written = match refused {
                    Some(e) => Err(e),
                    None => {
                        write_marker_here(broker, &t.name, p, marker, m.coordinator_epoch).await
                    }
                };
                let code = written.err().map_or(0, |e| e.code());
                partitions.push(
                    WritableTxnMarkerPartitionResult::default()
                        .with_partition_index(p)
                        .with_error_code(code),
                );
            }
            topics.push(
                WritableTxnMarkerTopicResult::default()
                    .with_name(t.name)
                    .with_partitions(partitions),
            );
        }
        results.push(
            WritableTxnMarkerResult::default()
                .with_producer_id(m.producer_id)
                .with_topics(topics),
        );
    }
    WriteTxnMarkersResponse::default().with_markers(results)
}

/// Writes a marker to a partition this node leads and waits for its in-sync replicas.
async fn write_marker_here(
    broker: &Broker,
    topic: &str,
    partition: i32,
    marker: Marker,
    coordinator_epoch: i32,
) -> Result<(), ResponseError> {
    let epoch = broker.leadership(topic, partition)?.map(|s| s.epoch);
    let p = broker
        .log
        .partition(topic, partition)
        .ok_or(ResponseError::UnknownTopicOrPartition)?;
    broker
        .txns
        .write_local_marker(&p, marker, coordinator_epoch)
        .await?;
    if broker.cluster.is_some() {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        super::produce::wait_replicated(&p, p.log_end_offset(), epoch, deadline).await?;
    }
    Ok(())
}

/// The transaction coordinator's view of the cluster, through this node's broker.
pub struct ClusterTxnLink {
    cluster: Arc<Cluster>,
    /// Set once the broker exists (it holds the coordinator, so this link cannot own it).
    broker: std::sync::OnceLock<Weak<Broker>>,
}

impl ClusterTxnLink {
    pub fn new(cluster: Arc<Cluster>) -> Arc<ClusterTxnLink> {
        Arc::new(ClusterTxnLink {
            cluster,
            broker: std::sync::OnceLock::new(),
        })
    }

    pub fn bind(&self, broker: &Arc<Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    fn broker(&self) -> Result<Arc<Broker>, ResponseError> {
        self.broker
            .get()
            .and_then(Weak::upgrade)
            .ok_or(ResponseError::CoordinatorNotAvailable)
    }

    /// One attempt at a marker on the partition's leader (none is needed when the partition
    /// is gone).
    async fn try_marker(
        &self,
        broker: &Broker,
        topic: &str,
        partition: i32,
        marker: Marker,
    ) -> Result<(), ResponseError> {
        // The coordinator's leader epoch fences markers from a deposed coordinator.
        let coordinator_epoch = broker
            .leadership(crate::txn::TOPIC, 0)
            .ok()
            .flatten()
            .map_or(0, |s| s.epoch);
        let leader = match self.cluster.image().partition(topic, partition) {
            None => return Ok(()),
            Some(p) if p.leader < 0 => return Err(ResponseError::LeaderNotAvailable),
            Some(p) => p.leader,
        };
        if leader == broker.node_id {
            return write_marker_here(broker, topic, partition, marker, coordinator_epoch).await;
        }
        let req =
            WriteTxnMarkersRequest::default().with_markers(vec![WritableTxnMarker::default()
                .with_producer_id(ProducerId(marker.producer_id))
                .with_producer_epoch(marker.producer_epoch)
                .with_transaction_result(marker.commit)
                .with_coordinator_epoch(coordinator_epoch)
                .with_topics(vec![WritableTxnMarkerTopic::default()
                    .with_name(TopicName(str_bytes(topic.to_string())))
                    .with_partition_indexes(vec![partition])])]);
        let resp = broker
            .peers
            .call(&self.cluster, leader, &req)
            .await
            .map_err(|e| {
                tracing::debug!(node = leader, error = %e, "WriteTxnMarkers failed");
                ResponseError::NetworkException
            })?;
        let code = resp
            .markers
            .iter()
            .flat_map(|m| &m.topics)
            .flat_map(|t| &t.partitions)
            .find(|p| p.partition_index == partition)
            .map_or(ResponseError::UnknownServerError.code(), |p| p.error_code);
        match ResponseError::try_from_code(code) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

#[async_trait::async_trait]
impl ClusterLink for ClusterTxnLink {
    async fn reserve_producer_ids(&self, size: i64) -> Result<(i64, i64), ResponseError> {
        let node = self.cluster.node_id;
        self.cluster
            .run(Command::AllocateProducerIds { node, size })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot reserve producer ids");
                ResponseError::RequestTimedOut
            })?;
        // Only this node replaces its own block, and allocations here are serialised.
        self.cluster
            .image()
            .producer_id_blocks
            .get(&node)
            .copied()
            .ok_or(ResponseError::UnknownServerError)
    }

    fn partition_exists(&self, topic: &str, partition: i32) -> bool {
        self.cluster.image().partition(topic, partition).is_some()
    }

    async fn write_marker(
        &self,
        topic: &str,
        partition: i32,
        marker: Marker,
    ) -> Result<(), ResponseError> {
        let broker = self.broker()?;
        let deadline = tokio::time::Instant::now() + MARKER_DEADLINE;
        loop {
            let e = match self.try_marker(&broker, topic, partition, marker).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let retriable = matches!(
                e,
                ResponseError::NotLeaderOrFollower
                    | ResponseError::LeaderNotAvailable
                    | ResponseError::NetworkException
                    | ResponseError::RequestTimedOut
                    | ResponseError::NotEnoughReplicas
                    | ResponseError::UnknownTopicOrPartition
            );
            if !retriable || tokio::time::Instant::now() >= deadline {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn state_replicated(&self) -> Result<(), ResponseError> {
        self.broker()?.internal_replicated(crate::txn::TOPIC).await
    }

    async fn partition_producers(&self) -> Vec<(String, i32, ActiveProducer)> {
        let Ok(broker) = self.broker() else {
            return Vec::new();
        };
        let mut by_leader: BTreeMap<NodeId, BTreeMap<String, Vec<i32>>> = BTreeMap::new();
        for (name, t) in &self.cluster.image().topics {
            for (i, p) in t
                .partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.leader >= 0)
            {
                let topics = by_leader.entry(p.leader).or_default();
                topics.entry(name.clone()).or_default().push(i as i32);
            }
        }
        let mut producers = Vec::new();
        for (node, topics) in by_leader {
            if node == broker.node_id {
                for (topic, partition) in topics
                    .iter()
                    .flat_map(|(t, ps)| ps.iter().map(move |p| (t, *p)))
                {
                    for producer in broker.producers_here(topic, partition).unwrap_or_default() {
                        producers.push((topic.clone(), partition, producer));
                    }
                }
                continue;
            }
            let req = DescribeProducersRequest::default().with_topics(
                topics
                    .into_iter()
                    .map(|(name, partitions)| {
                        TopicRequest::default()
                            .with_name(TopicName(str_bytes(name)))
                            .with_partition_indexes(partitions)
                    })
                    .collect(),
            );
            let resp = match broker.peers.call(&self.cluster, node, &req).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::debug!(node, error = %e, "DescribeProducers failed");
                    continue;
                }
            };
            for t in resp.topics {
                for p in t.partitions.iter().filter(|p| p.error_code == 0) {
                    for producer in &p.active_producers {
                        producers.push((
                            t.name.0.to_string(),
                            p.partition_index,
                            super::txn::active_producer(producer),
                        ));
                    }
                }
            }
        }
        producers
    }
}

impl Broker {
    /// KIP-890's check before a transactional write to `topic`-`partition`: the producer's
    /// transaction is open and holds the partition. Asked of the coordinator on whichever node
    /// it runs; CoordinatorNotAvailable when it cannot be reached (the client retries).
    pub async fn verify_txn_partition(
        &self,
        transactional_id: &str,
        producer: ProducerRef,
        topic: &str,
        partition: i32,
    ) -> Result<(), ResponseError> {
        let cluster = match &self.cluster {
            Some(c) if !self.txns.is_active() => c,
            // The coordinator runs here.
            _ => {
                return self
                    .txns
                    .verify_partition(transactional_id, producer, topic, partition)
                    .await
            }
        };
        let coordinator = cluster
            .image()
            .partition(crate::txn::TOPIC, 0)
            .map_or(-1, |p| p.leader);
        if coordinator < 0 || coordinator == self.node_id {
            // No coordinator, or this node is only now taking over.
            return Err(ResponseError::CoordinatorNotAvailable);
        }
        let req =
            DescribeTransactionsRequest::default().with_transactional_ids(vec![TransactionalId(
                str_bytes(transactional_id.to_string()),
            )]);
        let resp = self
            .peers
            .call(cluster, coordinator, &req)
            .await
            .map_err(|e| {
                tracing::debug!(node = coordinator, error = %e, "cannot ask the transaction coordinator");
                ResponseError::CoordinatorNotAvailable
            })?;
        let state = resp
            .transaction_states
            .into_iter()
            .next()
            .ok_or(ResponseError::CoordinatorNotAvailable)?;
        match ResponseError::try_from_code(state.error_code) {
            None => {}
            Some(ResponseError::TransactionalIdNotFound) => {
                return Err(ResponseError::InvalidProducerIdMapping)
            }
            Some(_) => return Err(ResponseError::CoordinatorNotAvailable),
        }
        if state.producer_id.0 != producer.id {
            return Err(ResponseError::InvalidProducerIdMapping);
        }
        if state.producer_epoch != producer.epoch {
            return Err(ResponseError::ProducerFenced);
        }
        let holds = state
            .topics
            .iter()
            .any(|t| *t.topic.0 == *topic && t.partitions.contains(&partition));
        if state.transaction_state.as_str() != crate::txn::TxnState::Ongoing.name() || !holds {
            return Err(ResponseError::InvalidTxnState);
        }
        Ok(())
    }
}
