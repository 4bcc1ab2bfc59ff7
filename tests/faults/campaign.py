#!/usr/bin/env python3
"""A fault campaign against a three-node weir cluster: randomized kills, pauses, isolations
and restarts under a queue workload, an exactly-once pipeline copying the queue, a Kafka
client's transactional loop copying it too, and a pipeline from a file through a WASM plugin
to a file sink, then checkers over the whole history.

    python tests/faults/campaign.py --duration 600 --seed 7

Same seed, same schedule of faults. The nodes' logs, the history and the schedule stay in
the work directory (printed at the start). Exit status 0 when every checker holds, 1 on a
violation, 2 when the campaign itself could not run. Unless --no-record is given, a row is
added to the table of runs in docs/reliability.md.

The weir binary comes from --weir-bin, else $WEIR_BIN, else
$CARGO_TARGET_DIR/debug/weir (default ~/.cache/weir/target/debug/weir). The example plugins
(passthrough.wasm) come from --plugin-dir, else $WEIR_PLUGIN_DIR (tests/run builds them there
with `weir plugin build plugins-sdk/examples`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests" / "e2e")]

from confluent_kafka import ConsumerGroupTopicPartitions  # noqa: E402

from checker import Verdict, check, report  # noqa: E402
from conftest import WeirDaemon  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402
from nemesis import KINDS, DiskControl, Nemesis, overlapping, schedule  # noqa: E402
from support import admin, consume_confluent, watermarks  # noqa: E402
from test_cluster import create_replicated, segment_bytes, start_cluster  # noqa: E402
from test_pipelines import read_committed  # noqa: E402
from workload import (ABORTED_PREFIX, CommittedReader, GroupConsumer, History,  # noqa: E402
                      LineWriter, QueueProducer, TxnCopier)

TOPIC = "queue"
GROUP = "queue-readers"
COPY = "queue-copy"
TXN_COPY = "queue-txn"
TXN_GROUP = "queue-txn-copier"
# Runs on one node the cluster picks (every node has the file) and moves when that node fails.
PIPELINE = f"""\
name: copy
source:
  topic:
    name: {TOPIC}
topic:
  name: {COPY}
batch_records: 200
"""
LINES = "lines"
# Reads a file every node sees (the nodes share this machine's disk) through a WASM plugin into
# a topic, and writes the topic out to a file sink; runs on one node and moves like `copy`.
FILE_PIPELINE = """\
name: lines
source:
  file:
    paths: ["{input}"]
    format: lines
transforms:
  - plugin: {plugin}
topic:
  name: lines
  partitions: 1
sinks:
  - file:
      path: {sink}/lines.txt
      format: lines
batch_records: 100
"""
LINE_RATE = 20.0  # lines a second into the file pipeline's input
HEAL_BOUND_S = 120.0      # after the final heal: every replica back in sync
CATCH_UP_BOUND_S = 180.0  # then: the group has read to the end
IDENTICAL_BOUND_S = 60.0  # then: every replica holds the same bytes
RESULTS = ROOT / "docs" / "reliability.md"


@dataclass
class Options:
    seed: int
    duration: float
    nodes: int = 3
    partitions: int = 4
    producers: int = 2
    rate: float = 50.0  # values a second, per producer
    weir_bin: str = ""
    plugin_dir: str = ""
    workdir: Path | None = None
    kinds: tuple = KINDS
    at_once: int = 1  # faults that hold at the same time (1 or 2)


@dataclass
class Outcome:
    options: Options
    verdict: Verdict
    faults: str
    fault_count: int
    workdir: Path
    elapsed: float
    copier_restarts: int = 0  # the transactional copier killed in a hung call, started again

    def summary(self) -> str:
        v = self.verdict
        return (f"seed={self.options.seed} duration={self.options.duration:.0f}s "
                f"faults={self.fault_count} ({self.faults}) acknowledged={v.acknowledged} "
                f"lost={len(v.lost)} duplicated={len(v.duplicated)} "
                f"producer-fatal={v.fatal} verdict={'PASS' if v.ok else 'FAIL'}")


def default_binary() -> str:
    if os.environ.get("WEIR_BIN"):
        return os.environ["WEIR_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "weir" / "target"))
    return str(Path(target) / "debug" / "weir")


class Log:
    def __init__(self, path: Path):
        self.t0 = time.monotonic()
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        # Wall clock (UTC, as in the nodes' logs) and seconds since the start.
        wall = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        line = f"[{wall} {time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


def run(opts: Options) -> Outcome:
    started = time.monotonic()
    binary = os.path.abspath(opts.weir_bin or default_binary())
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"campaign: no weir binary at {binary} (set WEIR_BIN or --weir-bin)")
    plugin = Path(opts.plugin_dir or os.environ.get("WEIR_PLUGIN_DIR", "")) / "passthrough.wasm"
    if not plugin.is_file():
        raise SystemExit(f"campaign: no passthrough.wasm at {plugin} for the file pipeline (set "
                         f"WEIR_PLUGIN_DIR or --plugin-dir to where `weir plugin build "
                         f"plugins-sdk/examples --out DIR` put the example plugins)")
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix=f"weir-faults-seed{opts.seed}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = Log(workdir / "campaign.log")
    at_once = " two at once" if opts.at_once == 2 else ""
    log(f"campaign: seed {opts.seed}, {opts.duration:.0f}s of faults ({','.join(opts.kinds)}){at_once}, {opts.nodes} nodes, "
        f"binary {binary}, work directory {workdir}")

    proxies = [FaultProxy(seed=opts.seed * 100 + i, fault_rate=0.0) for i in range(opts.nodes)]
    raft_proxies = [FaultProxy(seed=0, fault_rate=0.0, kafka=False) for _ in range(opts.nodes)]
    # A proxy on every link between two nodes, each way: Kafka (replication, transaction
    # markers, pipelines' writes) and cluster (Raft, forwarded proposals).
    links = {(a, b): (FaultProxy(seed=0, fault_rate=0.0),
                      FaultProxy(seed=0, fault_rate=0.0, kafka=False))
             for a in range(1, opts.nodes + 1) for b in range(1, opts.nodes + 1) if a != b}
    shim = DiskControl.build_shim(workdir / "diskfault.so")
    disks = [DiskControl(workdir / f"node{i + 1}.disk") for i in range(opts.nodes)]
    nodes: list[WeirDaemon] = []

    def factory(name, start=False, config_yaml=None, extra_args=()):
        d = WeirDaemon(binary, workdir, name=name, extra_args=tuple(extra_args),
                       config_yaml=config_yaml)
        d.env.update(disks[len(nodes)].env(shim))
        nodes.append(d)
        return d

    history = History()
    producers: list[QueueProducer] = []
    consumer: GroupConsumer | None = None
    txn_clients: list = []
    line_writer: LineWriter | None = None
    sink_dir = workdir / "sink"
    sink_dir.mkdir(exist_ok=True)
    input_file = workdir / "input" / "lines.log"
    input_file.parent.mkdir(exist_ok=True)
    nemesis: Nemesis | None = None
    copier_restarts = 0
    extra: dict[str, list[str]] = {}
    pipelines = workdir / "pipelines"
    pipelines.mkdir(exist_ok=True)
    try:
        cluster = start_cluster(factory, opts.nodes, proxies,
                                extra_args=("--pipelines", str(pipelines)),
                                raft_proxies=raft_proxies, links=links)
        bootstrap = ",".join(f"127.0.0.1:{p.port}" for p in proxies)
        for topic in (TOPIC, COPY, TXN_COPY):
            create_replicated(cluster, topic, opts.partitions, rf=min(3, opts.nodes),
                              config={"min.insync.replicas": "2"})
        create_replicated(cluster, LINES, 1, rf=min(3, opts.nodes),
                          config={"min.insync.replicas": "2"})
        input_file.touch()
        (pipelines / "copy.yaml").write_text(PIPELINE)
        (pipelines / "lines.yaml").write_text(FILE_PIPELINE.format(
            input=input_file, plugin=plugin.resolve(), sink=sink_dir))
        log(f"cluster up: nodes {[n.kafka_port for n in nodes]} behind proxies "
            f"{[p.port for p in proxies]}; topic {TOPIC} with {opts.partitions} partitions, RF 3")

        producers = [QueueProducer(i, bootstrap, TOPIC, opts.partitions, opts.rate, history,
                                   client_log=workdir / f"producer-{i}.log")
                     for i in range(opts.producers)]
        consumer = GroupConsumer(bootstrap, TOPIC, GROUP, history)
        txn_clients = [TxnCopier(bootstrap, TOPIC, TXN_COPY, TXN_GROUP, history),
                       CommittedReader(bootstrap, TXN_COPY, opts.partitions, history)]
        for p in producers:
            p.start()
        consumer.start()
        for c in txn_clients:
            c.start()
        line_writer = LineWriter(input_file, LINE_RATE, history)
        line_writer.start()
        time.sleep(5)  # the workload before any fault

        nemesis = Nemesis(cluster, proxies, TOPIC, log, raft_proxies, disks, links)
        if opts.at_once == 2:
            steps = overlapping(opts.seed, opts.nodes, opts.partitions, opts.kinds)
        else:
            steps = ((f, None, 0.0) for f in schedule(opts.seed, opts.nodes, opts.partitions,
                                                      opts.kinds))
        end = time.monotonic() + opts.duration
        while time.monotonic() < end:
            fault, second, offset_s = next(steps)
            if second is None:
                nemesis.run(fault)
            else:
                nemesis.run_together(fault, second, offset_s)
            heal_s = max(fault.heal_s, second.heal_s if second else 0.0)
            time.sleep(min(heal_s, max(0.0, end - time.monotonic())))
            log(f"progress: {len(history.acked)} acknowledged, {len(history.failed)} failed, "
                f"{len(history.reads)} read")

        log("final heal: every node running, every proxy relaying")
        nemesis.heal()
        extra["heal"] = _wait_healed(cluster, log)
        time.sleep(10)  # the workload goes on against the healed cluster
        for p in producers:
            left = p.stop(flush_timeout=300)
            if left:
                extra.setdefault("producer-flush", []).append(
                    f"producer {p.index}: {left} value(s) without a delivery report after 300s")
        producers = []
        line_writer.stop()
        ends = {p: hw for p, (_, hw) in watermarks(cluster.live()[0].bootstrap, TOPIC,
                                                   range(opts.partitions), timeout=30).items()}
        history.end_offsets = ends
        log(f"producers stopped; high watermarks {ends}")
        if not _wait(lambda: consumer.caught_up(ends), CATCH_UP_BOUND_S):
            extra["group-catch-up"] = [f"the group committed {dict(consumer.last_commit)} within "
                                       f"{CATCH_UP_BOUND_S:.0f}s, short of {ends}"]
        consumer.stop()
        consumer = None
        history.final_commits = _group_offsets(bootstrap, log)
        history.final_log = [(r.partition, r.offset, r.value) for r in
                             consume_confluent(bootstrap, TOPIC, range(opts.partitions), timeout=120)]
        log(f"final read: {len(history.final_log)} records; group offsets {history.final_commits}")
        history.final_copy = _wait_copied(bootstrap, COPY, len(history.final_log), log)
        history.final_txn_copy = _wait_copied(bootstrap, TXN_COPY, len(history.final_log), log)
        copier_restarts = txn_clients[0].restarts
        for c in txn_clients:
            c.stop()
        txn_clients = []
        log(f"the transactional copier: {_txn_summary(history)}; restarted {copier_restarts} time(s) "
            f"after a call hung")
        history.final_file_topic = _wait_copied(bootstrap, LINES, len(history.file_lines), log)
        history.final_file_sink = _wait_sink(sink_dir, len(history.file_lines), log)
        extra["replicas-identical"] = _wait_identical(cluster, TOPIC, opts.partitions)
        offsets_partitions = len(cluster.metadata().topics["__consumer_offsets"].partitions)
        extra["replicas-identical"] += _wait_identical(cluster, "__consumer_offsets",
                                                       offsets_partitions)
        if nemesis.anomalies:
            log("anomalies (not violations): " + "; ".join(nemesis.anomalies))
    finally:
        if line_writer is not None:
            line_writer.stop()
        for p in producers:
            try:
                p.stop(flush_timeout=5)
            except Exception:
                pass
        for c in ([consumer] if consumer is not None else []) + txn_clients:
            try:
                c.stop()
            except Exception:
                pass
        if nemesis is not None:
            for node_id in list(nemesis.paused):
                n = nodes[node_id - 1]
                if n.running():
                    os.kill(n.pid, signal.SIGCONT)
        for n in nodes:
            if n.running():
                try:
                    n.stop(timeout=30, expect_clean=False)
                except AssertionError:
                    pass
        for p in proxies + raft_proxies + [p for pair in links.values() for p in pair]:
            p.close()

    # Saved before it is checked, so that a check that fails to run can be run again on it.
    _save_history(workdir, history, nemesis)
    verdict = check(history)
    for name, found in extra.items():
        if found:
            verdict.violations[name] = found
    outcome = Outcome(opts, verdict, nemesis.summary(), len(nemesis.injected), workdir,
                      time.monotonic() - started, copier_restarts)
    text = report(verdict)
    if text:
        log(text)
    log(outcome.summary())
    return outcome


def _wait_copied(bootstrap: str, topic: str, want: int, log) -> list:
    """A copy of the queue (the pipeline's or the transactional copier's), read_committed,
    once it holds `want` values (or after CATCH_UP_BOUND_S, for the checkers to say what is
    missing)."""
    copied: list = []

    def done() -> bool:
        nonlocal copied
        copied = [(p, o, v) for p, o, _, v, _ in read_committed(bootstrap, topic, timeout=60)]
        return sum(1 for *_, v in copied if not v.startswith(ABORTED_PREFIX)) >= want

    _wait(done, CATCH_UP_BOUND_S)
    log(f"{topic} holds {len(copied)} records, read_committed, of {want} expected")
    return copied


def _wait_sink(sink_dir: Path, want: int, log) -> list:
    """The lines of the file pipeline's sink files once they hold `want` (or after
    CATCH_UP_BOUND_S, for the checker to say what is missing)."""
    lines: list = []

    def done() -> bool:
        nonlocal lines
        lines = [line for p in sorted(sink_dir.glob("lines*.txt"))
                 for line in p.read_bytes().splitlines()]
        return len(lines) >= want

    _wait(done, CATCH_UP_BOUND_S)
    log(f"the file sink holds {len(lines)} lines; {want} were written to the input file")
    return lines


def _txn_summary(h: History) -> str:
    outcomes = {"committed": 0, "aborted": 0, "failed": 0}
    for _, _, outcome, _ in h.txns:
        outcomes["failed" if outcome.startswith("failed") else outcome] += 1
    return (f"{outcomes['committed']} transactions committed, {outcomes['aborted']} aborted on "
            f"purpose, {outcomes['failed']} failed and aborted; {len(h.txn_live_reads)} records "
            f"read_committed while the faults ran")


def _wait_healed(cluster, log) -> list[str]:
    """Within HEAL_BOUND_S: every node answers, every partition of the topic and of
    __consumer_offsets has a leader and all three replicas in sync."""
    def healed():
        # Every node's view, since a node that was paused or cut off may answer from an
        # image that is behind.
        for node in cluster.nodes:
            md = cluster.metadata(node)
            for name in (TOPIC, "__consumer_offsets"):
                for p in md.topics[name].partitions.values():
                    if p.leader < 0 or sorted(p.isrs) != sorted(p.replicas):
                        return False
        return True

    t0 = time.monotonic()
    if _wait(healed, HEAL_BOUND_S):
        log(f"healed in {time.monotonic() - t0:.1f}s")
        return []
    try:
        md = cluster.metadata(cluster.nodes[0])
        state = {f"{TOPIC}-{i}": (p.leader, sorted(p.isrs)) for i, p in
                 md.topics[TOPIC].partitions.items()}
    except Exception as e:
        state = repr(e)
    return [f"not every replica back in sync {HEAL_BOUND_S:.0f}s after the final heal: {state}"]


def _wait_identical(cluster, topic: str, partitions: int) -> list[str]:
    def diffs():
        out = []
        for p in range(partitions):
            # The nodes that hold a replica (all of them on three nodes).
            replicas = cluster.metadata().topics[topic].partitions[p].replicas
            copies = {cluster.node(r).name: segment_bytes(cluster.node(r), topic, p)
                      for r in replicas}
            if len(set(copies.values())) != 1:
                out.append(f"{topic}-{p}: " + ", ".join(f"{k} {len(v)} bytes"
                                                        for k, v in copies.items()))
        return out

    if _wait(lambda: not diffs(), IDENTICAL_BOUND_S):
        return []
    return [f"replicas differ {IDENTICAL_BOUND_S:.0f}s after healing: {d}" for d in diffs()]


def _group_offsets(bootstrap: str, log) -> dict[int, int]:
    a = admin(bootstrap)  # keep the client alive until the future resolves
    for _ in range(5):
        try:
            res = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(GROUP)])
            tps = res[GROUP].result(30).topic_partitions
            return {tp.partition: tp.offset for tp in tps if tp.topic == TOPIC and tp.offset >= 0}
        except Exception as e:
            log(f"listing the group's offsets: {e!r}")
            time.sleep(2)
    return {}


def _save_history(workdir: Path, h: History, nemesis: Nemesis | None) -> None:
    def b(v):
        return v.decode() if isinstance(v, bytes) else v

    with open(workdir / "history.jsonl", "w") as f:
        if nemesis is not None:
            for t, fault, node in nemesis.injected:
                f.write(json.dumps({"t": t, "type": "fault", "kind": fault.kind, "node": node,
                                    "fault": fault.describe()}) + "\n")
        for prod, seq, v, p, o, t in h.acked:
            f.write(json.dumps({"t": t, "type": "ack", "value": b(v), "partition": p, "offset": o}) + "\n")
        for prod, seq, v, p, e, t in h.failed:
            f.write(json.dumps({"t": t, "type": "fail", "value": b(v), "partition": p, "error": e}) + "\n")
        for p, o, v, t in h.reads:
            f.write(json.dumps({"t": t, "type": "read", "value": b(v), "partition": p, "offset": o}) + "\n")
        for t, offs in h.commits:
            f.write(json.dumps({"t": t, "type": "commit", "offsets": offs}) + "\n")
        for t, offs in h.observed_commits:
            f.write(json.dumps({"t": t, "type": "committed", "offsets": offs}) + "\n")
        for p, o, v in h.final_log:
            f.write(json.dumps({"type": "log", "value": b(v), "partition": p, "offset": o}) + "\n")
        for p, o, v in h.final_copy or []:
            f.write(json.dumps({"type": "copy", "value": b(v), "partition": p, "offset": o}) + "\n")
        for t, n, outcome, records in h.txns:
            f.write(json.dumps({"t": t, "type": "txn", "n": n, "outcome": outcome,
                                "records": records}) + "\n")
        for p, o, v, t in h.txn_live_reads:
            f.write(json.dumps({"t": t, "type": "txn-read", "value": b(v), "partition": p,
                                "offset": o}) + "\n")
        for v in h.file_lines:
            f.write(json.dumps({"type": "file-line", "value": b(v)}) + "\n")
        for p, o, v in h.final_file_topic or []:
            f.write(json.dumps({"type": "file-topic", "value": b(v), "partition": p,
                                "offset": o}) + "\n")
        for v in h.final_file_sink or []:
            f.write(json.dumps({"type": "file-sink", "value": b(v)}) + "\n")
        for p, o, v in h.final_txn_copy or []:
            f.write(json.dumps({"type": "txn-copy", "value": b(v), "partition": p,
                                "offset": o}) + "\n")


def record_row(outcome: Outcome, path: Path = RESULTS) -> None:
    v = outcome.verdict
    failed = ", ".join(sorted(v.violations)) if not v.ok else ""
    shape = "".join([", two at once" if outcome.options.at_once == 2 else "",
                     f", {outcome.options.nodes} nodes" if outcome.options.nodes != 3 else ""])
    row = (f"| {datetime.date.today().isoformat()} | {outcome.fault_count} ({outcome.faults}){shape} "
           f"| {outcome.options.duration:.0f}s | {outcome.options.seed} | {v.acknowledged} "
           f"| {len(v.lost)} | {len(v.duplicated)} "
           f"| {'pass' if v.ok else 'FAIL: ' + failed} |\n")
    text = path.read_text()
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of faults (default 600)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault schedule (default: random)")
    ap.add_argument("--nodes", type=int, default=3, choices=[3, 5])
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rate", type=float, default=50.0, help="values a second per producer")
    ap.add_argument("--faults", default=",".join(KINDS),
                    help=f"the kinds of fault to draw from (default: all of {','.join(KINDS)})")
    ap.add_argument("--at-once", type=int, default=1, choices=[1, 2],
                    help="faults holding at the same time: 2 overlaps pairs of faults on two "
                         "nodes (default 1)")
    ap.add_argument("--weir-bin", default="")
    ap.add_argument("--plugin-dir", default="",
                    help="where passthrough.wasm is (default: $WEIR_PLUGIN_DIR)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-record", action="store_true", help=f"do not add a row to {RESULTS.name}")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--faults: choose among {','.join(KINDS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"campaign: seed {seed} (replay with --seed {seed})", flush=True)
    try:
        outcome = run(Options(seed=seed, duration=args.duration, nodes=args.nodes,
                              partitions=args.partitions, rate=args.rate, weir_bin=args.weir_bin,
                              plugin_dir=args.plugin_dir, workdir=args.workdir,
                              kinds=kinds, at_once=args.at_once))
    except Exception as e:
        traceback.print_exc()
        print(f"campaign: could not run: {e!r}", file=sys.stderr)
        return 2
    if not args.no_record:
        record_row(outcome)
    return 0 if outcome.verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
