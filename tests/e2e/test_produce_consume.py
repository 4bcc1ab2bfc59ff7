"""Produce with real clients (every compression codec), read back with three
different clients and compare byte for byte."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import OFFSET_END, Consumer, KafkaError, Producer, TopicPartition

from support import (Outgoing, Rec, assert_contiguous, assert_same_records, consume_confluent,
                     consume_kafka_python, consume_kcat, consumer_conf, create_topic, now_ms,
                     produce_confluent, producer_conf, rng, run, wait_until, watermarks)

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def make_records(n: int, partitions: int, base_ts: int, seed: int) -> list[Outgoing]:
    """Binary keys and values of varied sizes (some highly compressible), null keys,
    headers with duplicate names / empty / null values, strictly increasing timestamps."""
    r = rng(seed)
    out = []
    for i in range(n):
        size = r.choice([1, 7, 100, 1000, 5000])
        if i % 5 == 0:
            value = (b"weir-compressible-%d " % i) * (2000 // 20)
        else:
            value = r.randbytes(size)
        key = None if i % 7 == 3 else b"k\x00\xff" + str(i).encode()
        headers = []
        if i % 3 == 0:
            headers = [("idx", str(i).encode()), ("dup", b"first"), ("dup", b"second"),
                       ("empty", b"")]
        elif i % 3 == 1:
            headers = [("only", b"v%d" % i), ("nullvalue", None)]
        out.append(Outgoing(value=value, key=key, partition=i % partitions, headers=headers,
                            timestamp=base_ts + 10 * i))
    return out


@pytest.mark.parametrize("codec", CODECS)
def test_confluent_producer_roundtrip_all_clients(weir, kcat_bin, codec):
    topic = f"roundtrip-{codec}"
    partitions = 3
    create_topic(weir.bootstrap, topic, partitions)
    records = make_records(240, partitions, now_ms() - 3_600_000, seed=CODECS.index(codec))

    acked = produce_confluent(weir.bootstrap, topic, records, **{
        "compression.type": codec, "linger.ms": 50, "batch.num.messages": 64})

    # Delivery reports: per partition the offsets handed out are exactly 0..n-1.
    assert_contiguous(sorted(acked, key=lambda a: (a.partition, a.offset)),
                      {p: 240 // partitions for p in range(partitions)})
    for rec, out in zip(acked, records):
        assert rec.partition == out.partition

    assert watermarks(weir.bootstrap, topic, range(partitions)) == \
        {p: (0, 240 // partitions) for p in range(partitions)}

    got = consume_confluent(weir.bootstrap, topic, range(partitions))
    assert_contiguous(got)
    assert_same_records(got, acked, f"confluent-kafka reading {codec}")

    got = consume_kafka_python(weir.bootstrap, topic, range(partitions))
    assert_same_records(got, acked, f"kafka-python reading {codec}")

    got = consume_kcat(kcat_bin, weir.bootstrap, topic)
    assert_same_records(got, acked, f"kcat reading {codec}")


def test_offsets_for_times(weir):
    from kafka import TopicPartition as KTP
    from support import kp_consumer

    topic = "times"
    create_topic(weir.bootstrap, topic, 2)
    t0 = now_ms() - 600_000
    # Partition 0: ten records in one batch (linger), then ten sent one by one so they
    # land in separate batches. Partition 1 stays empty.
    first = [Outgoing(value=b"a%d" % i, partition=0, timestamp=t0 + 100 * i) for i in range(10)]
    second = [Outgoing(value=b"b%d" % i, partition=0, timestamp=t0 + 100 * (10 + i)) for i in range(10)]
    produce_confluent(weir.bootstrap, topic, first, **{"linger.ms": 200})
    for rec in second:
        produce_confluent(weir.bootstrap, topic, [rec], **{"linger.ms": 0})

    c = Consumer(consumer_conf(weir.bootstrap))
    try:
        def lookup(ts, partition=0):
            res = c.offsets_for_times([TopicPartition(topic, partition, ts)], timeout=10)
            assert res[0].error is None, res[0].error
            return res[0].offset

        for i in range(20):
            assert lookup(t0 + 100 * i) == i, f"exact timestamp of record {i}"
            assert lookup(t0 + 100 * i - 50) == i, f"timestamp just before record {i}"
        assert lookup(t0 - 10_000) == 0
        assert lookup(t0 + 100 * 19 + 1) == OFFSET_END  # after the last record: -1
        assert lookup(t0, partition=1) == OFFSET_END    # empty partition
    finally:
        c.close()

    kc = kp_consumer(weir.bootstrap)
    try:
        tp = KTP(topic, 0)
        for i in (0, 3, 9, 10, 15, 19):
            res = kc.offsets_for_times({tp: t0 + 100 * i - 1}, timeout_ms=15000)[tp]
            assert res is not None and res.offset == i, f"kafka-python offsets_for_times record {i}: {res}"
            assert res.timestamp == t0 + 100 * i
        assert kc.offsets_for_times({tp: t0 + 100 * 20}, timeout_ms=15000)[tp] is None
        assert kc.beginning_offsets([tp], timeout_ms=15000)[tp] == 0
        assert kc.end_offsets([tp], timeout_ms=15000)[tp] == 20
    finally:
        kc.close()


@pytest.mark.parametrize("acks", [1, "all"])
@pytest.mark.parametrize("compression", ["gzip", "lz4"])
def test_kafka_python_producer(weir, acks, compression):
    from kafka import KafkaProducer

    topic = f"kp-{acks}-{compression}"
    partitions = 2
    create_topic(weir.bootstrap, topic, partitions)
    records = make_records(120, partitions, now_ms() - 3_600_000, seed=7)
    # KafkaProducer.send() only accepts bytes header values (no null headers)
    for r in records:
        r.headers = [(k, v) for k, v in r.headers if v is not None]

    producer = KafkaProducer(bootstrap_servers=weir.bootstrap, acks=acks,
                             compression_type=compression, enable_idempotence=False,
                             linger_ms=20, request_timeout_ms=15000, max_block_ms=30000)
    try:
        futures = [producer.send(topic, value=r.value, key=r.key, partition=r.partition,
                                 headers=r.headers, timestamp_ms=r.timestamp) for r in records]
        producer.flush(timeout=30)
        acked = []
        for r, f in zip(records, futures):
            md = f.get(timeout=30)
            assert md.partition == r.partition
            acked.append(Rec(md.partition, md.offset, r.key, r.value, tuple(r.headers), r.timestamp))
    finally:
        producer.close(timeout=10)

    assert_contiguous(sorted(acked, key=lambda a: (a.partition, a.offset)),
                      {0: 60, 1: 60})
    got = consume_confluent(weir.bootstrap, topic, range(partitions))
    assert_same_records(got, acked, f"confluent-kafka reading kafka-python {compression} acks={acks}")
    got = consume_kafka_python(weir.bootstrap, topic, range(partitions))
    assert_same_records(got, acked, f"kafka-python reading kafka-python {compression} acks={acks}")


def test_kcat_produce_and_consume_lines(weir, kcat_bin, tmp_path):
    topic = "kcat-lines"  # not created: produce auto-creates it with one partition
    lines = [f"line {i}: héllo wörld \t tab {'x' * (i % 50)}" for i in range(300)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    run([kcat_bin, "-P", "-b", weir.bootstrap, "-t", topic, "-l", str(path)], timeout=60)

    res = run([kcat_bin, "-C", "-b", weir.bootstrap, "-t", topic, "-o", "beginning", "-e", "-q",
               "-f", "%p %o %s\\n"], timeout=60)
    got = res.stdout.decode("utf-8").splitlines()
    assert [g.split(" ", 2)[2] for g in got] == lines
    assert [tuple(map(int, g.split(" ", 2)[:2])) for g in got] == [(0, i) for i in range(len(lines))]

    # Metadata listing, as JSON and as text.
    md = json.loads(run([kcat_bin, "-L", "-J", "-b", weir.bootstrap, "-t", topic]).stdout)
    assert [b["id"] for b in md["brokers"]] == [0]
    [t] = [t for t in md["topics"] if t["topic"] == topic]
    assert len(t["partitions"]) == 1 and t["partitions"][0]["leader"] == 0
    text = run([kcat_bin, "-L", "-b", weir.bootstrap]).stdout.decode()
    assert f'topic "{topic}" with 1 partitions' in text, text


def test_many_small_fetches_resume_exactly(weir):
    """Read a partition with a tiny fetch size so every fetch ends mid-stream; the
    consumer must still see every offset exactly once."""
    topic = "small-fetches"
    create_topic(weir.bootstrap, topic, 1)
    records = [Outgoing(value=b"%05d" % i + b"." * 200, partition=0, timestamp=now_ms())
               for i in range(500)]
    acked = produce_confluent(weir.bootstrap, topic, records, **{"linger.ms": 5,
                                                                 "batch.num.messages": 10})
    got = consume_confluent(weir.bootstrap, topic, [0], **{"fetch.max.bytes": 1024,
                                                          "message.max.bytes": 1000,
                                                          "max.partition.fetch.bytes": 1024})
    assert_contiguous(got, {0: 500})
    assert [r.value for r in got] == [a.value for a in acked]


def test_consume_from_middle_offset(weir):
    topic = "middle"
    create_topic(weir.bootstrap, topic, 1)
    records = [Outgoing(value=b"m%d" % i, partition=0, timestamp=now_ms()) for i in range(100)]
    produce_confluent(weir.bootstrap, topic, records, **{"linger.ms": 50})
    got = consume_confluent(weir.bootstrap, topic, [0], start={0: 37})
    assert [r.offset for r in got] == list(range(37, 100))
    assert [r.value for r in got] == [b"m%d" % i for i in range(37, 100)]


def test_fetch_waits_for_new_data(weir):
    """A consumer at the end of the log sees a record produced afterwards."""
    topic = "tail"
    create_topic(weir.bootstrap, topic, 1)
    c = Consumer(consumer_conf(weir.bootstrap, **{"fetch.wait.max.ms": 500}))
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        assert c.poll(1.0) is None
        produce_confluent(weir.bootstrap, topic, [Outgoing(value=b"late", partition=0)])

        def got_it():
            m = c.poll(0.5)
            if m is not None:
                assert m.error() is None, m.error()
                return m
        m = wait_until(got_it, 30, interval=0, message="the late record")
        assert (m.offset(), m.value()) == (0, b"late")
    finally:
        c.close()


def test_max_message_bytes_is_enforced(weir):
    topic = "small-records"
    create_topic(weir.bootstrap, topic, 1, config={"max.message.bytes": "2048"})
    results = []
    p = Producer(producer_conf(weir.bootstrap, **{"linger.ms": 0, "retries": 0}))
    for value in (b"s" * 500, b"L" * 20_000, b"t" * 600):
        p.produce(topic, value=value, partition=0,
                  on_delivery=lambda err, msg: results.append((err, msg.value())))
        assert p.flush(30) == 0
    [(e1, v1), (e2, v2), (e3, v3)] = results
    assert e1 is None and e3 is None, (e1, e3)
    assert e2 is not None and e2.code() == KafkaError.MSG_SIZE_TOO_LARGE, e2
    got = consume_confluent(weir.bootstrap, topic, [0])
    assert [(r.offset, r.value) for r in got] == [(0, b"s" * 500), (1, b"t" * 600)]
