//! What a partition leader remembers about producers (KIP-98): per producer id, its epoch, the
//! sequence ranges of its last five batches (so a retried batch is answered with its original
//! offset instead of being written twice) and whether it has a transaction open here; per
//! partition, the open transactions (they hold back the last stable offset) and the aborted ones
//! (read_committed consumers get them with each fetch to drop their records).
//!
//! The state is rebuilt from the log: a snapshot written at checkpoints, then the batches after
//! it. Both are plain data so the rebuild and the live path share one set of rules.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::batch::BatchView;

/// How many batches per producer are remembered for duplicate detection (Kafka's
/// max.in.flight.requests.per.connection limit for idempotence).
pub const REMEMBERED_BATCHES: usize = 5;

/// How long an idle producer is remembered (Kafka's producer.id.expiration.ms default).
pub const EXPIRATION_MS: i64 = 24 * 3600 * 1000;

/// Control record types of transaction markers.
pub const MARKER_ABORT: i16 = 0;
pub const MARKER_COMMIT: i16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct BatchSeqs {
    first_seq: i32,
    last_seq: i32,
    first_offset: i64,
    last_offset: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchSeqs>,
    /// First offset of this producer's open transaction in this partition.
    txn_first_offset: Option<i64>,
    /// Wall-clock time of the producer's last write here (for expiry).
    last_write_ms: i64,
}

/// One producer as DescribeProducers shows it (KIP-664).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveProducer {
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// The sequence of its last record here; -1 when its batches carried none.
    pub last_sequence: i32,
    /// Wall-clock time of its last write here.
    pub last_write_ms: i64,
    /// First offset of its transaction open here.
    pub txn_first_offset: Option<i64>,
}

/// A transaction that was aborted: its records from `first_offset` up to the marker at
/// `last_offset` must be skipped by read_committed consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// Why a producer's batch was refused; each maps to a Kafka error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProducerError {
    #[error("producer {producer_id} epoch {got} is older than the current epoch {current}")]
    InvalidEpoch {
        producer_id: i64,
        current: i16,
        got: i16,
    },
    #[error("producer {producer_id} epoch {epoch}: sequence {got} does not follow {expected}")]
    OutOfOrder {
        producer_id: i64,
        epoch: i16,
        expected: String,
        got: i32,
    },
    #[error("{0}")]
    InvalidTxnState(String),
}

/// The verdict on an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Write it.
    Append,
    /// Already written at these offsets: answer with them, write nothing.
    Duplicate { first_offset: i64, last_offset: i64 },
}

/// Who is appending: clients are held to sequence numbers, the coordinators' own writes
/// (transactional offset commits) carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Client,
    Coordinator,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ProducerState {
    producers: HashMap<i64, ProducerEntry>,
    /// Open transactions: first offset → producer id.
    ongoing: BTreeMap<i64, i64>,
    /// Aborted transactions, in marker order.
    aborted: Vec<AbortedTxn>,
}

pub fn seq_add(seq: i32, n: i32) -> i32 {
    // Sequences wrap from i32::MAX to 0 (Kafka's DefaultRecordBatch.incrementSequence).
    ((seq as i64 + n as i64) % (i32::MAX as i64 + 1)) as i32
}

fn in_sequence(last: i32, next: i32) -> bool {
    next == seq_add(last, 1) || (last < 0 && next == 0)
}

impl ProducerState {
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty() && self.aborted.is_empty()
    }

    /// Decides whether a batch from a producer may be appended. Batches without a producer id
    /// are always admitted.
    pub fn check(&self, batch: &BatchView<'_>, origin: Origin) -> Result<Admission, ProducerError> {
        let pid = batch.producer_id();
        if pid < 0 {
            return Ok(Admission::Append);
        }
        let epoch = batch.producer_epoch();
        let entry = self.producers.get(&pid);
        if let Some(e) = entry {
            if epoch < e.epoch {
                return Err(ProducerError::InvalidEpoch {
                    producer_id: pid,
                    current: e.epoch,
                    got: epoch,
                });
            }
        }
        if origin == Origin::Client {
            let first = batch.base_sequence();
            let last = seq_add(first, batch.last_offset_delta());
            match entry {
                // An unknown producer (new, expired, or its batches removed by retention) may
                // start at any sequence, as in Kafka.
                None => {}
                Some(e) if e.epoch != epoch && first != 0 => {
                    return Err(ProducerError::OutOfOrder {
                        producer_id: pid,
                        epoch,
                        expected: "0 (new epoch)".into(),
                        got: first,
                    });
                }
                Some(e) if e.epoch != epoch => {}
                Some(e) => {
                    if let Some(d) = e
                        .batches
                        .iter()
                        .find(|b| b.first_seq == first && b.last_seq == last)
                    {
                        return Ok(Admission::Duplicate {
                            first_offset: d.first_offset,
                            last_offset: d.last_offset,
                        });
                    }
                    let last_seq = e.batches.back().map_or(-1, |b| b.last_seq);
                    if !in_sequence(last_seq, first) {
                        return Err(ProducerError::OutOfOrder {
                            producer_id: pid,
                            epoch,
                            expected: seq_add(last_seq.max(-1), 1).max(0).to_string(),
                            got: first,
                        });
                    }
                }
            }
        }
        let open_txn = entry.is_some_and(|e| e.epoch == epoch && e.txn_first_offset.is_some());
        if !batch.is_transactional() && open_txn {
            return Err(ProducerError::InvalidTxnState(format!(
                "producer {pid} wrote a non-transactional batch while its transaction is open"
            )));
        }
        Ok(Admission::Append)
    }

    /// Wall-clock time of the producer's last write here.
    pub fn last_write_ms(&self, producer_id: i64) -> Option<i64> {
        self.producers.get(&producer_id).map(|e| e.last_write_ms)
    }

    /// Whether the producer has a transaction open in this partition at this epoch.
    pub fn has_open_txn(&self, producer_id: i64, epoch: i16) -> bool {
        self.producers
            .get(&producer_id)
            .is_some_and(|e| e.epoch == epoch && e.txn_first_offset.is_some())
    }

    /// Records an appended (offset-stamped) data batch.
    pub fn record_batch(&mut self, batch: &BatchView<'_>, now_ms: i64) {
        let pid = batch.producer_id();
        if pid < 0 {
            return;
        }
        let epoch = batch.producer_epoch();
        let e = self.producers.entry(pid).or_insert_with(|| ProducerEntry {
            epoch,
            batches: VecDeque::new(),
            txn_first_offset: None,
            last_write_ms: now_ms,
        });
        if e.epoch != epoch {
            e.epoch = epoch;
            e.batches.clear();
        }
        let first_seq = batch.base_sequence();
        if first_seq >= 0 {
            if e.batches.len() == REMEMBERED_BATCHES {
                e.batches.pop_front();
            }
            e.batches.push_back(BatchSeqs {
                first_seq,
                last_seq: seq_add(first_seq, batch.last_offset_delta()),
                first_offset: batch.base_offset(),
                last_offset: batch.last_offset(),
            });
        }
        if batch.is_transactional() && e.txn_first_offset.is_none() {
            e.txn_first_offset = Some(batch.base_offset());
            self.ongoing.insert(batch.base_offset(), pid);
        }
        e.last_write_ms = e.last_write_ms.max(now_ms);
    }

    /// Records a commit or abort marker written at `offset`.
    pub fn record_marker(
        &mut self,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        offset: i64,
        now_ms: i64,
    ) {
        let e = self
            .producers
            .entry(producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch,
                batches: VecDeque::new(),
                txn_first_offset: None,
                last_write_ms: now_ms,
            });
        if epoch > e.epoch {
            e.epoch = epoch;
            e.batches.clear();
        }
        e.last_write_ms = e.last_write_ms.max(now_ms);
        if let Some(first) = e.txn_first_offset.take() {
            self.ongoing.remove(&first);
            if !commit {
                self.aborted.push(AbortedTxn {
                    producer_id,
                    first_offset: first,
                    last_offset: offset,
                });
            }
        }
    }

    /// The first offset of the oldest open transaction.
    pub fn first_unstable_offset(&self) -> Option<i64> {
        self.ongoing.keys().next().copied()
    }

    /// Open transactions as (producer id, producer epoch, first offset).
    pub fn open_transactions(&self) -> Vec<(i64, i16, i64)> {
        self.ongoing
            .iter()
            .map(|(&o, &p)| (p, self.producers.get(&p).map_or(0, |e| e.epoch), o))
            .collect()
    }

    /// Every producer remembered here, by producer id.
    pub fn active_producers(&self) -> Vec<ActiveProducer> {
        let mut out: Vec<ActiveProducer> = self
            .producers
            .iter()
            .map(|(&producer_id, e)| ActiveProducer {
                producer_id,
                producer_epoch: e.epoch,
                last_sequence: e.batches.back().map_or(-1, |b| b.last_seq),
                last_write_ms: e.last_write_ms,
                txn_first_offset: e.txn_first_offset,
            })
            .collect();
        out.sort_by_key(|p| p.producer_id);
        out
    }

    /// Whether the transaction `seen` open is still open as it was, with no write from its
    /// producer here since before `idle_before_ms`.
    pub fn still_hanging(&self, seen: &ActiveProducer, idle_before_ms: i64) -> bool {
        seen.txn_first_offset.is_some()
            && self.producers.get(&seen.producer_id).is_some_and(|e| {
                e.epoch == seen.producer_epoch
                    && e.txn_first_offset == seen.txn_first_offset
                    && e.last_write_ms < idle_before_ms
            })
    }

    /// Aborted transactions that overlap [from, to).
    pub fn aborted_between(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        self.aborted
            .iter()
            .filter(|a| a.last_offset >= from && a.first_offset < to)
            .copied()
            .collect()
    }

    /// Whether the record at `offset` of `producer_id` belongs to an aborted transaction.
    pub fn is_aborted(&self, producer_id: i64, offset: i64) -> bool {
        self.aborted.iter().any(|a| {
            a.producer_id == producer_id && a.first_offset <= offset && offset < a.last_offset
        })
    }

    /// Forgets what the log no longer holds: aborted transactions that ended before
    /// `log_start`, and producers idle for longer than `expiry_ms` with nothing open.
    pub fn expire(&mut self, log_start: i64, now_ms: i64, expiry_ms: i64) {
        self.aborted.retain(|a| a.last_offset >= log_start);
        self.producers
            .retain(|_, e| e.txn_first_offset.is_some() || now_ms - e.last_write_ms < expiry_ms);
    }

    /// Whether the state knows of anything at or after `offset`: a truncation there means the
    /// state must be rebuilt from the log.
    pub fn covers_offsets_from(&self, offset: i64) -> bool {
        self.producers.values().any(|e| {
            e.batches.iter().any(|b| b.last_offset >= offset)
                || e.txn_first_offset.is_some_and(|o| o >= offset)
        }) || self.aborted.iter().any(|a| a.last_offset >= offset)
    }
}

/// The marker type of a control batch, from its (single) record's key.
pub fn marker_type(batch: &BatchView<'_>) -> Option<i16> {
    let mut found = None;
    batch
        .for_each_record(|r| {
            if let Some(k) = r.key.filter(|k| k.len() >= 4) {
                found.get_or_insert(i16::from_be_bytes([k[2], k[3]]));
            }
        })
        .ok()?;
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{stamp, BatchBuilder, ProducerFields};
    use kafka_protocol::records::Compression;

    fn batch(pid: i64, epoch: i16, seq: i32, n: usize, txn: bool, offset: i64) -> Vec<u8> {
        let mut b = BatchBuilder::new(1000).with_producer(ProducerFields {
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            transactional: txn,
        });
        for _ in 0..n {
            b.push(None, Some(b"v"), &[], 1000);
        }
        let mut bytes = b.finish(Compression::None);
        stamp(&mut bytes, offset, 0);
        bytes
    }

    fn append(s: &mut ProducerState, bytes: &[u8]) -> Result<Admission, ProducerError> {
        let v = BatchView::new(bytes);
        let a = s.check(&v, Origin::Client)?;
        if a == Admission::Append {
            s.record_batch(&v, 0);
        }
        Ok(a)
    }

    #[test]
    fn duplicates_answer_with_the_original_offsets() {
        let mut s = ProducerState::default();
        assert_eq!(
            append(&mut s, &batch(7, 0, 0, 3, false, 0)),
            Ok(Admission::Append)
        );
        assert_eq!(
            append(&mut s, &batch(7, 0, 3, 2, false, 3)),
            Ok(Admission::Append)
        );
        assert_eq!(
            append(&mut s, &batch(7, 0, 0, 3, false, 5)),
            Ok(Admission::Duplicate {
                first_offset: 0,
                last_offset: 2
            })
        );
        assert!(matches!(
            append(&mut s, &batch(7, 0, 9, 1, false, 5)),
            Err(ProducerError::OutOfOrder { got: 9, .. })
        ));
        assert!(matches!(
            append(&mut s, &batch(7, 0, 5, 1, false, 5)),
            Ok(Admission::Append)
        ));
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut s = ProducerState::default();
        for i in 0..6 {
            append(&mut s, &batch(1, 0, i, 1, false, i as i64)).unwrap();
        }
        // Batch 0 has been forgotten: it is no longer a duplicate but out of order.
        assert!(matches!(
            append(&mut s, &batch(1, 0, 0, 1, false, 6)),
            Err(ProducerError::OutOfOrder { .. })
        ));
        assert_eq!(
            append(&mut s, &batch(1, 0, 1, 1, false, 6)),
            Ok(Admission::Duplicate {
                first_offset: 1,
                last_offset: 1
            })
        );
    }

    #[test]
    fn epochs_fence_and_restart_sequences() {
        let mut s = ProducerState::default();
        append(&mut s, &batch(1, 3, 0, 1, false, 0)).unwrap();
        assert!(matches!(
            append(&mut s, &batch(1, 2, 1, 1, false, 1)),
            Err(ProducerError::InvalidEpoch { current: 3, .. })
        ));
        assert!(matches!(
            append(&mut s, &batch(1, 4, 5, 1, false, 1)),
            Err(ProducerError::OutOfOrder { .. })
        ));
        assert_eq!(
            append(&mut s, &batch(1, 4, 0, 1, false, 1)),
            Ok(Admission::Append)
        );
        // Sequences wrap.
        let mut s = ProducerState::default();
        append(&mut s, &batch(2, 0, i32::MAX - 1, 2, false, 0)).unwrap();
        assert_eq!(
            append(&mut s, &batch(2, 0, 0, 1, false, 2)),
            Ok(Admission::Append)
        );
    }

    #[test]
    fn a_transaction_hangs_only_while_it_stays_as_it_was_seen() {
        let mut s = ProducerState::default();
        let at = |s: &mut ProducerState, bytes: &[u8], now: i64| {
            let v = BatchView::new(bytes);
            s.check(&v, Origin::Client).unwrap();
            s.record_batch(&v, now);
        };
        at(&mut s, &batch(1, 0, 0, 2, true, 10), 1_000);
        at(&mut s, &batch(2, 0, 0, 1, false, 12), 1_000);
        let seen = s.active_producers();
        assert_eq!(
            seen,
            vec![
                ActiveProducer {
                    producer_id: 1,
                    producer_epoch: 0,
                    last_sequence: 1,
                    last_write_ms: 1_000,
                    txn_first_offset: Some(10),
                },
                ActiveProducer {
                    producer_id: 2,
                    producer_epoch: 0,
                    last_sequence: 0,
                    last_write_ms: 1_000,
                    txn_first_offset: None,
                },
            ]
        );
        let txn = seen[0];
        assert!(s.still_hanging(&txn, 2_000));
        // Written to too recently, or not in a transaction at all: not hanging.
        assert!(!s.still_hanging(&txn, 1_000));
        assert!(!s.still_hanging(&seen[1], 2_000));
        // A write after it was seen keeps it open.
        at(&mut s, &batch(1, 0, 2, 1, true, 13), 5_000);
        assert!(!s.still_hanging(&txn, 2_000));
        // Ended and opened again: another transaction, not the one seen.
        s.record_marker(1, 0, false, 14, 5_000);
        at(&mut s, &batch(1, 0, 3, 1, true, 15), 5_000);
        assert!(!s.still_hanging(&txn, 9_000));
        assert!(s.still_hanging(&s.active_producers()[0], 9_000));
    }

    #[test]
    fn transactions_hold_the_stable_offset_and_aborts_are_listed() {
        let mut s = ProducerState::default();
        append(&mut s, &batch(1, 0, 0, 2, true, 10)).unwrap();
        append(&mut s, &batch(2, 0, 0, 1, true, 12)).unwrap();
        append(&mut s, &batch(1, 0, 2, 1, true, 13)).unwrap();
        assert_eq!(s.first_unstable_offset(), Some(10));
        assert!(matches!(
            append(&mut s, &batch(1, 0, 3, 1, false, 14)),
            Err(ProducerError::InvalidTxnState(_))
        ));
        s.record_marker(1, 0, false, 14, 0);
        assert_eq!(s.first_unstable_offset(), Some(12));
        s.record_marker(2, 0, true, 15, 0);
        assert_eq!(s.first_unstable_offset(), None);
        let aborted = s.aborted_between(0, 100);
        assert_eq!(
            aborted,
            vec![AbortedTxn {
                producer_id: 1,
                first_offset: 10,
                last_offset: 14
            }]
        );
        assert!(s.aborted_between(15, 100).is_empty());
        assert!(s.is_aborted(1, 13) && !s.is_aborted(2, 12));
        s.expire(15, 0, 1000);
        assert!(s.aborted_between(0, 100).is_empty());
    }

    #[test]
    fn a_marker_with_a_new_epoch_fences_the_old_one() {
        let mut s = ProducerState::default();
        append(&mut s, &batch(1, 0, 0, 1, true, 0)).unwrap();
        s.record_marker(1, 1, false, 1, 0);
        assert!(matches!(
            append(&mut s, &batch(1, 0, 1, 1, true, 2)),
            Err(ProducerError::InvalidEpoch { .. })
        ));
        assert_eq!(
            append(&mut s, &batch(1, 1, 0, 1, true, 2)),
            Ok(Admission::Append)
        );
    }

    #[test]
    fn idle_producers_expire() {
        let mut s = ProducerState::default();
        let v = batch(1, 0, 0, 1, false, 0);
        s.record_batch(&BatchView::new(&v), 1_000);
        s.expire(0, 2_000, 5_000);
        assert!(!s.is_empty());
        s.expire(0, 7_000, 5_000);
        assert!(s.is_empty());
    }
}
