//! `weir plugin`: the plugin author's loop. `new` scaffolds a plugin crate, `build` compiles it
//! to WebAssembly, `test` runs a module offline over sample records and prints what comes out
//! (and what would go to the dead letters), `bench` measures a module's records/s in isolation.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use weir_wasm::{Header, Host, Limits, LogSink, PluginOptions, Record};

use crate::now_ms;
use crate::pipeline::transform::Transforms;
use weir_connectors::Record as PipelineRecord;

const WASM_TARGET: &str = "wasm32-unknown-unknown";

#[derive(clap::Subcommand)]
pub enum PluginCommand {
    /// Create a new plugin crate (a map, filter or flat-map using weir-plugin-sdk).
    New(NewArgs),
    /// Build a plugin crate (or a workspace of them) to .wasm.
    Build(BuildArgs),
    /// Run a plugin offline over sample records; print its output and dead letters.
    Test(TestArgs),
    /// Measure a plugin's throughput in isolation (records/s over 100-byte records).
    Bench(BenchArgs),
}

pub fn run(cmd: PluginCommand) -> Result<()> {
    match cmd {
        PluginCommand::New(a) => new(a),
        PluginCommand::Build(a) => build(a).map(|_| ()),
        PluginCommand::Test(a) => test(a),
        PluginCommand::Bench(a) => bench(a),
    }
}

// ---------------------------------------------------------------------------------------------
// new
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Map,
    Filter,
    FlatMap,
}

#[derive(clap::Args)]
pub struct NewArgs {
    /// Crate name (letters, digits, '-' and '_'; starts with a letter).
    pub name: String,
    /// Directory to create [default: ./NAME]
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// The kind of transform to start from.
    #[arg(long, value_enum, default_value = "map")]
    pub kind: Kind,
    /// Path of the weir-plugin-sdk crate [default: found when run inside the weir repository]
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

fn new(a: NewArgs) -> Result<()> {
    let name = a.name.as_str();
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!("invalid plugin name '{name}': use letters, digits, '-' and '_', starting with a letter");
    }
    let dir = a.path.clone().unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} already exists and is not empty", dir.display());
    }
    let sdk = match &a.sdk {
        Some(p) => {
            let p = p
                .canonicalize()
                .with_context(|| format!("--sdk {}", p.display()))?;
            if !is_sdk(&p) {
                bail!(
                    "{} is not the weir-plugin-sdk crate (no Cargo.toml naming it)",
                    p.display()
                );
            }
            Some(p)
        }
        None => find_sdk(&std::env::current_dir()?),
    };
    let dep = match &sdk {
        Some(p) => format!(
            "weir-plugin-sdk = {{ path = {:?} }}",
            p.display().to_string()
        ),
        None => "weir-plugin-sdk = \"0.1\"".to_string(),
    };
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(dir.join("Cargo.toml"), cargo_toml(name, &dep))?;
    std::fs::write(dir.join("src/lib.rs"), lib_rs(name, a.kind))?;
    std::fs::write(dir.join("sample.ndjson"), SAMPLE)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    let wasm = format!(
        "target/{WASM_TARGET}/release/{}.wasm",
        name.replace('-', "_")
    );
    println!(
        "created plugin crate {} ({})",
        dir.display(),
        kind_name(a.kind)
    );
    if sdk.is_none() {
        println!(
            "note: weir-plugin-sdk was not found (run this inside the weir repository or pass \
             --sdk PATH); Cargo.toml asks for version 0.1 from the registry, edit it to point at \
             your copy of plugins-sdk/"
        );
    }
    println!("next:");
    println!("  cd {} && cargo test", dir.display());
    println!("  weir plugin build");
    println!("  weir plugin test {wasm} --input sample.ndjson --config prefix=hello");
    Ok(())
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Map => "map",
        Kind::Filter => "filter",
        Kind::FlatMap => "flat-map",
    }
}

fn is_sdk(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .map(|t| t.contains("name = \"weir-plugin-sdk\""))
        .unwrap_or(false)
}

/// `plugins-sdk/` of the weir checkout that `start` is in, if any.
fn find_sdk(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join("plugins-sdk"))
        .find(|d| is_sdk(d))
        .and_then(|d| d.canonicalize().ok())
}

fn cargo_toml(name: &str, dep: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the .wasm module; rlib: so that `cargo test` runs the unit tests natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
{dep}

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"

# A crate of its own, even when created inside another Cargo workspace.
[workspace]
"#
    )
}

const SAMPLE: &str = r#"{"key": "k1", "value": "hello world"}
{"key": "k2", "value": "second record", "headers": {"source": "sample"}}
{"value": "skip me"}
"#;

fn lib_rs(name: &str, kind: Kind) -> String {
    let (doc, body, export, tests) = match kind {
        Kind::Map => (
            "a map: prefixes each value with the `prefix` setting and upper-cases it",
            r#"fn transform(mut record: Record) -> Result<Record, Error> {
    let text = record.value_str()?;
    let out = format!("{}{}", PREFIX.get()?, text.to_uppercase());
    record.value = Some(out.into_bytes());
    Ok(record)
}"#,
            "weir_plugin_sdk::export_map!(transform, init = init);",
            r#"    #[test]
    fn upper_cases_and_reports_non_text() {
        let out = testing::run_map(transform, &[Record::new("abc"), Record::new(vec![0xff])]);
        assert_eq!(testing::records(&out)[0].value_str().unwrap(), "ABC");
        assert_eq!(testing::errors(&out)[0].0, 1);
    }"#,
        ),
        Kind::Filter => (
            "a filter: keeps the records whose value does not start with `skip`",
            r#"fn transform(record: &Record) -> Result<bool, Error> {
    Ok(!record.value_str()?.starts_with("skip"))
}"#,
            "weir_plugin_sdk::export_filter!(transform, init = init);",
            r#"    #[test]
    fn drops_skip_records() {
        let out = testing::run_filter(transform, &[Record::new("keep"), Record::new("skip me")]);
        assert_eq!(testing::records(&out).len(), 1);
        assert_eq!(out[0].input_index, 0);
    }"#,
        ),
        Kind::FlatMap => (
            "a flat-map: one record per word of the value",
            r#"fn transform(record: Record) -> Result<Vec<Record>, Error> {
    let words: Vec<String> = record.value_str()?.split_whitespace().map(str::to_string).collect();
    Ok(words
        .into_iter()
        .map(|w| record.clone().with_value(w.into_bytes()))
        .collect())
}"#,
            "weir_plugin_sdk::export_flat_map!(transform, init = init);",
            r#"    #[test]
    fn splits_words() {
        let out = testing::run_flat_map(transform, &[Record::new("a b c"), Record::new("")]);
        assert_eq!(testing::records(&out).len(), 3);
        assert!(out.iter().all(|e| e.input_index == 0));
    }"#,
        ),
    };
    format!(
        r##"//! {name}: a weir transform plugin, {doc}.
//!
//! `cargo test` runs the unit tests natively; `weir plugin build` makes the .wasm module;
//! `weir plugin test <module.wasm> --input sample.ndjson` runs it over sample records.

use weir_plugin_sdk::{{Config, Error, Record, State}};

/// Settings read once by `init` from the pipeline's `config:` map.
static PREFIX: State<String> = State::new();

fn init(config: &Config) -> Result<(), Error> {{
    let prefix = config.str("prefix")?.unwrap_or("").to_string();
    weir_plugin_sdk::info!("starting, prefix {{prefix:?}}");
    PREFIX.set(prefix);
    Ok(())
}}

{body}

{export}

#[cfg(test)]
mod tests {{
    use super::*;
    use weir_plugin_sdk::testing;

{tests}

    #[test]
    fn init_rejects_a_non_string_prefix() {{
        assert!(testing::init(init, r#"{{"prefix": 3}}"#).is_err());
    }}
}}
"##
    )
}

// ---------------------------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toolchain {
    /// rustup's wasm32-unknown-unknown target if installed (or installable), else Debian's.
    Auto,
    /// The default rustc/cargo with the wasm32-unknown-unknown target installed.
    Rustup,
    /// Debian's rustc-web/cargo-web with -Zbuild-std (see docs/plugins.md).
    Debian,
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The plugin crate, or a workspace of plugin crates [default: .]
    pub dir: Option<PathBuf>,
    /// Copy the built .wasm files into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Build without optimisations (the debug profile).
    #[arg(long)]
    pub debug: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub toolchain: Toolchain,
}

/// Debian's Rust for WebAssembly (packages rustc-web, cargo-web, rust-web-src).
struct DebianRust {
    cargo: PathBuf,
    rustc: PathBuf,
}

fn debian_rust() -> Option<DebianRust> {
    let cargo = PathBuf::from("/usr/bin/cargo");
    let rustc = PathBuf::from("/usr/bin/rustc");
    if !cargo.is_file() || !rustc.is_file() {
        return None;
    }
    let sysroot = command_output(Command::new(&rustc).args(["--print", "sysroot"]))?;
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library");
    src.is_dir().then_some(DebianRust { cargo, rustc })
}

fn command_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the default rustc has a standard library for the wasm target.
fn rustup_target_installed() -> bool {
    command_output(Command::new("rustc").args([
        "--print",
        "target-libdir",
        "--target",
        WASM_TARGET,
    ]))
    .map(|dir| {
        std::fs::read_dir(dir.trim())
            .map(|mut it| {
                it.any(|e| {
                    e.map(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    })
    .unwrap_or(false)
}

fn try_rustup_target_add() -> bool {
    eprintln!(
        "the {WASM_TARGET} target is not installed; trying `rustup target add {WASM_TARGET}`"
    );
    let Ok(mut child) = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success() && rustup_target_installed(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// A linker for wasm32 when building with Debian's rustc, which ships none: rustup's rust-lld,
/// else wasm-ld or rust-lld on PATH.
fn wasm_linker() -> Option<PathBuf> {
    if let Some(sysroot) = command_output(Command::new("rustc").args(["--print", "sysroot"])) {
        let lld =
            Path::new(sysroot.trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld");
        if lld.is_file() {
            return Some(lld);
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("wasm-ld"), d.join("rust-lld")])
        .find(|p| p.is_file())
}

/// Build the crate or workspace at `dir`; returns the .wasm files (copied to `--out` if given).
pub fn build(a: BuildArgs) -> Result<Vec<PathBuf>> {
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    if !dir.join("Cargo.toml").is_file() {
        bail!(
            "no Cargo.toml in {}: give the directory of a plugin crate",
            dir.display()
        );
    }
    let use_rustup = match a.toolchain {
        Toolchain::Rustup => {
            if !rustup_target_installed() && !try_rustup_target_add() {
                bail!("the {WASM_TARGET} target is not installed for rustc and `rustup target add {WASM_TARGET}` failed");
            }
            true
        }
        Toolchain::Debian => false,
        Toolchain::Auto => rustup_target_installed() || try_rustup_target_add(),
    };
    let mut cmd = if use_rustup {
        let mut c = Command::new("cargo");
        c.arg("build");
        c
    } else {
        let Some(deb) = debian_rust() else {
            bail!(
                "no Rust toolchain for {WASM_TARGET}: either `rustup target add {WASM_TARGET}`, or \
                 install Debian's packages rustc-web cargo-web rust-web-src (apt-get install \
                 rustc-web cargo-web rust-web-src) for the -Zbuild-std route; see docs/plugins.md"
            );
        };
        let linker = wasm_linker().ok_or_else(|| {
            anyhow!("no linker for {WASM_TARGET}: need rustup's rust-lld, or wasm-ld on PATH (Debian package lld)")
        })?;
        eprintln!(
            "building with Debian's {} and -Zbuild-std (linker {})",
            deb.rustc.display(),
            linker.display()
        );
        let mut c = Command::new(&deb.cargo);
        c.arg("build")
            .arg("-Zbuild-std=std,panic_abort")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTC", &deb.rustc)
            .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", linker)
            // rustup's proxies must not redirect Debian's cargo to another toolchain
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTDOC")
            .env_remove("RUSTC_WRAPPER");
        c
    };
    if !a.debug {
        cmd.arg("--release");
    }
    cmd.args([
        "--target",
        WASM_TARGET,
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(&dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting cargo")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut wasm = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" {
            if let Some(files) = msg["filenames"].as_array() {
                wasm.extend(
                    files
                        .iter()
                        .filter_map(Value::as_str)
                        .filter(|f| f.ends_with(".wasm"))
                        .map(PathBuf::from),
                );
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    if wasm.is_empty() {
        bail!(
            "the build produced no .wasm module: does the crate have crate-type = [\"cdylib\"] in [lib]?"
        );
    }
    let mut result = Vec::new();
    for f in wasm {
        let f = match &a.out {
            Some(out) => {
                std::fs::create_dir_all(out)?;
                let dest = out.join(f.file_name().context("artifact name")?);
                std::fs::copy(&f, &dest)
                    .with_context(|| format!("copying {} to {}", f.display(), dest.display()))?;
                dest
            }
            None => f,
        };
        let size = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        println!("{} ({} KiB)", f.display(), size.div_ceil(1024));
        result.push(f);
    }
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// test
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// One JSON object per line: key, value, headers, timestamp, topic, partition, offset.
    Records,
    /// Each line is the value of one record (no key, no headers).
    Lines,
}

#[derive(clap::Args, Clone)]
pub struct PluginRunArgs {
    /// Plugin config entry KEY=VALUE (repeatable); VALUE is JSON if it parses as JSON, else a string.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// Plugin config as a JSON object in a file (entries from --config win).
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Records per call into the plugin.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Memory cap of the instance, MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mb: usize,
    /// CPU budget per record, in fuel units (~ WebAssembly instructions).
    #[arg(long)]
    pub fuel_per_record: Option<u64>,
    /// Do not read or write precompiled modules in the plugin cache directory.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(clap::Args)]
pub struct TestArgs {
    /// The plugin module (.wasm).
    pub plugin: PathBuf,
    /// Sample records, one per line ("-" for stdin).
    #[arg(long, short = 'i')]
    pub input: PathBuf,
    #[arg(long, value_enum, default_value = "records")]
    pub input_format: InputFormat,
    /// Exit with status 1 when any record is dead-lettered.
    #[arg(long)]
    pub fail_on_dead_letter: bool,
    #[command(flatten)]
    pub run: PluginRunArgs,
}

fn plugin_config(a: &PluginRunArgs) -> Result<Map<String, Value>> {
    let mut config = Map::new();
    if let Some(path) = &a.config_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --config-file {}", path.display()))?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => config = m,
            Ok(_) => bail!("--config-file {}: not a JSON object", path.display()),
            Err(e) => bail!("--config-file {}: {e}", path.display()),
        }
    }
    for entry in &a.config {
        let Some((k, v)) = entry.split_once('=') else {
            bail!("--config {entry:?}: expected KEY=VALUE");
        };
        if k.is_empty() {
            bail!("--config {entry:?}: empty key");
        }
        let value =
            serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()));
        config.insert(k.to_string(), value);
    }
    Ok(config)
}

fn load_plugin(path: &Path, a: &PluginRunArgs, log: LogSink) -> Result<(Host, weir_wasm::Plugin)> {
    let cache = if a.no_cache {
        None
    } else {
        Host::default_cache_dir()
    };
    let host = Host::new(cache.as_deref())?;
    let mut limits = Limits {
        max_memory_bytes: a.memory_mb.saturating_mul(1 << 20),
        ..Limits::default()
    };
    if let Some(f) = a.fuel_per_record {
        limits.fuel_per_record = f;
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let plugin = host.load(
        path,
        PluginOptions {
            config: plugin_config(a)?,
            limits,
            log,
            ..PluginOptions::default()
        },
    )?;
    Ok((host, plugin))
}

/// Bytes from a JSON field: a string is taken as UTF-8 text, null as null, anything else as
/// its compact JSON text.
fn json_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone().into_bytes()),
        other => Some(other.to_string().into_bytes()),
    }
}

fn parse_record(line: &str) -> Result<Record> {
    let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("not JSON: {e}"))?;
    let Value::Object(obj) = v else {
        bail!(
            "expected a JSON object with key/value/headers/timestamp (or use --input-format lines)"
        );
    };
    let mut r = Record::new(Vec::new());
    r.value = None;
    r.timestamp = now_ms();
    for (k, v) in obj {
        match k.as_str() {
            "key" => r.key = json_bytes(&v),
            "value" => r.value = json_bytes(&v),
            "timestamp" => r.timestamp = v.as_i64().ok_or_else(|| anyhow!("timestamp must be an integer (ms)"))?,
            "topic" => r.topic = v.as_str().map(str::to_string),
            "partition" => {
                r.partition = Some(
                    v.as_i64()
                        .and_then(|p| i32::try_from(p).ok())
                        .filter(|p| *p >= 0)
                        .ok_or_else(|| anyhow!("partition must be a non-negative integer"))?,
                )
            }
            "offset" => {
                r.offset = Some(
                    v.as_i64()
                        .filter(|o| *o >= 0)
                        .ok_or_else(|| anyhow!("offset must be a non-negative integer"))?,
                )
            }
            "headers" => r.headers = parse_headers(&v)?,
            other => bail!(
                "unknown field `{other}` (expected key, value, headers, timestamp, topic, partition, \
                 offset; use --input-format lines to take each line as a value)"
            ),
        }
    }
    Ok(r)
}

fn parse_headers(v: &Value) -> Result<Vec<Header>> {
    let header = |name: &str, v: &Value| Header {
        name: name.to_string(),
        value: json_bytes(v),
    };
    match v {
        Value::Object(m) => Ok(m.iter().map(|(k, v)| header(k, v)).collect()),
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([Value::String(n), v]) => Ok(header(n, v)),
                _ => bail!("headers as a list must hold [name, value] pairs"),
            })
            .collect(),
        _ => bail!("headers must be an object or a list of [name, value] pairs"),
    }
}

fn read_input(path: &Path, format: InputFormat) -> Result<Vec<Record>> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --input {}", path.display()))?;
    }
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match format {
            InputFormat::Lines => records.push(Record::new(line).with_timestamp(now_ms())),
            InputFormat::Records => {
                if line.trim().is_empty() {
                    continue;
                }
                let r = parse_record(line)
                    .with_context(|| format!("{} line {}", path.display(), i + 1))?;
                records.push(r);
            }
        }
    }
    Ok(records)
}

fn bytes_json(b: &Option<Vec<u8>>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => json!({ "hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() }),
        },
    }
}

fn record_json(r: &Record) -> Value {
    let mut o = json!({
        "key": bytes_json(&r.key),
        "value": bytes_json(&r.value),
        "headers": r.headers.iter().map(|h| json!([h.name, bytes_json(&h.value)])).collect::<Vec<_>>(),
        "timestamp": r.timestamp,
    });
    if let Some(t) = &r.topic {
        o["topic"] = json!(t);
    }
    if let Some(p) = r.partition {
        o["partition"] = json!(p);
    }
    if let Some(off) = r.offset {
        o["offset"] = json!(off);
    }
    o
}

fn stderr_log_sink() -> LogSink {
    LogSink::Callback(Arc::new(|l| {
        eprintln!(
            "[plugin {}] {}: {}",
            l.plugin,
            level_name(l.level),
            l.message
        )
    }))
}

fn level_name(l: u32) -> &'static str {
    match l {
        1 => "error",
        2 => "warn",
        4 => "debug",
        5 => "trace",
        _ => "info",
    }
}

fn test(a: TestArgs) -> Result<()> {
    let records = read_input(&a.input, a.input_format)?;
    let (_host, plugin) = load_plugin(&a.plugin, &a.run, stderr_log_sink())?;
    let mut inst = plugin.instance()?;
    let started = Instant::now();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut produced, mut dead, mut batches) = (0usize, 0usize, 0usize);
    for (b, chunk) in records.chunks(a.run.batch_size).enumerate() {
        let base = b * a.run.batch_size;
        let result = inst.process_records(chunk)?;
        batches += 1;
        produced += result.records.len();
        dead += result.dead_letters.len();
        // in input order: a record's outputs, or its dead letter
        let mut lines: Vec<(usize, usize, Value)> = Vec::new();
        for (seq, p) in result.records.iter().enumerate() {
            lines.push((
                p.input_index,
                seq,
                json!({"input": base + p.input_index, "record": record_json(&p.record)}),
            ));
        }
        for d in &result.dead_letters {
            lines.push((
                d.input_index,
                usize::MAX,
                json!({"input": base + d.input_index, "dead_letter": {
                    "kind": d.fault.kind.as_str(),
                    "reason": d.fault.message,
                    "record": record_json(&chunk[d.input_index]),
                }}),
            ));
        }
        lines.sort_by_key(|(i, seq, _)| (*i, *seq));
        for (_, _, v) in lines {
            writeln!(out, "{v}")?;
        }
    }
    out.flush()?;
    eprintln!(
        "plugin {}: {} record(s) in, {produced} out, {dead} dead letter(s); {batches} batch(es), {} restart(s), {:.1} ms",
        plugin.name(),
        records.len(),
        inst.restarts(),
        started.elapsed().as_secs_f64() * 1e3
    );
    if a.fail_on_dead_letter && dead > 0 {
        bail!("{dead} record(s) went to the dead letters");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench
// ---------------------------------------------------------------------------------------------

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The plugin module (.wasm); a trivial map measures the plugin stage's own cost.
    pub plugin: PathBuf,
    /// Records to push through the plugin.
    #[arg(long, short = 'n', default_value_t = 2_000_000)]
    pub records: usize,
    /// Value size in bytes.
    #[arg(long, short = 's', default_value_t = 100)]
    pub record_size: usize,
    #[command(flatten)]
    pub run: PluginRunArgs,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn bench(a: BenchArgs) -> Result<()> {
    let (_host, plugin) = load_plugin(&a.plugin, &a.run, LogSink::Tracing)?;
    // The same stage a pipeline runs: pipeline records in, records sharing the module's output
    // out.
    let mut stage = Transforms::start("", std::slice::from_ref(&plugin))?;
    let batch_size = a.run.batch_size.min(a.records.max(1));
    let batch: Vec<PipelineRecord> = (0..batch_size)
        .map(|i| {
            let value: Vec<u8> = (0..a.record_size)
                .map(|j| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + j) % 36])
                .collect();
            PipelineRecord {
                key: None,
                value: Some(value.into()),
                headers: Vec::new(),
                timestamp: 1_700_000_000_000 + i as i64,
            }
        })
        .collect();
    // warm-up: grows the module's buffers and the caches
    stage.run(batch.clone(), None)?;
    let (mut done, mut produced, mut dead) = (0usize, 0usize, 0usize);
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    while done < a.records {
        let n = batch_size.min(a.records - done);
        let (out, rejected) = stage.run(batch[..n].to_vec(), None)?;
        produced += out.len();
        dead += rejected.len();
        done += n;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let rate = done as f64 / wall;
    println!(
        "plugin {}: {done} records of {} B in batches of {batch_size}",
        plugin.name(),
        a.record_size
    );
    println!(
        "  {:.0} records/s ({:.1} MB/s of values), {:.3} µs/record; {wall:.2} s wall, {cpu:.2} s CPU",
        rate,
        rate * a.record_size as f64 / 1e6,
        wall * 1e6 / done as f64,
    );
    println!(
        "  output: {produced} records, {dead} dead letters, {} restarts",
        stage.restarts()
    );
    Ok(())
}
