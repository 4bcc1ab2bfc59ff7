"""Faults, one at a time or two at once, in an order drawn from a seeded RNG.

The schedule depends on the seed alone: which fault, which target (the leader of a given
partition, the controller, or a given node), how long it lasts and how long the cluster
heals before the next one; with two at once, also which two overlap and when the second
starts. Which node is "the leader of partition 2" is resolved when the fault starts, from the
cluster's metadata.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("kill", "pause", "isolate", "term", "lossy", "restart", "slow", "full", "slow-disk",
         "partition", "bridge", "one-way")
# The kinds that need a proxy on every link between two nodes (the campaign has them).
LINK_KINDS = ("partition", "bridge", "one-way")
# The kinds that hold, slow or cut links between nodes: two of them at once would undo each
# other's proxies, so an overlapping pair has at most one.
NETWORK_KINDS = ("isolate", "slow") + LINK_KINDS

DESCRIBE = {
    "kill": "kill -9, then restart",
    "pause": "SIGSTOP, then SIGCONT",
    "isolate": "hold the node's client proxy and every link to and from it, then reset and "
               "release them",
    "term": "SIGTERM, then restart",
    "lossy": "lose produce responses at the node's proxy",
    "restart": "kill -9 every node at once, then start them all again",
    "slow": "delay every frame to and from the node (clients and the links to the other nodes)",
    "full": "the node's disk is full: every write to a file fails with ENOSPC",
    "slow-disk": "every fsync of the node waits before it starts",
    "partition": "cut the node off from the other nodes, both ways (clients still reach every "
                 "node): a minority and a majority",
    "bridge": "the other nodes cannot reach one another, both ways; each still reaches the node",
    "one-way": "nothing the node sends to the other nodes arrives (the links from it hold); "
               "what they send it does",
}


@dataclass(frozen=True)
class Fault:
    kind: str
    target: tuple  # ("leader", partition) | ("controller",) | ("node", node_id)
    hold_s: float  # how long the node is down, paused, isolated or lossy
    heal_s: float  # quiet time after the fault is undone
    delay_s: float = 0.0  # slow: the delay of every frame; slow-disk: of every fsync

    def describe(self) -> str:
        if self.kind == "restart":
            return f"restart every node, down for {self.hold_s:.1f}s, heal {self.heal_s:.1f}s"
        t = self.target
        who = {"leader": lambda: f"leader of partition {t[1]}", "controller": lambda: "controller",
               "node": lambda: f"node {t[1]}"}[t[0]]()
        slow = {"slow": f" by {self.delay_s * 1000:.0f} ms a frame",
                "slow-disk": f" by {self.delay_s * 1000:.0f} ms an fsync"}.get(self.kind, "")
        return f"{self.kind} {who}{slow} for {self.hold_s:.1f}s, heal {self.heal_s:.1f}s"


def schedule(seed: int, nodes: int, partitions: int, kinds=KINDS):
    """Endless faults for `seed`: every kind appears once, in a shuffled order, before any
    appears again, so short runs see every kind."""
    rng = random.Random(seed)
    while True:
        bag = list(kinds)
        rng.shuffle(bag)
        for kind in bag:
            r = rng.random()
            if r < 0.5:
                target = ("leader", rng.randrange(partitions))
            elif r < 0.65:
                target = ("controller",)
            else:
                target = ("node", rng.randrange(nodes) + 1)
            hold = {"kill": (1, 8), "pause": (2, 10), "isolate": (3, 12), "term": (1, 6),
                    "lossy": (5, 15), "restart": (1, 5), "slow": (5, 15), "full": (3, 10),
                    "slow-disk": (5, 15), "partition": (3, 12), "bridge": (3, 12),
                    "one-way": (3, 12)}[kind]
            fault = Fault(kind, target, round(rng.uniform(*hold), 1), round(rng.uniform(4, 12), 1))
            # Drawn for these kinds only, so that the other kinds' schedules stay as they were.
            if kind == "slow":
                fault = dataclasses.replace(fault, delay_s=round(rng.uniform(0.02, 0.4), 3))
            elif kind == "slow-disk":
                fault = dataclasses.replace(fault, delay_s=round(rng.uniform(0.05, 0.5), 3))
            yield fault


def compatible(first: Fault, second: Fault) -> bool:
    """Whether two faults can hold at once: not a restart of every node, not two faults on the
    links between nodes."""
    if "restart" in (first.kind, second.kind):
        return False
    return not (first.kind in NETWORK_KINDS and second.kind in NETWORK_KINDS)


def overlapping(seed: int, nodes: int, partitions: int, kinds=KINDS):
    """Endless steps of two faults at once, drawn from `schedule(seed)`: each step is (first,
    second, offset_s), the second starting offset_s after the first, while the first still
    holds, on another node. A fault that cannot go with the one before it (see `compatible`)
    waits for the next step; a restart of every node is a step alone (second None), and so is
    every step when the kinds cannot overlap at all."""
    faults = schedule(seed, nodes, partitions, kinds)
    if all(k == "restart" or k in NETWORK_KINDS for k in kinds):
        yield from ((f, None, 0.0) for f in faults)
        return
    rng = random.Random(seed * 7919 + 1)
    waiting: list[Fault] = []
    while True:
        first = waiting.pop(0) if waiting else next(faults)
        if first.kind == "restart":
            yield first, None, 0.0
            continue
        second = next(faults)
        while not compatible(first, second):
            waiting.append(second)
            second = next(faults)
        yield first, second, round(rng.uniform(0.0, first.hold_s * 0.8), 1)


class Nemesis:
    """Applies faults to a Cluster whose nodes sit behind FaultProxies."""

    def __init__(self, cluster, proxies, topic: str, log, raft_proxies=None, disks=None,
                 links=None):
        self.cluster, self.proxies, self.topic, self.log = cluster, proxies, topic, log
        self.raft_proxies = raft_proxies or []
        # (a, b) -> the (Kafka, cluster) proxies node a dials node b through.
        self.links = links or {}
        self.disks = disks or []  # one DiskControl a node, for full and slow-disk
        self.paused: set[int] = set()
        self.injected: list[tuple[float, Fault, int]] = []
        self.anomalies: list[str] = []

    # -- targets ---------------------------------------------------------------
    def _elsewhere(self, node: int, avoid: frozenset) -> int:
        """`node`, or the next one up that is not in `avoid` (nodes a fault already holds)."""
        count = len(self.cluster.nodes)
        while node in avoid and len(avoid) < count:
            node = node % count + 1
        return node

    def resolve(self, fault: Fault) -> int:
        kind = fault.target[0]
        if kind == "node":
            return fault.target[1]
        try:
            via = self.cluster.live()[0]
            md = self.cluster.metadata(via)
            node = (md.controller_id if kind == "controller"
                    else md.topics[self.topic].partitions[fault.target[1]].leader)
            if 1 <= node <= len(self.cluster.nodes):
                return node
        except Exception as e:  # metadata unavailable: fall back to a fixed node
            self.log(f"nemesis: metadata for {fault.describe()} unavailable ({e!r})")
        return (fault.target[1] if kind == "leader" else 0) % len(self.cluster.nodes) + 1

    # -- faults ----------------------------------------------------------------
    def run_together(self, first: Fault, second: Fault, offset_s: float) -> None:
        """Two faults at once on two nodes: the second starts offset_s after the first, and
        this returns when both are undone."""
        node_a = self.resolve(first)
        failure: list[BaseException] = []

        def hold_first():
            try:
                self.run(first, node_a)
            except BaseException as e:  # raised again below, in the campaign's thread
                failure.append(e)

        thread = threading.Thread(target=hold_first, name="nemesis-first")
        thread.start()
        try:
            time.sleep(offset_s)
            self.log(f"nemesis: a second fault {offset_s:.1f}s into the first")
            planned = self.resolve(second)
            node_b = self._elsewhere(planned, frozenset({node_a}))
            if node_b != planned:
                self.log(f"nemesis: node {node_a} has the first fault; the second goes to node "
                         f"{node_b}")
            self.run(second, node_b)
        finally:
            thread.join()
        if failure:
            raise failure[0]

    def run(self, fault: Fault, node_id: int | None = None) -> None:
        if node_id is None:
            node_id = self.resolve(fault)
        node = self.cluster.node(node_id)
        proxy = self.proxies[node_id - 1]
        self.injected.append((time.monotonic(), fault, node_id))
        who = "the cluster" if fault.kind == "restart" else f"node {node_id}"
        self.log(f"nemesis: {fault.kind} {who} ({fault.describe()})")
        if fault.kind == "kill":
            node.kill()
            time.sleep(fault.hold_s)
            self._start(node)
        elif fault.kind == "term":
            try:
                rc = node.stop(signal.SIGTERM, timeout=30, expect_clean=False)
                if rc != 0:
                    self.anomalies.append(f"node {node_id} exited with code {rc} after SIGTERM")
            except AssertionError as e:
                self.anomalies.append(f"node {node_id} ignored SIGTERM for 30s and was killed: "
                                      f"{str(e).splitlines()[0]}")
            time.sleep(fault.hold_s)
            self._start(node)
        elif fault.kind == "pause":
            os.kill(node.pid, signal.SIGSTOP)
            self.paused.add(node_id)
            time.sleep(fault.hold_s)
            os.kill(node.pid, signal.SIGCONT)
            self.paused.discard(node_id)
        elif fault.kind == "isolate":
            others = self._others(node_id)
            self._cut([proxy] + self.raft_proxies[node_id - 1:node_id]
                      + self._links([node_id], others, both=True), fault.hold_s)
        elif fault.kind == "partition":
            others = self._others(node_id)
            # A minority of one (of three) or two (of five) against the rest.
            minority = [node_id] + others[:(len(self.cluster.nodes) - 1) // 2 - 1]
            majority = [n for n in others if n not in minority]
            self.log(f"nemesis: nodes {minority} | {majority}")
            self._cut(self._links(minority, majority, both=True), fault.hold_s)
        elif fault.kind == "bridge":
            others = self._others(node_id)
            left, right = others[0::2], others[1::2]
            self.log(f"nemesis: nodes {left} | {right}, both still reach node {node_id}")
            self._cut(self._links(left, right, both=True), fault.hold_s)
        elif fault.kind == "one-way":
            self._cut(self._links([node_id], self._others(node_id), both=False), fault.hold_s)
        elif fault.kind == "lossy":
            proxy.fault_rate = 0.1
            time.sleep(fault.hold_s)
            proxy.fault_rate = 0.0
        elif fault.kind == "slow":
            slowed = ([proxy] + self.raft_proxies[node_id - 1:node_id]
                      + self._links([node_id], self._others(node_id), both=True))
            for p in slowed:
                p.delay_s = fault.delay_s
            time.sleep(fault.hold_s)
            for p in slowed:
                p.delay_s = 0.0
        elif fault.kind in ("full", "slow-disk"):
            disk = self.disks[node_id - 1]
            if fault.kind == "full":
                disk.set(full=True)
            else:
                disk.set(fsync_delay_ms=int(fault.delay_s * 1000))
            time.sleep(fault.hold_s)
            disk.set()
            if not node.running():
                # A node may stop on a failed write to its metadata log (and say so in its log).
                self.anomalies.append(f"node {node_id} exited during {fault.describe()}")
                self._start(node)
        elif fault.kind == "restart":
            # The whole cluster goes down; nodes wait for a quorum, so they start together.
            for n in self.cluster.nodes:
                if n.running():
                    n.kill()
            time.sleep(fault.hold_s)
            try:
                self.cluster.start()
            except AssertionError as e:
                self.anomalies.append(f"the cluster did not come back after a full restart: "
                                      f"{str(e).splitlines()[0]}")
                for n in self.cluster.nodes:
                    if not n.running():
                        self._start(n)
        else:
            raise ValueError(fault.kind)
        self.log(f"nemesis: {fault.kind} {who} undone")

    def _others(self, node_id: int) -> list[int]:
        return [n for n in range(1, len(self.cluster.nodes) + 1) if n != node_id]

    def _links(self, side_a, side_b, both: bool) -> list:
        """The proxies of the links from side_a to side_b (and back, with `both`)."""
        pairs = [(a, b) for a in side_a for b in side_b]
        if both:
            pairs += [(b, a) for a, b in pairs]
        return [p for pair in pairs for p in self.links.get(pair, ())]

    @staticmethod
    def _cut(proxies: list, hold_s: float) -> None:
        """Holds the proxies for hold_s, then cuts what they held and relays again."""
        for p in proxies:
            p.hold()
        time.sleep(hold_s)
        for p in proxies:
            p.reset()
            p.release()

    def _start(self, node) -> None:
        for attempt in range(3):
            try:
                node.start(90)
                return
            except AssertionError as e:
                self.anomalies.append(f"{node.name} did not come back (attempt {attempt + 1}): "
                                      f"{str(e).splitlines()[0]}")
                time.sleep(2)
        raise RuntimeError(f"{node.name} does not start any more; see {node.log_path}")

    def heal(self) -> None:
        """Undo everything: every node running and unpaused, every proxy relaying."""
        for node_id in list(self.paused):
            node = self.cluster.node(node_id)
            if node.running():
                os.kill(node.pid, signal.SIGCONT)
            self.paused.discard(node_id)
        for p in self.proxies:
            p.fault_rate = 0.0
        for p in self.proxies + self.raft_proxies + [p for pair in self.links.values() for p in pair]:
            p.delay_s = 0.0
            p.release()
        for d in self.disks:
            d.set()
        for node in self.cluster.nodes:
            if not node.running():
                self._start(node)

    def summary(self) -> str:
        from collections import Counter
        c = Counter(f.kind for _, f, _ in self.injected)
        return " ".join(f"{k}x{c[k]}" for k in KINDS if c[k]) or "none"


class DiskControl:
    """The control file of one node's disk faults (tests/faults/diskfault.c, loaded into the
    node with LD_PRELOAD): a full disk, and a delay before every fsync."""

    SHIM = Path(__file__).resolve().parent / "diskfault.c"

    def __init__(self, path: Path):
        self.path = path
        self.set()

    def set(self, full: bool = False, fsync_delay_ms: int = 0) -> None:
        # Rewritten in place: the node has it mapped.
        mode = "r+b" if self.path.exists() else "wb"
        with open(self.path, mode) as f:
            f.write(struct.pack("=ii", int(full), fsync_delay_ms))

    def env(self, shim: Path) -> dict[str, str]:
        return {"LD_PRELOAD": str(shim), "WEIR_DISKFAULT": str(self.path)}

    @classmethod
    def build_shim(cls, out: Path) -> Path:
        """Compiles the shim (the C compiler Rust links with is on any machine that builds
        weir); raises with the compiler's message when it cannot."""
        cc = os.environ.get("CC", "cc")
        r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(cls.SHIM), "-ldl"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cannot build the disk fault shim with {cc}: {r.stderr.strip()}")
        return out
