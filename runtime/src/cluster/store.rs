//! Raft storage for the metadata quorum, under `<data-dir>/raft/`:
//! - `log`: the Raft log, appended as framed JSON entries (u32 length, u32 CRC-32C, bytes) and
//!   fsynced before an append is acknowledged; a torn tail is dropped at open;
//! - `vote.json`, `committed.json`, `purged.json`: small state, replaced atomically;
//! - `snapshot.json`: the last snapshot of the cluster image, which bounds the log.
//!
//! A write that fails (a full disk, an I/O error) is retried every second until it succeeds:
//! the node's metadata stalls meanwhile, as a paused node's would, and the other voters go on
//! without it; openraft would otherwise stop this node's Raft for good on the first error.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Cursor, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use super::image::{ClusterImage, CommandError};
use super::TypeConfig;
use crate::log::write_atomically;

type RaftNodeId = u64;

/// What applying a command answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandOutcome(pub Result<(), CommandError>);

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Runs a write to the Raft storage until it succeeds (see the module's comment).
async fn until_written<T>(what: &str, mut write: impl FnMut() -> io::Result<T>) -> T {
    let mut failures = 0u32;
    loop {
        match write() {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(what, failures, "the Raft storage can be written again");
                }
                return v;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::error!(what, error = %e, "cannot write the Raft storage; trying again every second");
                }
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| io_err(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_atomically(path, &serde_json::to_vec(value).map_err(io_err)?)
}

fn frame(entry: &Entry<TypeConfig>) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(entry).map_err(io_err)?;
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads whole frames; stops at the first torn or corrupt one. Returns the entries and the
/// length of the valid prefix.
fn read_frames(raw: &[u8]) -> (Vec<Entry<TypeConfig>>, usize) {
    let mut entries = Vec::new();
    let mut pos = 0;
    while raw.len() - pos >= 8 {
        let len = u32::from_le_bytes(raw[pos..pos + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(raw[pos + 4..pos + 8].try_into().unwrap());
        let Some(body) = raw.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32c::crc32c(body) != crc {
            break;
        }
        match serde_json::from_slice(body) {
            Ok(e) => entries.push(e),
            Err(_) => break,
        }
        pos += 8 + len;
    }
    (entries, pos)
}

struct LogInner {
    dir: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<RaftNodeId>>,
    vote: Option<Vote<RaftNodeId>>,
    committed: Option<LogId<RaftNodeId>>,
}

impl LogInner {
    fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// Rewrites the log file with what is kept in memory (after a truncation or purge).
    fn rewrite(&mut self) -> io::Result<()> {
        let mut data = Vec::new();
        for e in self.entries.values() {
            data.extend_from_slice(&frame(e)?);
        }
        write_atomically(&self.log_path(), &data)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new().append(true).open(self.log_path())?;
        Ok(())
    }
}

/// The Raft log. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log");
        let mut raw = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut raw)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (entries, valid) = read_frames(&raw);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if valid < raw.len() {
            tracing::warn!(
                bytes = raw.len() - valid,
                "dropping a torn tail of the Raft log"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                dir: dir.to_path_buf(),
                file,
                entries: entries.into_iter().map(|e| (e.log_id.index, e)).collect(),
                last_purged: read_json(&dir.join("purged.json"))?,
                vote: read_json(&dir.join("vote.json"))?,
                committed: read_json(&dir.join("committed.json"))?,
            })),
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<RaftNodeId>> {
        let inner = self.inner.lock().await;
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<RaftNodeId>> {
        let inner = self.inner.lock().await;
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftNodeId>) -> Result<(), StorageError<RaftNodeId>> {
        let mut inner = self.inner.lock().await;
        let path = inner.dir.join("vote.json");
        until_written("vote", || write_json(&path, vote)).await;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftNodeId>>, StorageError<RaftNodeId>> {
        Ok(self.inner.lock().await.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<RaftNodeId>>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        let mut inner = self.inner.lock().await;
        let path = inner.dir.join("committed.json");
        until_written("committed", || write_json(&path, &committed)).await;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<RaftNodeId>>, StorageError<RaftNodeId>> {
        Ok(self.inner.lock().await.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<RaftNodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.inner.lock().await;
        let mut data = Vec::new();
        let mut added = Vec::new();
        for e in entries {
            data.extend_from_slice(&frame(&e).map_err(|e| StorageIOError::write_logs(&e))?);
            added.push(e);
        }
        let file = &mut inner.file;
        until_written("log", || {
            let before = file.metadata()?.len();
            let written = file.write_all(&data).and_then(|_| file.sync_data());
            if written.is_err() {
                // A partial frame would hide every later one at the next open.
                let _ = file.set_len(before);
            }
            written
        })
        .await;
        for e in added {
            inner.entries.insert(e.log_id.index, e);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(
        &mut self,
        log_id: LogId<RaftNodeId>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        let mut inner = self.inner.lock().await;
        inner.entries.retain(|&i, _| i < log_id.index);
        until_written("log", || inner.rewrite()).await;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<RaftNodeId>) -> Result<(), StorageError<RaftNodeId>> {
        let mut inner = self.inner.lock().await;
        // The purge point is recorded first: a crash between the two leaves entries that are
        // merely redundant.
        let path = inner.dir.join("purged.json");
        until_written("purged", || write_json(&path, &log_id)).await;
        inner.last_purged = Some(log_id);
        inner.entries.retain(|&i, _| i > log_id.index);
        until_written("log", || inner.rewrite()).await;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<RaftNodeId, BasicNode>,
    image: ClusterImage,
}

struct MachineInner {
    last_applied: Option<LogId<RaftNodeId>>,
    membership: StoredMembership<RaftNodeId, BasicNode>,
    image: ClusterImage,
    snapshot: Option<StoredSnapshot>,
}

/// The state machine: the cluster image, published to the rest of the node on every change.
#[derive(Clone)]
pub struct StateMachine {
    dir: PathBuf,
    inner: Arc<Mutex<MachineInner>>,
    published: Arc<watch::Sender<Arc<ClusterImage>>>,
}

impl StateMachine {
    /// Starts from the last snapshot; Raft replays the committed log after it.
    pub fn open(dir: &Path) -> io::Result<(StateMachine, watch::Receiver<Arc<ClusterImage>>)> {
        let snapshot: Option<StoredSnapshot> = read_json(&dir.join("snapshot.json"))?;
        let (last_applied, membership, image) = match &snapshot {
            Some(s) => (
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
                s.image.clone(),
            ),
            None => (None, StoredMembership::default(), ClusterImage::default()),
        };
        let (tx, rx) = watch::channel(Arc::new(image.clone()));
        Ok((
            StateMachine {
                dir: dir.to_path_buf(),
                inner: Arc::new(Mutex::new(MachineInner {
                    last_applied,
                    membership,
                    image,
                    snapshot,
                })),
                published: Arc::new(tx),
            },
            rx,
        ))
    }

    fn publish(&self, image: &ClusterImage) {
        self.published.send_replace(Arc::new(image.clone()));
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<RaftNodeId>> {
        let mut inner = self.inner.lock().await;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: match inner.last_applied {
                Some(id) => format!("{}-{}", id.leader_id, id.index),
                None => "empty".to_string(),
            },
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            image: inner.image.clone(),
        };
        let path = self.dir.join("snapshot.json");
        until_written("snapshot", || write_json(&path, &stored)).await;
        let data = serde_json::to_vec(&stored.image)
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        inner.snapshot = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<RaftNodeId>>,
            StoredMembership<RaftNodeId, BasicNode>,
        ),
        StorageError<RaftNodeId>,
    > {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(
        &mut self,
        entries: I,
    ) -> Result<Vec<CommandOutcome>, StorageError<RaftNodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.inner.lock().await;
        let mut out = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(CommandOutcome(Ok(()))),
                EntryPayload::Normal(ref command) => {
                    let result = inner.image.apply(command);
                    if let Err(e) = &result {
                        tracing::debug!(?command, error = %e, "metadata command refused");
                    }
                    out.push(CommandOutcome(result));
                }
                EntryPayload::Membership(ref m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    out.push(CommandOutcome(Ok(())));
                }
            }
        }
        self.publish(&inner.image);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<RaftNodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftNodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        let image: ClusterImage = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            image: image.clone(),
        };
        let path = self.dir.join("snapshot.json");
        until_written("snapshot", || write_json(&path, &stored)).await;
        let mut inner = self.inner.lock().await;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.image = image;
        inner.snapshot = Some(stored);
        self.publish(&inner.image);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<RaftNodeId>> {
        let inner = self.inner.lock().await;
        let Some(s) = &inner.snapshot else {
            return Ok(None);
        };
        let data =
            serde_json::to_vec(&s.image).map_err(|e| StorageIOError::read_state_machine(&e))?;
        Ok(Some(Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::image::Command;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::DeleteTopic {
                name: format!("t{index}"),
            }),
        }
    }

    #[test]
    fn frames_survive_a_torn_tail() {
        let mut raw = Vec::new();
        for i in 1..=3 {
            raw.extend_from_slice(&frame(&entry(i)).unwrap());
        }
        let whole = raw.len();
        raw.extend_from_slice(&frame(&entry(4)).unwrap()[..10]);
        let (entries, valid) = read_frames(&raw);
        assert_eq!(entries.len(), 3);
        assert_eq!(valid, whole);
        raw[whole - 1] ^= 1;
        assert_eq!(read_frames(&raw).0.len(), 2);
    }
}
