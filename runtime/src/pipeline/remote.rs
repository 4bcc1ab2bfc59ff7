//! Pipelines on a cluster node. The partitions a pipeline writes, its transaction coordinator
//! and `__pipeline_offsets` may be led by any node, so the pipeline speaks Kafka to each of
//! them, found in the cluster image, as a transactional producer would: InitProducerId and
//! AddPartitionsToTxn to the coordinator, Produce (acks=all) to the leaders, EndTxn. The rules
//! are those of the single node's in-process writer; only the transport differs.
//!
//! Each writer and reader has connections of its own: sharing the broker's (which carry
//! transaction markers and checks between nodes, one request at a time) could make a
//! pipeline's produce wait on a marker that waits on that produce.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, EndTxnRequest, FetchRequest, InitProducerIdRequest, ProduceRequest,
    ProducerId, TopicName, TransactionalId,
};
use kafka_protocol::records::Compression;
use weir_connectors::{Record, SinkRecord};

use super::io::{build_batches, Outgoing};
use crate::client::router::is_misdirected;
use crate::kafka::txn_cluster::Peers;
use crate::kafka::{str_bytes, Broker};
use crate::log::batch::complete_batches;
use crate::txn::ProducerRef;

/// How long a request about a moving leader or coordinator is tried again.
const RETRY_FOR: Duration = Duration::from_secs(30);
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long a leader may wait for its in-sync replicas before answering a produce.
const PRODUCE_TIMEOUT_MS: i32 = 10_000;
/// How long any request may go unanswered (a node stopped or cut off) before it is tried
/// again on a new connection.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections of a pipeline's own.
pub fn peers() -> Peers {
    Peers::new(CALL_TIMEOUT)
}

/// Whether an error code (or a lost connection) is worth asking again after a pause: the
/// leader or coordinator is moving, or an earlier transaction is still being finished.
fn retriable(code: i16) -> bool {
    is_misdirected(code)
        || matches!(
            ResponseError::try_from_code(code),
            Some(
                ResponseError::ConcurrentTransactions
                    | ResponseError::NotEnoughReplicas
                    | ResponseError::RequestTimedOut
                    | ResponseError::NetworkException
            )
        )
}

/// Another instance of the pipeline took its transactional id over (PRODUCER_FENCED): this
/// one must stop, not take the id back with a new epoch. Its source position may be behind
/// what the other instance committed since, so only a restart, which reads the committed
/// offset again, may go on.
#[derive(Debug, thiserror::Error)]
#[error("another instance of the pipeline took its transactional id over ({0})")]
pub struct Fenced(String);

/// The error for `code` from `what`: [`Fenced`] when another producer took the id over.
fn refusal(what: &str, code: i16) -> anyhow::Error {
    match ResponseError::try_from_code(code) {
        Some(ResponseError::ProducerFenced | ResponseError::InvalidProducerEpoch) => {
            anyhow::Error::new(Fenced(error_name(code))).context(what.to_string())
        }
        _ => anyhow!("{what}: {}", error_name(code)),
    }
}

/// Whether `e` says the pipeline was fenced by another instance of itself.
pub fn is_fenced(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Fenced>())
}

/// The first error among `codes` (0 when there is none): the one an answer stands for.
fn first_error(codes: impl IntoIterator<Item = i16>) -> i16 {
    codes.into_iter().find(|c| *c != 0).unwrap_or(0)
}

fn error_name(code: i16) -> String {
    match ResponseError::try_from_code(code) {
        Some(e) => format!("{e:?} (Kafka error {code})"),
        None => format!("Kafka error {code}"),
    }
}

/// The node leading `topic`-`partition`, as the image says now.
fn leader_of(broker: &Broker, topic: &str, partition: i32) -> Result<i32> {
    let cluster = broker.cluster.as_ref().expect("a cluster node");
    match cluster.image().partition(topic, partition) {
        Some(p) if p.leader >= 0 => Ok(p.leader),
        Some(_) => Err(anyhow!("{topic}-{partition} has no leader")),
        None => Err(anyhow!("{topic}-{partition} does not exist")),
    }
}

/// Sends `req` to the node `target` picks (asked again each attempt), and tries again while
/// the answer's error code (from `code`) or a lost connection says the node is the wrong one
/// or busy, until [`RETRY_FOR`] has passed.
async fn call_retrying<R, T, C>(
    broker: &Broker,
    peers: &Peers,
    what: &str,
    req: &R,
    target: T,
    code: C,
) -> Result<R::Response>
where
    R: kafka_protocol::protocol::Request,
    T: Fn() -> Result<i32>,
    C: Fn(&R::Response) -> i16,
{
    let cluster = broker.cluster.as_ref().expect("a cluster node");
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        let last = match target() {
            Ok(node) => match peers.call(cluster, node, req).await {
                Ok(resp) => match code(&resp) {
                    0 => return Ok(resp),
                    c if retriable(c) => error_name(c),
                    c => return Err(refusal(what, c)),
                },
                Err(e) => format!("{e:#}"),
            },
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: {last}");
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

fn coordinator(broker: &Broker) -> Result<i32> {
    leader_of(broker, crate::txn::TOPIC, 0)
}

/// A producer for `transactional_id` from its coordinator, fencing any earlier instance
/// (on whichever node it ran) and finishing or aborting its open transaction; a plain
/// idempotent producer id with None.
pub async fn init_producer(
    broker: &Broker,
    peers: &Peers,
    transactional_id: Option<&str>,
) -> Result<ProducerRef> {
    let Some(id) = transactional_id else {
        return broker
            .txns
            .init_producer_id(None, 60_000, None)
            .await
            .map_err(|e| anyhow!("cannot get a producer id: {e:?}"));
    };
    let req = InitProducerIdRequest::default()
        .with_transactional_id(Some(TransactionalId(str_bytes(id.to_string()))))
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let resp = call_retrying(
        broker,
        peers,
        "cannot get a producer id",
        &req,
        || coordinator(broker),
        |r| r.error_code,
    )
    .await?;
    Ok(ProducerRef {
        id: resp.producer_id.0,
        epoch: resp.producer_epoch,
    })
}

/// Writes one transaction (or, without a transactional id, one idempotent round) through the
/// partitions' leaders.
pub struct ClusterWriter {
    broker: Arc<Broker>,
    peers: Peers,
    transactional_id: Option<String>,
    producer: ProducerRef,
    sequences: HashMap<(Arc<str>, i32), i32>,
    /// The offset (key, value) of a transaction whose records were written but whose end
    /// went unanswered: it may have committed, which the retry checks first.
    unsure: Option<(Bytes, Bytes)>,
}

impl ClusterWriter {
    pub async fn open(broker: Arc<Broker>, transactional_id: Option<String>) -> Result<Self> {
        let peers = peers();
        let producer = init_producer(&broker, &peers, transactional_id.as_deref()).await?;
        Ok(ClusterWriter {
            broker,
            peers,
            transactional_id,
            producer,
            sequences: HashMap::new(),
            unsure: None,
        })
    }

    /// Starts over with a new epoch: the coordinator aborts what a failed write left open.
    pub async fn reinit(&mut self) -> Result<()> {
        self.producer =
            init_producer(&self.broker, &self.peers, self.transactional_id.as_deref()).await?;
        self.sequences.clear();
        Ok(())
    }

    /// The records, then the offset record into `__pipeline_offsets`: one transaction when
    /// transactional, else in that order.
    pub async fn write(
        &mut self,
        records: &[Outgoing],
        offset: Option<(Bytes, Bytes)>,
    ) -> Result<()> {
        if let Some((key, value)) = self.unsure.clone() {
            // The same batch again, after a transaction that may have committed: not twice.
            // The doubt stays until the check is made (a failed check is made again).
            if offset.as_ref() == Some(&(key.clone(), value.clone())) {
                let committed = load_offset(&self.broker, &key).await?;
                self.unsure = None;
                if committed.is_some() && committed == serde_json::from_slice(&value).ok() {
                    return Ok(());
                }
            }
            self.unsure = None;
        }
        let unsure = offset.clone();
        let mut groups: BTreeMap<(Arc<str>, i32), Vec<&Record>> = BTreeMap::new();
        for o in records {
            groups
                .entry((o.topic.clone(), o.partition))
                .or_default()
                .push(&o.record);
        }
        let offset_record = offset.map(|(key, value)| Record {
            key: Some(key),
            value: Some(value),
            headers: vec![],
            timestamp: crate::now_ms(),
        });
        let offsets_tp: (Arc<str>, i32) = (Arc::from(super::offsets::TOPIC), 0);
        let Some(id) = self.transactional_id.clone() else {
            // Records first, then the offset after them.
            self.produce(&groups).await?;
            if let Some(r) = &offset_record {
                self.produce(&BTreeMap::from([(offsets_tp, vec![r])]))
                    .await?;
            }
            return Ok(());
        };
        if let Some(r) = &offset_record {
            groups.entry(offsets_tp).or_default().push(r);
        }
        if groups.is_empty() {
            return Ok(());
        }
        self.add_partitions(&id, &groups).await?;
        let produced = self.produce(&groups).await;
        let req = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(str_bytes(id)))
            .with_producer_id(ProducerId(self.producer.id))
            .with_producer_epoch(self.producer.epoch)
            .with_committed(produced.is_ok());
        let ended = call_retrying(
            &self.broker,
            &self.peers,
            "cannot end the transaction",
            &req,
            || coordinator(&self.broker),
            |r| r.error_code,
        )
        .await;
        produced?;
        if ended.is_err() {
            self.unsure = unsure;
        }
        ended.map(|_| ())
    }

    async fn add_partitions(
        &self,
        id: &str,
        groups: &BTreeMap<(Arc<str>, i32), Vec<&Record>>,
    ) -> Result<()> {
        let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for (t, p) in groups.keys() {
            by_topic.entry(t).or_default().push(*p);
        }
        let req = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(str_bytes(id.to_string())))
            .with_v3_and_below_producer_id(ProducerId(self.producer.id))
            .with_v3_and_below_producer_epoch(self.producer.epoch)
            .with_v3_and_below_topics(
                by_topic
                    .into_iter()
                    .map(|(t, ps)| {
                        AddPartitionsToTxnTopic::default()
                            .with_name(TopicName(str_bytes(t.to_string())))
                            .with_partitions(ps)
                    })
                    .collect(),
            );
        // The first partition error stands for the answer.
        call_retrying(
            &self.broker,
            &self.peers,
            "cannot add partitions to the transaction",
            &req,
            || coordinator(&self.broker),
            |r| {
                first_error(
                    r.results_by_topic_v3_and_below
                        .iter()
                        .flat_map(|t| &t.results_by_partition)
                        .map(|p| p.partition_error_code),
                )
            },
        )
        .await
        .map(|_| ())
    }

    /// One Produce (acks=all) per leader, all at once; fails on the first error, which the
    /// caller answers by aborting and starting over.
    async fn produce(&mut self, groups: &BTreeMap<(Arc<str>, i32), Vec<&Record>>) -> Result<()> {
        let mut by_leader: BTreeMap<i32, BTreeMap<&str, Vec<PartitionProduceData>>> =
            BTreeMap::new();
        let mut next_sequences = Vec::with_capacity(groups.len());
        for ((topic, p), records) in groups {
            let leader = leader_of(&self.broker, topic, *p)?;
            let key = (topic.clone(), *p);
            let seq = *self.sequences.get(&key).unwrap_or(&0);
            let (batches, next) = build_batches(
                records,
                self.producer,
                seq,
                self.transactional_id.is_some(),
                Compression::None,
            );
            next_sequences.push((key, next));
            by_leader
                .entry(leader)
                .or_default()
                .entry(topic)
                .or_default()
                .push(
                    PartitionProduceData::default()
                        .with_index(*p)
                        .with_records(Some(Bytes::from(batches.concat()))),
                );
        }
        let broker = &*self.broker;
        let peers = &self.peers;
        let cluster = broker.cluster.as_ref().expect("a cluster node");
        let transactional_id = self.transactional_id.as_ref();
        let calls = by_leader.into_iter().map(|(node, topics)| {
            let req = ProduceRequest::default()
                .with_transactional_id(
                    transactional_id.map(|t| TransactionalId(str_bytes(t.clone()))),
                )
                .with_acks(-1)
                .with_timeout_ms(PRODUCE_TIMEOUT_MS)
                .with_topic_data(
                    topics
                        .into_iter()
                        .map(|(t, partitions)| {
                            TopicProduceData::default()
                                .with_name(TopicName(str_bytes(t.to_string())))
                                .with_partition_data(partitions)
                        })
                        .collect(),
                );
            async move {
                let resp = peers
                    .call(cluster, node, &req)
                    .await
                    .map_err(|e| anyhow!("cannot produce to node {node}: {e:#}"))?;
                for t in &resp.responses {
                    for p in &t.partition_responses {
                        if p.error_code != 0 {
                            let what = format!(
                                "cannot produce to {}-{} on node {node}",
                                &*t.name, p.index
                            );
                            return Err(refusal(&what, p.error_code));
                        }
                    }
                }
                Ok(())
            }
        });
        for result in futures::future::join_all(calls).await {
            result?;
        }
        self.sequences.extend(next_sequences);
        Ok(())
    }
}

/// Writes a tombstone into `__pipeline_offsets` (acks=all) and returns the offset after it.
/// Once it is acknowledged, everything written before it is below the leader's high watermark:
/// a leader that has just restarted or taken over may not know its high watermark yet, and
/// reading only up to that would miss the latest commits.
async fn barrier(broker: &Broker, peers: &Peers, key: &[u8]) -> Result<i64> {
    let topic = super::offsets::TOPIC;
    let barrier_key = serde_json::to_vec(&serde_json::json!({
        "barrier": String::from_utf8_lossy(key)
    }))?;
    let now = crate::now_ms();
    let mut b = crate::log::batch::BatchBuilder::new(now);
    b.push(Some(&barrier_key), None, &[], now);
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(PRODUCE_TIMEOUT_MS)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(str_bytes(topic.to_string())))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(Bytes::from(b.finish(Compression::None))))])]);
    let code = |r: &kafka_protocol::messages::ProduceResponse| {
        first_error(
            r.responses
                .iter()
                .flat_map(|t| &t.partition_responses)
                .map(|p| p.error_code),
        )
    };
    let resp = call_retrying(
        broker,
        peers,
        "cannot write to the pipeline offsets",
        &req,
        || leader_of(broker, topic, 0),
        code,
    )
    .await?;
    resp.responses
        .iter()
        .flat_map(|t| &t.partition_responses)
        .map(|p| p.base_offset + 1)
        .next()
        .ok_or_else(|| anyhow!("no offset for the write to {topic}"))
}

/// The last committed value stored under `key` in `__pipeline_offsets`, read from its leader:
/// everything up to a [`barrier`] written first, keeping only what no transaction left open
/// or aborted. (A read_committed fetch would stop at the first transaction still open, which
/// may be another pipeline's, and miss this one's later commits.)
pub async fn load_offset(broker: &Broker, key: &[u8]) -> Result<Option<serde_json::Value>> {
    let topic = super::offsets::TOPIC;
    let peers = peers();
    let end = barrier(broker, &peers, key).await?;
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut offset = 0i64;
    let mut latest: Option<Bytes> = None;
    // Per producer, the value its open transaction wrote last: kept on commit, dropped on
    // abort.
    let mut pending: HashMap<i64, Option<Bytes>> = HashMap::new();
    loop {
        let req = FetchRequest::default()
            .with_replica_id(kafka_protocol::messages::BrokerId(-1))
            .with_max_wait_ms(0)
            .with_min_bytes(1)
            .with_max_bytes(16 << 20)
            .with_isolation_level(0)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(str_bytes(topic.to_string())))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(offset)
                    .with_log_start_offset(-1)
                    .with_partition_max_bytes(8 << 20)])]);
        let first = |r: &kafka_protocol::messages::FetchResponse| {
            let partitions = r.responses.iter().flat_map(|t| &t.partitions);
            first_error(std::iter::once(r.error_code).chain(partitions.map(|p| p.error_code)))
        };
        let resp = call_retrying(
            broker,
            &peers,
            "cannot read the pipeline offsets",
            &req,
            || leader_of(broker, topic, 0),
            first,
        )
        .await?;
        let Some(pd) = resp.responses.into_iter().flat_map(|t| t.partitions).next() else {
            bail!("the leader of {topic} answered without the partition");
        };
        let records = pd.records.unwrap_or_default();
        let mut read_any = false;
        for batch in complete_batches(&records) {
            if batch.next_offset() > pd.high_watermark {
                break;
            }
            read_any = true;
            offset = batch.next_offset();
            let pid = batch.producer_id();
            if batch.is_control() {
                let commit = {
                    let mut commit = false;
                    batch.for_each_record(|r| {
                        // The control record's key: version (2 bytes), then type (1: commit).
                        commit = r.key.is_some_and(|k| k.len() >= 4 && k[3] == 1);
                    })?;
                    commit
                };
                if let Some(value) = pending.remove(&pid) {
                    if commit && value.is_some() {
                        latest = value;
                    }
                }
                continue;
            }
            let mut found = None;
            batch.for_each_record(|r| {
                if r.key == Some(key) {
                    found = Some(r.value.map(Bytes::copy_from_slice));
                }
            })?;
            if batch.is_transactional() {
                let slot = pending.entry(pid).or_default();
                if let Some(v) = found {
                    *slot = v;
                }
            } else if let Some(v) = found {
                latest = v;
            }
        }
        if offset >= end {
            break;
        }
        if !read_any {
            // A new leader still learning its high watermark: it will pass the barrier.
            if tokio::time::Instant::now() >= deadline {
                bail!("the leader of {topic} did not reach offset {end} in {RETRY_FOR:?}");
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
    Ok(latest.and_then(|v| serde_json::from_slice(&v).ok()))
}

/// [`super::io::TopicReader`] on a cluster node: read_committed Fetch from each partition's
/// leader, all leaders at once.
pub struct ClusterReader {
    broker: Arc<Broker>,
    peers: Peers,
    topic: Arc<str>,
    positions: BTreeMap<i32, i64>,
    /// Each partition's last stable offset, as its leader's last answer gave it.
    stable: BTreeMap<i32, i64>,
}

impl ClusterReader {
    /// Missing partitions start at the log start (a fetch below it moves up to it), or with
    /// `from_end` at the last stable offset.
    pub async fn open(
        broker: Arc<Broker>,
        topic: Arc<str>,
        partitions: i32,
        start: &BTreeMap<i32, i64>,
        from_end: bool,
    ) -> Result<ClusterReader> {
        let peers = peers();
        let mut positions = BTreeMap::new();
        for p in 0..partitions {
            let at = match start.get(&p) {
                Some(o) => *o,
                None if from_end => last_stable_offset(&broker, &peers, &topic, p).await?,
                None => 0,
            };
            positions.insert(p, at);
        }
        Ok(ClusterReader {
            broker,
            peers,
            topic,
            positions,
            stable: BTreeMap::new(),
        })
    }

    pub fn positions(&self) -> BTreeMap<i32, i64> {
        self.positions.clone()
    }

    /// Committed records past the positions (about `max_bytes` per partition at most); each
    /// leader waits up to `wait` for some.
    pub async fn read(&mut self, max_bytes: u64, wait: Duration) -> Result<Vec<SinkRecord>> {
        let mut by_leader: BTreeMap<i32, Vec<FetchPartition>> = BTreeMap::new();
        for (&p, &offset) in &self.positions {
            by_leader
                .entry(leader_of(&self.broker, &self.topic, p)?)
                .or_default()
                .push(
                    FetchPartition::default()
                        .with_partition(p)
                        .with_current_leader_epoch(-1)
                        .with_fetch_offset(offset)
                        .with_log_start_offset(-1)
                        .with_partition_max_bytes(max_bytes.min(i32::MAX as u64) as i32),
                );
        }
        let peers = &self.peers;
        let cluster = self.broker.cluster.as_ref().expect("a cluster node");
        let topic = &self.topic;
        let calls = by_leader.into_iter().map(|(node, partitions)| {
            let req = FetchRequest::default()
                .with_replica_id(kafka_protocol::messages::BrokerId(-1))
                .with_max_wait_ms(wait.as_millis().min(i32::MAX as u128) as i32)
                .with_min_bytes(1)
                .with_max_bytes(64 << 20)
                .with_isolation_level(1)
                .with_session_epoch(-1)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(TopicName(str_bytes(topic.to_string())))
                    .with_partitions(partitions)]);
            async move {
                peers
                    .call(cluster, node, &req)
                    .await
                    .map_err(|e| anyhow!("cannot fetch {topic} from node {node}: {e:#}"))
            }
        });
        let mut positions = self.positions.clone();
        let mut stable = self.stable.clone();
        let mut out = Vec::new();
        for resp in futures::future::join_all(calls).await {
            let resp = resp?;
            crate::client::check(resp.error_code, "fetch")?;
            for pd in resp.responses.into_iter().flat_map(|t| t.partitions) {
                let p = pd.partition_index;
                let Some(next) = positions.get_mut(&p) else {
                    continue;
                };
                if pd.error_code == 0 {
                    stable.insert(p, pd.last_stable_offset);
                }
                if pd.error_code == ResponseError::OffsetOutOfRange.code()
                    && pd.log_start_offset > *next
                {
                    // Retention removed what was not read yet: carry on from the start.
                    tracing::warn!(topic = %topic, partition = p, from = *next, to = pd.log_start_offset, "records deleted before they were read");
                    *next = pd.log_start_offset;
                    continue;
                }
                if pd.error_code != 0 {
                    bail!("cannot fetch {topic}-{p}: {}", error_name(pd.error_code));
                }
                let Some(bytes) = pd.records.filter(|r| !r.is_empty()) else {
                    continue;
                };
                // A transaction listed as aborted starts at its first offset and ends at its
                // producer's next control batch.
                let mut aborted: Vec<(i64, i64)> = pd
                    .aborted_transactions
                    .unwrap_or_default()
                    .iter()
                    .map(|a| (a.first_offset, a.producer_id.0))
                    .collect();
                aborted.sort_unstable();
                let mut aborted = aborted.into_iter().peekable();
                let mut aborting = std::collections::HashSet::new();
                let position = weir_connectors::TopicPartition {
                    topic: topic.to_string(),
                    partition: p,
                };
                super::io::records_of(&bytes, &position, next, &mut out, |batch| {
                    while let Some((_, pid)) =
                        aborted.next_if(|(first, _)| *first <= batch.last_offset())
                    {
                        aborting.insert(pid);
                    }
                    let pid = batch.producer_id();
                    if batch.is_control() {
                        aborting.remove(&pid);
                        return true;
                    }
                    batch.is_transactional() && aborting.contains(&pid)
                })?;
            }
        }
        self.positions = positions;
        self.stable = stable;
        Ok(out)
    }

    /// Committed records not read yet, as of the leaders' last answers.
    pub fn records_behind(&self) -> u64 {
        self.positions
            .iter()
            .filter_map(|(p, at)| Some((self.stable.get(p)? - at).max(0) as u64))
            .sum()
    }
}

/// The partition's last stable offset, from its leader.
async fn last_stable_offset(
    broker: &Broker,
    peers: &Peers,
    topic: &str,
    partition: i32,
) -> Result<i64> {
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    let req = kafka_protocol::messages::ListOffsetsRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_isolation_level(1)
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(str_bytes(topic.to_string())))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(partition)
                .with_current_leader_epoch(-1)
                .with_timestamp(-1)])]);
    let code = |r: &kafka_protocol::messages::ListOffsetsResponse| {
        first_error(
            r.topics
                .iter()
                .flat_map(|t| &t.partitions)
                .map(|p| p.error_code),
        )
    };
    let resp = call_retrying(
        broker,
        peers,
        &format!("cannot find the end of {topic}-{partition}"),
        &req,
        || leader_of(broker, topic, partition),
        code,
    )
    .await?;
    resp.topics
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| p.offset)
        .next()
        .ok_or_else(|| anyhow!("no offset for {topic}-{partition}"))
}

fn group_coordinator(broker: &Broker) -> Result<i32> {
    leader_of(broker, crate::group::store::TOPIC, 0)
}

/// A consumer group's committed offsets for `topic`, from its coordinator.
pub async fn group_offsets(
    broker: &Broker,
    peers: &Peers,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, i64>> {
    use kafka_protocol::messages::offset_fetch_request::{
        OffsetFetchRequestGroup, OffsetFetchRequestTopics,
    };
    let req = kafka_protocol::messages::OffsetFetchRequest::default().with_groups(vec![
        OffsetFetchRequestGroup::default()
            .with_group_id(kafka_protocol::messages::GroupId(str_bytes(
                group.to_string(),
            )))
            .with_topics(Some(vec![OffsetFetchRequestTopics::default()
                .with_name(TopicName(str_bytes(topic.to_string())))
                .with_partition_indexes(partitions.to_vec())])),
    ]);
    let code = |r: &kafka_protocol::messages::OffsetFetchResponse| {
        first_error(std::iter::once(r.error_code).chain(r.groups.iter().map(|g| g.error_code)))
    };
    let resp = call_retrying(
        broker,
        peers,
        &format!("cannot fetch the offsets of group {group}"),
        &req,
        || group_coordinator(broker),
        code,
    )
    .await?;
    Ok(resp
        .groups
        .iter()
        .flat_map(|g| &g.topics)
        .flat_map(|t| &t.partitions)
        .filter(|p| p.error_code == 0 && p.committed_offset >= 0)
        .map(|p| (p.partition_index, p.committed_offset))
        .collect())
}

/// Commits `positions` of `topic` for a group no member joins (as a standalone consumer does).
pub async fn commit_group_offsets(
    broker: &Broker,
    peers: &Peers,
    group: &str,
    topic: &str,
    positions: &BTreeMap<i32, i64>,
) -> Result<()> {
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    let req = kafka_protocol::messages::OffsetCommitRequest::default()
        .with_group_id(kafka_protocol::messages::GroupId(str_bytes(
            group.to_string(),
        )))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(str_bytes(topic.to_string())))
            .with_partitions(
                positions
                    .iter()
                    .map(|(p, o)| {
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(*p)
                            .with_committed_offset(*o)
                            .with_committed_leader_epoch(-1)
                    })
                    .collect(),
            )]);
    let code = |r: &kafka_protocol::messages::OffsetCommitResponse| {
        first_error(
            r.topics
                .iter()
                .flat_map(|t| &t.partitions)
                .map(|p| p.error_code),
        )
    };
    call_retrying(
        broker,
        peers,
        &format!("cannot commit the offsets of group {group}"),
        &req,
        || group_coordinator(broker),
        code,
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_producer_taken_over_is_fenced() {
        let fenced = refusal(
            "cannot end the transaction",
            ResponseError::ProducerFenced.code(),
        );
        assert!(is_fenced(&fenced));
        assert!(format!("{fenced:#}").starts_with("cannot end the transaction: another instance"));
        assert!(is_fenced(&refusal(
            "x",
            ResponseError::InvalidProducerEpoch.code()
        )));
        for other in [
            ResponseError::NotLeaderOrFollower,
            ResponseError::InvalidTxnState,
            ResponseError::UnknownServerError,
        ] {
            assert!(!is_fenced(&refusal("x", other.code())));
        }
    }
}
