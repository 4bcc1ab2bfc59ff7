//! weir's WASM plugin host.
//!
//! A [`Host`] owns one wasmtime engine and a cache of compiled modules (in memory, and as
//! precompiled artifacts on disk so a restart does not compile again). [`Host::load`] checks a
//! plugin module (imports, exports, ABI version, its `init` with the given config) and returns a
//! [`Plugin`]; [`Plugin::instance`] makes a sandboxed [`Instance`], which a pipeline task keeps
//! and feeds batch after batch with [`Instance::process`].
//!
//! The sandbox: a module may import nothing but `weir.log` and `weir.panic` (no WASI: no files,
//! sockets, clocks or environment); each instance has a memory cap; each call has a CPU budget
//! (wasmtime fuel) proportional to the records in the batch. When a call traps, panics, runs out
//! of budget or memory, or returns malformed output, the instance is replaced by a fresh one and
//! the batch is retried record by record: the records that fail alone come back as
//! [`DeadLetter`]s with the reason, the others as output. Nothing a module does takes the
//! process down.
//!
//! The wire format between host and module is [`weir_plugin_sdk::abi`], documented for plugin
//! authors in docs/plugins.md.

mod cache;
mod instance;
mod plugin;

pub use instance::{DeadLetter, Fault, FaultKind, Instance, Output, Produced};
pub use plugin::{Host, HostStats, LogLine, LogSink, Plugin, PluginOptions};
pub use weir_plugin_sdk::abi;
pub use weir_plugin_sdk::abi::ABI_VERSION;
pub use weir_plugin_sdk::{Header, Record};

use std::path::PathBuf;

/// Resource limits of one plugin instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most linear memory an instance may have, in bytes.
    pub max_memory_bytes: usize,
    /// CPU budget of one `weir_process` call: `fuel_per_call + fuel_per_record × records`.
    /// Fuel counts executed WebAssembly operations (roughly instructions).
    pub fuel_per_call: u64,
    pub fuel_per_record: u64,
    /// CPU budget of instantiation plus `weir_init`.
    pub fuel_init: u64,
    /// Log lines kept per call; the rest are counted and reported in one line.
    pub max_log_lines_per_call: u32,
    /// Longer log messages are cut to this many bytes.
    pub max_log_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_memory_bytes: 64 << 20,
            fuel_per_call: 100_000_000,
            fuel_per_record: 10_000_000,
            fuel_init: 2_000_000_000,
            max_log_lines_per_call: 100,
            max_log_line_bytes: 4096,
        }
    }
}

/// Why a plugin could not be loaded or an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read plugin {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {name}: not a valid WebAssembly module: {message}")]
    Invalid { name: String, message: String },
    #[error(
        "plugin {name}: imports {module}.{field} ({kind}), which weir does not provide; a plugin \
         may import only weir.log and weir.panic (no WASI: no files, sockets, clocks or environment)"
    )]
    UnknownImport {
        name: String,
        module: String,
        field: String,
        kind: String,
    },
    #[error("plugin {name}: imports weir.{field} as {found}, but weir provides it as {expected}")]
    ImportType {
        name: String,
        field: String,
        found: String,
        expected: String,
    },
    #[error(
        "plugin {name}: does not export `{export}` ({expected}); is it a weir plugin built with \
         weir-plugin-sdk (weir_plugin_sdk::export_map! and friends)?"
    )]
    MissingExport {
        name: String,
        export: String,
        expected: String,
    },
    #[error("plugin {name}: exports `{export}` as {found}, expected {expected}")]
    ExportType {
        name: String,
        export: String,
        found: String,
        expected: String,
    },
    #[error(
        "plugin {name}: built for weir plugin ABI version {found}, but this weir supports ABI \
         version {supported} only; rebuild the plugin with a weir-plugin-sdk of this weir's ABI"
    )]
    AbiVersion {
        name: String,
        found: u32,
        supported: u32,
    },
    #[error("plugin {name}: does not export weir_init, so it takes no config, but config was given ({keys})")]
    ConfigNotAccepted { name: String, keys: String },
    #[error("plugin {name}: failed to start: {message}")]
    Start { name: String, message: String },
    #[error("plugin {name}: init failed: {message}")]
    Init { name: String, message: String },
    #[error("plugin host: {0}")]
    Engine(String),
}
