//! A partition: an append-only sequence of segments with dense offsets.
//!
//! Appends validate outside the lock, then stamp offsets and write under it. Durability follows
//! the topic: fsync-before-ack topics wait in [`Partition::flush_to`], which batches concurrent
//! waiters into one fsync (group commit); other topics are flushed by the background
//! maintenance task by count and age, and on clean shutdown.

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::now_ms;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::batch::{self, BatchError, BatchView, StampedBatches};
use super::config::LogConfig;
use super::epoch::EpochCache;
use super::producer_state::{
    self, AbortedTxn, ActiveProducer, Admission, Origin, ProducerError, ProducerState,
    MARKER_COMMIT,
};
use super::segment::{AppendedBatch, Segment};
use super::write_atomically;

const RECOVERY_POINT_FILE: &str = "recovery-point";
/// A replicated partition's high watermark at its last checkpoint (Kafka's
/// replication-offset-checkpoint, per partition): where a restarted replica starts from.
const HIGH_WATERMARK_FILE: &str = "high-watermark";
const PRODUCER_SNAPSHOT_FILE: &str = "producer-state.json";

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Producer(#[from] ProducerError),
    /// This replica follows another node: only the leader takes writes.
    #[error("this replica is not the partition's leader")]
    NotLeader,
    /// Batches copied from the leader do not continue this log: the follower must fetch from
    /// its log end (or truncate first).
    #[error("replicated batch at offset {got} does not follow the log end {expected}")]
    OutOfOrderReplica { expected: i64, got: i64 },
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
    /// A producer's batch skips sequence numbers because its earlier batch was refused here
    /// without being written: refused the same way, so that the producer retries the refused
    /// batch and this one in order (as Kafka's offline log directory answers after a storage
    /// error), rather than start a new epoch, which re-numbers and re-sends whatever it had
    /// in flight to every partition, written or not.
    #[error("an earlier batch of producer {producer_id} was refused here: {refusal:?}")]
    AfterRefusal { producer_id: i64, refusal: Refusal },
}

/// Why a write was refused with nothing written; a sequence gap right after one is put down
/// to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Storage,
    NotEnoughReplicas,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("offset {offset} is outside [{start}, {end}]")]
    OffsetOutOfRange { offset: i64, start: i64, end: i64 },
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, Copy)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    pub log_start_offset: i64,
    /// The topic acknowledges only after fsync: wait for `flush_to(last_offset + 1)`.
    pub needs_fsync: bool,
    /// A producer's retry of a batch already written: nothing was written this time and the
    /// offsets are the original ones.
    pub duplicate: bool,
}

/// A byte range of a segment file. Sent with sendfile(2) by the Kafka server; the file handle
/// keeps the bytes readable even if retention deletes the segment meanwhile.
#[derive(Debug, Clone)]
pub struct FileSlice {
    pub file: Arc<std::fs::File>,
    pub pos: u64,
    pub len: u64,
}

impl FileSlice {
    /// Copies the range into memory.
    pub fn read_bytes(&self) -> io::Result<Bytes> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; self.len as usize];
        self.file.read_exact_at(&mut buf, self.pos)?;
        Ok(Bytes::from(buf))
    }
}

#[derive(Debug, Clone)]
pub struct ReadData {
    /// Whole batches, except that the last one may be cut at `max_bytes` (Kafka clients
    /// discard a partial trailing batch). None when there is nothing to return.
    pub records: Option<FileSlice>,
    pub high_watermark: i64,
    /// Below this offset no transaction is open.
    pub last_stable_offset: i64,
    pub log_start_offset: i64,
    /// For read_committed reads: aborted transactions overlapping the records returned.
    pub aborted: Vec<AbortedTxn>,
}

/// Which records a read may see (Kafka's isolation level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Everything up to the high watermark.
    ReadUncommitted,
    /// Only up to the last stable offset, with the aborted transactions listed.
    ReadCommitted,
    /// A follower's fetch: everything up to the log end, in whole batches only (at least one,
    /// whatever `max_bytes` and `min_one_batch` say); no aborted transactions are listed.
    Replica,
}

/// What recovery did when the partition was opened.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecoveryReport {
    pub segments: usize,
    pub recovered_segments: usize,
    pub truncated_bytes: u64,
}

pub struct Partition {
    pub topic: Arc<str>,
    pub id: i32,
    dir: PathBuf,
    pub(super) log: Mutex<PartitionLog>,
    flush_lock: tokio::sync::Mutex<()>,
    durable_offset: AtomicI64,
    high_watermark: AtomicI64,
    log_start_offset: AtomicI64,
    waiters: Mutex<Vec<Arc<Notify>>>,
}

pub(super) struct PartitionLog {
    pub(super) config: LogConfig,
    pub(super) segments: BTreeMap<i64, Segment>,
    next_offset: i64,
    /// The epoch new batches are stamped with (from topics.json, or set by `become_leader`).
    leader_epoch: i32,
    /// A follower of another node's leadership: only `append_replica` writes (set and read
    /// under the lock, so no client write slips in after a leader change).
    follower: bool,
    /// Replicated partitions move the high watermark only by `advance_high_watermark`; others
    /// with every append.
    replicated: bool,
    epochs: EpochCache,
    unflushed_messages: i64,
    oldest_unflushed: Option<Instant>,
    dir_dirty: bool,
    producers: ProducerState,
    /// The producer state changed since the last snapshot.
    producers_dirty: bool,
    /// The end of the last producer batch the state has seen (a bound: it may be larger): a
    /// truncation below it rebuilds the state.
    producers_end: i64,
    /// The last write refused with nothing written, and its wall-clock time.
    refused: Option<(i64, Refusal)>,
}

impl Partition {
    /// Opens (or creates) the partition in `dir`, recovering anything not known to be flushed.
    pub fn open(
        dir: &Path,
        topic: Arc<str>,
        id: i32,
        config: LogConfig,
        leader_epoch: i32,
    ) -> io::Result<(Partition, RecoveryReport)> {
        std::fs::create_dir_all(dir)?;
        super::cleaner::finish_interrupted_swaps(dir)?;
        let recovery_point: i64 = std::fs::read_to_string(dir.join(RECOVERY_POINT_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".log") {
                if let Ok(base) = stem.parse::<i64>() {
                    bases.push(base);
                }
            } else if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(dir.join(&*name));
            }
        }
        bases.sort_unstable();
        let mut report = RecoveryReport::default();
        let mut segments = BTreeMap::new();
        let mut i = 0;
        while i < bases.len() {
            let base = bases[i];
            let trusted = bases.get(i + 1).is_some_and(|&next| next <= recovery_point);
            let (seg, truncated) = Segment::open(dir, base, config.index_interval_bytes, trusted)?;
            report.segments += 1;
            if !trusted {
                report.recovered_segments += 1;
            }
            report.truncated_bytes += truncated;
            segments.insert(base, seg);
            // (A compacted segment may end before the next one's base: gaps are allowed.)
            if truncated > 0 && i + 1 < bases.len() {
                // Nothing after a torn or short segment can be trusted to follow it.
                for &later in &bases[i + 1..] {
                    tracing::warn!(topic = %topic, partition = id, segment = later, "removing segment after a truncated one");
                    for ext in ["log", "index", "timeindex"] {
                        let _ = std::fs::remove_file(
                            dir.join(format!("{}.{ext}", super::segment::file_stem(later))),
                        );
                    }
                }
                break;
            }
            i += 1;
        }
        // A segment that recovery emptied completely is dropped unless it is the only one.
        while segments.len() > 1 && segments.values().next_back().is_some_and(|s| s.is_empty()) {
            let (_, s) = segments.pop_last().unwrap();
            s.delete_files();
        }
        if segments.is_empty() {
            segments.insert(0, Segment::create(dir, 0, config.index_interval_bytes)?);
        }
        let next_offset = segments.values().next_back().unwrap().next_offset();
        let log_start = *segments.keys().next().unwrap();
        let mut epochs = EpochCache::load(dir)?;
        epochs.truncate_from_end(next_offset.max(1))?;
        epochs.truncate_from_start(log_start)?;
        if report.truncated_bytes > 0 {
            tracing::warn!(topic = %topic, partition = id, bytes = report.truncated_bytes, next_offset, "truncated a torn or corrupt log tail");
        }
        let durable = recovery_point.min(next_offset);
        let mut log = PartitionLog {
            config,
            segments,
            next_offset,
            leader_epoch,
            follower: false,
            replicated: false,
            epochs,
            unflushed_messages: 0,
            oldest_unflushed: None,
            dir_dirty: true,
            producers: ProducerState::default(),
            producers_dirty: false,
            producers_end: 0,
            refused: None,
        };
        log.rebuild_producer_state(dir)?;
        let partition = Partition {
            topic,
            id,
            dir: dir.to_path_buf(),
            log: Mutex::new(log),
            flush_lock: tokio::sync::Mutex::new(()),
            durable_offset: AtomicI64::new(durable),
            high_watermark: AtomicI64::new(next_offset),
            log_start_offset: AtomicI64::new(log_start),
            waiters: Mutex::new(Vec::new()),
        };
        Ok((partition, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The offset below which records are committed and visible to consumers. For a
    /// partition that is not replicated it is the log end.
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.load(Ordering::Acquire)
    }
    /// The offset the next record will be written at.
    pub fn log_end_offset(&self) -> i64 {
        self.log.lock().next_offset
    }
    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset.load(Ordering::Acquire)
    }
    pub fn leader_epoch(&self) -> i32 {
        self.log.lock().leader_epoch
    }
    pub fn config(&self) -> LogConfig {
        self.log.lock().config.clone()
    }
    pub fn set_config(&self, config: LogConfig) {
        self.log.lock().config = config;
    }
    /// Bytes on disk in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.log.lock().segments.values().map(|s| s.size()).sum()
    }
    pub fn segment_count(&self) -> usize {
        self.log.lock().segments.len()
    }

    /// Validates and appends a client's record set; returns the assigned offsets.
    pub fn append(&self, records: &[u8]) -> Result<AppendInfo, AppendError> {
        self.append_as(records, Origin::Client)
    }

    /// Appends one batch the daemon built itself with `BatchBuilder`, taking its bytes: the
    /// producer and sequence checks apply as to any batch, but the record-by-record validation
    /// and the CRC check that a client's bytes get are skipped (they cost as much as building
    /// the batch). A compacted topic, which needs every record keyed, and an oversized batch
    /// still go through [`append`] and its errors.
    pub fn append_built(&self, batch: Vec<u8>) -> Result<AppendInfo, AppendError> {
        let (max, require_keys) = {
            let log = self.log.lock();
            (log.config.max_message_bytes, log.config.compacts())
        };
        if require_keys || batch.len() > max {
            return self.append(&batch);
        }
        debug_assert!(
            BatchView::new(&batch).validate_incoming_with(false).is_ok(),
            "BatchBuilder made an invalid batch"
        );
        let ranges = [(0, batch.len())];
        self.append_checked(StampedBatches::new(&batch, &ranges), Origin::Client)
    }

    /// As [`append`]; `Origin::Coordinator` appends (transactional offset commits) carry no
    /// sequence numbers.
    pub fn append_as(&self, records: &[u8], origin: Origin) -> Result<AppendInfo, AppendError> {
        let (max, require_keys) = {
            let log = self.log.lock();
            (log.config.max_message_bytes, log.config.compacts())
        };
        let ranges = batch::split_batches(records)?;
        for &(s, e) in &ranges {
            if e - s > max {
                return Err(BatchError::TooLarge { size: e - s, max }.into());
            }
            let view = BatchView::new(&records[s..e]);
            view.validate_incoming_with(require_keys)?;
            if origin == Origin::Client {
                check_client_producer_fields(&view, ranges.len())?;
            }
        }
        self.append_checked(StampedBatches::new(records, &ranges), origin)
    }

    /// Writes a transaction marker (commit or abort) for a producer.
    pub fn append_marker(
        &self,
        producer_id: i64,
        producer_epoch: i16,
        commit: bool,
        coordinator_epoch: i32,
    ) -> Result<AppendInfo, AppendError> {
        let chunk = batch::marker_batch(
            producer_id,
            producer_epoch,
            commit,
            coordinator_epoch,
            now_ms(),
        );
        let ranges = [(0, chunk.len())];
        self.append_checked(StampedBatches::new(&chunk, &ranges), Origin::Coordinator)
    }

    /// Aborts the transaction `seen` open here if it still is, its producer silent since
    /// before `idle_before_ms`: checked under the lock the marker is written under, so a write
    /// that arrives meanwhile keeps the transaction open. None when it no longer hangs.
    pub fn abort_if_hanging(
        &self,
        seen: &ActiveProducer,
        idle_before_ms: i64,
    ) -> Result<Option<AppendInfo>, AppendError> {
        let chunk = batch::marker_batch(seen.producer_id, seen.producer_epoch, false, -1, now_ms());
        let ranges = [(0, chunk.len())];
        let stamped = StampedBatches::new(&chunk, &ranges);
        self.append_checked_if(stamped, Origin::Coordinator, |producers| {
            producers.still_hanging(seen, idle_before_ms)
        })
    }

    /// Every producer this partition remembers (DescribeProducers).
    pub fn active_producers(&self) -> Vec<ActiveProducer> {
        self.log.lock().producers.active_producers()
    }

    fn append_checked(
        &self,
        chunk: StampedBatches<'_>,
        origin: Origin,
    ) -> Result<AppendInfo, AppendError> {
        self.append_checked_if(chunk, origin, |_| true)
            .map(|info| info.expect("appended unconditionally"))
    }

    /// Appends if `condition` holds for the producer state, under the append's lock.
    fn append_checked_if(
        &self,
        mut chunk: StampedBatches<'_>,
        origin: Origin,
        condition: impl FnOnce(&ProducerState) -> bool,
    ) -> Result<Option<AppendInfo>, AppendError> {
        let info = {
            let mut log = self.log.lock();
            if log.follower {
                return Err(AppendError::NotLeader);
            }
            if !condition(&log.producers) {
                return Ok(None);
            }
            if chunk.count() == 1 {
                let view = chunk.header(0);
                let checked = log.producers.check(&view, origin);
                if let Err(ProducerError::OutOfOrder { producer_id, .. }) = &checked {
                    if let Some(refusal) = log.refusal_before_gap(*producer_id) {
                        return Err(AppendError::AfterRefusal {
                            producer_id: *producer_id,
                            refusal,
                        });
                    }
                }
                let admission = checked?;
                if let Admission::Duplicate {
                    first_offset,
                    last_offset,
                } = admission
                {
                    return Ok(Some(AppendInfo {
                        base_offset: first_offset,
                        last_offset,
                        log_start_offset: *log.segments.keys().next().unwrap(),
                        needs_fsync: log.config.fsync_before_ack(),
                        duplicate: true,
                    }));
                }
            }
            let info = match log.append_validated(&self.dir, &mut chunk) {
                Err(AppendError::Io(e)) => {
                    log.refused = Some((now_ms(), Refusal::Storage));
                    return Err(AppendError::Io(e));
                }
                other => other?,
            };
            let now = now_ms();
            for i in 0..chunk.count() {
                let view = chunk.header(i);
                if view.producer_id() >= 0 {
                    track_batch(&mut log.producers, &view, now, || Ok(chunk.to_vec(i)))?;
                    log.producers_dirty = true;
                    log.producers_end = log.producers_end.max(view.next_offset());
                }
            }
            // Under the lock, so concurrent appends cannot move it backwards.
            if !log.replicated {
                self.high_watermark
                    .store(info.last_offset + 1, Ordering::Release);
            }
            info
        };
        self.log_start_offset
            .store(info.log_start_offset, Ordering::Release);
        self.wake_waiters();
        Ok(Some(info))
    }

    /// Appends batches copied verbatim from the leader (follower side of replication): their
    /// offsets, leader epochs and bytes are kept. The first must start at the log end and each
    /// must follow the previous one (a compacted topic may skip offsets, never go back). Framing
    /// and CRCs are checked; the producer state is updated as on the leader, without the
    /// producers' sequence checks. New leader epochs are recorded where they start.
    pub fn append_replica(&self, records: &[u8]) -> Result<AppendInfo, AppendError> {
        let ranges = batch::split_batches(records)?;
        for &(s, e) in &ranges {
            let view = BatchView::new(&records[s..e]);
            view.check_integrity()?;
            if view.last_offset_delta() < 0 {
                return Err(BatchError::Corrupt("negative last offset delta".into()).into());
            }
        }
        let info = {
            let mut log = self.log.lock();
            if !log.follower {
                return Err(AppendError::NotLeader);
            }
            let gaps_allowed = log.config.compacts();
            let mut expected = log.next_offset;
            let mut batches = Vec::with_capacity(ranges.len());
            let mut count = 0i64;
            for &(s, e) in &ranges {
                let view = BatchView::new(&records[s..e]);
                let got = view.base_offset();
                if got < expected || (got > expected && !gaps_allowed) {
                    return Err(AppendError::OutOfOrderReplica { expected, got });
                }
                batches.push(AppendedBatch {
                    base_offset: got,
                    next_offset: view.next_offset(),
                    max_timestamp: view.max_timestamp(),
                    chunk_pos: s as u64,
                });
                count += view.record_count().max(0) as i64;
                expected = view.next_offset();
            }
            // New epochs are recorded before the data, as on the leader: nothing that can
            // fail comes between writing the batches and tracking their producers.
            for &(s, e) in &ranges {
                let view = BatchView::new(&records[s..e]);
                let epoch = view.leader_epoch();
                if epoch >= 0 && log.epochs.latest_epoch().is_none_or(|l| l < epoch) {
                    log.epochs.assign(epoch, view.base_offset())?;
                }
            }
            let info = log.write_batches(
                &self.dir,
                &mut [IoSlice::new(records)],
                &batches,
                expected,
                count,
            )?;
            let now = now_ms();
            for &(s, e) in &ranges {
                let view = BatchView::new(&records[s..e]);
                if view.producer_id() >= 0 {
                    track_batch(
                        &mut log.producers,
                        &view,
                        now,
                        || Ok(records[s..e].to_vec()),
                    )?;
                    log.producers_dirty = true;
                    log.producers_end = log.producers_end.max(view.next_offset());
                }
            }
            if !log.replicated {
                self.high_watermark
                    .store(info.last_offset + 1, Ordering::Release);
            }
            info
        };
        self.log_start_offset
            .store(info.log_start_offset, Ordering::Release);
        self.wake_waiters();
        Ok(info)
    }

    /// Makes the high watermark move only by [`advance_high_watermark`] (replicated) or with
    /// every append (not replicated, the default). Leaving replicated mode moves it to the log
    /// end.
    pub fn set_replicated(&self, replicated: bool) {
        let moved = {
            let mut log = self.log.lock();
            let was = std::mem::replace(&mut log.replicated, replicated);
            let end = log.next_offset;
            let moved = was && !replicated && self.high_watermark() < end;
            if moved {
                self.high_watermark.store(end, Ordering::Release);
            }
            moved
        };
        if moved {
            self.wake_waiters();
        }
    }

    pub fn is_replicated(&self) -> bool {
        self.log.lock().replicated
    }

    /// Moves the high watermark forward to `hw`, at most to the log end, never back; wakes
    /// long-polling readers when it moved. Returns whether it moved.
    pub fn advance_high_watermark(&self, hw: i64) -> bool {
        {
            let log = self.log.lock();
            let hw = hw.min(log.next_offset);
            if hw <= self.high_watermark() {
                return false;
            }
            self.high_watermark.store(hw, Ordering::Release);
        }
        self.wake_waiters();
        true
    }

    /// Sets the high watermark, backwards too, within [log start, log end]: for a replica
    /// starting up (from a checkpointed value) or taking over. Returns the value set.
    pub fn reset_high_watermark(&self, hw: i64) -> i64 {
        let (hw, up) = {
            let log = self.log.lock();
            let start = *log.segments.keys().next().unwrap();
            let hw = hw.clamp(start, log.next_offset);
            let up = hw > self.high_watermark();
            self.high_watermark.store(hw, Ordering::Release);
            (hw, up)
        };
        if up {
            self.wake_waiters();
        }
        hw
    }

    /// A client's write was refused before reaching the log (too few in-sync replicas).
    pub fn note_refused(&self, refusal: Refusal) {
        self.log.lock().refused = Some((now_ms(), refusal));
    }

    /// Becomes the partition's leader in `epoch`: new batches are stamped with it, and the
    /// epoch is recorded as starting at the log end if it is newer than the latest known.
    pub fn become_leader(&self, epoch: i32) -> io::Result<()> {
        let mut log = self.log.lock();
        log.leader_epoch = epoch;
        log.follower = false;
        let end = log.next_offset;
        log.epochs.assign(epoch, end)
    }

    /// Follows the leader of `epoch`; epochs are then learnt from the replicated batches.
    pub fn become_follower(&self, epoch: i32) {
        {
            let mut log = self.log.lock();
            log.leader_epoch = epoch;
            log.follower = true;
        }
        // Writes waiting for the in-sync replicas learn at once that this node no longer leads.
        self.wake_waiters();
    }

    /// Whether this node leads the partition in `epoch` (has not followed since).
    pub fn leads_in(&self, epoch: i32) -> bool {
        let log = self.log.lock();
        !log.follower && log.leader_epoch == epoch
    }

    /// The latest leader epoch this log holds batches of (or was led in).
    pub fn latest_epoch(&self) -> Option<i32> {
        self.log.lock().epochs.latest_epoch()
    }

    /// OffsetsForLeaderEpoch (KIP-101/279): the largest epoch <= `epoch` this log knows and the
    /// offset where it ends; see [`EpochCache::end_offset_for`]. (-1, -1) when undefined.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> (i32, i64) {
        let log = self.log.lock();
        log.epochs.end_offset_for(epoch, log.next_offset)
    }

    /// The offset below which no transaction is open (never above the high watermark).
    pub fn last_stable_offset(&self) -> i64 {
        let log = self.log.lock();
        log.last_stable_offset().min(self.high_watermark())
    }

    /// Open transactions here, as (producer id, producer epoch, first offset).
    pub fn open_transactions(&self) -> Vec<(i64, i16, i64)> {
        self.log.lock().producers.open_transactions()
    }

    /// Whether the producer has a transaction open here at this epoch.
    pub fn has_open_txn(&self, producer_id: i64, epoch: i16) -> bool {
        self.log.lock().producers.has_open_txn(producer_id, epoch)
    }

    /// Whether the record at `offset` written by `producer_id` belongs to an aborted transaction.
    pub fn is_aborted(&self, producer_id: i64, offset: i64) -> bool {
        self.log.lock().producers.is_aborted(producer_id, offset)
    }

    fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.lock());
        for w in waiters {
            w.notify_one();
        }
    }

    /// Asks to be notified at the next append (long-polling fetches).
    pub fn register_waiter(&self, notify: Arc<Notify>) {
        let mut waiters = self.waiters.lock();
        // Drop waiters whose fetch already returned, so an idle partition does not collect them.
        waiters.retain(|w| Arc::strong_count(w) > 1);
        // A reader that polls an idle partition again registers the same waiter: keep one.
        if !waiters.iter().any(|w| Arc::ptr_eq(w, &notify)) {
            waiters.push(notify);
        }
    }

    /// Reads batches starting at the one containing `offset`, up to `max_bytes` (at least one
    /// whole batch when `min_one_batch`); everything below the high watermark. Offsets from the
    /// high watermark to the log end are valid positions with nothing to read yet.
    pub fn read(
        &self,
        offset: i64,
        max_bytes: u64,
        min_one_batch: bool,
    ) -> Result<ReadData, ReadError> {
        self.read_with(offset, max_bytes, min_one_batch, Isolation::ReadUncommitted)
    }

    /// As [`read`], seeing what `isolation` allows.
    pub fn read_with(
        &self,
        offset: i64,
        max_bytes: u64,
        min_one_batch: bool,
        isolation: Isolation,
    ) -> Result<ReadData, ReadError> {
        let log = self.log.lock();
        let start = *log.segments.keys().next().unwrap();
        let end = log.next_offset;
        if offset < start || offset > end {
            return Err(ReadError::OffsetOutOfRange { offset, start, end });
        }
        // Written under the lock, so consistent with the log end.
        let hw = self.high_watermark();
        let lso = log.last_stable_offset().min(hw);
        let upper = match isolation {
            Isolation::ReadUncommitted => hw,
            Isolation::ReadCommitted => lso,
            Isolation::Replica => end,
        };
        let min_one_batch = min_one_batch || isolation == Isolation::Replica;
        let empty = ReadData {
            records: None,
            high_watermark: hw,
            last_stable_offset: lso,
            log_start_offset: start,
            aborted: vec![],
        };
        if offset >= upper {
            return Ok(empty);
        }
        for (_, seg) in log
            .segments
            .range(..=offset)
            .next_back()
            .into_iter()
            .chain(log.segments.range(offset + 1..))
        {
            if let Some((pos, first_len)) = seg.locate_offset(offset)? {
                // A first batch that does not fit is left out whole, as Kafka does: the Java
                // consumer fails a partition whose records hold no complete batch.
                let want = if min_one_batch {
                    max_bytes.max(first_len)
                } else if max_bytes < first_len {
                    0
                } else {
                    max_bytes
                };
                if want == 0 {
                    return Ok(empty);
                }
                // An open transaction starts a batch, so the stable part ends at a boundary; a
                // batch holding the high watermark is not returned until it is all below it.
                let end = if upper < seg.next_offset() {
                    seg.locate_offset(upper)?.map_or(seg.size(), |(p, _)| p)
                } else {
                    seg.size()
                };
                let mut len = want.min(end.saturating_sub(pos));
                if isolation == Isolation::Replica && len > 0 {
                    len = seg.whole_batches_end(pos, pos + len)? - pos;
                }
                if len == 0 {
                    return Ok(empty);
                }
                let aborted = match isolation {
                    Isolation::ReadUncommitted | Isolation::Replica => vec![],
                    Isolation::ReadCommitted => log.producers.aborted_between(offset, upper),
                };
                return Ok(ReadData {
                    records: Some(FileSlice {
                        file: seg.file().clone(),
                        pos,
                        len,
                    }),
                    high_watermark: hw,
                    last_stable_offset: lso,
                    log_start_offset: start,
                    aborted,
                });
            }
        }
        Ok(empty)
    }

    /// A follower's fetch: whole batches from the one containing `offset` up to the log end,
    /// at most `max_bytes` but at least one batch; `high_watermark` is the leader's.
    pub fn read_replica(&self, offset: i64, max_bytes: u64) -> Result<ReadData, ReadError> {
        self.read_with(offset, max_bytes, true, Isolation::Replica)
    }

    /// The offset of the first record with timestamp >= `ts`, and that record's timestamp.
    pub fn offset_for_timestamp(&self, ts: i64) -> io::Result<Option<(i64, i64)>> {
        let log = self.log.lock();
        for seg in log.segments.values() {
            if seg.max_timestamp() < ts {
                continue;
            }
            let Some((pos, len)) = seg.locate_timestamp(ts)? else {
                continue;
            };
            let bytes = seg.read_at(pos, len)?;
            let view = BatchView::new(&bytes);
            let base = view.base_offset();
            let base_ts = view.base_timestamp();
            let mut found = None;
            view.for_each_record(|r| {
                let rts = base_ts + r.timestamp_delta;
                if found.is_none() && rts >= ts {
                    found = Some((base + r.offset_delta as i64, rts));
                }
            })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// The largest timestamp in the log and the offset of the batch holding it.
    pub fn max_timestamp(&self) -> Option<i64> {
        let log = self.log.lock();
        log.segments
            .values()
            .map(|s| s.max_timestamp())
            .max()
            .filter(|t| *t >= 0)
    }

    /// Waits until everything before `offset` is on stable storage (group commit).
    pub async fn flush_to(&self, offset: i64) -> io::Result<()> {
        if self.durable_offset.load(Ordering::Acquire) >= offset {
            return Ok(());
        }
        let _guard = self.flush_lock.lock().await;
        if self.durable_offset.load(Ordering::Acquire) >= offset {
            return Ok(());
        }
        let (files, sync_dir, upto) = {
            let mut log = self.log.lock();
            let files: Vec<_> = log
                .segments
                .values_mut()
                .filter_map(|s| s.take_dirty())
                .collect();
            let sync_dir = std::mem::take(&mut log.dir_dirty);
            log.unflushed_messages = 0;
            log.oldest_unflushed = None;
            (files, sync_dir, log.next_offset)
        };
        let dir = self.dir.clone();
        let result = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let started = std::time::Instant::now();
            for f in files {
                f.sync_data()?;
            }
            if sync_dir {
                std::fs::File::open(&dir)?.sync_all()?;
            }
            crate::metrics::get()
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(())
        })
        .await
        .map_err(io::Error::other)?;
        if let Err(e) = result {
            // The dirty marks were taken: put them back so a later flush retries.
            let mut log = self.log.lock();
            log.dir_dirty = true;
            log.mark_all_dirty();
            return Err(e);
        }
        self.durable_offset.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Periodic work: flush by flush.messages / flush.ms (and rolled segments); retention too
    /// when `with_retention` (it runs on its own, slower interval).
    pub async fn maintain(&self, with_retention: bool) -> io::Result<()> {
        let needs_flush = {
            let log = self.log.lock();
            let by_count = log.unflushed_messages >= log.config.flush_messages;
            let by_age = log
                .oldest_unflushed
                .is_some_and(|t| t.elapsed().as_millis() as i64 >= log.config.flush_ms);
            let rolled = log.segments.len() > 1
                && self.durable_offset.load(Ordering::Acquire)
                    < *log.segments.keys().next_back().unwrap();
            by_count || by_age || rolled
        };
        if needs_flush {
            let end = self.log_end_offset();
            self.flush_to(end).await?;
        }
        if !with_retention {
            return Ok(());
        }
        let start = {
            let mut log = self.log.lock();
            let start = log.apply_retention(&self.dir, now_ms())?;
            log.epochs.truncate_from_start(start)?;
            log.expire_producers(start);
            start
        };
        self.log_start_offset.store(start, Ordering::Release);
        Ok(())
    }

    /// Flushes everything and records the recovery point, so the next start trusts all of it.
    pub async fn checkpoint(&self) -> io::Result<()> {
        let end = self.log_end_offset();
        self.flush_to(end).await?;
        let (durable, snapshot) = {
            let mut log = self.log.lock();
            for s in log.segments.values_mut() {
                s.persist_indexes()?;
            }
            (
                self.durable_offset.load(Ordering::Acquire),
                log.take_producer_snapshot()?,
            )
        };
        if let Some(bytes) = snapshot {
            if let Err(e) = write_atomically(&self.dir.join(PRODUCER_SNAPSHOT_FILE), &bytes) {
                self.log.lock().producers_dirty = true;
                return Err(e);
            }
        }
        write_atomically(
            &self.dir.join(RECOVERY_POINT_FILE),
            durable.to_string().as_bytes(),
        )?;
        if self.is_replicated() {
            write_atomically(
                &self.dir.join(HIGH_WATERMARK_FILE),
                self.high_watermark().to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// The high watermark the last checkpoint recorded, if any: every record below it was
    /// held by every in-sync replica when it was written.
    pub fn checkpointed_high_watermark(&self) -> Option<i64> {
        std::fs::read_to_string(self.dir.join(HIGH_WATERMARK_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Removes everything from `offset` on (offset should be a batch boundary: otherwise the
    /// batch holding it goes too). Leader epochs starting there are forgotten, the producer
    /// state is rebuilt if it saw anything removed, and the high watermark and the durable
    /// offset are lowered to the new log end if above it.
    pub fn truncate_to(&self, offset: i64) -> io::Result<()> {
        let mut log = self.log.lock();
        if offset >= log.next_offset {
            return Ok(());
        }
        let first = *log.segments.keys().next().unwrap();
        let offset = offset.max(first);
        let later: Vec<i64> = log.segments.range(offset + 1..).map(|(b, _)| *b).collect();
        for b in later {
            if b == first {
                continue;
            }
            if let Some(s) = log.segments.remove(&b) {
                s.delete_files();
            }
        }
        let (_, seg) = log.segments.range_mut(..=offset).next_back().unwrap();
        if let Some((pos, _)) = seg.locate_offset(offset)? {
            seg.truncate_to_position(pos)?;
        }
        let next = log.segments.values().next_back().unwrap().next_offset();
        log.next_offset = next;
        self.high_watermark.fetch_min(next, Ordering::AcqRel);
        self.durable_offset.fetch_min(next, Ordering::AcqRel);
        // A recovery point past the new end would trust segments written after it unflushed.
        let recovery_point = self.dir.join(RECOVERY_POINT_FILE);
        let on_disk = std::fs::read_to_string(&recovery_point)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok());
        if on_disk.is_some_and(|rp| rp > next) {
            write_atomically(&recovery_point, next.to_string().as_bytes())?;
        }
        log.epochs.truncate_from_end(next)?;
        // A snapshot taken past the new end describes batches that are gone.
        let snapshot = self.dir.join(PRODUCER_SNAPSHOT_FILE);
        if snapshot_offset(&snapshot).is_some_and(|o| o > next) {
            std::fs::remove_file(&snapshot)?;
        }
        if log.producers_end > next || log.producers.covers_offsets_from(next) {
            log.producers = ProducerState::default();
            log.rebuild_producer_state(&self.dir)?;
        }
        Ok(())
    }

    /// Empties the log and restarts it at `offset` (a follower whose log is all below the
    /// leader's log start): all segments, leader epochs and producer state are dropped; log
    /// start, log end, high watermark and recovery point become `offset`.
    pub fn truncate_fully_and_start_at(&self, offset: i64) -> io::Result<()> {
        let mut log = self.log.lock();
        // Creating the segment first leaves the log whole if it fails (an old segment with the
        // same base is emptied by it, which is what is wanted anyway).
        let seg = Segment::create(&self.dir, offset, log.config.index_interval_bytes)?;
        let old = std::mem::replace(&mut log.segments, BTreeMap::from([(offset, seg)]));
        for (base, s) in old {
            if base != offset {
                s.delete_files();
            }
        }
        log.next_offset = offset;
        log.unflushed_messages = 0;
        log.oldest_unflushed = None;
        log.dir_dirty = true;
        self.high_watermark.store(offset, Ordering::Release);
        self.log_start_offset.store(offset, Ordering::Release);
        self.durable_offset.store(offset, Ordering::Release);
        log.epochs.clear()?;
        match std::fs::remove_file(self.dir.join(PRODUCER_SNAPSHOT_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        log.producers = ProducerState::default();
        log.producers_dirty = false;
        log.producers_end = offset;
        // The old log's high watermark says nothing of the new one.
        match std::fs::remove_file(self.dir.join(HIGH_WATERMARK_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // A recovery point from the old log would trust segments of the new one unflushed.
        write_atomically(
            &self.dir.join(RECOVERY_POINT_FILE),
            offset.to_string().as_bytes(),
        )
    }

    /// Deletes every file of the partition.
    pub fn delete_files(&self) -> io::Result<()> {
        std::fs::remove_dir_all(&self.dir)
    }
}

/// The log offset a producer-state snapshot file was taken at.
fn snapshot_offset(path: &Path) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Head {
        offset: i64,
    }
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<Head>(&bytes)
        .ok()
        .map(|h| h.offset)
}

/// What the producer fields of a client's batch must satisfy.
fn check_client_producer_fields(view: &BatchView<'_>, batches: usize) -> Result<(), BatchError> {
    if view.is_control() {
        return Err(BatchError::InvalidRecord(
            "clients may not write control batches".into(),
        ));
    }
    if view.producer_id() < 0 {
        if view.is_transactional() {
            return Err(BatchError::InvalidRecord(
                "a transactional batch needs a producer id".into(),
            ));
        }
        return Ok(());
    }
    if batches > 1 {
        // As Kafka: sequence checks are per batch, and a request is answered with one offset.
        return Err(BatchError::InvalidRecord(
            "an idempotent produce request must hold exactly one batch per partition".into(),
        ));
    }
    if view.producer_epoch() < 0 || view.base_sequence() < 0 {
        return Err(BatchError::InvalidRecord(
            "a batch with a producer id needs an epoch and a sequence number".into(),
        ));
    }
    Ok(())
}

/// Updates the producer state with a written batch of a producer (`view` may be just the
/// header); `whole` reads the whole batch, needed for the type of a control batch.
fn track_batch(
    state: &mut ProducerState,
    view: &BatchView<'_>,
    now: i64,
    whole: impl FnOnce() -> io::Result<Vec<u8>>,
) -> io::Result<()> {
    if !view.is_control() {
        state.record_batch(view, now);
        return Ok(());
    }
    let bytes = whole()?;
    let full = BatchView::new(&bytes);
    if let Some(kind) = producer_state::marker_type(&full) {
        state.record_marker(
            full.producer_id(),
            full.producer_epoch(),
            kind == MARKER_COMMIT,
            full.base_offset(),
            now,
        );
    }
    Ok(())
}

/// How long after a refused write a producer's sequence gap is put down to it.
const REFUSAL_GAP_WINDOW_MS: i64 = 60_000;

impl PartitionLog {
    /// The refusal a sequence gap of `producer_id` comes from: a write refused here recently,
    /// and no write of the producer's since. (A gap with another cause still gets
    /// OUT_OF_ORDER_SEQUENCE_NUMBER once the window has passed.)
    fn refusal_before_gap(&self, producer_id: i64) -> Option<Refusal> {
        let (at, refusal) = self.refused?;
        let recent = now_ms() - at < REFUSAL_GAP_WINDOW_MS;
        let silent_since = self
            .producers
            .last_write_ms(producer_id)
            .is_none_or(|written| written < at);
        (recent && silent_since).then_some(refusal)
    }

    fn append_validated(
        &mut self,
        dir: &Path,
        chunk: &mut StampedBatches<'_>,
    ) -> Result<AppendInfo, AppendError> {
        let base_offset = self.next_offset;
        let mut next = base_offset;
        let mut batches = Vec::with_capacity(chunk.count());
        let mut records = 0i64;
        for i in 0..chunk.count() {
            chunk.stamp(i, next, self.leader_epoch);
            let view = chunk.header(i);
            batches.push(AppendedBatch {
                base_offset: next,
                next_offset: view.next_offset(),
                max_timestamp: view.max_timestamp(),
                chunk_pos: chunk.position(i) as u64,
            });
            records += view.record_count() as i64;
            next = view.next_offset();
        }
        // The epoch is recorded before the data: a failure after the data is written would
        // leave batches in the log that the producer state does not know, and a producer's
        // retry of them would be appended again.
        if self
            .epochs
            .latest_epoch()
            .is_none_or(|e| e < self.leader_epoch)
        {
            self.epochs.assign(self.leader_epoch, base_offset)?;
        }
        self.write_batches(dir, &mut chunk.io_slices(), &batches, next, records)
    }

    /// Writes stamped batches (described by `batches`, ending at `next`, given as the pieces
    /// of their bytes in order, used up by the write) at the log end.
    fn write_batches(
        &mut self,
        dir: &Path,
        parts: &mut [IoSlice<'_>],
        batches: &[AppendedBatch],
        next: i64,
        records: i64,
    ) -> Result<AppendInfo, AppendError> {
        let base_offset = batches[0].base_offset;
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        self.maybe_roll(dir, len, next - 1)?;
        let active = self.segments.values_mut().next_back().unwrap();
        active.append(parts, batches)?;
        self.next_offset = next;
        self.unflushed_messages = self.unflushed_messages.saturating_add(records);
        self.oldest_unflushed.get_or_insert_with(Instant::now);
        Ok(AppendInfo {
            base_offset,
            last_offset: next - 1,
            log_start_offset: *self.segments.keys().next().unwrap(),
            needs_fsync: self.config.fsync_before_ack(),
            duplicate: false,
        })
    }

    fn last_stable_offset(&self) -> i64 {
        self.producers
            .first_unstable_offset()
            .map_or(self.next_offset, |o| o.min(self.next_offset))
    }

    /// Loads the last producer-state snapshot that the log still covers, then replays the
    /// batches written after it.
    fn rebuild_producer_state(&mut self, dir: &Path) -> io::Result<()> {
        #[derive(serde::Deserialize)]
        struct Snapshot {
            offset: i64,
            state: ProducerState,
        }
        let log_start = *self.segments.keys().next().unwrap();
        let snapshot = std::fs::read(dir.join(PRODUCER_SNAPSHOT_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Snapshot>(&b).ok())
            .filter(|s| s.offset <= self.next_offset && s.offset >= log_start);
        let from = match snapshot {
            Some(s) => {
                self.producers = s.state;
                s.offset
            }
            None => log_start,
        };
        let now = now_ms();
        let mut end = from;
        let state = &mut self.producers;
        for seg in self.segments.values() {
            if seg.next_offset() <= from {
                continue;
            }
            seg.scan_headers(from, |header, pos, len| {
                let view = BatchView::new(header);
                if view.producer_id() < 0 || view.base_offset() < from {
                    return Ok(());
                }
                end = end.max(view.next_offset());
                track_batch(state, &view, now, || seg.read_at(pos, len))
            })?;
        }
        self.producers_end = end;
        self.producers_dirty = false;
        Ok(())
    }

    fn expire_producers(&mut self, log_start: i64) {
        if !self.producers.is_empty() {
            self.producers
                .expire(log_start, now_ms(), producer_state::EXPIRATION_MS);
        }
    }

    /// The producer state as a snapshot file's bytes, when it changed since the last one.
    fn take_producer_snapshot(&mut self) -> io::Result<Option<Vec<u8>>> {
        if !std::mem::take(&mut self.producers_dirty) {
            return Ok(None);
        }
        let bytes = serde_json::to_vec(&serde_json::json!({
            "offset": self.next_offset,
            "state": &self.producers,
        }))?;
        Ok(Some(bytes))
    }

    fn maybe_roll(&mut self, dir: &Path, incoming: u64, last_offset: i64) -> io::Result<()> {
        let active = self.segments.values().next_back().unwrap();
        if active.is_empty() {
            return Ok(());
        }
        let full = active.size() + incoming > self.config.segment_bytes;
        let old = active
            .age()
            .is_some_and(|a| a.as_millis() as i64 >= self.config.segment_ms);
        if full || old || active.would_overflow(incoming, last_offset) {
            self.roll(dir)?;
        }
        Ok(())
    }

    fn roll(&mut self, dir: &Path) -> io::Result<()> {
        let active = self.segments.values_mut().next_back().unwrap();
        active.persist_indexes()?;
        let base = self.next_offset;
        let seg = Segment::create(dir, base, self.config.index_interval_bytes)?;
        self.segments.insert(base, seg);
        self.dir_dirty = true;
        Ok(())
    }

    pub(super) fn mark_dir_dirty(&mut self) {
        self.dir_dirty = true;
    }

    fn mark_all_dirty(&mut self) {
        // Rare path (fsync failed): re-mark by forcing the next flush to sync every segment.
        let bases: Vec<i64> = self.segments.keys().copied().collect();
        for b in bases {
            if let Some(s) = self.segments.get_mut(&b) {
                s.mark_dirty();
            }
        }
    }

    /// Deletes whole segments past retention.ms / retention.bytes; returns the log start.
    fn apply_retention(&mut self, dir: &Path, now: i64) -> io::Result<i64> {
        if self.config.deletes_old_segments() {
            let expired = |s: &Segment, c: &LogConfig| {
                c.retention_ms >= 0
                    && s.max_timestamp() >= 0
                    && now - s.max_timestamp() > c.retention_ms
            };
            // An expired active segment is rolled so it can be deleted.
            let active = self.segments.values().next_back().unwrap();
            if self.segments.len() == 1 && !active.is_empty() && expired(active, &self.config) {
                self.roll(dir)?;
            }
            let mut total: u64 = self.segments.values().map(|s| s.size()).sum();
            while self.segments.len() > 1 {
                let first = self.segments.values().next().unwrap();
                let over_size = self.config.retention_bytes >= 0
                    && total - first.size() >= self.config.retention_bytes as u64;
                if !(expired(first, &self.config) || over_size) {
                    break;
                }
                let (_, seg) = self.segments.pop_first().unwrap();
                total -= seg.size();
                crate::metrics::get().retention_deleted_segments.inc();
                tracing::info!(dir = %dir.display(), segment = seg.base_offset, "retention deleted segment");
                seg.delete_files();
            }
        }
        Ok(*self.segments.keys().next().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::super::batch::test_support::batch;
    use super::*;
    use kafka_protocol::records::Compression;
    use proptest::prelude::*;

    fn small_config() -> LogConfig {
        LogConfig {
            segment_bytes: 600,
            index_interval_bytes: 100,
            ..LogConfig::default()
        }
    }

    fn open(dir: &Path) -> Partition {
        Partition::open(dir, Arc::from("t"), 0, small_config(), 0)
            .unwrap()
            .0
    }

    #[test]
    fn a_reader_polling_an_idle_partition_is_registered_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let reader = Arc::new(tokio::sync::Notify::new());
        for _ in 0..100 {
            p.register_waiter(reader.clone());
        }
        let other = Arc::new(tokio::sync::Notify::new());
        p.register_waiter(other.clone());
        assert_eq!(p.waiters.lock().len(), 2);
    }

    #[test]
    fn built_batches_are_appended_with_the_checks_that_still_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let info = p
            .append_built(batch(&[b"a", b"b"], Compression::None, 0))
            .unwrap();
        assert_eq!((info.base_offset, info.last_offset), (0, 1));
        assert_eq!(
            read_all(&p, 0),
            vec![(0, b"a".to_vec()), (1, b"b".to_vec())]
        );

        // A compacted topic refuses a record without a key, as it would from a client.
        let compacted = tempfile::tempdir().unwrap();
        let config = LogConfig {
            cleanup_policy: super::super::config::CleanupPolicy::Compact,
            ..small_config()
        };
        let (p, _) = Partition::open(compacted.path(), Arc::from("c"), 0, config, 0).unwrap();
        let mut keyless = batch::BatchBuilder::new(0);
        keyless.push(None, Some(b"no key"), &[], 0);
        assert!(p.append_built(keyless.finish(Compression::None)).is_err());

        // So does any topic a batch over its max.message.bytes.
        let small = tempfile::tempdir().unwrap();
        let config = LogConfig {
            max_message_bytes: 100,
            ..small_config()
        };
        let (p, _) = Partition::open(small.path(), Arc::from("s"), 0, config, 0).unwrap();
        assert!(p
            .append_built(batch(&[&[b'x'; 200][..]], Compression::None, 0))
            .is_err());
    }

    /// Reads every record value from `from` on, following batches across segments.
    fn read_all(p: &Partition, mut from: i64) -> Vec<(i64, Vec<u8>)> {
        let mut out = vec![];
        loop {
            let data = p.read(from, 1 << 20, true).unwrap();
            let Some(slice) = data.records else {
                return out;
            };
            let records = slice.read_bytes().unwrap();
            let ranges = batch::split_batches(&records).unwrap();
            for (s, e) in ranges {
                let v = BatchView::new(&records[s..e]);
                v.check_integrity().unwrap();
                let base = v.base_offset();
                v.for_each_record(|r| {
                    let off = base + r.offset_delta as i64;
                    if off >= from {
                        out.push((off, r.value.unwrap().to_vec()));
                    }
                })
                .unwrap();
                from = v.next_offset();
            }
        }
    }

    #[test]
    fn append_roll_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let mut expected = vec![];
        for i in 0..50 {
            let v = format!("value-{i}");
            let info = p
                .append(&batch(&[v.as_bytes()], Compression::None, 1000 + i))
                .unwrap();
            assert_eq!(info.base_offset, i);
            expected.push((i, v.into_bytes()));
        }
        assert!(p.segment_count() > 1, "segments should roll at 600 bytes");
        assert_eq!(read_all(&p, 0), expected);
        assert_eq!(read_all(&p, 37), expected[37..].to_vec());
        assert_eq!(p.offset_for_timestamp(1020).unwrap(), Some((20, 1020)));
        assert_eq!(p.offset_for_timestamp(5000).unwrap(), None);
        drop(p);
        let p = open(dir.path());
        assert_eq!(p.high_watermark(), 50);
        assert_eq!(read_all(&p, 0), expected);
    }

    #[test]
    fn corrupt_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        for i in 0..5 {
            p.append(&batch(&[format!("v{i}").as_bytes()], Compression::Gzip, i))
                .unwrap();
        }
        drop(p);
        // A torn write: half a batch and some garbage after the last good batch.
        let last = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max()
            .unwrap();
        let good = batch(&[b"torn"], Compression::None, 9);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap();
        std::io::Write::write_all(&mut f, &good[..good.len() / 2]).unwrap();
        let (p, report) =
            Partition::open(dir.path(), Arc::from("t"), 0, small_config(), 0).unwrap();
        assert!(report.truncated_bytes > 0);
        assert_eq!(p.high_watermark(), 5);
        let info = p
            .append(&batch(&[b"after"], Compression::None, 10))
            .unwrap();
        assert_eq!(info.base_offset, 5);
        assert_eq!(read_all(&p, 0).len(), 6);
    }

    #[test]
    fn retention_by_size_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            retention_bytes: 700,
            ..small_config()
        };
        let (p, _) = Partition::open(dir.path(), Arc::from("t"), 0, cfg, 0).unwrap();
        for i in 0..60 {
            p.append(&batch(
                &[format!("value-{i}").as_bytes()],
                Compression::None,
                i,
            ))
            .unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(p.maintain(true)).unwrap();
        assert!(p.log_start_offset() > 0);
        assert!(p.size_bytes() <= 700 + 600);
        let rest = read_all(&p, p.log_start_offset());
        assert_eq!(rest.last().unwrap().0, 59);
        assert!(matches!(
            p.read(0, 100, true),
            Err(ReadError::OffsetOutOfRange { .. })
        ));
    }

    #[test]
    fn a_read_without_room_for_its_first_batch_returns_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let first = batch(&[b"aaaaaaaaaa", b"bbbbbbbbbb"], Compression::None, 0);
        p.append(&first).unwrap();
        p.append(&batch(&[b"c"], Compression::None, 0)).unwrap();
        let len = first.len() as u64;
        let read = |max, min_one| p.read(0, max, min_one).unwrap().records.map(|r| r.len);
        assert_eq!(read(len - 1, false), None, "no partial first batch");
        assert_eq!(
            read(len - 1, true),
            Some(len),
            "the first batch of a response is whole"
        );
        assert_eq!(read(len, false), Some(len));
        // Room for the first batch and part of the next: the next is cut, as Kafka cuts it.
        assert_eq!(read(len + 5, false), Some(len + 5));
        let empty = p.read(0, len - 1, false).unwrap();
        assert_eq!((empty.high_watermark, empty.log_start_offset), (3, 0));
    }

    fn idempotent(pid: i64, seq: i32, values: &[&[u8]], txn: bool) -> Vec<u8> {
        let mut b = batch::BatchBuilder::new(1000).with_producer(batch::ProducerFields {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: seq,
            transactional: txn,
        });
        for v in values {
            b.push(None, Some(v), &[], 1000);
        }
        b.finish(Compression::None)
    }

    /// Every byte of every segment, in offset order.
    fn log_bytes(p: &Partition) -> Vec<u8> {
        let log = p.log.lock();
        let mut out = vec![];
        for seg in log.segments.values() {
            out.extend(seg.read_at(0, seg.size()).unwrap());
        }
        out
    }

    fn epochs(p: &Partition) -> Vec<(i32, i64)> {
        p.log.lock().epochs.entries().to_vec()
    }

    /// Copies the leader's batches to the follower until it has them all, `max_bytes` a fetch.
    #[test]
    fn a_follower_takes_only_replicated_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let mut b = batch::BatchBuilder::new(0);
        b.push(None, Some(b"v"), &[], 0);
        let bytes = b.finish(Compression::None);
        p.become_follower(1);
        assert!(matches!(p.append(&bytes), Err(AppendError::NotLeader)));
        p.become_leader(2).unwrap();
        p.append(&bytes).unwrap();
        assert!(matches!(
            p.append_replica(&bytes),
            Err(AppendError::NotLeader)
        ));
    }

    fn catch_up(leader: &Partition, follower: &Partition, max_bytes: u64) {
        while follower.log_end_offset() < leader.log_end_offset() {
            let data = leader
                .read_replica(follower.log_end_offset(), max_bytes)
                .unwrap();
            assert_eq!(data.high_watermark, leader.high_watermark());
            let bytes = data
                .records
                .expect("batches below the log end")
                .read_bytes()
                .unwrap();
            let info = follower.append_replica(&bytes).unwrap();
            assert!(!info.duplicate);
            follower.advance_high_watermark(data.high_watermark);
        }
    }

    fn values_read(p: &Partition, isolation: Isolation) -> Vec<i64> {
        let mut out = vec![];
        let Some(slice) = p.read_with(0, 1 << 20, true, isolation).unwrap().records else {
            return out;
        };
        let bytes = slice.read_bytes().unwrap();
        for v in batch::complete_batches(&bytes) {
            out.extend(v.base_offset()..v.next_offset());
        }
        out
    }

    #[test]
    fn replicated_appends_wait_for_the_high_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        p.set_replicated(true);
        assert!(p.is_replicated());
        p.append(&batch(&[b"a", b"b"], Compression::None, 0))
            .unwrap();
        p.append(&batch(&[b"c"], Compression::None, 0)).unwrap();
        assert_eq!((p.log_end_offset(), p.high_watermark()), (3, 0));
        assert!(values_read(&p, Isolation::ReadUncommitted).is_empty());
        assert!(values_read(&p, Isolation::ReadCommitted).is_empty());
        assert_eq!(values_read(&p, Isolation::Replica), vec![0, 1, 2]);
        // Past the high watermark but within the log: a valid position, nothing to read.
        let at_end = p.read(3, 1000, true).unwrap();
        assert!(at_end.records.is_none());
        assert_eq!(at_end.high_watermark, 0);
        assert!(matches!(
            p.read(4, 1000, true),
            Err(ReadError::OffsetOutOfRange { end: 3, .. })
        ));

        let waiter = Arc::new(Notify::new());
        p.register_waiter(waiter.clone());
        // Inside the first batch: none of it is visible until all of it is committed.
        assert!(p.advance_high_watermark(1));
        assert!(values_read(&p, Isolation::ReadUncommitted).is_empty());
        assert_eq!(p.waiters.lock().len(), 0, "waiters are woken when it moves");
        p.register_waiter(waiter.clone());
        assert!(!p.advance_high_watermark(1));
        assert!(!p.advance_high_watermark(0), "never backwards");
        assert_eq!(p.waiters.lock().len(), 1);
        assert!(p.advance_high_watermark(2));
        assert_eq!(values_read(&p, Isolation::ReadUncommitted), vec![0, 1]);
        assert_eq!(values_read(&p, Isolation::ReadCommitted), vec![0, 1]);
        assert_eq!(p.last_stable_offset(), 2);
        // Clamped to the log end.
        assert!(p.advance_high_watermark(100));
        assert_eq!(p.high_watermark(), 3);
        assert!(!p.advance_high_watermark(100));
        assert_eq!(values_read(&p, Isolation::ReadUncommitted), vec![0, 1, 2]);

        // Leaving replicated mode catches up with the log end, and appends move it again.
        p.append(&batch(&[b"d"], Compression::None, 0)).unwrap();
        assert_eq!(p.high_watermark(), 3);
        p.set_replicated(false);
        assert_eq!(p.high_watermark(), 4);
        p.append(&batch(&[b"e"], Compression::None, 0)).unwrap();
        assert_eq!(p.high_watermark(), 5);
        assert_eq!(p.reset_high_watermark(2), 2);
        assert_eq!(p.reset_high_watermark(99), 5);
    }

    #[test]
    fn an_open_transaction_below_the_high_watermark_still_holds_the_stable_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        p.set_replicated(true);
        p.append(&batch(&[b"a"], Compression::None, 0)).unwrap();
        p.append(&idempotent(5, 0, &[b"t"], true)).unwrap();
        p.append(&batch(&[b"b"], Compression::None, 0)).unwrap();
        assert_eq!(p.last_stable_offset(), 0);
        p.advance_high_watermark(3);
        assert_eq!(p.last_stable_offset(), 1);
        p.append_marker(5, 0, true, 0).unwrap();
        assert_eq!(p.last_stable_offset(), 3, "never above the high watermark");
        p.advance_high_watermark(4);
        assert_eq!(p.last_stable_offset(), 4);
    }

    /// A leader log with every kind of batch: codecs, leader epochs, an idempotent producer,
    /// an aborted and a committed transaction.
    fn varied_leader(dir: &Path) -> Partition {
        let leader = open(dir);
        leader.become_leader(1).unwrap();
        for (i, codec) in [Compression::None, Compression::Gzip, Compression::Lz4]
            .into_iter()
            .enumerate()
        {
            let v = format!("value-{i}");
            leader
                .append(&batch(&[v.as_bytes(), b"x"], codec, i as i64))
                .unwrap();
        }
        leader
            .append(&idempotent(7, 0, &[b"p0", b"p1"], false))
            .unwrap();
        leader.become_leader(3).unwrap();
        leader.append(&idempotent(8, 0, &[b"t0"], true)).unwrap();
        leader.append(&idempotent(7, 2, &[b"p2"], false)).unwrap();
        leader.append_marker(8, 0, false, 0).unwrap();
        leader.become_leader(4).unwrap();
        leader.append(&idempotent(8, 1, &[b"t1"], true)).unwrap();
        leader.append_marker(8, 0, true, 0).unwrap();
        leader
            .append(&batch(&[&[b'z'; 300][..]], Compression::Zstd, 9))
            .unwrap();
        leader
    }

    #[test]
    fn followers_copy_the_leaders_batches_verbatim() {
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = varied_leader(ld.path());
        for max_bytes in [0, 150, 1 << 20] {
            let follower = open(fd.path());
            follower.become_follower(0);
            follower.truncate_fully_and_start_at(0).unwrap();
            follower.set_replicated(true);
            follower.become_follower(4);
            catch_up(&leader, &follower, max_bytes);
            assert_eq!(follower.log_end_offset(), leader.log_end_offset());
            assert_eq!(log_bytes(&follower), log_bytes(&leader));
            assert_eq!(epochs(&follower), epochs(&leader));
            assert_eq!(epochs(&leader), vec![(1, 0), (3, 8), (4, 11)]);
            assert_eq!(follower.end_offset_for_epoch(3), (3, 11));
            // Transactions are known as on the leader: read_committed lists the abort.
            let data = follower
                .read_with(0, 1 << 20, true, Isolation::ReadCommitted)
                .unwrap();
            let on_leader = leader
                .read_with(0, 1 << 20, true, Isolation::ReadCommitted)
                .unwrap();
            assert_eq!(data.aborted, on_leader.aborted);
            assert_eq!(data.aborted.len(), 1);
            assert_eq!(follower.last_stable_offset(), leader.last_stable_offset());
            assert!(follower.open_transactions().is_empty());
            // And after a reopen, from the log alone.
            drop(follower);
            let follower = open(fd.path());
            follower.become_follower(0);
            assert_eq!(log_bytes(&follower), log_bytes(&leader));
            assert_eq!(epochs(&follower), epochs(&leader));
            assert!(follower.is_aborted(8, 8));
        }
    }

    #[test]
    fn a_sequence_gap_right_after_a_refused_write_is_refused_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        p.append(&idempotent(7, 0, &[b"a"], false)).unwrap();
        // Times are in milliseconds: the refusal comes after the write.
        std::thread::sleep(std::time::Duration::from_millis(2));
        // Seq 1 was refused before the log (too few in-sync replicas): seq 2, in flight
        // behind it, gets the same refusal, not a sequence error.
        p.note_refused(Refusal::NotEnoughReplicas);
        assert!(matches!(
            p.append(&idempotent(7, 2, &[b"c"], false)),
            Err(AppendError::AfterRefusal {
                producer_id: 7,
                refusal: Refusal::NotEnoughReplicas
            })
        ));
        // The retries in order are written; a later gap is a sequence error again.
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.append(&idempotent(7, 1, &[b"b"], false)).unwrap();
        p.append(&idempotent(7, 2, &[b"c"], false)).unwrap();
        assert!(matches!(
            p.append(&idempotent(7, 9, &[b"x"], false)),
            Err(AppendError::Producer(ProducerError::OutOfOrder { .. }))
        ));
        // A producer that wrote nothing since a storage failure gets a storage error.
        p.append(&idempotent(8, 0, &[b"q"], false)).unwrap();
        p.log.lock().refused = Some((now_ms() + 1, Refusal::Storage));
        assert!(matches!(
            p.append(&idempotent(8, 5, &[b"r"], false)),
            Err(AppendError::AfterRefusal {
                producer_id: 8,
                refusal: Refusal::Storage
            })
        ));
        // Long after the refusal, a gap is a sequence error.
        p.log.lock().refused = Some((now_ms() - REFUSAL_GAP_WINDOW_MS - 1, Refusal::Storage));
        assert!(matches!(
            p.append(&idempotent(8, 5, &[b"r"], false)),
            Err(AppendError::Producer(ProducerError::OutOfOrder { .. }))
        ));
    }

    #[test]
    fn a_follower_turned_leader_knows_the_producers() {
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = varied_leader(ld.path());
        leader.append(&idempotent(8, 2, &[b"t2"], true)).unwrap();
        let follower = open(fd.path());
        follower.become_follower(0);
        follower.become_follower(4);
        catch_up(&leader, &follower, 1 << 20);
        follower.become_leader(5).unwrap();
        // Producer 7's retry of its last batch is answered with the original offsets.
        let retry = follower.append(&idempotent(7, 2, &[b"p2"], false)).unwrap();
        assert!(retry.duplicate);
        assert_eq!((retry.base_offset, retry.last_offset), (9, 9));
        let next = follower.append(&idempotent(7, 3, &[b"p3"], false)).unwrap();
        assert!(!next.duplicate);
        assert_eq!(next.base_offset, leader.log_end_offset());
        assert!(matches!(
            follower.append(&idempotent(7, 9, &[b"p9"], false)),
            Err(AppendError::Producer(ProducerError::OutOfOrder { .. }))
        ));
        // Producer 8's open transaction holds the stable offset on the new leader too.
        assert_eq!(follower.open_transactions(), vec![(8, 0, 14)]);
        follower.append_marker(8, 0, false, 0).unwrap();
        assert!(follower.open_transactions().is_empty());
        assert!(follower.is_aborted(8, 14));
        // The new epoch starts where the old leader's log ended.
        assert_eq!(follower.end_offset_for_epoch(4), (4, 15));
        let written = BatchView::new(&log_bytes(&follower)[..]).leader_epoch();
        assert_eq!(written, 1);
        assert_eq!(follower.latest_epoch(), Some(5));
    }

    #[test]
    fn replica_batches_must_continue_the_log() {
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(ld.path());
        for i in 0..3 {
            leader
                .append(&batch(&[format!("v{i}").as_bytes()], Compression::None, i))
                .unwrap();
        }
        let all = leader.read_replica(0, 1 << 20).unwrap().records.unwrap();
        let all = all.read_bytes().unwrap();
        let ranges = batch::split_batches(&all).unwrap();
        let nth = |i: usize| &all[ranges[i].0..ranges[i].1];
        let follower = open(fd.path());
        follower.become_follower(0);
        assert!(matches!(
            follower.append_replica(nth(1)),
            Err(AppendError::OutOfOrderReplica {
                expected: 0,
                got: 1
            })
        ));
        // A gap inside the set refuses all of it.
        let gapped = [nth(0), nth(2)].concat();
        assert!(matches!(
            follower.append_replica(&gapped),
            Err(AppendError::OutOfOrderReplica {
                expected: 1,
                got: 2
            })
        ));
        assert_eq!(follower.log_end_offset(), 0);
        follower.append_replica(nth(0)).unwrap();
        assert!(matches!(
            follower.append_replica(nth(0)),
            Err(AppendError::OutOfOrderReplica {
                expected: 1,
                got: 0
            })
        ));
        let mut corrupt = nth(1).to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert!(matches!(
            follower.append_replica(&corrupt),
            Err(AppendError::Batch(BatchError::Corrupt(_)))
        ));
        assert!(follower.append_replica(&nth(1)[..40]).is_err());
        follower.append_replica(&all[ranges[1].0..]).unwrap();
        assert_eq!(log_bytes(&follower), log_bytes(&leader));
    }

    #[test]
    fn divergent_logs_converge_through_epoch_end_offsets() {
        let (ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (open(ad.path()), open(bd.path()));
        for p in [&a, &b] {
            p.set_replicated(true);
        }
        // Epoch 0, led by a, fully replicated.
        a.become_leader(0).unwrap();
        for i in 0..4 {
            a.append(&batch(
                &[format!("shared{i}").as_bytes()],
                Compression::None,
                i,
            ))
            .unwrap();
        }
        b.become_follower(0);
        catch_up(&a, &b, 1 << 20);
        let shared = a.log_end_offset();
        // Epoch 1: b leads and writes batches nobody copies, one of an idempotent producer.
        b.become_leader(1).unwrap();
        b.append(&batch(&[b"lost0", b"lost1"], Compression::None, 9))
            .unwrap();
        b.append(&idempotent(9, 0, &[b"lost"], false)).unwrap();
        b.append(&idempotent(6, 0, &[b"open"], true)).unwrap();
        b.advance_high_watermark(shared);
        // Epoch 2: a leads (it never saw epoch 1) and writes other batches.
        a.become_leader(2).unwrap();
        a.append(&idempotent(9, 0, &[b"kept0", b"kept1"], false))
            .unwrap();
        a.append(&batch(&[b"x"], Compression::Snappy, 10)).unwrap();
        // b follows again: where does its log leave a's?
        b.become_follower(2);
        let (epoch, leader_end) = a.end_offset_for_epoch(b.latest_epoch().unwrap());
        assert_eq!((epoch, leader_end), (0, shared));
        let (_, own_end) = b.end_offset_for_epoch(epoch);
        let at = leader_end.min(own_end);
        assert_eq!(at, shared);
        b.truncate_to(at).unwrap();
        assert_eq!(b.log_end_offset(), shared);
        assert!(b.high_watermark() <= shared);
        assert_eq!(epochs(&b), vec![(0, 0)]);
        assert!(
            b.open_transactions().is_empty(),
            "the producer state is rebuilt"
        );
        catch_up(&a, &b, 100);
        assert_eq!(log_bytes(&b), log_bytes(&a));
        assert_eq!(epochs(&b), epochs(&a));
        // After a failover to b, producer 9's retry answers with a's offsets.
        b.become_leader(3).unwrap();
        let retry = b
            .append(&idempotent(9, 0, &[b"kept0", b"kept1"], false))
            .unwrap();
        assert!(retry.duplicate);
        assert_eq!((retry.base_offset, retry.last_offset), (shared, shared + 1));
    }

    #[test]
    fn followers_of_a_compacted_topic_copy_its_gaps() {
        let config = LogConfig {
            cleanup_policy: super::super::config::CleanupPolicy::Compact,
            segment_bytes: 400,
            min_cleanable_dirty_ratio: 0.0,
            ..LogConfig::default()
        };
        let open = |dir: &Path| {
            Partition::open(dir, Arc::from("c"), 0, config.clone(), 0)
                .unwrap()
                .0
        };
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(ld.path());
        for i in 0..40 {
            let mut b = batch::BatchBuilder::new(i);
            let key = format!("k{}", i % 3);
            b.push(Some(key.as_bytes()), Some(b"v"), &[], i);
            leader.append(&b.finish(Compression::None)).unwrap();
        }
        let report = leader.compact(now_ms(), 1000).unwrap().unwrap();
        assert!(report.records_removed > 0);
        let follower = open(fd.path());
        follower.become_follower(0);
        catch_up(&leader, &follower, 200);
        assert_eq!(log_bytes(&follower), log_bytes(&leader));
        assert_eq!(follower.log_end_offset(), 40);
        // Only a compacted topic may skip offsets.
        let plain = tempfile::tempdir().unwrap();
        let plain = Partition::open(plain.path(), Arc::from("p"), 0, small_config(), 0)
            .unwrap()
            .0;
        plain.become_follower(0);
        let all = log_bytes(&leader);
        let ranges = batch::split_batches(&all).unwrap();
        let gapped = ranges
            .iter()
            .map(|&(s, e)| &all[s..e])
            .find(|b| BatchView::new(b).base_offset() > 0)
            .unwrap();
        assert!(matches!(
            plain.append_replica(gapped),
            Err(AppendError::OutOfOrderReplica { expected: 0, .. })
        ));
    }

    #[test]
    fn a_replicated_partition_checkpoints_its_high_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = open(dir.path());
        p.append(&batch(&[b"a", b"b", b"c"], Compression::None, 0))
            .unwrap();
        // A single node's partitions keep none.
        rt.block_on(p.checkpoint()).unwrap();
        assert_eq!(p.checkpointed_high_watermark(), None);
        p.set_replicated(true);
        p.reset_high_watermark(0);
        p.advance_high_watermark(2);
        rt.block_on(p.checkpoint()).unwrap();
        drop(p);
        let p = open(dir.path());
        assert_eq!(p.checkpointed_high_watermark(), Some(2));
        // Emptied for a new log, it forgets the old one's.
        p.truncate_fully_and_start_at(0).unwrap();
        assert_eq!(p.checkpointed_high_watermark(), None);
    }

    #[test]
    fn truncation_lowers_the_durable_offset_and_drops_a_newer_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = open(dir.path());
        p.append(&idempotent(3, 0, &[b"a"], true)).unwrap();
        p.append_marker(3, 0, true, 0).unwrap();
        p.append(&batch(&[b"b"], Compression::None, 0)).unwrap();
        rt.block_on(p.checkpoint()).unwrap();
        assert_eq!(p.durable_offset.load(Ordering::Acquire), 3);
        assert!(p.open_transactions().is_empty());
        // The commit marker goes: the transaction of producer 3 is open again.
        p.truncate_to(1).unwrap();
        assert_eq!(p.durable_offset.load(Ordering::Acquire), 1);
        let recovery_point = std::fs::read_to_string(dir.path().join(RECOVERY_POINT_FILE));
        assert_eq!(recovery_point.unwrap(), "1");
        assert_eq!(p.open_transactions(), vec![(3, 0, 0)]);
        drop(p);
        let p = open(dir.path());
        assert_eq!(p.open_transactions(), vec![(3, 0, 0)]);
    }

    #[test]
    fn a_follower_restarts_its_log_at_the_leaders_start() {
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(ld.path());
        leader.truncate_fully_and_start_at(100).unwrap();
        leader.become_leader(2).unwrap();
        leader
            .append(&batch(&[b"a", b"b"], Compression::None, 0))
            .unwrap();
        assert_eq!(leader.log_start_offset(), 100);
        let follower = open(fd.path());
        for i in 0..20 {
            follower
                .append(&batch(
                    &[format!("old{i}").as_bytes()],
                    Compression::None,
                    i,
                ))
                .unwrap();
        }
        assert!(follower.segment_count() > 1);
        follower.become_follower(0);
        follower.truncate_fully_and_start_at(100).unwrap();
        assert_eq!(follower.segment_count(), 1);
        assert_eq!(
            (
                follower.log_start_offset(),
                follower.log_end_offset(),
                follower.high_watermark()
            ),
            (100, 100, 100)
        );
        assert!(epochs(&follower).is_empty());
        assert!(matches!(
            follower.read(0, 100, true),
            Err(ReadError::OffsetOutOfRange { .. })
        ));
        catch_up(&leader, &follower, 1 << 20);
        assert_eq!(log_bytes(&follower), log_bytes(&leader));
        assert_eq!(epochs(&follower), vec![(2, 100)]);
        drop(follower);
        let follower = open(fd.path());
        follower.become_follower(0);
        assert_eq!(
            (follower.log_start_offset(), follower.log_end_offset()),
            (100, 102)
        );
        assert_eq!(log_bytes(&follower), log_bytes(&leader));
    }

    #[derive(Debug, Clone)]
    enum ReplicaOp {
        Append(Vec<Vec<u8>>, u8),
        NewEpoch,
        CatchUp(u16),
        ReopenFollower,
    }

    fn replica_op() -> impl Strategy<Value = ReplicaOp> {
        prop_oneof![
            6 => (prop::collection::vec(prop::collection::vec(any::<u8>(), 0..60), 1..4), 0u8..5)
                .prop_map(|(v, c)| ReplicaOp::Append(v, c)),
            1 => Just(ReplicaOp::NewEpoch),
            3 => any::<u16>().prop_map(ReplicaOp::CatchUp),
            1 => Just(ReplicaOp::ReopenFollower),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Random leader appends and epoch changes, and follower fetches of random sizes: the
        /// follower's log is always a byte-for-byte prefix of the leader's, whole batches only,
        /// with the same epochs.
        #[test]
        fn followers_hold_a_prefix_of_the_leader(ops in prop::collection::vec(replica_op(), 1..40)) {
            let codecs = [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];
            let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let leader = open(ld.path());
            leader.set_replicated(true);
            let mut follower = open(fd.path());
            follower.become_follower(0);
            let mut epoch = 0;
            for op in ops {
                match op {
                    ReplicaOp::Append(values, c) => {
                        let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
                        leader.append(&batch(&refs, codecs[c as usize], 0)).unwrap();
                    }
                    ReplicaOp::NewEpoch => {
                        epoch += 1;
                        leader.become_leader(epoch).unwrap();
                    }
                    ReplicaOp::CatchUp(max) => {
                        let from = follower.log_end_offset();
                        if from < leader.log_end_offset() {
                            let data = leader.read_replica(from, max as u64).unwrap();
                            let bytes = data.records.unwrap().read_bytes().unwrap();
                            prop_assert!(bytes.len() <= (max as usize).max(batch::split_batches(&bytes).unwrap().first().unwrap().1));
                            follower.append_replica(&bytes).unwrap();
                            // The leader commits what the follower has.
                            leader.advance_high_watermark(follower.log_end_offset());
                        }
                        let (f, l) = (log_bytes(&follower), log_bytes(&leader));
                        prop_assert_eq!(&f[..], &l[..f.len()]);
                        prop_assert!(leader.high_watermark() <= leader.log_end_offset());
                    }
                    ReplicaOp::ReopenFollower => {
                        drop(follower);
                        follower = open(fd.path());
                        follower.become_follower(epoch);
                    }
                }
            }
            catch_up(&leader, &follower, 1 << 20);
            prop_assert_eq!(log_bytes(&follower), log_bytes(&leader));
            let leader_epochs = epochs(&leader);
            let follower_epochs = epochs(&follower);
            if leader.log_end_offset() > 0 {
                // An epoch the leader took without writing anything is not in the follower's.
                let written: Vec<_> = leader_epochs.iter().copied().filter(|&(_, o)| o < leader.log_end_offset()).collect();
                prop_assert_eq!(follower_epochs, written);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<Vec<u8>>, u8),
        Reopen,
        Truncate(u8),
        Checkpoint,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (prop::collection::vec(prop::collection::vec(any::<u8>(), 0..80), 1..5), 0u8..5)
                .prop_map(|(v, c)| Op::Append(v, c)),
            1 => Just(Op::Reopen),
            1 => any::<u8>().prop_map(Op::Truncate),
            1 => Just(Op::Checkpoint),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random appends, rolls, truncations, checkpoints and reopenings: reads always equal
        /// the model of what was appended.
        #[test]
        fn log_matches_model(ops in prop::collection::vec(op(), 1..40)) {
            let codecs = [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut p = open(dir.path());
            let mut model: Vec<(i64, Vec<u8>)> = vec![];
            let mut batch_starts: Vec<i64> = vec![];
            for op in ops {
                match op {
                    Op::Append(values, c) => {
                        let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
                        let info = p.append(&batch(&refs, codecs[c as usize], 0)).unwrap();
                        prop_assert_eq!(info.base_offset, model.len() as i64);
                        batch_starts.push(info.base_offset);
                        for v in values { model.push((model.len() as i64, v)); }
                    }
                    Op::Reopen => { drop(p); p = open(dir.path()); }
                    Op::Checkpoint => { rt.block_on(p.checkpoint()).unwrap(); }
                    Op::Truncate(n) => {
                        if !batch_starts.is_empty() {
                            let at = batch_starts[n as usize % batch_starts.len()];
                            p.truncate_to(at).unwrap();
                            model.truncate(at as usize);
                            batch_starts.retain(|&b| b < at);
                        }
                    }
                }
                prop_assert_eq!(p.high_watermark(), model.len() as i64);
            }
            prop_assert_eq!(read_all(&p, 0), model);
        }
    }
}
