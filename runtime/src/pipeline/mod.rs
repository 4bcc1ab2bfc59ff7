//! The pipeline runtime: every YAML file in the pipelines directory is one pipeline. Files
//! are watched (notify, with a periodic rescan as the fallback): a new or changed file starts
//! or restarts its pipeline, a deleted one stops it, and an invalid one is reported (log and
//! `GET /pipelines`) while the previous version of that pipeline keeps running.

pub mod http_source;
pub mod io;
pub mod offsets;
pub mod remote;
pub mod spec;
pub mod task;
pub mod topic;
pub mod transform;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_connectors::Source;

use crate::group::GroupCoordinator;
use crate::log::manager::LogManager;
use crate::txn::TxnCoordinator;
use http_source::{HttpSource, IngestEndpoint};
use offsets::OffsetStore;
use spec::{PipelineSpec, SourceSpec, SpecError};

/// How often the directory is rescanned even without a notification.
const RESCAN: Duration = Duration::from_secs(2);
/// How long a stopping pipeline may take to finish its current batch.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What the tasks of every pipeline share.
#[derive(Clone)]
pub struct Context {
    pub log: Arc<LogManager>,
    pub groups: Arc<GroupCoordinator>,
    pub txns: Arc<TxnCoordinator>,
    pub offsets: Arc<OffsetStore>,
    pub default_partitions: i32,
    /// The WASM plugin host (one engine and module cache for every pipeline).
    pub plugins: Arc<weir_wasm::Host>,
    /// On a cluster node, the broker: the cluster image places each pipeline on one node,
    /// and pipelines reach partition leaders and coordinators over the network.
    pub cluster: Option<Arc<crate::kafka::Broker>>,
}

/// Where the cluster runs a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// On this node (always, on a single node).
    Here,
    On(i32),
    /// Nowhere: no live node offers it.
    Nowhere,
}

/// A pipeline's state as `GET /pipelines` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub file: PathBuf,
    /// Its stages in order (source, plugins, topic, sinks), described briefly.
    pub flow: Vec<String>,
    /// starting, running, paused, finished, failed or stopped.
    pub state: String,
    /// Why it failed, and when (milliseconds since the Unix epoch).
    pub error: Option<String>,
    pub error_at_ms: Option<i64>,
    pub records_in: u64,
    /// Records written per sink.
    pub records_out: Vec<u64>,
    /// Each task's state by stage (`source`, `sinks[N]`): running, finished (its source
    /// ended), stopped, failed or fenced.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, String>,
    pub dead_letters: u64,
    /// How far its source is behind its input, where the source can tell (files in bytes,
    /// topics in records), as of the last batch it committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_lag: Option<weir_connectors::Lag>,
    /// The source offset stored with the last batch it committed (where it resumes after a
    /// restart), in the source's own terms; None before its first commit.
    pub source_offset: Option<serde_json::Value>,
    /// On a cluster, the node running it (None: no node can now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<i32>,
}

/// One pipeline file as the manager knows it.
#[derive(Serialize)]
pub struct FileStatus {
    pub file: PathBuf,
    /// The pipeline running from (the last valid version of) this file.
    pub pipeline: Option<Status>,
    /// Why the current content of the file is not used.
    pub invalid: Option<String>,
    /// The refused content, with the line and column the error points at (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refused>,
}

#[derive(Serialize)]
pub struct Refused {
    pub text: String,
    pub line: usize,
    pub column: usize,
}

struct Running {
    spec: PipelineSpec,
    /// Where the cluster placed it when this was started.
    placed: Placed,
    status: Arc<Mutex<Status>>,
    stop: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
    endpoint: Option<String>,
}

impl Running {
    /// A pipeline that is not run here, because it is paused (`state`) or runs elsewhere in
    /// the cluster: its status, no tasks.
    fn idle(
        spec: PipelineSpec,
        file: &Path,
        state: &str,
        placed: Placed,
        node: Option<i32>,
    ) -> Running {
        let status = Status {
            name: spec.name.clone(),
            file: file.to_path_buf(),
            flow: spec.flow(),
            state: state.into(),
            error: None,
            error_at_ms: None,
            records_in: 0,
            records_out: vec![0; spec.sinks.len()],
            tasks: BTreeMap::new(),
            dead_letters: 0,
            source_lag: None,
            source_offset: None,
            node,
        };
        Running {
            spec,
            placed,
            status: Arc::new(Mutex::new(status)),
            stop: Arc::new(watch::channel(false).0),
            tasks: Vec::new(),
            endpoint: None,
        }
    }
}

impl FileState {
    fn status(&self, file: &Path) -> FileStatus {
        FileStatus {
            file: file.to_path_buf(),
            pipeline: self.running.as_ref().map(|r| r.status.lock().clone()),
            invalid: self.invalid.clone(),
            refused: self
                .invalid
                .as_ref()
                .and(self.invalid_at)
                .and_then(|(line, column)| {
                    let text = std::fs::read_to_string(file).ok()?;
                    Some(Refused { text, line, column })
                }),
        }
    }

    /// The spec of the pipeline `name` if this file holds it: the running version, else the
    /// last valid content.
    fn spec_named(&self, name: &str) -> Option<&PipelineSpec> {
        let running = self.running.as_ref().map(|r| &r.spec);
        running
            .filter(|s| s.name == name)
            .or(self.parsed.as_ref().filter(|s| s.name == name))
    }
}

fn paused_file(ctx: &Context) -> PathBuf {
    ctx.log
        .data_dir()
        .join("meta")
        .join("paused-pipelines.json")
}

#[derive(Default)]
struct FileState {
    content_hash: u64,
    /// The last version of the file that parsed (running or not), and the size and
    /// modification time of its plugin files when it was checked: a replaced plugin file makes
    /// the file be checked again.
    parsed: Option<PipelineSpec>,
    plugins_stamp: u64,
    running: Option<Running>,
    invalid: Option<String>,
    /// Refused because another file's pipeline holds its name or HTTP path: checked again on
    /// every scan, so that it starts once the other file changes or goes away.
    conflict: bool,
    /// Where the error of `invalid` points in the file, when it is the content's fault.
    invalid_at: Option<(usize, usize)>,
}

pub struct PipelineManager {
    ctx: Context,
    dir: PathBuf,
    files: tokio::sync::Mutex<BTreeMap<PathBuf, FileState>>,
    endpoints: RwLock<HashMap<String, IngestEndpoint>>,
    /// Changes through the API (put, delete, restart, pause) go one at a time.
    edits: tokio::sync::Mutex<()>,
    /// Names of paused pipelines: their files are checked but not run. Kept in
    /// `<data-dir>/meta/paused-pipelines.json` across restarts; on a cluster, the cluster
    /// image holds them instead, so that a pipeline stays paused when it moves.
    paused: Mutex<std::collections::BTreeSet<String>>,
}

/// Why a change through the API was refused.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The content is not a pipeline weir can run (with file, line, column and field).
    #[error(transparent)]
    Invalid(SpecError),
    #[error("no pipeline named '{0}'")]
    NotFound(String),
    #[error("{0}")]
    BadName(String),
    /// Another file's pipeline or content is in the way.
    #[error("{0}")]
    Conflict(String),
    #[error("{0:#}")]
    Io(anyhow::Error),
}

impl PipelineManager {
    pub fn new(ctx: Context, dir: PathBuf) -> PipelineManager {
        let paused = std::fs::read(paused_file(&ctx))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        PipelineManager {
            ctx,
            dir,
            files: tokio::sync::Mutex::new(BTreeMap::new()),
            endpoints: RwLock::new(HashMap::new()),
            edits: tokio::sync::Mutex::new(()),
            paused: Mutex::new(paused),
        }
    }

    /// Pauses (`pause`) or resumes the pipeline `name`: a paused pipeline's tasks stop where a
    /// restart would resume them (exactly once), its HTTP source answers 503, and it stays
    /// paused across daemon restarts until resumed.
    pub async fn set_paused(&self, name: &str, pause: bool) -> Result<FileStatus, EditError> {
        let _edit = self.edits.lock().await;
        let file = self.existing_file_of(name).await?;
        if let Some(cluster) = self.cluster() {
            let command = crate::cluster::image::Command::PausePipeline {
                name: name.to_string(),
                paused: pause,
            };
            cluster.run(command).await.map_err(|e| {
                EditError::Io(anyhow!("cannot record the pause in the cluster: {e}"))
            })?;
            tracing::info!(
                pipeline = name,
                paused = pause,
                "pipeline paused or resumed on request, on whichever node runs it"
            );
            return self.reload(&file, name).await;
        }
        let names = {
            let mut paused = self.paused.lock();
            let changed = if pause {
                paused.insert(name.to_string())
            } else {
                paused.remove(name)
            };
            changed.then(|| paused.clone())
        };
        if let Some(names) = names {
            let bytes = serde_json::to_vec(&names).expect("names serialise");
            crate::log::write_atomically(&paused_file(&self.ctx), &bytes)
                .map_err(|e| EditError::Io(anyhow!("cannot record paused pipelines: {e}")))?;
            tracing::info!(
                pipeline = name,
                paused = pause,
                "pipeline paused or resumed on request"
            );
            return self.reload(&file, name).await;
        }
        self.status_of(&file)
            .await
            .ok_or_else(|| EditError::NotFound(name.to_string()))
    }

    /// The dead-letter topic of the pipeline `name` (configured or `<name>.dlq`).
    pub async fn dead_letter_topic(&self, name: &str) -> Option<String> {
        let files = self.files.lock().await;
        files
            .values()
            .find_map(|s| s.spec_named(name).map(PipelineSpec::dead_letter_topic))
    }

    /// `file_of`, or NotFound.
    async fn existing_file_of(&self, name: &str) -> Result<PathBuf, EditError> {
        self.file_of(name)
            .await
            .ok_or_else(|| EditError::NotFound(name.to_string()))
    }

    /// Stops what runs from `file` and checks and starts the file again.
    async fn reload(&self, file: &Path, name: &str) -> Result<FileStatus, EditError> {
        {
            let mut files = self.files.lock().await;
            if let Some(state) = files.get_mut(file) {
                if let Some(r) = state.running.take() {
                    self.stop(r).await;
                }
                // Makes the next scan check the file again.
                state.content_hash = 0;
            }
        }
        self.scan().await;
        self.status_of(file)
            .await
            .ok_or_else(|| EditError::NotFound(name.to_string()))
    }

    /// The pipeline whose HTTP source is at `path` when another node of the cluster runs it:
    /// its name, that node, and the source's body limit.
    pub async fn served_elsewhere(&self, path: &str) -> Option<(String, i32, usize)> {
        let files = self.files.lock().await;
        files.values().find_map(|f| {
            let r = f.running.as_ref()?;
            let SourceSpec::Http(h) = &r.spec.source else {
                return None;
            };
            match r.placed {
                Placed::On(node) if h.path == path => {
                    Some((r.spec.name.clone(), node, h.max_body_bytes))
                }
                _ => None,
            }
        })
    }

    /// The plugins of the pipelines this node runs (paused and failed ones included), stage by
    /// stage: pipeline, stage index, plugin name (its file's stem, as in the metrics), path,
    /// and the pipeline's state.
    pub async fn plugins(&self) -> Vec<(String, usize, String, PathBuf, String)> {
        let files = self.files.lock().await;
        let mut out = Vec::new();
        for (file, f) in files.iter() {
            let Some(r) = f.running.as_ref().filter(|r| r.placed == Placed::Here) else {
                continue;
            };
            let state = r.status.lock().state.clone();
            for (i, t) in r.spec.transforms.iter().enumerate() {
                let path = plugin_path(file, &t.plugin);
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string());
                out.push((r.spec.name.clone(), i, name, path, state.clone()));
            }
        }
        out
    }

    /// Modules compiled, and loads answered from the caches, since the start.
    pub fn plugin_host_stats(&self) -> weir_wasm::HostStats {
        self.ctx.plugins.stats()
    }

    /// The paused pipeline whose HTTP source is at `path`, if any.
    pub async fn paused_at(&self, path: &str) -> Option<String> {
        let files = self.files.lock().await;
        files.values().find_map(|f| {
            let r = f.running.as_ref()?;
            let serves = matches!(&r.spec.source, SourceSpec::Http(h) if h.path == path);
            (serves && r.status.lock().state == "paused").then(|| r.spec.name.clone())
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The HTTP source mounted at `path`, if any.
    pub fn endpoint(&self, path: &str) -> Option<IngestEndpoint> {
        self.endpoints.read().get(path).cloned()
    }

    pub async fn statuses(&self) -> Vec<FileStatus> {
        let files = self.files.lock().await;
        files.iter().map(|(file, f)| f.status(file)).collect()
    }

    /// The status of one file, as `GET /pipelines` lists it.
    pub async fn status_of(&self, file: &Path) -> Option<FileStatus> {
        let files = self.files.lock().await;
        files.get(file).map(|f| f.status(file))
    }

    /// The file that holds the pipeline `name`: the one running it, else the one whose last
    /// valid content names it.
    pub async fn file_of(&self, name: &str) -> Option<PathBuf> {
        let files = self.files.lock().await;
        files
            .iter()
            .find(|(_, s)| s.spec_named(name).is_some())
            .map(|(f, _)| f.clone())
    }

    /// Checks `text` as the content of `file` would be checked when the directory is scanned:
    /// parsed, and its plugins loaded.
    pub async fn check(&self, file: &Path, text: &str) -> Result<PipelineSpec, SpecError> {
        check(&self.ctx.plugins, file, text).await
    }

    /// Creates or replaces the pipeline `name` with `text` (YAML), once it is checked: written
    /// atomically into the file that holds the pipeline, else `<name>.yaml`, and started at
    /// once. Returns the file's status and whether the pipeline is new.
    pub async fn put(&self, name: &str, text: &str) -> Result<(FileStatus, bool), EditError> {
        let _edit = self.edits.lock().await;
        let existing = self.file_of(name).await;
        let file = match &existing {
            Some(f) => f.clone(),
            None => {
                crate::log::config::validate_topic_name(name).map_err(|e| {
                    EditError::BadName(format!("'{name}' cannot name a pipeline: {e}"))
                })?;
                let file = self.dir.join(format!("{name}.yaml"));
                if file.exists() {
                    return Err(EditError::Conflict(format!(
                        "{} exists and does not hold a pipeline named '{name}'",
                        file.display()
                    )));
                }
                file
            }
        };
        let spec = self.check(&file, text).await.map_err(EditError::Invalid)?;
        if spec.name != name {
            return Err(EditError::Invalid(SpecError::at_field(
                &file,
                text,
                "name",
                format!(
                    "'{}' is not the name the request is for ('{name}')",
                    spec.name
                ),
            )));
        }
        {
            let files = self.files.lock().await;
            if let Some(e) = self.http_path_taken(&spec, &file, text, files.get(&file)) {
                return Err(EditError::Invalid(e));
            }
        }
        crate::log::write_atomically(&file, text.as_bytes())
            .map_err(|e| EditError::Io(anyhow!("cannot write {}: {e}", file.display())))?;
        self.scan().await;
        let status = self.status_of(&file).await.ok_or_else(|| {
            EditError::Io(anyhow!("{} went away as it was written", file.display()))
        })?;
        Ok((status, existing.is_none()))
    }

    /// Deletes the file of the pipeline `name`, which stops it; returns the file.
    pub async fn delete(&self, name: &str) -> Result<PathBuf, EditError> {
        let _edit = self.edits.lock().await;
        let file = self.existing_file_of(name).await?;
        std::fs::remove_file(&file)
            .map_err(|e| EditError::Io(anyhow!("cannot delete {}: {e}", file.display())))?;
        self.scan().await;
        Ok(file)
    }

    /// Stops the pipeline `name` and starts it again from its file.
    pub async fn restart(&self, name: &str) -> Result<FileStatus, EditError> {
        let _edit = self.edits.lock().await;
        let file = self.existing_file_of(name).await?;
        tracing::info!(pipeline = name, "restarting the pipeline on request");
        self.reload(&file, name).await
    }

    /// Watches the directory until `shutdown`, then stops every pipeline.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let watcher = {
            use notify::Watcher;
            let tx = tx.clone();
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.try_send(());
                }
            })
            .and_then(|mut w| {
                w.watch(&self.dir, notify::RecursiveMode::NonRecursive)?;
                Ok(w)
            })
        };
        if let Err(e) = &watcher {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the pipelines directory; rescanning every 2 s instead");
        }
        // On a cluster, a new image may move pipelines here or away.
        let mut image = self
            .ctx
            .cluster
            .as_ref()
            .and_then(|b| b.cluster.as_ref())
            .map(|c| c.watch_image());
        loop {
            self.scan().await;
            self.offer().await;
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = async {
                    match image.as_mut() {
                        Some(i) => { let _ = i.changed().await; }
                        None => std::future::pending().await,
                    }
                } => {}
                _ = rx.recv() => {
                    // Let an editor finish writing (several events) before reading.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(RESCAN) => {}
            }
        }
        drop(watcher);
        let mut files = self.files.lock().await;
        for (_, f) in files.iter_mut() {
            if let Some(r) = f.running.take() {
                self.stop(r).await;
            }
        }
    }

    /// Brings the running pipelines in line with the directory's files.
    pub async fn scan(&self) {
        let present = match list_pipeline_files(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the pipelines directory");
                return;
            }
        };
        let mut files = self.files.lock().await;
        let gone: Vec<PathBuf> = files
            .keys()
            .filter(|f| !present.contains(f))
            .cloned()
            .collect();
        for file in gone {
            if let Some(r) = files.remove(&file).and_then(|f| f.running) {
                tracing::info!(pipeline = %r.spec.name, file = %file.display(), "pipeline file removed: stopping");
                self.stop(r).await;
            }
        }
        for file in present {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let hash = content_hash(&text);
            let state = files.entry(file.clone()).or_default();
            let plugins_changed = state
                .parsed
                .as_ref()
                .is_some_and(|s| plugins_stamp(s, &file) != state.plugins_stamp);
            // A pipeline fenced by another instance of itself runs again from its committed
            // offsets if the cluster still places it here (or stays idle once it learns where).
            let moved = state.running.as_ref().is_some_and(|r| {
                r.placed != self.placement(&r.spec.name)
                    || r.status.lock().state == FENCED
                    || !self.pause_applied(r)
            });
            if state.content_hash == hash
                && !state.conflict
                && !plugins_changed
                && !moved
                && (state.running.is_some() || state.invalid.is_some())
            {
                continue;
            }
            state.content_hash = hash;
            state.conflict = false;
            let spec = match PipelineSpec::parse(&file, &text, |n| std::env::var(n).ok()) {
                Ok(spec) => spec,
                Err(e) => {
                    self.reject(state, &file, e);
                    continue;
                }
            };
            let placed = self.placement(&spec.name);
            if !plugins_changed
                && state.running.as_ref().is_some_and(|r| {
                    r.spec == spec
                        && r.placed == placed
                        && r.status.lock().state != FENCED
                        && self.pause_applied(r)
                })
            {
                state.invalid = None;
                continue;
            }
            // A name belongs to one file.
            let taken = files.iter().find(|(f, s)| {
                **f != file && s.running.as_ref().is_some_and(|r| r.spec.name == spec.name)
            });
            let conflict = match taken {
                Some((other, _)) => Some(SpecError::at_field(
                    &file,
                    &text,
                    "name",
                    format!(
                        "'{}' is already the name of the pipeline in {}",
                        spec.name,
                        other.display()
                    ),
                )),
                None => self.http_path_taken(&spec, &file, &text, files.get(&file)),
            };
            let state = files.get_mut(&file).expect("inserted above");
            if let Some(e) = conflict {
                state.conflict = true;
                self.reject(state, &file, e);
                continue;
            }
            if placed != Placed::Here {
                if let Some(old) = state.running.take() {
                    tracing::info!(pipeline = %old.spec.name, ?placed, "the cluster runs the pipeline elsewhere: stopping it here");
                    self.stop(old).await;
                }
                let (label, node) = match placed {
                    Placed::On(n) => ("elsewhere", Some(n)),
                    _ => ("unplaced", None),
                };
                state.plugins_stamp = plugins_stamp(&spec, &file);
                state.parsed = Some(spec.clone());
                state.running = Some(Running::idle(spec, &file, label, placed, node));
                state.invalid = None;
                continue;
            }
            if self.is_paused(&spec.name) {
                if let Some(old) = state.running.take() {
                    self.stop(old).await;
                }
                let node = self.this_node();
                state.running = Some(Running::idle(spec, &file, "paused", placed, node));
                state.invalid = None;
                continue;
            }
            // Plugins are loaded before the running version is stopped: a module weir refuses
            // leaves that version running.
            state.plugins_stamp = plugins_stamp(&spec, &file);
            state.parsed = Some(spec.clone());
            let plugins = match load_plugins(&self.ctx.plugins, &spec, &file, &text).await {
                Ok(p) => p,
                Err(e) => {
                    self.reject(state, &file, e);
                    continue;
                }
            };
            if let Some(old) = state.running.take() {
                if old.placed == placed {
                    tracing::info!(pipeline = %old.spec.name, file = %file.display(), "pipeline file changed: restarting");
                } else {
                    tracing::info!(pipeline = %old.spec.name, "the cluster placed the pipeline on this node");
                }
                self.stop(old).await;
            }
            match self.start(spec.clone(), &file, plugins).await {
                Ok(r) => {
                    tracing::info!(pipeline = %spec.name, file = %file.display(), "pipeline started");
                    state.running = Some(r);
                    state.invalid = None;
                }
                Err(e) => {
                    let message = format!("{}: {e:#}", file.display());
                    tracing::error!(pipeline = %spec.name, error = %message, "pipeline cannot start");
                    state.invalid = Some(message);
                    state.invalid_at = None;
                }
            }
        }
    }

    fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.ctx.cluster.as_ref().and_then(|b| b.cluster.as_ref())
    }

    /// Whether the pipeline `name` is paused: on a cluster, as the image says.
    fn is_paused(&self, name: &str) -> bool {
        match self.cluster() {
            Some(c) => c.image().paused_pipelines.contains(name),
            None => self.paused.lock().contains(name),
        }
    }

    /// A pipeline run here is paused exactly when it should be (a pause made through another
    /// node of the cluster reaches this one with a new image).
    fn pause_applied(&self, r: &Running) -> bool {
        r.placed != Placed::Here
            || (r.status.lock().state == "paused") == self.is_paused(&r.spec.name)
    }

    /// Where the cluster runs the pipeline `name`; always here on a single node.
    fn placement(&self, name: &str) -> Placed {
        let Some(cluster) = self.cluster() else {
            return Placed::Here;
        };
        match cluster.image().pipelines.get(name) {
            Some(n) if *n == cluster.node_id => Placed::Here,
            Some(n) => Placed::On(*n),
            None => Placed::Nowhere,
        }
    }

    /// This node's id in statuses, on a cluster.
    fn this_node(&self) -> Option<i32> {
        self.ctx.cluster.as_ref().map(|b| b.node_id)
    }

    /// On a cluster, tells the quorum which pipelines this node can run when that changed:
    /// the valid ones whose `node` is unset or this node.
    async fn offer(&self) {
        let Some(broker) = &self.ctx.cluster else {
            return;
        };
        let Some(cluster) = &broker.cluster else {
            return;
        };
        let names: std::collections::BTreeSet<String> = {
            let files = self.files.lock().await;
            files
                .values()
                .filter_map(|f| f.running.as_ref())
                .filter(|r| r.spec.node.is_none_or(|n| n == broker.node_id))
                .map(|r| r.spec.name.clone())
                .collect()
        };
        let offered = cluster
            .image()
            .pipeline_offers
            .get(&broker.node_id)
            .cloned();
        if offered.as_ref() == Some(&names) || (offered.is_none() && names.is_empty()) {
            return;
        }
        let command = crate::cluster::image::Command::OfferPipelines {
            node: broker.node_id,
            names,
        };
        if let Err(e) = cluster.run(command).await {
            tracing::warn!(error = %e, "cannot tell the cluster which pipelines this node runs; trying again");
        }
    }

    fn reject(&self, state: &mut FileState, file: &Path, e: SpecError) {
        let message = e.to_string();
        // A conflicting file is checked on every scan: say why once.
        if state.invalid.as_ref() != Some(&message) {
            let keeps = state
                .running
                .as_ref()
                .map(|r| format!("; the running version of '{}' is kept", r.spec.name))
                .unwrap_or_default();
            tracing::error!(file = %file.display(), error = %e, "invalid pipeline file{keeps}");
        }
        state.invalid = Some(message);
        state.invalid_at = Some((e.line, e.column));
    }

    /// The error when `spec`'s HTTP source path is served by another file's pipeline.
    fn http_path_taken(
        &self,
        spec: &PipelineSpec,
        file: &Path,
        text: &str,
        state: Option<&FileState>,
    ) -> Option<SpecError> {
        let SourceSpec::Http(h) = &spec.source else {
            return None;
        };
        let endpoints = self.endpoints.read();
        let other = endpoints.get(&h.path)?;
        let own = state
            .and_then(|s| s.running.as_ref())
            .is_some_and(|r| r.endpoint.as_deref() == Some(h.path.as_str()));
        (!own).then(|| {
            SpecError::at_field(
                file,
                text,
                "source.http.path",
                format!(
                    "{} is already served by pipeline '{}'",
                    h.path, other.pipeline
                ),
            )
        })
    }

    async fn start(
        &self,
        spec: PipelineSpec,
        file: &Path,
        plugins: Vec<weir_wasm::Plugin>,
    ) -> Result<Running> {
        let ctx = self.ctx.clone();
        let status = Arc::new(Mutex::new(Status {
            name: spec.name.clone(),
            file: file.to_path_buf(),
            flow: spec.flow(),
            state: "running".into(),
            error: None,
            error_at_ms: None,
            records_in: 0,
            records_out: vec![0; spec.sinks.len()],
            tasks: BTreeMap::new(),
            dead_letters: 0,
            source_lag: None,
            source_offset: None,
            node: self.this_node(),
        }));
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let mut endpoint = None;
        // The HTTP source is mounted here so that its path is taken (or refused) at once; the
        // other sources and the sinks are opened by their tasks, which retry what is down.
        let mounted: Option<Box<dyn Source>> = match &spec.source {
            SourceSpec::Http(h) => {
                let (source, ep) = HttpSource::new(&spec.name, h);
                let mut endpoints = self.endpoints.write();
                if let Some(other) = endpoints.get(&h.path) {
                    bail!(
                        "source.http.path: {} is already served by pipeline '{}'",
                        h.path,
                        other.pipeline
                    );
                }
                endpoints.insert(h.path.clone(), ep);
                endpoint = Some(h.path.clone());
                Some(Box::new(source))
            }
            _ => None,
        };
        // A topic source without an output topic feeds the sinks directly.
        let runs_source = !matches!((&spec.source, &spec.topic), (SourceSpec::Topic(_), None));
        let mut tasks = Vec::new();
        if runs_source {
            let run = task::run_source(
                ctx.clone(),
                spec.clone(),
                mounted,
                plugins,
                status.clone(),
                stop_rx.clone(),
            );
            tasks.push(spawn_stage(&status, &stop_tx, "source".into(), run));
        }
        for i in 0..spec.sinks.len() {
            let run = task::run_sink(
                ctx.clone(),
                spec.clone(),
                i,
                status.clone(),
                stop_rx.clone(),
            );
            tasks.push(spawn_stage(&status, &stop_tx, format!("sinks[{i}]"), run));
        }
        Ok(Running {
            spec,
            placed: Placed::Here,
            status,
            stop: stop_tx,
            tasks,
            endpoint,
        })
    }

    async fn stop(&self, r: Running) {
        let _ = r.stop.send(true);
        if let Some(p) = &r.endpoint {
            self.endpoints.write().remove(p);
        }
        for t in r.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(STOP_GRACE, t).await.is_err() {
                tracing::warn!(pipeline = %r.spec.name, "a task did not stop in time; aborting it");
                abort.abort();
            }
        }
        let mut s = r.status.lock();
        if s.state == "running" {
            s.state = "stopped".into();
        }
    }
}

/// Checks `text` as the content of `file`, as the pipelines directory does: parsed, and its
/// plugins loaded by `host` (relative plugin paths are relative to the file's directory).
pub async fn check(
    host: &Arc<weir_wasm::Host>,
    file: &Path,
    text: &str,
) -> Result<PipelineSpec, SpecError> {
    let spec = PipelineSpec::parse(file, text, |n| std::env::var(n).ok())?;
    load_plugins(host, &spec, file, text).await?;
    Ok(spec)
}

/// Compiles (or takes from the cache) and checks every module of `spec`, so that a bad
/// plugin is reported as the file's error, at its `transforms[i].plugin` line.
pub async fn load_plugins(
    host: &Arc<weir_wasm::Host>,
    spec: &PipelineSpec,
    file: &Path,
    text: &str,
) -> Result<Vec<weir_wasm::Plugin>, SpecError> {
    let mut plugins = Vec::with_capacity(spec.transforms.len());
    for (i, t) in spec.transforms.iter().enumerate() {
        let path = plugin_path(file, &t.plugin);
        let options = weir_wasm::PluginOptions {
            pipeline: Some(spec.name.clone()),
            config: t.config.clone(),
            ..Default::default()
        };
        let host = host.clone();
        let load_path = path.clone();
        let loaded = tokio::task::spawn_blocking(move || host.load(&load_path, options))
            .await
            .map_err(|e| anyhow!("{e}"))
            .and_then(|r| r.map_err(|e| anyhow!("{e}")));
        let field = format!("transforms[{i}].plugin");
        plugins.push(loaded.map_err(|e| {
            SpecError::at_field(file, text, &field, format!("{}: {e}", path.display()))
        })?);
    }
    Ok(plugins)
}

/// Records how a task ended; a failure stops the pipeline's other tasks.
/// Runs one stage of a pipeline as a task; when it fails, the pipeline shows why and stops.
fn spawn_stage(
    status: &Arc<Mutex<Status>>,
    stop_all: &watch::Sender<bool>,
    stage: String,
    run: impl std::future::Future<Output = Result<()>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (status, stop_all) = (status.clone(), stop_all.clone());
    status.lock().tasks.insert(stage.clone(), "running".into());
    tokio::spawn(async move {
        let r = run.await;
        finish(&status, &stop_all, &stage, r);
    })
}

/// The state of a pipeline another instance of itself took over (see remote::Fenced).
const FENCED: &str = "fenced";

fn finish(status: &Mutex<Status>, stop_all: &watch::Sender<bool>, stage: &str, r: Result<()>) {
    let ended = match &r {
        Ok(()) if *stop_all.borrow() => "stopped",
        Ok(()) => "finished",
        Err(e) if remote::is_fenced(e) => FENCED,
        Err(_) => "failed",
    };
    status.lock().tasks.insert(stage.to_string(), ended.into());
    if let Err(e) = r {
        let message = format!("{e:#}");
        let mut s = status.lock();
        if remote::is_fenced(&e) {
            tracing::warn!(pipeline = %s.name, stage, error = %message, "pipeline fenced by another instance of itself; stopping it here");
            s.state = FENCED.into();
        } else {
            tracing::error!(pipeline = %s.name, stage, error = %message, "pipeline failed");
            s.state = "failed".into();
        }
        s.error = Some(message);
        s.error_at_ms = Some(crate::now_ms());
        let _ = stop_all.send(true);
    }
}

/// A plugin path from a pipeline file: relative paths are relative to the file's directory.
fn plugin_path(pipeline_file: &Path, plugin: &Path) -> PathBuf {
    if plugin.is_absolute() {
        plugin.to_path_buf()
    } else {
        pipeline_file
            .parent()
            .unwrap_or(Path::new("."))
            .join(plugin)
    }
}

/// Changes when a plugin file of the pipeline is replaced (size or modification time).
fn plugins_stamp(spec: &PipelineSpec, file: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in &spec.transforms {
        let meta = std::fs::metadata(plugin_path(file, &t.plugin)).ok();
        meta.as_ref().map(|m| m.len()).hash(&mut h);
        meta.and_then(|m| m.modified().ok()).hash(&mut h);
    }
    h.finish()
}

fn list_pipeline_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if yaml && !hidden && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn content_hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}
