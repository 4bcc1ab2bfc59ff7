//! The results: one table per workload, the ratios that matter (weir against each peer and
//! against the machine's limits), the targets (reported, never asserted) and JSON.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::limits::Limits;
use crate::systems::Kind;
use crate::workload::{Durability, Measurement, Workload};

/// One (workload, system) measurement, or why it could not be made.
pub struct Row {
    pub workload: Workload,
    pub kind: Kind,
    /// The median of the quiet `runs`, or the error that stopped them.
    pub result: Result<Measurement, String>,
    /// No run was quiet: other processes used more than 10% of a CPU in each.
    pub noisy: bool,
    pub runs: Vec<Measurement>,
}

impl Row {
    /// " (min–max)" of a rate over the runs, when there were several.
    fn range(&self, rate: impl Fn(&Measurement) -> f64) -> String {
        if self.runs.len() < 2 {
            return String::new();
        }
        let rates: Vec<f64> = self.runs.iter().map(rate).collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        format!(" ({}–{})", short(min), short(max))
    }
}

/// 1234567.8 → "1.23M", 45678 → "45.7k".
pub fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// 1234567.8 → "1,234,568".
pub fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

pub fn limits_text(l: &Limits) -> String {
    format!(
        "machine limits: dd sequential write {:.0} MB/s with conv=fdatasync, {:.0} MB/s into the page cache; \
         fsync (4 KiB append + fdatasync) p50 {:.2} ms, p99 {:.2} ms; \
         loopback TCP {:.0} MB/s, 64-byte round trip p50 {:.3} ms, p99 {:.3} ms\n",
        l.dd_fdatasync_mb_s,
        l.dd_page_cache_mb_s,
        l.fsync.p50,
        l.fsync.p99,
        l.loopback_mb_s,
        l.loopback_rtt.p50,
        l.loopback_rtt.p99
    )
}

/// The tables, as printed and as pasted into docs/benchmarks.md (Markdown).
pub fn tables(rows: &[Row], workloads: &[Workload]) -> String {
    let mut out = String::new();
    for w in workloads {
        let _ = writeln!(out, "\n{} ({})\n", w.describe(), w.name());
        out.push_str(
            "| system | produce rec/s | produce MB/s | produce req p99 ms | catch-up rec/s | catch-up MB/s \
             | e2e p50 / p99 / p99.9 / max ms | server CPU ms/MB (produce / catch-up) \
             | client CPU ms/MB (produce / catch-up) | server peak RSS MiB |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        let mut noisy = false;
        for r in rows.iter().filter(|r| r.workload.name() == w.name()) {
            noisy |= r.noisy;
            let name = format!("{}{}", r.kind.name(), if r.noisy { " †" } else { "" });
            match &r.result {
                Err(e) => {
                    let _ = writeln!(out, "| {name} | failed: {e} | | | | | | | | |");
                }
                Ok(m) => {
                    let e = &m.tail.end_to_end;
                    let _ = writeln!(
                        out,
                        "| {name} | {}{} | {:.0} | {:.2} | {}{} | {:.0} | {:.2} / {:.2} / {:.2} / {:.2} | {} / {} | {} / {} | {} |",
                        thousands(m.produce.records_per_sec()),
                        r.range(|m| m.produce.records_per_sec()),
                        m.produce.mb_per_sec(),
                        m.produce_request.p99,
                        thousands(m.catch_up.records_per_sec()),
                        r.range(|m| m.catch_up.records_per_sec()),
                        m.catch_up.mb_per_sec(),
                        e.p50,
                        e.p99,
                        e.p999,
                        e.max,
                        opt(m.produce.server_cpu_ms_per_mb(), 2),
                        opt(m.catch_up.server_cpu_ms_per_mb(), 2),
                        opt(m.produce.client_cpu_ms_per_mb(), 2),
                        opt(m.catch_up.client_cpu_ms_per_mb(), 2),
                        opt(m.peak_rss_mib, 0),
                    );
                }
            }
        }
        if noisy {
            out.push_str(
                "\n† in every run of this row other processes used more than 10% of a CPU\n",
            );
        }
    }
    out
}

fn get<'a>(rows: &'a [Row], w: &Workload, kind: Kind) -> Option<&'a Measurement> {
    rows.iter()
        .find(|r| r.kind == kind && r.workload.name() == w.name())
        .and_then(|r| r.result.as_ref().ok())
}

/// weir against each peer, and against the machine's limits, per workload.
pub fn ratios(rows: &[Row], workloads: &[Workload], limits: Option<&Limits>) -> (String, Value) {
    let mut text = String::from(
        "\n| workload | compared with | produce (weir ÷ other) | catch-up (weir ÷ other) | e2e p99 (weir ÷ other) |\n|---|---|---|---|---|\n",
    );
    let mut doc = vec![];
    for w in workloads {
        let Some(weir) = get(rows, w, Kind::Weir) else {
            continue;
        };
        for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::Weir) {
            let Some(peer) = get(rows, w, kind) else {
                continue;
            };
            let produce = weir.produce.records_per_sec() / peer.produce.records_per_sec();
            let catch_up = weir.catch_up.records_per_sec() / peer.catch_up.records_per_sec();
            let e2e = weir.tail.end_to_end.p99 / peer.tail.end_to_end.p99;
            let _ = writeln!(
                text,
                "| {} | {} | {produce:.2}x | {catch_up:.2}x | {e2e:.2}x |",
                w.name(),
                kind.name()
            );
            doc.push(json!({"workload": w.name(), "peer": kind.name(), "produce": produce, "catch_up": catch_up, "e2e_p99": e2e}));
        }
        if let Some((single, m)) = single_replica(rows, workloads, w) {
            let produce = weir.produce.records_per_sec() / m.produce.records_per_sec();
            let catch_up = weir.catch_up.records_per_sec() / m.catch_up.records_per_sec();
            let e2e = weir.tail.end_to_end.p99 / m.tail.end_to_end.p99;
            let _ = writeln!(
                text,
                "| {} | weir, 1 replica, acks=1 ({}) | {produce:.2}x | {catch_up:.2}x | {e2e:.2}x |",
                w.name(),
                single.name()
            );
            doc.push(json!({"workload": w.name(), "peer": format!("weir {}", single.name()), "produce": produce, "catch_up": catch_up, "e2e_p99": e2e}));
        }
        if let Some(l) = limits {
            let disk = weir.produce.mb_per_sec() / l.dd_fdatasync_mb_s;
            let net = weir.catch_up.mb_per_sec() / l.loopback_mb_s;
            let fsync = weir.tail.end_to_end.p99 / l.fsync.p99;
            let _ = writeln!(
                text,
                "| {} | machine: dd conv=fdatasync / loopback TCP / fsync p99 | {disk:.2}x | {net:.2}x | {fsync:.2}x |",
                w.name()
            );
            doc.push(json!({"workload": w.name(), "peer": "machine", "produce_vs_dd_fdatasync": disk, "catch_up_vs_loopback": net, "e2e_p99_vs_fsync_p99": fsync}));
        }
    }
    (text, Value::Array(doc))
}

/// One of the targets.
pub struct Target {
    pub what: String,
    pub value: f64,
    pub threshold: f64,
    pub unit: &'static str,
    /// "≥ threshold" when set, else "< threshold".
    pub at_least: bool,
}

impl Target {
    pub fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.threshold
        } else {
            self.value < self.threshold
        }
    }

    pub fn status(&self) -> String {
        let ratio = self.value / self.threshold;
        match (self.met(), self.at_least) {
            (true, true) => format!("met, {ratio:.2}x the target"),
            (true, false) => format!("met, {:.0}% of the limit", ratio * 100.0),
            (false, true) => format!("MISSED by {:.0}%", (1.0 - ratio) * 100.0),
            (false, false) => format!("MISSED: {ratio:.2}x the limit"),
        }
    }
}

fn find(
    workloads: &[Workload],
    partitions: usize,
    size: usize,
    d: Durability,
) -> Option<&Workload> {
    workloads
        .iter()
        .find(|w| w.partitions == partitions && w.record_size == size && w.durability == d)
}

/// For a three-replica workload, the single-replica acks=1 workload of the same shape and
/// weir's figures on it, when both were run.
fn single_replica<'a>(
    rows: &'a [Row],
    workloads: &'a [Workload],
    w: &Workload,
) -> Option<(&'a Workload, &'a Measurement)> {
    if w.durability != Durability::Rf3 {
        return None;
    }
    let single = find(workloads, w.partitions, w.record_size, Durability::Ack1)?;
    Some((single, get(rows, single, Kind::Weir)?))
}

/// Evaluates the targets that the workloads run allow.
pub fn targets(rows: &[Row], workloads: &[Workload], limits: Option<&Limits>) -> Vec<Target> {
    let mut out = vec![];
    let mut add = |what: String, value: f64, at_least: bool, threshold: f64, unit: &'static str| {
        out.push(Target {
            what,
            value,
            threshold,
            unit,
            at_least,
        })
    };
    if let Some(w) = find(workloads, 1, 100, Durability::Ack1) {
        if let Some(weir) = get(rows, w, Kind::Weir) {
            for (kind, factor) in [
                (Kind::Nats, 2.0),
                (Kind::Redis, 1.0),
                (Kind::RedisAofEverysec, 1.0),
            ] {
                if let Some(peer) = get(rows, w, kind) {
                    add(
                        format!("produce 100 B, 1 partition, acks=1: weir ÷ {}", kind.name()),
                        weir.produce.records_per_sec() / peer.produce.records_per_sec(),
                        true,
                        factor,
                        "x",
                    );
                }
            }
        }
    }
    if let (Some(w), Some(l)) = (find(workloads, 1, 1024, Durability::Ack1), limits) {
        if let Some(weir) = get(rows, w, Kind::Weir) {
            add(
                "produce 1 KiB, 1 partition, acks=1: weir MB/s ÷ dd conv=fdatasync".into(),
                weir.produce.mb_per_sec() / l.dd_fdatasync_mb_s,
                true,
                0.5,
                "x",
            );
        }
    }
    for w in workloads
        .iter()
        .filter(|w| w.durability == Durability::Ack1)
    {
        if let Some(weir) = get(rows, w, Kind::Weir) {
            add(
                format!("{}: weir catch-up ÷ produce (records/s)", w.name()),
                weir.catch_up.records_per_sec() / weir.produce.records_per_sec(),
                true,
                3.0,
                "x",
            );
        }
    }
    for w in workloads {
        if let (Some(weir), Some((single, m))) =
            (get(rows, w, Kind::Weir), single_replica(rows, workloads, w))
        {
            add(
                format!(
                    "{}: produce records/s ÷ 1 replica acks=1 ({})",
                    w.name(),
                    single.name()
                ),
                weir.produce.records_per_sec() / m.produce.records_per_sec(),
                true,
                0.5,
                "x",
            );
        }
    }
    for w in workloads.iter().filter(|w| w.partitions == 1) {
        let Some(weir) = get(rows, w, Kind::Weir) else {
            continue;
        };
        let p99 = weir.tail.end_to_end.p99;
        match (w.durability, limits) {
            (Durability::Ack1, _) => add(
                format!("{}: weir e2e p99", w.name()),
                p99,
                false,
                5.0,
                " ms",
            ),
            (Durability::Fsync, Some(l)) => add(
                format!(
                    "{}: weir e2e p99 < 2x fsync p99 ({:.2} ms)",
                    w.name(),
                    l.fsync.p99
                ),
                p99,
                false,
                2.0 * l.fsync.p99,
                " ms",
            ),
            (Durability::Fsync, None) | (Durability::Rf3, _) => {}
        }
    }
    for w in workloads.iter().filter(|w| w.partitions == 16) {
        if let Some(rss) = get(rows, w, Kind::Weir).and_then(|m| m.peak_rss_mib) {
            add(
                format!("{}: weir peak RSS", w.name()),
                rss,
                false,
                256.0,
                " MiB",
            );
        }
    }
    out
}

pub fn targets_text(targets: &[Target]) -> String {
    let mut text = String::from("\n| target | value | status |\n|---|---|---|\n");
    for t in targets {
        let _ = writeln!(
            text,
            "| {} | {:.2}{} ({} {:.2}{}) | {} |",
            t.what,
            t.value,
            t.unit,
            if t.at_least { "≥" } else { "<" },
            t.threshold,
            t.unit,
            t.status()
        );
    }
    text
}

pub fn targets_json(targets: &[Target]) -> Value {
    Value::Array(
        targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.what, "value": t.value, "threshold": t.threshold,
                    "at_least": t.at_least, "met": t.met(), "status": t.status(),
                })
            })
            .collect(),
    )
}

pub fn row_json(r: &Row) -> Value {
    let mut v = json!({
        "workload": r.workload.name(),
        "partitions": r.workload.partitions,
        "record_size": r.workload.record_size,
        "durability": format!("{:?}", r.workload.durability),
        "system": r.kind.name(),
        "config": r.kind.config(r.workload.durability),
    });
    match &r.result {
        Err(e) => v["error"] = json!(e),
        Ok(m) => {
            v["produce"] = m.produce.json();
            v["produce_request_ms"] = m.produce_request.json();
            v["catch_up"] = m.catch_up.json();
            v["tail"] = m.tail.json();
            v["server_peak_rss_mib"] = json!(m.peak_rss_mib);
            v["noisy"] = json!(r.noisy);
            v["runs"] = r
                .runs
                .iter()
                .map(|m| {
                    json!({
                        "produce": m.produce.json(), "produce_request_ms": m.produce_request.json(),
                        "catch_up": m.catch_up.json(), "tail": m.tail.json(),
                        "server_peak_rss_mib": m.peak_rss_mib, "noise": m.noise(),
                    })
                })
                .collect();
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(7_220_000.4), "7,220,000");
        assert_eq!(short(7_220_000.0), "7.22M");
        assert_eq!(short(45_678.0), "45.7k");
    }

    #[test]
    fn target_status_says_by_how_much() {
        let t = |value, at_least, threshold| Target {
            what: String::new(),
            value,
            threshold,
            unit: "x",
            at_least,
        };
        assert_eq!(t(3.0, true, 2.0).status(), "met, 1.50x the target");
        assert_eq!(t(1.5, true, 2.0).status(), "MISSED by 25%");
        assert_eq!(t(2.0, false, 5.0).status(), "met, 40% of the limit");
        assert_eq!(t(10.0, false, 5.0).status(), "MISSED: 2.00x the limit");
    }
}
