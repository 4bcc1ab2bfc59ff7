//! weir-bench: weir side by side with Redis Streams and NATS JetStream, and with the machine's
//! limits, on OpenMessaging-Benchmark-style workloads. See docs/benchmarks.md; `bench/run`
//! installs the peers, builds and runs this.

mod limits;
mod proc;
mod report;
mod systems;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use limits::LimitSettings;
use report::Row;
use systems::{Kind, Programs};
use workload::{Measurement, Settings, Workload, MIN_RECORD_SIZE};

#[derive(Parser)]
#[command(
    name = "weir-bench",
    args_override_self = true,
    about = "weir side by side with Redis Streams, NATS JetStream and the machine's limits"
)]
struct Args {
    /// A short run (about a second per phase, two workloads) that checks the suite works.
    #[arg(long)]
    smoke: bool,
    /// The weir binary [default: $CARGO_TARGET_DIR/release/weir, CARGO_TARGET_DIR defaulting to
    /// ~/.cache/weir/target].
    #[arg(long)]
    weir_bin: Option<PathBuf>,
    #[arg(long, default_value = "redis-server")]
    redis_bin: String,
    #[arg(long, default_value = "nats-server")]
    nats_bin: String,
    /// Scratch directory for the servers' data and the disk measurements (removed afterwards)
    /// [default: $TMPDIR/weir-bench-<pid>].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Systems to run, comma-separated: weir, redis, redis-aof-everysec, redis-aof-always,
    /// nats-jetstream [default: all].
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Workloads to run, comma-separated, e.g. 1p-100B-acks1,6p-100B-acksall-rf3 [default: the
    /// full suite, or the smoke suite with --smoke]. The *-acksall-rf3 workloads run weir alone,
    /// on a cluster of three nodes.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Seconds of the produce phase [default: 10; smoke 1].
    #[arg(long)]
    produce_secs: Option<f64>,
    /// Stop the produce phase earlier once this many MiB of values are written [default: 4096;
    /// smoke 32].
    #[arg(long)]
    max_produce_mib: Option<u64>,
    /// Seconds of the fixed-rate tail phase [default: 15; smoke 1].
    #[arg(long)]
    tail_secs: Option<f64>,
    /// Records per second in the tail phase (end-to-end latency below saturation).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Bytes of records per produce batch (a request, a pipeline, or a run of async publishes).
    #[arg(long, default_value_t = 256 * 1024)]
    batch_bytes: usize,
    /// Produce batches unacknowledged at a time.
    #[arg(long, default_value_t = 5)]
    in_flight: usize,
    /// Bytes per partition per consumer read.
    #[arg(long, default_value_t = 1 << 20)]
    fetch_bytes: usize,
    /// Run every measurement this many times (in rounds over the whole plan) and report the
    /// median run of each phase, with the range in the table. Runs during which other processes
    /// used more than 10% of a CPU are left out of the median when a quieter run exists.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Skip the machine-limit measurements.
    #[arg(long)]
    skip_limits: bool,
}

fn default_weir_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/weir/target")
        });
    target.join("release/weir")
}

fn settings(a: &Args) -> (Settings, LimitSettings) {
    let (produce, mib, tail) = if a.smoke {
        (1.0, 32, 1.0)
    } else {
        (10.0, 4096, 15.0)
    };
    let s = Settings {
        produce_secs: a.produce_secs.unwrap_or(produce),
        max_produce_bytes: a.max_produce_mib.unwrap_or(mib) << 20,
        tail_secs: a.tail_secs.unwrap_or(tail),
        rate: a.rate,
        batch_bytes: a.batch_bytes,
        in_flight: a.in_flight.max(1),
        fetch_bytes: a.fetch_bytes,
    };
    let l = if a.smoke {
        LimitSettings {
            dd_mib: 64,
            fsyncs: 50,
            loopback_secs: 0.5,
            pings: 200,
        }
    } else {
        LimitSettings {
            // As much as a produce phase may write: on a virtual disk the first GiB or two can
            // land in the host's cache far faster than the disk sustains.
            dd_mib: s.max_produce_bytes >> 20,
            fsyncs: 200,
            loopback_secs: 3.0,
            pings: 2000,
        }
    };
    (s, l)
}

fn select_workloads(a: &Args) -> Result<Vec<Workload>> {
    let mut all = Workload::full_suite();
    if a.workloads.is_empty() {
        return Ok(if a.smoke {
            Workload::smoke_suite()
        } else {
            all
        });
    }
    all.extend(Workload::smoke_suite());
    a.workloads
        .iter()
        .map(|name| {
            all.iter()
                .find(|w| w.name() == *name)
                .cloned()
                .with_context(|| {
                    let names: Vec<String> =
                        Workload::full_suite().iter().map(Workload::name).collect();
                    format!("unknown workload {name}; known: {}", names.join(", "))
                })
        })
        .collect()
}

fn select_systems(a: &Args) -> Result<Vec<Kind>> {
    if a.systems.is_empty() {
        return Ok(Kind::ALL.to_vec());
    }
    a.systems
        .iter()
        .map(|name| {
            Kind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .with_context(|| format!("unknown system {name}"))
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (settings, limit_settings) = settings(&args);
    let workloads = select_workloads(&args)?;
    let kinds = select_systems(&args)?;
    if workloads.iter().any(|w| w.record_size < MIN_RECORD_SIZE) {
        bail!("records must hold at least {MIN_RECORD_SIZE} bytes (send time and sequence)");
    }
    let programs = Programs {
        weir: args.weir_bin.clone().unwrap_or_else(default_weir_bin),
        redis: proc::find_program(&args.redis_bin)?,
        nats: proc::find_program(&args.nats_bin)?,
    };
    if kinds.contains(&Kind::Weir) && !programs.weir.is_file() {
        bail!(
            "no weir binary at {} (build it with `cargo build --release -p weir`, or pass --weir-bin)",
            programs.weir.display()
        );
    }
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("weir-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    let started = Instant::now();
    let result = run(
        &args,
        &settings,
        &limit_settings,
        &workloads,
        &kinds,
        &programs,
        &work_dir,
    )
    .await;
    let _ = std::fs::remove_dir_all(&work_dir);
    let failures = result?;
    eprintln!(
        "weir-bench: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if failures > 0 {
        bail!("{failures} measurement(s) failed (see the table)");
    }
    Ok(())
}

/// Runs everything, prints the report, writes JSON; returns the number of failed measurements.
async fn run(
    args: &Args,
    settings: &Settings,
    limit_settings: &LimitSettings,
    workloads: &[Workload],
    kinds: &[Kind],
    programs: &Programs,
    work_dir: &std::path::Path,
) -> Result<usize> {
    let limits = if args.skip_limits {
        None
    } else {
        eprintln!("weir-bench: measuring the machine's limits");
        Some(limits::measure(&work_dir.join("limits"), limit_settings).await?)
    };
    if let Some(l) = &limits {
        eprint!("{}", report::limits_text(l));
    }

    let plan: Vec<(&Workload, Kind)> = workloads
        .iter()
        .flat_map(|w| {
            kinds
                .iter()
                .filter(|k| k.runs_in(w.durability))
                .map(move |k| (w, *k))
        })
        .collect();
    // Rounds over the whole plan, so slow drifts of a shared machine spread over every system.
    let repeat = args.repeat.max(1);
    let mut runs: Vec<Vec<Measurement>> = vec![vec![]; plan.len()];
    let mut errors: Vec<Option<String>> = vec![None; plan.len()];
    for round in 1..=repeat {
        for (i, (w, kind)) in plan.iter().enumerate() {
            if errors[i].is_some() {
                continue;
            }
            let round_note = if repeat > 1 {
                format!(" (round {round}/{repeat})")
            } else {
                String::new()
            };
            eprint!(
                "weir-bench: [{}/{}]{round_note} {} on {} ... ",
                i + 1,
                plan.len(),
                kind.name(),
                w.name()
            );
            proc::settle();
            let dir = work_dir.join(format!("{}-{}", kind.name(), w.name()));
            let result = systems::run(*kind, w, settings, programs, &dir).await;
            let _ = std::fs::remove_dir_all(&dir);
            match result {
                Ok(m) => {
                    progress(&m);
                    runs[i].push(m);
                }
                Err(e) => {
                    eprintln!("FAILED: {e:#}");
                    errors[i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    let rows: Vec<Row> = plan
        .iter()
        .zip(runs)
        .zip(errors)
        .map(|(((w, kind), runs), error)| {
            let (result, noisy) = match error {
                Some(e) => (Err(e), false),
                None => {
                    let (m, noisy) = Measurement::representative(&runs);
                    (Ok(m), noisy)
                }
            };
            Row {
                workload: (*w).clone(),
                kind: *kind,
                result,
                noisy,
                runs,
            }
        })
        .collect();

    let tables = report::tables(&rows, workloads);
    let (ratios_text, ratios_json) = report::ratios(&rows, workloads, limits.as_ref());
    let targets = report::targets(&rows, workloads, limits.as_ref());
    println!("\nweir-bench{}: {} s produce (≤ {} MiB), {} s tail at {} records/s, batches of {} B, {} in flight",
        if args.smoke { " (smoke)" } else { "" },
        settings.produce_secs, settings.max_produce_bytes >> 20, settings.tail_secs, settings.rate,
        settings.batch_bytes, settings.in_flight);
    if let Some(l) = &limits {
        print!("{}", report::limits_text(l));
    }
    print!("{tables}");
    println!("\nRatios");
    print!("{ratios_text}");
    println!("\nTargets (reported, not asserted)");
    print!("{}", report::targets_text(&targets));

    if let Some(path) = &args.json {
        let doc = json!({
            "smoke": args.smoke,
            "repeat": args.repeat.max(1),
            "settings": {
                "produce_secs": settings.produce_secs, "max_produce_bytes": settings.max_produce_bytes,
                "tail_secs": settings.tail_secs, "rate": settings.rate, "batch_bytes": settings.batch_bytes,
                "in_flight": settings.in_flight, "fetch_bytes": settings.fetch_bytes,
            },
            "machine": machine_json(),
            "limits": limits.as_ref().map(limits::Limits::json),
            "results": rows.iter().map(report::row_json).collect::<Vec<_>>(),
            "ratios": ratios_json,
            "targets": report::targets_json(&targets),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nJSON: {}", path.display());
    }
    Ok(rows.iter().filter(|r| r.result.is_err()).count())
}

/// One line per measurement on stderr, plus a note when something else used the CPUs.
fn progress(m: &Measurement) {
    eprintln!(
        "produce {} rec/s, catch-up {} rec/s, e2e p99 {:.2} ms",
        report::thousands(m.produce.records_per_sec()),
        report::thousands(m.catch_up.records_per_sec()),
        m.tail.end_to_end.p99
    );
    let phases = [
        ("produce", &m.produce.cpu, m.produce.seconds),
        ("catch-up", &m.catch_up.cpu, m.catch_up.seconds),
        ("tail", &m.tail.cpu, m.tail.seconds),
    ];
    for (phase, cpu, seconds) in phases {
        let busy = cpu.other.unwrap_or(0.0) / seconds;
        let steal = cpu.steal.unwrap_or(0.0) / seconds;
        if busy > workload::NOISY || steal > workload::NOISY {
            eprintln!(
                "weir-bench:   noisy {phase}: other processes used {:.0}% of a CPU, steal {:.0}%",
                busy * 100.0,
                steal * 100.0
            );
        }
    }
}

/// CPU model, cores, memory and kernel, for the record.
fn machine_json() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map(str::trim);
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    });
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_gib": mem_kib.map(|k| k as f64 / 1024.0 / 1024.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
    })
}
