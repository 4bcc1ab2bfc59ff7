"""ACLs: Kafka's authorizer model on the Kafka listeners, checked with real clients
(confluent-kafka, kafka-python, kcat) logged in over SASL, ACLs managed with `weir acl` and
with Kafka's own admin APIs, kept across restarts and shared by the nodes of a cluster.

Most daemons here have a PLAINTEXT listener first whose principal, User:ANONYMOUS, is a super
user: `weir` commands and the checks of what was (or was not) written go through it, as local
tools would. The principals under test log in on a SASL_PLAINTEXT listener.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Optional

import pytest
import requests
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation, AclPermissionType, AdminClient,
                                   NewTopic, ResourcePatternType, ResourceType)

import kafka_wire as kw
from conftest import WeirDaemon, _pick_free_ports
from support import Outgoing, admin, create_topic, produce_confluent, wait_until, watermarks
from test_security import (ERR_SASL_AUTHENTICATION_FAILED, PASSWORD, Listener, Secured, fast, fast_producer,
                           kcat_args, read_values, rk_sasl, sasl_plain_login, security_yaml, start_sasl_cluster,
                           start_secured)

TIMEOUT = 20.0
SUPER_ANONYMOUS = 'authorizer:\n  enabled: true\n  super_users: ["User:ANONYMOUS"]\n'

ERR_TOPIC_AUTHORIZATION_FAILED = 29
ERR_GROUP_AUTHORIZATION_FAILED = 30
ERR_CLUSTER_AUTHORIZATION_FAILED = 31
ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53


def start_with_authorizer(weir_factory, users=("alice", "bob"), extra_yaml: str = SUPER_ANONYMOUS) -> Secured:
    s = start_secured(weir_factory, [Listener("SASL", "SASL_PLAINTEXT")], extra_yaml=extra_yaml)
    for user in users:
        s.daemon.cli("user", "create", user, "--password", PASSWORD)
    return s


def acl(d: WeirDaemon, *args: str) -> str:
    return d.cli("acl", *args).stdout.decode()


def acl_rows(d: WeirDaemon, *filter_args: str) -> set[tuple[str, ...]]:
    """`weir acl list`: (principal, host, permission, operation, resource, pattern, name)."""
    out = acl(d, "list", *filter_args).splitlines()
    assert out and out[0].split() == ["PRINCIPAL", "HOST", "PERMISSION", "OPERATION", "RESOURCE",
                                      "PATTERN", "NAME"], out
    rows = [tuple(line.split("\t")) for line in out[1:] if line.strip()]
    assert all(len(r) == 7 for r in rows), out
    return set(rows)


def metric(text: str, series: str) -> float:
    """One series' value in a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def sasl(user: str) -> dict[str, str]:
    return rk_sasl("SCRAM-SHA-512", user, PASSWORD)


def kp_sasl_conf(user: str) -> dict:
    return dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                sasl_plain_username=user, sasl_plain_password=PASSWORD)


def delivery_error(addr: str, topic: str, conf: dict[str, str], value: bytes) -> Optional[KafkaError]:
    """Produces one record; the delivery report's error (None: acknowledged)."""
    reports: list[Optional[KafkaError]] = []
    p = Producer({"bootstrap.servers": addr, "acks": "all", "linger.ms": 0, "enable.idempotence": False,
                  "message.timeout.ms": 15000, **fast_producer(conf)})
    p.produce(topic, value=value, partition=0, on_delivery=lambda err, msg: reports.append(err))
    assert p.flush(TIMEOUT) == 0 and len(reports) == 1, f"no delivery report for {topic} within {TIMEOUT}s"
    return reports[0]


def consumer_error(conf: dict, subscribe: Optional[str] = None, assign: Optional[str] = None) -> KafkaError:
    """The first error a confluent-kafka consumer reports (and no record)."""
    c = Consumer({"enable.auto.commit": False, "auto.offset.reset": "earliest", **conf})
    try:
        if subscribe:
            c.subscribe([subscribe])
        else:
            c.assign([TopicPartition(assign, 0, 0)])
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            assert m.error() is not None, f"a record was read: {m.value()!r}"
            return m.error()
        raise AssertionError(f"no error within {TIMEOUT}s")
    finally:
        c.close()


def group_read(addr: str, user: str, topic: str, group: str, want: int) -> list[bytes]:
    """A confluent-kafka group consumer as `user`: reads `want` values and commits them."""
    c = Consumer({"bootstrap.servers": addr, "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", **fast(sasl(user))})
    try:
        c.subscribe([topic])
        values: list[bytes] = []
        deadline = time.monotonic() + TIMEOUT * 2
        while len(values) < want:
            assert time.monotonic() < deadline, f"{user} read {len(values)} of {want} from {topic}"
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                raise AssertionError(f"{user} consuming {topic}: {m.error()}")
            values.append(m.value())
        c.commit(asynchronous=False)
        return values
    finally:
        c.close()


# ---------------------------------------------------------------------------
# what a principal may do
# ---------------------------------------------------------------------------

def test_a_prefixed_reader_is_confined_to_what_it_was_granted(weir_factory, kcat_bin):
    """alice may read topics by the prefix logs- in her own group: she consumes and commits
    there, but cannot produce to them, cannot see other topics in Metadata, cannot read a
    topic she is denied (deny beats allow), cannot join another group and cannot use a
    transactional id; each refusal carries the error code the clients expect, and nothing is
    written."""
    s = start_with_authorizer(weir_factory)
    d, sasl_addr = s.daemon, s.addr("SASL")
    for topic in ("logs-web", "logs-private", "secret"):
        create_topic(d.bootstrap, topic, 1)
        produce_confluent(d.bootstrap, topic, [Outgoing(f"{topic}-{i}".encode(), partition=0) for i in range(3)])
    acl(d, "add", "--principal", "User:alice", "--operation", "Read", "--topic", "logs-", "--prefixed")
    acl(d, "add", "--principal", "User:alice", "--operation", "Read", "--group", "alice-group")
    acl(d, "add", "--principal", "User:alice", "--operation", "Read", "--topic", "logs-private", "--deny")

    # Allowed: a group consumer of logs-web, with its commit.
    assert group_read(sasl_addr, "alice", "logs-web", "alice-group", 3) == [b"logs-web-%d" % i for i in range(3)]
    c = Consumer({"bootstrap.servers": d.bootstrap, "group.id": "alice-group"})
    try:
        [committed] = c.committed([TopicPartition("logs-web", 0)], timeout=TIMEOUT)
    finally:
        c.close()
    assert committed.offset == 3

    # Metadata: the topics alice may describe, and no other (not even internal ones).
    a = AdminClient({"bootstrap.servers": sasl_addr, **sasl("alice")})
    assert set(a.list_topics(timeout=TIMEOUT).topics) == {"logs-web", "logs-private"}
    md = json.loads(subprocess.run([kcat_bin, "-b", sasl_addr, "-L", "-J", *kcat_args(sasl("alice"))],
                                   capture_output=True, timeout=30, check=True).stdout)
    assert {t["topic"] for t in md["topics"]} == {"logs-web", "logs-private"}

    # Produce: refused with TOPIC_AUTHORIZATION_FAILED by every client, nothing written.
    before = watermarks(d.bootstrap, "logs-web", [0])
    err = delivery_error(sasl_addr, "logs-web", sasl("alice"), b"must-not-be-written")
    assert err is not None and err.code() == ERR_TOPIC_AUTHORIZATION_FAILED, err
    from kafka import KafkaProducer
    from kafka.errors import TopicAuthorizationFailedError
    kp = KafkaProducer(bootstrap_servers=sasl_addr, acks="all", retries=0, **kp_sasl_conf("alice"))
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            kp.send("logs-web", b"must-not-be-written").get(timeout=TIMEOUT)
    finally:
        kp.close(timeout=5)
    res = subprocess.run([kcat_bin, "-b", sasl_addr, "-P", "-t", "logs-web", "-p", "0",
                          *kcat_args(sasl("alice"))], input=b"must-not-be-written\n",
                         capture_output=True, timeout=30)
    assert b"authoriz" in res.stderr.lower(), res.stderr
    assert watermarks(d.bootstrap, "logs-web", [0]) == before

    # Reading: a denied topic and a topic no ACL grants are refused; kcat reads what is allowed.
    err = consumer_error({"bootstrap.servers": sasl_addr, "group.id": "alice-group", **fast(sasl("alice"))},
                         assign="logs-private")
    assert err.code() == ERR_TOPIC_AUTHORIZATION_FAILED, err
    out = subprocess.run([kcat_bin, "-b", sasl_addr, "-C", "-t", "logs-web", "-p", "0", "-o", "beginning",
                          "-e", "-q", *kcat_args(sasl("alice"))], capture_output=True, timeout=30, check=True)
    assert out.stdout.split() == [b"logs-web-%d" % i for i in range(3)]
    from kafka import KafkaConsumer
    kc = KafkaConsumer(bootstrap_servers=sasl_addr, **kp_sasl_conf("alice"))
    try:
        assert kc.topics() == {"logs-web", "logs-private"}
    finally:
        kc.close()

    # Another group: GROUP_AUTHORIZATION_FAILED.
    err = consumer_error({"bootstrap.servers": sasl_addr, "group.id": "other-group", **fast(sasl("alice"))},
                         subscribe="logs-web")
    assert err.code() == ERR_GROUP_AUTHORIZATION_FAILED, err

    # A transactional id: TRANSACTIONAL_ID_AUTHORIZATION_FAILED.
    p = Producer({"bootstrap.servers": sasl_addr, "transactional.id": "tx-other", **fast_producer(sasl("alice"))})
    with pytest.raises(KafkaException) as e:
        p.init_transactions(TIMEOUT)
    assert e.value.args[0].code() == ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED, e.value
    for topic in ("logs-web", "logs-private", "secret"):
        assert watermarks(d.bootstrap, topic, [0])[0][1] == 3, topic

    # The logins and the refusals show in the metrics.
    metrics = requests.get(f"{d.http_url}/metrics", timeout=10).text
    assert metric(metrics, 'weir_kafka_authentications_total{listener="SASL",mechanism="SCRAM-SHA-512"}') > 0
    assert metric(metrics, 'weir_kafka_request_errors_total{api="Produce",error="TOPIC_AUTHORIZATION_FAILED"}') >= 2
    assert metric(metrics, 'weir_kafka_request_errors_total{api="JoinGroup",error="GROUP_AUTHORIZATION_FAILED"}') \
        + metric(metrics, 'weir_kafka_request_errors_total{api="FindCoordinator",error="GROUP_AUTHORIZATION_FAILED"}') >= 1
    with kw.connect(sasl_addr) as sock:
        assert sasl_plain_login(sock, "alice", "wrong") == ERR_SASL_AUTHENTICATION_FAILED
    metrics = requests.get(f"{d.http_url}/metrics", timeout=10).text
    assert metric(metrics, 'weir_kafka_authentication_failures_total{listener="SASL"}') == 1


def test_a_transactional_writer_with_its_own_id(weir_factory):
    """bob may write to orders with the transactional id tx-bob: his transaction commits and
    read_committed readers see it; without Write on the id he is refused."""
    s = start_with_authorizer(weir_factory)
    d, sasl_addr = s.daemon, s.addr("SASL")
    create_topic(d.bootstrap, "orders", 1)
    acl(d, "add", "--principal", "User:bob", "--operation", "Write", "--topic", "orders")
    acl(d, "add", "--principal", "User:bob", "--operation", "Write", "--operation", "Describe",
        "--transactional-id", "tx-bob")
    p = Producer({"bootstrap.servers": sasl_addr, "transactional.id": "tx-bob", **fast_producer(sasl("bob"))})
    p.init_transactions(TIMEOUT)
    p.begin_transaction()
    for i in range(5):
        p.produce("orders", value=b"order-%d" % i, partition=0)
    p.commit_transaction(TIMEOUT)
    assert read_values(d.bootstrap, "orders", 1, "read_committed") == [b"order-%d" % i for i in range(5)]

    # The idempotent producer needs Write on some topic, which bob has.
    assert delivery_error(sasl_addr, "orders", {**sasl("bob"), "enable.idempotence": "true"}, b"idem") is None

    acl(d, "remove", "--principal", "User:bob", "--transactional-id", "tx-bob")
    p = Producer({"bootstrap.servers": sasl_addr, "transactional.id": "tx-bob", **fast_producer(sasl("bob"))})
    with pytest.raises(KafkaException) as e:
        p.init_transactions(TIMEOUT)
    assert e.value.args[0].code() == ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED, e.value


def test_creating_topics_needs_create_and_super_users_need_nothing(weir_factory):
    """With the authorizer and a super user from the flags (no ACL for anonymous clients):
    alice can neither create a topic nor have one auto-created until she is granted Create on
    the cluster; the plaintext listener's anonymous principal sees nothing; the super user
    manages ACLs over SASL with Kafka's admin client."""
    kafka_port, http_port, sasl_port = _pick_free_ports(3)
    yaml = security_yaml([Listener("PLAIN", "PLAINTEXT", port=kafka_port),
                          Listener("SASL", "SASL_PLAINTEXT", port=sasl_port)], None)
    d = weir_factory("weir", config_yaml=yaml, start=False)
    d.kafka_port, d.http_port = kafka_port, http_port
    d.start()
    for user in ("alice", "admin"):
        d.cli("user", "create", user, "--password", PASSWORD)
    d.stop()
    d.extra_args += ["--authorizer", "--super-user", "User:admin"]
    d.start()
    sasl_addr = f"127.0.0.1:{sasl_port}"

    res = d.cli("acl", "list", check=False)
    assert res.returncode != 0 and b"ClusterAuthorizationFailed" in res.stderr, res.stderr
    assert set(admin(d.bootstrap).list_topics(timeout=TIMEOUT).topics) == set()

    alice = AdminClient({"bootstrap.servers": sasl_addr, **sasl("alice")})
    futures = alice.create_topics([NewTopic("alices", num_partitions=1, replication_factor=1)])
    with pytest.raises(KafkaException) as e:
        futures["alices"].result(TIMEOUT)
    assert e.value.args[0].code() == ERR_TOPIC_AUTHORIZATION_FAILED
    assert delivery_error(sasl_addr, "auto-made", sasl("alice"), b"x").code() == ERR_TOPIC_AUTHORIZATION_FAILED
    grant_create = AclBinding(ResourceType.BROKER, "kafka-cluster", ResourcePatternType.LITERAL, "User:alice",
                              "*", AclOperation.CREATE, AclPermissionType.ALLOW)
    with pytest.raises(KafkaException) as e:
        alice.create_acls([grant_create])[grant_create].result(TIMEOUT)
    assert e.value.args[0].code() == ERR_CLUSTER_AUTHORIZATION_FAILED

    root = AdminClient({"bootstrap.servers": sasl_addr, **sasl("admin")})
    grants = [grant_create,
              AclBinding(ResourceType.TOPIC, "*", ResourcePatternType.LITERAL, "User:alice", "*",
                         AclOperation.WRITE, AclPermissionType.ALLOW)]
    for f in root.create_acls(grants).values():
        f.result(TIMEOUT)
    alice.create_topics([NewTopic("alices", num_partitions=1, replication_factor=1)])["alices"].result(TIMEOUT)
    assert delivery_error(sasl_addr, "auto-made", sasl("alice"), b"x") is None
    assert set(root.list_topics(timeout=TIMEOUT).topics) >= {"alices", "auto-made"}


def test_everyone_may_use_resources_no_acl_names_when_configured(weir_factory):
    """allow_everyone_if_no_acl_found: a topic without ACLs is open to every principal; once
    an ACL names it, only what the ACLs allow."""
    s = start_with_authorizer(weir_factory, users=("alice",), extra_yaml=SUPER_ANONYMOUS +
                              "  allow_everyone_if_no_acl_found: true\n")
    d, sasl_addr = s.daemon, s.addr("SASL")
    create_topic(d.bootstrap, "open", 1)
    create_topic(d.bootstrap, "named", 1)
    acl(d, "add", "--principal", "User:bob", "--operation", "Write", "--topic", "named")
    assert delivery_error(sasl_addr, "open", sasl("alice"), b"ok") is None
    assert delivery_error(sasl_addr, "named", sasl("alice"), b"no").code() == ERR_TOPIC_AUTHORIZATION_FAILED
    assert watermarks(d.bootstrap, "open", [0])[0][1] == 1
    assert watermarks(d.bootstrap, "named", [0])[0][1] == 0


# ---------------------------------------------------------------------------
# managing ACLs
# ---------------------------------------------------------------------------

def test_acl_cli_round_trip_and_restart(weir_factory):
    """`weir acl add/list/remove`: several operations at once, prefixed and literal patterns,
    filters, deny; the ACLs survive a restart; bad input gets a clear error."""
    s = start_with_authorizer(weir_factory, users=())
    d = s.daemon
    acl(d, "add", "--principal", "User:alice", "--operation", "Read", "--operation", "describe",
        "--topic", "logs-", "--prefixed")
    acl(d, "add", "--principal", "User:bob", "--operation", "WRITE", "--host", "10.1.2.3", "--deny",
        "--topic", "logs-web")
    acl(d, "add", "--principal", "User:bob", "--operation", "All", "--cluster")
    want = {("User:alice", "*", "Allow", "Read", "Topic", "Prefixed", "logs-"),
            ("User:alice", "*", "Allow", "Describe", "Topic", "Prefixed", "logs-"),
            ("User:bob", "10.1.2.3", "Deny", "Write", "Topic", "Literal", "logs-web"),
            ("User:bob", "*", "Allow", "All", "Cluster", "Literal", "kafka-cluster")}
    assert acl_rows(d) == want
    assert acl_rows(d, "--principal", "User:bob") == {r for r in want if r[0] == "User:bob"}
    # "match": every ACL that applies to the topic logs-web.
    assert acl_rows(d, "--topic", "logs-web", "--pattern", "match") == {r for r in want if r[4] == "Topic"}
    assert acl_rows(d, "--topic", "logs-web") == {r for r in want if r[6] == "logs-web"}

    d.restart()
    assert acl_rows(d) == want

    assert "2 ACL(s) removed" in acl(d, "remove", "--principal", "User:alice")
    assert acl_rows(d) == {r for r in want if r[0] == "User:bob"}
    for args, message in [
        (("remove",), b"--all"),
        (("add", "--principal", "User:x", "--operation", "Read"), b"--topic"),
        (("add", "--principal", "User:x", "--operation", "Fly", "--topic", "t"), b"unknown operation 'Fly'"),
        (("add", "--principal", "alice", "--operation", "Read", "--topic", "t"), b"Type:name"),
        (("add", "--principal", "User:x", "--operation", "Read", "--topic", "t", "--host", "nowhere"),
         b"neither an IP address"),
    ]:
        res = d.cli("acl", *args, check=False)
        assert res.returncode != 0 and message in res.stderr, (args, res.stderr)
    assert "2 ACL(s) removed" in acl(d, "remove", "--all")
    assert acl_rows(d) == set()


def test_admin_clients_manage_acls(weir_factory):
    """Kafka's admin APIs (CreateAcls, DescribeAcls, DeleteAcls) through confluent-kafka and
    kafka-python; a node without the authorizer answers SECURITY_DISABLED (which kafka-python
    raises; confluent-kafka's describe_acls shows it as an empty list)."""
    s = start_with_authorizer(weir_factory, users=())
    a = admin(s.daemon.bootstrap)
    bindings = [AclBinding(ResourceType.GROUP, "etl-", ResourcePatternType.PREFIXED, "User:etl", "*",
                           AclOperation.READ, AclPermissionType.ALLOW),
                AclBinding(ResourceType.TRANSACTIONAL_ID, "etl-tx", ResourcePatternType.LITERAL, "User:etl",
                           "127.0.0.1", AclOperation.WRITE, AclPermissionType.ALLOW)]
    for f in a.create_acls(bindings).values():
        f.result(TIMEOUT)
    any_filter = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                                  AclOperation.ANY, AclPermissionType.ANY)
    assert sorted(map(str, a.describe_acls(any_filter).result(TIMEOUT))) == sorted(map(str, bindings))
    match = AclBindingFilter(ResourceType.GROUP, "etl-nightly", ResourcePatternType.MATCH, None, None,
                             AclOperation.ANY, AclPermissionType.ANY)
    assert a.describe_acls(match).result(TIMEOUT) == [bindings[0]]

    from kafka.admin import ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, \
        KafkaAdminClient, ResourcePatternFilter, ResourceType as KpResourceType
    any_acl = ACLFilter(principal=None, host="*", operation=ACLOperation.ANY, permission_type=ACLPermissionType.ANY,
                        resource_pattern=ResourcePatternFilter(KpResourceType.ANY, None, ACLResourcePatternType.ANY))
    kp = KafkaAdminClient(bootstrap_servers=s.daemon.bootstrap, request_timeout_ms=15000)
    try:
        acls, _error = kp.describe_acls(any_acl)
        assert {(x.principal, x.host, x.resource_pattern.resource_name) for x in acls} == \
            {("User:etl", "*", "etl-")}, acls  # the host filter "*" selects the ACLs for any host
    finally:
        kp.close()

    [deleted] = a.delete_acls([match]).values()
    assert deleted.result(TIMEOUT) == [bindings[0]]
    assert a.describe_acls(any_filter).result(TIMEOUT) == [bindings[1]]

    from kafka.errors import SecurityDisabledError
    kp = KafkaAdminClient(bootstrap_servers=weir_factory("plain").bootstrap, request_timeout_ms=15000)
    try:
        with pytest.raises(SecurityDisabledError):
            kp.describe_acls(any_acl)
    finally:
        kp.close()


# ---------------------------------------------------------------------------
# a cluster
# ---------------------------------------------------------------------------

def test_a_cluster_shares_acls(weir_factory):
    """ACLs added through one node hold on every node: they live in the Raft metadata."""
    nodes, sasl_ports = start_sasl_cluster(weir_factory, SUPER_ANONYMOUS)
    nodes[0].cli("user", "create", "alice", "--password", PASSWORD)
    a = admin(nodes[0].bootstrap)
    a.create_topics([NewTopic("shared", num_partitions=3, replication_factor=3)])["shared"].result(30)
    acl(nodes[1], "add", "--principal", "User:alice", "--operation", "Write", "--topic", "shared")
    for port in sasl_ports:
        addr = f"127.0.0.1:{port}"
        wait_until(lambda: delivery_error(addr, "shared", sasl("alice"), b"allowed") is None, 30,
                   message=f"alice to write through {addr}")
    assert acl_rows(nodes[2]) == {("User:alice", "*", "Allow", "Write", "Topic", "Literal", "shared")}
    acl(nodes[2], "remove", "--principal", "User:alice")
    addr = f"127.0.0.1:{sasl_ports[0]}"
    wait_until(lambda: (delivery_error(addr, "shared", sasl("alice"), b"refused") or KafkaError(0)).code()
               == ERR_TOPIC_AUTHORIZATION_FAILED, 30, message="alice's writes to be refused")
