"""Idempotent producers and transactions, driven by librdkafka (confluent-kafka), kafka-python
and kcat: retries after lost responses, aborts and commits, consume-transform-produce with
offsets in the transaction, zombie fencing, and kill -9 in the middle of a transaction."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)

from fault_proxy import FaultProxy
from support import (consume_kcat, create_topic, kafka_error_code, wait_for_partitions,
                     wait_until)

READ_COMMITTED = "read_committed"
READ_UNCOMMITTED = "read_uncommitted"

FENCED_CODES = {
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
}


def read_all(bootstrap: str, topic: str, partitions: int, isolation: str,
             timeout: float = 30.0) -> list[tuple[int, int, bytes | None, bytes]]:
    """Every record a consumer with `isolation` sees, up to the end of each partition
    (the last stable offset for read_committed), as (partition, offset, key, value)."""
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "weir-e2e-reader",
        "enable.auto.commit": False,
        "isolation.level": isolation,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        out = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, f"{isolation} reader: no end of {topic} after {timeout}s"
            for m in c.consume(num_messages=1000, timeout=0.5):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                        continue
                    raise AssertionError(f"consumer error: {m.error()}")
                at_end.discard(m.partition())
                out.append((m.partition(), m.offset(), m.key(), m.value()))
        return sorted(out)
    finally:
        c.close()


def values(records) -> list[bytes]:
    return [r[3] for r in records]


def txn_producer(bootstrap: str, transactional_id: str, **extra) -> Producer:
    conf = {
        "bootstrap.servers": bootstrap,
        "transactional.id": transactional_id,
        "transaction.timeout.ms": 30000,
        "linger.ms": 5,
    }
    conf.update(extra)
    p = Producer(conf)
    p.init_transactions(30)
    return p


# ---------------------------------------------------------------------------
# idempotent producer
# ---------------------------------------------------------------------------

def test_idempotent_producer_survives_lost_requests_and_responses(weir_factory):
    """librdkafka's idempotent producer through a proxy that cuts connections before a
    produce request reaches the broker or after it was written: every record lands exactly
    once and each partition keeps the production order."""
    proxy = FaultProxy(seed=7, fault_rate=0.08)
    try:
        weir = weir_factory("weir", config_yaml=f"advertised_port: {proxy.port}\n")
        proxy.upstream_port = weir.kafka_port
        bootstrap = f"127.0.0.1:{proxy.port}"
        topic, partitions, n = "idem", 3, 20000
        proxy.enabled = False
        create_topic(bootstrap, topic, partitions)
        proxy.enabled = True
        p = Producer({
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "batch.num.messages": 100,
            "message.timeout.ms": 120000,
            "reconnect.backoff.ms": 20,
            "reconnect.backoff.max.ms": 200,
        })
        errors: list[str] = []
        sent: dict[int, list[bytes]] = {q: [] for q in range(partitions)}
        for i in range(n):
            q = i % partitions
            v = f"{i:06d}".encode()
            sent[q].append(v)

            def cb(err, msg, i=i):
                if err is not None:
                    errors.append(f"record {i}: {err}")

            while True:
                try:
                    p.produce(topic, value=v, partition=q, on_delivery=cb)
                    break
                except BufferError:
                    p.poll(0.05)
            p.poll(0)
        assert p.flush(180) == 0, "records still undelivered"
        assert not errors, errors[:5]
        proxy.enabled = False
        faults = dict(proxy.faults)
        # The run must really have lost requests and responses, or it proves nothing.
        assert faults.get("response-lost", 0) >= 3 and faults.get("request-lost", 0) >= 3, faults

        got = read_all(bootstrap, topic, partitions, READ_UNCOMMITTED)
        for q in range(partitions):
            mine = [r[3] for r in got if r[0] == q]
            dups = len(mine) - len(set(mine))
            assert dups == 0, f"partition {q}: {dups} duplicate record(s) after {faults}"
            assert mine == sent[q], f"partition {q}: records missing or out of order"
    finally:
        proxy.close()


def test_kafka_python_idempotent_producer(weir):
    """kafka-python 3 enables idempotence by default: it needs InitProducerId and sequence
    numbers to be accepted."""
    from kafka import KafkaProducer
    topic = "kp-idem"
    create_topic(weir.bootstrap, topic, 2)
    p = KafkaProducer(bootstrap_servers=weir.bootstrap, acks="all", enable_idempotence=True,
                      linger_ms=5)
    futures = [p.send(topic, value=f"v{i}".encode(), partition=i % 2) for i in range(2000)]
    p.flush(30)
    offsets = [f.get(timeout=30) for f in futures]
    p.close()
    assert len({(m.partition, m.offset) for m in offsets}) == 2000
    got = read_all(weir.bootstrap, topic, 2, READ_UNCOMMITTED)
    assert sorted(values(got)) == sorted(f"v{i}".encode() for i in range(2000))


def test_out_of_order_sequence_is_refused(weir):
    """A batch whose sequence leaves a gap gets OUT_OF_ORDER_SEQUENCE_NUMBER (45); a batch
    from an older epoch gets INVALID_PRODUCER_EPOCH (47); a retried batch gets its original
    offset and is stored once."""
    from kafka_wire import init_producer_id, produce_idempotent
    topic = "seq"
    create_topic(weir.bootstrap, topic, 1)
    pid, epoch = init_producer_id(weir.bootstrap)
    assert pid >= 0 and epoch == 0
    err, base = produce_idempotent(weir.bootstrap, topic, pid, epoch, seq=0, values=[b"a", b"b"])
    assert (err, base) == (0, 0)
    err, base = produce_idempotent(weir.bootstrap, topic, pid, epoch, seq=0, values=[b"a", b"b"])
    assert (err, base) == (0, 0), "a retried batch must get its original offset"
    err, _ = produce_idempotent(weir.bootstrap, topic, pid, epoch, seq=5, values=[b"c"])
    assert err == 45
    err, base = produce_idempotent(weir.bootstrap, topic, pid, epoch + 1, seq=0, values=[b"c"])
    assert (err, base) == (0, 2)
    err, _ = produce_idempotent(weir.bootstrap, topic, pid, epoch, seq=2, values=[b"d"])
    assert err == 47
    assert values(read_all(weir.bootstrap, topic, 1, READ_UNCOMMITTED)) == [b"a", b"b", b"c"]
    # Producer state is rebuilt from the log after kill -9: the retry is still recognised.
    weir.kill()
    weir.start()
    err, base = produce_idempotent(weir.bootstrap, topic, pid, epoch + 1, seq=0, values=[b"c"])
    assert (err, base) == (0, 2)
    pid2, _ = init_producer_id(weir.bootstrap)
    assert pid2 > pid, "producer ids are never reused after a restart"


# ---------------------------------------------------------------------------
# transactions
# ---------------------------------------------------------------------------

def test_abort_is_invisible_to_read_committed_and_commit_is_visible_once(weir, kcat_bin):
    topic = "txn-basic"
    create_topic(weir.bootstrap, topic, 2)
    p = txn_producer(weir.bootstrap, "basic")
    p.begin_transaction()
    for i in range(10):
        p.produce(topic, value=f"aborted-{i}".encode(), partition=i % 2)
    p.flush(10)
    p.abort_transaction(30)
    p.begin_transaction()
    for i in range(10):
        p.produce(topic, value=f"committed-{i}".encode(), partition=i % 2)
    p.commit_transaction(30)

    committed = values(read_all(weir.bootstrap, topic, 2, READ_COMMITTED))
    assert sorted(committed) == sorted(f"committed-{i}".encode() for i in range(10))
    everything = values(read_all(weir.bootstrap, topic, 2, READ_UNCOMMITTED))
    assert sorted(everything) == sorted(
        [f"aborted-{i}".encode() for i in range(10)] + [f"committed-{i}".encode() for i in range(10)])
    kcat_committed = [r.value for r in consume_kcat(kcat_bin, weir.bootstrap, topic,
                                                    extra_args=("-X", "isolation.level=read_committed"))]
    assert sorted(kcat_committed) == sorted(committed)

    # kafka-python honours the aborted-transaction list too.
    from kafka import KafkaConsumer, TopicPartition as KTP
    c = KafkaConsumer(bootstrap_servers=weir.bootstrap, isolation_level="read_committed",
                      enable_auto_commit=False, consumer_timeout_ms=3000, group_id=None)
    c.assign([KTP(topic, 0), KTP(topic, 1)])
    c.seek_to_beginning()
    kp = [m.value for m in c]
    c.close()
    assert sorted(kp) == sorted(committed)

    listing = weir.cli("txn", "list").stdout.decode()
    assert "basic" in listing and "CompleteCommit" in listing
    described = json.loads(weir.cli("txn", "describe", "basic", "--format", "json").stdout)
    assert described["state"] == "CompleteCommit" and described["producer_id"] >= 0


def test_open_transaction_holds_back_read_committed(weir):
    """While a transaction is open, read_committed consumers stop at its first offset and
    do not see later non-transactional records either; they see them once it commits."""
    topic = "txn-lso"
    create_topic(weir.bootstrap, topic, 1)
    p = txn_producer(weir.bootstrap, "lso")
    p.begin_transaction()
    p.produce(topic, value=b"in-txn", partition=0)
    p.flush(10)
    plain = Producer({"bootstrap.servers": weir.bootstrap, "enable.idempotence": False})
    plain.produce(topic, value=b"plain", partition=0)
    plain.flush(10)
    assert values(read_all(weir.bootstrap, topic, 1, READ_COMMITTED)) == []
    assert values(read_all(weir.bootstrap, topic, 1, READ_UNCOMMITTED)) == [b"in-txn", b"plain"]
    described = json.loads(weir.cli("txn", "describe", "lso", "--format", "json").stdout)
    assert described["state"] == "Ongoing" and described["partitions"] == [f"{topic}-0"]
    p.commit_transaction(30)
    assert values(read_all(weir.bootstrap, topic, 1, READ_COMMITTED)) == [b"in-txn", b"plain"]


def test_consume_transform_produce_moves_offsets_only_with_committed_output(weir):
    src, dst, group, n = "ctp-in", "ctp-out", "ctp-group", 300
    create_topic(weir.bootstrap, src, 1)
    create_topic(weir.bootstrap, dst, 1)
    feeder = Producer({"bootstrap.servers": weir.bootstrap})
    for i in range(n):
        feeder.produce(src, value=f"rec-{i}".encode(), partition=0)
    feeder.flush(10)

    consumer = Consumer({
        "bootstrap.servers": weir.bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "isolation.level": READ_COMMITTED,
        "auto.offset.reset": "earliest",
    })
    consumer.subscribe([src])
    producer = txn_producer(weir.bootstrap, "ctp-app")
    tp = TopicPartition(src, 0)

    def committed_offset() -> int:
        return consumer.committed([tp], timeout=10)[0].offset

    done, rounds, aborted_once = 0, 0, False
    deadline = time.monotonic() + 90
    while done < n:
        assert time.monotonic() < deadline, f"stuck after {done} records"
        msgs = [m for m in consumer.consume(num_messages=40, timeout=1.0) if not m.error()]
        if not msgs:
            continue
        rounds += 1
        before = committed_offset()
        producer.begin_transaction()
        for m in msgs:
            producer.produce(dst, value=m.value().upper(), partition=0)
        producer.send_offsets_to_transaction(consumer.position(consumer.assignment()),
                                             consumer.consumer_group_metadata(), 30)
        if rounds == 3 and not aborted_once:
            # KIP-447: while the transaction holds an offset, a read_committed consumer cannot
            # fetch it (UNSTABLE_OFFSET_COMMIT, retried by the client until its timeout).
            with pytest.raises(KafkaException):
                consumer.committed([tp], timeout=2)
            producer.abort_transaction(30)
            aborted_once = True
            assert committed_offset() == before, "an aborted transaction moved the group's offset"
            # Rewind to the last committed position and redo the work.
            consumer.seek(TopicPartition(src, 0, before if before >= 0 else 0))
            continue
        producer.commit_transaction(30)
        done = msgs[-1].offset() + 1
        assert committed_offset() == done
    consumer.close()

    out = values(read_all(weir.bootstrap, dst, 1, READ_COMMITTED))
    assert out == [f"REC-{i}".encode() for i in range(n)], "each input exactly once, in order"
    # The aborted round's output is in the log but invisible to read_committed.
    assert len(values(read_all(weir.bootstrap, dst, 1, READ_UNCOMMITTED))) > n


def test_second_producer_fences_the_zombie(weir):
    topic = "txn-zombie"
    create_topic(weir.bootstrap, topic, 1)
    zombie = txn_producer(weir.bootstrap, "zombie-app")
    zombie.begin_transaction()
    zombie.produce(topic, value=b"from-zombie", partition=0)
    zombie.flush(10)

    fresh = txn_producer(weir.bootstrap, "zombie-app")
    fresh.begin_transaction()
    fresh.produce(topic, value=b"from-fresh", partition=0)
    fresh.commit_transaction(30)

    with pytest.raises(KafkaException) as failure:
        zombie.produce(topic, value=b"late-zombie", partition=0)
        zombie.commit_transaction(30)
    err = failure.value.args[0]
    assert err.code() in FENCED_CODES or err.fatal(), f"expected a fencing error, got {err}"
    assert values(read_all(weir.bootstrap, topic, 1, READ_COMMITTED)) == [b"from-fresh"]


def test_kill_9_mid_transaction_aborts_it(weir):
    topic = "txn-crash"
    create_topic(weir.bootstrap, topic, 2)
    p = txn_producer(weir.bootstrap, "crash-app")
    p.begin_transaction()
    for i in range(50):
        p.produce(topic, value=f"kept-{i}".encode(), partition=i % 2)
    p.commit_transaction(30)
    p.begin_transaction()
    for i in range(50):
        p.produce(topic, value=f"lost-{i}".encode(), partition=i % 2)
    p.flush(10)
    assert len(read_all(weir.bootstrap, topic, 2, READ_UNCOMMITTED)) == 100

    weir.kill()
    weir.start()
    committed = values(read_all(weir.bootstrap, topic, 2, READ_COMMITTED))
    assert sorted(committed) == sorted(f"kept-{i}".encode() for i in range(50))
    described = json.loads(weir.cli("txn", "describe", "crash-app", "--format", "json").stdout)
    assert described["state"] == "CompleteAbort"
    # A new instance of the application carries on.
    again = txn_producer(weir.bootstrap, "crash-app")
    again.begin_transaction()
    again.produce(topic, value=b"after", partition=0)
    again.commit_transaction(30)
    assert b"after" in values(read_all(weir.bootstrap, topic, 2, READ_COMMITTED))


def test_kill_9_during_a_stream_of_transactions(weir):
    """A producer commits transactions of 20 records in a loop while the daemon is killed
    with -9 twice. read_committed output holds every transaction whose commit returned, and
    every transaction entirely or not at all, with no record twice."""
    topic, size = "txn-stream", 20
    create_topic(weir.bootstrap, topic, 3)
    committed: list[str] = []
    stop = threading.Event()
    failures: list[str] = []

    def run():
        attempt = 0
        producer = None
        while not stop.is_set():
            attempt += 1
            tag = f"t{attempt}"
            try:
                if producer is None:
                    producer = txn_producer(weir.bootstrap, "stream-app",
                                            **{"message.timeout.ms": 20000})
                producer.begin_transaction()
                for j in range(size):
                    producer.produce(topic, value=f"{tag}-{j}".encode(), partition=j % 3)
                producer.commit_transaction(20)
                committed.append(tag)
            except KafkaException as e:
                err = e.args[0]
                if err.txn_requires_abort():
                    try:
                        producer.abort_transaction(20)
                    except KafkaException:
                        producer = None
                else:
                    producer = None
                time.sleep(0.2)
            except Exception as e:  # noqa: BLE001 - reported by the test
                failures.append(repr(e))
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    for _ in range(2):
        wait_until(lambda: len(committed) >= 5, timeout=60, message="transactions to commit")
        committed_before = len(committed)
        time.sleep(random.uniform(0.05, 0.4))
        weir.kill()
        time.sleep(0.5)
        weir.start()
        wait_until(lambda: len(committed) > committed_before, timeout=90,
                   message="the producer to commit again after the restart")
    stop.set()
    t.join(60)
    assert not failures, failures

    got = values(read_all(weir.bootstrap, topic, 3, READ_COMMITTED))
    assert len(got) == len(set(got)), "a record appears twice"
    by_txn: dict[str, int] = {}
    for v in got:
        tag = v.decode().split("-")[0]
        by_txn[tag] = by_txn.get(tag, 0) + 1
    partial = {k: c for k, c in by_txn.items() if c != size}
    assert not partial, f"partial transactions visible: {partial}"
    missing = [tag for tag in committed if tag not in by_txn]
    assert not missing, f"committed transactions missing: {missing}"


def test_transaction_timeout_aborts_a_stuck_transaction(weir):
    topic = "txn-timeout"
    create_topic(weir.bootstrap, topic, 1)
    p = txn_producer(weir.bootstrap, "slow-app", **{"transaction.timeout.ms": 2000})
    p.begin_transaction()
    p.produce(topic, value=b"never", partition=0)
    p.flush(10)
    wait_until(lambda: json.loads(weir.cli("txn", "describe", "slow-app", "--format", "json").stdout)
               ["state"] == "CompleteAbort", timeout=20, message="the coordinator to abort it")
    assert values(read_all(weir.bootstrap, topic, 1, READ_COMMITTED)) == []
    with pytest.raises(KafkaException):
        p.commit_transaction(10)
