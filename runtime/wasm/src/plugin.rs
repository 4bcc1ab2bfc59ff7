//! The engine, module loading and checking, and what a store holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::{
    Caller, Config, Engine, ExternType, FuncType, InstancePre, Linker, Module, ResourceLimiter,
    Store, ValType,
};
use weir_plugin_sdk::abi::level;

use crate::cache::{self, DiskCache};
use crate::instance::Instance;
use crate::{Error, Limits, ABI_VERSION};

/// How a plugin's log lines are written.
#[derive(Clone, Default)]
pub enum LogSink {
    /// Through `tracing`, target `weir::plugin`, with `plugin` and `pipeline` fields.
    #[default]
    Tracing,
    /// To a function (the CLI's offline runner prints them itself).
    Callback(Arc<dyn Fn(&LogLine<'_>) + Send + Sync>),
}

/// One log line from a plugin.
pub struct LogLine<'a> {
    pub plugin: &'a str,
    pub pipeline: Option<&'a str>,
    /// 1 error, 2 warn, 3 info, 4 debug, 5 trace (`weir_plugin_sdk::abi::level`).
    pub level: u32,
    pub message: &'a str,
}

/// How to load a plugin.
#[derive(Clone, Default)]
pub struct PluginOptions {
    /// The plugin's name in logs and errors; defaults to the file name without extension.
    pub name: Option<String>,
    /// The pipeline the plugin runs in, for logs.
    pub pipeline: Option<String>,
    /// The pipeline's `config:` map for this transform, passed to the module's `weir_init`.
    pub config: serde_json::Map<String, serde_json::Value>,
    pub limits: Limits,
    pub log: LogSink,
}

/// Counters of what the host did with modules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Modules compiled by cranelift.
    pub compiled: u64,
    /// Modules loaded from precompiled artifacts on disk.
    pub from_disk: u64,
    /// Loads answered from the in-memory cache.
    pub from_memory: u64,
}

/// The plugin host: one wasmtime engine, the linker with weir's imports, and the module caches.
pub struct Host {
    engine: Engine,
    linker: Linker<StoreState>,
    disk: Option<DiskCache>,
    modules: Mutex<HashMap<String, Module>>,
    compiled: AtomicU64,
    from_disk: AtomicU64,
    from_memory: AtomicU64,
}

impl Host {
    /// A host caching precompiled modules in `cache_dir` (created if missing), or only in
    /// memory when `None` or when the directory cannot be created.
    pub fn new(cache_dir: Option<&Path>) -> Result<Host, Error> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // For profiling plugins with `perf`: name the compiled functions in /tmp/perf-PID.map.
        if std::env::var_os("WEIR_PLUGIN_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let linker = weir_linker(&engine)?;
        let disk = cache_dir.and_then(|dir| match DiskCache::open(dir) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "plugin cache directory unusable, compiling in memory only: {e}");
                None
            }
        });
        Ok(Host {
            engine,
            linker,
            disk,
            modules: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            from_disk: AtomicU64::new(0),
            from_memory: AtomicU64::new(0),
        })
    }

    /// `$WEIR_PLUGIN_CACHE`, else `$XDG_CACHE_HOME/weir/plugins`, else `~/.cache/weir/plugins`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("WEIR_PLUGIN_CACHE") {
            return Some(PathBuf::from(d));
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(d).join("weir/plugins"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/weir/plugins"))
    }

    pub fn stats(&self) -> HostStats {
        HostStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            from_disk: self.from_disk.load(Ordering::Relaxed),
            from_memory: self.from_memory.load(Ordering::Relaxed),
        }
    }

    /// Load the plugin module at `path` (a `.wasm` file).
    pub fn load(&self, path: &Path, options: PluginOptions) -> Result<Plugin, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut options = options;
        if options.name.is_none() {
            options.name = Some(
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string()),
            );
        }
        self.load_bytes(&bytes, options)
    }

    /// Load a plugin module from its bytes: compile (or fetch from the caches), check its
    /// imports, its ABI version and its exports, and run its `weir_init` once with the config so
    /// that a bad config is reported now rather than at the first batch.
    pub fn load_bytes(&self, wasm: &[u8], options: PluginOptions) -> Result<Plugin, Error> {
        let name = options.name.clone().unwrap_or_else(|| "plugin".to_string());
        let module = self.module(&name, wasm)?;
        check_imports(&name, &module)?;
        let exports = Exports::of(&module);
        exports.require(&name, "memory", "a memory")?;
        exports.require(&name, "weir_abi_version", "a function () -> i32")?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| Error::Start {
                name: name.clone(),
                message: format!("{e:#}"),
            })?;
        let has_init = exports.has("weir_init");
        let inner = Arc::new(PluginInner {
            name: Arc::from(name.as_str()),
            pipeline: options.pipeline.as_deref().map(Arc::from),
            engine: self.engine.clone(),
            pre,
            config_json: serde_json::to_vec(&options.config).unwrap_or_else(|_| b"{}".to_vec()),
            has_init,
            limits: options.limits,
            log: options.log,
        });

        // The version comes first: a module of another ABI may have other exports altogether.
        let found = abi_version(&inner)?;
        if found != ABI_VERSION {
            return Err(Error::AbiVersion {
                name,
                found,
                supported: ABI_VERSION,
            });
        }
        exports.check_func(&name, "weir_abi_version", "() -> i32")?;
        exports.check_func(&name, "weir_alloc", "(i32) -> i32")?;
        exports.check_func(&name, "weir_process", "(i32, i32) -> i64")?;
        if has_init {
            exports.check_func(&name, "weir_init", "(i32, i32) -> i64")?;
        } else if !options.config.is_empty() {
            let keys: Vec<&str> = options.config.keys().map(String::as_str).collect();
            return Err(Error::ConfigNotAccepted {
                name,
                keys: keys.join(", "),
            });
        }
        let plugin = Plugin { inner };
        // Start one instance now: a trap in init or a rejected config fails the load.
        plugin.instance()?;
        Ok(plugin)
    }

    fn module(&self, name: &str, wasm: &[u8]) -> Result<Module, Error> {
        let key = cache::key(&self.engine, wasm);
        if let Some(m) = self.lock_modules().get(&key) {
            self.from_memory.fetch_add(1, Ordering::Relaxed);
            return Ok(m.clone());
        }
        let module = match self.disk.as_ref().and_then(|d| d.load(&self.engine, &key)) {
            Some(m) => {
                self.from_disk.fetch_add(1, Ordering::Relaxed);
                m
            }
            None => {
                let m = Module::new(&self.engine, wasm).map_err(|e| Error::Invalid {
                    name: name.to_string(),
                    message: format!("{e:#}"),
                })?;
                self.compiled.fetch_add(1, Ordering::Relaxed);
                if let Some(d) = &self.disk {
                    d.store(&key, &m);
                }
                m
            }
        };
        self.lock_modules().insert(key, module.clone());
        Ok(module)
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, HashMap<String, Module>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts).
        self.modules.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A loaded, checked plugin module. Cheap to clone; make one [`Instance`] per task.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

pub(crate) struct PluginInner {
    pub(crate) name: Arc<str>,
    pub(crate) pipeline: Option<Arc<str>>,
    pub(crate) engine: Engine,
    pub(crate) pre: InstancePre<StoreState>,
    pub(crate) config_json: Vec<u8>,
    pub(crate) has_init: bool,
    pub(crate) limits: Limits,
    pub(crate) log: LogSink,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// A new sandboxed instance, initialised with the plugin's config.
    pub fn instance(&self) -> Result<Instance, Error> {
        Instance::start(self.inner.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// store state: limits, weir's imports
// ---------------------------------------------------------------------------------------------

pub(crate) struct StoreState {
    pub(crate) limiter: MemoryLimiter,
    plugin: Arc<str>,
    pipeline: Option<Arc<str>>,
    log: LogSink,
    max_log_lines: u32,
    max_log_bytes: usize,
    logs_in_call: u32,
    logs_dropped: u32,
    /// The message the module passed to `weir.panic` during the current call.
    pub(crate) panic_message: Option<String>,
}

impl StoreState {
    pub(crate) fn new(inner: &PluginInner) -> StoreState {
        StoreState {
            limiter: MemoryLimiter {
                max_bytes: inner.limits.max_memory_bytes,
                denied: None,
            },
            plugin: inner.name.clone(),
            pipeline: inner.pipeline.clone(),
            log: inner.log.clone(),
            max_log_lines: inner.limits.max_log_lines_per_call,
            max_log_bytes: inner.limits.max_log_line_bytes,
            logs_in_call: 0,
            logs_dropped: 0,
            panic_message: None,
        }
    }

    /// Reset the per-call state before a call into the module.
    pub(crate) fn begin_call(&mut self) {
        self.logs_in_call = 0;
        self.logs_dropped = 0;
        self.panic_message = None;
        self.limiter.denied = None;
    }

    /// After a call: report log lines dropped by the per-call cap.
    pub(crate) fn end_call(&mut self) {
        if self.logs_dropped > 0 {
            let msg = format!(
                "{} more log line(s) from this call dropped (at most {} per call)",
                self.logs_dropped, self.max_log_lines
            );
            self.emit(level::WARN, &msg);
            self.logs_dropped = 0;
        }
    }

    fn emit(&self, lvl: u32, message: &str) {
        let plugin = &*self.plugin;
        let pipeline = self.pipeline.as_deref();
        match &self.log {
            LogSink::Callback(f) => f(&LogLine {
                plugin,
                pipeline,
                level: lvl,
                message,
            }),
            LogSink::Tracing => {
                let pipeline = pipeline.unwrap_or("-");
                match lvl {
                    level::ERROR => {
                        tracing::error!(target: "weir::plugin", plugin, pipeline, "{message}")
                    }
                    level::WARN => {
                        tracing::warn!(target: "weir::plugin", plugin, pipeline, "{message}")
                    }
                    level::DEBUG => {
                        tracing::debug!(target: "weir::plugin", plugin, pipeline, "{message}")
                    }
                    level::TRACE => {
                        tracing::trace!(target: "weir::plugin", plugin, pipeline, "{message}")
                    }
                    _ => tracing::info!(target: "weir::plugin", plugin, pipeline, "{message}"),
                }
            }
        }
    }
}

/// Caps an instance's linear memory and remembers a refused growth, to name the cause when the
/// module then traps (Rust's allocator aborts when memory cannot grow).
pub(crate) struct MemoryLimiter {
    pub(crate) max_bytes: usize,
    pub(crate) denied: Option<usize>,
}

/// Tables are small in practice; this only stops a module from growing one without bound.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }
}

/// Bytes `[ptr, ptr + len)` of the caller's exported memory, at most `cap` of them.
fn guest_bytes(
    caller: &mut Caller<'_, StoreState>,
    ptr: u32,
    len: u32,
    cap: usize,
) -> wasmtime::Result<Vec<u8>> {
    let memory = caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::format_err!("the module has no exported memory"))?;
    let data = memory.data(&caller);
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| {
            wasmtime::format_err!(
                "the message at {ptr}+{len} lies outside the module's memory ({} bytes)",
                data.len()
            )
        })?;
    Ok(data[start..end.min(start + cap)].to_vec())
}

fn weir_linker(engine: &Engine) -> Result<Linker<StoreState>, Error> {
    let mut linker = Linker::new(engine);
    linker
        .func_wrap(
            "weir",
            "log",
            |mut caller: Caller<'_, StoreState>,
             lvl: u32,
             ptr: u32,
             len: u32|
             -> wasmtime::Result<()> {
                let st = caller.data();
                if st.logs_in_call >= st.max_log_lines {
                    caller.data_mut().logs_dropped += 1;
                    return Ok(());
                }
                let cap = st.max_log_bytes;
                let bytes = guest_bytes(&mut caller, ptr, len, cap)
                    .map_err(|e| wasmtime::format_err!("weir.log: {e}"))?;
                let mut message = String::from_utf8_lossy(&bytes).into_owned();
                if len as usize > cap {
                    message.push_str(&format!(" … ({} more bytes cut)", len as usize - cap));
                }
                let st = caller.data_mut();
                st.logs_in_call += 1;
                st.emit(lvl, &message);
                Ok(())
            },
        )
        .map_err(|e| Error::Engine(format!("{e:#}")))?;
    linker
        .func_wrap(
            "weir",
            "panic",
            |mut caller: Caller<'_, StoreState>, ptr: u32, len: u32| -> wasmtime::Result<()> {
                let bytes = guest_bytes(&mut caller, ptr, len, 4096)
                    .map_err(|e| wasmtime::format_err!("weir.panic: {e}"))?;
                caller.data_mut().panic_message =
                    Some(String::from_utf8_lossy(&bytes).into_owned());
                Ok(())
            },
        )
        .map_err(|e| Error::Engine(format!("{e:#}")))?;
    Ok(linker)
}

// ---------------------------------------------------------------------------------------------
// checks
// ---------------------------------------------------------------------------------------------

/// `(i32, i32) -> i64` and the like.
fn signature(ft: &FuncType) -> String {
    fn name(t: &ValType) -> &'static str {
        match t {
            ValType::I32 => "i32",
            ValType::I64 => "i64",
            ValType::F32 => "f32",
            ValType::F64 => "f64",
            ValType::V128 => "v128",
            ValType::Ref(_) => "ref",
            #[allow(unreachable_patterns)]
            _ => "other",
        }
    }
    let params: Vec<&str> = ft.params().map(|t| name(&t)).collect();
    let results: Vec<&str> = ft.results().map(|t| name(&t)).collect();
    let results = match results.len() {
        0 => "()".to_string(),
        1 => results[0].to_string(),
        _ => format!("({})", results.join(", ")),
    };
    format!("({}) -> {results}", params.join(", "))
}

fn extern_kind(t: &ExternType) -> String {
    match t {
        ExternType::Func(ft) => format!("a function {}", signature(ft)),
        ExternType::Global(_) => "a global".to_string(),
        ExternType::Table(_) => "a table".to_string(),
        ExternType::Memory(_) => "a memory".to_string(),
        #[allow(unreachable_patterns)]
        _ => "an entity of another kind".to_string(),
    }
}

fn check_imports(name: &str, module: &Module) -> Result<(), Error> {
    for import in module.imports() {
        let expected = match (import.module(), import.name()) {
            ("weir", "log") => "(i32, i32, i32) -> ()",
            ("weir", "panic") => "(i32, i32) -> ()",
            _ => {
                return Err(Error::UnknownImport {
                    name: name.to_string(),
                    module: import.module().to_string(),
                    field: import.name().to_string(),
                    kind: extern_kind(&import.ty()),
                })
            }
        };
        let found = match import.ty() {
            ExternType::Func(ft) => signature(&ft),
            other => extern_kind(&other),
        };
        if found != expected {
            return Err(Error::ImportType {
                name: name.to_string(),
                field: import.name().to_string(),
                found,
                expected: format!("a function {expected}"),
            });
        }
    }
    Ok(())
}

struct Exports {
    types: HashMap<String, ExternType>,
}

impl Exports {
    fn of(module: &Module) -> Exports {
        Exports {
            types: module
                .exports()
                .map(|e| (e.name().to_string(), e.ty()))
                .collect(),
        }
    }

    fn has(&self, export: &str) -> bool {
        self.types.contains_key(export)
    }

    fn require(&self, name: &str, export: &str, expected: &str) -> Result<(), Error> {
        let Some(ty) = self.types.get(export) else {
            return Err(Error::MissingExport {
                name: name.to_string(),
                export: export.to_string(),
                expected: expected.to_string(),
            });
        };
        let ok = match ty {
            ExternType::Memory(_) => expected == "a memory",
            ExternType::Func(_) => expected.starts_with("a function"),
            _ => false,
        };
        if !ok {
            return Err(Error::ExportType {
                name: name.to_string(),
                export: export.to_string(),
                found: extern_kind(ty),
                expected: expected.to_string(),
            });
        }
        Ok(())
    }

    fn check_func(&self, name: &str, export: &str, sig: &str) -> Result<(), Error> {
        let expected = format!("a function {sig}");
        self.require(name, export, &expected)?;
        if let Some(ExternType::Func(ft)) = self.types.get(export) {
            let found = signature(ft);
            if found != sig {
                return Err(Error::ExportType {
                    name: name.to_string(),
                    export: export.to_string(),
                    found: format!("a function {found}"),
                    expected,
                });
            }
        }
        Ok(())
    }
}

/// Instantiate once and ask the module for its ABI version.
fn abi_version(inner: &Arc<PluginInner>) -> Result<u32, Error> {
    let mut store = Store::new(&inner.engine, StoreState::new(inner));
    store.limiter(|s| &mut s.limiter);
    let fail = |message: String| Error::Start {
        name: inner.name.to_string(),
        message,
    };
    store
        .set_fuel(inner.limits.fuel_init)
        .map_err(|e| fail(format!("{e:#}")))?;
    let instance = inner.pre.instantiate(&mut store).map_err(|e| {
        fail(crate::instance::classify(store.data(), &e, inner.limits.fuel_init).message)
    })?;
    let f = instance
        .get_typed_func::<(), u32>(&mut store, "weir_abi_version")
        .map_err(|_| Error::ExportType {
            name: inner.name.to_string(),
            export: "weir_abi_version".into(),
            found: "a function of another type".into(),
            expected: "a function () -> i32".into(),
        })?;
    f.call(&mut store, ()).map_err(|e| {
        fail(crate::instance::classify(store.data(), &e, inner.limits.fuel_init).message)
    })
}
