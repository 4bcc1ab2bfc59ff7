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

    /// Records that `epoch` starts at `start_offset` if it is newer than the latest one.
    pub fn assign(&mut self, epoch: i32, start_offset: i64) -> io::Result<()> {
        if self.latest_epoch().is_some_and(|e| e >= epoch) {
            return Ok(());
        }
        self.entries.push((epoch, start_offset));
        self.persist()
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
        c.assign(3, 50).unwrap();
        let again = EpochCache::load(dir.path()).unwrap();
        assert_eq!(again.entries(), &[(0, 0), (3, 50)]);
        c.truncate_from_end(50).unwrap();
        assert_eq!(EpochCache::load(dir.path()).unwrap().entries(), &[(0, 0)]);
    }
}
