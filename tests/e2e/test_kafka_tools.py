"""Apache Kafka's own Java tools against weir, as a compatibility oracle.

TopicCommand, VerifiableProducer, VerifiableConsumer (the classic group protocol and KIP-848's
consumer protocol), ConsumerGroupCommand and TransactionalMessageCopier, from the Kafka build
in $WEIR_KAFKA_DIR (default ../shared/kafka beside the repository; its kafka.sh unpacks the
jars). Java 17 runs them. Where that directory is missing, every test here is reported as
skipped with the path it looked for.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import create_topic, wait_until

REPO = Path(__file__).resolve().parents[2]
KAFKA_DIR = Path(os.environ.get("WEIR_KAFKA_DIR", REPO.parent / "shared" / "kafka"))

# Quick first rebalances for classic groups, quick heartbeats for consumer-protocol groups.
TOOLS_YAML = ("group_initial_rebalance_delay_ms: 200\n"
              "group_consumer_heartbeat_interval_ms: 500\n"
              "group_consumer_session_timeout_ms: 10000\n")

N = 1000


def _script(cls: str, args: list[str]) -> str:
    return (f"source {shlex.quote(str(KAFKA_DIR / 'kafka.sh'))} && kafka_anchor_fetch >&2 && "
            f"kafka_anchor_tool {cls} " + " ".join(shlex.quote(a) for a in args))


def tool(cls: str, *args: str, timeout: float = 120) -> str:
    """Runs a Kafka tool to completion; its stdout."""
    p = subprocess.run(["bash", "-c", _script(cls, list(args))], capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{cls} {args} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p.stdout


class Running:
    """A Kafka tool in the background whose stdout lines (JSON events) are collected."""

    def __init__(self, cls: str, *args: str):
        # A session of its own, so that stop() reaches the JVM under bash.
        self.p = subprocess.Popen(["bash", "-c", _script(cls, list(args))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        self.events: list[dict] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.p.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.p.stderr, False), daemon=True).start()

    def _read(self, stream, events: bool) -> None:
        for line in stream:
            if not events:
                self.stderr.append(line)
                continue
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                pass

    def of(self, name: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("name") == name]

    def consumed(self) -> int:
        return sum(e["count"] for e in self.of("records_consumed"))

    def assigned(self) -> set[tuple[str, int]]:
        """Partitions held now, from the assigned/revoked events."""
        held: set[tuple[str, int]] = set()
        for e in list(self.events):
            parts = {(p["topic"], p["partition"]) for p in e.get("partitions", [])}
            if e.get("name") == "partitions_assigned":
                held |= parts
            elif e.get("name") == "partitions_revoked":
                held -= parts
        return held

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError("tool did not finish; stderr:\n" + "".join(self.stderr[-40:]))

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, 15)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, 9)
                self.p.wait()


@pytest.fixture
def kweir(weir_factory):
    if not (KAFKA_DIR / "kafka.sh").exists():
        pytest.skip(f"Kafka's tools not found: no {KAFKA_DIR}/kafka.sh (set WEIR_KAFKA_DIR)")
    return weir_factory("weir", config_yaml=TOOLS_YAML)


def produce(bootstrap: str, topic: str, n: int = N) -> None:
    out = tool("org.apache.kafka.tools.VerifiableProducer", "--bootstrap-server", bootstrap,
               "--topic", topic, "--max-messages", str(n), "--acks", "-1")
    acked = [json.loads(line) for line in out.splitlines() if '"producer_send_success"' in line]
    assert len(acked) == n, f"VerifiableProducer: {len(acked)} of {n} acknowledged"


def test_topic_command_creates_describes_and_lists(kweir):
    bs = kweir.bootstrap
    tool("org.apache.kafka.tools.TopicCommand", "--bootstrap-server", bs, "--create",
         "--topic", "tc-one", "--partitions", "3", "--config", "retention.ms=3600000")
    desc = tool("org.apache.kafka.tools.TopicCommand", "--bootstrap-server", bs, "--describe",
                "--topic", "tc-one")
    assert "PartitionCount: 3" in desc and "retention.ms=3600000" in desc, desc
    listed = tool("org.apache.kafka.tools.TopicCommand", "--bootstrap-server", bs, "--list")
    assert "tc-one" in listed.split()


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_verifiable_consumer_reads_everything_and_commits(kweir, protocol):
    bs = kweir.bootstrap
    topic = f"vc-{protocol}"
    create_topic(bs, topic, partitions=3)
    produce(bs, topic)
    c = Running("org.apache.kafka.tools.VerifiableConsumer", "--bootstrap-server", bs,
                "--topic", topic, "--group-id", f"g-{protocol}", "--group-protocol", protocol,
                "--max-messages", str(N))
    assert c.wait() == 0, "".join(c.stderr[-40:])
    assert c.consumed() == N
    commits = c.of("offsets_committed")
    assert commits and all(e["success"] for e in commits), commits
    committed = {(o["topic"], o["partition"]): o["offset"] for e in commits for o in e["offsets"]}
    assert sum(committed.values()) == N, committed
    assert c.assigned() == set() or c.assigned() == {(topic, p) for p in range(3)}


def test_consumer_protocol_members_share_partitions(kweir):
    """Two KIP-848 members split six partitions; when one leaves the other takes them all;
    ConsumerGroupCommand describes the group and its members meanwhile."""
    bs = kweir.bootstrap
    topic, group = "vc-shared", "g-shared"
    create_topic(bs, topic, partitions=6)
    produce(bs, topic)
    args = ["--bootstrap-server", bs, "--topic", topic, "--group-id", group,
            "--group-protocol", "consumer"]
    a = Running("org.apache.kafka.tools.VerifiableConsumer", *args)
    b = None
    try:
        wait_until(lambda: len(a.assigned()) == 6, 90,
                   message="first member holds all six partitions")
        b = Running("org.apache.kafka.tools.VerifiableConsumer", *args)
        wait_until(lambda: len(a.assigned()) == 3 and len(b.assigned()) == 3, 90,
                   message="the two members hold three partitions each")
        assert a.assigned().isdisjoint(b.assigned())
        produce(bs, topic)
        wait_until(lambda: a.consumed() + b.consumed() >= 2 * N, 90,
                   message="every record consumed")
        desc = tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                    "--bootstrap-server", bs, "--describe", "--group", group, "--members")
        rows = [line for line in desc.splitlines() if line.startswith(group)]
        assert len(rows) == 2, desc
        state = tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                     "--bootstrap-server", bs, "--describe", "--group", group, "--state")
        assert "Stable" in state and "uniform" in state, state
        b.stop()
        wait_until(lambda: len(a.assigned()) == 6, 90,
                   message="the remaining member holds all six")
    finally:
        a.stop()
        if b:
            b.stop()
    lag = tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
               "--bootstrap-server", bs, "--describe", "--group", group)
    # Partitions with committed offsets (the producer's sticky partitioner may leave some
    # empty): everything read, nothing left behind.
    rows = [line.split() for line in lag.splitlines() if line.startswith(group)]
    assert sum(int(r[3]) for r in rows) == 2 * N and all(r[5] == "0" for r in rows), lag
    listed = tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                  "--bootstrap-server", bs, "--list")
    assert group in listed.split()


def test_classic_group_described_by_consumer_group_command(kweir):
    bs = kweir.bootstrap
    topic = "vc-classic-desc"
    create_topic(bs, topic, partitions=2)
    produce(bs, topic, 100)
    c = Running("org.apache.kafka.tools.VerifiableConsumer", "--bootstrap-server", bs,
                "--topic", topic, "--group-id", "g-classic-desc", "--group-protocol", "classic")
    try:
        wait_until(lambda: c.consumed() >= 100, 90, message="classic member consumed")
        desc = tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                    "--bootstrap-server", bs, "--describe", "--group", "g-classic-desc",
                    "--members")
        rows = [line for line in desc.splitlines() if line.startswith("g-classic-desc")]
        assert len(rows) == 1, desc
    finally:
        c.stop()


def test_transactional_message_copier(kweir, tmp_path):
    bs = kweir.bootstrap
    read_committed = tmp_path / "read_committed.properties"
    read_committed.write_text("isolation.level=read_committed\n")
    create_topic(bs, "tmc-in", partitions=1)
    create_topic(bs, "tmc-out", partitions=1)
    produce(bs, "tmc-in", 500)
    out = tool("org.apache.kafka.tools.TransactionalMessageCopier", "--broker-list", bs,
               "--input-topic", "tmc-in", "--input-partition", "0", "--output-topic", "tmc-out",
               "--transactional-id", "tmc-1", "--consumer-group", "tmc-group",
               "--transaction-size", "50", "--max-messages", "500", "--use-group-metadata",
               timeout=180)
    progress = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert progress and progress[-1].get("remaining") == 0, out[-2000:]
    got = tool("org.apache.kafka.tools.VerifiableConsumer", "--bootstrap-server", bs,
               "--topic", "tmc-out", "--group-id", "tmc-check", "--max-messages", "500",
               "--consumer.config", str(read_committed))
    consumed = sum(json.loads(line)["count"] for line in got.splitlines()
                   if '"records_consumed"' in line)
    assert consumed == 500


def test_transactions_command_finds_and_aborts_an_open_transaction(kweir):
    """TransactionsCommand (KIP-664): describe-producers shows where an open transaction
    starts, find-hanging does not report one its coordinator holds, and abort ends it with a
    marker (WriteTxnMarkers), after which read_committed consumers get past it."""
    from test_exactly_once import txn_producer
    from test_pipelines import read_committed
    from support import Outgoing, produce_confluent
    bs = kweir.bootstrap
    txns = "org.apache.kafka.tools.TransactionsCommand"
    create_topic(bs, "kt-txn", partitions=1)
    producer = txn_producer(bs, "kt-app")
    producer.begin_transaction()
    for i in range(3):
        producer.produce("kt-txn", value=f"open-{i}".encode(), partition=0)
    producer.flush(30)

    out = tool(txns, "--bootstrap-server", bs, "describe-producers", "--topic", "kt-txn",
               "--partition", "0")
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[0][-1] == "CurrentTransactionStartOffset", out
    assert [row[-1] for row in lines[1:]] == ["0"], out

    out = tool(txns, "--bootstrap-server", bs, "find-hanging", "--topic", "kt-txn",
               "--max-transaction-timeout", "0")
    assert "kt-txn" not in out, f"a transaction its coordinator holds reported as hanging:\n{out}"

    tool(txns, "--bootstrap-server", bs, "abort", "--topic", "kt-txn", "--partition", "0",
         "--start-offset", "0")
    produce_confluent(bs, "kt-txn", [Outgoing(value=b"plain", partition=0)])
    assert [v for _, _, _, v, _ in read_committed(bs, "kt-txn")] == [b"plain"]
    del producer
