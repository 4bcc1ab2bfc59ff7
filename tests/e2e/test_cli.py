"""The `weir` command line: topic management, produce from stdin, consume to stdout."""

from __future__ import annotations

import json

from support import (consume_confluent, partition_count, topic_names, wait_for_partitions,
                     wait_until)


def ndjson(i: int, key: str) -> str:
    # compact, sorted keys: the same bytes whether or not the CLI re-serialises the JSON
    return json.dumps({"id": key, "n": i, "text": f"hello {i} ünïcode"},
                      separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def lines_of(res) -> list[str]:
    return res.stdout.decode("utf-8").splitlines()


def test_topic_create_list_describe_delete(weir):
    weir.cli("topic", "create", "cli-topic", "--partitions", "3",
             "--config", "retention.ms=3600000", "--config", "cleanup.policy=delete")
    wait_for_partitions(weir.bootstrap, "cli-topic", 3)
    weir.cli("topic", "create", "other", "--partitions", "1")

    listed = [line.strip() for line in lines_of(weir.cli("topic", "list"))]
    assert "cli-topic" in listed and "other" in listed, listed
    assert len(listed) == len(set(listed)), f"duplicates in topic list: {listed}"

    desc = weir.cli("topic", "describe", "cli-topic").stdout.decode()
    assert "cli-topic" in desc
    assert "retention.ms" in desc and "3600000" in desc, desc
    assert "partition" in desc.lower(), desc

    # a second create of the same name fails and changes nothing
    res = weir.cli("topic", "create", "cli-topic", "--partitions", "5", check=False)
    assert res.returncode != 0, "creating an existing topic should fail"
    assert res.stderr.strip(), "an error message is expected on stderr"
    assert partition_count(weir.bootstrap, "cli-topic") == 3

    weir.cli("topic", "delete", "cli-topic")
    wait_until(lambda: "cli-topic" not in topic_names(weir.bootstrap), 20,
               message="cli-topic to be deleted")
    listed = [line.strip() for line in lines_of(weir.cli("topic", "list"))]
    assert "cli-topic" not in listed and "other" in listed

    # describing a topic that does not exist is an error (and does not create it)
    res = weir.cli("topic", "describe", "cli-topic", check=False)
    assert res.returncode != 0
    assert "cli-topic" not in topic_names(weir.bootstrap)


def test_produce_with_key_field_and_consume(weir):
    weir.cli("topic", "create", "keyed", "--partitions", "4")
    wait_for_partitions(weir.bootstrap, "keyed", 4)
    keys = [f"user-{k}" for k in range(20)]
    first = [ndjson(i, keys[i % 20]) for i in range(300)]
    second = [ndjson(300 + i, keys[(i * 7) % 20]) for i in range(100)]
    # two separate invocations: the key -> partition mapping must not change between them
    weir.cli("produce", "keyed", "--key-field", "id", input="\n".join(first) + "\n")
    weir.cli("produce", "keyed", "--key-field", "id", input="\n".join(second) + "\n")
    produced = first + second

    out = lines_of(weir.cli("consume", "keyed", "--from-beginning", "--exit-at-end"))
    assert sorted(out) == sorted(produced)
    # order is kept per key (a key's records share one partition)
    for k in keys:
        mine = [line for line in produced if json.loads(line)["id"] == k]
        assert [line for line in out if json.loads(line)["id"] == k] == mine, f"order for key {k}"

    # the same records as seen by a Kafka client: key bytes = the field's value
    recs = consume_confluent(weir.bootstrap, "keyed", range(4))
    assert len(recs) == len(produced)
    partition_of: dict[bytes, int] = {}
    for r in recs:
        doc = json.loads(r.value)
        assert r.key == doc["id"].encode(), (r.key, r.value)
        assert partition_of.setdefault(r.key, r.partition) == r.partition, \
            f"key {r.key!r} found in partitions {partition_of[r.key]} and {r.partition}"
    assert len(set(partition_of.values())) > 1, "20 distinct keys all landed in one partition"

    # --format json
    out = lines_of(weir.cli("consume", "keyed", "--from-beginning", "--exit-at-end", "--format", "json"))
    docs = [json.loads(line) for line in out]
    assert len(docs) == len(produced)
    by_pos = {(r.partition, r.offset): r for r in recs}
    for d in docs:
        assert {"partition", "offset", "key", "value", "timestamp"} <= set(d), d
        r = by_pos[(d["partition"], d["offset"])]
        assert d["value"] == r.value.decode()
        assert d["key"] == r.key.decode()
        assert d["timestamp"] == r.timestamp
    assert len({(d["partition"], d["offset"]) for d in docs}) == len(docs)

    # --partition / --offset: one partition, from the middle
    p = max(range(4), key=lambda q: sum(1 for r in recs if r.partition == q))
    want = [r.value.decode() for r in recs if r.partition == p and r.offset >= 5]
    assert want, "expected records in the busiest partition"
    out = lines_of(weir.cli("consume", "keyed", "--partition", str(p), "--offset", "5", "--exit-at-end"))
    assert out == want

    # --count stops after N records
    out = lines_of(weir.cli("consume", "keyed", "--from-beginning", "--count", "7"))
    assert len(out) == 7 and set(out) <= set(produced)


def test_produce_to_explicit_partition(weir):
    weir.cli("topic", "create", "plain", "--partitions", "3")
    wait_for_partitions(weir.bootstrap, "plain", 3)
    lines = [f"plain line {i} with  spaces\tand a tab" for i in range(50)]
    weir.cli("produce", "plain", "--partition", "1", input="\n".join(lines) + "\n")

    out = lines_of(weir.cli("consume", "plain", "--from-beginning", "--exit-at-end", "--format", "json"))
    docs = [json.loads(line) for line in out]
    assert [(d["partition"], d["offset"], d["value"]) for d in docs] == \
        [(1, i, line) for i, line in enumerate(lines)]
    assert all(d["key"] is None for d in docs), "records produced without --key-field have no key"

    out = lines_of(weir.cli("consume", "plain", "--partition", "1", "--offset", "45", "--exit-at-end"))
    assert out == lines[45:]
    out = lines_of(weir.cli("consume", "plain", "--partition", "0", "--from-beginning", "--exit-at-end"))
    assert out == []


def test_consume_empty_topic_exits_at_end(weir):
    weir.cli("topic", "create", "empty", "--partitions", "2")
    wait_for_partitions(weir.bootstrap, "empty", 2)
    res = weir.cli("consume", "empty", "--from-beginning", "--exit-at-end", timeout=30)
    assert res.stdout == b""


def test_produce_auto_creates_topic_with_default_partitions(weir_factory):
    d = weir_factory("weir", extra_args=("--default-partitions", "3"))
    d.cli("produce", "autocreated", input="a\nb\nc\n")
    assert partition_count(d.bootstrap, "autocreated") == 3
    out = lines_of(d.cli("consume", "autocreated", "--from-beginning", "--exit-at-end"))
    assert sorted(out) == ["a", "b", "c"]


def test_default_partitions_from_config_file(weir_factory):
    d = weir_factory("weir", config_yaml="default_partitions: 2\n")
    d.cli("produce", "fromconfig", input="x\n")
    assert partition_count(d.bootstrap, "fromconfig") == 2


def test_auto_created_topic_has_one_partition_by_default(weir):
    weir.cli("produce", "single", input="only\n")
    assert partition_count(weir.bootstrap, "single") == 1
    assert lines_of(weir.cli("consume", "single", "--from-beginning", "--exit-at-end")) == ["only"]
