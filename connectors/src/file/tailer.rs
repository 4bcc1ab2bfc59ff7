//! The synchronous core of the file source: finding files, telling them apart across rotation,
//! and cutting their bytes into records. [`super::source::FileSource`] runs it on the blocking
//! thread pool and adds the waiting.
//!
//! Identity. A file being read is held open, so its device+inode cannot be reused while we
//! read it: (dev, ino) identifies live files, which follows renames. What survives a restart,
//! a copy or a move is the content, so every file also has a fingerprint: a CRC-64 of its first
//! line (at most `fingerprint_bytes`). A file gets one once that line is complete; before that
//! it has nothing to emit anyway. Offsets are stored per fingerprint.
//!
//! Positions. `pos` is the byte after the last unit (record, skipped blank line, rejected
//! input) handed out; `buf` holds the bytes read after it, up to `read_pos`. Only `pos` goes
//! into the source offset, so a restart re-reads exactly what was buffered but not emitted.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::json;
use super::source::{Settings, SourceFormat, StartAt, WatchMode};
use crate::{now_ms, Record, SourceBatch};

/// Bytes read from a file at a time.
const CHUNK: usize = 64 * 1024;
/// How many bytes before the end of what two same-fingerprint files share are compared to
/// decide whether one is a copy of the other.
const COPY_WINDOW: u64 = 4096;

const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

type Key = (u64, u64);

/// What a read cycle produced, kept in the tailer until the async side takes it (so a
/// cancelled `next_batch` loses nothing).
pub(crate) enum Ready {
    Batch(SourceBatch),
    /// Rejected input: the one-record batch for the dead-letter topic and the error message.
    Bad(SourceBatch, String),
}

/// The source offset: one entry per file known by fingerprint.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetDoc {
    files: Vec<OffsetFile>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetFile {
    /// CRC-64/XZ of the file's first line (at most fingerprint_bytes), 16 hex digits.
    fingerprint: String,
    /// Path when last seen, for people reading the offset; not used to find the file.
    path: String,
    /// Byte position after the last line handed out.
    position: u64,
    /// Lines before `position`, when known (for error messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    line: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dev: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ino: Option<u64>,
}

/// How a rejected unit ends: after the next newline (lines, ndjson) or at the next line that
/// starts with a byte that can begin a JSON value (json).
#[derive(Clone, Copy, PartialEq)]
enum Resync {
    AfterNewline,
    JsonValueLine,
}

/// Input being rejected: from `pos` to `end`.
struct Skip {
    /// The first `cap` bytes of it, for the dead-letter record.
    sample: BytesMut,
    cap: usize,
    /// Bytes of it scanned so far.
    total: u64,
    /// Newlines inside it so far.
    newlines: u64,
    /// Line of the error relative to the unit's first line (0 = that line).
    err_line: u64,
    column: Option<usize>,
    message: String,
    resync: Resync,
    at_line_start: bool,
    /// File position just after it, once found.
    end: Option<u64>,
}

struct Entry {
    fp: Option<u64>,
    path: PathBuf,
    header: Bytes,
    file: Option<File>,
    key: Option<Key>,
    pos: u64,
    /// Newlines before `pos`, if known.
    line: Option<u64>,
    /// Bytes between the last newline and `pos`, if known (`json` error columns).
    col: Option<u64>,
    read_pos: u64,
    buf: BytesMut,
    /// Leading bytes of `buf` known to hold no newline.
    scanned: usize,
    skip: Option<Skip>,
    /// Renamed, or gone from the globs: drained before the others.
    rotated: bool,
    seen: bool,
    gone_since: Option<Instant>,
    last_data: Instant,
    /// The last read stopped at the end of the file with nothing left to hand out.
    drained: bool,
    warned: bool,
}

impl Entry {
    fn new(
        path: PathBuf,
        file: Option<File>,
        key: Option<Key>,
        fp: Option<u64>,
        pos: u64,
    ) -> Entry {
        Entry {
            fp,
            header: path_bytes(&path),
            path,
            file,
            key,
            pos,
            line: (pos == 0).then_some(0),
            col: (pos == 0).then_some(0),
            read_pos: pos,
            buf: BytesMut::new(),
            scanned: 0,
            skip: None,
            rotated: false,
            seen: true,
            gone_since: None,
            last_data: Instant::now(),
            drained: false,
            warned: false,
        }
    }

    fn set_path(&mut self, path: PathBuf) {
        if self.path != path {
            self.header = path_bytes(&path);
            self.path = path;
            self.rotated = true;
        }
    }

    /// Forgets buffered bytes: reading continues at `pos`.
    fn rewind(&mut self) {
        self.read_pos = self.pos;
        self.buf = BytesMut::new();
        self.scanned = 0;
        self.skip = None;
    }

    fn consume(&mut self, n: usize, newlines: u64) {
        self.buf.advance(n);
        self.pos += n as u64;
        if let Some(l) = &mut self.line {
            *l += newlines;
        }
    }

    fn bad_ready(&self) -> bool {
        self.skip.as_ref().is_some_and(|s| s.end.is_some())
    }
}

fn path_bytes(path: &Path) -> Bytes {
    Bytes::copy_from_slice(path.as_os_str().as_bytes())
}

/// Moves a column past `bytes`.
fn advance_col(col: &mut Option<u64>, bytes: &[u8]) {
    *col = match memchr::memrchr(b'\n', bytes) {
        Some(i) => Some((bytes.len() - i - 1) as u64),
        None => col.map(|c| c + bytes.len() as u64),
    };
}

fn count_newlines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

struct Out {
    records: Vec<Record>,
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
    now: i64,
    bad: Option<(Record, String)>,
    /// A rejected unit is ready behind the records collected: return them first.
    stop: bool,
}

impl Out {
    fn full(&self) -> bool {
        self.stop
            || self.bad.is_some()
            || self.records.len() >= self.max_records
            || self.bytes >= self.max_bytes
    }
}

pub(crate) struct Tailer {
    settings: Arc<Settings>,
    files: Vec<Entry>,
    /// True once files present at start have been placed; files found later start at 0.
    placed_initial: bool,
    /// A resume offset was given: files it does not know appeared since, and start at 0.
    resumed: bool,
    scan_needed: bool,
    last_scan: Option<Instant>,
    rr: usize,
    scratch: Vec<u8>,
    watcher: Option<notify::RecommendedWatcher>,
    watched: HashSet<PathBuf>,
    warned_paths: HashSet<PathBuf>,
    pub(crate) ready: Option<Ready>,
}

impl Tailer {
    pub(crate) fn new(
        settings: Arc<Settings>,
        resume: Option<&serde_json::Value>,
        wake: Arc<tokio::sync::Notify>,
        scan_flag: Arc<AtomicBool>,
    ) -> anyhow::Result<Tailer> {
        let mut files = Vec::new();
        if let Some(value) = resume {
            let doc: OffsetDoc = serde_json::from_value(value.clone()).map_err(|e| {
                anyhow::anyhow!("the file source offset {value} is not one this source wrote: {e}")
            })?;
            for f in doc.files {
                let fp = u64::from_str_radix(&f.fingerprint, 16).map_err(|_| {
                    anyhow::anyhow!("file source offset: bad fingerprint {:?}", f.fingerprint)
                })?;
                let key = f.dev.zip(f.ino);
                let mut e = Entry::new(PathBuf::from(f.path), None, key, Some(fp), f.position);
                e.line = f.line;
                files.push(e);
            }
        }
        let watcher = match settings.watch {
            WatchMode::Poll => None,
            WatchMode::Notify => {
                let handler = move |event: notify::Result<notify::Event>| {
                    use notify::event::{EventKind, ModifyKind};
                    let rescan = match &event {
                        Ok(ev) => matches!(
                            ev.kind,
                            EventKind::Create(_)
                                | EventKind::Remove(_)
                                | EventKind::Modify(ModifyKind::Name(_))
                        ),
                        Err(_) => true,
                    };
                    if rescan {
                        scan_flag.store(true, Ordering::SeqCst);
                    }
                    wake.notify_one();
                };
                match notify::recommended_watcher(handler) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        warn!(
                            "file source: cannot watch for changes ({e}); polling every {:?}",
                            settings.poll_interval
                        );
                        None
                    }
                }
            }
        };
        Ok(Tailer {
            settings,
            files,
            placed_initial: false,
            resumed: resume.is_some(),
            scan_needed: true,
            last_scan: None,
            rr: 0,
            scratch: Vec::new(),
            watcher,
            watched: HashSet::new(),
            warned_paths: HashSet::new(),
            ready: None,
        })
    }

    /// Reads what is available into `self.ready`: a batch of at most `max_records` records, or
    /// one rejected unit, or nothing.
    pub(crate) fn cycle(&mut self, max_records: usize, force_scan: bool) {
        let due = self
            .last_scan
            .is_none_or(|t| t.elapsed() >= self.settings.glob_interval);
        if force_scan || due || self.scan_needed {
            self.scan();
        }
        let mut out = Out {
            records: Vec::new(),
            bytes: 0,
            max_records: max_records.max(1),
            max_bytes: self.settings.max_batch_bytes,
            now: now_ms(),
            bad: None,
            stop: false,
        };
        if let Some(i) = self.files.iter().position(Entry::bad_ready) {
            deliver_bad(&mut self.files[i], &mut out);
        } else {
            let live: Vec<usize> = (0..self.files.len())
                .filter(|&i| self.files[i].file.is_some())
                .collect();
            let mut order: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&i| self.files[i].rotated)
                .collect();
            let rest: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&i| !self.files[i].rotated)
                .collect();
            if !rest.is_empty() {
                let start = self.rr % rest.len();
                order.extend(rest[start..].iter().chain(&rest[..start]));
            }
            self.rr = self.rr.wrapping_add(1);
            for i in order {
                if out.full() {
                    break;
                }
                self.read_entry(i, &mut out);
            }
        }
        self.close_finished();
        let offset = self.snapshot();
        self.ready = if let Some((record, message)) = out.bad {
            Some(Ready::Bad(
                SourceBatch {
                    records: vec![record],
                    offset,
                },
                message,
            ))
        } else if !out.records.is_empty() {
            Some(Ready::Batch(SourceBatch {
                records: out.records,
                offset,
            }))
        } else {
            None
        };
    }

    /// Places the files present now (start positions) without reading them.
    pub(crate) fn cycle_scan_only(&mut self) {
        self.scan();
    }

    /// Bytes of the open files past the last unit handed out (a partial line included).
    pub(crate) fn bytes_behind(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|e| {
                Some(
                    e.file
                        .as_ref()?
                        .metadata()
                        .ok()?
                        .len()
                        .saturating_sub(e.pos),
                )
            })
            .sum()
    }

    /// The source offset: position per fingerprint.
    pub(crate) fn snapshot(&self) -> serde_json::Value {
        let files = self
            .files
            .iter()
            .filter_map(|e| {
                Some(OffsetFile {
                    fingerprint: format!("{:016x}", e.fp?),
                    path: e.path.to_string_lossy().into_owned(),
                    position: e.pos,
                    line: e.line,
                    dev: e.key.map(|k| k.0),
                    ino: e.key.map(|k| k.1),
                })
            })
            .collect();
        serde_json::to_value(OffsetDoc { files }).unwrap_or(serde_json::Value::Null)
    }

    // ---- discovery ----

    fn list_paths(&mut self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for pattern in &self.settings.paths {
            let entries = match glob::glob(pattern) {
                Ok(entries) => entries,
                Err(e) => {
                    warn!("file source: pattern {pattern:?}: {e}");
                    continue;
                }
            };
            for entry in entries {
                match entry {
                    Ok(p) => {
                        if !self.settings.exclude.iter().any(|x| x.matches_path(&p)) {
                            paths.push(p);
                        }
                    }
                    Err(e) => {
                        if self.warned_paths.insert(e.path().to_path_buf()) {
                            warn!("file source: {}: {}", e.path().display(), e.error());
                        }
                    }
                }
            }
        }
        paths.sort();
        paths.dedup();
        paths
    }

    fn watch_dirs(&mut self) {
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        use notify::Watcher;
        for (dir, mode) in &self.settings.watch_roots {
            if self.watched.contains(dir) || !dir.is_dir() {
                continue;
            }
            match watcher.watch(dir, *mode) {
                Ok(()) => {
                    debug!("file source: watching {}", dir.display());
                    self.watched.insert(dir.clone());
                }
                Err(e) => {
                    if self.warned_paths.insert(dir.clone()) {
                        warn!(
                            "file source: cannot watch {} ({e}); polling it",
                            dir.display()
                        );
                    }
                }
            }
        }
    }

    /// Matches the globs against the files on disk: follows renames, notices replaced or
    /// truncated content, picks up new files and forgets what is gone.
    fn scan(&mut self) {
        self.scan_needed = false;
        self.last_scan = Some(Instant::now());
        self.watch_dirs();
        for e in &mut self.files {
            e.seen = false;
        }
        let live: HashMap<Key, usize> = self
            .files
            .iter()
            .enumerate()
            .filter(|(_, e)| e.file.is_some())
            .filter_map(|(i, e)| Some((e.key?, i)))
            .collect();
        let mut unbound: Vec<PathBuf> = Vec::new();
        for path in self.list_paths() {
            let meta = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::NotFound && self.warned_paths.insert(path.clone())
                    {
                        warn!("file source: {}: {e}", path.display());
                    }
                    continue;
                }
            };
            match live.get(&(meta.dev(), meta.ino())) {
                Some(&i) => {
                    let e = &mut self.files[i];
                    if !e.seen {
                        e.seen = true;
                        e.gone_since = None;
                        e.set_path(path);
                    }
                }
                None => unbound.push(path),
            }
        }
        // Content replaced under a file we follow (copytruncate, or truncate and rewrite).
        for i in 0..self.files.len() {
            if self.files[i].file.is_some()
                && self.files[i].fp.is_some()
                && !self.fingerprint_holds(i)
            {
                self.split_truncated(i);
            }
        }
        let now = Instant::now();
        for e in &mut self.files {
            if e.file.is_some() && !e.seen && e.gone_since.is_none() {
                e.gone_since = Some(now);
                e.rotated = true;
            }
        }
        self.adopt(unbound);
        // Saved positions no file matched: the file is gone.
        self.files.retain(|e| e.file.is_some() || e.seen);
        self.placed_initial = true;
    }

    /// Opens the files not followed yet and decides where each starts.
    fn adopt(&mut self, paths: Vec<PathBuf>) {
        struct Candidate {
            path: PathBuf,
            file: File,
            key: Key,
            size: u64,
            fp: u64,
        }
        let mut candidates = Vec::new();
        for path in paths {
            let opened = File::open(&path).and_then(|f| {
                let meta = f.metadata()?;
                Ok((f, meta))
            });
            let (file, meta) = match opened {
                Ok(x) => x,
                Err(e) => {
                    if self.warned_paths.insert(path.clone()) {
                        warn!("file source: cannot open {}: {e}", path.display());
                    }
                    continue;
                }
            };
            let key = (meta.dev(), meta.ino());
            if self
                .files
                .iter()
                .any(|e| e.file.is_some() && e.key == Some(key))
            {
                continue; // replaced by a file we follow between stat and open
            }
            match fingerprint(&file, self.settings.fingerprint_bytes, &mut self.scratch) {
                Ok(Some(fp)) => candidates.push(Candidate {
                    path,
                    file,
                    key,
                    size: meta.len(),
                    fp,
                }),
                Ok(None) => {} // no complete first line yet: nothing to read either
                Err(e) => {
                    if self.warned_paths.insert(path.clone()) {
                        warn!("file source: cannot read {}: {e}", path.display());
                    }
                }
            }
        }
        // The same file seen before (same inode and fingerprint): a rename while we were away,
        // or our own saved position. Matched first, so that a copy cannot take its place.
        let mut rest = Vec::new();
        for c in candidates {
            let found = self.files.iter().position(|e| {
                e.file.is_none() && !e.seen && e.fp == Some(c.fp) && e.key == Some(c.key)
            });
            match found {
                Some(i) => {
                    let e = &mut self.files[i];
                    if c.size < e.pos {
                        debug!("file source: {} is shorter than its saved position: reading it from the start", c.path.display());
                        e.pos = 0;
                        e.line = Some(0);
                        e.col = Some(0);
                    }
                    bind(e, c.path, c.file, c.key);
                }
                None => rest.push(c),
            }
        }
        for c in rest {
            // A file we were reading whose original is gone or truncated: the copy or the
            // moved file. Continue where we were (copytruncate: the lines written between our
            // last read and the truncation are only in the copy).
            let found = self
                .files
                .iter()
                .position(|e| e.file.is_none() && !e.seen && e.fp == Some(c.fp));
            if let Some(i) = found {
                let e = &mut self.files[i];
                if c.size < e.pos {
                    e.pos = c.size;
                    e.line = None;
                    e.col = None;
                }
                debug!(
                    "file source: {} continues {} at byte {}",
                    c.path.display(),
                    e.path.display(),
                    e.pos
                );
                bind(e, c.path, c.file, c.key);
                continue;
            }
            // Same first line as a file we are reading: a copy of it (not read twice), or
            // another file that starts alike (read once the two differ).
            let twin = self
                .files
                .iter()
                .position(|e| e.file.is_some() && e.fp == Some(c.fp));
            if let Some(i) = twin {
                let original = self.files[i].file.as_ref().expect("live entry");
                match same_tail(original, &c.file, c.size) {
                    Ok(true) => {
                        debug!(
                            "file source: {} is a copy of {}; not read again",
                            c.path.display(),
                            self.files[i].path.display()
                        );
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(
                            "file source: comparing {} with {}: {e}",
                            c.path.display(),
                            self.files[i].path.display()
                        );
                        continue;
                    }
                }
            }
            let pos = if self.placed_initial || self.resumed {
                0
            } else {
                match self.settings.start_at {
                    StartAt::Beginning => 0,
                    StartAt::End => {
                        match end_position(&c.file, c.size, self.settings.max_line_bytes) {
                            Ok(p) => p,
                            Err(e) => {
                                warn!("file source: cannot read {}: {e}", c.path.display());
                                continue;
                            }
                        }
                    }
                }
            };
            debug!(
                "file source: following {} from byte {pos}",
                c.path.display()
            );
            let mut e = Entry::new(c.path, Some(c.file), Some(c.key), Some(c.fp), pos);
            if pos != 0 {
                e.line = None;
                e.col = None;
            }
            self.files.push(e);
        }
    }

    fn fingerprint_holds(&mut self, i: usize) -> bool {
        let e = &self.files[i];
        let Some(file) = &e.file else { return true };
        match fingerprint(file, self.settings.fingerprint_bytes, &mut self.scratch) {
            Ok(fp) => fp == e.fp,
            Err(_) => true, // read errors show up when reading
        }
    }

    /// The file under entry `i` no longer holds what we read: keep the old position under the
    /// old fingerprint (for a copy to continue from) and follow the file's new content from 0.
    fn split_truncated(&mut self, i: usize) {
        let old = &mut self.files[i];
        debug!(
            "file source: {} was truncated or replaced; reading it from the start",
            old.path.display()
        );
        let file = old.file.take();
        let key = old.key.take();
        let path = old.path.clone();
        old.rewind();
        old.seen = false;
        let mut fresh = Entry::new(path, file, key, None, 0);
        fresh.seen = true;
        self.files.push(fresh);
        self.scan_needed = true;
    }

    /// Closes files that left the globs (renamed away or deleted) once read to the end and idle
    /// for `rotate_wait`.
    fn close_finished(&mut self) {
        let wait = self.settings.rotate_wait;
        let now = Instant::now();
        self.files.retain(|e| {
            let Some(gone) = e.gone_since else {
                return true;
            };
            if e.file.is_none() {
                return true;
            }
            let idle = now.duration_since(gone.max(e.last_data)) >= wait;
            let at_end = || {
                let size = e
                    .file
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map_or(0, |m| m.len());
                size <= e.read_pos
            };
            let done = idle && e.drained && e.skip.is_none() && at_end();
            if done {
                debug!("file source: done with {}", e.path.display());
            }
            !done
        });
    }

    // ---- reading ----

    fn read_entry(&mut self, i: usize, out: &mut Out) {
        let settings = self.settings.clone();
        if self.files[i].fp.is_none() {
            // New content after a truncation: wait for its first line.
            let e = &self.files[i];
            let Some(file) = &e.file else { return };
            match fingerprint(file, settings.fingerprint_bytes, &mut self.scratch) {
                Ok(Some(fp)) => self.files[i].fp = Some(fp),
                _ => return,
            }
        }
        let size = match self.files[i].file.as_ref().map(File::metadata) {
            Some(Ok(m)) => m.len(),
            Some(Err(e)) => {
                self.warn_entry(i, &e);
                return;
            }
            None => return,
        };
        let read_pos = self.files[i].read_pos;
        if size < read_pos || (size > read_pos && !self.fingerprint_holds(i)) {
            self.split_truncated(i);
            return;
        }
        let e = &mut self.files[i];
        e.drained = false;
        loop {
            // Hand out what the buffer holds.
            loop {
                if e.bad_ready() {
                    if out.records.is_empty() {
                        deliver_bad(e, out);
                    } else {
                        out.stop = true;
                    }
                    return;
                }
                if out.full() {
                    return;
                }
                match next_unit(&settings, e, out.now) {
                    Some(record) => {
                        out.bytes += record.value.as_ref().map_or(0, Bytes::len);
                        out.records.push(record);
                    }
                    None if e.bad_ready() => {}
                    None => break,
                }
            }
            if e.read_pos >= size {
                e.drained = true;
                if e.buf.is_empty() {
                    e.buf = BytesMut::new(); // let go of the last chunk
                }
                return;
            }
            let want = CHUNK.min((size - e.read_pos) as usize);
            let start = e.buf.len();
            e.buf.reserve(want);
            e.buf.resize(start + want, 0);
            let file = e.file.as_ref().expect("live entry");
            match file.read_at(&mut e.buf[start..], e.read_pos) {
                Ok(0) => {
                    e.buf.truncate(start);
                    e.drained = true;
                    return;
                }
                Ok(n) => {
                    e.buf.truncate(start + n);
                    e.read_pos += n as u64;
                    e.last_data = Instant::now();
                }
                Err(err) => {
                    e.buf.truncate(start);
                    if err.kind() != io::ErrorKind::Interrupted {
                        self.warn_entry(i, &err);
                        return;
                    }
                }
            }
        }
    }

    fn warn_entry(&mut self, i: usize, err: &io::Error) {
        let e = &mut self.files[i];
        if !e.warned {
            e.warned = true;
            warn!("file source: reading {}: {err}", e.path.display());
        }
    }
}

fn bind(e: &mut Entry, path: PathBuf, file: File, key: Key) {
    e.set_path(path);
    e.file = Some(file);
    e.key = Some(key);
    e.seen = true;
    e.gone_since = None;
    e.last_data = Instant::now();
    e.rewind();
}

/// Cuts the next record out of the entry's buffer. None: more bytes are needed, or a rejected
/// unit is being skipped (see `Entry::bad_ready`).
fn next_unit(settings: &Settings, e: &mut Entry, now: i64) -> Option<Record> {
    loop {
        if e.skip.is_some() {
            advance_skip(e);
            return None;
        }
        let record = match settings.format {
            SourceFormat::Lines | SourceFormat::Ndjson => {
                let Some(i) = memchr::memchr(b'\n', &e.buf[e.scanned..]) else {
                    e.scanned = e.buf.len();
                    if e.buf.len() >= settings.max_line_bytes {
                        start_skip(
                            e,
                            settings.max_line_bytes,
                            Resync::AfterNewline,
                            format!(
                                "line longer than max_line_bytes ({})",
                                settings.max_line_bytes
                            ),
                            0,
                            None,
                        );
                        continue;
                    }
                    return None;
                };
                let end = e.scanned + i;
                e.scanned = 0;
                if end > settings.max_line_bytes {
                    start_skip(
                        e,
                        settings.max_line_bytes,
                        Resync::AfterNewline,
                        format!(
                            "line longer than max_line_bytes ({})",
                            settings.max_line_bytes
                        ),
                        0,
                        None,
                    );
                    continue;
                }
                if settings.format == SourceFormat::Lines {
                    let line = e.buf.split_to(end + 1).freeze();
                    e.pos += (end + 1) as u64;
                    if let Some(l) = &mut e.line {
                        *l += 1;
                    }
                    let len = if line[..end].ends_with(b"\r") {
                        end - 1
                    } else {
                        end
                    };
                    line.slice(..len)
                } else {
                    let text = &e.buf[..end];
                    let first = json::skip_ws(text);
                    if first == text.len() {
                        e.consume(end + 1, 1); // blank line
                        continue;
                    }
                    if let Err(err) = json::validate(text) {
                        let (message, _, column) = json::describe(&err);
                        start_skip(
                            e,
                            settings.max_line_bytes,
                            Resync::AfterNewline,
                            format!("invalid JSON: {message}"),
                            0,
                            Some(column),
                        );
                        continue;
                    }
                    let line = e.buf.split_to(end + 1).freeze();
                    e.pos += (end + 1) as u64;
                    if let Some(l) = &mut e.line {
                        *l += 1;
                    }
                    json::compact(&line.slice(..end))
                }
            }
            SourceFormat::Json => {
                let first = json::skip_ws(&e.buf);
                if first > 0 {
                    let newlines = count_newlines(&e.buf[..first]);
                    advance_col(&mut e.col, &e.buf[..first]);
                    e.consume(first, newlines);
                }
                if e.buf.is_empty() {
                    return None;
                }
                let mut values = serde_json::Deserializer::from_slice(&e.buf)
                    .into_iter::<serde::de::IgnoredAny>();
                match values.next() {
                    Some(Ok(_)) => {
                        let end = values.byte_offset();
                        // A number at the end of what we have may go on in the next bytes.
                        if end == e.buf.len() && matches!(e.buf[0], b'-' | b'0'..=b'9') {
                            if too_long_json(settings, e) {
                                continue;
                            }
                            return None;
                        }
                        if end > settings.max_line_bytes {
                            start_skip(
                                e,
                                settings.max_line_bytes,
                                Resync::JsonValueLine,
                                format!(
                                    "JSON value longer than max_line_bytes ({})",
                                    settings.max_line_bytes
                                ),
                                0,
                                None,
                            );
                            continue;
                        }
                        let value = e.buf.split_to(end).freeze();
                        e.pos += end as u64;
                        advance_col(&mut e.col, &value);
                        if let Some(l) = &mut e.line {
                            *l += count_newlines(&value);
                        }
                        json::compact(&value)
                    }
                    Some(Err(err)) if err.is_eof() => {
                        if too_long_json(settings, e) {
                            continue;
                        }
                        return None;
                    }
                    Some(Err(err)) => {
                        let (message, line, column) = json::describe(&err);
                        // serde counts the first line's columns from the value's start.
                        let column = if line <= 1 {
                            e.col.map(|c| c as usize + column)
                        } else {
                            Some(column)
                        };
                        start_skip(
                            e,
                            settings.max_line_bytes,
                            Resync::JsonValueLine,
                            format!("invalid JSON: {message}"),
                            line.saturating_sub(1) as u64,
                            column,
                        );
                        continue;
                    }
                    None => return None,
                }
            }
        };
        return Some(Record {
            key: None,
            value: Some(record),
            headers: vec![("file".to_string(), Some(e.header.clone()))],
            timestamp: now,
        });
    }
}

fn too_long_json(settings: &Settings, e: &mut Entry) -> bool {
    if e.buf.len() < settings.max_line_bytes {
        return false;
    }
    start_skip(
        e,
        settings.max_line_bytes,
        Resync::JsonValueLine,
        format!(
            "JSON value longer than max_line_bytes ({})",
            settings.max_line_bytes
        ),
        0,
        None,
    );
    true
}

fn start_skip(
    e: &mut Entry,
    cap: usize,
    resync: Resync,
    message: String,
    err_line: u64,
    column: Option<usize>,
) {
    e.scanned = 0;
    e.skip = Some(Skip {
        sample: BytesMut::new(),
        cap,
        total: 0,
        newlines: 0,
        err_line,
        column,
        message,
        resync,
        at_line_start: false,
        end: None,
    });
    advance_skip(e);
}

/// Moves through the rejected unit with the buffered bytes, keeping a sample of it, until its
/// end is found.
fn advance_skip(e: &mut Entry) {
    let Some(skip) = &mut e.skip else { return };
    if skip.end.is_some() {
        return;
    }
    loop {
        if skip.resync == Resync::JsonValueLine && skip.at_line_start {
            match e.buf.first() {
                None => return,
                Some(&b) if json::is_value_start(b) => {
                    skip.end = Some(e.pos + skip.total);
                    return;
                }
                Some(_) => skip.at_line_start = false,
            }
        }
        let (take, found) = match memchr::memchr(b'\n', &e.buf) {
            Some(i) => (i + 1, true),
            None => (e.buf.len(), false),
        };
        if take == 0 {
            return;
        }
        let chunk = e.buf.split_to(take);
        let room = skip.cap.saturating_sub(skip.sample.len());
        skip.sample
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        skip.total += take as u64;
        if found {
            skip.newlines += 1;
            match skip.resync {
                Resync::AfterNewline => {
                    skip.end = Some(e.pos + skip.total);
                    return;
                }
                Resync::JsonValueLine => skip.at_line_start = true,
            }
        } else {
            return;
        }
    }
}

fn deliver_bad(e: &mut Entry, out: &mut Out) {
    let Some(skip) = e.skip.take() else { return };
    let Some(end) = skip.end else {
        e.skip = Some(skip);
        return;
    };
    if e.line.is_none() {
        if let Some(file) = &e.file {
            e.line = count_lines(file, e.pos).ok();
        }
    }
    let line = e.line.map(|l| l + 1 + skip.err_line);
    let mut raw = skip.sample.freeze();
    let trimmed = raw.len()
        - raw
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
    raw.truncate(trimmed);
    let mut headers = vec![("file".to_string(), Some(e.header.clone()))];
    let line_text = line.map_or_else(|| "?".to_string(), |l| l.to_string());
    headers.push(("line".to_string(), Some(Bytes::from(line_text.clone()))));
    let column = skip.column.map(|c| format!(":{c}")).unwrap_or_default();
    let message = format!("{}:{line_text}{column}: {}", e.path.display(), skip.message);
    e.pos = end;
    e.col = Some(0); // rejected input ends at a line start
    if let Some(l) = &mut e.line {
        *l += skip.newlines;
    }
    e.scanned = 0;
    out.bad = Some((
        Record {
            key: None,
            value: Some(raw),
            headers,
            timestamp: out.now,
        },
        message,
    ));
}

/// CRC-64 of the file's first line, or of its first `max` bytes when that line is longer.
/// None until the file has that much.
fn fingerprint(file: &File, max: usize, scratch: &mut Vec<u8>) -> io::Result<Option<u64>> {
    scratch.resize(max, 0);
    let mut got = 0;
    while got < max {
        match file.read_at(&mut scratch[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = &scratch[..got];
    Ok(match memchr::memchr(b'\n', head) {
        Some(i) => Some(CRC64.checksum(&head[..=i])),
        None if got == max => Some(CRC64.checksum(head)),
        None => None,
    })
}

/// Whether `copy` (of `copy_size` bytes) holds the same bytes as `original` just before the end
/// of what both hold.
fn same_tail(original: &File, copy: &File, copy_size: u64) -> io::Result<bool> {
    let shared = original.metadata()?.len().min(copy_size);
    let from = shared.saturating_sub(COPY_WINDOW);
    let len = (shared - from) as usize;
    let mut a = vec![0; len];
    let mut b = vec![0; len];
    original.read_exact_at(&mut a, from)?;
    copy.read_exact_at(&mut b, from)?;
    Ok(a == b)
}

/// Where `start_at: end` starts: after the last newline, so that a line being written is read
/// whole; at the end when no newline is found within `max_line` bytes.
fn end_position(file: &File, size: u64, max_line: usize) -> io::Result<u64> {
    let from = size.saturating_sub(max_line as u64 + 1);
    let mut hi = size;
    let mut buf = vec![0; CHUNK];
    while hi > from {
        let lo = hi.saturating_sub(CHUNK as u64).max(from);
        let part = &mut buf[..(hi - lo) as usize];
        file.read_exact_at(part, lo)?;
        if let Some(i) = memchr::memrchr(b'\n', part) {
            return Ok(lo + i as u64 + 1);
        }
        hi = lo;
    }
    Ok(if from == 0 { 0 } else { size })
}

/// Newlines in the first `upto` bytes of the file.
fn count_lines(file: &File, upto: u64) -> io::Result<u64> {
    let mut buf = vec![0; CHUNK];
    let mut at = 0;
    let mut lines = 0;
    while at < upto {
        let want = CHUNK.min((upto - at) as usize);
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        lines += count_newlines(&buf[..n]);
        at += n as u64;
    }
    Ok(lines)
}
