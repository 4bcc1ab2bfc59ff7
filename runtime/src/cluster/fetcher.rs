//! One replica fetcher per leader node, as in Kafka: every partition this node follows from
//! that leader is fetched over one connection, in one Fetch request at a time. A follower holds
//! one connection per leader whatever the partition count, and a fetch that finds new records
//! in several partitions brings them all in one round trip.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::EpochEndOffset;
use kafka_protocol::messages::{
    BrokerId, FetchRequest, FetchResponse, OffsetForLeaderEpochRequest, TopicName,
};
use kafka_protocol::protocol::Request;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::image::NodeId;
use crate::client::Connection;
use crate::kafka::str_bytes;
use crate::log::partition::Partition;

/// A partition: its topic and index.
pub type Key = (Arc<str>, i32);

/// The Kafka listener of each node, as followers reach it.
pub type Addrs = Arc<Mutex<BTreeMap<NodeId, String>>>;

/// How long a fetcher waits for one answer from its leader (fetches park for `MAX_WAIT`).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the leader may park a fetch that finds nothing new.
const MAX_WAIT: Duration = Duration::from_millis(500);
/// The wait after a first error, doubled on each further one up to `MAX_BACKOFF`. Short: a new
/// partition's leader may create it a moment after this node.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Bytes one answer may carry, in all and per partition.
const MAX_BYTES: i32 = 16 << 20;
const PARTITION_MAX_BYTES: i32 = 8 << 20;

/// A partition this node follows, as its fetcher sees it.
struct Followed {
    partition: Arc<Partition>,
    /// The leader epoch followed: fetches carry it, and an answer fetched at another is dropped.
    epoch: i32,
    /// A divergent suffix, if any, was truncated for this epoch (KIP-101/279).
    truncated: bool,
    /// After an error, not fetched again before this.
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Followed {
    fn due(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }

    fn failed(&mut self, key: &Key, leader: NodeId, error: &dyn Display) {
        tracing::debug!(topic = %key.0, partition = key.1, leader, error = %error, "replica fetch failed; retrying");
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn succeeded(&mut self) {
        self.retry_at = None;
        self.backoff = FIRST_BACKOFF;
    }
}

/// One partition in a fetch request, and what it was fetched at.
struct Wanted {
    key: Key,
    epoch: i32,
    offset: i64,
}

pub struct ReplicaFetcher {
    node: NodeId,
    leader: NodeId,
    partitions: Mutex<HashMap<Key, Followed>>,
    /// Signalled when a partition is taken up, so that a parked fetch is given up on and the
    /// new set fetched at once (the parked answer could take `MAX_WAIT`).
    added: watch::Sender<()>,
    stop: watch::Sender<bool>,
}

impl ReplicaFetcher {
    /// Starts fetching from `leader`, whose address is looked up in `addrs` on each connect.
    pub fn start(node: NodeId, leader: NodeId, addrs: Addrs) -> Arc<ReplicaFetcher> {
        let fetcher = Arc::new(ReplicaFetcher {
            node,
            leader,
            partitions: Mutex::new(HashMap::new()),
            added: watch::channel(()).0,
            stop: watch::channel(false).0,
        });
        tokio::spawn(fetcher.clone().run(addrs));
        fetcher
    }

    /// Follows `partition` at `epoch` (again, if it was followed at another): truncates its
    /// divergent suffix, then fetches it.
    pub fn follow(&self, key: Key, partition: Arc<Partition>, epoch: i32) {
        let followed = Followed {
            partition,
            epoch,
            truncated: false,
            retry_at: None,
            backoff: FIRST_BACKOFF,
        };
        self.partitions.lock().insert(key, followed);
        self.added.send_replace(());
    }

    /// Stops following the partition: once this returns, nothing fetched for it is appended.
    /// False when the fetcher follows nothing any more.
    pub fn unfollow(&self, key: &Key) -> bool {
        let mut partitions = self.partitions.lock();
        partitions.remove(key);
        !partitions.is_empty()
    }

    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    async fn run(self: Arc<Self>, addrs: Addrs) {
        let mut stopped = self.stop.subscribe();
        let mut added = self.added.subscribe();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let addr = addrs.lock().get(&self.leader).cloned();
            let outcome = match addr {
                None => Err(anyhow!("leader {} is not registered", self.leader)),
                Some(addr) => tokio::select! {
                    r = self.fetch_from(&addr, &mut added, &mut backoff) => r,
                    _ = stopped.wait_for(|s| *s) => return,
                },
            };
            if let Err(e) = outcome {
                tracing::debug!(leader = self.leader, error = %e, "replica fetch failed; connecting again");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Fetches over one connection until it fails (an error), or until a partition is taken up
    /// while a fetch is parked (Ok: the caller connects again at once; the parked answer is
    /// still to come on this connection).
    async fn fetch_from(
        &self,
        addr: &str,
        added: &mut watch::Receiver<()>,
        backoff: &mut Duration,
    ) -> Result<()> {
        let mut conn = Connection::connect(addr).await?;
        let mut round = 0usize;
        loop {
            added.borrow_and_update();
            self.truncate_divergent(&mut conn).await?;
            let (wanted, next_retry) = self.wanted(round);
            round = round.wrapping_add(1);
            // A partition backing off is fetched again when its wait is over.
            let wait = next_retry.map_or(MAX_WAIT, |t| {
                t.saturating_duration_since(Instant::now()).min(MAX_WAIT)
            });
            if wanted.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    r = added.changed() => r?,
                }
                continue;
            }
            let req = fetch_request(self.node, &wanted, wait);
            let resp = tokio::select! {
                r = call(&mut conn, &req) => r?,
                _ = added.changed() => return Ok(()),
            };
            *backoff = FIRST_BACKOFF;
            crate::client::check(resp.error_code, "replica fetch")?;
            self.take(&wanted, resp);
        }
    }

    /// The partitions to fetch now, from their log ends, starting one further each round so
    /// that none always comes last in a full answer; and when the next one backing off is due.
    fn wanted(&self, round: usize) -> (Vec<Wanted>, Option<Instant>) {
        let now = Instant::now();
        let partitions = self.partitions.lock();
        let mut wanted = Vec::with_capacity(partitions.len());
        let mut next_retry: Option<Instant> = None;
        for (key, f) in partitions.iter() {
            if let Some(t) = f.retry_at.filter(|t| *t > now) {
                next_retry = Some(next_retry.map_or(t, |n| n.min(t)));
            } else if f.truncated {
                wanted.push(Wanted {
                    key: key.clone(),
                    epoch: f.epoch,
                    offset: f.partition.log_end_offset(),
                });
            }
        }
        drop(partitions);
        wanted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        if !wanted.is_empty() {
            let n = wanted.len();
            wanted.rotate_left(round % n);
        }
        (wanted, next_retry)
    }

    /// Appends what the leader sent, for each partition still followed at the epoch it was
    /// fetched at. Holds the partition set meanwhile, so that `unfollow` waits for it.
    fn take(&self, wanted: &[Wanted], resp: FetchResponse) {
        let by_key: HashMap<(&str, i32), &Wanted> =
            wanted.iter().map(|w| ((&*w.key.0, w.key.1), w)).collect();
        let mut partitions = self.partitions.lock();
        for t in resp.responses {
            for pd in t.partitions {
                let Some(w) = by_key.get(&(&*t.topic.0, pd.partition_index)) else {
                    continue;
                };
                let Some(f) = partitions
                    .get_mut(&w.key)
                    .filter(|f| f.epoch == w.epoch && f.truncated)
                else {
                    continue;
                };
                match append(&f.partition, pd) {
                    Ok(()) => f.succeeded(),
                    Err(e) => f.failed(&w.key, self.leader, &e),
                }
            }
        }
    }

    /// KIP-101/279, for the partitions taken up since the last fetch: asks the leader where this
    /// node's latest epoch ends in its log and drops whatever is held past that. An error is the
    /// connection's; a partition's own puts it in backoff.
    async fn truncate_divergent(&self, conn: &mut Connection) -> Result<()> {
        let now = Instant::now();
        let mut pending = Vec::new();
        for (key, f) in self.partitions.lock().iter_mut() {
            if f.truncated || !f.due(now) {
                continue;
            }
            match f.partition.latest_epoch() {
                // Nothing written under any epoch: nothing can diverge.
                None => f.truncated = true,
                Some(ours) => pending.push((key.clone(), f.epoch, ours)),
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let topics = by_topic(pending.iter().map(|(key, epoch, ours)| {
            let p = OffsetForLeaderPartition::default()
                .with_partition(key.1)
                .with_current_leader_epoch(*epoch)
                .with_leader_epoch(*ours);
            (&key.0, p)
        }))
        .into_iter()
        .map(|(topic, partitions)| {
            OffsetForLeaderTopic::default()
                .with_topic(topic)
                .with_partitions(partitions)
        })
        .collect();
        let req = OffsetForLeaderEpochRequest::default()
            .with_replica_id(BrokerId(self.node))
            .with_topics(topics);
        let resp = call(conn, &req).await?;
        let mut partitions = self.partitions.lock();
        for (key, epoch, _) in &pending {
            let Some(f) = partitions
                .get_mut(key)
                .filter(|f| f.epoch == *epoch && !f.truncated)
            else {
                continue;
            };
            let answer = resp
                .topics
                .iter()
                .filter(|t| *t.topic.0 == *key.0)
                .flat_map(|t| &t.partitions)
                .find(|p| p.partition == key.1)
                .ok_or_else(|| anyhow!("the leader's answer lacks the partition"));
            match answer.and_then(|a| truncate_to_leader(&f.partition, a)) {
                Ok(()) => f.truncated = true,
                Err(e) => f.failed(key, self.leader, &e),
            }
        }
        Ok(())
    }
}

/// One request to the leader, given up on after `FETCH_TIMEOUT`.
async fn call<R: Request>(conn: &mut Connection, req: &R) -> Result<R::Response> {
    tokio::time::timeout(FETCH_TIMEOUT, conn.call(req))
        .await
        .map_err(|_| anyhow!("no answer from the leader within {FETCH_TIMEOUT:?}"))?
}

/// Partitions grouped by topic, as requests carry them: topics in the order they first come,
/// each one's partitions in the order given.
fn by_topic<'k, P>(
    partitions: impl Iterator<Item = (&'k Arc<str>, P)>,
) -> Vec<(TopicName, Vec<P>)> {
    let mut topics: Vec<(&'k Arc<str>, Vec<P>)> = Vec::new();
    for (topic, p) in partitions {
        match topics.iter_mut().find(|(t, _)| *t == topic) {
            Some((_, ps)) => ps.push(p),
            None => topics.push((topic, vec![p])),
        }
    }
    topics
        .into_iter()
        .map(|(t, ps)| (TopicName(str_bytes(t.to_string())), ps))
        .collect()
}

fn fetch_request(node: NodeId, wanted: &[Wanted], wait: Duration) -> FetchRequest {
    let topics = by_topic(wanted.iter().map(|w| {
        let p = FetchPartition::default()
            .with_partition(w.key.1)
            .with_current_leader_epoch(w.epoch)
            .with_fetch_offset(w.offset)
            .with_log_start_offset(-1)
            .with_partition_max_bytes(PARTITION_MAX_BYTES);
        (&w.key.0, p)
    }))
    .into_iter()
    .map(|(topic, partitions)| {
        FetchTopic::default()
            .with_topic(topic)
            .with_partitions(partitions)
    })
    .collect();
    FetchRequest::default()
        .with_replica_id(BrokerId(node))
        .with_max_wait_ms(wait.as_millis() as i32)
        .with_min_bytes(1)
        .with_max_bytes(MAX_BYTES)
        .with_session_epoch(-1)
        .with_topics(topics)
}

/// Appends a partition's whole batches from a fetch answer and takes its high watermark.
fn append(partition: &Partition, pd: PartitionData) -> Result<()> {
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
    Ok(())
}

/// Drops the suffix of this replica's log past the end the leader gave for its latest epoch.
fn truncate_to_leader(partition: &Partition, answer: &EpochEndOffset) -> Result<()> {
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
