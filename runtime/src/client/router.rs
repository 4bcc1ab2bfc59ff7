//! Requests sent to the node they concern: a partition's leader, a group's or a transactional
//! id's coordinator. Nodes and leaders are learnt through Metadata from the bootstrap address
//! and learnt again when leadership moves, so the CLI works against a cluster as against one
//! node.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{FindCoordinatorRequest, MetadataRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::{check, Connection};

/// FindCoordinator key types.
pub const GROUP: i8 = 0;
pub const TRANSACTION: i8 = 1;

/// How often a request about moving leadership is tried before giving up.
const ATTEMPTS: usize = 20;
const BACKOFF: Duration = Duration::from_millis(500);

pub struct Router {
    /// The addresses given (comma-separated), tried in turn for metadata.
    bootstrap: Vec<String>,
    /// Each node's Kafka address.
    nodes: BTreeMap<i32, String>,
    leaders: HashMap<(String, i32), i32>,
    conns: HashMap<i32, Connection>,
    /// The connection metadata is asked on (to a bootstrap address).
    meta: Option<Connection>,
}

/// Whether an error means the request went to the wrong node and nothing was done: ask again
/// after looking up the leader (or coordinator).
pub fn is_misdirected(code: i16) -> bool {
    matches!(
        ResponseError::try_from_code(code),
        Some(
            ResponseError::NotLeaderOrFollower
                | ResponseError::LeaderNotAvailable
                | ResponseError::FencedLeaderEpoch
                | ResponseError::UnknownLeaderEpoch
                | ResponseError::NotCoordinator
                | ResponseError::CoordinatorNotAvailable
                | ResponseError::CoordinatorLoadInProgress
        )
    )
}

impl Router {
    /// Connects to the first reachable of the comma-separated `brokers`.
    pub async fn connect(brokers: &str) -> Result<Router> {
        let mut r = Router {
            bootstrap: brokers
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            nodes: BTreeMap::new(),
            leaders: HashMap::new(),
            conns: HashMap::new(),
            meta: None,
        };
        if r.bootstrap.is_empty() {
            bail!("no broker address given");
        }
        r.meta_conn().await?;
        Ok(r)
    }

    async fn meta_conn(&mut self) -> Result<&mut Connection> {
        if self.meta.is_none() {
            let mut last = None;
            // Known nodes first: a bootstrap address may be the node that went away.
            let addrs: Vec<String> = self
                .nodes
                .values()
                .chain(self.bootstrap.iter())
                .cloned()
                .collect();
            for addr in addrs {
                match Connection::connect(&addr).await {
                    Ok(c) => {
                        self.meta = Some(c);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if self.meta.is_none() {
                return Err(last.unwrap_or_else(|| anyhow!("no broker reachable")));
            }
        }
        Ok(self.meta.as_mut().expect("connected above"))
    }

    /// Partition ids of `topic` (sorted), learning their leaders; creates the topic when the
    /// broker auto-creates topics and `create` is set.
    pub async fn partitions(&mut self, topic: &str, create: bool) -> Result<Vec<i32>> {
        let req = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_string())),
            ))]))
            .with_allow_auto_topic_creation(create);
        let resp = match self.meta_conn().await?.call(&req).await {
            Ok(r) => r,
            Err(e) => {
                self.meta = None;
                return Err(e);
            }
        };
        for b in &resp.brokers {
            self.nodes
                .insert(b.node_id.0, format!("{}:{}", &*b.host, b.port));
        }
        let t = resp
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("broker returned no metadata for topic '{topic}'"))?;
        check(t.error_code, &format!("topic '{topic}'"))?;
        let mut ids = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            ids.push(p.partition_index);
            self.leaders
                .insert((topic.to_string(), p.partition_index), p.leader_id.0);
        }
        ids.sort_unstable();
        if ids.is_empty() {
            bail!("topic '{topic}' has no partitions");
        }
        Ok(ids)
    }

    /// `partitions` grouped by their leader, as last learnt (-1: no leader now).
    pub fn by_leader(&self, topic: &str, partitions: &[i32]) -> BTreeMap<i32, Vec<i32>> {
        let mut out: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for &p in partitions {
            let leader = self
                .leaders
                .get(&(topic.to_string(), p))
                .copied()
                .unwrap_or(-1);
            out.entry(leader).or_default().push(p);
        }
        out
    }

    /// The connection to node `id`, made on first use.
    pub async fn node(&mut self, id: i32) -> Result<&mut Connection> {
        if !self.conns.contains_key(&id) {
            let addr = self
                .nodes
                .get(&id)
                .ok_or_else(|| anyhow!("node {id} is not known (no leader?)"))?
                .clone();
            let c = Connection::connect(&addr)
                .await
                .with_context(|| format!("node {id}"))?;
            self.conns.insert(id, c);
        }
        Ok(self.conns.get_mut(&id).expect("connected above"))
    }

    /// Every node's id, learnt anew.
    pub async fn node_ids(&mut self) -> Result<Vec<i32>> {
        let resp = self
            .meta_conn()
            .await?
            .call(&MetadataRequest::default().with_topics(Some(vec![])))
            .await?;
        for b in &resp.brokers {
            self.nodes
                .insert(b.node_id.0, format!("{}:{}", &*b.host, b.port));
        }
        Ok(resp.brokers.iter().map(|b| b.node_id.0).collect())
    }

    /// Forgets a node's connection (after an error on it) and what was learnt of leaders,
    /// so the next request looks them up again.
    pub fn forget(&mut self, id: i32) {
        self.conns.remove(&id);
        self.leaders.clear();
    }

    /// The node coordinating `key` (a group or a transactional id), retried while coordination
    /// is moving.
    pub async fn coordinator(&mut self, key_type: i8, key: &str) -> Result<i32> {
        for attempt in 1..=ATTEMPTS {
            let conn = self.meta_conn().await?;
            // v4 asks for a list of keys, older versions for one.
            let req = if conn.sender.versions().get::<FindCoordinatorRequest>()? >= 4 {
                FindCoordinatorRequest::default()
                    .with_key_type(key_type)
                    .with_coordinator_keys(vec![StrBytes::from_string(key.to_string())])
            } else {
                FindCoordinatorRequest::default()
                    .with_key_type(key_type)
                    .with_key(StrBytes::from_string(key.to_string()))
            };
            let resp = conn.call(&req).await?;
            let (code, node, host, port) = match resp.coordinators.first() {
                Some(c) => (c.error_code, c.node_id.0, c.host.to_string(), c.port),
                None => (
                    resp.error_code,
                    resp.node_id.0,
                    resp.host.to_string(),
                    resp.port,
                ),
            };
            if code == 0 && node >= 0 {
                self.nodes.insert(node, format!("{host}:{port}"));
                return Ok(node);
            }
            if !is_misdirected(code) || attempt == ATTEMPTS {
                check(code, &format!("find the coordinator of '{key}'"))?;
            }
            tokio::time::sleep(BACKOFF).await;
        }
        bail!("no coordinator for '{key}'")
    }
}

/// Waits before trying a misdirected request again; false once it is time to give up.
pub async fn pause_before_retry(attempt: usize) -> bool {
    if attempt >= ATTEMPTS {
        return false;
    }
    tokio::time::sleep(BACKOFF).await;
    true
}
