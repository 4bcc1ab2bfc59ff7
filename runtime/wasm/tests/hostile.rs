//! Hostile and broken plugin modules, written in WebAssembly text: each is contained, reported
//! with a clear message, and the host (and the same `Instance`) keeps working afterwards.

use std::sync::{Arc, Mutex};

use weir_wasm::{Error, FaultKind, Host, Limits, LogSink, Plugin, PluginOptions, Record};

/// A plugin that follows ABI version 1 by hand, without the SDK: it echoes every record (copying
/// its encoding into the output), and misbehaves on records whose value starts with a marker:
///
/// - `E`: returns an error entry for that record (a plugin error, not a crash)
/// - `P`: calls `weir.panic` with a message, then traps (what a Rust panic does)
/// - `L`: loops forever
/// - `M`: grows its memory by 1 MiB at a time until refused, then traps
/// - `S`: recurses without end
///
/// It logs one info line per call, so tests can count the calls. Input lives at 4096, output at
/// 32768: batches in these tests are small.
const ECHO: &str = r#"
(module
  (import "weir" "panic" (func $panic (param i32 i32)))
  (import "weir" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "hostile: panic requested")
  (data (i32.const 64) "hostile: error requested")
  (data (i32.const 128) "one call")
  (func (export "weir_abi_version") (result i32) (i32.const 1))
  (func (export "weir_alloc") (param $len i32) (result i32) (i32.const 4096))
  (func (export "weir_init") (param i32 i32) (result i64)
    (i32.store8 (i32.const 32768) (i32.const 0))
    (i64.or (i64.shl (i64.const 32768) (i64.const 32)) (i64.const 1)))
  ;; the position after the bytes? field at $p
  (func $skip (param $p i32) (result i32)
    (local $len i32)
    (local.set $len (i32.load (local.get $p)))
    (if (result i32) (i32.eq (local.get $len) (i32.const -1))
      (then (i32.add (local.get $p) (i32.const 4)))
      (else (i32.add (i32.add (local.get $p) (i32.const 4)) (local.get $len)))))
  (func $recurse (param $n i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get $n) (i32.const 1))) (i32.const 1)))
  (func $behave (param $c i32)
    (if (i32.eq (local.get $c) (i32.const 80))
      (then (call $panic (i32.const 16) (i32.const 24)) unreachable))
    (if (i32.eq (local.get $c) (i32.const 76))
      (then (loop $forever (br $forever))))
    (if (i32.eq (local.get $c) (i32.const 77))
      (then
        (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        unreachable))
    (if (i32.eq (local.get $c) (i32.const 83))
      (then (drop (call $recurse (i32.const 0))))))
  (func (export "weir_process") (param $ptr i32) (param $len i32) (result i64)
    (local $n i32) (local $i i32) (local $p i32) (local $start i32) (local $v i32)
    (local $first i32) (local $h i32) (local $o i32) (local $size i32)
    (call $log (i32.const 3) (i32.const 128) (i32.const 8))
    (local.set $n (i32.load (local.get $ptr)))
    (local.set $p (i32.add (local.get $ptr) (i32.const 4)))
    (i32.store8 (i32.const 32768) (i32.const 0))
    (local.set $o (i32.const 32773))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $start (local.get $p))
        (local.set $p (i32.add (local.get $p) (i32.const 20)))
        (local.set $p (call $skip (local.get $p)))
        (local.set $p (call $skip (local.get $p)))
        (local.set $v (local.get $p))
        (local.set $p (call $skip (local.get $p)))
        (local.set $h (i32.load (local.get $p)))
        (local.set $p (i32.add (local.get $p) (i32.const 4)))
        (block $hdone
          (loop $hnext
            (br_if $hdone (i32.eqz (local.get $h)))
            (local.set $p (call $skip (call $skip (local.get $p))))
            (local.set $h (i32.sub (local.get $h) (i32.const 1)))
            (br $hnext)))
        (local.set $first (i32.const 0))
        (if (i32.gt_s (i32.load (local.get $v)) (i32.const 0))
          (then (local.set $first (i32.load8_u (i32.add (local.get $v) (i32.const 4))))))
        (i32.store (local.get $o) (local.get $i))
        (if (i32.eq (local.get $first) (i32.const 69))
          (then
            (i32.store8 (i32.add (local.get $o) (i32.const 4)) (i32.const 1))
            (i32.store (i32.add (local.get $o) (i32.const 5)) (i32.const 24))
            (memory.copy (i32.add (local.get $o) (i32.const 9)) (i32.const 64) (i32.const 24))
            (local.set $o (i32.add (local.get $o) (i32.const 33))))
          (else
            (call $behave (local.get $first))
            (local.set $size (i32.sub (local.get $p) (local.get $start)))
            (i32.store8 (i32.add (local.get $o) (i32.const 4)) (i32.const 0))
            (memory.copy (i32.add (local.get $o) (i32.const 5)) (local.get $start) (local.get $size))
            (local.set $o (i32.add (i32.add (local.get $o) (i32.const 5)) (local.get $size)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (i32.const 32769) (local.get $n))
    (i64.or (i64.shl (i64.const 32768) (i64.const 32))
            (i64.extend_i32_u (i32.sub (local.get $o) (i32.const 32768))))))
"#;

/// The smallest module that passes every load check; `$body` is spliced in as extra fields.
fn minimal(version: i32, extra: &str) -> String {
    format!(
        r#"(module
          (memory (export "memory") 1)
          (func (export "weir_abi_version") (result i32) (i32.const {version}))
          (func (export "weir_alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "weir_process") (param i32 i32) (result i64)
            (i32.store8 (i32.const 0) (i32.const 0))
            (i32.store (i32.const 1) (i32.const 0))
            (i64.const 5))
          {extra})"#
    )
}

fn wasm(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("test module parses")
}

type Lines = Arc<Mutex<Vec<(u32, String)>>>;

fn options(limits: Limits) -> (PluginOptions, Lines) {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    let opts = PluginOptions {
        name: Some("hostile".into()),
        pipeline: Some("test-pipeline".into()),
        limits,
        log: LogSink::Callback(Arc::new(move |l| {
            sink.lock().unwrap().push((l.level, l.message.to_string()))
        })),
        ..PluginOptions::default()
    };
    (opts, lines)
}

fn small_limits() -> Limits {
    Limits {
        max_memory_bytes: 4 << 20,
        fuel_per_call: 2_000_000,
        fuel_per_record: 1_000_000,
        fuel_init: 10_000_000,
        ..Limits::default()
    }
}

fn echo(host: &Host) -> (Plugin, Lines) {
    let (opts, lines) = options(small_limits());
    let plugin = host.load_bytes(&wasm(ECHO), opts).expect("echo loads");
    (plugin, lines)
}

fn records(values: &[&str]) -> Vec<Record> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut r = Record::new(*v)
                .with_key(format!("k{i}"))
                .with_header("h", "x");
            r.topic = Some("in".into());
            r.partition = Some(2);
            r.offset = Some(100 + i as i64);
            r
        })
        .collect()
}

fn calls(lines: &Lines) -> usize {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m == "one call")
        .count()
}

/// Process `values`, then check that the same instance still handles a good batch.
fn run_and_recover(values: &[&str]) -> (weir_wasm::Output, weir_wasm::Instance, Lines) {
    let host = Host::new(None).unwrap();
    let (plugin, lines) = echo(&host);
    let mut inst = plugin.instance().unwrap();
    let out = inst.process_records(&records(values)).unwrap();
    let after = inst
        .process_records(&records(&["fine", "also fine"]))
        .unwrap();
    assert_eq!(
        after.records.len(),
        2,
        "the instance keeps working after a fault"
    );
    assert!(after.dead_letters.is_empty());
    (out, inst, lines)
}

fn values(out: &weir_wasm::Output) -> Vec<(usize, String)> {
    out.records
        .iter()
        .map(|p| (p.input_index, p.record.value_str().unwrap().to_string()))
        .collect()
}

#[test]
fn a_batch_is_one_call_and_records_round_trip() {
    let host = Host::new(None).unwrap();
    let (plugin, lines) = echo(&host);
    let mut inst = plugin.instance().unwrap();
    let input = records(&["a", "b", "c", ""]);
    let out = inst.process_records(&input).unwrap();
    assert_eq!(calls(&lines), 1);
    assert!(out.dead_letters.is_empty());
    let got: Vec<Record> = out.records.iter().map(|p| p.record.clone()).collect();
    assert_eq!(
        got, input,
        "topic, partition, offset, key, headers survive the trip"
    );
    assert_eq!(inst.restarts(), 0);
    assert_eq!(
        lines.lock().unwrap()[0].0,
        weir_plugin_sdk::abi::level::INFO
    );
}

#[test]
fn an_error_for_one_record_dead_letters_only_that_record_without_a_restart() {
    let (out, inst, lines) = run_and_recover(&["a", "Err", "c"]);
    assert_eq!(values(&out), vec![(0, "a".into()), (2, "c".into())]);
    assert_eq!(out.dead_letters.len(), 1);
    assert_eq!(out.dead_letters[0].input_index, 1);
    assert_eq!(out.dead_letters[0].fault.kind, FaultKind::PluginError);
    assert_eq!(
        out.dead_letters[0].fault.message,
        "hostile: error requested"
    );
    assert_eq!(inst.restarts(), 0);
    assert_eq!(
        calls(&lines),
        2,
        "no retry: the error was the plugin's answer"
    );
}

#[test]
fn a_panic_on_one_record_is_isolated_and_the_instance_replaced() {
    let (out, inst, lines) = run_and_recover(&["a", "b", "Panic", "d"]);
    assert_eq!(
        values(&out),
        vec![(0, "a".into()), (1, "b".into()), (3, "d".into())]
    );
    assert_eq!(out.dead_letters.len(), 1);
    let dl = &out.dead_letters[0];
    assert_eq!(dl.input_index, 2);
    assert_eq!(dl.fault.kind, FaultKind::Panic);
    assert!(
        dl.fault.message.contains("hostile: panic requested"),
        "{}",
        dl.fault
    );
    assert_eq!(
        inst.restarts(),
        2,
        "once after the batch, once after the record"
    );
    // the batch call, four single-record calls, then the good batch
    assert_eq!(calls(&lines), 1 + 4 + 1);
}

#[test]
fn an_endless_loop_exhausts_the_cpu_budget() {
    let (out, _, _) = run_and_recover(&["a", "Loop", "c"]);
    assert_eq!(values(&out), vec![(0, "a".into()), (2, "c".into())]);
    let dl = &out.dead_letters[0];
    assert_eq!((dl.input_index, dl.fault.kind), (1, FaultKind::CpuBudget));
    assert!(dl.fault.message.contains("CPU budget"), "{}", dl.fault);
}

#[test]
fn unbounded_memory_growth_hits_the_memory_cap() {
    let (out, _, _) = run_and_recover(&["Memory", "b"]);
    assert_eq!(values(&out), vec![(1, "b".into())]);
    let dl = &out.dead_letters[0];
    assert_eq!((dl.input_index, dl.fault.kind), (0, FaultKind::MemoryLimit));
    assert!(
        dl.fault
            .message
            .contains(&format!("limit of {} bytes", 4 << 20)),
        "{}",
        dl.fault
    );
}

#[test]
fn a_stack_overflow_is_contained() {
    let (out, _, _) = run_and_recover(&["Stack"]);
    assert!(out.records.is_empty());
    let dl = &out.dead_letters[0];
    assert_eq!(dl.fault.kind, FaultKind::StackOverflow);
    assert!(dl.fault.message.contains("stack"), "{}", dl.fault);
}

#[test]
fn several_bad_records_in_one_batch_each_get_their_own_reason() {
    let (out, _, _) = run_and_recover(&["Panic", "ok", "Loop", "Err", "Stack", "ok2"]);
    assert_eq!(values(&out), vec![(1, "ok".into()), (5, "ok2".into())]);
    let kinds: Vec<(usize, FaultKind)> = out
        .dead_letters
        .iter()
        .map(|d| (d.input_index, d.fault.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, FaultKind::Panic),
            (2, FaultKind::CpuBudget),
            (3, FaultKind::PluginError),
            (4, FaultKind::StackOverflow)
        ]
    );
}

fn load_err(text_or_bytes: &[u8], limits: Limits, config: serde_json::Value) -> String {
    let host = Host::new(None).unwrap();
    let (mut opts, _) = options(limits);
    if let serde_json::Value::Object(m) = config {
        opts.config = m;
    }
    match host.load_bytes(text_or_bytes, opts) {
        Ok(_) => panic!("the module loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_module_importing_wasi_is_refused() {
    let text = r#"(module
      (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1))"#;
    let e = load_err(&wasm(text), Limits::default(), serde_json::json!({}));
    assert!(e.contains("imports wasi_snapshot_preview1.fd_write"), "{e}");
    assert!(e.contains("no WASI"), "{e}");
}

#[test]
fn a_weir_import_of_the_wrong_type_is_refused() {
    let text = r#"(module (import "weir" "log" (func (param i64))) (memory (export "memory") 1))"#;
    let e = load_err(&wasm(text), Limits::default(), serde_json::json!({}));
    assert!(e.contains("imports weir.log as (i64) -> ()"), "{e}");
}

#[test]
fn another_abi_version_is_refused_with_both_versions_named() {
    let e = load_err(
        &wasm(&minimal(2, "")),
        Limits::default(),
        serde_json::json!({}),
    );
    assert!(e.contains("ABI version 2"), "{e}");
    assert!(e.contains("supports ABI version 1"), "{e}");
}

#[test]
fn malformed_modules_are_refused() {
    let e = load_err(
        b"definitely not wasm",
        Limits::default(),
        serde_json::json!({}),
    );
    assert!(e.contains("not a valid WebAssembly module"), "{e}");
    let good = wasm(&minimal(1, ""));
    let e = load_err(
        &good[..good.len() - 3],
        Limits::default(),
        serde_json::json!({}),
    );
    assert!(e.contains("not a valid WebAssembly module"), "{e}");
}

#[test]
fn missing_exports_are_named() {
    let e = load_err(
        &wasm(r#"(module (memory (export "memory") 1))"#),
        Limits::default(),
        serde_json::json!({}),
    );
    assert!(e.contains("does not export `weir_abi_version`"), "{e}");
    let text = r#"(module (memory (export "memory") 1)
      (func (export "weir_abi_version") (result i32) (i32.const 1)))"#;
    let e = load_err(&wasm(text), Limits::default(), serde_json::json!({}));
    assert!(e.contains("does not export `weir_alloc`"), "{e}");
}

#[test]
fn config_for_a_module_without_init_is_refused() {
    let e = load_err(
        &wasm(&minimal(1, "")),
        Limits::default(),
        serde_json::json!({"table": "x"}),
    );
    assert!(e.contains("takes no config") && e.contains("table"), "{e}");
}

#[test]
fn an_init_failure_is_reported_with_the_plugin_message() {
    let init = r#"(data (i32.const 2048) "\01\0b\00\00\00bad config!")
      (func (export "weir_init") (param i32 i32) (result i64)
        (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 16)))"#;
    let e = load_err(
        &wasm(&minimal(1, init)),
        Limits::default(),
        serde_json::json!({"k": 1}),
    );
    assert!(e.contains("init failed: bad config!"), "{e}");
}

#[test]
fn a_start_function_that_never_returns_fails_the_load() {
    let start = r#"(func $spin (loop $l (br $l))) (start $spin)"#;
    let e = load_err(
        &wasm(&minimal(1, start)),
        small_limits(),
        serde_json::json!({}),
    );
    assert!(
        e.contains("failed to start") && e.contains("CPU budget"),
        "{e}"
    );
}

#[test]
fn an_initial_memory_over_the_cap_fails_the_load() {
    let text = minimal(1, "").replace(
        r#"(memory (export "memory") 1)"#,
        r#"(memory (export "memory") 200)"#,
    );
    let e = load_err(&wasm(&text), small_limits(), serde_json::json!({}));
    assert!(e.contains("failed to start"), "{e}");
    assert!(e.contains("memory"), "{e}");
}

#[test]
fn output_outside_memory_or_malformed_is_a_bad_output_fault() {
    let host = Host::new(None).unwrap();
    for (process, what) in [
        ("(i64.const 0x7fff000000000010)", "outside the module's memory"),
        // status 0 and a count of 3 entries, but nothing after it
        (
            "(i32.store8 (i32.const 0) (i32.const 0)) (i32.store (i32.const 1) (i32.const 3)) (i64.const 5)",
            "malformed output",
        ),
        // one entry for input index 7 of a batch of one
        (
            "(i32.store8 (i32.const 0) (i32.const 0)) (i32.store (i32.const 1) (i32.const 1)) \
             (i32.store (i32.const 5) (i32.const 7)) (i32.store8 (i32.const 9) (i32.const 1)) \
             (i32.store (i32.const 10) (i32.const 0)) (i64.const 14)",
            "input 7 of a batch of 1",
        ),
    ] {
        let text = format!(
            r#"(module (memory (export "memory") 1)
              (func (export "weir_abi_version") (result i32) (i32.const 1))
              (func (export "weir_alloc") (param i32) (result i32) (i32.const 1024))
              (func (export "weir_process") (param i32 i32) (result i64) {process}))"#
        );
        let (opts, _) = options(small_limits());
        let plugin = host.load_bytes(&wasm(&text), opts).unwrap();
        let mut inst = plugin.instance().unwrap();
        let out = inst.process_records(&records(&["x"])).unwrap();
        assert!(out.records.is_empty());
        let dl = &out.dead_letters[0];
        assert_eq!(dl.fault.kind, FaultKind::BadOutput);
        assert!(dl.fault.message.contains(what), "{}", dl.fault);
    }
}

#[test]
fn log_floods_are_capped_per_call() {
    let text = r#"(module
      (import "weir" "log" (func $log (param i32 i32 i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "spam")
      (func (export "weir_abi_version") (result i32) (i32.const 1))
      (func (export "weir_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "weir_process") (param i32 i32) (result i64)
        (local $i i32)
        (loop $l
          (call $log (i32.const 3) (i32.const 100) (i32.const 4))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 1000))))
        (i32.store8 (i32.const 0) (i32.const 0))
        (i32.store (i32.const 1) (i32.const 0))
        (i64.const 5)))"#;
    let host = Host::new(None).unwrap();
    let (opts, lines) = options(Limits {
        max_log_lines_per_call: 10,
        ..small_limits()
    });
    let mut inst = host
        .load_bytes(&wasm(text), opts)
        .unwrap()
        .instance()
        .unwrap();
    inst.process_records(&records(&["x"])).unwrap();
    let lines = lines.lock().unwrap();
    assert_eq!(lines.iter().filter(|(_, m)| m == "spam").count(), 10);
    assert!(
        lines.last().unwrap().1.contains("990 more log line(s)"),
        "{:?}",
        lines.last()
    );
}

#[test]
fn a_log_call_pointing_outside_memory_traps_only_the_plugin() {
    let text = r#"(module
      (import "weir" "log" (func $log (param i32 i32 i32)))
      (memory (export "memory") 1)
      (func (export "weir_abi_version") (result i32) (i32.const 1))
      (func (export "weir_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "weir_process") (param i32 i32) (result i64)
        (call $log (i32.const 3) (i32.const 65530) (i32.const 100))
        (i64.const 0)))"#;
    let host = Host::new(None).unwrap();
    let (opts, _) = options(small_limits());
    let mut inst = host
        .load_bytes(&wasm(text), opts)
        .unwrap()
        .instance()
        .unwrap();
    let out = inst.process_records(&records(&["x"])).unwrap();
    let dl = &out.dead_letters[0];
    assert_eq!(dl.fault.kind, FaultKind::Trap);
    assert!(
        dl.fault.message.contains("outside the module's memory"),
        "{}",
        dl.fault
    );
}

#[test]
fn compiled_modules_are_cached_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = wasm(ECHO);
    let host = Host::new(Some(dir.path())).unwrap();
    host.load_bytes(&bytes, options(small_limits()).0).unwrap();
    host.load_bytes(&bytes, options(small_limits()).0).unwrap();
    let s = host.stats();
    assert_eq!((s.compiled, s.from_memory, s.from_disk), (1, 1, 0));
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_string_lossy().ends_with(".cwasm"));

    // a new host (as after a restart) loads the precompiled artifact instead of compiling
    let host2 = Host::new(Some(dir.path())).unwrap();
    let plugin = host2.load_bytes(&bytes, options(small_limits()).0).unwrap();
    assert_eq!(host2.stats().from_disk, 1);
    assert_eq!(host2.stats().compiled, 0);
    let out = plugin
        .instance()
        .unwrap()
        .process_records(&records(&["z"]))
        .unwrap();
    assert_eq!(values(&out), vec![(0, "z".into())]);

    // a damaged artifact is discarded and the module compiled again; damaging it in place while
    // `plugin` (loaded from it) is alive must not crash the process (no mapping of the file)
    std::fs::write(&files[0], b"garbage").unwrap();
    let host3 = Host::new(Some(dir.path())).unwrap();
    host3.load_bytes(&bytes, options(small_limits()).0).unwrap();
    assert_eq!((host3.stats().compiled, host3.stats().from_disk), (1, 0));
    assert!(std::fs::read(&files[0]).unwrap().len() > 100, "rewritten");
    let out = plugin
        .instance()
        .unwrap()
        .process_records(&records(&["still"]))
        .unwrap();
    assert_eq!(values(&out), vec![(0, "still".into())]);
}

#[test]
fn a_load_error_is_an_error_value_not_a_panic() {
    let host = Host::new(None).unwrap();
    let missing = std::path::Path::new("/nonexistent/plugin.wasm");
    match host.load(missing, PluginOptions::default()) {
        Err(Error::Read { path, .. }) => assert_eq!(path, missing),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("loaded a missing file"),
    }
}
