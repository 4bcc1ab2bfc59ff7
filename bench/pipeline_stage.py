#!/usr/bin/env python3
"""Records/s through a pipeline with a trivial map plugin against the same pipeline with no
transform (docs/benchmarks.md, "WASM plugin stage in a pipeline").

Starts `weir serve` on a scratch directory, fills a topic with N records of 100 bytes, then runs
a topic-to-topic pipeline over it, exactly once (a transaction per batch): without a transform,
and with the plugin. Each run is timed from its first committed batch until its `records_in`
counter reaches N. With --rounds R each pipeline runs R times, alternating which goes first, and
the medians are reported.

Usage: bench/pipeline_stage.py --weir target/release/weir --plugin passthrough.wasm [-n N]
           [--batch-records B] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = predicate()
            if v:
                return v
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"pipeline_stage: timed out waiting for {what}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def records_in(http: str, name: str) -> int:
    for f in get(f"{http}/pipelines")["pipelines"]:
        p = f.get("pipeline")
        if p and p["name"] == name:
            if p["state"] == "failed":
                sys.exit(f"pipeline_stage: pipeline {name} failed: {p['error']}")
            return p["records_in"]
    return -1


def run(a, http: str, pipelines: Path, brokers: list, kind: str, round_no: int, pid: int) -> float:
    """Runs one pipeline over the whole input topic; returns its records/s."""
    name = f"{kind}{round_no}"
    transforms = "transforms:\n  - plugin: map.wasm\n" if kind == "map" else ""
    text = (f"name: {name}\nsource:\n  topic: {{ name: in }}\n{transforms}"
            f"topic: {{ name: out-{name}, partitions: 1 }}\nbatch_records: {a.batch_records}\n")
    # Dirty pages left by filling the topic or by the run before would be written back during
    # this run, and cost whichever run comes second: flush them first.
    os.sync()
    (pipelines / f"{name}.yaml").write_text(text)
    written, written_cpu = time.monotonic(), cpu_seconds(pid)
    # Timed from the first committed batch, so loading the plugin is not counted.
    first = wait(lambda: records_in(http, name) > 0 and records_in(http, name), 120,
                 f"pipeline {name} to start")
    started, cpu = time.monotonic(), cpu_seconds(pid)
    if first >= a.n:
        # A small input (--smoke) passed whole before the first look: timed from the
        # pipeline's creation instead, plugin loading included.
        first, started, cpu = 0, written, written_cpu
    wait(lambda: records_in(http, name) >= a.n, 600, f"pipeline {name}")
    secs = time.monotonic() - started
    cores = (cpu_seconds(pid) - cpu) / secs
    rate = (a.n - first) / secs
    print(f"{kind:>5}: {a.n - first:,} records in {secs:.2f} s = {rate:,.0f} records/s"
          f" ({cores:.2f} cores busy in the daemon)")
    (pipelines / f"{name}.yaml").unlink()
    subprocess.run([a.weir, "topic", "delete", f"out-{name}", *brokers], check=True,
                   stdout=subprocess.DEVNULL)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weir", required=True, help="the weir binary (a release build)")
    ap.add_argument("--plugin", required=True, help="a trivial map plugin, e.g. passthrough.wasm")
    ap.add_argument("-n", type=int, default=1_000_000, help="records (default 1,000,000)")
    ap.add_argument("--batch-records", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each pipeline, alternating which goes first (default 1)")
    ap.add_argument("--json", help="write the figures of every run here")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="weir-pipeline-stage-"))
    pipelines = work / "pipelines"
    pipelines.mkdir()
    shutil.copy(a.plugin, pipelines / "map.wasm")
    kafka, http_port = free_port(), free_port()
    http = f"http://127.0.0.1:{http_port}"
    server = subprocess.Popen(
        [a.weir, "serve", "--data-dir", str(work / "data"), "--kafka-addr", f"127.0.0.1:{kafka}",
         "--http-addr", f"127.0.0.1:{http_port}", "--pipelines", str(pipelines)],
        stdout=subprocess.DEVNULL, stderr=open(work / "weir.log", "wb"))
    try:
        wait(lambda: get(f"{http}/health"), 30, "the daemon")
        brokers = ["--brokers", f"127.0.0.1:{kafka}"]
        subprocess.run([a.weir, "topic", "create", "in", "--partitions", "1", *brokers], check=True,
                       stdout=subprocess.DEVNULL)
        # 100-byte values: a JSON object padded to size, as a log or activity record would be.
        line = json.dumps({"user": "u0000001", "pad": ""})
        pad = "x" * (100 - len(line))
        payload = "".join(json.dumps({"user": f"u{i % 9999999:07d}", "pad": pad}) + "\n"
                          for i in range(a.n)).encode()
        t = time.monotonic()
        subprocess.run([a.weir, "produce", "in", *brokers], input=payload, check=True)
        print(f"filled topic 'in' with {a.n:,} records of 100 B in {time.monotonic() - t:.1f} s")

        # Rounds alternate which pipeline goes first, and the medians are reported: on a busy
        # machine one run of each says little.
        rates = {"plain": [], "map": []}
        ratios = []
        for r in range(1, a.rounds + 1):
            order = ("plain", "map") if r % 2 else ("map", "plain")
            got = {kind: run(a, http, pipelines, brokers, kind, r, server.pid) for kind in order}
            for kind, rate in got.items():
                rates[kind].append(rate)
            ratios.append(got["map"] / got["plain"])
        ratio = statistics.median(ratios)
        if a.rounds > 1:
            print(f"medians of {a.rounds} rounds: plain {statistics.median(rates['plain']):,.0f}, "
                  f"map {statistics.median(rates['map']):,.0f} records/s; map/plain per round "
                  + ", ".join(f"{x:.2f}" for x in ratios))
        print(f"plugin stage: {ratio:.2f}x the plain pipeline's rate ({1 - ratio:.0%} of its throughput)")
        if a.json:
            Path(a.json).write_text(json.dumps({
                "plugin": Path(a.plugin).name, "records": a.n, "record_bytes": 100,
                "batch_records": a.batch_records, "rounds": a.rounds,
                "plain_records_per_s": rates["plain"], "map_records_per_s": rates["map"],
                "map_over_plain": ratios, "map_over_plain_median": ratio,
            }, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
