"""Incremental fetch sessions (KIP-227): a consumer of many partitions sends, and is sent, only
what changed. Checked on the wire (Fetch v7 by hand) and with kafka-python, whose consumer
opens a session whenever the broker offers one."""

from __future__ import annotations

import threading
import time

import pytest
import requests

import kafka_wire as w
from support import Outgoing, create_topic, kp_consumer, produce_confluent

TOPIC = "sessions"


def fetch(sock, session_id: int, epoch: int, partitions=(), forgotten=()) -> w.FetchV7Response:
    return w.parse_fetch_v7_response(
        w.roundtrip(sock, w.fetch_v7(epoch + 10, session_id, epoch, list(partitions), list(forgotten))))


def produce_to(bootstrap: str, partition: int, value: bytes) -> int:
    return produce_confluent(bootstrap, TOPIC, [Outgoing(value=value, partition=partition)])[0].offset


def test_a_session_answers_only_what_changed(weir):
    b = weir.bootstrap
    create_topic(b, TOPIC, 3)
    for p in range(3):
        produce_to(b, p, f"first-{p}".encode())
    with w.connect(b) as s:
        # Epoch 0 opens a session; the answer is a full one.
        opened = fetch(s, 0, 0, [(TOPIC, p, 0) for p in range(3)])
        assert opened.error_code == 0 and opened.session_id > 0
        sid = opened.session_id
        assert opened.keys() == [(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)]
        assert all(b"first-" in p.records for p in opened.partitions)

        # The client moved on to offset 1 everywhere; nothing new: an empty answer.
        moved = fetch(s, sid, 1, [(TOPIC, p, 1) for p in range(3)])
        assert (moved.error_code, moved.session_id, moved.keys()) == (0, sid, [])

        # A record on partition 1: an incremental request naming no partition gets just that.
        produce_to(b, 1, b"second-1")
        news = fetch(s, sid, 2)
        assert news.keys() == [(TOPIC, 1)]
        assert b"second-1" in news.partitions[0].records and news.partitions[0].high_watermark == 2

        # An epoch is used once: replaying it is refused, and so is skipping ahead.
        assert fetch(s, sid, 2).error_code == w.ERR_INVALID_FETCH_SESSION_EPOCH
        assert fetch(s, sid, 9).error_code == w.ERR_INVALID_FETCH_SESSION_EPOCH

        # Partition 0 leaves the session (and partition 1 moves on): records on 0 and 2 bring
        # back only 2.
        assert fetch(s, sid, 3, [(TOPIC, 1, 2)], forgotten=[(TOPIC, 0)]).keys() == []
        produce_to(b, 0, b"second-0")
        produce_to(b, 2, b"second-2")
        after = fetch(s, sid, 4)
        assert after.keys() == [(TOPIC, 2)] and b"second-2" in after.partitions[0].records

        # The final epoch closes the session: a full answer without one, and the id is gone.
        closed = fetch(s, sid, -1, [(TOPIC, 0, 0)])
        assert (closed.error_code, closed.session_id, closed.keys()) == (0, 0, [(TOPIC, 0)])
        assert fetch(s, sid, 5).error_code == w.ERR_FETCH_SESSION_ID_NOT_FOUND

    # A session outlives its connection: a client that reconnects carries on with it.
    with w.connect(b) as s:
        sid = fetch(s, 0, 0, [(TOPIC, 2, 2)]).session_id
    with w.connect(b) as s:
        produce_to(b, 2, b"third-2")
        again = fetch(s, sid, 1)
        assert again.keys() == [(TOPIC, 2)] and b"third-2" in again.partitions[0].records
        assert fetch(s, 123456789, 1).error_code == w.ERR_FETCH_SESSION_ID_NOT_FOUND


@pytest.mark.parametrize("sessions", [True, False], ids=["sessions", "sessions-off"])
def test_kafka_python_reads_sixteen_partitions_while_they_grow(weir_factory, sessions):
    """kafka-python consumes 16 partitions while a producer writes to a few of them at a time:
    every record arrives once, in order, whether the broker offers sessions or not."""
    config = None if sessions else "max_incremental_fetch_session_cache_slots: 0\n"
    weir = weir_factory(config_yaml=config)
    b = weir.bootstrap
    partitions, waves, per_wave = 16, 12, 4
    create_topic(b, TOPIC, partitions)

    def produce():
        for wave in range(waves):
            # A few partitions per wave, so that most of each incremental answer is empty.
            records = [Outgoing(value=f"{wave}-{i}".encode(), partition=(wave * 3 + i % 3) % partitions)
                       for i in range(per_wave)]
            produce_confluent(b, TOPIC, records)
            time.sleep(0.2)

    producer = threading.Thread(target=produce)
    from kafka import TopicPartition as KTP
    tps = [KTP(TOPIC, p) for p in range(partitions)]
    consumer = kp_consumer(b, fetch_max_wait_ms=100)
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        producer.start()
        got: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(partitions)}
        deadline = time.monotonic() + 60
        while sum(map(len, got.values())) < waves * per_wave:
            assert time.monotonic() < deadline, f"read {sum(map(len, got.values()))} records"
            for tp, msgs in consumer.poll(timeout_ms=300).items():
                got[tp.partition] += [(m.offset, m.value) for m in msgs]
        producer.join()
        time.sleep(0.5)
        for tp, msgs in consumer.poll(timeout_ms=500).items():
            got[tp.partition] += [(m.offset, m.value) for m in msgs]
        session_ids = {h.next_metadata.session_id for h in consumer._fetcher._session_handlers.values()}
        kept = sessions_kept(weir)
    finally:
        consumer.close()
    for p, recs in got.items():
        assert [o for o, _ in recs] == list(range(len(recs))), f"partition {p}: {recs}"
    values = sorted(v for recs in got.values() for _, v in recs)
    assert values == sorted(f"{wave}-{i}".encode() for wave in range(waves) for i in range(per_wave))
    if sessions:
        assert session_ids and all(i > 0 for i in session_ids), session_ids
        assert kept >= 1
    else:
        assert session_ids == {0}, session_ids
        assert kept == 0


def sessions_kept(weir) -> int:
    """The weir_fetch_sessions gauge."""
    text = requests.get(f"{weir.http_url}/metrics", timeout=10).text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("weir_fetch_sessions ")))
