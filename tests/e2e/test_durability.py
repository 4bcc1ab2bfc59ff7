"""Durability: clean restarts, kill -9 in the middle of a produce stream, and a
segment file with a damaged tail."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

import kafka_wire as kw
from support import (Outgoing, Rec, assert_contiguous, assert_same_records, consume_confluent,
                     consumer_conf, create_topic, now_ms, produce_confluent, producer_conf,
                     wait_until, watermarks)


def test_clean_restart_keeps_every_record(weir):
    topic = "restart"
    partitions = 3
    create_topic(weir.bootstrap, topic, partitions, config={"segment.bytes": "65536"})
    ts = now_ms() - 60_000
    records = [Outgoing(value=b"value-%06d-" % i + b"#" * (i % 300), key=b"key-%d" % (i % 17),
                        partition=i % partitions, headers=[("n", str(i).encode())],
                        timestamp=ts + i) for i in range(1500)]
    # Small producer batches: a segment rolls between batches, never inside one, so one big
    # batch would legitimately stay in a single segment.
    acked = produce_confluent(weir.bootstrap, topic, records, **{"linger.ms": 10, "batch.size": 8192})
    segments = sorted(p.name for p in (weir.data_dir / f"{topic}-0").glob("*.log"))
    assert len(segments) >= 2, f"segment.bytes=65536 should have rolled the ~85 KB partition: {segments}"
    before = consume_confluent(weir.bootstrap, topic, range(partitions))
    assert_same_records(before, acked, "before restart")

    weir.restart()  # SIGTERM, asserts exit 0, starts again on the same data dir

    assert watermarks(weir.bootstrap, topic, range(partitions)) == \
        {p: (0, 500) for p in range(partitions)}
    after = consume_confluent(weir.bootstrap, topic, range(partitions))
    assert_same_records(after, acked, "after restart")

    # New records continue where the old ones stopped.
    more = produce_confluent(weir.bootstrap, topic,
                             [Outgoing(value=b"post-%d" % p, partition=p, timestamp=now_ms())
                              for p in range(partitions)])
    assert sorted((a.partition, a.offset) for a in more) == [(p, 500) for p in range(partitions)]

    # A second restart (SIGINT this time) still sees everything.
    weir.stop(sig=signal.SIGINT)
    weir.start()
    final = consume_confluent(weir.bootstrap, topic, range(partitions))
    assert_contiguous(final, {p: 501 for p in range(partitions)})
    assert_same_records(final, acked + more, "after second restart")


class StreamingProducer(threading.Thread):
    """Produces as fast as it can until told to stop, recording every acknowledged record."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, first_index: int):
        super().__init__(daemon=True)
        self.topic = topic
        self.partitions = partitions
        self.next_index = first_index
        # Short timeouts: once the daemon is killed, unacknowledged records fail fast.
        self.producer = Producer(producer_conf(
            bootstrap, acks="all", **{"linger.ms": 2, "message.timeout.ms": 3000,
                                      "request.timeout.ms": 2500, "socket.timeout.ms": 2500,
                                      "reconnect.backoff.max.ms": 500,
                                      "queue.buffering.max.messages": 5000}))
        self.acked: list[Rec] = []
        self.failed = 0
        self.sent = 0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def _on_delivery(self, err, msg):
        with self.lock:
            if err is None:
                self.acked.append(Rec(msg.partition(), msg.offset(), msg.key(), msg.value()))
            else:
                self.failed += 1

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def in_flight(self) -> int:
        with self.lock:
            return self.sent - len(self.acked) - self.failed

    def run(self):
        try:
            while not self.stop_event.is_set():
                i = self.next_index
                value = b"rec-%08d-" % i + b"." * (i % 700)
                try:
                    self.producer.produce(self.topic, value=value, key=b"k%d" % (i % 13),
                                          partition=i % self.partitions, on_delivery=self._on_delivery)
                except BufferError:
                    self.producer.poll(0.05)
                    continue
                with self.lock:
                    self.sent += 1
                self.next_index += 1
                self.producer.poll(0)
            self.producer.flush(30)
        except BaseException as e:  # surfaced by the test
            self.error = e


@pytest.mark.parametrize("flush_config", [{}, {"flush.messages": "1"}],
                         ids=["default-flush", "flush.messages=1"])
def test_kill9_mid_stream_keeps_acknowledged_records(weir, flush_config):
    """Three rounds of: stream acks=all records, kill -9 while records are in flight,
    restart. Every acknowledged record must be readable at its acknowledged offset and
    end offsets never move backwards."""
    topic = "crashy"
    partitions = 2
    create_topic(weir.bootstrap, topic, partitions, config=flush_config)
    all_acked: list[Rec] = []
    marks_seen = {p: 0 for p in range(partitions)}
    next_index = 0

    for round_no in range(3):
        prod = StreamingProducer(weir.bootstrap, topic, partitions, next_index)
        prod.start()
        base = prod.acked_count()
        wait_until(lambda: prod.acked_count() >= base + 300 or prod.error, 60,
                   message=lambda: f"round {round_no}: 300 acknowledged records (have {prod.acked_count()})")
        assert prod.error is None, prod.error
        for p, (_, high) in watermarks(weir.bootstrap, topic, range(partitions)).items():
            marks_seen[p] = max(marks_seen[p], high)
        target = prod.acked_count() + 300
        wait_until(lambda: prod.acked_count() >= target, 60, interval=0.005,
                   message=f"round {round_no}: more acknowledged records")
        # kill while the producer has requests outstanding (best effort)
        wait_until(lambda: prod.in_flight() > 0, 10, interval=0, message="records in flight")
        weir.kill()

        prod.stop_event.set()
        prod.join(60)
        assert not prod.is_alive(), "producer thread did not finish"
        assert prod.error is None, prod.error
        next_index = prod.next_index
        with prod.lock:
            all_acked += prod.acked

        assert len({(a.partition, a.offset) for a in all_acked}) == len(all_acked), \
            "the daemon acknowledged two records at the same offset"
        for p in range(partitions):
            acked_end = 1 + max((a.offset for a in all_acked if a.partition == p), default=-1)
            marks_seen[p] = max(marks_seen[p], acked_end)

        weir.start()  # same data dir; no clean shutdown happened

        marks_after = watermarks(weir.bootstrap, topic, range(partitions))
        for p in range(partitions):
            low, high = marks_after[p]
            assert low == 0
            assert high >= marks_seen[p], \
                (f"round {round_no}, partition {p}: the log ends at {high} after the restart, but offset "
                 f"{marks_seen[p] - 1} had been acknowledged or reported as written before the crash")
            marks_seen[p] = high

        got = consume_confluent(weir.bootstrap, topic, range(partitions), timeout=60)
        assert_contiguous(got)
        by_pos = {(r.partition, r.offset): r for r in got}
        lost = [a for a in all_acked if (a.partition, a.offset) not in by_pos]
        assert not lost, f"round {round_no}: {len(lost)} acknowledged record(s) missing after kill -9, e.g. {lost[:5]}"
        wrong = [(a, by_pos[(a.partition, a.offset)]) for a in all_acked
                 if (by_pos[(a.partition, a.offset)].value, by_pos[(a.partition, a.offset)].key)
                 != (a.value, a.key)]
        assert not wrong, f"round {round_no}: {len(wrong)} acknowledged record(s) changed, e.g. {wrong[:3]}"

    # The log is writable again and continues after the recovered end.
    more = produce_confluent(weir.bootstrap, topic,
                             [Outgoing(value=b"after-crash", partition=p) for p in range(partitions)])
    for a in more:
        assert a.offset == marks_seen[a.partition]


def _segment_files(partition_dir: Path) -> list[Path]:
    def order(path: Path):
        return (int(path.stem) if path.stem.isdigit() else -1, path.stat().st_mtime)
    return sorted(partition_dir.glob("*.log"), key=order)


def _garbage(kind: str, segment: bytes) -> bytes:
    r = random.Random(4242)
    if kind == "random":
        return r.randbytes(97)
    if kind == "zeros":
        return bytes(4096)
    if kind == "torn-batch":
        # the first half of a real batch from the start of this segment: a write cut short
        assert len(segment) >= 61, "segment too small to contain a record batch"
        batch_len = int.from_bytes(segment[8:12], "big", signed=True)
        whole = segment[:12 + batch_len]
        return whole[: max(12, len(whole) // 2)]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "zeros", "torn-batch"])
def test_corrupt_segment_tail_is_recovered(weir, kind):
    topic = "damaged"
    create_topic(weir.bootstrap, topic, 1)
    records = [Outgoing(value=b"payload-%04d" % i, key=b"k%d" % i, partition=0,
                        timestamp=now_ms()) for i in range(60)]
    acked = produce_confluent(weir.bootstrap, topic, records[:30], **{"linger.ms": 20})
    acked += produce_confluent(weir.bootstrap, topic, records[30:], **{"linger.ms": 0})
    weir.stop()

    partition_dir = weir.data_dir / f"{topic}-0"
    assert partition_dir.is_dir(), \
        f"expected {partition_dir}; data dir holds {sorted(p.name for p in weir.data_dir.iterdir())}"
    segments = _segment_files(partition_dir)
    assert segments, f"no *.log segment in {partition_dir}: {sorted(p.name for p in partition_dir.iterdir())}"
    newest = segments[-1]
    original = newest.read_bytes()
    with open(newest, "ab") as f:
        f.write(_garbage(kind, segments[0].read_bytes()))
    assert newest.stat().st_size > len(original)

    weir.start()

    assert watermarks(weir.bootstrap, topic, [0]) == {0: (0, 60)}
    got = consume_confluent(weir.bootstrap, topic, [0])
    assert_contiguous(got, {0: 60})
    assert [(r.key, r.value) for r in got] == [(a.key, a.value) for a in acked]

    more = produce_confluent(weir.bootstrap, topic,
                             [Outgoing(value=b"new-%d" % i, partition=0) for i in range(5)])
    assert [a.offset for a in more] == [60, 61, 62, 63, 64]
    got = consume_confluent(weir.bootstrap, topic, [0])
    assert_contiguous(got, {0: 65})
    assert [r.value for r in got[60:]] == [b"new-%d" % i for i in range(5)]

    # and the recovered log survives another clean restart
    weir.restart()
    got = consume_confluent(weir.bootstrap, topic, [0])
    assert_contiguous(got, {0: 65})


YEAR_MS = 365 * 24 * 3600 * 1000


def test_backdated_records_stay_until_the_retention_check(weir_factory):
    """A backfill with last year's timestamps into a topic that keeps a day: the records stay
    readable until retention next runs (log_retention_check_interval_ms), then go."""
    old = now_ms() - YEAR_MS
    records = [Outgoing(value=f"b{i}".encode(), partition=0, timestamp=old + i) for i in range(50)]

    def backfill(weir, topic):
        create_topic(weir.bootstrap, topic, config={"retention.ms": str(24 * 3600 * 1000)})
        produce_confluent(weir.bootstrap, topic, records)

    # Default settings: the check runs every five minutes, so nothing goes at once.
    weir = weir_factory("default-check")
    backfill(weir, "backfill")
    time.sleep(3)
    got = consume_confluent(weir.bootstrap, "backfill", [0])
    assert [r.value for r in got] == [r.value for r in records]
    assert watermarks(weir.bootstrap, "backfill", [0])[0] == (0, 50)

    # A short check interval: the expired records go at the next check, offsets stay.
    fast = weir_factory("fast-check", config_yaml="log_retention_check_interval_ms: 500\n")
    backfill(fast, "backfill")
    wait_until(lambda: watermarks(fast.bootstrap, "backfill", [0])[0] == (50, 50), 30,
               message="the expired backfill to be deleted")


def test_pipelined_requests_behind_fsync_produces_are_answered_in_order(weir):
    """Requests sent all at once, mixing Produce to a flush.messages=1 topic (answered after
    its fsync), acks=0 Produce (no answer), Produce to a plain topic and ApiVersions: the
    answers come back in request order, and every record is where its answer says."""
    create_topic(weir.bootstrap, "synced", 1, config={"flush.messages": "1"})
    create_topic(weir.bootstrap, "plain", 1)
    sock = kw.connect(weir.bootstrap)
    requests, expected = [], []
    for i in range(60):
        corr = i + 1
        kind = ("synced", "plain", "versions", "synced-acks0")[i % 4]
        if kind == "versions":
            requests.append(kw.api_versions_request(corr))
        else:
            topic = kind.split("-")[0]
            batch = kw.record_batch([(None, b"%s-%d" % (kind.encode(), i))], now_ms())
            acks = 0 if kind.endswith("acks0") else -1
            requests.append(kw.produce_v3(corr, topic, 0, batch, acks=acks))
        if kind != "synced-acks0":  # acks=0: no answer
            expected.append((corr, kind))
    sock.sendall(b"".join(requests))  # all at once: the client does not wait for any answer
    next_offset = {"synced": 0, "plain": 0}
    for corr, kind in expected:
        payload = kw.recv_frame(sock)
        got = int.from_bytes(payload[:4], "big", signed=True)
        assert got == corr, f"answer {got} came where {corr} ({kind}) was due"
        if kind == "versions":
            assert kw.parse_api_versions_v0(payload).error_code == 0
            continue
        _, [result] = kw.parse_produce_v3_response(payload)
        assert result.error_code == 0, result
        # acks=0 records of "synced" sit between the acknowledged ones.
        assert result.base_offset >= next_offset[kind]
        next_offset[kind] = result.base_offset + 1
    sock.close()
    assert watermarks(weir.bootstrap, "synced", [0]) == {0: (0, 30)}
    assert watermarks(weir.bootstrap, "plain", [0]) == {0: (0, 15)}


def _node_on_a_disk_that_fills(weir_factory, tmp_path: Path, name: str):
    """A single node whose writes fail with ENOSPC while the returned control says the disk
    is full (the fault campaign's LD_PRELOAD shim)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
    from nemesis import DiskControl
    disk = DiskControl(tmp_path / "node.disk")
    weir = weir_factory(name, start=False)
    weir.env.update(disk.env(DiskControl.build_shim(tmp_path / "diskfault.so")))
    weir.env["WEIR_LOG"] = "info,weir::kafka::produce=debug"  # each refused batch
    weir.start()
    return disk, weir


def test_a_full_disk_leaves_an_idempotent_producer_in_its_epoch(weir_factory, tmp_path):
    """While the disk is full (every write fails with ENOSPC, through the fault campaign's
    LD_PRELOAD shim) a batch fails with KAFKA_STORAGE_ERROR, and the producer's batches
    already in flight behind it are answered the same way, as Kafka's offline log directory
    answers them, rather than OUT_OF_ORDER_SEQUENCE_NUMBER. That sequence error would make
    librdkafka start a new producer epoch and re-number what it has in flight to every
    partition, re-sending under new sequence numbers batches that may already be written:
    duplicates no broker can recognise. Here the producer keeps its epoch, and every record
    is written once."""
    import logging
    disk, weir = _node_on_a_disk_that_fills(weir_factory, tmp_path, "full")
    create_topic(weir.bootstrap, "spill", 2)

    client_log = tmp_path / "producer.log"
    logger = logging.getLogger("e2e.full-disk-producer")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(logging.FileHandler(client_log))
    producer = Producer(producer_conf(weir.bootstrap, **{
        "enable.idempotence": True, "linger.ms": 0, "message.timeout.ms": 60000,
        "retry.backoff.ms": 50, "debug": "eos", "logger": logger}))
    delivered: list = []
    errors: list = []

    def report(err, msg):
        (errors if err else delivered).append(err or msg.value())

    def send(prefix: str, seconds: float) -> None:
        # Small requests one after another, so several are in flight when a write fails.
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            producer.produce("spill", value=f"{prefix}-{i}".encode(), partition=i % 2,
                             on_delivery=report)
            producer.poll(0.001)
            i += 1

    send("before", 1.0)
    disk.set(full=True)
    send("full", 2.0)
    disk.set()
    send("after", 1.0)
    assert producer.flush(60) == 0, "records still undelivered"
    assert not errors, errors[:3]
    assert "No space left on device" in weir.log_tail(100000), \
        "no write failed while the disk was full"
    lines = client_log.read_text().splitlines()
    bumps = [line for line in lines if "epoch bump" in line]
    assert not bumps, bumps[:3]
    got = [r.value for r in consume_confluent(weir.bootstrap, "spill", [0, 1])]
    assert len(got) == len(set(got)) and sorted(got) == sorted(delivered)


def test_a_full_disk_delays_a_transaction_instead_of_aborting_it(weir_factory, tmp_path):
    """While the disk is full the transaction coordinator cannot record AddOffsetsToTxn. It
    answers as Kafka's coordinator does, NOT_COORDINATOR, which librdkafka retries; the
    transaction then commits once the disk has room. KAFKA_STORAGE_ERROR there made the
    transaction abortable, and when the partitions had not been registered either, the
    abort's EndTxn found no open transaction and the producer died with INVALID_TXN_STATE."""
    from test_exactly_once import READ_COMMITTED, read_all, txn_producer, values
    disk, weir = _node_on_a_disk_that_fills(weir_factory, tmp_path, "full-txn")
    create_topic(weir.bootstrap, "txn-in", 1)
    create_topic(weir.bootstrap, "txn-out", 1)
    producer = txn_producer(weir.bootstrap, "full-disk-copier", **{"transaction.timeout.ms": 60000})
    group = Consumer(consumer_conf(weir.bootstrap, **{"group.id": "full-disk-copier"}))
    producer.begin_transaction()
    for i in range(10):
        producer.produce("txn-out", value=f"copy-{i}".encode(), partition=0)
    assert producer.flush(30) == 0

    disk.set(full=True)
    threading.Timer(2.0, disk.set).start()
    producer.send_offsets_to_transaction([TopicPartition("txn-in", 0, 10)],
                                         group.consumer_group_metadata(), 30)
    producer.commit_transaction(30)
    assert "cannot write __transaction_state" in weir.log_tail(100000), \
        "the coordinator's write did not meet the full disk"

    out = values(read_all(weir.bootstrap, "txn-out", 1, READ_COMMITTED))
    assert out == [f"copy-{i}".encode() for i in range(10)]
    assert group.committed([TopicPartition("txn-in", 0)], timeout=10)[0].offset == 10
    group.close()
