//! The transaction coordinator (KIP-98): producer ids, transactional ids and their epochs, the
//! partitions and groups of each open transaction, and the two-phase end of a transaction
//! (PrepareCommit/PrepareAbort is recorded, markers are written to every partition, then
//! CompleteCommit/CompleteAbort).
//!
//! State lives in the compacted internal topic `__transaction_state` (JSON, fsync before each
//! acknowledgement) and is replayed at start. A start also ends what the previous run left
//! open: prepared transactions are completed, open ones aborted with their epoch bumped (every
//! producer connection was cut, so their producers must start a new transaction anyway), and a
//! partition still holding an open transaction the coordinator does not know of gets an abort
//! marker, so no partition's last stable offset can hang.
//!
//! In a cluster the coordinator is the leader of `__transaction_state` (one partition, held by
//! the in-sync replicas before any answer); its markers go to each partition's leader through a
//! [`ClusterLink`]. A node taking over replays the topic, leaves open transactions to their
//! producers (or their timeout) and finishes the prepared ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kafka_protocol::error::ResponseError;
use serde::{Deserialize, Serialize};

use crate::group::{self, GroupCoordinator};
use crate::log::batch::ProducerFields;
use crate::log::internal::{InternalTopic, KeyValue};
use crate::log::manager::LogManager;
use crate::log::partition::{AppendError, AppendInfo, Partition};
use crate::log::producer_state::ActiveProducer;
use crate::now_ms;

pub const TOPIC: &str = "__transaction_state";

/// Producer ids are reserved in blocks, so an id is never handed out twice across restarts
/// without writing the state topic for every new producer.
const ID_BLOCK: i64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnState {
    /// Kafka's name for the state (ListTransactions / DescribeTransactions).
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
        }
    }
}

/// Everything the coordinator knows about one transactional id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxnMeta {
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// The epoch before the coordinator last bumped it on its own (timeout, restart): a producer
    /// that comes back with it (KIP-360) is recovering, not a zombie.
    pub last_producer_epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    pub partitions: BTreeSet<(String, i32)>,
    pub groups: BTreeSet<String>,
    /// When the open transaction started (its first AddPartitions/AddOffsets).
    pub start_ms: i64,
    pub last_update_ms: i64,
}

#[derive(Debug, Clone)]
pub struct TxnSettings {
    /// Longest transaction.timeout.ms a producer may ask for (transaction.max.timeout.ms).
    pub max_timeout_ms: i32,
    /// An idle transactional id is forgotten after this long (transactional.id.expiration.ms).
    pub id_expiration_ms: i64,
}

impl Default for TxnSettings {
    fn default() -> Self {
        TxnSettings {
            max_timeout_ms: 900_000,
            id_expiration_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Key {
    Transaction { id: String },
    ProducerIdBlock,
}

#[derive(Serialize, Deserialize)]
struct IdBlock {
    end: i64,
}

struct Inner {
    txns: BTreeMap<String, TxnMeta>,
    next_producer_id: i64,
    block_end: i64,
    /// The current block came from `TxnCoordinator::id_source`.
    block_from_source: bool,
}

/// A commit or abort marker of one producer's transaction.
#[derive(Debug, Clone, Copy)]
pub struct Marker {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub commit: bool,
}

/// What the coordinator needs from the other nodes when this node is one of several.
#[async_trait::async_trait]
pub trait ClusterLink: Send + Sync {
    /// Reserves `size` producer ids from the cluster's metadata, so that ids are unique across
    /// the cluster; returns [start, end).
    async fn reserve_producer_ids(&self, size: i64) -> Result<(i64, i64), ResponseError>;
    /// Whether the partition exists anywhere in the cluster.
    fn partition_exists(&self, topic: &str, partition: i32) -> bool;
    /// Has the partition's leader write the marker and its in-sync replicas hold it. A topic
    /// deleted meanwhile needs no marker.
    async fn write_marker(
        &self,
        topic: &str,
        partition: i32,
        marker: Marker,
    ) -> Result<(), ResponseError>;
    /// Waits until the in-sync replicas of `__transaction_state` hold what this node wrote.
    async fn state_replicated(&self) -> Result<(), ResponseError>;
    /// The producers each partition's leader remembers (DescribeProducers); partitions whose
    /// leader does not answer are left out.
    async fn partition_producers(&self) -> Vec<(String, i32, ActiveProducer)>;
}

pub struct TxnCoordinator {
    log: Arc<LogManager>,
    groups: Arc<GroupCoordinator>,
    topic: InternalTopic,
    settings: TxnSettings,
    /// Operations are serialised: each is a few appends, and the two phases of an end must not
    /// interleave with anything else on the same id.
    inner: tokio::sync::Mutex<Inner>,
    cluster: std::sync::OnceLock<Arc<dyn ClusterLink>>,
    /// Whether this node coordinates transactions (always, on a single node).
    active: AtomicBool,
    /// Open transactions when last counted (see `ongoing`).
    last_ongoing: std::sync::atomic::AtomicUsize,
    /// In a cluster, the next block of producer ids, reserved before it is needed.
    spare_ids: Arc<SpareIdBlock>,
}

/// The next block of producer ids, reserved ahead as Kafka's ProducerIdManager does: a node
/// whose metadata stalls (its disk is full, the quorum is away) still hands out ids, and
/// InitProducerId does not wait on the quorum under the coordinator's lock.
#[derive(Default)]
struct SpareIdBlock {
    /// The lock also serialises this node's reservations: each reads back the node's latest
    /// block from the metadata.
    block: tokio::sync::Mutex<Option<(i64, i64)>>,
}

impl SpareIdBlock {
    /// The spare block, or a new one reserved now.
    async fn take(&self, link: &dyn ClusterLink) -> Result<(i64, i64), ResponseError> {
        let mut spare = self.block.lock().await;
        match spare.take() {
            Some(block) => Ok(block),
            None => link.reserve_producer_ids(ID_BLOCK).await,
        }
    }

    /// Reserves the next block in the background unless one is held or on its way.
    fn refill(self: &Arc<Self>, link: &Arc<dyn ClusterLink>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (spare, link) = (self.clone(), link.clone());
        runtime.spawn(async move {
            let Ok(mut block) = spare.block.try_lock() else {
                return;
            };
            if block.is_none() {
                match link.reserve_producer_ids(ID_BLOCK).await {
                    Ok(next) => *block = Some(next),
                    // The next allocation reserves one itself.
                    Err(e) => tracing::debug!(error = ?e, "cannot reserve producer ids ahead"),
                }
            }
        });
    }
}

/// What a producer sent: its id and epoch, checked against the coordinator's.
#[derive(Debug, Clone, Copy)]
pub struct ProducerRef {
    pub id: i64,
    pub epoch: i16,
}

impl TxnCoordinator {
    /// Opens the coordinator and replays `__transaction_state`; call [`recover`] before serving.
    pub fn open(
        log: Arc<LogManager>,
        groups: Arc<GroupCoordinator>,
        settings: TxnSettings,
    ) -> Result<TxnCoordinator> {
        let topic = InternalTopic::open(&log, TOPIC, &[("flush.messages", "1")])?;
        let (txns, block_end) = Self::replay(&topic)?;
        Ok(TxnCoordinator {
            log,
            groups,
            topic,
            settings,
            inner: tokio::sync::Mutex::new(Inner {
                txns,
                // A restart skips the rest of the last reserved block.
                next_producer_id: block_end,
                block_end,
                block_from_source: false,
            }),
            cluster: std::sync::OnceLock::new(),
            active: AtomicBool::new(true),
            last_ongoing: Default::default(),
            spare_ids: Default::default(),
        })
    }

    /// Every transactional id's last state in `__transaction_state`, and the end of the last
    /// producer id block reserved there.
    fn replay(topic: &InternalTopic) -> Result<(BTreeMap<String, TxnMeta>, i64)> {
        let mut txns = BTreeMap::new();
        let mut block_end = 0i64;
        topic
            .for_each_batch(|batch| {
                batch.for_each_record(|r| {
                    let Some(key) = r.key.and_then(|k| serde_json::from_slice::<Key>(k).ok())
                    else {
                        tracing::warn!(topic = TOPIC, offset = batch.base_offset(), "skipping a record with an unreadable key");
                        return;
                    };
                    match key {
                        Key::ProducerIdBlock => {
                            if let Some(b) =
                                r.value.and_then(|v| serde_json::from_slice::<IdBlock>(v).ok())
                            {
                                block_end = block_end.max(b.end);
                            }
                        }
                        Key::Transaction { id } => match r.value {
                            None => {
                                txns.remove(&id);
                            }
                            Some(v) => match serde_json::from_slice::<TxnMeta>(v) {
                                Ok(meta) => {
                                    txns.insert(id, meta);
                                }
                                Err(e) => tracing::warn!(transactional_id = %id, error = %e, "skipping an unreadable transaction record"),
                            },
                        },
                    }
                })?;
                Ok(())
            })
            .context("cannot replay __transaction_state")?;
        tracing::info!(transactional_ids = txns.len(), "transactions loaded");
        Ok((txns, block_end))
    }

    /// Makes this coordinator one node's of a cluster: producer ids, partitions and markers
    /// go through `link`, and it serves only once [`set_active`] says it leads.
    pub fn join_cluster(&self, link: Arc<dyn ClusterLink>) {
        self.spare_ids.refill(&link);
        let _ = self.cluster.set(link);
        self.active.store(false, Ordering::Release);
    }

    /// In a cluster, only the leader of `__transaction_state` coordinates transactions: this
    /// node takes over (replaying the topic as this replica holds it; prepared transactions are
    /// finished by the timers) or hands over.
    pub async fn set_active(&self, active: bool) -> Result<()> {
        if active == self.is_active() {
            return Ok(());
        }
        let mut inner = self.inner.lock().await;
        inner.txns = if active {
            Self::replay(&self.topic)?.0
        } else {
            BTreeMap::new()
        };
        self.active.store(active, Ordering::Release);
        tracing::info!(active, "transaction coordinator");
        Ok(())
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// NOT_COORDINATOR while another node coordinates transactions.
    fn check_active(&self) -> Result<(), ResponseError> {
        if self.is_active() {
            Ok(())
        } else {
            Err(ResponseError::NotCoordinator)
        }
    }

    /// Ends what the previous run left open (see the module docs).
    pub async fn recover(&self) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let ids: Vec<String> = inner.txns.keys().cloned().collect();
        for id in ids {
            let meta = inner.txns[&id].clone();
            let outcome = match meta.state {
                TxnState::PrepareCommit => self.complete(&mut inner, &id, true).await,
                TxnState::PrepareAbort => self.complete(&mut inner, &id, false).await,
                TxnState::Ongoing => {
                    tracing::info!(transactional_id = %id, producer_id = meta.producer_id, "aborting a transaction left open by the previous run");
                    self.abort_fencing(&mut inner, &id).await
                }
                _ => Ok(true),
            };
            match outcome {
                Ok(true) => {}
                Ok(false) => anyhow::bail!("cannot write the markers of transaction '{id}'"),
                Err(e) => anyhow::bail!("cannot finish transaction '{id}': {e:?}"),
            }
        }
        // Open transactions the coordinator does not know (its record was lost) would hold
        // their partitions' last stable offset forever: abort them.
        for topic in self.log.topics() {
            for p in &topic.partitions {
                for (producer_id, epoch, first) in p.open_transactions() {
                    tracing::warn!(topic = %p.topic, partition = p.id, producer_id, first_offset = first, "aborting an orphaned open transaction");
                    let marker = Marker {
                        producer_id,
                        producer_epoch: epoch,
                        commit: false,
                    };
                    self.write_local_marker(p, marker, 0)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot abort it: {e:?}"))?;
                }
            }
        }
        Ok(())
    }

    /// InitProducerId: a new producer id (idempotent producers), or the transactional id's
    /// producer id with a new epoch, fencing older instances and aborting their open
    /// transaction.
    pub async fn init_producer_id(
        &self,
        transactional_id: Option<&str>,
        timeout_ms: i32,
        current: Option<ProducerRef>,
    ) -> Result<ProducerRef, ResponseError> {
        let mut inner = self.inner.lock().await;
        let Some(id) = transactional_id else {
            let id = self.allocate_producer_id(&mut inner).await?;
            return Ok(ProducerRef { id, epoch: 0 });
        };
        self.check_active()?;
        if id.is_empty() {
            return Err(ResponseError::InvalidRequest);
        }
        if timeout_ms <= 0 || timeout_ms > self.settings.max_timeout_ms {
            return Err(ResponseError::InvalidTransactionTimeout);
        }
        let now = now_ms();
        let Some(meta) = inner.txns.get(id).cloned() else {
            let producer_id = self.allocate_producer_id(&mut inner).await?;
            let meta = TxnMeta {
                producer_id,
                producer_epoch: 0,
                last_producer_epoch: -1,
                timeout_ms,
                state: TxnState::Empty,
                partitions: BTreeSet::new(),
                groups: BTreeSet::new(),
                start_ms: -1,
                last_update_ms: now,
            };
            self.persist(&mut inner, id, meta).await?;
            return Ok(ProducerRef {
                id: producer_id,
                epoch: 0,
            });
        };
        if let Some(c) = current.filter(|c| c.id >= 0) {
            let known = c.id == meta.producer_id
                && (c.epoch == meta.producer_epoch || c.epoch == meta.last_producer_epoch);
            if !known {
                return Err(ResponseError::ProducerFenced);
            }
        }
        let finished = match meta.state {
            TxnState::PrepareCommit => self.complete(&mut inner, id, true).await?,
            TxnState::PrepareAbort => self.complete(&mut inner, id, false).await?,
            TxnState::Ongoing => self.abort_fencing(&mut inner, id).await?,
            _ => true,
        };
        if !finished {
            // The timers go on writing the markers; the producer asks again.
            return Err(ResponseError::ConcurrentTransactions);
        }
        let mut meta = inner.txns[id].clone();
        if meta.producer_epoch >= i16::MAX - 1 {
            // Epochs are exhausted: continue under a new producer id.
            meta.producer_id = self.allocate_producer_id(&mut inner).await?;
            meta.producer_epoch = 0;
            meta.last_producer_epoch = -1;
        } else {
            meta.last_producer_epoch = meta.producer_epoch;
            meta.producer_epoch += 1;
        }
        meta.timeout_ms = timeout_ms;
        meta.state = TxnState::Empty;
        meta.partitions.clear();
        meta.groups.clear();
        meta.start_ms = -1;
        meta.last_update_ms = now;
        let producer = ProducerRef {
            id: meta.producer_id,
            epoch: meta.producer_epoch,
        };
        self.persist(&mut inner, id, meta).await?;
        Ok(producer)
    }

    /// AddPartitionsToTxn: per partition, None or the error for it.
    pub async fn add_partitions(
        &self,
        transactional_id: &str,
        producer: ProducerRef,
        partitions: Vec<(String, i32)>,
    ) -> Result<Vec<((String, i32), Option<ResponseError>)>, ResponseError> {
        let mut inner = self.inner.lock().await;
        let mut meta = self
            .producer_txn(&inner, transactional_id, producer)?
            .clone();
        let unknown: Vec<bool> = partitions
            .iter()
            .map(|(t, p)| match self.cluster.get() {
                Some(c) => !c.partition_exists(t, *p),
                None => self.log.partition(t, *p).is_none(),
            })
            .collect();
        if unknown.iter().any(|u| *u) {
            return Ok(partitions
                .into_iter()
                .zip(unknown)
                .map(|(tp, u)| {
                    let e = if u {
                        ResponseError::UnknownTopicOrPartition
                    } else {
                        ResponseError::OperationNotAttempted
                    };
                    (tp, Some(e))
                })
                .collect());
        }
        Self::begin(&mut meta)?;
        let before = meta.clone();
        meta.partitions.extend(partitions.iter().cloned());
        if meta != before || inner.txns[transactional_id].state != TxnState::Ongoing {
            meta.last_update_ms = now_ms();
            self.persist(&mut inner, transactional_id, meta).await?;
        }
        Ok(partitions.into_iter().map(|tp| (tp, None)).collect())
    }

    /// AddOffsetsToTxn: the group's offsets will be committed with the transaction.
    pub async fn add_offsets(
        &self,
        transactional_id: &str,
        producer: ProducerRef,
        group_id: &str,
    ) -> Result<(), ResponseError> {
        if group_id.is_empty() {
            return Err(ResponseError::InvalidGroupId);
        }
        let mut inner = self.inner.lock().await;
        let mut meta = self
            .producer_txn(&inner, transactional_id, producer)?
            .clone();
        Self::begin(&mut meta)?;
        meta.groups.insert(group_id.to_string());
        meta.partitions.insert((group::store::TOPIC.to_string(), 0));
        meta.last_update_ms = now_ms();
        self.persist(&mut inner, transactional_id, meta).await
    }

    /// EndTxn: commit or abort the open transaction. A retry of an end that already happened
    /// succeeds again.
    pub async fn end_txn(
        &self,
        transactional_id: &str,
        producer: ProducerRef,
        commit: bool,
    ) -> Result<(), ResponseError> {
        let mut inner = self.inner.lock().await;
        let meta = self.producer_txn(&inner, transactional_id, producer)?;
        match (meta.state, commit) {
            // Once the decision is recorded the transaction ends, whenever its markers land.
            (TxnState::Ongoing, _) => self
                .complete(&mut inner, transactional_id, commit)
                .await
                .map(|_| ()),
            (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => Ok(()),
            (TxnState::PrepareCommit, _) | (TxnState::PrepareAbort, _) => {
                Err(ResponseError::ConcurrentTransactions)
            }
            _ => Err(ResponseError::InvalidTxnState),
        }
    }

    /// Whether the producer may write transactional data to this partition now: its
    /// transaction is open and holds the partition (KIP-890's check, done in process).
    pub async fn verify_partition(
        &self,
        transactional_id: &str,
        producer: ProducerRef,
        topic: &str,
        partition: i32,
    ) -> Result<(), ResponseError> {
        let inner = self.inner.lock().await;
        let meta = self.producer_txn(&inner, transactional_id, producer)?;
        if meta.state != TxnState::Ongoing
            || !meta.partitions.contains(&(topic.to_string(), partition))
        {
            return Err(ResponseError::InvalidTxnState);
        }
        Ok(())
    }

    /// Transactions begun and not ended, for the metrics: counted now, or the last count while
    /// an operation (an end writing its markers, say) holds the state.
    pub fn ongoing(&self) -> usize {
        let Ok(inner) = self.inner.try_lock() else {
            return self.last_ongoing.load(Ordering::Relaxed);
        };
        let n = if self.is_active() {
            inner
                .txns
                .values()
                .filter(|m| {
                    matches!(
                        m.state,
                        TxnState::Ongoing | TxnState::PrepareCommit | TxnState::PrepareAbort
                    )
                })
                .count()
        } else {
            0
        };
        self.last_ongoing.store(n, Ordering::Relaxed);
        n
    }

    /// Every transactional id and its state.
    pub async fn list(&self) -> Vec<(String, TxnMeta)> {
        let inner = self.inner.lock().await;
        inner
            .txns
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// One transactional id's state; NOT_COORDINATOR on a node that does not coordinate.
    pub async fn describe(&self, transactional_id: &str) -> Result<Option<TxnMeta>, ResponseError> {
        self.check_active()?;
        Ok(self.inner.lock().await.txns.get(transactional_id).cloned())
    }

    /// Aborts transactions open longer than their timeout (fencing their producer) and forgets
    /// transactional ids idle past the expiration, every second until `shutdown`.
    pub async fn run_timers(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        // A quarter of the longest transaction timeout, between a second and a minute.
        let scan_every = Duration::from_millis((self.settings.max_timeout_ms / 4) as u64)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut last_scan = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            self.tick(now_ms()).await;
            if last_scan.elapsed() >= scan_every && self.is_active() {
                self.abort_hanging_transactions(now_ms()).await;
                last_scan = tokio::time::Instant::now();
            }
        }
    }

    /// Hanging transactions (KIP-664's name): open in a partition, but not held open there by
    /// this coordinator, because its record was lost or a write reached the partition after the
    /// transaction's abort marker. One would hold back the partition's last stable offset, and
    /// every read_committed consumer, for good. Once its producer has been silent there for
    /// longer than the longest transaction timeout (every transaction the coordinator holds
    /// ends within it, or is being ended), it is aborted, as `kafka-transactions.sh abort`
    /// would. Runs under the coordinator's lock, so no transaction takes the partition
    /// meanwhile. Returns how many were aborted.
    async fn abort_hanging_transactions(&self, now: i64) -> usize {
        let idle_before = now - self.settings.max_timeout_ms as i64;
        let open = match self.cluster.get() {
            Some(c) => c.partition_producers().await,
            None => self
                .log
                .topics()
                .iter()
                .flat_map(|t| &t.partitions)
                .flat_map(|p| {
                    p.active_producers()
                        .into_iter()
                        .map(|producer| (p.topic.to_string(), p.id, producer))
                })
                .collect(),
        };
        let suspects: Vec<_> = open
            .into_iter()
            .filter(|(_, _, p)| p.txn_first_offset.is_some() && p.last_write_ms < idle_before)
            .collect();
        if suspects.is_empty() {
            return 0;
        }
        let inner = self.inner.lock().await;
        if !self.is_active() {
            return 0;
        }
        let mut aborted = 0;
        for (topic, partition, seen) in suspects {
            let key = (topic.clone(), partition);
            let held = inner.txns.values().any(|m| {
                m.producer_id == seen.producer_id
                    && matches!(
                        m.state,
                        TxnState::Ongoing | TxnState::PrepareCommit | TxnState::PrepareAbort
                    )
                    && m.partitions.contains(&key)
            });
            if held {
                continue;
            }
            tracing::warn!(%topic, partition, producer_id = seen.producer_id, producer_epoch = seen.producer_epoch, first_offset = seen.txn_first_offset, idle_ms = now - seen.last_write_ms, "aborting a hanging transaction");
            let result = match self.cluster.get() {
                // The leader elsewhere cannot re-check the partition as it was seen, and needs
                // not: under this lock no transaction of this producer can take the partition,
                // so a write since the snapshot is the hanging transaction's own (a later batch
                // of a transaction skips the coordinator's check), and it is aborted with it.
                Some(c) => {
                    let marker = Marker {
                        producer_id: seen.producer_id,
                        producer_epoch: seen.producer_epoch,
                        commit: false,
                    };
                    c.write_marker(&topic, partition, marker)
                        .await
                        .map(|_| true)
                }
                None => match self.log.partition(&topic, partition) {
                    Some(p) => self.abort_hanging(&p, &seen, idle_before).await,
                    None => Ok(false),
                },
            };
            match result {
                Ok(true) => {
                    crate::metrics::get().hanging_transactions_aborted.inc();
                    aborted += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%topic, partition, producer_id = seen.producer_id, error = ?e, "cannot abort a hanging transaction yet")
                }
            }
        }
        aborted
    }

    async fn tick(&self, now: i64) {
        let mut inner = self.inner.lock().await;
        if !self.is_active() {
            return;
        }
        let due: Vec<(String, TxnState)> = inner
            .txns
            .iter()
            .filter(|(_, m)| match m.state {
                TxnState::Ongoing => now - m.start_ms > m.timeout_ms as i64,
                // A failed end is retried.
                TxnState::PrepareCommit | TxnState::PrepareAbort => true,
                _ => now - m.last_update_ms > self.settings.id_expiration_ms,
            })
            .map(|(k, m)| (k.clone(), m.state))
            .collect();
        for (id, state) in due {
            let result = match state {
                TxnState::Ongoing => {
                    tracing::info!(transactional_id = %id, "transaction timed out: aborting it");
                    crate::metrics::get().transaction_timeouts.inc();
                    self.abort_fencing(&mut inner, &id).await
                }
                TxnState::PrepareCommit => self.complete(&mut inner, &id, true).await,
                TxnState::PrepareAbort => self.complete(&mut inner, &id, false).await,
                _ => self.forget(&mut inner, &id).await.map(|_| true),
            };
            match result {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(transactional_id = %id, "transaction markers not all written yet; retrying")
                }
                Err(e) => {
                    tracing::error!(transactional_id = %id, error = ?e, "transaction housekeeping failed")
                }
            }
        }
    }

    fn producer_txn<'a>(
        &self,
        inner: &'a Inner,
        transactional_id: &str,
        producer: ProducerRef,
    ) -> Result<&'a TxnMeta, ResponseError> {
        self.check_active()?;
        let meta = inner
            .txns
            .get(transactional_id)
            .ok_or(ResponseError::InvalidProducerIdMapping)?;
        if meta.producer_id != producer.id {
            return Err(ResponseError::InvalidProducerIdMapping);
        }
        if meta.producer_epoch != producer.epoch {
            return Err(ResponseError::ProducerFenced);
        }
        Ok(meta)
    }

    /// Moves a transaction to Ongoing when it was not already.
    fn begin(meta: &mut TxnMeta) -> Result<(), ResponseError> {
        match meta.state {
            TxnState::Ongoing => Ok(()),
            TxnState::PrepareCommit | TxnState::PrepareAbort => {
                Err(ResponseError::ConcurrentTransactions)
            }
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                meta.state = TxnState::Ongoing;
                meta.partitions.clear();
                meta.groups.clear();
                meta.start_ms = now_ms();
                Ok(())
            }
        }
    }

    /// Aborts the open transaction under a bumped epoch, so its producer is fenced.
    async fn abort_fencing(&self, inner: &mut Inner, id: &str) -> Result<bool, ResponseError> {
        let mut meta = inner.txns[id].clone();
        if meta.producer_epoch < i16::MAX - 1 {
            meta.last_producer_epoch = meta.producer_epoch;
            meta.producer_epoch += 1;
        }
        inner.txns.insert(id.to_string(), meta);
        self.complete(inner, id, false).await
    }

    /// The two phases of an end: record the decision, write the markers, record completion.
    /// False when a marker could not be written yet: the decision stands and the timers retry.
    async fn complete(
        &self,
        inner: &mut Inner,
        id: &str,
        commit: bool,
    ) -> Result<bool, ResponseError> {
        let mut meta = inner.txns[id].clone();
        let prepared = if commit {
            TxnState::PrepareCommit
        } else {
            TxnState::PrepareAbort
        };
        if meta.state != prepared {
            meta.state = prepared;
            meta.last_update_ms = now_ms();
            self.persist(inner, id, meta.clone()).await?;
        }
        let marker = Marker {
            producer_id: meta.producer_id,
            producer_epoch: meta.producer_epoch,
            commit,
        };
        for (topic, p) in &meta.partitions {
            if let Err(e) = self.write_marker(topic, *p, marker).await {
                tracing::warn!(transactional_id = %id, topic = %topic, partition = p, error = ?e, "cannot write a transaction marker yet");
                return Ok(false);
            }
        }
        meta.state = if commit {
            TxnState::CompleteCommit
        } else {
            TxnState::CompleteAbort
        };
        meta.partitions.clear();
        meta.groups.clear();
        meta.last_update_ms = now_ms();
        self.persist(inner, id, meta).await?;
        crate::metrics::get()
            .transactions
            .with_label_values(&[if commit { "committed" } else { "aborted" }])
            .inc();
        Ok(true)
    }

    /// A marker on one partition of the transaction: through its leader in a cluster, else here.
    async fn write_marker(
        &self,
        topic: &str,
        partition: i32,
        marker: Marker,
    ) -> Result<(), ResponseError> {
        if let Some(c) = self.cluster.get() {
            return c.write_marker(topic, partition, marker).await;
        }
        // A partition deleted meanwhile needs no marker.
        let Some(p) = self.log.partition(topic, partition) else {
            return Ok(());
        };
        self.write_local_marker(&p, marker, 0).await
    }

    /// Appends a marker to a partition this node leads (fsynced when the topic asks), and
    /// applies a group's transactional offsets once it lands in `__consumer_offsets`.
    pub async fn write_local_marker(
        &self,
        partition: &Partition,
        marker: Marker,
        coordinator_epoch: i32,
    ) -> Result<(), ResponseError> {
        let info = partition
            .append_marker(
                marker.producer_id,
                marker.producer_epoch,
                marker.commit,
                coordinator_epoch,
            )
            .map_err(|e| crate::kafka::append_error_code(&e))?;
        self.marker_written(partition, marker, info).await
    }

    /// Aborts a transaction found open in `partition` that no coordinator knows of, if it is
    /// still open as it was seen (see [`Partition::abort_if_hanging`]). Whether it was aborted.
    async fn abort_hanging(
        &self,
        partition: &Partition,
        seen: &ActiveProducer,
        idle_before_ms: i64,
    ) -> Result<bool, ResponseError> {
        let Some(info) = partition
            .abort_if_hanging(seen, idle_before_ms)
            .map_err(|e| crate::kafka::append_error_code(&e))?
        else {
            return Ok(false);
        };
        let marker = Marker {
            producer_id: seen.producer_id,
            producer_epoch: seen.producer_epoch,
            commit: false,
        };
        self.marker_written(partition, marker, info).await?;
        Ok(true)
    }

    /// What follows a marker's append: its fsync where the partition wants one, and the
    /// group coordinator told of transactional offset commits ending.
    async fn marker_written(
        &self,
        partition: &Partition,
        marker: Marker,
        info: AppendInfo,
    ) -> Result<(), ResponseError> {
        if info.needs_fsync {
            partition
                .flush_to(info.last_offset + 1)
                .await
                .map_err(|e| {
                    tracing::error!(topic = %partition.topic, partition = partition.id, error = %e, "cannot fsync a transaction marker");
                    ResponseError::KafkaStorageError
                })?;
        }
        if &*partition.topic == group::store::TOPIC {
            self.groups.complete_txn(marker.producer_id, marker.commit);
        }
        Ok(())
    }

    async fn persist(
        &self,
        inner: &mut Inner,
        id: &str,
        meta: TxnMeta,
    ) -> Result<(), ResponseError> {
        let key = encode(&Key::Transaction { id: id.to_string() });
        let value = serde_json::to_vec(&meta).expect("transaction metadata serialises");
        self.write(vec![(key, Some(value))]).await?;
        inner.txns.insert(id.to_string(), meta);
        Ok(())
    }

    async fn forget(&self, inner: &mut Inner, id: &str) -> Result<(), ResponseError> {
        let key = encode(&Key::Transaction { id: id.to_string() });
        self.write(vec![(key, None)]).await?;
        inner.txns.remove(id);
        Ok(())
    }

    async fn allocate_producer_id(&self, inner: &mut Inner) -> Result<i64, ResponseError> {
        if let Some(c) = self.cluster.get() {
            if !inner.block_from_source || inner.next_producer_id >= inner.block_end {
                let (start, end) = self.spare_ids.take(c.as_ref()).await?;
                inner.next_producer_id = start;
                inner.block_end = end;
                inner.block_from_source = true;
                self.spare_ids.refill(c);
            }
        } else if inner.next_producer_id >= inner.block_end {
            let end = inner.block_end + ID_BLOCK;
            let value = serde_json::to_vec(&IdBlock { end }).expect("id block serialises");
            self.write(vec![(encode(&Key::ProducerIdBlock), Some(value))])
                .await?;
            inner.next_producer_id = inner.block_end;
            inner.block_end = end;
        }
        let id = inner.next_producer_id;
        inner.next_producer_id += 1;
        Ok(id)
    }

    /// Appends to `__transaction_state`; in a cluster, also waits for its in-sync replicas.
    async fn write(&self, records: Vec<KeyValue>) -> Result<(), ResponseError> {
        if let Err(e) = self.topic.append(&records, ProducerFields::NONE).await {
            // Leadership moved: the client finds the new coordinator.
            if !matches!(e, AppendError::NotLeader) {
                tracing::error!(error = %e, "cannot write __transaction_state");
            }
            return Err(crate::kafka::coordinator_error(
                crate::kafka::append_error_code(&e),
            ));
        }
        match self.cluster.get() {
            Some(c) => c
                .state_replicated()
                .await
                .map_err(crate::kafka::coordinator_error),
            None => Ok(()),
        }
    }
}

fn encode(key: &Key) -> Vec<u8> {
    serde_json::to_vec(key).expect("keys serialise")
}

#[cfg(test)]
mod tests;
