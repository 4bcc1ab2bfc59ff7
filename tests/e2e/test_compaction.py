"""Log compaction: topics with cleanup.policy=compact keep the latest record per key.

The cleaner runs every 200 ms here (`log_cleaner_interval_ms`), segments are 4 KiB so that
they roll often, and min.cleanable.dirty.ratio is 0.01 so that any rolled segment is
worth cleaning. The active segment is never compacted: what a reader sees below its base
offset is the cleaned part, what it sees from there on is exactly what was produced.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from support import (Outgoing, Rec, consume_confluent, consume_kafka_python, consume_kcat,
                     consumer_conf, create_topic, kp_consumer, produce_confluent, producer_conf,
                     watermarks)

COMPACTION_YAML = "log_cleaner_interval_ms: 200\n"
WAIT_S = 60.0
SEGMENT_FILE = re.compile(r"^(\d{20})\.log$")


@pytest.fixture
def cweir(weir_factory):
    """A daemon whose log cleaner looks for work every 200 ms."""
    return weir_factory("weir", config_yaml=COMPACTION_YAML)


def compact_config(**overrides) -> dict[str, str]:
    conf = {
        "cleanup.policy": "compact",
        "segment.bytes": "4096",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": "100",
    }
    conf.update(overrides)
    return conf


# small batches: a segment rolls between batches, never inside one
SMALL_BATCHES = {"linger.ms": 5, "batch.size": 1024, "batch.num.messages": 10}


def segment_files(partition_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in partition_dir.iterdir():
        m = SEGMENT_FILE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def active_base(partition_dir: Path) -> int:
    segs = segment_files(partition_dir)
    assert segs, f"no segment files in {partition_dir}: {sorted(p.name for p in partition_dir.iterdir())}"
    return segs[-1][0]


def log_bytes(partition_dir: Path) -> int:
    total = 0
    for _, p in segment_files(partition_dir):
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # replaced by the cleaner meanwhile
            pass
    return total


def read_all(bootstrap: str, topic: str) -> list[Rec]:
    return consume_confluent(bootstrap, topic, [0], timeout=WAIT_S)


def view(recs) -> list[tuple[int, bytes | None, bytes | None]]:
    return [(r.offset, r.key, r.value) for r in sorted(recs, key=lambda r: r.offset)]


def _short(b: bytes | None) -> str:
    return "null" if b is None else repr(b[:24])


def compaction_problems(recs: list[Rec], acked: list[Rec], active: int,
                        tombstones_expire: bool = False) -> list[str]:
    """What is wrong with `recs` (a full read) as a compacted image of `acked`, given that
    the active segment starts at `active`. Empty when the log below `active` holds exactly
    one record per key, the latest one below `active`, at its original offset; and the
    active segment is untouched. A key may have no record below `active` only if it has a
    newer one in the active segment, or, with tombstones_expire, if its latest record is a
    tombstone."""
    produced = {a.offset: a for a in acked}
    problems = []
    prev = -1
    for r in recs:
        if r.offset <= prev:
            problems.append(f"offset {r.offset} read after {prev}")
        prev = r.offset
        a = produced.get(r.offset)
        if a is None or (a.key, a.value) != (r.key, r.value):
            want = "nothing" if a is None else f"key={a.key!r} value={_short(a.value)}"
            problems.append(f"offset {r.offset}: read key={r.key!r} value={_short(r.value)}, produced {want}")
    head_want = [a.offset for a in acked if a.offset >= active]
    head_got = [r.offset for r in recs if r.offset >= active]
    if head_got != head_want:
        problems.append(f"the active segment (from offset {active}) changed: read {len(head_got)} "
                        f"records, {len(head_want)} were produced there")
    latest: dict = {}
    for a in sorted(acked, key=lambda a: a.offset):
        if a.offset < active:
            latest[a.key] = a
    in_head = {a.key for a in acked if a.offset >= active}
    kept: dict = defaultdict(list)
    for r in recs:
        if r.offset < active:
            kept[r.key].append(r.offset)
    for key, offs in kept.items():
        if len(offs) > 1:
            problems.append(f"key {key!r}: {len(offs)} records below offset {active} (e.g. {offs[:4]})")
        elif key in latest and offs[0] != latest[key].offset:
            problems.append(f"key {key!r}: offset {offs[0]} kept, but the latest below {active} "
                            f"is {latest[key].offset}")
    for key, a in latest.items():
        if not kept.get(key) and key not in in_head and not (tombstones_expire and a.value is None):
            problems.append(f"key {key!r}: its latest record (offset {a.offset}, value "
                            f"{_short(a.value)}) is gone")
    return problems


def wait_compacted(weir, topic: str, acked: list[Rec], timeout: float = WAIT_S,
                   tombstones_expire: bool = False, max_bytes: int | None = None
                   ) -> tuple[int, list[Rec]]:
    """Poll until a full read shows the partition compacted (see compaction_problems) and,
    if given, the segment files add up to at most max_bytes. Returns (active base, records)."""
    pdir = weir.data_dir / f"{topic}-0"
    deadline = time.monotonic() + timeout
    while True:
        active = active_base(pdir)
        recs = read_all(weir.bootstrap, topic)
        problems = compaction_problems(recs, acked, active, tombstones_expire)
        size = log_bytes(pdir)
        if max_bytes is not None and size > max_bytes:
            problems.append(f"the segment files hold {size} bytes, expected at most {max_bytes}")
        if not problems:
            return active, recs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{topic}: not compacted after {timeout:.0f}s: produced {len(acked)} records, read "
                f"{len(recs)}, active segment from offset {active}, "
                f"{len(segment_files(pdir))} segment files:\n  " + "\n  ".join(problems[:15]))
        time.sleep(0.5)


def updates(keys: int, versions: int, pad: int = 40) -> list[Outgoing]:
    """`versions` rounds over `keys` keys; values say which key and version they are."""
    return [Outgoing(key=b"key-%02d" % k, value=b"key-%02d:v%03d:" % (k, v) + b"x" * pad, partition=0)
            for v in range(versions) for k in range(keys)]


def fillers(n: int, first: int = 0) -> list[Outgoing]:
    return [Outgoing(key=b"filler-%d" % (i % 5), value=b"filler-%06d:" % i + b"." * 60, partition=0)
            for i in range(first, first + n)]


def first_offset_from(bootstrap: str, topic: str, start: int) -> int:
    got = consume_confluent(bootstrap, topic, [0], start={0: start}, timeout=WAIT_S)
    assert got, f"nothing read from offset {start}"
    return got[0].offset


# ---------------------------------------------------------------------------
# 1. the latest value per key survives, at its offset; the log shrinks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["compact", "compact,delete"])
def test_compaction_keeps_the_latest_value_per_key_at_its_offset(cweir, kcat_bin, policy):
    topic = "compacted"
    create_topic(cweir.bootstrap, topic, 1, config=compact_config(**{"cleanup.policy": policy}))
    acked = produce_confluent(cweir.bootstrap, topic, updates(keys=40, versions=30), **SMALL_BATCHES)
    assert [a.offset for a in acked] == list(range(len(acked)))
    pdir = cweir.data_dir / f"{topic}-0"
    assert len(segment_files(pdir)) >= 10, \
        f"segment.bytes=4096 should have rolled many segments: {[p.name for _, p in segment_files(pdir)]}"
    before = log_bytes(pdir)

    active, recs = wait_compacted(cweir, topic, acked, max_bytes=before // 2)
    after = log_bytes(pdir)
    assert after <= before // 2, f"the partition still holds {after} of {before} bytes"
    assert len(recs) < len(acked)
    latest = {a.key: a.value for a in acked}
    assert {r.key: r.value for r in recs} == latest, "a full read must end with the latest value of every key"
    low, high = watermarks(cweir.bootstrap, topic, [0])[0]
    assert high == len(acked), "compaction must not move the log end"
    assert low <= recs[0].offset

    # Every client reads the same image, gaps and all.
    assert view(consume_kcat(kcat_bin, cweir.bootstrap, topic)) == view(recs), "kcat"
    assert view(consume_kafka_python(cweir.bootstrap, topic, [0], timeout=WAIT_S)) == view(recs), "kafka-python"

    # Fetching from an offset that was compacted away starts at the next surviving record.
    survivors = [r.offset for r in recs]
    removed = sorted(set(range(active)) - set(survivors))
    assert removed
    probes = [removed[0], removed[len(removed) // 2], removed[-1], survivors[len(survivors) // 2]]

    def check_probes(when: str):
        for off in probes:
            want = min(s for s in survivors if s >= off)
            assert first_offset_from(cweir.bootstrap, topic, off) == want, \
                f"{when}: fetching from offset {off} should start at {want}"

    check_probes("after compaction")

    # The compacted segments and their indexes survive a restart.
    cweir.restart()
    assert view(read_all(cweir.bootstrap, topic)) == view(recs)
    check_probes("after a restart")
    more = produce_confluent(cweir.bootstrap, topic, [Outgoing(key=b"key-00", value=b"after", partition=0)])
    assert more[0].offset == len(acked), "the next offset after compaction and a restart"


# ---------------------------------------------------------------------------
# 2. tombstones
# ---------------------------------------------------------------------------

DOOMED = [b"key-%02d" % k for k in range(10)]
LIVE = [b"key-%02d" % k for k in range(10, 20)]


def produce_with_tombstones(weir, topic: str, delete_retention_ms: int) -> list[Rec]:
    """Ten versions of 20 keys, then a tombstone for each of the first ten, then enough
    records of other keys to push the tombstones out of the active segment."""
    create_topic(weir.bootstrap, topic, 1,
                 config=compact_config(**{"delete.retention.ms": str(delete_retention_ms)}))
    recs = updates(keys=20, versions=10)
    recs += [Outgoing(key=k, value=None, partition=0) for k in DOOMED]
    recs += fillers(120)
    acked = produce_confluent(weir.bootstrap, topic, recs, **SMALL_BATCHES)
    tombstone_end = max(a.offset for a in acked if a.value is None)
    assert active_base(weir.data_dir / f"{topic}-0") > tombstone_end, \
        "the filler records should have rolled the segment holding the tombstones"
    return acked


def test_tombstones_are_kept_until_delete_retention_ms(cweir):
    topic = "tombstones-kept"
    acked = produce_with_tombstones(cweir, topic, delete_retention_ms=86_400_000)
    _, recs = wait_compacted(cweir, topic, acked)
    tombstones = {a.key: a.offset for a in acked if a.value is None}
    for key in DOOMED:
        got = [(r.offset, r.value) for r in recs if r.key == key]
        assert got == [(tombstones[key], None)], \
            f"{key!r}: only its tombstone should be left (delete.retention.ms is a day): {got}"
    latest = {a.key: a for a in acked}
    for key in LIVE:
        got = [(r.offset, r.value) for r in recs if r.key == key]
        assert got == [(latest[key].offset, latest[key].value)], f"{key!r}: {got}"


def test_tombstones_disappear_after_delete_retention_ms(cweir):
    topic = "tombstones-dropped"
    acked = produce_with_tombstones(cweir, topic, delete_retention_ms=1000)
    pdir = cweir.data_dir / f"{topic}-0"
    deadline = time.monotonic() + 90
    next_filler = 120
    while True:
        active = active_base(pdir)
        recs = read_all(cweir.bootstrap, topic)
        problems = compaction_problems(recs, acked, active, tombstones_expire=True)
        doomed = [(r.offset, r.key, r.value) for r in recs if r.key in DOOMED]
        if doomed:
            problems.append(f"{len(doomed)} record(s) of deleted keys still readable, e.g. {doomed[:3]}")
        if not problems:
            break
        if time.monotonic() > deadline:
            raise AssertionError("deleted keys did not disappear:\n  " + "\n  ".join(problems[:15]))
        # new dirty data, so that the cleaner has a reason to pass over the log again
        acked += produce_confluent(cweir.bootstrap, topic, fillers(10, next_filler), **SMALL_BATCHES)
        next_filler += 10
        time.sleep(0.5)

    latest = {a.key: a for a in acked}
    for key in LIVE:
        got = [(r.offset, r.value) for r in recs if r.key == key]
        assert got == [(latest[key].offset, latest[key].value)], f"{key!r}: {got}"
    assert not any(r.value is None for r in recs), "no tombstone should be left"


# ---------------------------------------------------------------------------
# 3. readers while the cleaner works
# ---------------------------------------------------------------------------

class PassReader(threading.Thread):
    """Reads the partition from the beginning to its end, over and over, with small fetches.
    Each pass: (high watermark when it started, whether production had finished by then,
    [(offset, key, value)])."""

    def __init__(self, kind: str, bootstrap: str, topic: str, production_done: threading.Event):
        super().__init__(daemon=True)
        self.kind = kind
        self.bootstrap = bootstrap
        self.topic = topic
        self.production_done = production_done
        self.stop_event = threading.Event()
        self.passes: list[tuple[int, bool, list[tuple[int, bytes, bytes]]]] = []
        self.error: str | None = None

    def run(self):
        try:
            while not self.stop_event.is_set():
                done = self.production_done.is_set()  # before the high watermark is taken
                if self.kind == "confluent":
                    result = self._confluent_pass()
                else:
                    result = self._kafka_python_pass()
                if result is not None:
                    high, recs = result
                    self.passes.append((high, done, recs))
                else:
                    time.sleep(0.1)
        except BaseException as e:
            self.error = f"{self.kind} reader: {e!r}"

    def _confluent_pass(self):
        c = Consumer(consumer_conf(self.bootstrap, **{"max.partition.fetch.bytes": 2048,
                                                      "fetch.max.bytes": 4096,
                                                      "message.max.bytes": 2048}))
        try:
            _, high = c.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=10, cached=False)
            if high == 0:
                return None
            c.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            recs: list = []
            deadline = time.monotonic() + WAIT_S
            while not recs or recs[-1][0] < high - 1:
                if time.monotonic() > deadline:
                    raise AssertionError(f"pass did not reach offset {high - 1} (last {recs[-1:]})")
                for m in c.consume(num_messages=200, timeout=0.5):
                    if m.error():
                        if m.error().code() == KafkaError._PARTITION_EOF:
                            continue
                        raise AssertionError(f"consumer error: {m.error()}")
                    recs.append((m.offset(), m.key(), m.value()))
            return high, recs
        finally:
            c.close()

    def _kafka_python_pass(self):
        from kafka import TopicPartition as KTP
        tp = KTP(self.topic, 0)
        c = kp_consumer(self.bootstrap, max_partition_fetch_bytes=2048, fetch_max_bytes=4096)
        try:
            c.assign([tp])
            high = c.end_offsets([tp], timeout_ms=15000)[tp]
            if high == 0:
                return None
            c.seek_to_beginning(tp)
            recs: list = []
            deadline = time.monotonic() + WAIT_S
            while not recs or recs[-1][0] < high - 1:
                if time.monotonic() > deadline:
                    raise AssertionError(f"pass did not reach offset {high - 1} (last {recs[-1:]})")
                for msgs in c.poll(timeout_ms=500).values():
                    recs += [(m.offset, m.key, m.value) for m in msgs]
            return high, recs
        finally:
            c.close()


def test_reads_during_compaction_stay_consistent(cweir):
    topic = "busy"
    keys = 30
    total = 4000
    create_topic(cweir.bootstrap, topic, 1, config=compact_config())
    production_done = threading.Event()
    readers = [PassReader(kind, cweir.bootstrap, topic, production_done)
               for kind in ("confluent", "kafka-python")]
    produced: dict[int, tuple[bytes, bytes]] = {}
    errors: list[str] = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            produced[msg.offset()] = (msg.key(), msg.value())

    rnd = random.Random(99)
    producer = Producer(producer_conf(cweir.bootstrap, **SMALL_BATCHES))
    try:
        for r in readers:
            r.start()
        for i in range(total):
            key = b"key-%02d" % rnd.randrange(keys)
            producer.produce(topic, key=key, value=key + b":%06d:" % i + b"~" * 50, partition=0,
                             on_delivery=on_delivery)
            if i % 40 == 39:
                # pace production (about 10 s), so that many cleaning passes overlap the reads
                producer.flush(30)
                time.sleep(0.1)
        assert producer.flush(30) == 0
        assert not errors, errors[:5]
        assert len(produced) == total
        production_done.set()

        deadline = time.monotonic() + 120
        while any(sum(1 for _, done, _ in r.passes if done) < 3 for r in readers):
            for r in readers:
                assert r.error is None, r.error
                assert r.is_alive(), f"{r.kind} reader stopped"
            assert time.monotonic() < deadline, \
                f"readers made too few passes: {[(r.kind, len(r.passes)) for r in readers]}"
            time.sleep(0.2)
    finally:
        production_done.set()
        for r in readers:
            r.stop_event.set()
        for r in readers:
            r.join(WAIT_S + 30)

    final = {}
    for off in sorted(produced):
        k, v = produced[off]
        final[k] = v
    for r in readers:
        assert r.error is None, r.error
        compacted_during_reads = False
        for i, (high, done, recs) in enumerate(r.passes):
            offs = [o for o, _, _ in recs]
            assert all(a < b for a, b in zip(offs, offs[1:])), \
                f"{r.kind} pass {i}: offsets not strictly increasing (duplicates or going back)"
            wrong = [(o, k, v) for o, k, v in recs if produced.get(o) != (k, v)]
            assert not wrong, f"{r.kind} pass {i}: records that were never produced at their offset: {wrong[:3]}"
            if done:
                assert high == total
                seen = {}
                for _, k, v in recs:
                    seen[k] = v
                assert seen == final, \
                    f"{r.kind} pass {i} (after production): the last value read per key is not the final one"
            # the same range read again later holds fewer records: cleaned in between
            below = sum(1 for o in offs if o < high)
            for _, _, later in r.passes[i + 1:]:
                if sum(1 for o, _, _ in later if o < high) < below:
                    compacted_during_reads = True
                    break
        assert compacted_during_reads, \
            f"{r.kind}: no compaction observed between {len(r.passes)} passes"

    # and, once quiet, the log converges to one record per key below the active segment
    acked = [Rec(0, off, k, v) for off, (k, v) in sorted(produced.items())]
    _, recs = wait_compacted(cweir, topic, acked)
    assert len(recs) < total
