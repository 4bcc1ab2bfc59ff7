//! The leader-epoch checkpoint of a partition: which leader epoch started at which offset.
//!
//! Kept in Kafka's text layout (`leader-epoch-checkpoint`: version line, count line, then
//! "epoch start_offset" lines) so replication can find where two logs diverge (KIP-101/279).

use std::io;
use std::path::{Path, PathBuf};

use super::write_atomically;

pub const FILE_NAME: &str = "leader-epoch-checkpoint";

#[derive(Debug)]
pub struct EpochCache {
    path: PathBuf,
    entries: Vec<(i32, i64)>,
}

impl EpochCache {
    pub fn load(dir: &Path) -> io::Result<EpochCache> {
        let path = dir.join(FILE_NAME);
        let mut entries = Vec::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines().skip(2) {
                    let mut parts = line.split_whitespace();
                    if let (Some(Ok(e)), Some(Ok(o))) = (
                        parts.next().map(str::parse::<i32>),
                        parts.next().map(str::parse::<i64>),
                    ) {
                        entries.push((e, o));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(EpochCache { path, entries })
    }

    pub fn latest_epoch(&self) -> Option<i32> {
        self.entries.last().map(|&(e, _)| e)
    }

    pub fn entries(&self) -> &[(i32, i64)] {
        &self.entries
    }

    /// Records that `epoch` starts at `start_offset` if it is newer than the latest one. Epochs
    /// recorded as starting there or later held no batch: they are replaced, as in Kafka.
    pub fn assign(&mut self, epoch: i32, start_offset: i64) -> io::Result<()> {
        if self.latest_epoch().is_some_and(|e| e >= epoch) {
            return Ok(());
        }
        self.entries.retain(|&(_, o)| o < start_offset);
        self.entries.push((epoch, start_offset));
        self.persist()
    }

    /// Kafka's OffsetsForLeaderEpoch answer (KIP-101/279) for a log ending at `log_end`: the
    /// largest known epoch <= `epoch` and the offset where it ends (the start of the next known
    /// epoch, or `log_end` for the latest one). An epoch older than every known one answers
    /// with itself and the start of the first known epoch (the log before it is gone); an epoch
    /// newer than every known one, -1 or an empty cache answer (-1, -1) (UNDEFINED).
    pub fn end_offset_for(&self, epoch: i32, log_end: i64) -> (i32, i64) {
        const UNDEFINED: (i32, i64) = (-1, -1);
        if epoch < 0 {
            return UNDEFINED;
        }
        if self.latest_epoch() == Some(epoch) {
            return (epoch, log_end);
        }
        // Entries are in increasing epoch order.
        let higher = self.entries.partition_point(|&(e, _)| e <= epoch);
        match (higher.checked_sub(1), self.entries.get(higher)) {
            (_, None) => UNDEFINED,
            (None, Some(&(_, start))) => (epoch, start),
            (Some(floor), Some(&(_, start))) => (self.entries[floor].0, start),
        }
    }

    /// Forgets epochs that start at or after `end_offset` (the log was truncated there).
    pub fn truncate_from_end(&mut self, end_offset: i64) -> io::Result<()> {
        let before = self.entries.len();
        self.entries.retain(|&(_, o)| o < end_offset);
        if self.entries.len() != before {
            self.persist()?;
        }
        Ok(())
    }

    /// The log now starts at `start_offset` (retention): epochs that ended before it are
    /// forgotten and the one it falls in is moved to start there, as Kafka does.
    pub fn truncate_from_start(&mut self, start_offset: i64) -> io::Result<()> {
        let covering = self.entries.partition_point(|&(_, o)| o <= start_offset);
        let Some(keep) = covering.checked_sub(1) else {
            return Ok(());
        };
        if keep == 0 && self.entries[0].1 == start_offset {
            return Ok(());
        }
        self.entries.drain(..keep);
        self.entries[0].1 = start_offset;
        self.persist()
    }

    /// Forgets every epoch (the log was emptied).
    pub fn clear(&mut self) -> io::Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        self.entries.clear();
        self.persist()
    }

    fn persist(&self) -> io::Result<()> {
        let mut text = format!("0\n{}\n", self.entries.len());
        for (e, o) in &self.entries {
            text.push_str(&format!("{e} {o}\n"));
        }
        write_atomically(&self.path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EpochCache::load(dir.path()).unwrap();
        c.assign(0, 0).unwrap();
        c.assign(0, 10).unwrap();
        c.assign(2, 50).unwrap();
        c.assign(3, 50).unwrap();
        let again = EpochCache::load(dir.path()).unwrap();
        assert_eq!(again.entries(), &[(0, 0), (3, 50)]);
        c.truncate_from_end(50).unwrap();
        assert_eq!(EpochCache::load(dir.path()).unwrap().entries(), &[(0, 0)]);
    }

    #[test]
    fn end_offsets_follow_kafka() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EpochCache::load(dir.path()).unwrap();
        assert_eq!(c.end_offset_for(0, 0), (-1, -1));
        c.assign(2, 10).unwrap();
        c.assign(4, 30).unwrap();
        c.assign(7, 55).unwrap();
        // The latest epoch ends at the log end.
        assert_eq!(c.end_offset_for(7, 80), (7, 80));
        // A known epoch ends where the next one starts.
        assert_eq!(c.end_offset_for(2, 80), (2, 30));
        assert_eq!(c.end_offset_for(4, 80), (4, 55));
        // An unknown epoch between known ones: the largest known below it, and its end.
        assert_eq!(c.end_offset_for(3, 80), (2, 30));
        assert_eq!(c.end_offset_for(6, 80), (4, 55));
        // Older than everything known: where the first known epoch starts.
        assert_eq!(c.end_offset_for(1, 80), (1, 10));
        // Newer than everything known, or undefined.
        assert_eq!(c.end_offset_for(8, 80), (-1, -1));
        assert_eq!(c.end_offset_for(-1, 80), (-1, -1));
    }

    #[test]
    fn truncating_from_the_start_keeps_the_covering_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EpochCache::load(dir.path()).unwrap();
        c.assign(1, 0).unwrap();
        c.assign(2, 20).unwrap();
        c.assign(5, 40).unwrap();
        c.truncate_from_start(5).unwrap();
        assert_eq!(c.entries(), &[(1, 5), (2, 20), (5, 40)]);
        c.truncate_from_start(20).unwrap();
        assert_eq!(c.entries(), &[(2, 20), (5, 40)]);
        c.truncate_from_start(45).unwrap();
        assert_eq!(EpochCache::load(dir.path()).unwrap().entries(), &[(5, 45)]);
        c.clear().unwrap();
        assert!(EpochCache::load(dir.path()).unwrap().entries().is_empty());
    }
}
