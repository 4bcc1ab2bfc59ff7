"""Consumer groups: the classic group protocol as Kafka's group coordinator runs it.

Membership and rebalances with confluent-kafka (range, roundrobin, cooperative-sticky),
members that close or get killed, committed offsets surviving consumer restarts and a
daemon kill -9, kafka-python with auto-commit, static membership, the admin APIs, the
`weir group` command line, and the generation checks, by hand on the wire.

Members that must be killed with SIGKILL run in subprocesses: this file doubles as the
worker script (`python test_groups.py worker CONFIG`), see `_worker_main`.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import pytest
from confluent_kafka import (Consumer, ConsumerGroupState, ConsumerGroupTopicPartitions, KafkaError,
                             KafkaException, Producer, TopicPartition)

import kafka_wire as kw
from support import (Outgoing, Rec, admin, committed_offsets, create_topic, kafka_error_code,
                     kp_consumer, produce_confluent, producer_conf, wait_until, watermarks)

# Short delays so that tests are quick: the first rebalance of an empty group waits 200 ms
# (Kafka's default is 3 s), and session timeouts down to 1 s are allowed.
GROUP_YAML = "group_initial_rebalance_delay_ms: 200\ngroup_min_session_timeout_ms: 1000\n"

WAIT_S = 60.0
ADMIN_TIMEOUT = 20


@pytest.fixture
def gweir(weir_factory):
    """A daemon with short group timings."""
    return weir_factory("weir", config_yaml=GROUP_YAML)


# ---------------------------------------------------------------------------
# in-process members (confluent-kafka), driven by the test thread
# ---------------------------------------------------------------------------

def group_conf(bootstrap: str, group: str, **extra) -> dict:
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "max.poll.interval.ms": 60000,
        "socket.timeout.ms": 10000,
        "partition.assignment.strategy": "range",
    }
    conf.update(extra)
    return conf


class Member:
    """A subscribed confluent-kafka consumer. Its rebalance callbacks run inside poll(),
    so the test must keep polling every member while a rebalance is under way (pump())."""

    def __init__(self, bootstrap: str, group: str, topic: str, name: str = "member", **conf):
        self.name = name
        self.topic = topic
        self.group = group
        full = group_conf(bootstrap, group, **conf)
        self.cooperative = full["partition.assignment.strategy"] == "cooperative-sticky"
        self.c = Consumer(full)
        self.owned: set[int] = set()
        self.assigns = 0
        self.revokes = 0
        self.losts = 0
        self.records: list[Rec] = []
        self.closed = False
        self.c.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                         on_lost=self._on_lost)

    def _on_assign(self, consumer, parts):
        self.assigns += 1
        if not self.cooperative:
            self.owned = set()
        self.owned |= {tp.partition for tp in parts}

    def _on_revoke(self, consumer, parts):
        self.revokes += 1
        self.owned -= {tp.partition for tp in parts}

    def _on_lost(self, consumer, parts):
        self.losts += 1
        self.owned -= {tp.partition for tp in parts}

    def poll(self, timeout: float = 0.05) -> None:
        for m in self.c.consume(num_messages=500, timeout=timeout):
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"{self.name}: consumer error: {m.error()}")
            self.records.append(Rec(m.partition(), m.offset(), m.key(), m.value(),
                                    timestamp=m.timestamp()[1]))

    def offsets(self, p: int) -> list[int]:
        return [r.offset for r in self.records if r.partition == p]

    def reached(self, p: int, offset: int) -> bool:
        offs = self.offsets(p)
        return bool(offs) and max(offs) >= offset

    def commit(self, offsets: dict[int, int], metadata: str | None = None) -> None:
        tps = [TopicPartition(self.topic, p, o, metadata) if metadata is not None
               else TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())]
        res = self.c.commit(offsets=tps, asynchronous=False)
        bad = [tp for tp in res or [] if tp.error is not None]
        assert not bad, f"{self.name}: commit failed for {bad}"

    def committed(self, partitions) -> dict[int, tuple[int, Optional[str]]]:
        res = self.c.committed([TopicPartition(self.topic, p) for p in partitions], timeout=15)
        return {tp.partition: (tp.offset, tp.metadata) for tp in res}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.c.close()


@pytest.fixture
def members(gweir):
    """Factory for in-process members of groups on `gweir`; all are closed at teardown."""
    made: list[Member] = []

    def make(group: str, topic: str, name: str = "member", **conf) -> Member:
        m = Member(gweir.bootstrap, group, topic, name, **conf)
        made.append(m)
        return m

    yield make
    for m in made:
        try:
            m.close()
        except Exception:
            pass


def pump(ms: list[Member], until: Callable[[], object], timeout: float = WAIT_S,
         message: str | Callable[[], str] = "condition") -> None:
    """Poll every member in turn until `until()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for m in ms:
            m.poll(0.05)
        if until():
            return
        if time.monotonic() > deadline:
            msg = message() if callable(message) else message
            state = ", ".join(f"{m.name}: owns {sorted(m.owned)}, {len(m.records)} records"
                              for m in ms)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {msg} ({state})")


def pump_for(ms: list[Member], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for m in ms:
            m.poll(0.05)


def end_offsets(bootstrap: str, topic: str, partitions) -> dict[int, int]:
    return {p: hi for p, (_, hi) in watermarks(bootstrap, topic, partitions).items()}


def keyed_records(n: int, partitions: int, prefix: bytes = b"rec", keys: int = 60,
                  first: int = 0) -> list[Outgoing]:
    return [Outgoing(value=b"%s-%06d" % (prefix, i), key=b"key-%02d" % (i % keys),
                     partition=i % partitions) for i in range(first, first + n)]


def by_partition(recs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for r in recs:
        out[r.partition].append(r.offset)
    return out


# ---------------------------------------------------------------------------
# subprocess members (for kill -9)
# ---------------------------------------------------------------------------

def _worker_main(cfg: dict) -> int:
    """A group member in its own process. Reads commands on stdin (`hold`: stop committing,
    `close`); writes one JSON event per line on stdout, each stamped with time.monotonic()
    (one clock for every process):

      assign/revoke/lost  partitions, their assignment epochs and the whole owned set
      recs                records handed to the application: [partition, offset, epoch]
      commit_try          offsets about to be committed (the commit may or may not land)
      commit              offsets whose synchronous commit succeeded
      commit_failed       offsets whose commit failed
      held, stray, error, closed
    """
    topic = cfg["topic"]
    cooperative = cfg["conf"]["partition.assignment.strategy"] == "cooperative-sticky"
    out_lock = threading.Lock()

    def emit(ev: str, **kw) -> None:
        kw["ev"] = ev
        kw["t"] = time.monotonic()
        line = json.dumps(kw)
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    stop = threading.Event()

    hold = threading.Event()

    def read_stdin():
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "hold":  # keep consuming, never commit again
                hold.set()
                emit("held")
            elif cmd == "close":
                break
        stop.set()  # "close", or the test process went away

    threading.Thread(target=read_stdin, daemon=True).start()
    rnd = random.Random(cfg["seed"])
    owned: set[int] = set()
    epoch: dict[int, int] = defaultdict(int)
    pending: dict[int, int] = {}  # partition -> next offset, processed but not committed
    c = Consumer(cfg["conf"])

    def commit(parts) -> None:
        offs = {p: pending[p] for p in parts if p in pending}
        if not offs or hold.is_set():
            return
        emit("commit_try", offs=offs)
        try:
            res = c.commit(offsets=[TopicPartition(topic, p, o) for p, o in sorted(offs.items())],
                           asynchronous=False)
            bad = {tp.partition: str(tp.error) for tp in res or [] if tp.error is not None}
        except KafkaException as e:
            bad = {p: str(e) for p in offs}
        good = {p: o for p, o in offs.items() if p not in bad}
        if good:
            emit("commit", offs=good)
        if bad:
            emit("commit_failed", offs={p: offs[p] for p in bad}, err=sorted(set(bad.values())))
        for p, o in good.items():
            if pending.get(p) == o:
                del pending[p]

    def on_assign(consumer, parts):
        ps = sorted(tp.partition for tp in parts)
        if not cooperative:
            owned.clear()
        for p in ps:
            epoch[p] += 1
            owned.add(p)
        emit("assign", parts=ps, epochs={p: epoch[p] for p in ps}, owned=sorted(owned),
             member=consumer.memberid())

    def on_revoke(consumer, parts):
        ps = sorted(tp.partition for tp in parts)
        commit(ps)  # the usual pattern: commit what was processed before giving it up
        for p in ps:
            owned.discard(p)
            pending.pop(p, None)
        emit("revoke", parts=ps, owned=sorted(owned))

    def on_lost(consumer, parts):
        ps = sorted(tp.partition for tp in parts)
        for p in ps:
            owned.discard(p)
            pending.pop(p, None)
        emit("lost", parts=ps, owned=sorted(owned))

    c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
    emit("start", pid=os.getpid())
    while not stop.is_set():
        msgs = c.consume(num_messages=cfg["batch"], timeout=0.1)
        recs = []
        for m in msgs:
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    emit("error", err=str(m.error()))
                continue
            p = m.partition()
            if p not in owned:
                emit("stray", p=p, o=m.offset())
                continue
            recs.append([p, m.offset(), epoch[p]])
            pending[p] = m.offset() + 1
        if recs:
            emit("recs", recs=recs)
            time.sleep(cfg["process_s"])  # "processing"
        # commit now and then, so that a kill usually leaves processed, uncommitted records
        if pending and rnd.random() < cfg["commit_prob"]:
            commit(sorted(pending))
    commit(sorted(pending))
    c.close()
    emit("closed")
    return 0


class Worker:
    """A member running `_worker_main` in a subprocess; its events are collected by a thread."""

    def __init__(self, name: str, cfg: dict, workdir: Path):
        self.name = name
        self.stderr_path = workdir / f"worker-{name}.stderr"
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.killed_at: float | None = None
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "worker", json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                cwd=os.path.dirname(os.path.abspath(__file__)))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line cut short by kill -9
            with self.lock:
                self.events.append(ev)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.events)

    def owned(self) -> set[int] | None:
        for ev in reversed(self.snapshot()):
            if "owned" in ev:
                return set(ev["owned"])
        return None

    def stderr_tail(self, n: int = 30) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None and self.killed_at is None:
            raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}\n"
                                 f"--- stderr ---\n{self.stderr_tail()}")

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = WAIT_S) -> int:
        self.send("close")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.name} did not close within {timeout:.0f}s\n"
                                 f"--- stderr ---\n{self.stderr_tail()}") from None
        self.reader.join(10)
        return rc

    def kill(self) -> None:
        """kill -9: no LeaveGroup, no last commit."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed_at = time.monotonic()
        self.reader.join(10)

    def stop_quietly(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class BackgroundProducer(threading.Thread):
    """Keeps producing keyed records in small rounds until stopped."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, first_index: int):
        super().__init__(daemon=True)
        self.topic = topic
        self.partitions = partitions
        self.index = first_index
        self.producer = Producer(producer_conf(bootstrap, **{"linger.ms": 5}))
        self.acked: list[Rec] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def _cb(self, err, msg):
        with self.lock:
            if err is not None:
                self.errors.append(str(err))
            else:
                self.acked.append(Rec(msg.partition(), msg.offset(), msg.key(), msg.value()))

    def run(self):
        try:
            while not self.stop_event.is_set():
                for _ in range(30):
                    i = self.index
                    self.producer.produce(self.topic, value=b"live-%06d" % i, key=b"key-%02d" % (i % 60),
                                          partition=i % self.partitions, on_delivery=self._cb)
                    self.index += 1
                self.producer.flush(30)
                self.stop_event.wait(0.2)
        except BaseException as e:  # surfaced by the test
            self.errors.append(repr(e))
        finally:
            self.producer.flush(30)

    def finish(self) -> list[Rec]:
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive(), "background producer did not stop"
        assert not self.errors, f"background producer: {self.errors[:5]}"
        return list(self.acked)


def _records_after(w: Worker, event: str) -> set[tuple[int, int]]:
    """(partition, offset) of the records `w` processed after its first `event` event."""
    evs = w.snapshot()
    starts = [i for i, ev in enumerate(evs) if ev["ev"] == event]
    if not starts:
        return set()
    return {(p, o) for ev in evs[starts[0] + 1:] if ev["ev"] == "recs" for p, o, _ in ev["recs"]}


def wait_balanced(workers: list[Worker], partitions: int, what: str, timeout: float = WAIT_S) -> None:
    """Until the live workers' assignments are disjoint, cover every partition and are
    balanced (partitions / members each)."""
    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            w.check_alive()
        sets = [w.owned() for w in workers]
        if all(s is not None for s in sets):
            total = sum(len(s) for s in sets)
            if (set().union(*sets) == set(range(partitions)) and total == partitions
                    and all(len(s) == partitions // len(workers) for s in sets)):
                return
        if time.monotonic() > deadline:
            state = {w.name: sorted(w.owned() or []) for w in workers}
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: "
                                 f"assignments are {state}")
        time.sleep(0.1)


def check_history(workers: list[Worker], ends: dict[int, int]) -> dict:
    """Checks the event histories of all workers of one group; returns statistics.

    - at no time do two members own the same partition;
    - within one assignment of a partition, records arrive in order without gaps;
    - each assignment starts exactly at the offset committed before it (the newest
      successful commit stamped earlier), or at an offset whose commit was attempted
      earlier (a commit may land although its answer never arrived, e.g. under kill -9):
      so committed records are never delivered again, and nothing is skipped;
    - every record of every partition was delivered at least once.
    """
    periods: dict[tuple[str, int, int], dict] = {}
    open_period: dict[tuple[str, int], tuple[str, int, int]] = {}
    commits: dict[int, list[tuple[float, int]]] = defaultdict(list)
    tries: dict[int, list[tuple[float, int]]] = defaultdict(list)
    problems: list[str] = []
    for w in workers:
        evs = w.snapshot()
        for ev in evs:
            kind, t = ev["ev"], ev["t"]
            if kind == "assign":
                for p in ev["parts"]:
                    key = (w.name, p, ev["epochs"][str(p)])
                    periods[key] = {"start": t, "end": None, "offs": []}
                    open_period[(w.name, p)] = key
            elif kind in ("revoke", "lost"):
                for p in ev["parts"]:
                    key = open_period.pop((w.name, p), None)
                    if key is not None:
                        periods[key]["end"] = t
            elif kind == "recs":
                for p, o, e in ev["recs"]:
                    periods[(w.name, p, e)]["offs"].append(o)
            elif kind == "commit":
                for p, o in ev["offs"].items():
                    commits[int(p)].append((t, o))
            elif kind in ("commit_try", "commit_failed"):
                for p, o in ev["offs"].items():
                    tries[int(p)].append((t, o))
            elif kind == "error":
                problems.append(f"{w.name}: consumer error {ev['err']}")
        end = w.killed_at
        if end is None:
            closed = [ev["t"] for ev in evs if ev["ev"] == "closed"]
            end = closed[-1] if closed else float("inf")
        for (name, p), key in list(open_period.items()):
            if name == w.name:
                periods[key]["end"] = end
                del open_period[(name, p)]

    # 1. exclusive ownership
    by_p: dict[int, list[tuple[tuple[str, int, int], dict]]] = defaultdict(list)
    for key, per in periods.items():
        by_p[key[1]].append((key, per))
    for p, pers in by_p.items():
        pers.sort(key=lambda kv: kv[1]["start"])
        for i, (k1, a) in enumerate(pers):
            for k2, b in pers[i + 1:]:
                if k1[0] != k2[0] and b["start"] < a["end"] and a["start"] < b["end"]:
                    problems.append(f"partition {p}: owned by {k1[0]} (assignment #{k1[2]}) and "
                                    f"{k2[0]} (assignment #{k2[2]}) at the same time")

    # 2./3. each assignment continues exactly where the committed offset was
    redelivered = 0
    delivered: dict[int, set[int]] = defaultdict(set)
    for (name, p, e), per in sorted(periods.items(), key=lambda kv: kv[1]["start"]):
        offs = per["offs"]
        if not offs:
            continue
        if offs != list(range(offs[0], offs[0] + len(offs))):
            problems.append(f"{name}, partition {p}, assignment #{e}: offsets not consecutive: "
                            f"{offs[:20]}...")
        committed = max((o for t, o in commits[p] if t < per["start"]), default=0)
        allowed = {committed} | {o for t, o in tries[p] if t < per["start"] and o > committed}
        if offs[0] not in allowed:
            what = "re-delivered committed records" if offs[0] < committed else "skipped records"
            problems.append(f"{name}, partition {p}, assignment #{e}: started at offset {offs[0]}, "
                            f"but {committed} was committed before ({what})")
        redelivered += len(delivered[p] & set(offs))
        delivered[p] |= set(offs)

    # 4. nothing lost
    for p, end in ends.items():
        missing = sorted(set(range(end)) - delivered[p])
        if missing:
            problems.append(f"partition {p}: {len(missing)} record(s) never delivered, e.g. {missing[:10]}")

    assert not problems, "group history is wrong:\n  " + "\n  ".join(problems[:30])
    return {"assignments": len(periods), "redelivered": redelivered,
            "commits": sum(len(v) for v in commits.values())}


# ---------------------------------------------------------------------------
# 1. rebalancing: members join, close and die; nothing committed is lost or replayed
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["range", "roundrobin", "cooperative-sticky"])
def test_members_share_partitions_and_take_over_without_losing_commits(gweir, tmp_path, strategy):
    topic = "orders"
    partitions = 6
    group = f"billing-{strategy}"
    create_topic(gweir.bootstrap, topic, partitions)
    prefill = produce_confluent(gweir.bootstrap, topic, keyed_records(1200, partitions, b"pre"))
    assert set(by_partition(prefill)) == set(range(partitions))

    workers: dict[str, Worker] = {}

    def start(name: str, session_ms: int, seed: int) -> Worker:
        conf = group_conf(gweir.bootstrap, group, **{
            "client.id": f"worker-{name}",
            "partition.assignment.strategy": strategy,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": 300,
            "max.poll.interval.ms": 60000,
        })
        cfg = {"topic": topic, "conf": conf, "seed": seed, "batch": 20,
               "process_s": 0.01, "commit_prob": 0.3}
        w = Worker(name, cfg, tmp_path)
        workers[name] = w
        return w

    producer = BackgroundProducer(gweir.bootstrap, topic, partitions, first_index=1200)
    try:
        # w0 leaves with close(); its session timeout is long on purpose, so only its
        # LeaveGroup can move its partitions within the wait below.
        w0 = start("w0", 45000, 1)
        w1 = start("w1", 6000, 2)
        w2 = start("w2", 3000, 3)  # killed later: short session timeout
        wait_balanced([w0, w1, w2], partitions, "three members to share the 6 partitions")
        producer.start()
        wait_until(lambda: all(o >= 200 for o in
                               committed_offsets(gweir.bootstrap, group, topic, range(partitions)).values()),
                   WAIT_S, interval=0.5, message="the pre-filled records to be committed")

        before = {w.name: w.owned() for w in (w1, w2)}
        assert w0.close() == 0, f"w0 exited badly\n{w0.stderr_tail()}"
        wait_balanced([w1, w2], partitions, "the two remaining members to own all 6 partitions "
                      "after w0 closed (w0's session timeout is 45 s: this needs its LeaveGroup)",
                      timeout=30)
        if strategy == "cooperative-sticky":
            for w in (w1, w2):
                assert before[w.name] <= w.owned(), \
                    f"{w.name} lost partitions it owned: {before[w.name]} -> {w.owned()}"

        w3 = start("w3", 6000, 4)
        wait_balanced([w1, w2, w3], partitions, "a new member to get its share")

        # Kill w2 while it holds processed records it has not committed: they must be
        # delivered again to the members that take over its partitions.
        w2.send("hold")
        wait_until(lambda: w2.check_alive() or _records_after(w2, "held"), WAIT_S,
                   message="w2 to process records after it stopped committing")
        victim = set(w2.owned())
        w2.kill()
        wait_balanced([w1, w3], partitions,
                      f"w2's partitions {sorted(victim)} to move to the survivors after its "
                      f"session timeout (3 s)")

        acked = prefill + producer.finish()
        ends = end_offsets(gweir.bootstrap, topic, range(partitions))
        produced = {p: len(offs) for p, offs in by_partition(acked).items()}
        assert ends == produced, f"log end offsets {ends} != records produced {produced}"
        wait_until(lambda: committed_offsets(gweir.bootstrap, group, topic, range(partitions)) == ends,
                   WAIT_S, interval=0.5,
                   message=lambda: f"every record to be committed: committed "
                                   f"{committed_offsets(gweir.bootstrap, group, topic, range(partitions))}, "
                                   f"log ends {ends}")
        for w in (w1, w3):
            assert w.close() == 0, f"{w.name} exited badly\n{w.stderr_tail()}"
    finally:
        producer.stop_event.set()
        for w in workers.values():
            w.stop_quietly()

    stats = check_history(list(workers.values()), ends)
    assert stats["commits"] > 0 and stats["assignments"] >= 9, stats
    uncommitted = _records_after(w2, "held")
    again = {(p, o) for w in (w1, w3) for ev in w.snapshot() if ev["ev"] == "recs" and ev["t"] > w2.killed_at
             for p, o, _ in ev["recs"]}
    assert uncommitted <= again, \
        f"records the killed member processed but never committed were not delivered again: " \
        f"{sorted(uncommitted - again)[:10]}"


def test_initial_rebalance_delay_gathers_members_into_one_generation(weir_factory):
    """With group_initial_rebalance_delay_ms, members that join an empty group within the
    delay all get their assignment in the first generation: nobody is revoked."""
    d = weir_factory("weir", config_yaml="group_initial_rebalance_delay_ms: 3000\n")
    topic = "delayed"
    create_topic(d.bootstrap, topic, 6)
    ms: list[Member] = []
    try:
        for i in range(3):
            ms.append(Member(d.bootstrap, "delayed-group", topic, f"m{i}"))
        pump(ms, lambda: all(len(m.owned) == 2 for m in ms), message="three members with 2 partitions each")
        pump_for(ms, 1.0)
        assert set().union(*(m.owned for m in ms)) == set(range(6))
        assert [(m.assigns, m.revokes) for m in ms] == [(1, 0)] * 3, \
            "each member should be assigned once, in the first generation"
    finally:
        for m in ms:
            m.close()


# ---------------------------------------------------------------------------
# 2. committed offsets survive consumer restarts and a daemon kill -9
# ---------------------------------------------------------------------------

def test_resume_at_committed_offsets_after_consumer_restart_and_daemon_crash(gweir, members):
    topic = "resume"
    partitions = 3
    group = "resumers"
    create_topic(gweir.bootstrap, topic, partitions)
    produce_confluent(gweir.bootstrap, topic, keyed_records(300, partitions))  # 100 per partition

    # The first consumer processes 25 / 50 / 75 records of partitions 0 / 1 / 2 and commits that.
    want = {0: 25, 1: 50, 2: 75}
    a = members(group, topic, "first")
    pump([a], lambda: all(a.reached(p, want[p] - 1) for p in range(partitions)),
         message="the first consumer to read its records")
    assert a.owned == set(range(partitions))
    a.commit(want)
    a.close()

    b = members(group, topic, "second")
    pump([b], lambda: all(b.reached(p, 99) for p in range(partitions)),
         message="the second consumer to read to the end")
    for p in range(partitions):
        assert b.offsets(p) == list(range(want[p], 100)), \
            f"partition {p}: after a restart the group must resume at {want[p]}, " \
            f"got offsets {b.offsets(p)[:5]}..."
    assert {p: o for p, (o, _) in b.committed(range(partitions)).items()} == want

    # Commit with metadata, leave, kill -9 the daemon: the commit must survive.
    want2 = {0: 90, 1: 61, 2: 100}
    b.commit(want2, metadata="checkpoint-2")
    b.close()
    produce_confluent(gweir.bootstrap, topic, keyed_records(30, partitions, b"late", first=300))
    gweir.kill()
    gweir.start()

    listed = _listed(admin(gweir.bootstrap))
    assert group in listed, f"group {group} is gone after the restart: {sorted(listed)}"
    assert listed[group].state == ConsumerGroupState.EMPTY

    c = members(group, topic, "third")
    pump([c], lambda: all(c.reached(p, 109) for p in range(partitions)),
         message="the third consumer to read to the end")
    for p in range(partitions):
        assert c.offsets(p) == list(range(want2[p], 110)), \
            f"partition {p}: after kill -9 and restart the group must resume at {want2[p]}, " \
            f"got offsets {c.offsets(p)[:5]}..."
    assert c.committed(range(partitions)) == {p: (o, "checkpoint-2") for p, o in want2.items()}


# ---------------------------------------------------------------------------
# 3. kafka-python with auto-commit
# ---------------------------------------------------------------------------

def test_kafka_python_auto_commit_and_continue(gweir):
    from kafka import TopicPartition as KTP

    topic = "kp-auto"
    partitions = 2
    group = "kp-auto-group"
    create_topic(gweir.bootstrap, topic, partitions)
    # kafka-python's producer is idempotent by default; produce with confluent-kafka
    acked = produce_confluent(gweir.bootstrap, topic, keyed_records(200, partitions))
    tps = [KTP(topic, p) for p in range(partitions)]

    first: list[tuple[int, int]] = []
    c1 = kp_consumer(gweir.bootstrap, group_id=group, enable_auto_commit=True,
                     auto_commit_interval_ms=100, max_poll_records=7)
    try:
        c1.subscribe([topic])
        deadline = time.monotonic() + WAIT_S
        while len(first) < 60:
            assert time.monotonic() < deadline, f"kafka-python consumer got only {len(first)} records"
            for tp, msgs in c1.poll(timeout_ms=200).items():
                first += [(m.partition, m.offset) for m in msgs]
        # Stop taking records, keep polling: only the auto-commit timer can commit now.
        c1.pause(*c1.assignment())
        positions = {tp.partition: c1.position(tp) for tp in tps}
        late: list = []

        def auto_committed():
            for tp, msgs in c1.poll(timeout_ms=100).items():
                late.extend(msgs)
            return committed_offsets(gweir.bootstrap, group, topic, range(partitions)) == positions

        wait_until(auto_committed, WAIT_S, interval=0.05,
                   message=lambda: f"auto-commit of {positions}; committed "
                                   f"{committed_offsets(gweir.bootstrap, group, topic, range(partitions))}")
        assert not late, f"paused consumer returned {len(late)} records"
    finally:
        c1.close(autocommit=False)

    for p, o in first:
        assert o < positions[p]

    second: list[tuple[int, int]] = []
    c2 = kp_consumer(gweir.bootstrap, group_id=group, enable_auto_commit=True,
                     auto_commit_interval_ms=100)
    try:
        c2.subscribe([topic])
        deadline = time.monotonic() + WAIT_S
        while any(max([o for p2, o in second if p2 == p], default=positions[p] - 1) < 99
                  for p in range(partitions)):
            assert time.monotonic() < deadline, f"second kafka-python consumer: {len(second)} records"
            for tp, msgs in c2.poll(timeout_ms=200).items():
                second += [(m.partition, m.offset) for m in msgs]
    finally:
        c2.close()  # commits its position

    for p in range(partitions):
        offs = [o for p2, o in second if p2 == p]
        assert offs == list(range(positions[p], 100)), \
            f"partition {p}: the second consumer should continue at {positions[p]}: got {offs[:5]}..."
    assert sorted(first + second) == sorted((a.partition, a.offset) for a in acked), \
        "every record exactly once across the two consumers"
    assert committed_offsets(gweir.bootstrap, group, topic, range(partitions)) == {0: 100, 1: 100}


# ---------------------------------------------------------------------------
# 4. static membership
# ---------------------------------------------------------------------------

def test_static_member_restart_keeps_its_assignment_without_rebalance(gweir, members):
    from kafka.admin import KafkaAdminClient, MemberToRemove

    topic = "static"
    partitions = 4
    group = "static-group"
    create_topic(gweir.bootstrap, topic, partitions)
    produce_confluent(gweir.bootstrap, topic, keyed_records(80, partitions))
    # A long session timeout: a static member that closes stays in the group until it expires.
    static_conf = {"group.instance.id": "static-a", "client.id": "static-a",
                   "session.timeout.ms": 300000, "max.poll.interval.ms": 300000}

    other = members(group, topic, "other", **{"client.id": "other"})
    pump([other], lambda: other.owned == set(range(partitions)), message="the first member's assignment")
    s1 = members(group, topic, "static", **static_conf)
    pump([other, s1], lambda: len(other.owned) == 2 and len(s1.owned) == 2
         and other.owned | s1.owned == set(range(partitions)), message="two members sharing 4 partitions")
    pump_for([other, s1], 1.0)
    assert len(other.owned) == 2 and len(s1.owned) == 2
    mine = set(s1.owned)
    other_parts = set(other.owned)
    other_id = other.c.memberid()
    calls = (other.assigns, other.revokes, other.losts)

    s1.close()  # a static member does not send LeaveGroup on close (KIP-345)
    desc = _describe(admin(gweir.bootstrap), group)
    assert sorted(m.group_instance_id or "" for m in desc.members) == ["", "static-a"], \
        f"the closed static member should still be in the group: {[(m.member_id, m.group_instance_id) for m in desc.members]}"

    s2 = members(group, topic, "static-restarted", **static_conf)
    pump([other, s2], lambda: s2.assigns > 0, message="the restarted static member's assignment")
    pump_for([other, s2], 1.0)
    assert s2.owned == mine, f"the restarted static member got {sorted(s2.owned)}, had {sorted(mine)}"
    assert (other.assigns, other.revokes, other.losts) == calls, \
        "the other member went through a rebalance when the static member came back"
    assert other.owned == other_parts and other.c.memberid() == other_id
    desc = _describe(admin(gweir.bootstrap), group)
    assert desc.state == ConsumerGroupState.STABLE
    assert len(desc.members) == 2
    [static] = [m for m in desc.members if m.group_instance_id == "static-a"]
    assert {tp.partition for tp in static.assignment.topic_partitions} == mine
    # the replacement is a full member: its commits are accepted
    s2.commit({p: 3 for p in mine})
    assert committed_offsets(gweir.bootstrap, group, topic, sorted(mine)) == {p: 3 for p in mine}

    # Close it again and remove it by group.instance.id (batched LeaveGroup): the other member
    # takes everything without waiting for the 300 s session timeout.
    s2.close()
    ka = KafkaAdminClient(bootstrap_servers=gweir.bootstrap, request_timeout_ms=15000)
    try:
        res = ka.remove_group_members(group, [MemberToRemove(group_instance_id="static-a")])
    finally:
        ka.close()
    assert [e.errno for e in res.values()] == [0], res
    pump([other], lambda: other.owned == set(range(partitions)), timeout=WAIT_S,
         message="the remaining member to own all partitions after the static member was removed")


# ---------------------------------------------------------------------------
# 5. admin APIs
# ---------------------------------------------------------------------------

def _alter_offsets_error(a, group: str, tps: list[TopicPartition]) -> int | None:
    fut = a.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)],
                                         request_timeout=ADMIN_TIMEOUT)[group]
    try:
        res = fut.result(ADMIN_TIMEOUT)
    except KafkaException as e:
        return kafka_error_code(e)
    errs = [tp.error.code() for tp in res.topic_partitions if tp.error is not None]
    return errs[0] if errs else None


def _list_offsets(a, group: str) -> dict[tuple[str, int], int]:
    res = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                        request_timeout=ADMIN_TIMEOUT)[group].result(ADMIN_TIMEOUT)
    return {(tp.topic, tp.partition): tp.offset for tp in res.topic_partitions or []
            if tp.offset >= 0}


def _listed(a) -> dict:
    # `a` stays referenced until the result is in: a destroyed AdminClient never answers
    res = a.list_consumer_groups(request_timeout=ADMIN_TIMEOUT).result(ADMIN_TIMEOUT)
    assert not res.errors, res.errors
    return {g.group_id: g for g in res.valid}


def _describe(a, group: str):
    return a.describe_consumer_groups([group], request_timeout=ADMIN_TIMEOUT)[group].result(ADMIN_TIMEOUT)


def test_admin_client_groups_and_offsets(gweir, members):
    from kafka import TopicPartition as KTP
    from kafka.admin import KafkaAdminClient

    topic = "admin-groups"
    partitions = 3
    group = "admin-group"
    create_topic(gweir.bootstrap, topic, partitions)
    produce_confluent(gweir.bootstrap, topic, keyed_records(60, partitions))
    a = admin(gweir.bootstrap)

    m = members(group, topic, "m", **{"client.id": "admin-test-client"})
    pump([m], lambda: m.owned == set(range(partitions)) and all(m.reached(p, 19) for p in range(partitions)),
         message="the member to read its partitions")
    m.commit({0: 5, 1: 6, 2: 7})

    listed = _listed(a)
    assert group in listed, sorted(listed)
    assert listed[group].state == ConsumerGroupState.STABLE
    assert listed[group].is_simple_consumer_group is False

    desc = a.describe_consumer_groups([group], request_timeout=ADMIN_TIMEOUT)[group].result(ADMIN_TIMEOUT)
    assert desc.group_id == group
    assert desc.state == ConsumerGroupState.STABLE
    assert desc.partition_assignor == "range"
    assert desc.is_simple_consumer_group is False
    [md] = desc.members
    assert md.member_id == m.c.memberid()
    assert md.client_id == "admin-test-client"
    assert "127.0.0.1" in md.host, md.host
    assert sorted((tp.topic, tp.partition) for tp in md.assignment.topic_partitions) == \
        [(topic, p) for p in range(partitions)]

    assert _list_offsets(a, group) == {(topic, 0): 5, (topic, 1): 6, (topic, 2): 7}

    # An active group cannot be deleted, nor its offsets changed from outside.
    with pytest.raises(KafkaException) as exc:
        a.delete_consumer_groups([group], request_timeout=ADMIN_TIMEOUT)[group].result(ADMIN_TIMEOUT)
    assert kafka_error_code(exc.value) == KafkaError.NON_EMPTY_GROUP, exc.value
    assert _alter_offsets_error(a, group, [TopicPartition(topic, 0, 1)]) == KafkaError.UNKNOWN_MEMBER_ID
    ka = KafkaAdminClient(bootstrap_servers=gweir.bootstrap, request_timeout_ms=15000)
    try:
        res = ka.delete_group_offsets(group, [KTP(topic, 1)])
        assert res[KTP(topic, 1)].errno == KafkaError.GROUP_SUBSCRIBED_TO_TOPIC, res
        assert _list_offsets(a, group) == {(topic, 0): 5, (topic, 1): 6, (topic, 2): 7}

        m.close()
        wait_until(lambda: _listed(a)[group].state == ConsumerGroupState.EMPTY, WAIT_S,
                   message="the group to be empty after its only member closed")
        desc = a.describe_consumer_groups([group], request_timeout=ADMIN_TIMEOUT)[group].result(ADMIN_TIMEOUT)
        assert desc.state == ConsumerGroupState.EMPTY and desc.members == []

        # Empty: offsets can be altered and deleted.
        assert _alter_offsets_error(a, group, [TopicPartition(topic, 0, 1), TopicPartition(topic, 2, 15)]) is None
        assert _list_offsets(a, group) == {(topic, 0): 1, (topic, 1): 6, (topic, 2): 15}
        res = ka.delete_group_offsets(group, [KTP(topic, 1)])
        assert res[KTP(topic, 1)].errno == 0, res
        assert _list_offsets(a, group) == {(topic, 0): 1, (topic, 2): 15}

        # A second group, only ever used through the admin API; both read in one OffsetFetch.
        other = "admin-group-2"
        assert _alter_offsets_error(a, other, [TopicPartition(topic, 1, 11)]) is None
        both = ka.list_group_offsets([group, other])
        assert {g: {(tp.topic, tp.partition): om.offset for tp, om in offs.items()}
                for g, offs in both.items()} == \
            {group: {(topic, 0): 1, (topic, 2): 15}, other: {(topic, 1): 11}}
    finally:
        ka.close()

    # A consumer of the group starts at the altered offsets; partition 1 has none: earliest.
    m2 = members(group, topic, "m2")
    pump([m2], lambda: all(m2.reached(p, 19) for p in range(partitions)), message="m2 to read")
    assert {p: m2.offsets(p)[0] for p in range(partitions)} == {0: 1, 1: 0, 2: 15}
    m2.close()
    wait_until(lambda: _listed(a)[group].state == ConsumerGroupState.EMPTY, WAIT_S,
               message="the group to be empty again")

    fs = a.delete_consumer_groups([group, other], request_timeout=ADMIN_TIMEOUT)
    for g, fut in fs.items():
        fut.result(ADMIN_TIMEOUT)
    listed = _listed(a)
    assert group not in listed and other not in listed, sorted(listed)
    assert _list_offsets(a, group) == {}
    assert _list_offsets(a, other) == {}


# ---------------------------------------------------------------------------
# 6. the `weir group` command line
# ---------------------------------------------------------------------------

def _group_states(weir) -> dict[str, str]:
    out = {}
    for line in weir.cli("group", "list").stdout.decode().splitlines():
        if "\t" in line:
            name, state = line.split("\t", 1)
            out[name.strip()] = state.strip()
    return out


def _describe_json(weir, group: str) -> dict:
    res = weir.cli("group", "describe", group, "--format", "json")
    try:
        return json.loads(res.stdout)
    except ValueError:
        raise AssertionError(f"`weir group describe --format json` printed no JSON: {res.stdout[:500]!r}") from None


def _json_offsets(d: dict) -> dict[tuple[str, int], tuple[int, int, int]]:
    return {(o["topic"], o["partition"]): (o["committed"], o["log_end"], o["lag"]) for o in d["offsets"]}


def _wait_empty(weir, group: str) -> None:
    wait_until(lambda: _group_states(weir).get(group) == "Empty", WAIT_S,
               message=lambda: f"group {group} to be Empty: `weir group list` says {_group_states(weir)}")


def test_cli_group_list_describe_reset_delete(gweir, members):
    topic = "cli-groups"
    partitions = 2
    group = "cli-group"
    create_topic(gweir.bootstrap, topic, partitions, config={"retention.ms": "-1"})
    base = (int(time.time()) - 3600) * 1000  # whole seconds: --to-datetime has second precision
    produce_confluent(gweir.bootstrap, topic, [
        Outgoing(value=b"v-%d-%02d" % (p, i), key=b"k%d" % i, partition=p, timestamp=base + 1000 * i)
        for i in range(50) for p in range(partitions)])

    m = members(group, topic, "cli-member", **{"client.id": "cli-client"})
    pump([m], lambda: m.owned == {0, 1} and m.reached(0, 19) and m.reached(1, 34),
         message="the member to read")
    m.commit({0: 20, 1: 35})

    assert _group_states(gweir).get(group) == "Stable"
    d = _describe_json(gweir, group)
    assert (d["group"], d["state"], d["protocol"]) == (group, "Stable", "range"), d
    [mem] = d["members"]
    assert mem["member_id"] == m.c.memberid()
    assert mem["client_id"] == "cli-client"
    assert mem["host"], mem
    assert sorted((x["topic"], x["partition"]) for x in mem["assignment"]) == [(topic, 0), (topic, 1)]
    want = {(topic, 0): (20, 50, 30), (topic, 1): (35, 50, 15)}
    assert _json_offsets(d) == want

    text = gweir.cli("group", "describe", group).stdout.decode()
    for needle in (group, "Stable", "range", m.c.memberid(), "cli-client"):
        assert needle in text, f"{needle!r} missing from `weir group describe`:\n{text}"
    lines = [set(re.split(r"[\s|,:=()\[\]]+", line)) for line in text.splitlines()]
    for (t, p), nums in want.items():
        need = {t, str(p)} | {str(n) for n in nums}
        assert any(need <= tokens for tokens in lines), \
            f"no line with topic, partition {p}, committed, log end and lag {nums}:\n{text}"

    # A group with members can be neither reset nor deleted.
    res = gweir.cli("group", "reset-offsets", group, "--topic", topic, "--to-earliest", check=False)
    assert res.returncode != 0, "reset-offsets on an active group must fail"
    err = (res.stderr + res.stdout).decode(errors="replace")
    assert re.search(r"not\s+empty|non-?empty", err, re.I), f"error should say the group is not empty: {err}"
    res = gweir.cli("group", "delete", group, check=False)
    assert res.returncode != 0, "deleting an active group must fail"
    assert _json_offsets(_describe_json(gweir, group)) == want

    m.close()
    _wait_empty(gweir, group)
    d = _describe_json(gweir, group)
    assert d["state"] == "Empty" and d["members"] == []
    assert _json_offsets(d) == want

    def reset_then_resume(args: list[str], expect: dict[int, int], log_end: int, name: str):
        gweir.cli("group", "reset-offsets", group, "--topic", topic, *args)
        got = _json_offsets(_describe_json(gweir, group))
        assert got == {(topic, p): (o, log_end, log_end - o) for p, o in expect.items()}, \
            f"after reset-offsets {' '.join(args)}"
        r = members(group, topic, name)
        pump([r], lambda: all(r.reached(p, expect[p]) for p in range(partitions)),
             message=f"a consumer to read after reset-offsets {' '.join(args)}")
        assert {p: r.offsets(p)[0] for p in range(partitions)} == expect, \
            f"a consumer should resume at the offsets set by reset-offsets {' '.join(args)}"
        r.close()
        _wait_empty(gweir, group)

    reset_then_resume(["--to-earliest"], {0: 0, 1: 0}, 50, "after-earliest")
    reset_then_resume(["--to-offset", "10"], {0: 10, 1: 10}, 50, "after-offset")
    when = datetime.fromtimestamp((base + 20_000) / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    reset_then_resume(["--to-datetime", when], {0: 20, 1: 20}, 50, "after-datetime")
    gweir.cli("group", "reset-offsets", group, "--topic", topic, "--to-latest")
    assert _json_offsets(_describe_json(gweir, group)) == {(topic, 0): (50, 50, 0), (topic, 1): (50, 50, 0)}
    produce_confluent(gweir.bootstrap, topic, keyed_records(4, partitions, b"new"))
    r = members(group, topic, "after-latest")
    pump([r], lambda: all(r.reached(p, 51) for p in range(partitions)), message="a consumer after --to-latest")
    assert {p: r.offsets(p) for p in range(partitions)} == {0: [50, 51], 1: [50, 51]}
    r.close()
    _wait_empty(gweir, group)

    gweir.cli("group", "delete", group)
    assert group not in _group_states(gweir)
    # Its offsets went with it: a new member of that name starts from the beginning.
    fresh = members(group, topic, "fresh")
    pump([fresh], lambda: all(fresh.reached(p, 0) for p in range(partitions)), message="a fresh member")
    assert {p: fresh.offsets(p)[0] for p in range(partitions)} == {0: 0, 1: 0}


# ---------------------------------------------------------------------------
# 7. generations, member ids and the group APIs on the wire
# ---------------------------------------------------------------------------

API_OFFSET_COMMIT = 8
API_OFFSET_FETCH = 9
API_FIND_COORDINATOR = 10
API_JOIN_GROUP = 11
API_HEARTBEAT = 12
API_LEAVE_GROUP = 13
API_SYNC_GROUP = 14
API_DESCRIBE_GROUPS = 15
API_LIST_GROUPS = 16
API_DELETE_GROUPS = 42
API_OFFSET_DELETE = 47

ERR_NONE = 0
ERR_ILLEGAL_GENERATION = 22
ERR_UNKNOWN_MEMBER_ID = 25
ERR_INVALID_SESSION_TIMEOUT = 26
ERR_REBALANCE_IN_PROGRESS = 27
ERR_MEMBER_ID_REQUIRED = 79


def _i8(n: int) -> bytes:
    return struct.pack(">b", n)


def _i16(n: int) -> bytes:
    return struct.pack(">h", n)


def _i32(n: int) -> bytes:
    return struct.pack(">i", n)


def _i64(n: int) -> bytes:
    return struct.pack(">q", n)


def _bytes(b: bytes | None) -> bytes:
    return _i32(-1) if b is None else _i32(len(b)) + b


def _array(items: list[bytes]) -> bytes:
    return _i32(len(items)) + b"".join(items)


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _cstr(s: str | None) -> bytes:
    if s is None:
        return b"\x00"
    raw = s.encode()
    return _uvarint(len(raw) + 1) + raw


class WireReader(kw.Reader):
    def i8(self) -> int:
        return struct.unpack(">b", self._take(1))[0]

    def nstr(self) -> str | None:
        n = self.i16()
        return None if n < 0 else self._take(n).decode()

    def bytes_(self) -> bytes | None:
        n = self.i32()
        return None if n < 0 else self._take(n)

    def uvarint(self) -> int:
        shift = value = 0
        while True:
            b = self._take(1)[0]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def cstr(self) -> str | None:
        n = self.uvarint() - 1
        return None if n < 0 else self._take(n).decode()

    def tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self._take(self.uvarint())


class RawClient:
    """One connection speaking hand-made group requests (non-flexible versions unless told)."""

    def __init__(self, bootstrap: str):
        self.sock = kw.connect(bootstrap, timeout=30)
        self.corr = 0

    def send(self, api: int, version: int, body: bytes, flexible: bool = False) -> int:
        self.corr += 1
        self.sock.sendall(kw.frame(kw.request_header(api, version, self.corr, flexible=flexible) + body))
        return self.corr

    def recv(self, corr: int, flexible: bool = False) -> WireReader:
        r = WireReader(kw.recv_frame(self.sock))
        got = r.i32()
        assert got == corr, f"response correlation id {got}, expected {corr}"
        if flexible:
            r.tags()
        return r

    def call(self, api: int, version: int, body: bytes, flexible: bool = False) -> WireReader:
        return self.recv(self.send(api, version, body, flexible), flexible)

    def close(self):
        self.sock.close()

    # -- requests ------------------------------------------------------------
    def join_send(self, group: str, member: str, metadata: bytes, session_ms: int = 30000) -> int:
        body = (kw.string(group) + _i32(session_ms) + _i32(30000) + kw.string(member) + kw.string(None)
                + kw.string("consumer") + _array([kw.string("range") + _bytes(metadata)]))
        return self.send(API_JOIN_GROUP, 5, body)

    def join_recv(self, corr: int) -> dict:
        r = self.recv(corr)
        r.i32()
        out = {"err": r.i16(), "gen": r.i32(), "protocol": r.str(), "leader": r.str(), "member": r.str()}
        out["members"] = sorted((r.str(), r.nstr(), r.bytes_()) for _ in range(r.i32()))
        return out

    def join(self, group: str, member: str, metadata: bytes, session_ms: int = 30000) -> dict:
        return self.join_recv(self.join_send(group, member, metadata, session_ms))

    def sync_send(self, group: str, gen: int, member: str, assignments: dict[str, bytes]) -> int:
        body = (kw.string(group) + _i32(gen) + kw.string(member) + kw.string(None)
                + _array([kw.string(m) + _bytes(a) for m, a in assignments.items()]))
        return self.send(API_SYNC_GROUP, 3, body)

    def sync_recv(self, corr: int) -> tuple[int, bytes | None]:
        r = self.recv(corr)
        r.i32()
        return r.i16(), r.bytes_()

    def sync(self, group, gen, member, assignments) -> tuple[int, bytes | None]:
        return self.sync_recv(self.sync_send(group, gen, member, assignments))

    def heartbeat(self, group: str, gen: int, member: str) -> int:
        r = self.call(API_HEARTBEAT, 3, kw.string(group) + _i32(gen) + kw.string(member) + kw.string(None))
        r.i32()
        return r.i16()

    def commit(self, group: str, gen: int, member: str, topic: str, offsets: dict[int, int]) -> dict[int, int]:
        parts = [_i32(p) + _i64(o) + _i32(-1) + kw.string(None) for p, o in sorted(offsets.items())]
        body = (kw.string(group) + _i32(gen) + kw.string(member) + kw.string(None)
                + _array([kw.string(topic) + _array(parts)]))
        r = self.call(API_OFFSET_COMMIT, 7, body)
        r.i32()
        out = {}
        for _ in range(r.i32()):
            r.str()
            for _ in range(r.i32()):
                p = r.i32()
                out[p] = r.i16()
        return out

    def fetch(self, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
        body = kw.string(group) + _array([kw.string(topic) + _array([_i32(p) for p in partitions])])
        r = self.call(API_OFFSET_FETCH, 5, body)
        r.i32()
        out = {}
        for _ in range(r.i32()):
            r.str()
            for _ in range(r.i32()):
                p, off = r.i32(), r.i64()
                r.i32()
                r.nstr()
                err = r.i16()
                assert err == ERR_NONE, f"OffsetFetch partition {p}: error {err}"
                out[p] = off
        assert r.i16() == ERR_NONE
        return out

    def leave(self, group: str, member_ids: list[str]) -> tuple[int, dict[str, int]]:
        body = kw.string(group) + _array([kw.string(m) + kw.string(None) for m in member_ids])
        r = self.call(API_LEAVE_GROUP, 3, body)
        r.i32()
        err = r.i16()
        out = {}
        for _ in range(r.i32()):
            mid = r.str()
            r.nstr()
            out[mid] = r.i16()
        return err, out

    def describe(self, group: str) -> dict:
        r = self.call(API_DESCRIBE_GROUPS, 4, _array([kw.string(group)]) + _i8(0))
        r.i32()
        assert r.i32() == 1
        d = {"err": r.i16(), "group": r.str(), "state": r.str(), "protocol_type": r.str(),
             "protocol": r.str(), "members": {}}
        for _ in range(r.i32()):
            mid = r.str()
            r.nstr()
            r.str()  # client id
            r.str()  # host
            d["members"][mid] = (r.bytes_(), r.bytes_())
        r.i32()
        return d


def _subscription(topic: str, user_data: bytes | None = None) -> bytes:
    """ConsumerProtocolSubscription v0."""
    return _i16(0) + _array([kw.string(topic)]) + _bytes(user_data)


def _assignment(topic: str, partitions: list[int]) -> bytes:
    """ConsumerProtocolAssignment v0."""
    return _i16(0) + _array([kw.string(topic) + _array([_i32(p) for p in partitions])]) + _bytes(None)


# what the hand-made requests below use, and what the spec promises
NEEDED_VERSIONS = {
    API_OFFSET_COMMIT: ("OffsetCommit", 7), API_OFFSET_FETCH: ("OffsetFetch", 8),
    API_FIND_COORDINATOR: ("FindCoordinator", 4), API_JOIN_GROUP: ("JoinGroup", 9),
    API_HEARTBEAT: ("Heartbeat", 3), API_LEAVE_GROUP: ("LeaveGroup", 3),
    API_SYNC_GROUP: ("SyncGroup", 3), API_DESCRIBE_GROUPS: ("DescribeGroups", 4),
    API_LIST_GROUPS: ("ListGroups", 0), API_DELETE_GROUPS: ("DeleteGroups", 0),
    API_OFFSET_DELETE: ("OffsetDelete", 0),
}


def test_group_apis_are_advertised(gweir):
    sock = kw.connect(gweir.bootstrap)
    try:
        resp = kw.parse_api_versions_v0(kw.roundtrip(sock, kw.api_versions_request(1, 0)))
    finally:
        sock.close()
    assert resp.error_code == 0
    problems = []
    for key, (name, version) in NEEDED_VERSIONS.items():
        if key not in resp.api_keys:
            problems.append(f"{name} ({key}) is not advertised")
        elif resp.api_keys[key][1] < version:
            problems.append(f"{name} ({key}) advertises up to v{resp.api_keys[key][1]}, want v{version}")
    for key in (API_FIND_COORDINATOR, API_JOIN_GROUP):
        if key in resp.api_keys and resp.api_keys[key][0] != 0:
            problems.append(f"{NEEDED_VERSIONS[key][0]} should start at v0, not v{resp.api_keys[key][0]}")
    assert not problems, "; ".join(problems)


def test_generations_and_member_ids_on_the_wire(gweir):
    """JoinGroup/SyncGroup/Heartbeat/OffsetCommit/LeaveGroup by hand: KIP-394 member ids,
    commits fenced by generation, batched FindCoordinator and LeaveGroup."""
    topic = "raw-topic"
    group = "raw-group"
    create_topic(gweir.bootstrap, topic, 2)
    s1, s2 = RawClient(gweir.bootstrap), RawClient(gweir.bootstrap)
    try:
        # FindCoordinator: one key (v1), and a batch of keys (v4, flexible)
        r = s1.call(API_FIND_COORDINATOR, 1, kw.string(group) + _i8(0))
        r.i32()
        err, _msg, node, host, port = r.i16(), r.nstr(), r.i32(), r.str(), r.i32()
        assert (err, node, port) == (ERR_NONE, 0, gweir.kafka_port), (err, node, host, port)
        r = s1.call(API_FIND_COORDINATOR, 4,
                    _i8(0) + _uvarint(3) + _cstr(group) + _cstr("raw-other") + b"\x00", flexible=True)
        r.i32()
        coords = {}
        for _ in range(r.uvarint() - 1):
            key, node, host, port, err = r.cstr(), r.i32(), r.cstr(), r.i32(), r.i16()
            r.cstr()
            r.tags()
            coords[key] = (node, port, err)
        assert coords == {group: (0, gweir.kafka_port, 0), "raw-other": (0, gweir.kafka_port, 0)}

        sub1 = _subscription(topic, b"member-one")
        sub2 = _subscription(topic, b"member-two")
        both = _assignment(topic, [0, 1])

        # session timeouts outside [group_min_session_timeout_ms, group_max_session_timeout_ms]
        assert s1.join(group, "", sub1, session_ms=500)["err"] == ERR_INVALID_SESSION_TIMEOUT
        assert s1.join(group, "", sub1, session_ms=1_800_001)["err"] == ERR_INVALID_SESSION_TIMEOUT

        # KIP-394: the first JoinGroup (v4+) without a member id only gets an id to join with
        j = s1.join(group, "", sub1)
        assert j["err"] == ERR_MEMBER_ID_REQUIRED and j["member"], j
        m1 = j["member"]
        j = s1.join(group, m1, sub1)
        assert j["err"] == ERR_NONE, j
        g1 = j["gen"]
        assert (j["leader"], j["member"], j["protocol"]) == (m1, m1, "range")
        assert j["members"] == [(m1, None, sub1)]
        assert s1.sync(group, g1, m1, {m1: both}) == (ERR_NONE, both)
        assert s1.commit(group, g1, m1, topic, {0: 5}) == {0: ERR_NONE}
        assert s1.heartbeat(group, g1, m1) == ERR_NONE
        # offsets committed without membership are refused while the group has members
        assert s1.commit(group, -1, "", topic, {0: 7}) == {0: ERR_UNKNOWN_MEMBER_ID}

        # The leader rejoins: a new generation. Before its SyncGroup, commits must wait.
        j = s1.join(group, m1, sub1)
        assert j["err"] == ERR_NONE, j
        g2 = j["gen"]
        assert g2 > g1
        assert s1.commit(group, g2, m1, topic, {0: 6}) == {0: ERR_REBALANCE_IN_PROGRESS}
        assert s1.sync(group, g2, m1, {m1: both}) == (ERR_NONE, both)

        # The previous generation is fenced off; so is an unknown member.
        assert s1.commit(group, g1, m1, topic, {0: 8}) == {0: ERR_ILLEGAL_GENERATION}
        assert s1.heartbeat(group, g1, m1) == ERR_ILLEGAL_GENERATION
        assert s1.sync(group, g1, m1, {m1: both})[0] == ERR_ILLEGAL_GENERATION
        assert s1.commit(group, g2, "nobody", topic, {0: 8}) == {0: ERR_UNKNOWN_MEMBER_ID}
        assert s1.fetch(group, topic, [0, 1]) == {0: 5, 1: -1}, "a refused commit changed the offsets"
        assert s1.commit(group, g2, m1, topic, {0: 9, 1: 3}) == {0: ERR_NONE, 1: ERR_NONE}
        assert s1.fetch(group, topic, [0, 1]) == {0: 9, 1: 3}

        # A second member joins; the first learns of the rebalance from its heartbeat.
        j = s2.join(group, "", sub2)
        assert j["err"] == ERR_MEMBER_ID_REQUIRED, j
        m2 = j["member"]
        pending = s2.join_send(group, m2, sub2)
        wait_until(lambda: s1.heartbeat(group, g2, m1) == ERR_REBALANCE_IN_PROGRESS, 30, interval=0.05,
                   message="the heartbeat to report a rebalance")
        j1 = s1.join(group, m1, sub1)
        j2 = s2.join_recv(pending)
        assert j1["err"] == j2["err"] == ERR_NONE, (j1, j2)
        g3 = j1["gen"]
        assert j2["gen"] == g3 and g3 > g2
        assert j1["leader"] == j2["leader"] and j1["leader"] in (m1, m2)
        lead, follow = (s1, s2) if j1["leader"] == m1 else (s2, s1)
        lead_join, follow_join = (j1, j2) if lead is s1 else (j2, j1)
        assert lead_join["members"] == sorted([(m1, None, sub1), (m2, None, sub2)])
        assert follow_join["members"] == []
        a1, a2 = _assignment(topic, [0]), _assignment(topic, [1])
        mine = {s1: (m1, a1), s2: (m2, a2)}
        pending = follow.sync_send(group, g3, mine[follow][0], {})  # waits for the leader
        assert lead.sync(group, g3, mine[lead][0], {m1: a1, m2: a2}) == (ERR_NONE, mine[lead][1])
        assert follow.sync_recv(pending) == (ERR_NONE, mine[follow][1])

        d = s1.describe(group)
        assert (d["err"], d["state"], d["protocol_type"], d["protocol"]) == (0, "Stable", "consumer", "range"), d
        assert d["members"] == {m1: (sub1, a1), m2: (sub2, a2)}

        # Both leave in one request.
        assert s1.leave(group, [m1, m2]) == (ERR_NONE, {m1: ERR_NONE, m2: ERR_NONE})
        d = s1.describe(group)
        assert (d["state"], d["members"]) == ("Empty", {}), d
        assert s1.leave(group, ["ghost"]) == (ERR_NONE, {"ghost": ERR_UNKNOWN_MEMBER_ID})
        # An empty group takes commits from outside (generation -1, no member id).
        assert s1.commit(group, -1, "", topic, {0: 12}) == {0: ERR_NONE}
        assert s1.fetch(group, topic, [0, 1]) == {0: 12, 1: 3}
    finally:
        s1.close()
        s2.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_worker_main(json.loads(sys.argv[2])))
    sys.exit("usage: test_groups.py worker CONFIG_JSON")
