"""Consumer groups of Kafka's consumer protocol (KIP-848), with librdkafka's implementation
(confluent-kafka, group.protocol=consumer): the coordinator assigns partitions itself, members
hand partitions over without two of them ever holding one, commits are checked by member
epoch, a killed member is fenced after the session timeout, regex subscriptions follow new
topics, and the classic protocol's APIs and `weir group` see the same groups.

Members killed with SIGKILL run in subprocesses: this file doubles as their script
(`python test_consumer_protocol.py member BOOTSTRAP GROUP TOPIC`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from support import Outgoing, admin, create_topic, produce_confluent, wait_until

# Quick heartbeats and a short session so that tests are quick (Kafka's defaults: 5 s, 45 s).
CP_YAML = ("group_initial_rebalance_delay_ms: 200\n"
           "group_min_session_timeout_ms: 1000\n"
           "group_consumer_heartbeat_interval_ms: 300\n"
           "group_consumer_session_timeout_ms: 4000\n")

WAIT_S = 60.0


@pytest.fixture
def cweir(weir_factory):
    return weir_factory("weir", config_yaml=CP_YAML)


def cp_conf(bootstrap: str, group: str, **extra) -> dict:
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "group.protocol": "consumer",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "socket.timeout.ms": 10000,
    }
    conf.update(extra)
    return conf


class CpMember:
    """A confluent-kafka consumer of the consumer protocol. Its partitions change through
    incremental callbacks run inside consume(), so the test keeps polling every member."""

    def __init__(self, bootstrap: str, group: str, topics: list[str], name: str, **conf):
        self.name = name
        self.c = Consumer(cp_conf(bootstrap, group, **conf))
        self.owned: set[tuple[str, int]] = set()
        self.records: list[tuple[str, int, int, bytes]] = []
        self.lost = 0
        self.closed = False
        self.c.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                         on_lost=self._on_lost)

    def _on_assign(self, consumer, parts):
        self.owned |= {(tp.topic, tp.partition) for tp in parts}

    def _on_revoke(self, consumer, parts):
        self.owned -= {(tp.topic, tp.partition) for tp in parts}

    def _on_lost(self, consumer, parts):
        self.lost += 1
        self._on_revoke(consumer, parts)

    def poll(self) -> None:
        """Consumes what is there and commits it before the next poll, so that a partition
        handed over mid-way is resumed exactly where this member stopped."""
        got = self.c.consume(num_messages=500, timeout=0.05)
        offsets: dict[tuple[str, int], int] = {}
        for m in got:
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"{self.name}: consumer error: {m.error()}")
            self.records.append((m.topic(), m.partition(), m.offset(), m.value()))
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        if offsets:
            tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            res = self.c.commit(offsets=tps, asynchronous=False)
            bad = [tp for tp in res or [] if tp.error is not None]
            assert not bad, f"{self.name}: commit failed: {bad}"

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.c.close()


def pump(members: list[CpMember], until, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in members:
            if not m.closed:
                m.poll()
        if until():
            return
    owned = {m.name: sorted(m.owned) for m in members}
    raise AssertionError(f"timed out waiting for {what}; owned: {owned}")


def produce_values(bootstrap: str, topic: str, partitions: int, per_partition: int,
                   tag: str) -> set[bytes]:
    recs = [Outgoing(key=None, value=f"{tag}-{p}-{i}".encode(), partition=p)
            for p in range(partitions) for i in range(per_partition)]
    produce_confluent(bootstrap, topic, recs)
    return {r.value for r in recs}


def partitions(topic: str, n: int) -> set[tuple[str, int]]:
    return {(topic, p) for p in range(n)}


def describe(bootstrap: str, group: str):
    a = admin(bootstrap)  # kept alive until the answer arrives
    return a.describe_consumer_groups([group], request_timeout=20)[group].result(timeout=20)


def test_members_split_hand_over_and_read_everything_once(cweir):
    bs = cweir.bootstrap
    topic, group = "cp-split", "cp-split-g"
    create_topic(bs, topic, partitions=6)
    sent = produce_values(bs, topic, 6, 50, "first")
    a = CpMember(bs, group, [topic], "a")
    b = None
    try:
        pump([a], lambda: a.owned == partitions(topic, 6), "a to hold all six partitions")
        pump([a], lambda: len(a.records) >= len(sent), "a to read the first records")
        b = CpMember(bs, group, [topic], "b")
        pump([a, b], lambda: len(a.owned) == 3 and len(b.owned) == 3,
             "the members to hold three partitions each")
        assert a.owned.isdisjoint(b.owned)
        sent |= produce_values(bs, topic, 6, 50, "second")
        pump([a, b], lambda: len(a.records) + len(b.records) >= len(sent), "every record read")

        d = describe(bs, group)
        assert len(d.members) == 2
        held = {(tp.topic, tp.partition) for m in d.members
                for tp in m.assignment.topic_partitions}
        assert held == partitions(topic, 6)

        b.close()
        pump([a], lambda: a.owned == partitions(topic, 6), "a to take b's partitions back")
        sent |= produce_values(bs, topic, 6, 10, "third")
        pump([a], lambda: len(a.records) + len(b.records) >= len(sent), "the third records")
    finally:
        a.close()
        if b:
            b.close()
    got = [r[3] for r in a.records + b.records]
    assert set(got) == sent
    dups = len(got) - len(set(got))
    assert dups == 0, f"{dups} records read twice across the hand-overs"


def test_range_assignor_and_regex_subscription(cweir):
    bs = cweir.bootstrap
    create_topic(bs, "cp-re-a", partitions=2)
    create_topic(bs, "cp-re-b", partitions=3)
    create_topic(bs, "cp-other", partitions=1)
    a = CpMember(bs, "cp-re-g", ["^cp-re-.*"], "a", **{"group.remote.assignor": "range"})
    try:
        want = partitions("cp-re-a", 2) | partitions("cp-re-b", 3)
        pump([a], lambda: a.owned == want, "the regex's topics assigned")
        create_topic(bs, "cp-re-c", partitions=2)
        want |= partitions("cp-re-c", 2)
        pump([a], lambda: a.owned == want, "a topic created later to join the assignment")
        d = describe(bs, "cp-re-g")
        assert d.partition_assignor == "range"
    finally:
        a.close()


def test_commits_carry_over_between_protocols(cweir):
    """Offsets committed by a consumer-protocol member are where a classic consumer of the
    same (then empty) group starts, and the reverse; a classic member cannot join while the
    group has consumer-protocol members."""
    bs = cweir.bootstrap
    topic, group = "cp-mixed", "cp-mixed-g"
    create_topic(bs, topic, partitions=1)
    first = produce_values(bs, topic, 1, 20, "one")
    a = CpMember(bs, group, [topic], "a")
    try:
        pump([a], lambda: len(a.records) >= 20, "the first records")
        classic = Consumer({"bootstrap.servers": bs, "group.id": group,
                            "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                            "enable.auto.commit": False})
        classic.subscribe([topic])
        errors = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not errors:
            a.poll()
            try:
                msg = classic.poll(0.2)
            except KafkaException as e:
                errors.append(e.args[0].code())
                break
            if msg is not None and msg.error():
                errors.append(msg.error().code())
        classic.close()
        assert KafkaError.INCONSISTENT_GROUP_PROTOCOL in errors, errors
    finally:
        a.close()
    second = produce_values(bs, topic, 1, 5, "two")
    classic = Consumer({"bootstrap.servers": bs, "group.id": group,
                        "auto.offset.reset": "earliest", "enable.auto.commit": False})
    classic.subscribe([topic])
    got = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and len(got) < 5:
        m = classic.poll(0.2)
        if m is not None and not m.error():
            got.append(m.value())
            classic.commit(message=m, asynchronous=False)
    classic.close()
    assert set(got) == second, f"classic consumer resumed at the wrong place: {got[:3]}"
    assert not set(got) & first


def test_a_killed_member_is_fenced_after_its_session(cweir):
    bs = cweir.bootstrap
    topic, group = "cp-kill", "cp-kill-g"
    create_topic(bs, topic, partitions=4)
    child = subprocess.Popen([sys.executable, __file__, "member", bs, group, topic],
                             stdout=subprocess.PIPE, text=True)
    a = None
    try:
        line = child.stdout.readline()
        assert json.loads(line)["owned"] == 4, line
        a = CpMember(bs, group, [topic], "a")
        pump([a], lambda: len(a.owned) == 2, "the two members to split four partitions")
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        killed_at = time.monotonic()
        pump([a], lambda: a.owned == partitions(topic, 4),
             "the killed member's partitions to come back", timeout=30)
        # Its session (4 s) had to pass first: no partition was handed over while it might
        # still have been consuming.
        assert time.monotonic() - killed_at >= 3.0
    finally:
        if child.poll() is None:
            child.kill()
        if a:
            a.close()


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_members_keep_their_partitions_across_a_coordinator_restart(cweir, how):
    """The group's epochs and assignments are stored in __consumer_offsets: after the daemon
    restarts, members heartbeat on with their epochs, nothing is lost or reassigned."""
    bs = cweir.bootstrap
    topic, group = f"cp-restart-{how}", f"cp-restart-{how}-g"
    create_topic(bs, topic, partitions=4)
    a = CpMember(bs, group, [topic], "a")
    b = CpMember(bs, group, [topic], "b")
    try:
        pump([a, b], lambda: len(a.owned) == 2 and len(b.owned) == 2, "a stable split")
        before = describe(bs, group)
        epochs = {m.member_id: m for m in before.members}
        assert len(epochs) == 2
        if how == "kill9":
            cweir.kill()
            cweir.start()
        else:
            cweir.restart()
        sent = produce_values(bs, topic, 4, 10, "after")
        pump([a, b], lambda: len(a.records) + len(b.records) >= len(sent),
             "the records produced after the restart")
        after = describe(bs, group)
        assert {m.member_id for m in after.members} == set(epochs)
        assert a.lost == 0 and b.lost == 0, "a member lost its partitions"
        assert len(a.owned) == 2 and len(b.owned) == 2 and a.owned.isdisjoint(b.owned)
    finally:
        a.close()
        b.close()


def test_group_views_show_consumer_protocol_members(cweir):
    bs = cweir.bootstrap
    topic, group = "cp-views", "cp-views-g"
    create_topic(bs, topic, partitions=2)
    a = CpMember(bs, group, [topic], "a", **{"client.id": "viewer"})
    try:
        pump([a], lambda: a.owned == partitions(topic, 2), "assignment")
        d = json.loads(cweir.cli("group", "describe", group, "--format", "json").stdout)
        assert d["state"] == "Stable", d
        assert d["protocol"] == "uniform", d
        assert [m["client_id"] for m in d["members"]] == ["viewer"], d
        assert sorted(x["partition"] for x in d["members"][0]["assignment"]) == [0, 1], d
        assert group in cweir.cli("group", "list").stdout.decode()
        a_client = admin(bs)
        listed = a_client.list_consumer_groups(request_timeout=20).result(timeout=20)
        ours = [g for g in listed.valid if g.group_id == group]
        assert ours and ours[0].state.name == "STABLE", listed.valid
        http = requests.get(f"{cweir.http_url}/groups", timeout=10).json()
        mine = [g for g in http["groups"] if g["group"] == group]
        assert mine and len(mine[0]["members"]) == 1, http
    finally:
        a.close()
    # Once its last member left, the group is empty and its offsets may be reset.
    wait_until(lambda: json.loads(cweir.cli("group", "describe", group, "--format", "json")
                                  .stdout)["state"] == "Empty", 20,
               message="the group to be empty")
    cweir.cli("group", "reset-offsets", group, "--topic", topic, "--to-earliest")


def _member_main(bootstrap: str, group: str, topic: str) -> None:
    """A member that reports once it holds every partition, then consumes until killed."""
    c = Consumer(cp_conf(bootstrap, group))
    owned: set[int] = set()
    c.subscribe([topic], on_assign=lambda _c, ps: owned.update(tp.partition for tp in ps),
                on_revoke=lambda _c, ps: owned.difference_update(tp.partition for tp in ps))
    reported = False
    while True:
        c.consume(num_messages=100, timeout=0.1)
        if not reported and len(owned) == 4:
            print(json.dumps({"owned": len(owned)}), flush=True)
            reported = True


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "member":
    _member_main(*sys.argv[2:])
