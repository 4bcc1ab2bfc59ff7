#!/usr/bin/env python3
"""weir side by side with Apache Kafka, both driven by the same standard clients: Kafka's own
ProducerPerformance and ConsumerPerformance (the Java client) and librdkafka (bench/rdkafka_perf.c).
No client of weir's own takes part.

Usage: bench/vs_kafka.py [--weir-bin PATH] [--kafka-dir DIR] [--smoke] [--rounds R]
                         [--workloads 1p-100B,6p-100B,...] [--systems weir,kafka,...] [--json FILE]

Apache Kafka comes from DIR/kafka.sh (the jars of a single-node KRaft broker and Kafka's tools;
DIR defaults to $WEIR_KAFKA_DIR, else ../shared/kafka beside the repository). Without it, weir is
measured alone and the report says Kafka was not found. Every row starts a fresh server; rounds
alternate the systems and the report gives each figure's median (and its range over the rounds).

Per workload (partitions, record size, acks=1, page-cache durability on both):
  java produce    ProducerPerformance, N records as fast as it goes (batch.size 256 KiB,
                  linger.ms 5): records/s and ack latency p50/p99/p99.9
  rdkafka produce the same with librdkafka into a second topic (ack p50/p99), a random
                  partition per record, so that every partition holds as many records
  java consume    ConsumerPerformance of that topic in a group (fetch-phase rate, so the
                  group join does not count), fetch.max.wait.ms=100 like rdkafka_perf's consumer
  rdkafka consume the same topic, every partition assigned from the beginning, one record
                  per poll; then again in batches of up to 10,000 (rd_kafka_consume_batch_queue)
  e2e             librdkafka producer at 10k records/s for S seconds, consumer in the same
                  process: p50/p99/p99.9 from send to receipt
  server          CPU seconds per MB moved (produce and consume phases), peak RSS
  client          the client process's CPU seconds per MB moved, in the same phases

The fetch-session workloads (16p-100B-sessions, 256p-100B-sessions) measure consumers of many
partitions only: no Java produce; librdkafka fills the topic, then the Java consumer (which uses incremental fetch
sessions, KIP-227, when the broker offers them) and librdkafka (which never does) read it. They
run weir and Kafka with sessions and without (weir-sessionless: max_incremental_fetch_session_
cache_slots 0; kafka-sessionless: max.incremental.fetch.session.cache.slots=0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def clients_cpu_seconds() -> float:
    """CPU of the client processes run and waited for so far (the servers are not reaped until
    they stop, so a phase's difference is its client's CPU alone)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(cmd: list[str], timeout: float, what: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()[-2000:] or r.stdout[-2000:]}")
    return r.stdout


# --- the clients -------------------------------------------------------------------------------


class Clients:
    """Kafka's Java tools (through kafka.sh) and the librdkafka driver."""

    def __init__(self, kafka_dir: Path | None, scratch: Path):
        self.kafka_dir = kafka_dir
        self.rdkafka = build_rdkafka_perf(scratch)
        # The same long poll as rdkafka_perf's consumer (the Java default is 500 ms): at the end
        # of a run, a fetch of only drained partitions waits that long before the last records.
        self.consumer_config = scratch / "consumer.properties"
        self.consumer_config.write_text("fetch.max.wait.ms=100\n")

    def java(self, cls: str, *args: str, timeout: float = 600) -> str:
        if self.kafka_dir is None:
            raise RuntimeError("Kafka's Java tools need the Kafka directory")
        script = (f"source {shlex.quote(str(self.kafka_dir / 'kafka.sh'))} && kafka_anchor_fetch >&2 && "
                  f"kafka_anchor_tool {shlex.quote(cls)} " + " ".join(shlex.quote(a) for a in args))
        return run(["bash", "-c", script], timeout, cls.rsplit(".", 1)[-1])

    def create_topic(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.rdkafka_perf("create", bootstrap, topic, str(partitions), timeout=120)

    def java_produce(self, bootstrap: str, topic: str, records: int, size: int, acks: str) -> dict:
        out = self.java("org.apache.kafka.tools.ProducerPerformance", "--topic", topic,
                        "--num-records", str(records), "--record-size", str(size), "--throughput", "-1",
                        "--producer-props", f"bootstrap.servers={bootstrap}", f"acks={acks}",
                        "linger.ms=5", "batch.size=262144", "buffer.memory=268435456")
        # The last line: "N records sent, R records/sec (M MB/sec), A ms avg latency, X ms max
        # latency, P ms 50th, P ms 95th, P ms 99th, P ms 99.9th."
        last = [line for line in out.splitlines() if "records sent" in line][-1]
        parts = [p.strip() for p in last.rstrip(".").split(",")]
        num = lambda s: float(s.split()[0])  # noqa: E731
        return {"records_per_s": num(parts[1]), "ack_p50_ms": num(parts[4]),
                "ack_p99_ms": num(parts[6]), "ack_p999_ms": num(parts[7])}

    def java_consume(self, bootstrap: str, topic: str, records: int) -> dict:
        out = self.java("org.apache.kafka.tools.ConsumerPerformance", "--bootstrap-server", bootstrap,
                        "--topic", topic, "--messages", str(records), "--timeout", "60000",
                        "--consumer.config", str(self.consumer_config),
                        "--group", f"perf-{time.time_ns()}")
        header, values = None, None
        for line in out.splitlines():
            if line.startswith("start.time"):
                header = [h.strip() for h in line.split(",")]
            elif header and line.strip():
                values = [v.strip() for v in line.split(",")]
        if not header or not values:
            raise RuntimeError(f"ConsumerPerformance printed no result: {out[-1000:]}")
        row = dict(zip(header, values))
        read = int(row["data.consumed.in.nMsg"])
        if read < records:
            raise RuntimeError(f"ConsumerPerformance read {read} of {records} records")
        return {"records_per_s": float(row["fetch.nMsg.sec"])}

    def rdkafka_perf(self, *args: str, timeout: float = 600) -> dict:
        return json.loads(run([str(self.rdkafka), *args], timeout, "rdkafka_perf " + args[0]))


def build_rdkafka_perf(scratch: Path) -> Path:
    src = REPO / "bench" / "rdkafka_perf.c"
    out = scratch / "rdkafka_perf"
    if not Path("/usr/include/librdkafka/rdkafka.h").exists():
        sys.exit("vs_kafka: librdkafka's headers are missing (Debian package librdkafka-dev; bench/run installs it)")
    run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(src), "-lrdkafka", "-lpthread"], 120,
        "compiling bench/rdkafka_perf.c")
    return out


# --- the servers -------------------------------------------------------------------------------


class Server:
    name: str
    pid: int
    bootstrap: str

    def stop(self) -> None:
        raise NotImplementedError


class Weir(Server):
    def __init__(self, binary: Path, scratch: Path, sessions: bool):
        self.name = "weir" if sessions else "weir-sessionless"
        port, http = free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(dir=scratch, prefix="weir-"))
        self.bootstrap = f"127.0.0.1:{port}"
        config = self.dir / "weir.yaml"
        config.write_text("" if sessions else "max_incremental_fetch_session_cache_slots: 0\n")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(config), "--data-dir", str(self.dir / "data"),
             "--listener", f"PLAINTEXT://{self.bootstrap}", "--http-addr", f"127.0.0.1:{http}"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "weir.log", "w"))
        self.pid = self.proc.pid
        wait_for_port(port, self.proc.poll, self.dir / "weir.log")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Kafka(Server):
    def __init__(self, kafka_dir: Path, scratch: Path, sessions: bool):
        self.name = "kafka" if sessions else "kafka-sessionless"
        port = free_port()
        while port + 1 > 65535 or not port_free(port + 1):
            port = free_port()
        self.kafka_dir = kafka_dir
        self.dir = Path(tempfile.mkdtemp(dir=scratch, prefix="kafka-"))
        self.bootstrap = f"127.0.0.1:{port}"
        env = dict(os.environ)
        if not sessions:
            env["KAFKA_ANCHOR_EXTRA_PROPS"] = "max.incremental.fetch.session.cache.slots=0"
        out = subprocess.run(["bash", "-c", f"source {shlex.quote(str(kafka_dir / 'kafka.sh'))} && "
                              f"kafka_anchor_start {port} {shlex.quote(str(self.dir))}"],
                             capture_output=True, text=True, timeout=180, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"starting Kafka failed: {out.stderr.strip()[-2000:]}")
        out = out.stdout
        self.pid = int(out.split()[-1])

    def stop(self) -> None:
        subprocess.run(["bash", "-c", f"source {shlex.quote(str(self.kafka_dir / 'kafka.sh'))} && "
                        f"kafka_anchor_stop {self.pid}"], timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for_port(port: int, exited, log: Path) -> None:
    for _ in range(200):
        if exited() is not None:
            raise RuntimeError(f"weir exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"weir did not listen on {port}")


# --- the measurements --------------------------------------------------------------------------


@dataclass
class Workload:
    partitions: int
    size: int
    records: int
    # Consumers of many partitions, with and without fetch sessions.
    sessions: bool = False

    @property
    def name(self) -> str:
        size = f"{self.size // 1024}KiB" if self.size % 1024 == 0 else f"{self.size}B"
        return f"{self.partitions}p-{size}" + ("-sessions" if self.sessions else "")

    def systems(self, chosen: list[str]) -> list[str]:
        """The systems of `chosen` this workload runs."""
        if self.sessions:
            return chosen
        return [s for s in chosen if not s.endswith("-sessionless")]


def workloads(smoke: bool) -> list[Workload]:
    if smoke:
        return [Workload(1, 100, 20_000), Workload(6, 1024, 5_000), Workload(16, 100, 20_000, True)]
    return [Workload(1, 100, 2_000_000), Workload(6, 100, 2_000_000), Workload(1, 1024, 500_000),
            Workload(6, 1024, 500_000), Workload(16, 100, 2_000_000, True),
            Workload(256, 100, 2_000_000, True)]


def measure(server: Server, clients: Clients, w: Workload, e2e_secs: float, rate: int) -> dict:
    """Every phase of one workload against a fresh server; figures by name."""
    b, mb = server.bootstrap, w.records * w.size / 1e6
    out: dict[str, float] = {}

    def phase(prefix: str, f) -> dict:
        before, client_before = cpu_seconds(server.pid), clients_cpu_seconds()
        r = f()
        out[f"{prefix}_server_cpu_ms_per_mb"] = (cpu_seconds(server.pid) - before) * 1000 / mb
        out[f"{prefix}_client_cpu_ms_per_mb"] = (clients_cpu_seconds() - client_before) * 1000 / mb
        for k, v in r.items():
            out[f"{prefix}_{k}"] = v
        return r

    for t in ("java", "rdkafka", "e2e"):
        clients.create_topic(b, t, w.partitions)
    java = clients.kafka_dir is not None
    if java and not w.sessions:
        phase("java_produce", lambda: clients.java_produce(b, "java", w.records, w.size, "1"))

    def rd_produce() -> dict:
        r = clients.rdkafka_perf("produce", b, "rdkafka", str(w.records), str(w.size), "1")
        if r["failed"]:
            raise RuntimeError(f"librdkafka: {r['failed']} records not delivered")
        return {"records_per_s": w.records / r["seconds"], "ack_p50_ms": r["ack_p50_ms"],
                "ack_p99_ms": r["ack_p99_ms"]}

    def rd_consume(*mode: str) -> dict:
        r = clients.rdkafka_perf("consume", b, "rdkafka", str(w.records), *mode)
        return {"records_per_s": r["records"] / r["seconds"]}

    phase("rdkafka_produce", rd_produce)
    # Both consumers read the topic librdkafka filled, whose partitions hold the same number of
    # records give or take a few hundred. The Java producer's sticky partitioner fills them
    # unevenly, and a consumer left with only drained partitions long-polls (fetch.max.wait.ms)
    # while its other partitions wait for the next fetch: that tail would measure the spread.
    if java:
        phase("java_consume", lambda: clients.java_consume(b, "rdkafka", w.records))
    phase("rdkafka_consume", rd_consume)
    phase("rdkafka_batch_consume", lambda: rd_consume("batch"))
    if w.sessions:
        out["peak_rss_mb"] = peak_rss_mb(server.pid)
        return out
    r = clients.rdkafka_perf("e2e", b, "e2e", str(rate), str(e2e_secs), str(w.size), "1")
    if r["records"] != r["sent"] or r["failed"]:
        raise RuntimeError(f"e2e: sent {r['sent']}, read {r['records']}, failed {r['failed']}")
    out.update({f"e2e_{q}_ms": r[f"e2e_{q}_ms"] for q in ("p50", "p99", "p999")})
    out["peak_rss_mb"] = peak_rss_mb(server.pid)
    return out


# --- the report --------------------------------------------------------------------------------

# (key, label, higher is better)
FIGURES = [
    ("java_produce_records_per_s", "produce, Java client (records/s)", True),
    ("java_produce_ack_p99_ms", "produce ack p99, Java client (ms)", False),
    ("java_consume_records_per_s", "consume, Java client (records/s)", True),
    ("rdkafka_produce_records_per_s", "produce, librdkafka (records/s)", True),
    ("rdkafka_produce_ack_p99_ms", "produce ack p99, librdkafka (ms)", False),
    ("rdkafka_consume_records_per_s", "consume, librdkafka (records/s)", True),
    ("rdkafka_batch_consume_records_per_s", "consume, librdkafka in batches (records/s)", True),
    ("e2e_p50_ms", "end to end p50 at {rate}/s, librdkafka (ms)", False),
    ("e2e_p99_ms", "end to end p99 at {rate}/s, librdkafka (ms)", False),
    ("e2e_p999_ms", "end to end p99.9 at {rate}/s, librdkafka (ms)", False),
    ("java_produce_server_cpu_ms_per_mb", "server CPU per MB produced, Java client (ms)", False),
    ("java_consume_server_cpu_ms_per_mb", "server CPU per MB consumed, Java client (ms)", False),
    ("rdkafka_produce_server_cpu_ms_per_mb", "server CPU per MB produced, librdkafka (ms)", False),
    ("rdkafka_consume_server_cpu_ms_per_mb", "server CPU per MB consumed, librdkafka (ms)", False),
    ("rdkafka_batch_consume_server_cpu_ms_per_mb", "server CPU per MB consumed, librdkafka in batches (ms)", False),
    ("java_produce_client_cpu_ms_per_mb", "client CPU per MB produced, Java client (ms)", False),
    ("java_consume_client_cpu_ms_per_mb", "client CPU per MB consumed, Java client (ms)", False),
    ("rdkafka_produce_client_cpu_ms_per_mb", "client CPU per MB produced, librdkafka (ms)", False),
    ("rdkafka_consume_client_cpu_ms_per_mb", "client CPU per MB consumed, librdkafka (ms)", False),
    ("rdkafka_batch_consume_client_cpu_ms_per_mb", "client CPU per MB consumed, librdkafka in batches (ms)", False),
    ("peak_rss_mb", "server peak RSS (MB)", False),
]


def fmt(v: float) -> str:
    if v >= 10_000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def cell(runs: list[float]) -> str:
    if not runs:
        return "–"
    med = statistics.median(runs)
    if len(runs) == 1 or min(runs) == max(runs):
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(runs))}–{fmt(max(runs))})"


TITLES = {"weir": "weir", "kafka": "Apache Kafka", "weir-sessionless": "weir, no fetch sessions",
          "kafka-sessionless": "Kafka, no fetch sessions"}


def report(results: dict, systems: list[str], rate: int, kafka_found: bool) -> str:
    lines = ["| workload | figure | " + " | ".join(TITLES[s] for s in systems) + " | weir ÷ Kafka |",
             "|---|---|" + "---:|" * (len(systems) + 1)]
    for wname, by_system in results.items():
        for key, label, _ in FIGURES:
            runs = {s: [r[key] for r in by_system.get(s, []) if key in r] for s in systems}
            if not any(runs.values()):
                continue
            w, k = runs.get("weir"), runs.get("kafka")
            ratio = "–"
            if w and k and statistics.median(k) > 0:
                ratio = f"{statistics.median(w) / statistics.median(k):.2f}×"
            cells = " | ".join(cell(runs[s]) for s in systems)
            lines.append(f"| {wname} | {label.format(rate=f'{rate:,}')} | {cells} | {ratio} |")
    if not kafka_found:
        lines.append("")
        lines.append("Apache Kafka was not found, so weir is measured alone (with librdkafka only).")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weir-bin", default=str(Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/weir/target")) / "release/weir"))
    ap.add_argument("--kafka-dir", default=os.environ.get("WEIR_KAFKA_DIR", str(REPO.parent / "shared" / "kafka")))
    ap.add_argument("--smoke", action="store_true", help="tiny counts, one round: checks the harness works")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over every workload [default: 3; smoke 1]")
    ap.add_argument("--workloads", default="", help="comma-separated, e.g. 1p-100B,6p-100B")
    ap.add_argument("--systems", default="weir,kafka,weir-sessionless,kafka-sessionless",
                    help="any of weir, kafka, weir-sessionless, kafka-sessionless (the last two run "
                    "only the fetch-session workloads)")
    ap.add_argument("--rate", type=int, default=10_000, help="records/s of the end-to-end phase")
    ap.add_argument("--e2e-secs", type=float, default=None, help="[default: 15; smoke 2]")
    ap.add_argument("--json", help="write every run's figures here")
    a = ap.parse_args()
    rounds = a.rounds or (1 if a.smoke else 3)
    e2e_secs = a.e2e_secs or (2.0 if a.smoke else 15.0)
    chosen = workloads(a.smoke)
    if a.workloads:
        names = a.workloads.split(",")
        every = {w.name: w for w in workloads(a.smoke)}
        unknown = [n for n in names if n not in every]
        if unknown:
            sys.exit(f"vs_kafka: unknown workload(s) {unknown}; known: {', '.join(every)}")
        chosen = [every[n] for n in names]
    kafka_dir = Path(a.kafka_dir)
    kafka_found = (kafka_dir / "kafka.sh").exists()
    systems = [s for s in a.systems.split(",") if s]
    unknown = [s for s in systems if s not in TITLES]
    if unknown:
        sys.exit(f"vs_kafka: unknown system(s) {unknown}; known: {', '.join(TITLES)}")
    if not kafka_found:
        print(f"vs_kafka: Apache Kafka not found at {kafka_dir} (set WEIR_KAFKA_DIR or --kafka-dir): "
              "weir is measured alone, with librdkafka only", flush=True)
        systems = [s for s in systems if not s.startswith("kafka")]
    scratch = Path(tempfile.mkdtemp(prefix="weir-vs-kafka-"))
    results: dict[str, dict[str, list[dict]]] = {w.name: {} for w in chosen}
    failures: list[str] = []
    try:
        clients = Clients(kafka_dir if kafka_found else None, scratch)
        for rnd in range(rounds):
            for w in chosen:
                order = w.systems(systems)
                if rnd % 2:
                    order.reverse()
                for system in order:
                    sessions = not system.endswith("-sessionless")
                    server = (Weir(Path(a.weir_bin), scratch, sessions) if system.startswith("weir")
                              else Kafka(kafka_dir, scratch, sessions))
                    try:
                        r = measure(server, clients, w, e2e_secs, a.rate)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        # One failed row is reported; the rest of the run goes on.
                        failures.append(f"round {rnd + 1} {w.name} {system}: {str(e)[:1000]}")
                        print(f"vs_kafka: FAILED {failures[-1]}", flush=True)
                        continue
                    finally:
                        server.stop()
                    results[w.name].setdefault(system, []).append(r)
                    print(f"vs_kafka: round {rnd + 1}/{rounds} {w.name} {system}: "
                          + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(report(results, systems, a.rate, kafka_found))
    for f in failures:
        print(f"failed: {f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rate": a.rate, "results": results, "failures": failures},
                                           indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
