"""Topic administration through the Kafka admin APIs, with confluent-kafka's
AdminClient and kafka-python's KafkaAdminClient."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import (AlterConfigOpType, ConfigEntry, ConfigResource, NewPartitions,
                                   NewTopic, ResourceType)

from support import (Outgoing, admin, create_topic, kafka_error_code, partition_count,
                     produce_confluent, topic_names, wait_for_partitions, wait_until, watermarks)

TIMEOUT = 20

SUPPORTED_CONFIGS = {"retention.ms", "retention.bytes", "segment.bytes", "segment.ms",
                     "max.message.bytes", "cleanup.policy", "flush.messages", "flush.ms"}


def describe_topic_configs(a, topic: str) -> dict:
    res = a.describe_configs([ConfigResource(ResourceType.TOPIC, topic)], request_timeout=TIMEOUT)
    [fut] = res.values()
    return fut.result(TIMEOUT)


def create_error(a, topic: NewTopic) -> int | None:
    """Create one topic that is expected to be rejected; returns the Kafka error code."""
    fut = a.create_topics([topic], request_timeout=TIMEOUT)[topic.topic]
    with pytest.raises(KafkaException) as exc:
        fut.result(TIMEOUT)
    return kafka_error_code(exc.value)


def test_confluent_admin_topic_lifecycle(weir):
    a = admin(weir.bootstrap)
    fs = a.create_topics([
        NewTopic("orders", num_partitions=3, replication_factor=1,
                 config={"retention.ms": "3600000", "cleanup.policy": "delete"}),
        NewTopic("events", num_partitions=1, replication_factor=1),
    ], request_timeout=TIMEOUT)
    for name, fut in fs.items():
        assert fut.result(TIMEOUT) is None, name
    wait_for_partitions(weir.bootstrap, "orders", 3)
    wait_for_partitions(weir.bootstrap, "events", 1)
    assert {"orders", "events"} <= topic_names(weir.bootstrap)

    # describe_topics
    desc = a.describe_topics(TopicCollection(["orders"]), request_timeout=TIMEOUT)["orders"].result(TIMEOUT)
    assert desc.name == "orders"
    assert sorted(p.id for p in desc.partitions) == [0, 1, 2]
    for p in desc.partitions:
        assert p.leader is not None and p.leader.id == 0
        assert [r.id for r in p.replicas] == [0]
        assert [r.id for r in p.isr] == [0]

    # describe_configs: what was set at creation, and every supported key is listed
    cfg = describe_topic_configs(a, "orders")
    assert cfg["retention.ms"].value == "3600000"
    assert cfg["cleanup.policy"].value == "delete"
    missing = SUPPORTED_CONFIGS - set(cfg)
    assert not missing, f"describe_configs does not list {sorted(missing)}"

    # create_partitions: grow 3 -> 5; shrinking is refused and changes nothing
    a.create_partitions([NewPartitions("orders", 5)], request_timeout=TIMEOUT)["orders"].result(TIMEOUT)
    wait_for_partitions(weir.bootstrap, "orders", 5)
    with pytest.raises(KafkaException):
        a.create_partitions([NewPartitions("orders", 2)], request_timeout=TIMEOUT)["orders"].result(TIMEOUT)
    assert partition_count(weir.bootstrap, "orders") == 5

    # incremental_alter_configs: SET two keys; the others are untouched
    res = a.incremental_alter_configs([ConfigResource(ResourceType.TOPIC, "orders", incremental_configs=[
        ConfigEntry("retention.ms", "7200000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("max.message.bytes", "2097152", incremental_operation=AlterConfigOpType.SET),
    ])], request_timeout=TIMEOUT)
    for fut in res.values():
        fut.result(TIMEOUT)
    cfg = describe_topic_configs(a, "orders")
    assert cfg["retention.ms"].value == "7200000"
    assert cfg["max.message.bytes"].value == "2097152"
    assert cfg["cleanup.policy"].value == "delete"

    # ... and DELETE resets a key to its default
    res = a.incremental_alter_configs([ConfigResource(ResourceType.TOPIC, "orders", incremental_configs=[
        ConfigEntry("retention.ms", None, incremental_operation=AlterConfigOpType.DELETE),
    ])], request_timeout=TIMEOUT)
    for fut in res.values():
        fut.result(TIMEOUT)
    cfg = describe_topic_configs(a, "orders")
    assert cfg["retention.ms"].value != "7200000"
    assert cfg["max.message.bytes"].value == "2097152"

    # delete_topics; a re-created topic of the same name starts empty
    produce_confluent(weir.bootstrap, "orders", [Outgoing(value=b"x", partition=p) for p in range(5)])
    a.delete_topics(["orders"], request_timeout=TIMEOUT)["orders"].result(TIMEOUT)
    wait_until(lambda: "orders" not in topic_names(weir.bootstrap), TIMEOUT, message="orders to disappear")
    assert "events" in topic_names(weir.bootstrap)
    create_topic(weir.bootstrap, "orders", 2)
    assert watermarks(weir.bootstrap, "orders", [0, 1]) == {0: (0, 0), 1: (0, 0)}


def test_create_existing_topic_fails_per_topic(weir):
    a = admin(weir.bootstrap)
    create_topic(weir.bootstrap, "dup", 2)
    fs = a.create_topics([NewTopic("dup", num_partitions=1, replication_factor=1),
                          NewTopic("fresh", num_partitions=1, replication_factor=1)],
                         request_timeout=TIMEOUT)
    assert fs["fresh"].result(TIMEOUT) is None
    with pytest.raises(KafkaException) as exc:
        fs["dup"].result(TIMEOUT)
    assert kafka_error_code(exc.value) == KafkaError.TOPIC_ALREADY_EXISTS, exc.value
    # the existing topic is unchanged
    assert partition_count(weir.bootstrap, "dup") == 2


def test_replication_factor_above_cluster_size(weir):
    a = admin(weir.bootstrap)
    code = create_error(a, NewTopic("rf3", num_partitions=1, replication_factor=3))
    assert code == KafkaError.INVALID_REPLICATION_FACTOR
    assert "rf3" not in topic_names(weir.bootstrap)


@pytest.mark.parametrize("name", ["bad name", "a" * 250, "..", "bad/slash", "bad*star", ""],
                         ids=["space", "too-long", "dotdot", "slash", "star", "empty"])
def test_invalid_topic_name_is_rejected(weir, name):
    a = admin(weir.bootstrap)
    before = topic_names(weir.bootstrap)
    code = create_error(a, NewTopic(name, num_partitions=1, replication_factor=1))
    assert code is not None and code != KafkaError.NO_ERROR
    assert topic_names(weir.bootstrap) == before


@pytest.mark.parametrize("partitions,config", [
    (0, {}),
    (1, {"retention.ms": "not-a-number"}),
    (1, {"cleanup.policy": "shred"}),
], ids=["zero-partitions", "non-numeric-retention", "bad-cleanup-policy"])
def test_invalid_topic_settings_are_rejected(weir, partitions, config):
    a = admin(weir.bootstrap)
    code = create_error(a, NewTopic("badsettings", num_partitions=partitions, replication_factor=1,
                                    config=config))
    assert code is not None and code != KafkaError.NO_ERROR
    assert "badsettings" not in topic_names(weir.bootstrap)


def test_confluent_describe_cluster(weir):
    a = admin(weir.bootstrap)
    res = a.describe_cluster(request_timeout=TIMEOUT).result(TIMEOUT)
    assert [n.id for n in res.nodes] == [0]
    assert res.nodes[0].port == weir.kafka_port
    assert res.controller is not None and res.controller.id == 0
    assert res.cluster_id


def test_kafka_python_admin(weir):
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource as KConfigResource
    from kafka.errors import InvalidReplicationFactorError, TopicAlreadyExistsError

    a = KafkaAdminClient(bootstrap_servers=weir.bootstrap, request_timeout_ms=15000)
    try:
        a.create_topics({"kp-topic": {"num_partitions": 2, "replication_factor": 1,
                                      "configs": {"retention.ms": "1234567"}}})
        wait_until(lambda: "kp-topic" in a.list_topics(), TIMEOUT, message="kp-topic in list_topics")

        def partitions():
            [t] = a.describe_topics(["kp-topic"])
            assert t["error_code"] == 0, t
            return sorted(p["partition_index"] for p in t["partitions"])
        assert partitions() == [0, 1]

        def configs():
            return a.describe_configs([KConfigResource("TOPIC", "kp-topic")],
                                      config_filter="all")["topic"]["kp-topic"]
        assert configs()["retention.ms"]["value"] == "1234567"

        a.create_partitions({"kp-topic": 4})
        wait_until(lambda: partitions() == [0, 1, 2, 3], TIMEOUT, message="4 partitions")

        res = a.alter_configs([KConfigResource("TOPIC", "kp-topic", configs={"retention.ms": "7654321"})],
                              raise_on_unknown=False)
        assert res == {"topic": {"kp-topic": "OK"}}, res
        assert configs()["retention.ms"]["value"] == "7654321"

        with pytest.raises(TopicAlreadyExistsError):
            a.create_topics({"kp-topic": {"num_partitions": 1, "replication_factor": 1}})
        with pytest.raises(InvalidReplicationFactorError):
            a.create_topics({"kp-rf3": {"num_partitions": 1, "replication_factor": 3}})
        assert "kp-rf3" not in a.list_topics()

        cluster = a.describe_cluster()
        assert [b["broker_id"] for b in cluster["brokers"]] == [0], cluster
        assert cluster["brokers"][0]["port"] == weir.kafka_port
        assert cluster["controller_id"] == 0

        a.delete_topics(["kp-topic"])
        wait_until(lambda: "kp-topic" not in a.list_topics(), TIMEOUT, message="kp-topic to disappear")
    finally:
        a.close()


def test_replica_assignments_on_a_single_node(weir):
    """A single node takes replica assignments that name only itself (node 0), as the partition
    count; any other node is INVALID_REPLICA_ASSIGNMENT and nothing is created."""
    a = admin(weir.bootstrap)
    a.create_topics([NewTopic("assigned", num_partitions=2, replica_assignment=[[0], [0]])],
                    request_timeout=TIMEOUT)["assigned"].result(TIMEOUT)
    assert partition_count(weir.bootstrap, "assigned") == 2
    assert create_error(a, NewTopic("elsewhere", num_partitions=1, replica_assignment=[[1]])) == \
        KafkaError.INVALID_REPLICA_ASSIGNMENT
    assert "elsewhere" not in topic_names(weir.bootstrap)
    with pytest.raises(KafkaException) as exc:
        a.create_partitions([NewPartitions("assigned", 3, replica_assignment=[[2]])],
                            request_timeout=TIMEOUT)["assigned"].result(TIMEOUT)
    assert kafka_error_code(exc.value) == KafkaError.INVALID_REPLICA_ASSIGNMENT
    a.create_partitions([NewPartitions("assigned", 3, replica_assignment=[[0]])],
                        request_timeout=TIMEOUT)["assigned"].result(TIMEOUT)
    assert partition_count(weir.bootstrap, "assigned") == 3
