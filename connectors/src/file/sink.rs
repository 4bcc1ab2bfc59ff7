//! The file sink: appends records as NDJSON or lines, rolling to numbered files, exactly once.
//!
//! Next to the output lives a manifest, `<path>.manifest.json`, holding the file being written
//! with its committed length and, per topic partition, the next offset to write. A write
//! appends the batch, fsyncs it, then replaces the manifest atomically (temp file, fsync,
//! rename, fsync of the directory). Whatever a crash leaves past the committed length was not
//! recorded, so [`Sink::start`] cuts it off and resumes from the recorded offsets.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::json;
use crate::{now_ms, ConnectorError, Guarantee, Record, Result, Sink, SinkRecord, TopicPartition};

/// A `file:` entry under `sinks:` in a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The output file. With `roll`, files are numbered from it: `archive.ndjson` →
    /// `archive.000001.ndjson`, `archive.000002.ndjson`, ...
    pub path: PathBuf,
    #[serde(default)]
    pub format: SinkFormat,
    /// Start a new file past a size or an age. Absent: one file, `path`, that only grows.
    #[serde(default)]
    pub roll: Option<RollConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// One JSON value per line: a value that is JSON is written compacted; UTF-8 text that is
    /// not JSON is written as a JSON string; other bytes are rejected (BadRecord).
    #[default]
    Ndjson,
    /// The value's bytes as they are, then `\n`.
    Lines,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollConfig {
    /// A file is closed before a record would take it past this size (a record larger than
    /// this gets a file of its own).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// A file older than this is closed at the next write.
    #[serde(default)]
    pub max_age_ms: Option<u64>,
}

const MANIFEST_VERSION: u32 = 1;

/// `<path>.manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    version: u32,
    /// The file being written; the files numbered before it are complete.
    file: ManifestFile,
    /// Next offset to write, per topic partition.
    offsets: Vec<ManifestOffset>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    /// File name, in the directory of `path`.
    name: String,
    seq: u64,
    /// Committed length: bytes past it were not recorded and are cut off at start.
    bytes: u64,
    /// When the file was started (for `roll.max_age_ms`), ms since the epoch.
    opened_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestOffset {
    topic: String,
    partition: i32,
    next: i64,
}

fn offsets_to_vec(map: &BTreeMap<TopicPartition, i64>) -> Vec<ManifestOffset> {
    map.iter()
        .map(|(tp, &next)| ManifestOffset {
            topic: tp.topic.clone(),
            partition: tp.partition,
            next,
        })
        .collect()
}

fn offsets_to_map(list: &[ManifestOffset]) -> BTreeMap<TopicPartition, i64> {
    list.iter()
        .map(|o| {
            (
                TopicPartition {
                    topic: o.topic.clone(),
                    partition: o.partition,
                },
                o.next,
            )
        })
        .collect()
}

/// Where the sink's files live and how they are named.
#[derive(Debug)]
struct Layout {
    dir: PathBuf,
    /// The file name of `path`.
    base: String,
    rolls: bool,
    manifest: PathBuf,
    manifest_tmp: PathBuf,
    lock: PathBuf,
}

impl Layout {
    fn new(config: &FileSinkConfig) -> anyhow::Result<Layout> {
        let path = &config.path;
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "file sink: `path` {} does not name a file (UTF-8)",
                    path.display()
                )
            })?
            .to_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Layout {
            manifest: dir.join(format!("{base}.manifest.json")),
            manifest_tmp: dir.join(format!("{base}.manifest.json.tmp")),
            lock: dir.join(format!("{base}.lock")),
            dir,
            base,
            rolls: config.roll.is_some(),
        })
    }

    /// The name of output file number `seq`.
    fn name(&self, seq: u64) -> String {
        if !self.rolls {
            return self.base.clone();
        }
        match self.base.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}.{seq:06}.{ext}"),
            _ => format!("{}.{seq:06}", self.base),
        }
    }
}

/// Writes records to files with the offsets it has applied; see the module docs.
pub struct FileSink {
    config: FileSinkConfig,
    layout: Arc<Layout>,
    state: Option<Arc<Mutex<State>>>,
    #[cfg(test)]
    crash: Option<CrashPoint>,
}

/// Where a test stops a write as if the process died there.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashPoint {
    /// The batch is appended and fsynced, the manifest not written.
    AfterData,
    /// The new manifest is in its temp file, not renamed.
    BeforeRename,
}

struct State {
    /// Held (flock) while the sink lives, so two sinks never write the same output.
    _lock: File,
    /// The manifest as it is on disk.
    committed: Manifest,
    /// The file being written, opened for append; None when it must be recovered first.
    file: Option<File>,
    #[cfg(test)]
    crash: Option<CrashPoint>,
}

enum WriteError {
    Io(io::Error),
    #[cfg(test)]
    Crashed,
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> WriteError {
        WriteError::Io(e)
    }
}

/// Part of a batch that goes to one file.
struct Segment {
    /// Start a new file first, recording these offsets (those of the previous segments).
    roll_after: Option<BTreeMap<TopicPartition, i64>>,
    data: Vec<u8>,
}

impl FileSink {
    /// Checks the configuration; nothing is opened until [`Sink::start`].
    pub fn new(config: FileSinkConfig) -> Result<FileSink> {
        let layout = Layout::new(&config).map_err(ConnectorError::Fatal)?;
        if let Some(roll) = &config.roll {
            if roll.max_bytes.is_none() && roll.max_age_ms.is_none() {
                return Err(ConnectorError::Fatal(anyhow!(
                    "file sink: `roll` needs `max_bytes` or `max_age_ms`"
                )));
            }
            if roll.max_bytes == Some(0) || roll.max_age_ms == Some(0) {
                return Err(ConnectorError::Fatal(anyhow!(
                    "file sink: `roll.max_bytes` and `roll.max_age_ms` must be above 0"
                )));
            }
        }
        Ok(FileSink {
            config,
            layout: Arc::new(layout),
            state: None,
            #[cfg(test)]
            crash: None,
        })
    }

    /// The output file being written, once started (for diagnostics and tests).
    pub fn current_file(&self) -> Option<PathBuf> {
        let state = self.state.as_ref()?.lock().ok()?;
        Some(self.layout.dir.join(&state.committed.file.name))
    }

    #[cfg(test)]
    pub(crate) fn crash_at(&mut self, point: CrashPoint) {
        self.crash = Some(point);
        if let Some(state) = &self.state {
            state.lock().unwrap().crash = Some(point);
        }
    }

    /// Splits the batch into per-file segments of encoded records (records already written, by
    /// offset, are left out) and returns the offsets after it.
    fn plan(
        &self,
        batch: &[SinkRecord],
        committed: &Manifest,
    ) -> Result<(Vec<Segment>, BTreeMap<TopicPartition, i64>)> {
        let mut next = offsets_to_map(&committed.offsets);
        let mut segments = vec![Segment {
            roll_after: None,
            data: Vec::new(),
        }];
        let mut file_bytes = committed.file.bytes;
        let mut opened_ms = committed.file.opened_ms;
        let now = now_ms();
        let mut line = Vec::new();
        for (index, r) in batch.iter().enumerate() {
            if next.get(&r.position).is_some_and(|&n| r.offset < n) {
                continue; // written before
            }
            line.clear();
            encode(self.config.format, &r.record, &mut line)
                .map_err(|message| ConnectorError::BadRecord { index, message })?;
            if !line.is_empty() {
                let seg = segments.last_mut().expect("one segment");
                let size = file_bytes + seg.data.len() as u64;
                if let Some(roll) = &self.config.roll {
                    let too_big = roll.max_bytes.is_some_and(|m| size + line.len() as u64 > m);
                    let too_old = roll
                        .max_age_ms
                        .is_some_and(|m| now.saturating_sub(opened_ms) >= m as i64);
                    if size > 0 && (too_big || too_old) {
                        segments.push(Segment {
                            roll_after: Some(next.clone()),
                            data: Vec::new(),
                        });
                        file_bytes = 0;
                        opened_ms = now;
                    }
                }
                segments
                    .last_mut()
                    .expect("one segment")
                    .data
                    .extend_from_slice(&line);
            }
            next.insert(r.position.clone(), r.offset + 1);
        }
        Ok((segments, next))
    }
}

/// The bytes a record becomes in the output (nothing for a tombstone).
fn encode(format: SinkFormat, record: &Record, out: &mut Vec<u8>) -> Result<(), String> {
    let Some(value) = &record.value else {
        return Ok(());
    };
    match format {
        SinkFormat::Lines => out.extend_from_slice(value),
        SinkFormat::Ndjson => {
            if json::validate(value).is_ok() {
                json::compact_into(value, out);
            } else {
                let text = std::str::from_utf8(value).map_err(|_| {
                    "value is neither JSON nor UTF-8 text, which the ndjson format cannot hold"
                        .to_string()
                })?;
                serde_json::to_writer(&mut *out, text).map_err(|e| e.to_string())?;
            }
        }
    }
    out.push(b'\n');
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl State {
    fn write_manifest(&mut self, layout: &Layout, manifest: &Manifest) -> Result<(), WriteError> {
        let bytes = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
        {
            let mut tmp = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&layout.manifest_tmp)?;
            tmp.write_all(&bytes)?;
            tmp.sync_all()?;
        }
        #[cfg(test)]
        if self.crash == Some(CrashPoint::BeforeRename) {
            return Err(WriteError::Crashed);
        }
        fs::rename(&layout.manifest_tmp, &layout.manifest)?;
        sync_dir(&layout.dir)?;
        self.committed = manifest.clone();
        Ok(())
    }

    /// Opens the file the manifest names and cuts it to its committed length.
    fn recover(&mut self, layout: &Layout) -> io::Result<()> {
        self.file = None;
        let path = layout.dir.join(&self.committed.file.name);
        let file = open_append(&path)?;
        let len = file.metadata()?.len();
        let committed = self.committed.file.bytes;
        if len > committed {
            warn!(
                "file sink: {}: cutting {} bytes written after the last recorded batch",
                path.display(),
                len - committed
            );
            file.set_len(committed)?;
            file.sync_all()?;
        } else if len < committed {
            warn!(
                "file sink: {} holds {len} bytes but {committed} were recorded; it was cut or replaced \
                 outside weir, so writing goes on after what is there",
                path.display()
            );
            self.committed.file.bytes = len;
        }
        self.file = Some(file);
        Ok(())
    }

    /// Appends the segments and records the offsets after them.
    fn apply(
        &mut self,
        layout: &Layout,
        segments: Vec<Segment>,
        offsets: BTreeMap<TopicPartition, i64>,
    ) -> Result<(), WriteError> {
        let mut working = self.committed.clone();
        for seg in segments {
            if let Some(before) = seg.roll_after {
                let seq = working.file.seq + 1;
                let name = layout.name(seq);
                let file = open_append(&layout.dir.join(&name))?;
                let len = file.metadata()?.len();
                sync_dir(&layout.dir)?;
                working.file = ManifestFile {
                    name,
                    seq,
                    bytes: len,
                    opened_ms: now_ms(),
                };
                working.offsets = offsets_to_vec(&before);
                self.write_manifest(layout, &working)?;
                self.file = Some(file);
            }
            if !seg.data.is_empty() {
                let file = self
                    .file
                    .as_mut()
                    .ok_or_else(|| io::Error::other("no output file open"))?;
                file.write_all(&seg.data)?;
                file.sync_data()?;
                working.file.bytes += seg.data.len() as u64;
            }
        }
        #[cfg(test)]
        if self.crash == Some(CrashPoint::AfterData) {
            return Err(WriteError::Crashed);
        }
        working.offsets = offsets_to_vec(&offsets);
        if working != self.committed {
            self.write_manifest(layout, &working)?;
        }
        Ok(())
    }
}

fn io_context(e: io::Error, what: &str, path: &Path) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("file sink: {what} {}", path.display()))
}

impl FileSink {
    fn open(&self) -> Result<State> {
        let layout = &self.layout;
        fs::create_dir_all(&layout.dir).map_err(|e| {
            ConnectorError::Fatal(io_context(e, "cannot create the directory", &layout.dir))
        })?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&layout.lock)
            .map_err(|e| ConnectorError::Fatal(io_context(e, "cannot create", &layout.lock)))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(ConnectorError::Transient(anyhow!(
                    "file sink: {} is being written by another file sink (lock {})",
                    self.config.path.display(),
                    layout.lock.display()
                )))
            }
            Err(fs::TryLockError::Error(e)) => {
                warn!(
                    "file sink: cannot lock {} ({e}); going on without the lock",
                    layout.lock.display()
                )
            }
        }
        let fatal = |e: io::Error, what: &str, path: &Path| {
            ConnectorError::Fatal(io_context(e, what, path))
        };
        match fs::remove_file(&layout.manifest_tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fatal(e, "cannot remove", &layout.manifest_tmp)),
        }
        let existing = match fs::read(&layout.manifest) {
            Ok(bytes) => Some(
                serde_json::from_slice::<Manifest>(&bytes)
                    .with_context(|| {
                        format!(
                            "file sink: the manifest {} is unreadable; move it away to start over (records may then be written twice)",
                            layout.manifest.display()
                        )
                    })
                    .map_err(ConnectorError::Fatal)?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(fatal(e, "cannot read", &layout.manifest)),
        };
        let io_err = |e: WriteError| match e {
            WriteError::Io(e) => {
                ConnectorError::Transient(io_context(e, "cannot start writing", &self.config.path))
            }
            #[cfg(test)]
            WriteError::Crashed => ConnectorError::Transient(anyhow!("simulated crash")),
        };
        match existing {
            Some(manifest) => {
                if manifest.version != MANIFEST_VERSION {
                    return Err(ConnectorError::Fatal(anyhow!(
                        "file sink: the manifest {} has version {}; this weir reads version {MANIFEST_VERSION}",
                        layout.manifest.display(),
                        manifest.version
                    )));
                }
                let mut state = State {
                    _lock: lock,
                    committed: manifest,
                    file: None,
                    #[cfg(test)]
                    crash: self.crash,
                };
                state.recover(layout).map_err(|e| io_err(e.into()))?;
                if state.committed.file.name != layout.name(state.committed.file.seq) {
                    // `path` or `roll` changed: go on in a file named after the new settings.
                    let offsets = offsets_to_map(&state.committed.offsets);
                    let roll = Segment {
                        roll_after: Some(offsets.clone()),
                        data: Vec::new(),
                    };
                    state.apply(layout, vec![roll], offsets).map_err(io_err)?;
                }
                Ok(state)
            }
            None => {
                let name = layout.name(1);
                let path = layout.dir.join(&name);
                let file = open_append(&path).map_err(|e| fatal(e, "cannot open", &path))?;
                let len = file
                    .metadata()
                    .map_err(|e| fatal(e, "cannot read", &path))?
                    .len();
                sync_dir(&layout.dir).map_err(|e| fatal(e, "cannot sync", &layout.dir))?;
                let manifest = Manifest {
                    version: MANIFEST_VERSION,
                    file: ManifestFile {
                        name,
                        seq: 1,
                        bytes: len,
                        opened_ms: now_ms(),
                    },
                    offsets: Vec::new(),
                };
                let mut state = State {
                    _lock: lock,
                    committed: manifest.clone(),
                    file: Some(file),
                    #[cfg(test)]
                    crash: self.crash,
                };
                state.write_manifest(layout, &manifest).map_err(io_err)?;
                Ok(state)
            }
        }
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn start(&mut self) -> Result<BTreeMap<TopicPartition, i64>> {
        self.state = None; // lets go of the lock of an earlier start
        let this = FileSink {
            config: self.config.clone(),
            layout: self.layout.clone(),
            state: None,
            #[cfg(test)]
            crash: self.crash,
        };
        let state = tokio::task::spawn_blocking(move || this.open())
            .await
            .map_err(|e| ConnectorError::Fatal(anyhow!("file sink: start panicked: {e}")))??;
        let offsets = offsets_to_map(&state.committed.offsets);
        self.state = Some(Arc::new(Mutex::new(state)));
        Ok(offsets)
    }

    async fn write(&mut self, batch: &[SinkRecord]) -> Result<()> {
        let state = self
            .state
            .clone()
            .ok_or_else(|| ConnectorError::Fatal(anyhow!("file sink: write before start")))?;
        let committed = state
            .lock()
            .map_err(|_| ConnectorError::Fatal(anyhow!("file sink: a write panicked")))?
            .committed
            .clone();
        let (segments, offsets) = self.plan(batch, &committed)?;
        let layout = self.layout.clone();
        let path = self.config.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = state
                .lock()
                .map_err(|_| ConnectorError::Fatal(anyhow!("file sink: a write panicked")))?;
            let transient =
                |e: io::Error| ConnectorError::Transient(io_context(e, "writing", &path));
            if st.file.is_none() {
                st.recover(&layout).map_err(transient)?;
            }
            if st.committed != committed {
                // Another write got in first (a cancelled call finishing late): plan again.
                return Err(ConnectorError::Transient(anyhow!(
                    "file sink: concurrent write; retry"
                )));
            }
            match st.apply(&layout, segments, offsets) {
                Ok(()) => Ok(()),
                Err(WriteError::Io(e)) => {
                    // Take back what this write appended, so that a retry writes it once.
                    if let Err(again) = st.recover(&layout) {
                        warn!(
                            "file sink: {}: cannot cut back after a failed write: {again}",
                            path.display()
                        );
                    }
                    Err(transient(e))
                }
                #[cfg(test)]
                Err(WriteError::Crashed) => {
                    st.file = None;
                    Err(ConnectorError::Fatal(anyhow!("simulated crash")))
                }
            }
        })
        .await
        .map_err(|e| ConnectorError::Fatal(anyhow!("file sink: write panicked: {e}")))?
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn tp(partition: i32) -> TopicPartition {
        TopicPartition {
            topic: "t".to_string(),
            partition,
        }
    }

    fn batch(partition: i32, range: std::ops::Range<i64>) -> Vec<SinkRecord> {
        range
            .map(|offset| SinkRecord {
                record: Record {
                    key: None,
                    value: Some(Bytes::from(format!("{{\"p\":{partition},\"o\":{offset}}}"))),
                    headers: Vec::new(),
                    timestamp: 0,
                },
                position: tp(partition),
                offset,
            })
            .collect()
    }

    fn config(dir: &Path, max_bytes: Option<u64>) -> FileSinkConfig {
        FileSinkConfig {
            path: dir.join("out.ndjson"),
            format: SinkFormat::Ndjson,
            roll: max_bytes.map(|m| RollConfig {
                max_bytes: Some(m),
                max_age_ms: None,
            }),
        }
    }

    /// Every output file in order, and (partition, offset) of each line.
    fn output(dir: &Path, rolls: bool) -> Vec<(i32, i64)> {
        let layout = Layout::new(&config(dir, rolls.then_some(1))).unwrap();
        let mut out = Vec::new();
        for seq in 1.. {
            let path = dir.join(layout.name(seq));
            let Ok(text) = fs::read_to_string(&path) else {
                break;
            };
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                out.push((v["p"].as_i64().unwrap() as i32, v["o"].as_i64().unwrap()));
            }
            if !rolls {
                break;
            }
        }
        out
    }

    fn per_partition(lines: &[(i32, i64)], partition: i32) -> Vec<i64> {
        lines
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .collect()
    }

    async fn crash_case(point: CrashPoint, max_bytes: Option<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSink::new(config(dir.path(), max_bytes)).unwrap();
        s.start().await.unwrap();
        s.write(&batch(0, 0..4)).await.unwrap();
        s.crash_at(point);
        let err = s.write(&batch(0, 4..9)).await.unwrap_err();
        assert!(err.to_string().contains("simulated crash"));
        let current = s.current_file().unwrap();
        drop(s);
        // The crashed write left bytes behind (unless it rolled first and died after).
        if point == CrashPoint::AfterData && max_bytes.is_none() {
            assert!(fs::metadata(&current).unwrap().len() > 0);
        }
        let mut s = FileSink::new(config(dir.path(), max_bytes)).unwrap();
        let offsets = s.start().await.unwrap();
        let next = offsets[&tp(0)];
        assert!((4..9).contains(&next), "{next}");
        assert_eq!(
            per_partition(&output(dir.path(), max_bytes.is_some()), 0),
            (0..next).collect::<Vec<_>>()
        );
        // The runtime replays from the offsets the sink returned.
        s.write(&batch(0, next..12)).await.unwrap();
        assert_eq!(
            per_partition(&output(dir.path(), max_bytes.is_some()), 0),
            (0..12).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn crash_after_the_data_before_the_manifest() {
        crash_case(CrashPoint::AfterData, None).await;
        crash_case(CrashPoint::AfterData, Some(60)).await;
    }

    #[tokio::test]
    async fn crash_before_the_manifest_rename() {
        crash_case(CrashPoint::BeforeRename, None).await;
        crash_case(CrashPoint::BeforeRename, Some(60)).await;
    }

    #[tokio::test]
    async fn a_crash_leaves_the_tail_that_start_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSink::new(config(dir.path(), None)).unwrap();
        s.start().await.unwrap();
        s.write(&batch(0, 0..3)).await.unwrap();
        let committed = fs::metadata(dir.path().join("out.ndjson")).unwrap().len();
        s.crash_at(CrashPoint::BeforeRename);
        s.write(&batch(0, 3..6)).await.unwrap_err();
        drop(s);
        let path = dir.path().join("out.ndjson");
        assert!(
            fs::metadata(&path).unwrap().len() > committed,
            "the crash left a tail"
        );
        assert!(dir.path().join("out.ndjson.manifest.json.tmp").exists());
        let mut s = FileSink::new(config(dir.path(), None)).unwrap();
        assert_eq!(s.start().await.unwrap()[&tp(0)], 3);
        assert_eq!(fs::metadata(&path).unwrap().len(), committed);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Write `n` new records of a partition, preceded by `back` already written ones.
        Write {
            partition: i32,
            back: i64,
            n: i64,
        },
        /// Append bytes no manifest records, then restart.
        Garbage(Vec<u8>),
        /// Write `n` new records and die at `point`, then restart.
        Crash {
            point: CrashPoint,
            partition: i32,
            n: i64,
        },
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2i32, 0..3i64, 1..6i64).prop_map(|(partition, back, n)| Op::Write { partition, back, n }),
            1 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Op::Garbage),
            1 => (prop_oneof![Just(CrashPoint::AfterData), Just(CrashPoint::BeforeRename)], 0..2i32, 1..6i64)
                .prop_map(|(point, partition, n)| Op::Crash { point, partition, n }),
            1 => Just(Op::Restart),
        ]
    }

    async fn run(ops: Vec<Op>, max_bytes: Option<u64>) -> std::result::Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let mut s = FileSink::new(config(dir.path(), max_bytes)).unwrap();
            let offsets = s.start().await.unwrap();
            (s, offsets)
        };
        let (mut sink, _) = open().await;
        let mut model: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Write { partition, back, n } => {
                    let next = model.get(&tp(partition)).copied().unwrap_or(0);
                    sink.write(&batch(partition, (next - back).max(0)..next + n))
                        .await
                        .unwrap();
                    model.insert(tp(partition), next + n);
                }
                Op::Garbage(bytes) => {
                    let path = sink.current_file().unwrap();
                    drop(sink);
                    OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap()
                        .write_all(&bytes)
                        .unwrap();
                    let (s, offsets) = open().await;
                    sink = s;
                    prop_assert_eq!(&offsets, &model);
                }
                Op::Crash {
                    point,
                    partition,
                    n,
                } => {
                    let next = model.get(&tp(partition)).copied().unwrap_or(0);
                    sink.crash_at(point);
                    prop_assert!(sink.write(&batch(partition, next..next + n)).await.is_err());
                    drop(sink);
                    let (s, offsets) = open().await;
                    sink = s;
                    // A batch that rolled may have committed its first files before dying.
                    let got = offsets.get(&tp(partition)).copied().unwrap_or(0);
                    prop_assert!(got >= next && got <= next + n);
                    if got > 0 {
                        model.insert(tp(partition), got);
                    }
                    prop_assert_eq!(&offsets, &model);
                }
                Op::Restart => {
                    drop(sink);
                    let (s, offsets) = open().await;
                    sink = s;
                    prop_assert_eq!(&offsets, &model);
                }
            }
        }
        drop(sink);
        let lines = output(dir.path(), max_bytes.is_some());
        for partition in 0..2 {
            let want: Vec<i64> = (0..model.get(&tp(partition)).copied().unwrap_or(0)).collect();
            prop_assert_eq!(per_partition(&lines, partition), want);
        }
        if let Some(max) = max_bytes {
            let layout = Layout::new(&config(dir.path(), max_bytes)).unwrap();
            for seq in 1.. {
                let Ok(meta) = fs::metadata(dir.path().join(layout.name(seq))) else {
                    break;
                };
                // Records are at most 16 bytes here, below every max tried.
                prop_assert!(meta.len() <= max, "file {} holds {} bytes", seq, meta.len());
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever mix of writes, replays, torn tails and crashes: each record of each
        /// partition is in the output once, in offset order, and start returns where it stops.
        #[test]
        fn manifest_keeps_output_exactly_once(
            ops in proptest::collection::vec(op(), 1..14),
            max_bytes in prop_oneof![Just(None), Just(Some(40u64)), Just(Some(100u64))],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(run(ops, max_bytes))?;
        }
    }
}
