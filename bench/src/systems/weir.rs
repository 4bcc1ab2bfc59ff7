//! weir, driven with its own client code (`weir::client`, `weir::log::batch`, the CLI's fetch
//! request), started as subprocesses: `weir serve` on free loopback ports and a scratch
//! directory, or for the replicated workloads three of them forming a cluster (`--node-id`,
//! `--voters`). Producers and consumers find each partition's leader through Metadata and talk
//! to it directly, one connection per leader.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    CreateTopicsRequest, FetchRequest, FetchResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, TopicName,
};
use kafka_protocol::records::Compression;
use tokio::sync::{mpsc, oneshot};
use weir::cli::consume::fetch_request;
use weir::client::{check, Connection, Sender};
use weir::kafka::str_bytes;
use weir::log::batch::{complete_batches, BatchBuilder};

use crate::proc::{free_port, Server};
use crate::workload::{
    Ack, Batch, Consumer, Durability, Producer, Settings, System, MIN_RECORD_SIZE,
};

/// Nodes of the cluster the replicated workloads run on (the replication factor).
const CLUSTER_NODES: usize = 3;

/// Where the measured records start in every partition: after one warm-up record.
const FIRST_OFFSET: i64 = 1;

pub struct Weir {
    /// Stopped one after the other when dropped, each once the previous one has exited: a
    /// cluster node's controlled shutdown hands its partitions over through the metadata
    /// quorum, and waits up to 10 s for it when the other nodes are stopping too.
    servers: Vec<Server>,
    /// The nodes' Kafka listeners.
    addrs: Vec<String>,
    durability: Durability,
    fetch_bytes: i32,
}

impl Weir {
    pub async fn start(
        bin: &Path,
        dir: &Path,
        durability: Durability,
        s: &Settings,
    ) -> Result<Weir> {
        let nodes = match durability {
            Durability::Rf3 => CLUSTER_NODES,
            Durability::Ack1 | Durability::Fsync => 1,
        };
        // The cluster listeners, `1@127.0.0.1:PORT,...`.
        let voters = (nodes > 1)
            .then(|| {
                (1..=nodes)
                    .map(|id| Ok(format!("{id}@127.0.0.1:{}", free_port()?)))
                    .collect::<Result<Vec<String>>>()
            })
            .transpose()?
            .map(|v| v.join(","));
        let mut weir = Weir {
            servers: vec![],
            addrs: vec![],
            durability,
            fetch_bytes: s.fetch_bytes as i32,
        };
        for id in 1..=nodes {
            let dir = match nodes {
                1 => dir.to_path_buf(),
                _ => dir.join(format!("node{id}")),
            };
            std::fs::create_dir_all(&dir)?;
            let addr = format!("127.0.0.1:{}", free_port()?);
            let mut cmd = Command::new(bin);
            // In its scratch directory: nothing relative to the caller's (such as a
            // ./pipelines directory, which `weir serve` loads when present) reaches it.
            cmd.current_dir(&dir)
                .arg("serve")
                .arg("--data-dir")
                .arg(dir.join("data"))
                .args(["--kafka-addr", &addr])
                .args(["--http-addr", &format!("127.0.0.1:{}", free_port()?)])
                .env("WEIR_LOG", "warn");
            if let Some(voters) = &voters {
                cmd.args(["--node-id", &id.to_string(), "--voters", voters]);
            }
            let name = match nodes {
                1 => "weir".to_string(),
                _ => format!("weir node {id}"),
            };
            weir.servers.push(Server::spawn(&name, cmd, &dir)?);
            weir.addrs.push(addr);
        }
        for (server, addr) in weir.servers.iter_mut().zip(&weir.addrs) {
            server.wait_listening(addr).await?;
        }
        // A cluster's nodes listen at once but answer only once they have a quorum.
        weir.wait_for_metadata(None, "every node to see the whole cluster", |m| {
            m.brokers.len() == nodes
        })
        .await?;
        Ok(weir)
    }

    /// Asks every node for Metadata (of `topic`, or of no topic) until each answer satisfies
    /// `ready`; fails after 60 s or when a node exits.
    async fn wait_for_metadata(
        &mut self,
        topic: Option<&str>,
        what: &str,
        ready: impl Fn(&MetadataResponse) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut not_yet = None;
            for addr in &self.addrs {
                let answer = tokio::time::timeout(Duration::from_secs(5), metadata(addr, topic));
                not_yet = match answer.await {
                    Ok(Ok(m)) if ready(&m) => continue,
                    Ok(Ok(_)) => Some(format!("{addr} is not ready")),
                    Ok(Err(e)) => Some(format!("{addr}: {e:#}")),
                    Err(_) => Some(format!("{addr} did not answer within 5 s")),
                };
                break;
            }
            let Some(not_yet) = not_yet else {
                return Ok(());
            };
            for server in &mut self.servers {
                server.check_running()?;
            }
            if Instant::now() > deadline {
                bail!("timed out after 60 s waiting for {what} ({not_yet})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The partitions of `topic` each node leads, by the node's Kafka address.
    async fn leaders(&self, topic: &str) -> Result<BTreeMap<String, Vec<i32>>> {
        let m = metadata(&self.addrs[0], Some(topic)).await?;
        let brokers: HashMap<i32, String> = m
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", &*b.host, b.port)))
            .collect();
        let t = m.topics.first().context("no metadata for the topic")?;
        check(t.error_code, "topic metadata")?;
        let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for p in &t.partitions {
            let addr = brokers
                .get(&p.leader_id.0)
                .with_context(|| format!("partition {} has no known leader", p.partition_index))?;
            out.entry(addr.clone()).or_default().push(p.partition_index);
        }
        Ok(out)
    }
}

async fn metadata(addr: &str, topic: Option<&str>) -> Result<MetadataResponse> {
    let topics = topic
        .map(|t| MetadataRequestTopic::default().with_name(Some(TopicName(str_bytes(t)))))
        .into_iter()
        .collect();
    let req = MetadataRequest::default()
        .with_topics(Some(topics))
        .with_allow_auto_topic_creation(false);
    Connection::connect(addr).await?.call(&req).await
}

impl System for Weir {
    type P = WeirProducer;
    type C = WeirConsumer;

    async fn create_topic(&mut self, topic: &str, partitions: usize) -> Result<()> {
        let (replication_factor, config) = match self.durability {
            Durability::Ack1 => (-1, None),
            Durability::Fsync => (-1, Some(("flush.messages", "1"))),
            Durability::Rf3 => (CLUSTER_NODES as i16, Some(("min.insync.replicas", "3"))),
        };
        let configs = config
            .map(|(name, value)| {
                CreatableTopicConfig::default()
                    .with_name(str_bytes(name))
                    .with_value(Some(str_bytes(value)))
            })
            .into_iter()
            .collect();
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(vec![CreatableTopic::default()
                .with_name(TopicName(str_bytes(topic)))
                .with_num_partitions(partitions as i32)
                .with_replication_factor(replication_factor)
                .with_configs(configs)]);
        let resp = Connection::connect(&self.addrs[0])
            .await?
            .call(&req)
            .await?;
        for t in &resp.topics {
            check(t.error_code, "create the benchmark topic")?;
        }
        // Every node knows every partition's leader, and every replica is in sync.
        let nodes = self.servers.len();
        self.wait_for_metadata(Some(topic), "the topic on every node", |m| {
            m.topics.first().is_some_and(|t| {
                t.error_code == 0
                    && t.partitions.len() == partitions
                    && t.partitions
                        .iter()
                        .all(|p| p.leader_id.0 >= 0 && p.isr_nodes.len() == nodes)
            })
        })
        .await?;
        // A warm-up record in every partition, acknowledged like the measured ones: a follower
        // that asks for a new partition before its leader has created it retries only after
        // 100 ms, which would otherwise hold up the first measured writes.
        let mut producer = self.producer(topic, partitions).await?;
        let mut acks = vec![];
        for partition in 0..partitions {
            acks.push(
                producer
                    .send(Batch::build(partition, MIN_RECORD_SIZE, 1, 0))
                    .await?,
            );
        }
        for ack in acks {
            ack.await.context("the warm-up record")?;
        }
        Ok(())
    }

    async fn producer(&mut self, topic: &str, partitions: usize) -> Result<WeirProducer> {
        let acks = match self.durability {
            Durability::Ack1 => 1,
            Durability::Fsync | Durability::Rf3 => -1,
        };
        let mut conns = vec![];
        let mut leader_of = vec![None; partitions];
        for (addr, led) in self.leaders(topic).await? {
            for p in led {
                leader_of[p as usize] = Some(conns.len());
            }
            conns.push(ProduceConnection::connect(&addr).await?);
        }
        Ok(WeirProducer {
            conns,
            leader_of: leader_of
                .into_iter()
                .collect::<Option<_>>()
                .context("a partition has no leader")?,
            topic: topic.to_string(),
            acks,
        })
    }

    async fn consumer(&mut self, topic: &str, _partitions: usize) -> Result<WeirConsumer> {
        let (responses_tx, responses) = mpsc::unbounded_channel();
        let mut legs = vec![];
        for (addr, led) in self.leaders(topic).await? {
            let (sender, mut receiver) = Connection::connect(&addr).await?.into_split();
            let (versions, mut versions_rx) = mpsc::unbounded_channel::<i16>();
            let responses_tx = responses_tx.clone();
            let leg = legs.len();
            tokio::spawn(async move {
                while let Some(version) = versions_rx.recv().await {
                    let resp = receiver.recv::<FetchRequest>(version).await;
                    let failed = resp.is_err();
                    if responses_tx.send((leg, resp)).is_err() || failed {
                        break;
                    }
                }
            });
            legs.push(FetchLeg {
                sender,
                versions,
                positions: led.into_iter().map(|p| (p, FIRST_OFFSET)).collect(),
            });
        }
        Ok(WeirConsumer {
            legs,
            responses,
            topic: topic.to_string(),
            fetch_bytes: self.fetch_bytes,
            started: false,
        })
    }

    fn servers(&self) -> &[Server] {
        &self.servers
    }
}

/// Produces to each partition's leader. Requests are pipelined on one connection per leader;
/// a task per connection reads its responses (which come back in order) and completes each
/// request's acknowledgement.
pub struct WeirProducer {
    conns: Vec<ProduceConnection>,
    /// The index in `conns` of each partition's leader.
    leader_of: Vec<usize>,
    topic: String,
    acks: i16,
}

struct ProduceConnection {
    sender: Sender,
    pending: mpsc::UnboundedSender<(i16, oneshot::Sender<Result<Instant>>)>,
}

impl ProduceConnection {
    async fn connect(addr: &str) -> Result<ProduceConnection> {
        let (sender, mut receiver) = Connection::connect(addr).await?.into_split();
        let (pending, mut rx) =
            mpsc::unbounded_channel::<(i16, oneshot::Sender<Result<Instant>>)>();
        tokio::spawn(async move {
            while let Some((version, done)) = rx.recv().await {
                let result = match receiver.recv::<ProduceRequest>(version).await {
                    Ok(resp) => resp
                        .responses
                        .iter()
                        .flat_map(|t| &t.partition_responses)
                        .try_for_each(|p| check(p.error_code, "produce"))
                        .map(|()| Instant::now()),
                    Err(e) => Err(e),
                };
                let failed = result.is_err();
                let _ = done.send(result);
                if failed {
                    break;
                }
            }
        });
        Ok(ProduceConnection { sender, pending })
    }
}

impl Producer for WeirProducer {
    async fn send(&mut self, batch: Batch) -> Result<Ack> {
        let now = weir::now_ms();
        let mut b = BatchBuilder::new(now);
        for record in batch.records() {
            b.push(None, Some(&record), &[], now);
        }
        let req = ProduceRequest::default()
            .with_acks(self.acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(str_bytes(self.topic.as_str())))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(batch.partition as i32)
                    .with_records(Some(b.finish(Compression::None).into()))])]);
        let conn = &mut self.conns[self.leader_of[batch.partition]];
        let version = conn.sender.send(&req).await?;
        conn.sender.flush().await?;
        let (done, acked) = oneshot::channel();
        conn.pending
            .send((version, done))
            .map_err(|_| anyhow!("the produce response reader stopped"))?;
        Ok(Box::pin(async move {
            acked.await.context("the produce response reader stopped")?
        }))
    }
}

/// Fetches every partition from its leader, one connection per leader, checking each batch's
/// CRC and decoding every record. Like Kafka's consumers it keeps a fetch in flight on every
/// connection while it decodes the previous response: the positions it needs come from the
/// batch headers alone. A task per connection reads its responses, so whichever leader
/// answers first is decoded first.
pub struct WeirConsumer {
    legs: Vec<FetchLeg>,
    /// The responses of every connection, as (index in `legs`, response).
    responses: mpsc::UnboundedReceiver<(usize, Result<FetchResponse>)>,
    topic: String,
    fetch_bytes: i32,
    /// Whether every connection has its first fetch in flight.
    started: bool,
}

/// The connection to one leader.
struct FetchLeg {
    sender: Sender,
    /// The version of each fetch sent, for the task reading the responses.
    versions: mpsc::UnboundedSender<i16>,
    /// Where the next fetch starts, per partition of this leader.
    positions: BTreeMap<i32, i64>,
}

impl WeirConsumer {
    async fn send_fetch(&mut self, leg: usize) -> Result<()> {
        let leg = &mut self.legs[leg];
        let req = fetch_request(&self.topic, &leg.positions, 100, self.fetch_bytes);
        let version = leg.sender.send(&req).await?;
        leg.sender.flush().await?;
        leg.versions
            .send(version)
            .map_err(|_| anyhow!("the fetch response reader stopped"))
    }
}

impl Consumer for WeirConsumer {
    async fn poll(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> Result<u64> {
        if !self.started {
            for leg in 0..self.legs.len() {
                self.send_fetch(leg).await?;
            }
            self.started = true;
        }
        let (leg, resp) = self
            .responses
            .recv()
            .await
            .context("the fetch response readers stopped")?;
        let positions = &mut self.legs[leg].positions;
        let mut received = Vec::new();
        for t in resp?.responses {
            for pd in t.partitions {
                check(pd.error_code, "fetch")?;
                let Some(records) = pd.records else { continue };
                let from = positions[&pd.partition_index];
                let next = complete_batches(&records)
                    .map(|b| b.next_offset())
                    .filter(|&n| n > from)
                    .last()
                    .unwrap_or(from);
                positions.insert(pd.partition_index, next);
                received.push((from, records));
            }
        }
        self.send_fetch(leg).await?;
        let mut n = 0u64;
        for (from, records) in received {
            for batch in complete_batches(&records) {
                if batch.next_offset() <= from {
                    continue;
                }
                batch.check_integrity()?;
                let base = batch.base_offset();
                batch.for_each_record(|r| {
                    if base + r.offset_delta as i64 >= from {
                        n += 1;
                        f(r.value.unwrap_or_default());
                    }
                })?;
            }
        }
        Ok(n)
    }
}
