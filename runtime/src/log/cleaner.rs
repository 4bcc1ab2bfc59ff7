//! Log compaction (cleanup.policy=compact): keep the latest record per key.
//!
//! A pass over a partition:
//! 1. builds a map key-hash → latest offset from the segments written since the last pass (the
//!    dirty part), bounded by the dedupe buffer;
//! 2. rewrites every non-active segment up to where the map reaches, keeping a record only if it
//!    is the latest for its key and is not a tombstone older than delete.retention.ms; records
//!    keep their offsets (batches may have gaps) and consecutive small segments are merged;
//! 3. swaps each rewritten group in under the partition lock: `<base>.log.cleaned` (fsynced) →
//!    `<base>-<end>.swap` → old segments removed → `<base>.log`. A crash at any point leaves
//!    either the old segments or a `.swap` that start-up completes ([`finish_interrupted_swaps`]).
//!
//! The active segment is never touched, and produce/fetch keep running: readers holding an old
//! segment's file handle still read it after the swap.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use super::batch::{retain_records, BatchView, Retained, HEADER_LEN, LOG_OVERHEAD};
use super::partition::Partition;
use super::segment::{file_stem, log_path, Segment};
use super::write_atomically;

const CHECKPOINT_FILE: &str = "cleaner-checkpoint";

/// What one pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CleanReport {
    pub segments_in: usize,
    pub segments_out: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_removed: u64,
}

fn key_hash(key: &[u8]) -> u128 {
    let mut a = DefaultHasher::new();
    key.hash(&mut a);
    let mut b = DefaultHasher::new();
    0xa5u8.hash(&mut b);
    key.hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

/// Calls `f` with every complete, CRC-valid batch of the first `size` bytes of `file`.
fn for_each_batch(
    file: &File,
    size: u64,
    mut f: impl FnMut(BatchView<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let mut handle = file;
    handle.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(1 << 20, handle.take(size));
    let mut buf = Vec::new();
    loop {
        let mut head = [0u8; LOG_OVERHEAD];
        match reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = i32::from_be_bytes(head[8..12].try_into().unwrap());
        if len < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad batch length in a segment",
            ));
        }
        buf.clear();
        buf.extend_from_slice(&head);
        buf.resize(LOG_OVERHEAD + len as usize, 0);
        reader.read_exact(&mut buf[LOG_OVERHEAD..])?;
        let view = BatchView::new(&buf);
        view.check_integrity()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        f(view)?;
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// One non-active segment as the cleaner saw it.
struct Input {
    base: i64,
    file: Arc<File>,
    size: u64,
    /// Base offset of the segment after it.
    end: i64,
}

impl Partition {
    /// One compaction pass; None when the topic does not compact or nothing is due.
    /// `max_keys` bounds the key map (Kafka's log.cleaner.dedupe.buffer.size / 24).
    pub fn compact(&self, now_ms: i64, max_keys: usize) -> io::Result<Option<CleanReport>> {
        let checkpoint: i64 = std::fs::read_to_string(self.dir().join(CHECKPOINT_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(i64::MIN);
        let stable = self.last_stable_offset();
        let (inputs, config) = {
            let log = self.log.lock();
            if !log.config.compacts() {
                return Ok(None);
            }
            let bases: Vec<i64> = log.segments.keys().copied().collect();
            // Segments reaching past an open transaction wait until it ends.
            let inputs: Vec<Input> = bases
                .windows(2)
                .filter(|w| w[1] <= stable)
                .map(|w| {
                    let s = &log.segments[&w[0]];
                    Input {
                        base: w[0],
                        file: s.file().clone(),
                        size: s.size(),
                        end: w[1],
                    }
                })
                .collect();
            (inputs, log.config.clone())
        };
        let total: u64 = inputs.iter().map(|i| i.size).sum();
        let dirty: u64 = inputs
            .iter()
            .filter(|i| i.end > checkpoint)
            .map(|i| i.size)
            .sum();
        if dirty == 0
            || total == 0
            || (dirty as f64 / total as f64) < config.min_cleanable_dirty_ratio
        {
            return Ok(None);
        }

        // 1. Latest offset per key over the dirty segments.
        let mut latest: HashMap<u128, i64> = HashMap::new();
        let mut cleanable_end = i64::MIN;
        for input in inputs.iter().filter(|i| i.end > checkpoint) {
            if latest.len() >= max_keys && cleanable_end != i64::MIN {
                break;
            }
            for_each_batch(&input.file, input.size, |batch| {
                // Markers carry no keys; aborted records never count as the latest value.
                if batch.is_control() || self.aborted_batch(&batch) {
                    return Ok(());
                }
                let base = batch.base_offset();
                batch
                    .for_each_record(|r| {
                        if let Some(k) = r.key {
                            latest.insert(key_hash(k), base + r.offset_delta as i64);
                        }
                    })
                    .map_err(invalid)
            })?;
            cleanable_end = input.end;
        }

        // 2 + 3. Rewrite and swap in groups of consecutive segments.
        let mut report = CleanReport::default();
        let horizon = now_ms - config.delete_retention_ms;
        let cleanable: Vec<&Input> = inputs.iter().filter(|i| i.end <= cleanable_end).collect();
        let mut groups: Vec<Vec<&Input>> = Vec::new();
        for input in cleanable {
            match groups.last_mut() {
                Some(g)
                    if g.iter().map(|i| i.size).sum::<u64>() + input.size
                        <= config.segment_bytes =>
                {
                    g.push(input)
                }
                _ => groups.push(vec![input]),
            }
        }
        for group in groups {
            let first = group[0].base;
            let end = group.last().unwrap().end;
            let cleaned_path = self.dir().join(format!("{}.log.cleaned", file_stem(first)));
            let mut out = std::io::BufWriter::with_capacity(1 << 20, File::create(&cleaned_path)?);
            let mut written = 0u64;
            for input in &group {
                report.bytes_before += input.size;
                for_each_batch(&input.file, input.size, |batch| {
                    let base = batch.base_offset();
                    let outcome = if batch.is_control() {
                        Retained::All
                    } else if self.aborted_batch(&batch) {
                        report.records_removed += batch.record_count().max(0) as u64;
                        Retained::None
                    } else {
                        let tombstones_expire = batch.max_timestamp() < horizon;
                        retain_records(&batch, |r| {
                            let offset = base + r.offset_delta as i64;
                            let keep = match r.key {
                                None => false,
                                Some(k) => latest.get(&key_hash(k)).is_none_or(|&o| offset >= o),
                            } && !(r.value.is_none() && tombstones_expire);
                            if !keep {
                                report.records_removed += 1;
                            }
                            keep
                        })
                        .map_err(invalid)?
                    };
                    match outcome {
                        Retained::All => {
                            out.write_all(batch.bytes())?;
                            written += batch.bytes().len() as u64;
                        }
                        Retained::Some(b) => {
                            out.write_all(&b)?;
                            written += b.len() as u64;
                        }
                        Retained::None => {}
                    }
                    Ok(())
                })?;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            if !self.swap_in(&group, first, end, &cleaned_path)? {
                let _ = std::fs::remove_file(&cleaned_path);
                tracing::info!(topic = %self.topic, partition = self.id, "compaction skipped a group changed by retention");
                continue;
            }
            report.segments_in += group.len();
            report.segments_out += 1;
            report.bytes_after += written;
        }
        write_atomically(
            &self.dir().join(CHECKPOINT_FILE),
            cleanable_end.to_string().as_bytes(),
        )?;
        if report.segments_in > 0 {
            tracing::info!(topic = %self.topic, partition = self.id, ?report, "compacted");
        }
        Ok(Some(report))
    }

    fn aborted_batch(&self, batch: &BatchView<'_>) -> bool {
        batch.is_transactional() && self.is_aborted(batch.producer_id(), batch.base_offset())
    }

    /// Replaces the group's segments by the cleaned file; false if they changed meanwhile.
    fn swap_in(&self, group: &[&Input], first: i64, end: i64, cleaned: &Path) -> io::Result<bool> {
        let mut log = self.log.lock();
        let unchanged = group.iter().all(|i| {
            log.segments
                .get(&i.base)
                .is_some_and(|s| Arc::ptr_eq(s.file(), &i.file))
        });
        if !unchanged {
            return Ok(false);
        }
        let swap = self
            .dir()
            .join(format!("{}-{}.swap", file_stem(first), file_stem(end)));
        std::fs::rename(cleaned, &swap)?;
        for i in group {
            if let Some(s) = log.segments.remove(&i.base) {
                s.delete_files();
            }
        }
        std::fs::rename(&swap, log_path(self.dir(), first))?;
        let (segment, _) =
            Segment::open(self.dir(), first, log.config.index_interval_bytes, false)?;
        log.segments.insert(first, segment);
        log.mark_dir_dirty();
        Ok(true)
    }
}

/// Completes swaps a crash interrupted: `<a>-<b>.swap` replaces the segments in [a, b).
/// Unfinished `.cleaned` files are discarded.
pub fn finish_interrupted_swaps(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".log.cleaned") {
            std::fs::remove_file(&path)?;
        } else if let Some(range) = name.strip_suffix(".swap") {
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>()) else {
                continue;
            };
            for e in std::fs::read_dir(dir)? {
                let p = e?.path();
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let base = n.split('.').next().and_then(|s| s.parse::<i64>().ok());
                let is_segment_file =
                    n.ends_with(".log") || n.ends_with(".index") || n.ends_with(".timeindex");
                if is_segment_file && base.is_some_and(|base| (a..b).contains(&base)) {
                    std::fs::remove_file(&p)?;
                }
            }
            std::fs::rename(&path, log_path(dir, a))?;
            tracing::warn!(dir = %dir.display(), segment = a, "completed an interrupted compaction swap");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::BatchBuilder;
    use crate::log::config::{CleanupPolicy, LogConfig};
    use kafka_protocol::records::Compression;

    fn put(p: &Partition, key: &str, value: Option<&str>, ts: i64) -> i64 {
        let mut b = BatchBuilder::new(ts);
        b.push(Some(key.as_bytes()), value.map(str::as_bytes), &[], ts);
        p.append(&b.finish(Compression::Lz4)).unwrap().base_offset
    }

    fn read_all(p: &Partition) -> Vec<(i64, String, Option<String>)> {
        let mut out = vec![];
        let mut from = p.log_start_offset();
        while from < p.high_watermark() {
            let data = p.read(from, 1 << 20, true).unwrap();
            let Some(slice) = data.records else { break };
            let bytes = slice.read_bytes().unwrap();
            for batch in crate::log::batch::complete_batches(&bytes) {
                let base = batch.base_offset();
                batch
                    .for_each_record(|r| {
                        let o = base + r.offset_delta as i64;
                        if o >= from {
                            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                            out.push((o, s(r.key.unwrap()), r.value.map(s)));
                        }
                    })
                    .unwrap();
                from = batch.next_offset();
            }
        }
        out
    }

    #[test]
    fn keeps_latest_per_key_with_original_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            cleanup_policy: CleanupPolicy::Compact,
            segment_bytes: 400,
            min_cleanable_dirty_ratio: 0.0,
            delete_retention_ms: 1000,
            ..LogConfig::default()
        };
        let (p, _) = Partition::open(dir.path(), Arc::from("c"), 0, cfg.clone(), 0).unwrap();
        let now = 1_000_000;
        let mut last = HashMap::new();
        for i in 0..60 {
            let key = format!("k{}", i % 5);
            let off = put(&p, &key, Some(&format!("v{i}")), now);
            last.insert(key, (off, format!("v{i}")));
        }
        put(&p, "k0", None, now - 5000); // an old tombstone for k0
        for i in 0..10 {
            put(&p, "filler", Some(&format!("f{i}")), now); // pushes the tombstone out of the active segment
        }
        let before = p.size_bytes();
        let report = p.compact(now, 1000).unwrap().unwrap();
        assert!(report.records_removed > 50, "{report:?}");
        assert!(p.size_bytes() < before);
        let records = read_all(&p);
        // Offsets ascend, and every surviving record is the latest for its key.
        assert!(records.windows(2).all(|w| w[0].0 < w[1].0));
        for (off, key, value) in &records {
            if key != "filler" {
                assert_eq!(Some((*off, value.clone().unwrap())), last.get(key).cloned());
            }
        }
        assert!(
            !records.iter().any(|(_, k, _)| k == "k0"),
            "tombstoned key must be gone"
        );
        // Reopen: the compacted segments recover cleanly and read the same.
        drop(p);
        let (p, report) = Partition::open(dir.path(), Arc::from("c"), 0, cfg, 0).unwrap();
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(read_all(&p), records);
    }

    #[test]
    fn interrupted_swap_is_completed() {
        let dir = tempfile::tempdir().unwrap();
        for base in [0i64, 10, 20] {
            std::fs::write(log_path(dir.path(), base), b"old").unwrap();
        }
        std::fs::write(
            dir.path()
                .join(format!("{}-{}.swap", file_stem(0), file_stem(20))),
            b"new",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("{}.log.cleaned", file_stem(20))),
            b"partial",
        )
        .unwrap();
        finish_interrupted_swaps(dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                format!("{}.log", file_stem(0)),
                format!("{}.log", file_stem(20))
            ]
        );
        assert_eq!(std::fs::read(log_path(dir.path(), 0)).unwrap(), b"new");
    }
}
