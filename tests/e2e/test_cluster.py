"""A cluster of three `weir serve` processes on loopback: the Raft metadata quorum, replicated
partitions, acks=all with min.insync.replicas, in-sync set shrink and growth, and real clients
(kcat, confluent-kafka, kafka-python) finding every node and every partition's leader."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from confluent_kafka import (Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka.admin import ConfigResource, NewPartitions, NewTopic

from conftest import DaemonError, WeirDaemon, _pick_free_ports
import kafka_wire as kw
from support import (Outgoing, admin, assert_contiguous, consume_confluent, consume_kafka_python,
                     committed_offsets, consume_kcat, consumer_conf, create_topic,
                     produce_confluent, producer_conf, wait_until)
from test_pipelines import read_committed

# Short timings so failures show within seconds on a busy 2-core machine.
CLUSTER_YAML = """\
raft_heartbeat_ms: 200
raft_election_timeout_ms: 1500
replica_lag_time_max_ms: 3000
node_session_timeout_ms: 3000
metadata_timeout_ms: 15000
"""


class Cluster:
    def __init__(self, nodes: list[WeirDaemon]):
        self.nodes = nodes

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    def node(self, node_id: int) -> WeirDaemon:
        return self.nodes[node_id - 1]

    def live(self) -> list[WeirDaemon]:
        return [n for n in self.nodes if n.running()]

    def start(self, nodes: list[WeirDaemon] | None = None) -> None:
        """Nodes wait for a quorum before they answer /health, so they start together."""
        nodes = nodes or self.nodes
        with ThreadPoolExecutor(len(nodes)) as pool:
            for f in [pool.submit(n.start, 60) for n in nodes]:
                f.result()

    def metadata(self, via: WeirDaemon | None = None, topic: str | None = None):
        via = via or self.live()[0]
        return admin(via.bootstrap).list_topics(topic=topic, timeout=10)


def start_cluster(weir_factory, size: int, proxies: list | None = None,
                  extra_args: tuple[str, ...] = (), raft_proxies: list | None = None,
                  links: dict | None = None, config_yaml: str = "") -> Cluster:
    """`proxies`: one FaultProxy a node, whose port the node advertises to clients and to
    the other nodes' followers. `raft_proxies`: one (kafka=False) a node in front of its
    cluster listener, whose port the voter list gives, so the other nodes' Raft and cluster
    traffic to it goes through the proxy. `links` (with both of those): a (Kafka, cluster)
    pair of proxies for each ordered pair of node ids (a, b); node a dials b through them
    (its `peer_routes`), so that every link between two nodes, in each direction, can fail
    on its own. `extra_args` and the settings in `config_yaml` are given to every node."""
    # One pick for every node's ports, so that no node's Kafka port is another's cluster port.
    ports = _pick_free_ports(3 * size)
    raft_ports = ports[:size]
    if raft_proxies:
        for proxy, port in zip(raft_proxies, raft_ports):
            proxy.upstream_port = port
    voter_ports = [p.port for p in raft_proxies] if raft_proxies else raft_ports
    voters = ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(voter_ports))
    nodes = []
    for i in range(size):
        yaml = CLUSTER_YAML + config_yaml
        if proxies:
            yaml += f"advertised_port: {proxies[i].port}\n"
        if links:
            yaml += "peer_routes:\n"
            for (a, b), (kafka_link, raft_link) in sorted(links.items()):
                if a == i + 1:
                    yaml += (f'  "127.0.0.1:{proxies[b - 1].port}": "127.0.0.1:{kafka_link.port}"\n'
                             f'  "127.0.0.1:{raft_proxies[b - 1].port}": '
                             f'"127.0.0.1:{raft_link.port}"\n')
        own = ("--cluster-addr", f"127.0.0.1:{raft_ports[i]}") if raft_proxies else ()
        d = weir_factory(f"node{i + 1}", start=False, config_yaml=yaml,
                         extra_args=("--node-id", str(i + 1), "--voters", voters) + own + extra_args)
        d.kafka_port, d.http_port = ports[size + 2 * i:size + 2 * i + 2]
        if proxies:
            proxies[i].upstream_port = d.kafka_port
        nodes.append(d)
    for (a, b), (kafka_link, raft_link) in (links or {}).items():
        kafka_link.upstream_port = nodes[b - 1].kafka_port
        raft_link.upstream_port = raft_ports[b - 1]
    c = Cluster(nodes)
    c.start()
    # A node whose Kafka port was taken meanwhile started again on another one.
    for i, d in enumerate(nodes):
        if proxies:
            proxies[i].upstream_port = d.kafka_port
    for (a, b), (kafka_link, _) in (links or {}).items():
        kafka_link.upstream_port = nodes[b - 1].kafka_port
    return c


@pytest.fixture
def cluster(weir_factory) -> Cluster:
    return start_cluster(weir_factory, 3)


def create_replicated(cluster: Cluster, name: str, partitions: int, rf: int = 3,
                      config: dict[str, str] | None = None) -> None:
    a = admin(cluster.bootstrap)
    fs = a.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=rf,
                                   config=config or {})], request_timeout=30)
    fs[name].result(timeout=30)

    def ready():
        for n in cluster.live():
            t = cluster.metadata(n).topics.get(name)
            if t is None or t.error is not None or len(t.partitions) != partitions:
                return False
            if any(p.leader < 0 or len(p.replicas) != rf for p in t.partitions.values()):
                return False
        return True

    wait_until(ready, 30, message=f"every node to know {name} with {partitions} partitions")


def segment_bytes(node: WeirDaemon, topic: str, partition: int) -> bytes:
    d = node.data_dir / f"{topic}-{partition}"
    return b"".join(p.read_bytes() for p in sorted(d.glob("*.log")))


def wait_replicas_identical(cluster: Cluster, topic: str, partitions: int,
                            nodes: list[WeirDaemon] | None = None) -> None:
    nodes = nodes or cluster.nodes

    def same():
        for p in range(partitions):
            copies = {segment_bytes(n, topic, p) for n in nodes}
            if len(copies) != 1:
                return False
        return True

    wait_until(same, 30, message=f"every replica of {topic} to hold the same bytes")


def isr(cluster: Cluster, topic: str, partition: int, via: WeirDaemon | None = None) -> list[int]:
    return sorted(cluster.metadata(via).topics[topic].partitions[partition].isrs)


def test_three_nodes_serve_replicated_topics_to_every_client(cluster, kcat_bin):
    # kcat (librdkafka 1.7) sees the three brokers, whichever node it asks.
    for n in cluster.nodes:
        out = subprocess.run([kcat_bin, "-b", n.bootstrap, "-L", "-J"], capture_output=True,
                             timeout=30, check=True).stdout
        md = json.loads(out)
        assert sorted(b["id"] for b in md["brokers"]) == [1, 2, 3], md["brokers"]

    create_replicated(cluster, "orders", 6)
    t = cluster.metadata().topics["orders"]
    leaders = sorted(p.leader for p in t.partitions.values())
    assert leaders == [1, 1, 2, 2, 3, 3], f"leaders are not spread: {leaders}"
    for p in t.partitions.values():
        assert sorted(p.replicas) == [1, 2, 3] and sorted(p.isrs) == [1, 2, 3]

    # Idempotent acks=all producer bootstrapped from one node finds every leader.
    records = [Outgoing(value=f"v{i}".encode(), key=f"k{i % 17}".encode(), partition=i % 6)
               for i in range(3000)]
    acked = produce_confluent(cluster.node(1).bootstrap, "orders", records,
                              **{"enable.idempotence": True})
    # Consumers read from each partition's leader: confluent-kafka and kafka-python agree.
    got = consume_confluent(cluster.node(2).bootstrap, "orders", range(6))
    assert [(r.partition, r.offset, r.key, r.value) for r in got] == \
        sorted((r.partition, r.offset, r.key, r.value) for r in acked)
    assert_contiguous(got, {p: 500 for p in range(6)})
    got_kp = consume_kafka_python(cluster.node(3).bootstrap, "orders", range(6))
    assert [(r.partition, r.offset, r.value) for r in got_kp] == \
        [(r.partition, r.offset, r.value) for r in got]
    # Every replica holds the leader's bytes.
    wait_replicas_identical(cluster, "orders", 6)

    # A node that does not lead a partition refuses writes to it with NOT_LEADER_OR_FOLLOWER,
    # which a client answers by refreshing metadata: a producer bootstrapped from a
    # follower still delivers.
    acked2 = produce_confluent(cluster.node(3).bootstrap, "orders",
                               [Outgoing(value=b"late", partition=0)])
    assert acked2[0].offset == 500

    # Topic changes go through the quorum from any node.
    a = admin(cluster.node(2).bootstrap)
    a.create_partitions([__import__("confluent_kafka").admin.NewPartitions("orders", 8)])[
        "orders"].result(30)
    wait_until(lambda: all(len(cluster.metadata(n).topics["orders"].partitions) == 8
                           for n in cluster.nodes), 30, message="8 partitions everywhere")
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry
    res = ConfigResource(ConfigResource.Type.TOPIC, "orders", incremental_configs=[
        ConfigEntry("retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET)])
    a.incremental_alter_configs([res])[res].result(30)
    for n in cluster.nodes:
        wait_until(lambda n=n: (n.data_dir / "meta" / "topics.json").exists() and json.loads(
            (n.data_dir / "meta" / "topics.json").read_text())["orders"]["configs"].get(
            "retention.ms") == "3600000", 30, message=f"{n.name} to apply the new config")
    a.delete_topics(["orders"])["orders"].result(30)
    wait_until(lambda: all(not (n.data_dir / "orders-0").exists() for n in cluster.nodes), 30,
               message="every node to delete its replicas")


def test_clients_choose_the_replicas(cluster):
    """CreateTopics and CreatePartitions with explicit replica assignments: each partition lives
    on the nodes given, led by the first; an unknown node or a wrong replica count is
    INVALID_REPLICA_ASSIGNMENT and changes nothing."""
    a = admin(cluster.bootstrap)
    a.create_topics([NewTopic("placed", num_partitions=2, replica_assignment=[[2, 3], [3, 1]])],
                    request_timeout=30)["placed"].result(30)

    def placed(count: int):
        t = cluster.metadata().topics.get("placed")
        if t is None or len(t.partitions) != count:
            return None
        return {i: (p.leader, list(p.replicas)) for i, p in t.partitions.items()}

    wait_until(lambda: placed(2) == {0: (2, [2, 3]), 1: (3, [3, 1])}, 30,
               message="the assigned replicas and leaders")
    for bad in ([[1, 9]], [[1, 1]]):
        with pytest.raises(KafkaException) as exc:
            a.create_topics([NewTopic("misplaced", num_partitions=1, replica_assignment=bad)],
                            request_timeout=30)["misplaced"].result(30)
        assert exc.value.args[0].code() == KafkaError.INVALID_REPLICA_ASSIGNMENT, (bad, exc.value)
    assert "misplaced" not in cluster.metadata().topics
    with pytest.raises(KafkaException) as exc:
        a.create_partitions([NewPartitions("placed", 3, replica_assignment=[[1]])],
                            request_timeout=30)["placed"].result(30)
    assert exc.value.args[0].code() == KafkaError.INVALID_REPLICA_ASSIGNMENT
    a.create_partitions([NewPartitions("placed", 3, replica_assignment=[[1, 2]])],
                        request_timeout=30)["placed"].result(30)
    wait_until(lambda: (placed(3) or {}).get(2) == (1, [1, 2]), 30, message="the new partition on nodes 1 and 2")
    acked = produce_confluent(cluster.bootstrap, "placed", [Outgoing(b"v%d" % p, partition=p) for p in range(3)])
    assert sorted(r.partition for r in acked) == [0, 1, 2]


def established_to(pid: int, port: int) -> int:
    """TCP connections the process `pid` holds open to 127.0.0.1:`port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and remote == f"0100007F:{port:04X}":
            count += 1
    return count


def test_a_follower_fetches_every_partition_of_a_leader_over_one_connection(cluster):
    """Twelve partitions on three nodes: each node follows four from each other node, all over
    one connection to that node (Kafka's replica fetcher), and every replica holds the same
    bytes after acks=all writes to every partition."""
    create_replicated(cluster, "fanned", 12, config={"min.insync.replicas": "3"})
    acked = produce_confluent(cluster.bootstrap, "fanned",
                              [Outgoing(b"v%d-%d" % (p, i), partition=p)
                               for i in range(50) for p in range(12)])
    assert len(acked) == 600
    wait_replicas_identical(cluster, "fanned", 12)
    leaders = {p.id: p.leader for p in cluster.metadata().topics["fanned"].partitions.values()}
    for follower in cluster.nodes:
        for leader in cluster.nodes:
            if leader is follower:
                continue
            led = [p for p, n in leaders.items() if cluster.node(n) is leader]
            assert led, leaders
            assert established_to(follower.pid, leader.kafka_port) == 1, (follower, leader, led)


def test_acks_all_needs_min_insync_replicas(weir_factory):
    # Five voters, so that the metadata quorum outlives two replicas of a partition.
    cluster = start_cluster(weir_factory, 5)
    create_replicated(cluster, "payments", 1, config={"min.insync.replicas": "2"})
    p0 = cluster.metadata().topics["payments"].partitions[0]
    leader = cluster.node(p0.leader)
    f1, f2 = [cluster.node(r) for r in p0.replicas if r != p0.leader]
    produce_confluent(leader.bootstrap, "payments",
                      [Outgoing(value=f"a{i}".encode(), partition=0) for i in range(100)])

    # One follower down: the in-sync set shrinks and acks=all still succeeds.
    f1.kill()
    wait_until(lambda: len(isr(cluster, "payments", 0)) == 2, 30,
               message="the stopped follower to leave the in-sync set")
    produce_confluent(leader.bootstrap, "payments",
                      [Outgoing(value=f"b{i}".encode(), partition=0) for i in range(100)])

    # Two down: the leader alone is below min.insync.replicas; acks=all is refused with
    # NOT_ENOUGH_REPLICAS and nothing is appended.
    f2.kill()
    wait_until(lambda: isr(cluster, "payments", 0) == [p0.leader], 30,
               message="the second follower to leave the in-sync set")
    before = _end_offset(leader, "payments", 0)
    p = Producer({"bootstrap.servers": leader.bootstrap, "acks": "all",
                  "message.timeout.ms": 5000, "retries": 0})
    errors = []
    p.produce("payments", value=b"refused", partition=0,
              on_delivery=lambda err, msg: errors.append(err))
    p.flush(15)
    assert errors and errors[0] is not None, "acks=all with one in-sync replica succeeded"
    assert errors[0].name() == "NOT_ENOUGH_REPLICAS", errors[0]
    assert _end_offset(leader, "payments", 0) == before

    # Both come back: they catch up, rejoin the in-sync set, and hold the leader's bytes.
    cluster.start([f1, f2])
    wait_until(lambda: sorted(isr(cluster, "payments", 0)) == sorted(p0.replicas), 60,
               message="both followers to rejoin the in-sync set")
    produce_confluent(leader.bootstrap, "payments",
                      [Outgoing(value=f"c{i}".encode(), partition=0) for i in range(100)])
    got = consume_confluent(leader.bootstrap, "payments", [0])
    assert [r.value for r in got] == [f"{x}{i}".encode() for x in "abc" for i in range(100)]
    wait_replicas_identical(cluster, "payments", 1, [leader, f1, f2])


def _end_offset(node: WeirDaemon, topic: str, partition: int) -> int:
    from support import watermarks
    return watermarks(node.bootstrap, topic, [partition])[partition][1]


def test_metadata_survives_the_raft_leader_and_a_full_restart(cluster):
    create_replicated(cluster, "before", 2)
    controller = cluster.metadata().controller_id
    assert controller in (1, 2, 3)
    cluster.node(controller).kill()
    survivors = [n for n in cluster.nodes if n.running()]
    # Another voter takes over: topic creation works again within seconds.
    wait_until(lambda: cluster.metadata(survivors[0]).controller_id not in (-1, controller),
               30, message="a new Raft leader")
    a = admin(survivors[0].bootstrap)
    a.create_topics([NewTopic("after", num_partitions=2, replication_factor=2)])[
        "after"].result(30)
    # Every node restarted: the metadata is all there.
    for n in survivors:
        n.stop()
    cluster.start()
    for n in cluster.nodes:
        wait_until(lambda n=n: {"before", "after"} <= set(cluster.metadata(n).topics), 30,
                   message=f"{n.name} to list both topics after the restart")


def test_a_paused_controller_is_replaced(cluster):
    """A controller stopped by SIGSTOP (a long GC-like pause) keeps its connections open but
    says nothing: the other voters elect a new Raft leader, which fences the silent node and
    moves its partitions; the paused node comes back as a follower and catches up."""
    import signal
    create_replicated(cluster, "held", 3)
    controller = cluster.metadata().controller_id
    paused = cluster.node(controller)
    others = [n for n in cluster.nodes if n is not paused]
    paused.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: cluster.metadata(others[0]).controller_id not in (-1, controller),
                   30, message="a new Raft leader while the controller is paused")

        def moved():
            t = cluster.metadata(others[0]).topics["held"]
            return all(p.leader not in (-1, controller) for p in t.partitions.values())

        wait_until(moved, 30, message="every partition to leave the paused node")
        a = admin(others[0].bootstrap)  # alive until the future resolves
        a.create_topics([NewTopic("during", num_partitions=1, replication_factor=2)])[
            "during"].result(30)
        produce_confluent(others[0].bootstrap, "held",
                          [Outgoing(value=f"p{i}".encode(), partition=i % 3) for i in range(30)])
    finally:
        paused.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: "during" in cluster.metadata(paused).topics, 30,
               message="the resumed node to learn what was decided while it was paused")
    wait_replicas_identical(cluster, "held", 3)


class BackgroundProducer:
    """An idempotent acks=all confluent-kafka producer writing unique values round-robin over
    the partitions until stopped; remembers what was acknowledged, in order."""

    def __init__(self, bootstrap: str, topic: str, partitions: int):
        import threading
        self.topic, self.partitions = topic, partitions
        self.acked: list[tuple[int, int, bytes]] = []
        self.errors: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._p = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                            "enable.idempotence": True, "linger.ms": 5,
                            "message.timeout.ms": 120000, "socket.timeout.ms": 10000,
                            "topic.metadata.refresh.interval.ms": 1000})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _report(self, err, msg):
        if err is not None:
            self.errors.append(str(err))
        else:
            self.acked.append((msg.partition(), msg.offset(), msg.value()))

    def _run(self):
        while not self._stop.is_set():
            try:
                self._p.produce(self.topic, value=f"v{self.sent:07d}".encode(),
                                partition=self.sent % self.partitions, on_delivery=self._report)
                self.sent += 1
            except BufferError:
                pass
            self._p.poll(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        left = self._p.flush(120)
        assert left == 0, f"{left} record(s) never acknowledged"


def leader_of(cluster: Cluster, topic: str, partition: int) -> int:
    return cluster.metadata().topics[topic].partitions[partition].leader


@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_leaders_fail_over_under_an_idempotent_producer(cluster, how):
    partitions = 3
    create_replicated(cluster, "events", partitions, config={"min.insync.replicas": "2"})
    prod = BackgroundProducer(cluster.bootstrap, "events", partitions)
    try:
        for partition in range(partitions):
            wait_until(lambda: len(prod.acked) > 300 * (partition + 1), 60,
                       message="the producer to make progress")
            victim = cluster.node(leader_of(cluster, "events", partition))
            if how == "kill-9":
                victim.kill()
            else:
                victim.stop()
            others = [n for n in cluster.nodes if n is not victim]
            wait_until(lambda: cluster.metadata(others[0]).topics["events"].partitions[
                partition].leader not in (-1, int(victim.name[4:])), 30,
                message=f"partition {partition} to get a new leader")
            seen = len(prod.acked)
            wait_until(lambda: len(prod.acked) > seen + 200, 60,
                       message="the producer to go on with the new leader")
            victim.start(60)
            wait_until(lambda: all(len(p.isrs) == 3 for p in cluster.metadata().topics[
                "events"].partitions.values()), 60, message="every replica back in sync")
    finally:
        prod.stop()
    assert not prod.errors, f"delivery errors: {prod.errors[:5]}"
    got = consume_confluent(cluster.node(1).bootstrap, "events", range(partitions), timeout=60)
    values = [r.value for r in got]
    dupes = {v for v in values if values.count(v) > 1} if len(set(values)) != len(values) else set()
    assert not dupes, f"duplicated values: {sorted(dupes)[:10]}"
    acked_values = {v for _, _, v in prod.acked}
    lost = acked_values - set(values)
    assert not lost, f"{len(lost)} acknowledged value(s) lost: {sorted(lost)[:10]}"
    # Per partition, acknowledged values sit at the offsets they were acknowledged at, and
    # in the order they were produced.
    at = {(r.partition, r.offset): r.value for r in got}
    for p, off, v in prod.acked:
        assert at.get((p, off)) == v, f"{v} acknowledged at {p}/{off}, log has {at.get((p, off))}"
    for p in range(partitions):
        mine = [r.value for r in got if r.partition == p]
        assert mine == sorted(mine), f"partition {p} out of order"
    wait_replicas_identical(cluster, "events", partitions)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_group_keeps_consuming_when_its_coordinator_node_dies(cluster, protocol):
    """Both group protocols; a consumer-protocol member keeps its partitions throughout (the
    group's state is replicated with its offsets)."""
    from confluent_kafka import Consumer, TopicPartition
    partitions = 3
    create_replicated(cluster, "clicks", partitions)
    produce_confluent(cluster.bootstrap, "clicks",
                      [Outgoing(value=f"c{i:05d}".encode(), partition=i % partitions)
                       for i in range(3000)])
    lost: list[object] = []

    def consumer():
        conf = {"bootstrap.servers": cluster.bootstrap, "group.id": "readers",
                "enable.auto.commit": False, "auto.offset.reset": "earliest",
                "socket.timeout.ms": 10000, "group.protocol": protocol}
        if protocol == "classic":
            conf["session.timeout.ms"] = 10000
        c = Consumer(conf)
        c.subscribe(["clicks"], on_lost=lambda _c, ps: lost.append(ps))
        return c

    seen: list[bytes] = []

    def read(c, upto: int, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while len(set(seen)) < upto:
            assert time.monotonic() < deadline, f"consumed only {len(set(seen))} of {upto}"
            msgs = c.consume(200, 0.5)
            for m in msgs:
                assert m.error() is None, m.error()
                seen.append(m.value())
            if msgs:
                c.commit(asynchronous=False)

    c = consumer()
    read(c, 1500)
    coordinator = cluster.metadata().topics["__consumer_offsets"].partitions[0].leader
    cluster.node(coordinator).kill()
    # The group moves with its data: the new leader of __consumer_offsets coordinates it and
    # the consumer goes on, committing there.
    read(c, 3000)
    c.close()
    assert set(seen) == {f"c{i:05d}".encode() for i in range(3000)}
    if protocol == "consumer":
        assert not lost, f"the member lost its partitions: {lost}"

    # The committed offsets survived the coordinator: a new member starts at the end.
    survivor = next(n for n in cluster.nodes if n.running())
    a = admin(survivor.bootstrap)
    from confluent_kafka import ConsumerGroupTopicPartitions
    res = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions("readers")])
    committed = {tp.partition: tp.offset for tp in res["readers"].result(30).topic_partitions}
    assert committed == {p: 1000 for p in range(partitions)}, committed


def test_a_paused_leader_truncates_what_it_alone_wrote(weir_factory):
    import signal
    from fault_proxy import FaultProxy
    proxies = [FaultProxy(seed=0, fault_rate=0.0) for _ in range(3)]
    try:
        cluster = start_cluster(weir_factory, 3, proxies)
        create_replicated(cluster, "div", 1)
        produce_confluent(cluster.bootstrap, "div",
                          [Outgoing(value=f"a{i}".encode(), partition=0) for i in range(100)])
        wait_replicas_identical(cluster, "div", 1)
        old = cluster.node(leader_of(cluster, "div", 0))
        proxy = proxies[cluster.nodes.index(old)]
        # The old leader is cut off from its followers and takes acks=1 writes alone.
        proxy.hold()
        direct = f"127.0.0.1:{old.kafka_port}"
        # (Asked on its own port: the address it advertises goes through the held proxy.)
        sock = kw.connect(direct)
        batch = kw.record_batch([(None, f"x{i}".encode()) for i in range(50)], int(time.time() * 1000))
        _, results = kw.parse_produce_v3_response(
            kw.roundtrip(sock, kw.produce_v3(1, "div", 0, batch, acks=1)))
        assert results[0].error_code == 0 and results[0].base_offset == 100, results
        # Consumers never see past the high watermark: only the 100 replicated records.
        assert kw.list_offset_v1(sock, "div", 0) == 100
        sock.close()
        old.proc.send_signal(signal.SIGSTOP)
        proxy.reset()
        proxy.release()
        try:
            # A new leader comes from the in-sync followers and takes new writes.
            others = [n for n in cluster.nodes if n is not old]
            wait_until(lambda: leader_of_via(cluster, others[0], "div") in
                       [int(n.name[4:]) for n in others], 30, message="a new leader")
            new = cluster.node(leader_of_via(cluster, others[0], "div"))
            produce_confluent(new.bootstrap, "div",
                              [Outgoing(value=f"b{i}".encode(), partition=0) for i in range(30)])
        finally:
            old.proc.send_signal(signal.SIGCONT)
        # The old leader comes back as a follower, drops the 50 records only it had, and
        # holds the same bytes as the others.
        wait_replicas_identical(cluster, "div", 1)
        got = consume_confluent(new.bootstrap, "div", [0])
        assert [r.value for r in got] == [f"a{i}".encode() for i in range(100)] + \
            [f"b{i}".encode() for i in range(30)]
        assert "truncating a divergent log suffix" in old.log_tail(400)
    finally:
        for p in proxies:
            p.close()


def leader_of_via(cluster: Cluster, via: WeirDaemon, topic: str) -> int:
    return cluster.metadata(via).topics[topic].partitions[0].leader


def add_fourth_node(cluster: Cluster, weir_factory) -> WeirDaemon:
    """Starts node 4 with the cluster's voter list (an observer) and waits for it to show."""
    voters = cluster.nodes[0].extra_args[cluster.nodes[0].extra_args.index("--voters") + 1]
    (raft_port,) = _pick_free_ports(1)
    fourth = weir_factory("node4", start=False, config_yaml=CLUSTER_YAML,
                          extra_args=("--node-id", "4", "--voters", voters,
                                      "--cluster-addr", f"127.0.0.1:{raft_port}"))
    fourth.start(60)
    cluster.nodes.append(fourth)
    wait_until(lambda: len(cluster.metadata().brokers) == 4, 30, message="four brokers")
    return fourth


def test_a_new_node_joins_and_a_partition_moves_to_it(cluster, weir_factory):
    from kafka import TopicPartition as KTP
    from kafka.admin import KafkaAdminClient
    fourth = add_fourth_node(cluster, weir_factory)
    status = json.loads(subprocess.run(
        [fourth.binary, "cluster", "status", "--json", "--url", fourth.http_url],
        capture_output=True, check=True, timeout=30).stdout)
    assert [n["voter"] for n in status["nodes"]] == [True, True, True, False], status["nodes"]

    create_replicated(cluster, "moving", 1)
    produce_confluent(cluster.bootstrap, "moving",
                      [Outgoing(value=f"m{i}".encode(), partition=0) for i in range(500)])
    p0 = cluster.metadata().topics["moving"].partitions[0]
    leader = p0.leader
    # Leadership and a replica move from the current leader to the node without one (the new
    # node, unless the topic was placed on it).
    (spare,) = {1, 2, 3, 4} - set(p0.replicas)
    target = [spare] + [r for r in p0.replicas if r != leader]
    a = KafkaAdminClient(bootstrap_servers=cluster.bootstrap, request_timeout_ms=30000)
    try:
        result = a.alter_partition_reassignments({KTP("moving", 0): target})
        assert result == {KTP("moving", 0): None}, result
        wait_until(lambda: not a.list_partition_reassignments(), 60,
                   message="the reassignment to complete")
    finally:
        a.close()
    p0 = cluster.metadata().topics["moving"].partitions[0]
    assert sorted(p0.replicas) == sorted(target) and sorted(p0.isrs) == sorted(target), p0
    wait_until(lambda: cluster.metadata().topics["moving"].partitions[0].leader == spare, 30,
               message="the added replica to lead (preferred leader)")
    produce_confluent(cluster.bootstrap, "moving",
                      [Outgoing(value=f"n{i}".encode(), partition=0) for i in range(100)])
    got = consume_confluent(cluster.bootstrap, "moving", [0])
    assert [r.value for r in got] == [f"m{i}".encode() for i in range(500)] + \
        [f"n{i}".encode() for i in range(100)]
    wait_replicas_identical(cluster, "moving", 1, [cluster.node(r) for r in target])
    # The node the partition moved away from drops its copy.
    wait_until(lambda: segment_bytes(cluster.node(leader), "moving", 0) == b"", 30,
               message="the old replica's data to be dropped")


def test_a_single_node_becomes_the_first_node_of_a_cluster(weir_factory):
    """A node that ran alone restarts as the one voter of a new cluster with its data in
    place: its records and committed offsets are kept. Two nodes join, become voters, and
    take replicas of every partition by reassignment; the first node can then die without
    losing anything."""
    from kafka import TopicPartition as KTP
    from kafka.admin import KafkaAdminClient
    raft_ports = _pick_free_ports(3)
    first = weir_factory("node1", config_yaml=CLUSTER_YAML)
    create_topic(first.bootstrap, "kept", partitions=2, config={"retention.ms": "-1"})
    values = [f"k{i}".encode() for i in range(300)]
    produce_confluent(first.bootstrap, "kept",
                      [Outgoing(value=v, partition=i % 2) for i, v in enumerate(values)])
    c = Consumer(consumer_conf(first.bootstrap, **{"group.id": "readers"}))
    c.commit(offsets=[TopicPartition("kept", 0, 100), TopicPartition("kept", 1, 40)],
             asynchronous=False)
    c.close()
    first.stop()

    voters = f"1@127.0.0.1:{raft_ports[0]}"
    first.extra_args += ["--node-id", "1", "--voters", voters]
    first.start(60)
    assert "a local topic joins the cluster on this node" in first.log_tail(400)
    t = admin(first.bootstrap).list_topics("kept", timeout=10).topics["kept"]
    assert [(p.leader, p.replicas) for p in t.partitions.values()] == [(1, [1]), (1, [1])]
    got = consume_confluent(first.bootstrap, "kept", [0, 1])
    assert sorted(r.value for r in got) == sorted(values)
    assert committed_offsets(first.bootstrap, "readers", "kept", range(2)) == {0: 100, 1: 40}

    others = [weir_factory(f"node{i}", start=False, config_yaml=CLUSTER_YAML,
                           extra_args=("--node-id", str(i), "--voters", voters,
                                       "--cluster-addr", f"127.0.0.1:{raft_ports[i - 1]}"))
              for i in (2, 3)]
    cluster = Cluster([first, *others])
    cluster.start(others)
    wait_until(lambda: len(cluster.metadata().brokers) == 3, 30, message="three brokers")
    for i in (2, 3):
        added = _weir_cluster(first, "add-voter", str(i))
        assert added.returncode == 0, added.stderr
    assert _voters(first) == [1, 2, 3]

    a = KafkaAdminClient(bootstrap_servers=cluster.bootstrap, request_timeout_ms=30000)
    try:
        moves = {KTP(name, p): [1, 2, 3] for name, n in
                 (("kept", 2), ("__consumer_offsets", 1), ("__transaction_state", 1),
                  ("__pipeline_offsets", 1))
                 for p in range(n)}
        assert a.alter_partition_reassignments(moves) == {tp: None for tp in moves}
        wait_until(lambda: not a.list_partition_reassignments(), 90,
                   message="the reassignments to complete")
    finally:
        a.close()
    for name in ("kept", "__consumer_offsets"):
        for p in cluster.metadata(topic=name).topics[name].partitions.values():
            assert sorted(p.isrs) == [1, 2, 3], (name, p)
    wait_replicas_identical(cluster, "kept", 2)

    first.kill()
    rest = ",".join(n.bootstrap for n in others)
    wait_until(lambda: all(p.leader in (2, 3) for p in admin(rest).list_topics(
        "kept", timeout=10).topics["kept"].partitions.values()), 60,
        message="nodes 2 and 3 to lead every partition of kept")
    got = consume_confluent(rest, "kept", [0, 1])
    assert sorted(r.value for r in got) == sorted(values)
    wait_until(lambda: committed_offsets(rest, "readers", "kept", range(2)) == {0: 100, 1: 40}, 60,
               message="the committed offsets to be served by a new coordinator")


def test_a_cluster_of_several_voters_refuses_a_single_nodes_data(weir_factory):
    """Two nodes' topics cannot both start a cluster: a data directory with topics in it
    joins a new quorum only as its one voter."""
    raft_ports = _pick_free_ports(2)
    node = weir_factory("node1", config_yaml=CLUSTER_YAML)
    create_topic(node.bootstrap, "mine", partitions=1)
    node.stop()
    node.extra_args += ["--node-id", "1", "--voters",
                        ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(raft_ports))]
    with pytest.raises(DaemonError):
        node.start(30)
    tail = node.log_tail(50)
    assert "holds topics of a node that is not part of this cluster (mine)" in tail, tail
    assert f"--voters 1@127.0.0.1:{raft_ports[0]}" in tail, tail


def _weir_cluster(node: WeirDaemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([node.binary, "cluster", *args, "--url", node.http_url],
                          capture_output=True, text=True, timeout=90)


def _voters(node: WeirDaemon) -> list[int]:
    status = json.loads(_weir_cluster(node, "status", "--json").stdout)
    return [n["id"] for n in status["nodes"] if n["voter"]]


def test_voters_change_so_the_quorum_outlives_its_first_voters(cluster, weir_factory):
    """A node that joined as an observer is made a voter, and a dead voter is removed: the
    metadata quorum then lives on with two of the three original voters gone, and the new
    voter restarts as a voter although `--voters` does not list it."""
    fourth = add_fourth_node(cluster, weir_factory)
    assert _voters(fourth) == [1, 2, 3]

    added = _weir_cluster(cluster.node(2), "add-voter", "4")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "voters: 1, 2, 3, 4"
    wait_until(lambda: all(_voters(n) == [1, 2, 3, 4] for n in cluster.nodes), 30,
               message="every node to see four voters")
    again = _weir_cluster(cluster.node(3), "add-voter", "4")
    assert again.returncode != 0 and "node 4 is a voter already" in again.stderr, again
    unknown = _weir_cluster(cluster.node(3), "add-voter", "9")
    assert unknown.returncode != 0 and "node 9 has not joined" in unknown.stderr, unknown

    # Node 1 dies for good and is removed: three voters, of which two must answer.
    cluster.node(1).kill()
    removed = _weir_cluster(cluster.node(2), "remove-voter", "1")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == "voters: 2, 3, 4"
    cluster.node(2).kill()
    # With the first voters only, two of three gone would leave no quorum.
    survivors = [cluster.node(3), fourth]
    bootstrap = ",".join(n.bootstrap for n in survivors)

    def created(name):
        a = admin(bootstrap)  # alive until the future resolves
        fs = a.create_topics([NewTopic(name, 1, replication_factor=2)], request_timeout=20)
        try:
            fs[name].result(timeout=30)
        except KafkaException as e:  # created by an earlier try whose answer was lost
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        return True

    wait_until(lambda: created("after-two-voters-left"), 60,
               message="a topic to be created with voters 3 and 4 alive")
    produce_confluent(bootstrap, "after-two-voters-left",
                      [Outgoing(value=f"v{i}".encode(), partition=0) for i in range(10)])
    assert [r.value for r in consume_confluent(bootstrap, "after-two-voters-left", [0])] == \
        [f"v{i}".encode() for i in range(10)]

    # The new voter restarts: it is a voter from its Raft log, and the quorum needs it.
    fourth.kill()
    fourth.start(60)
    assert _voters(fourth) == [2, 3, 4]
    wait_until(lambda: created("after-a-restart"), 60,
               message="a topic to be created once node 4 is back")


def test_a_transactional_loop_survives_its_coordinator_node_dying(cluster):
    """confluent-kafka consumes, transforms and produces in transactions with the consumed
    offsets in them, while the node coordinating the transactions is killed with -9 in the
    middle of a transaction, twice (the first victim is started again in between): every
    input appears exactly once in the read_committed output, and the group's offsets end at
    the input's end."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from test_exactly_once import READ_COMMITTED, read_all, txn_producer, values
    partitions, n = 3, 1500
    for name in ("txn-in", "txn-out"):
        create_replicated(cluster, name, partitions, config={"min.insync.replicas": "2"})
    produce_confluent(cluster.bootstrap, "txn-in",
                      [Outgoing(value=f"in-{i:05d}".encode(), partition=i % partitions)
                       for i in range(n)])
    tps = [TopicPartition("txn-in", p) for p in range(partitions)]
    consumer = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "txn-loop",
                         "enable.auto.commit": False, "isolation.level": READ_COMMITTED,
                         "auto.offset.reset": "earliest", "socket.timeout.ms": 10000})
    consumer.assign(tps)
    producer = txn_producer(cluster.bootstrap, "txn-loop-app",
                            **{"message.timeout.ms": 30000, "socket.timeout.ms": 10000})

    def rewind():
        """After an abort, go back to what the group committed."""
        for tp in consumer.committed(tps, timeout=30):
            consumer.seek(TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)))

    def kill_coordinator():
        for node in cluster.nodes:
            if not node.running():
                node.start(60)
        coordinator = cluster.metadata().topics["__transaction_state"].partitions[0].leader
        cluster.node(coordinator).kill()
        victims.append(coordinator)

    victims: list[int] = []
    committed_rounds, aborted = 0, 0
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "the loop did not finish"
        positions = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=30)}
        if all(positions.get(p, -1) == n // partitions for p in range(partitions)):
            break
        msgs = [m for m in consumer.consume(num_messages=60, timeout=1.0) if not m.error()]
        if not msgs:
            continue
        try:
            producer.begin_transaction()
            for m in msgs:
                producer.produce("txn-out", value=m.value().replace(b"in-", b"out-"),
                                 partition=m.partition())
            if committed_rounds in (8, 16) and len(victims) < committed_rounds // 8:
                # The transaction holds its partitions when its coordinator dies.
                producer.flush(30)
                kill_coordinator()
            producer.send_offsets_to_transaction(consumer.position(tps),
                                                 consumer.consumer_group_metadata(), 60)
            producer.commit_transaction(60)
            committed_rounds += 1
        except KafkaException as e:
            err = e.args[0]
            assert not err.fatal(), f"fatal transaction error: {err}"
            if err.txn_requires_abort():
                producer.abort_transaction(60)
            aborted += 1
            rewind()
    consumer.close()
    print(f"transactions committed: {committed_rounds}, failed and redone: {aborted}, "
          f"coordinators killed: {victims}")
    assert len(victims) == 2, victims
    for node in cluster.nodes:
        if not node.running():
            node.start(60)

    out = values(read_all(cluster.bootstrap, "txn-out", partitions, READ_COMMITTED, timeout=60))
    dupes = {v for v in out if out.count(v) > 1}
    assert not dupes, f"{len(dupes)} output value(s) twice, e.g. {sorted(dupes)[:5]}"
    assert sorted(out) == [f"out-{i:05d}".encode() for i in range(n)], \
        f"{n - len(set(out))} input value(s) missing from the output"
    wait_replicas_identical(cluster, "txn-out", partitions)


def test_a_hanging_transaction_is_aborted(weir_factory):
    """A transaction open in a partition that its coordinator does not know (here every copy
    of `__transaction_state` is lost while the cluster is down) would hold the partition's
    last stable offset, and every read_committed consumer, for good. The coordinator finds it
    through the leaders' DescribeProducers and aborts it once its producer has been silent
    for the longest transaction timeout."""
    from test_exactly_once import txn_producer
    cluster = start_cluster(weir_factory, 3, config_yaml="transaction_max_timeout_ms: 4000\n")
    create_replicated(cluster, "ledger", 1, config={"min.insync.replicas": "2"})
    producer = txn_producer(cluster.bootstrap, "ledger-app", **{"transaction.timeout.ms": 4000})
    producer.begin_transaction()
    for i in range(3):
        producer.produce("ledger", value=f"open-{i}".encode(), partition=0)
    producer.flush(30)
    # Down before the transaction times out: only the partition remembers it.
    for n in cluster.nodes:
        n.kill()
    del producer
    for n in cluster.nodes:
        state = n.data_dir / "__transaction_state-0"
        assert state.is_dir(), f"{n.name} has no {state.name}"
        shutil.rmtree(state)
    cluster.start()
    later = produce_confluent(cluster.bootstrap, "ledger",
                              [Outgoing(value=f"plain-{i}".encode(), partition=0)
                               for i in range(5)])
    assert [r.offset for r in later] == [3, 4, 5, 6, 7]
    # Held back at offset 0 until the coordinator aborts the transaction, then readable;
    # the transaction's records never are.
    wait_until(lambda: [v for _, _, _, v, _ in read_committed(cluster.bootstrap, "ledger")] ==
               [f"plain-{i}".encode() for i in range(5)], 90,
               message="read_committed to reach past the hanging transaction")
    aborted = sum(metric(n, "weir_hanging_transactions_aborted_total") for n in cluster.nodes)
    assert aborted == 1, f"{aborted} hanging transactions aborted"
    wait_replicas_identical(cluster, "ledger", 1)


def test_a_leader_whose_disk_is_full_hands_over(weir_factory, tmp_path):
    """A leader whose disk fills up (every write fails with ENOSPC, through an LD_PRELOAD shim)
    hands its partition to another in-sync replica, so an idempotent acks=all producer goes
    on with retries only; once the disk has room again the node catches up, rejoins the
    in-sync set and leads its partition again as its preferred leader."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
    from nemesis import DiskControl
    shim = DiskControl.build_shim(tmp_path / "diskfault.so")
    disks = {i: DiskControl(tmp_path / f"node{i}.disk") for i in (1, 2, 3)}

    def factory(name, **kw):
        d = weir_factory(name, **kw)
        d.env.update(disks[int(name.removeprefix("node"))].env(shim))
        return d

    cluster = start_cluster(factory, 3)
    # Led by a node that is not the Raft leader, whose own log writes would stall the quorum.
    controller = cluster.metadata().controller_id
    full = next(n for n in (1, 2, 3) if n != controller)
    replicas = [full] + [n for n in (1, 2, 3) if n != full]
    a = admin(cluster.bootstrap)
    a.create_topics([NewTopic("spill", num_partitions=1, replica_assignment=[replicas],
                              config={"min.insync.replicas": "2"})])["spill"].result(30)
    wait_until(lambda: all(cluster.metadata(n).topics.get("spill") is not None and
                           cluster.metadata(n).topics["spill"].partitions[0].leader == full
                           for n in cluster.nodes), 30, message="every node to know spill")
    # One idempotent producer throughout, as an application's would be.
    producer = Producer(producer_conf(cluster.bootstrap, **{"enable.idempotence": True,
                                                           "message.timeout.ms": 60000}))
    delivered: list = []
    errors: list = []

    def send(prefix: str, n: int) -> None:
        def report(err, msg):
            (errors if err else delivered).append(err or (msg.offset(), msg.value()))
        for i in range(n):
            producer.produce("spill", value=f"{prefix}-{i}".encode(), partition=0,
                             on_delivery=report)
        assert producer.flush(90) == 0, "records still undelivered"
        assert not errors, errors[:3]

    send("a", 100)
    disks[full].set(full=True)
    send("b", 300)
    # A new producer whose InitProducerId reaches the full node gets an id from the block the
    # node reserved ahead.
    pid, epoch = kw.init_producer_id(cluster.node(full).bootstrap)
    assert pid >= 0 and epoch == 0, (pid, epoch)
    # As the other nodes see it (the full node's own metadata stalls with its Raft storage).
    witness = cluster.node(controller)
    p = cluster.metadata(witness).topics["spill"].partitions[0]
    assert p.leader != full and full not in p.isrs, (p.leader, p.isrs)

    disks[full].set()
    wait_until(lambda: cluster.metadata(witness).topics["spill"].partitions[0].leader == full,
               60, message=f"node {full} to catch up and lead spill again")
    send("c", 100)
    assert [o for o, _ in delivered] == list(range(500))
    got = consume_confluent(cluster.bootstrap, "spill", [0])
    assert [(r.offset, r.value) for r in got] == delivered
    wait_replicas_identical(cluster, "spill", 1)


def metric(node: WeirDaemon, name: str) -> float:
    """A counter without labels from the node's /metrics."""
    for line in requests.get(f"{node.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{node.name} has no {name}")


def test_kafka_python_and_kcat_follow_a_leader_change(cluster, kcat_bin):
    """An idempotent kcat producer, an idempotent kafka-python producer and a kafka-python
    group consumer keep working, unchanged and never restarted, when the partition's leader
    is killed with -9: nothing acknowledged is lost or duplicated."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka import TopicPartition as KTP
    create_replicated(cluster, "follow", 1, config={"min.insync.replicas": "2"})
    kcat = subprocess.Popen(
        [kcat_bin, "-P", "-b", cluster.bootstrap, "-t", "follow", "-p", "0",
         "-X", "enable.idempotence=true", "-X", "topic.metadata.refresh.interval.ms=1000"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    kp = KafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all",
                       enable_idempotence=True, retries=1000, retry_backoff_ms=200,
                       request_timeout_ms=10000, metadata_max_age_ms=1000)
    consumer = KafkaConsumer("follow", bootstrap_servers=cluster.bootstrap,
                             group_id="follow-readers", enable_auto_commit=False,
                             auto_offset_reset="earliest", request_timeout_ms=30000,
                             session_timeout_ms=10000, heartbeat_interval_ms=1000,
                             metadata_max_age_ms=1000)
    seen: list[bytes] = []

    def write(phase: str) -> None:
        for i in range(100):
            kcat.stdin.write(f"{phase}-kcat-{i}\n".encode())
            kp.send("follow", f"{phase}-kp-{i}".encode(), partition=0)
        kcat.stdin.flush()

    def read(want: set[bytes], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not want <= set(seen):
            assert time.monotonic() < deadline, \
                f"the group read {len(want & set(seen))} of {len(want)}"
            for msgs in consumer.poll(timeout_ms=500).values():
                seen.extend(m.value for m in msgs)
        consumer.commit()

    def values(phase: str, who: str) -> set[bytes]:
        return {f"{phase}-{who}-{i}".encode() for i in range(100)}

    write("before")
    kp.flush(60)
    # kcat sends what it has read of its input at its own pace; kafka-python's are flushed.
    read(values("before", "kp"))
    victim = leader_of(cluster, "follow", 0)
    cluster.node(victim).kill()
    write("after")
    kp.flush(120)
    kp.close()
    kcat.stdin.close()
    assert kcat.wait(120) == 0, kcat.stderr.read().decode()[-2000:]
    want = set().union(*(values(phase, who) for phase in ("before", "after")
                         for who in ("kcat", "kp")))
    read(want)
    consumer.close()
    assert leader_of(cluster, "follow", 0) != victim

    assert set(seen) == want
    survivor = next(n for n in cluster.nodes if n.running())
    logged = [r.value for r in consume_kcat(kcat_bin, survivor.bootstrap, "follow")]
    assert sorted(logged) == sorted(want), "every value once in the log, none lost or twice"
    # The group's committed offset survived and sits at the end of the log.
    c = KafkaConsumer(bootstrap_servers=survivor.bootstrap, group_id="follow-readers",
                      enable_auto_commit=False, request_timeout_ms=30000)
    assert c.committed(KTP("follow", 0)) == 400
    c.close()


def test_the_cli_reaches_every_partition_leader_and_coordinator(cluster):
    """`weir produce`, `weir consume` and `weir group` given any one node work on partitions
    led by the others and on a group coordinated elsewhere, and follow a leader change."""
    from confluent_kafka import Consumer, TopicPartition
    create_replicated(cluster, "cli-spread", 3)
    leaders = {leader_of(cluster, "cli-spread", p) for p in range(3)}
    assert len(leaders) > 1, "the partitions' leaders should spread over the nodes"
    first = [f"a{i}" for i in range(300)]
    cluster.node(1).cli("produce", "cli-spread", input="\n".join(first) + "\n")
    out = cluster.node(2).cli("consume", "cli-spread", "--from-beginning", "-e").stdout
    assert sorted(out.decode().split()) == sorted(first)

    # A group coordinated by some node, described and reset through another.
    c = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "cli-group",
                  "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition("cli-spread", p, 10) for p in range(3)],
             asynchronous=False)
    c.close()
    coordinator = cluster.metadata().topics["__consumer_offsets"].partitions[0].leader
    other = next(n for n in cluster.nodes if n.name != f"node{coordinator}")
    described = json.loads(other.cli("group", "describe", "cli-group", "--format", "json").stdout)
    assert {(o["partition"], o["committed"]) for o in described["offsets"]} == \
        {(p, 10) for p in range(3)}
    assert "cli-group" in other.cli("group", "list").stdout.decode()
    other.cli("group", "reset-offsets", "cli-group", "--topic", "cli-spread", "--to-earliest")
    described = json.loads(other.cli("group", "describe", "cli-group", "--format", "json").stdout)
    assert {o["committed"] for o in described["offsets"]} == {0}

    # After a leader is killed, the CLI finds the new one.
    cluster.node(leader_of(cluster, "cli-spread", 0)).kill()
    survivor = next(n for n in cluster.nodes if n.running())
    wait_until(lambda: leader_of(cluster, "cli-spread", 0) not in (-1,) and cluster.node(
        leader_of(cluster, "cli-spread", 0)).running(), 30, message="a new leader")
    second = [f"b{i}" for i in range(300)]
    survivor.cli("produce", "cli-spread", input="\n".join(second) + "\n")
    out = survivor.cli("consume", "cli-spread", "--from-beginning", "-e").stdout
    assert sorted(out.decode().split()) == sorted(first + second)


def lines_pipeline(logs: Path, more: str = "") -> str:
    """The pipeline `lines`: the lines of `logs`/in.log into the one-partition topic `lines`,
    then `more` (YAML)."""
    return f"""\
name: lines
source:
  file:
    paths: ["{logs}/in.log"]
    format: lines
topic:
  name: lines
  partitions: 1
{more}"""


@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_pipelines_move_when_their_node_goes_and_stay_exactly_once(weir_factory, tmp_path, how):
    """Every node is given the same pipelines directory and the cluster runs each pipeline on
    one node: `lines` (a file source into a topic, and a file sink), `copy` (that topic into
    another). The node running `lines` is killed with -9 (or stopped) while lines keep coming:
    its pipeline moves to another node, which fences the old transactional producer and
    resumes from the committed offsets. Both topics and the sink's file hold every line once,
    in order."""
    from test_pipelines import pipeline_state, read_committed

    logs, out, pipelines = tmp_path / "logs", tmp_path / "out", tmp_path / "pipelines"
    for d in (logs, out, pipelines):
        d.mkdir()
    (pipelines / "lines.yaml").write_text(lines_pipeline(logs, f"""\
sinks:
  - file:
      path: {out}/lines.txt
      format: lines
batch_records: 50
"""))
    (pipelines / "copy.yaml").write_text("""\
name: copy
source:
  topic:
    name: lines
topic:
  name: copy
  partitions: 1
batch_records: 50
""")
    c = start_cluster(weir_factory, 3, extra_args=("--pipelines", str(pipelines)))

    def states(name: str):
        return {int(n.name[4:]): pipeline_state(n, name) for n in c.live()}

    def owner(name: str):
        running = [i for i, s in states(name).items() if s and s["state"] == "running"]
        return running[0] if len(running) == 1 else None

    def shown_everywhere(name: str, node: int) -> bool:
        return all(s and (s["state"] == "running") == (i == node) and s.get("node") == node
                   for i, s in states(name).items())

    # Two pipelines on three nodes end up on two nodes.
    first, _ = wait_until(lambda: (owner("lines"), owner("copy")) if None not in (
        owner("lines"), owner("copy")) and owner("lines") != owner("copy") else None,
        timeout=60, message="`lines` and `copy` to run, on two nodes")
    wait_until(lambda: shown_everywhere("lines", first), timeout=30,
               message="every node to show where `lines` runs")
    n = 2000
    log = logs / "in.log"

    def write(lo, hi):
        with open(log, "a") as f:
            for i in range(lo, hi):
                f.write(f"line {i}\n")
                if i % 50 == 0:
                    f.flush()
                    time.sleep(0.02)

    write(0, 600)
    wait_until(lambda: len(read_committed(c.bootstrap, "lines")) >= 200, timeout=60,
               message="the first lines in the topic")
    if how == "kill-9":
        c.node(first).kill()
    else:
        c.node(first).stop()
    write(600, 1400)
    second = wait_until(lambda: owner("lines") not in (None, first) and owner("lines"),
                        timeout=60, message="another node to take `lines` over")
    write(1400, n)
    want = [f"line {i}".encode() for i in range(n)]

    def topic_values(topic: str):
        return [v for _, _, _, v, _ in read_committed(c.bootstrap, topic, timeout=60)]

    def sink_lines():
        return [line for p in sorted(out.glob("lines*.txt")) for line in p.read_bytes().splitlines()]

    wait_until(lambda: len(topic_values("lines")) >= n, timeout=90, message="every line in the topic")
    wait_until(lambda: len(topic_values("copy")) >= n, timeout=90, message="every line copied")
    wait_until(lambda: len(sink_lines()) >= n, timeout=90, message="every line in the sink's file")
    assert topic_values("lines") == want
    assert topic_values("copy") == want
    assert sorted(sink_lines()) == sorted(want) and len(sink_lines()) == n
    # The node comes back; every node says where each pipeline runs.
    c.node(first).start()
    wait_until(lambda: shown_everywhere("lines", second), timeout=60,
               message="every node to show where `lines` runs")
    placed = requests.get(f"{c.node(first).http_url}/cluster", timeout=5).json()["pipelines"]
    assert placed["lines"] == second and set(placed) == {"lines", "copy"}, placed


def test_a_pipeline_paused_through_any_node_stays_paused_when_it_moves(weir_factory, tmp_path):
    """`weir pipeline pause` given a node that does not run the pipeline pauses it where it
    runs; it stays paused when its node is killed and it moves; resumed through yet another
    node, it goes on from where it was, every line once."""
    from test_pipelines import pipeline_state, read_committed

    logs, pipelines = tmp_path / "logs", tmp_path / "pipelines"
    logs.mkdir()
    pipelines.mkdir()
    (pipelines / "lines.yaml").write_text(lines_pipeline(logs))
    c = start_cluster(weir_factory, 3, extra_args=("--pipelines", str(pipelines)))

    def state_on(node) -> str | None:
        return (pipeline_state(node, "lines") or {}).get("state")

    def owner() -> int | None:
        on = [i for i in (1, 2, 3) if c.node(i).running() and state_on(c.node(i)) in
              ("running", "paused")]
        return on[0] if len(on) == 1 else None

    first = wait_until(owner, timeout=60, message="the pipeline to run on one node")
    log = logs / "in.log"
    log.write_text("".join(f"line {i}\n" for i in range(300)))

    def values():
        return [v for _, _, _, v, _ in read_committed(c.bootstrap, "lines", timeout=60)]

    wait_until(lambda: len(values()) >= 300, timeout=60, message="the first lines in the topic")
    other = next(i for i in (1, 2, 3) if i != first)
    paused = subprocess.run([c.node(other).binary, "pipeline", "pause", "lines",
                             "--url", c.node(other).http_url],
                            capture_output=True, text=True, timeout=60)
    assert paused.returncode == 0, paused.stderr
    wait_until(lambda: state_on(c.node(first)) == "paused", timeout=30,
               message="the pipeline to pause on the node that runs it")
    with open(log, "a") as f:
        f.write("".join(f"line {i}\n" for i in range(300, 600)))
    time.sleep(3)
    assert len(values()) == 300, "a paused pipeline went on reading"

    c.node(first).kill()
    second = wait_until(lambda: owner() not in (None, first) and owner(), timeout=60,
                        message="another node to take the pipeline over")
    wait_until(lambda: state_on(c.node(second)) == "paused", timeout=30,
               message="the moved pipeline to stay paused")
    time.sleep(2)
    assert len(values()) == 300, "the moved pipeline ran although paused"

    third = next(i for i in (1, 2, 3) if i not in (first, second))
    resumed = requests.post(f"{c.node(third).http_url}/pipelines/lines/resume", timeout=60)
    assert resumed.status_code == 200, resumed.text
    wait_until(lambda: len(values()) >= 600, timeout=60, message="every line after the resume")
    time.sleep(2)
    assert values() == [f"line {i}".encode() for i in range(600)]


def test_an_http_source_takes_posts_on_every_node(weir_factory, tmp_path):
    """An HTTP source's pipeline runs on one node; a post to any node reaches it (the others
    hand it over and pass its answer back), an idempotency key still makes a retry land once,
    and a refused body is refused the same way through any node."""
    from test_pipelines import HTTP_PIPELINE, pipeline_state, post, read_committed

    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "activity.yaml").write_text(HTTP_PIPELINE)
    c = start_cluster(weir_factory, 3, extra_args=("--pipelines", str(pipelines)))
    wait_until(lambda: any((pipeline_state(n, "activity") or {}).get("state") == "running"
                           for n in c.nodes), timeout=60, message="the pipeline to run")
    wait_until(lambda: all((pipeline_state(n, "activity") or {}).get("state") in
                           ("running", "elsewhere") for n in c.nodes), timeout=30,
               message="every node to know where the pipeline runs")
    for i, n in enumerate(c.nodes):
        body = b"".join(json.dumps({"user": f"u{i}", "n": k}).encode() + b"\n" for k in range(10))
        r = post(n, "/ingest/activity", body, key=f"batch-{i}")
        assert r.status_code == 200 and r.json() == {"accepted": 10}, (n.name, r.text)
        # The same batch again, through the next node: the key makes it land once.
        again = post(c.nodes[(i + 1) % 3], "/ingest/activity", body, key=f"batch-{i}")
        assert again.status_code == 200, again.text
    bad = post(c.nodes[1], "/ingest/activity", b'{"user": oops}\n')
    assert bad.status_code == 400 and "line 1" in bad.json()["error"], bad.text
    assert post(c.nodes[2], "/ingest/nothing-here", b"{}").status_code == 404
    got = sorted((json.loads(v)["user"], json.loads(v)["n"])
                 for _, _, _, v, _ in read_committed(c.bootstrap, "activity"))
    assert got == sorted((f"u{i}", k) for i in range(3) for k in range(10))


def test_a_pipeline_resumes_where_it_was_after_every_node_restarts(weir_factory, tmp_path):
    """Every node killed with -9 at once and started again: the replicas come back without
    their high watermarks, and the pipeline, placed again, must still find its committed
    offset (it reads its offsets up to a write of its own, not up to a high watermark being
    relearnt) rather than start over."""
    from test_pipelines import pipeline_state, read_committed

    logs, pipelines = tmp_path / "logs", tmp_path / "pipelines"
    logs.mkdir()
    pipelines.mkdir()
    (pipelines / "lines.yaml").write_text(lines_pipeline(logs))
    c = start_cluster(weir_factory, 3, extra_args=("--pipelines", str(pipelines)))
    wait_until(lambda: any((pipeline_state(n, "lines") or {}).get("state") == "running"
                           for n in c.live()), timeout=60, message="the pipeline to run")
    log = logs / "in.log"
    log.write_text("".join(f"line {i}\n" for i in range(500)))

    def values():
        return [v for _, _, _, v, _ in read_committed(c.bootstrap, "lines", timeout=60)]

    wait_until(lambda: len(values()) >= 500, timeout=60, message="the first lines in the topic")
    for n in c.nodes:
        n.kill()
    c.start()
    with open(log, "a") as f:
        f.write("".join(f"line {i}\n" for i in range(500, 1000)))
    wait_until(lambda: len(values()) >= 1000, timeout=90, message="every line in the topic")
    time.sleep(2)  # a pipeline that started over would still be writing
    assert values() == [f"line {i}".encode() for i in range(1000)]


def test_a_controller_cut_off_from_the_other_nodes_fences_nobody(weir_factory):
    """The controller's inbound links (Kafka and cluster) are cut while it can still send: the
    other voters keep it as Raft leader and it hears no heartbeats. It must not fence the two
    nodes it cannot hear (which would move every leadership to itself, unreachable), and the
    partitions they lead stay writable."""
    from fault_proxy import FaultProxy

    proxies = [FaultProxy(seed=i, fault_rate=0.0) for i in range(3)]
    raft_proxies = [FaultProxy(seed=0, fault_rate=0.0, kafka=False) for _ in range(3)]
    c = None
    try:
        c = start_cluster(weir_factory, 3, proxies, raft_proxies=raft_proxies)
        create_replicated(c, "t", 3, config={"min.insync.replicas": "2"})
        controller = c.metadata().controller_id
        others = [n for n in c.nodes if int(n.name[4:]) != controller]
        for p in (proxies[controller - 1], raft_proxies[controller - 1]):
            p.hold()
        fenced = []
        deadline = time.monotonic() + 8  # more than two node sessions (3 s)
        while time.monotonic() < deadline:
            for n in others:
                status = requests.get(f"{n.http_url}/cluster", timeout=5).json()
                fenced += [m["id"] for m in status["nodes"] if m["fenced"] and m["id"] != controller]
            time.sleep(0.5)
        assert not fenced, f"the cut-off controller fenced nodes {sorted(set(fenced))}"
        # A partition one of the others leads takes acks=all writes meanwhile.
        md = c.metadata(others[0])
        mine = [p for p, pm in md.topics["t"].partitions.items()
                if pm.leader != controller]
        assert mine, "every partition is led by the controller"
        producer = Producer({"bootstrap.servers": others[0].bootstrap, "acks": "all",
                             "message.timeout.ms": 20000})
        errors = []
        producer.produce("t", b"while cut off", partition=mine[0],
                         on_delivery=lambda err, _: err and errors.append(err))
        assert producer.flush(30) == 0 and not errors, errors
    finally:
        for p in proxies + raft_proxies:
            p.release()
        # The nodes stop while the proxies they advertise still relay.
        for n in (c.nodes if c else []):
            if n.running():
                n.stop()
        for p in proxies + raft_proxies:
            p.close()
