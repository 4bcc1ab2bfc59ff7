//! The file source: tails the files its globs match, surviving rotation, and hands out their
//! lines or JSON values as records. See `docs/connectors/file.md`.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::tailer::{Ready, Tailer};
use crate::{ConnectorError, Result, Source, SourceBatch};

/// `source: { file: ... }` in a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Glob patterns (`*`, `?`, `[...]`, `**`) of the files to read. Use absolute paths.
    pub paths: Vec<String>,
    /// Glob patterns of files to leave out (e.g. compressed rotations).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Where files present at the first start are read from.
    #[serde(default)]
    pub start_at: StartAt,
    #[serde(default)]
    pub format: SourceFormat,
    /// Longest line (lines, ndjson) or JSON value (json); longer input is rejected.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// A batch stops growing once its values hold this many bytes.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// How often files are checked for new data when no change notification comes.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How often the globs are matched again to find new, renamed and deleted files.
    #[serde(default = "default_glob_interval_ms")]
    pub glob_interval_ms: u64,
    /// `notify`: change notifications (inotify) plus polling; `poll`: polling only (network
    /// filesystems, where notifications do not arrive).
    #[serde(default)]
    pub watch: WatchMode,
    /// Files are told apart by a checksum of their first line, at most this many bytes.
    #[serde(default = "default_fingerprint_bytes")]
    pub fingerprint_bytes: usize,
    /// A file renamed out of the globs or deleted is kept open and read until it has been idle
    /// at its end this long.
    #[serde(default = "default_rotate_wait_ms")]
    pub rotate_wait_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    #[default]
    Beginning,
    End,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// One record per line: the line's bytes without `\n` (and without a `\r` before it).
    #[default]
    Lines,
    /// A stream of JSON values separated by optional whitespace (one document per file is the
    /// simplest case); each top-level value is one record, compacted.
    Json,
    /// One JSON value per line, compacted; blank lines are skipped.
    Ndjson,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchMode {
    #[default]
    Notify,
    Poll,
}

fn default_max_line_bytes() -> usize {
    1024 * 1024
}
fn default_max_batch_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_poll_interval_ms() -> u64 {
    250
}
fn default_glob_interval_ms() -> u64 {
    1000
}
fn default_fingerprint_bytes() -> usize {
    256
}
fn default_rotate_wait_ms() -> u64 {
    30_000
}

/// Largest accepted `max_line_bytes` and `max_batch_bytes`.
const MAX_BYTES_LIMIT: usize = 256 * 1024 * 1024;

/// The validated configuration the tailer runs on.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) paths: Vec<String>,
    pub(crate) exclude: Vec<glob::Pattern>,
    pub(crate) start_at: StartAt,
    pub(crate) format: SourceFormat,
    pub(crate) max_line_bytes: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) fingerprint_bytes: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) glob_interval: Duration,
    pub(crate) rotate_wait: Duration,
    pub(crate) watch: WatchMode,
    /// Directories to watch for changes, and whether below them too.
    pub(crate) watch_roots: Vec<(PathBuf, notify::RecursiveMode)>,
}

impl FileSourceConfig {
    /// A configuration with these globs and every other field at its default.
    pub fn new(paths: impl IntoIterator<Item = impl Into<String>>) -> FileSourceConfig {
        FileSourceConfig {
            paths: paths.into_iter().map(Into::into).collect(),
            exclude: Vec::new(),
            start_at: StartAt::default(),
            format: SourceFormat::default(),
            max_line_bytes: default_max_line_bytes(),
            max_batch_bytes: default_max_batch_bytes(),
            poll_interval_ms: default_poll_interval_ms(),
            glob_interval_ms: default_glob_interval_ms(),
            watch: WatchMode::default(),
            fingerprint_bytes: default_fingerprint_bytes(),
            rotate_wait_ms: default_rotate_wait_ms(),
        }
    }

    fn settings(&self) -> anyhow::Result<Settings> {
        if self.paths.is_empty() {
            bail!("file source: `paths` needs at least one glob pattern");
        }
        let mut watch_roots: Vec<(PathBuf, notify::RecursiveMode)> = Vec::new();
        for p in &self.paths {
            if p.is_empty() {
                bail!("file source: `paths` holds an empty pattern");
            }
            glob::Pattern::new(p)
                .map_err(|e| anyhow!("file source: `paths`: pattern {p:?}: {e}"))?;
            let root = watch_root(p);
            if !watch_roots.contains(&root) {
                watch_roots.push(root);
            }
        }
        let exclude = self
            .exclude
            .iter()
            .map(|p| {
                glob::Pattern::new(p)
                    .map_err(|e| anyhow!("file source: `exclude`: pattern {p:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let in_range = |name: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                bail!("file source: `{name}` is {v}; it must be between {lo} and {hi}");
            }
            Ok(())
        };
        in_range("max_line_bytes", self.max_line_bytes, 1, MAX_BYTES_LIMIT)?;
        in_range("max_batch_bytes", self.max_batch_bytes, 1, MAX_BYTES_LIMIT)?;
        in_range("fingerprint_bytes", self.fingerprint_bytes, 16, 64 * 1024)?;
        let ms = |name: &str, v: u64| {
            if v == 0 || v > 86_400_000 {
                bail!("file source: `{name}` is {v}; it must be between 1 and 86400000 (one day)");
            }
            Ok(Duration::from_millis(v))
        };
        Ok(Settings {
            paths: self.paths.clone(),
            exclude,
            start_at: self.start_at,
            format: self.format,
            max_line_bytes: self.max_line_bytes,
            max_batch_bytes: self.max_batch_bytes,
            fingerprint_bytes: self.fingerprint_bytes,
            poll_interval: ms("poll_interval_ms", self.poll_interval_ms)?,
            glob_interval: ms("glob_interval_ms", self.glob_interval_ms)?,
            rotate_wait: ms("rotate_wait_ms", self.rotate_wait_ms)?,
            watch: self.watch,
            watch_roots,
        })
    }
}

/// The directory to watch for a pattern: its longest leading part without glob characters,
/// recursively when what follows has more than one component.
fn watch_root(pattern: &str) -> (PathBuf, notify::RecursiveMode) {
    let is_glob = |s: &str| s.contains(['*', '?', '[']);
    let path = Path::new(pattern);
    let mut root = PathBuf::new();
    let mut rest = 0;
    for c in path.components() {
        let literal = match c {
            Component::Normal(s) => !is_glob(&s.to_string_lossy()),
            _ => true,
        };
        if rest == 0 && literal {
            root.push(c);
        } else {
            rest += 1;
        }
    }
    if rest == 0 {
        // A plain file name: watch the directory it is in.
        root.pop();
        rest = 1;
    }
    if root.as_os_str().is_empty() {
        root.push(".");
    }
    let mode = if rest > 1 {
        notify::RecursiveMode::Recursive
    } else {
        notify::RecursiveMode::NonRecursive
    };
    (root, mode)
}

/// Reads the files matched by [`FileSourceConfig::paths`]. The source offset it hands out is
/// `{"files": [{"fingerprint", "path", "position", "line", "dev", "ino"}, ...]}`.
pub struct FileSource {
    settings: Arc<Settings>,
    core: Option<Arc<Mutex<Tailer>>>,
    wake: Arc<tokio::sync::Notify>,
    scan_flag: Arc<AtomicBool>,
    rejected: Option<SourceBatch>,
}

impl FileSource {
    /// Checks the configuration; nothing is opened until [`Source::start`].
    pub fn new(config: FileSourceConfig) -> Result<FileSource> {
        let settings = config.settings().map_err(ConnectorError::Fatal)?;
        Ok(FileSource {
            settings: Arc::new(settings),
            core: None,
            wake: Arc::new(tokio::sync::Notify::new()),
            scan_flag: Arc::new(AtomicBool::new(false)),
            rejected: None,
        })
    }

    /// Runs `f` on the tailer on the blocking pool.
    async fn with_core<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tailer) -> T + Send + 'static,
    ) -> Result<T> {
        let core = self.core.clone().ok_or_else(|| {
            ConnectorError::Fatal(anyhow!("file source: next_batch before start"))
        })?;
        tokio::task::spawn_blocking(move || {
            let mut tailer = core
                .lock()
                .map_err(|_| anyhow!("file source: a read panicked"))?;
            Ok(f(&mut tailer))
        })
        .await
        .map_err(|e| ConnectorError::Fatal(anyhow!("file source: a read panicked: {e}")))?
        .map_err(ConnectorError::Fatal)
    }
}

#[async_trait]
impl Source for FileSource {
    async fn start(&mut self, resume: Option<serde_json::Value>) -> Result<()> {
        let tailer = Tailer::new(
            self.settings.clone(),
            resume.as_ref(),
            self.wake.clone(),
            self.scan_flag.clone(),
        )
        .map_err(ConnectorError::Fatal)?;
        self.core = Some(Arc::new(Mutex::new(tailer)));
        self.rejected = None;
        // Place the files present now, so that `start_at: end` means the end as of start.
        self.with_core(|t| t.cycle_scan_only()).await
    }

    async fn next_batch(&mut self, max_records: usize) -> Result<Option<SourceBatch>> {
        self.rejected = None;
        loop {
            let force_scan = self.scan_flag.swap(false, Ordering::SeqCst);
            let ready = self
                .with_core(move |t| {
                    if t.ready.is_none() {
                        t.cycle(max_records, force_scan);
                    }
                })
                .await;
            ready?;
            // Taken here rather than in the closure: if this future is dropped while the read
            // runs, what it read waits in the tailer for the next call.
            let ready = match &self.core {
                Some(core) => core
                    .lock()
                    .map_err(|_| ConnectorError::Fatal(anyhow!("file source: a read panicked")))?
                    .ready
                    .take(),
                None => None,
            };
            match ready {
                Some(Ready::Batch(batch)) => return Ok(Some(batch)),
                Some(Ready::Bad(batch, message)) => {
                    self.rejected = Some(batch);
                    return Err(ConnectorError::BadRecord { index: 0, message });
                }
                None => {}
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
    }

    fn take_rejected(&mut self) -> Option<SourceBatch> {
        self.rejected.take()
    }

    /// The bytes of the files it reads not handed out yet; None while a read holds the tailer.
    fn lag(&self) -> Option<crate::Lag> {
        let tailer = self.core.as_ref()?.try_lock().ok()?;
        Some(crate::Lag::Bytes(tailer.bytes_behind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_roots() {
        use notify::RecursiveMode::*;
        assert_eq!(
            watch_root("/var/log/nginx/access.log*"),
            (PathBuf::from("/var/log/nginx"), NonRecursive)
        );
        assert_eq!(
            watch_root("/var/log/*/app.log"),
            (PathBuf::from("/var/log"), Recursive)
        );
        assert_eq!(
            watch_root("/var/log/**/*.log"),
            (PathBuf::from("/var/log"), Recursive)
        );
        assert_eq!(
            watch_root("/var/log/app.log"),
            (PathBuf::from("/var/log"), NonRecursive)
        );
        assert_eq!(watch_root("*.log"), (PathBuf::from("."), NonRecursive));
    }

    #[test]
    fn config_defaults_and_errors() {
        let c: FileSourceConfig = serde_json::from_str(r#"{"paths": ["/tmp/x/*.log"]}"#).unwrap();
        assert_eq!(c, FileSourceConfig::new(["/tmp/x/*.log"]));
        assert_eq!(c.start_at, StartAt::Beginning);
        assert_eq!(c.format, SourceFormat::Lines);

        let e = serde_json::from_str::<FileSourceConfig>(r#"{"paths": ["/a"], "strat_at": "end"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `strat_at`"), "{e}");
        let e = serde_json::from_str::<FileSourceConfig>(r#"{"paths": ["/a"], "format": "xml"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown variant `xml`"), "{e}");

        let bad = |c: FileSourceConfig| match FileSource::new(c) {
            Err(ConnectorError::Fatal(e)) => e.to_string(),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        };
        assert!(bad(FileSourceConfig::new(Vec::<String>::new())).contains("at least one"));
        assert!(bad(FileSourceConfig::new(["/a/[b"])).contains("\"/a/[b\""));
        let mut c = FileSourceConfig::new(["/a"]);
        c.poll_interval_ms = 0;
        assert!(bad(c).contains("poll_interval_ms"));
        let mut c = FileSourceConfig::new(["/a"]);
        c.max_line_bytes = 0;
        assert!(bad(c).contains("max_line_bytes"));
    }
}
