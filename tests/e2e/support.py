"""Client-side helpers shared by the e2e tests: topic admin, producing and
reading back with confluent-kafka, kafka-python and kcat, polling with deadlines.

Consumers never join a group (weir has no group coordinator yet): they assign
partitions by hand and read from an explicit offset.
"""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

DEFAULT_TIMEOUT_S = 30.0

Header = tuple[str, Optional[bytes]]


@dataclass(frozen=True)
class Rec:
    """A record as read back by any client, normalised for comparison."""
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    headers: tuple[Header, ...] = ()
    timestamp: Optional[int] = None

    def content(self):
        return (self.key, self.value, self.headers, self.timestamp)


@dataclass
class Outgoing:
    """A record to produce."""
    value: Optional[bytes]
    key: Optional[bytes] = None
    partition: Optional[int] = None
    headers: list[Header] = field(default_factory=list)
    timestamp: Optional[int] = None


def wait_until(predicate: Callable[[], object], timeout: float = DEFAULT_TIMEOUT_S,
               interval: float = 0.1, message: str | Callable[[], str] = "condition") -> object:
    """Poll predicate() until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # keep polling; report the last error on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            msg = message() if callable(message) else message
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {msg}{extra}")
        time.sleep(interval)


def now_ms() -> int:
    return int(time.time() * 1000)


def rng(seed: int) -> random.Random:
    return random.Random(seed)


# ---------------------------------------------------------------------------
# admin (confluent-kafka)
# ---------------------------------------------------------------------------

def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10000})


# Metadata for *all* topics is requested on purpose: asking for one topic by name may
# auto-create it, which would hide bugs.

def partition_count(bootstrap: str, topic: str, timeout: float = 10.0) -> int:
    md = admin(bootstrap).list_topics(timeout=timeout)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return 0
    return len(t.partitions)


def topic_names(bootstrap: str, timeout: float = 10.0) -> set[str]:
    return set(admin(bootstrap).list_topics(timeout=timeout).topics)


def create_topic(bootstrap: str, name: str, partitions: int = 1,
                 config: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Create a topic and wait until its metadata shows every partition with a leader."""
    a = admin(bootstrap)  # keep the client alive until the future resolves
    fs = a.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        request_timeout=timeout)
    fs[name].result(timeout=timeout)
    wait_for_partitions(bootstrap, name, partitions, timeout)


def wait_for_partitions(bootstrap: str, topic: str, partitions: int,
                        timeout: float = DEFAULT_TIMEOUT_S) -> None:
    a = admin(bootstrap)

    def ready():
        md = a.list_topics(timeout=5)
        t = md.topics.get(topic)
        return (t is not None and t.error is None and len(t.partitions) == partitions
                and all(p.leader == 0 for p in t.partitions.values()))

    wait_until(ready, timeout, message=f"topic {topic} to have {partitions} partition(s) led by node 0")


# ---------------------------------------------------------------------------
# confluent-kafka producer / consumer
# ---------------------------------------------------------------------------

def producer_conf(bootstrap: str, **extra) -> dict:
    conf = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 20,
        "message.timeout.ms": 30000,
        "enable.idempotence": False,
    }
    conf.update(extra)
    return conf


def produce_confluent(bootstrap: str, topic: str, records: Iterable[Outgoing],
                      timeout: float = DEFAULT_TIMEOUT_S, **conf) -> list[Rec]:
    """Produce and wait for every delivery report; returns what the broker acknowledged
    (partition/offset), in the same order as `records`. Fails on any delivery error."""
    records = list(records)
    p = Producer(producer_conf(bootstrap, **conf))
    acked: list[Optional[Rec]] = [None] * len(records)
    errors: list[str] = []

    def report(i, r):
        def cb(err, msg):
            if err is not None:
                errors.append(f"record #{i}: {err}")
            else:
                acked[i] = Rec(msg.partition(), msg.offset(), r.key, r.value,
                               tuple(r.headers), r.timestamp)
        return cb

    for i, r in enumerate(records):
        kwargs = {"value": r.value, "key": r.key, "on_delivery": report(i, r)}
        if r.partition is not None:
            kwargs["partition"] = r.partition
        if r.headers:
            kwargs["headers"] = list(r.headers)
        if r.timestamp is not None:
            kwargs["timestamp"] = r.timestamp
        while True:
            try:
                p.produce(topic, **kwargs)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    remaining = p.flush(timeout)
    assert remaining == 0, f"{remaining} record(s) still undelivered after {timeout}s"
    assert not errors, "delivery failed: " + "; ".join(errors[:10])
    assert all(a is not None for a in acked), "missing delivery reports"
    return acked  # type: ignore[return-value]


def consumer_conf(bootstrap: str, **extra) -> dict:
    # librdkafka insists on a group.id, but with assign() and no commits it is never used
    # for group membership.
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": "weir-e2e-unused",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "error",
        "socket.timeout.ms": 10000,
    }
    conf.update(extra)
    return conf


def committed_offsets(bootstrap: str, group: str, topic: str, partitions) -> dict[int, int]:
    """OffsetFetch from outside the group (a consumer that never joins); -1001 = none."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "socket.timeout.ms": 10000})
    try:
        res = c.committed([TopicPartition(topic, p) for p in partitions], timeout=15)
        for tp in res:
            assert tp.error is None, f"committed(): {tp.error}"
        return {tp.partition: tp.offset for tp in res}
    finally:
        c.close()


def watermarks(bootstrap: str, topic: str, partitions: Iterable[int],
               timeout: float = 10.0) -> dict[int, tuple[int, int]]:
    c = Consumer(consumer_conf(bootstrap))
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
                for p in partitions}
    finally:
        c.close()


def _norm_headers(headers) -> tuple[Header, ...]:
    if not headers:
        return ()
    return tuple((k if isinstance(k, str) else k.decode(), v) for k, v in headers)


def _high_watermark(c: Consumer, topic: str, partition: int) -> int:
    """The partition's high watermark from its leader. On a cluster, leadership may move
    between the client's metadata and its ListOffsets (a preferred leader coming back): the
    client retries, as a consumer does, rather than failing on the first NOT_LEADER."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10,
                                           cached=False)[1]
        except KafkaException as e:
            retriable = e.args[0].code() in (KafkaError.NOT_LEADER_FOR_PARTITION,
                                             KafkaError.LEADER_NOT_AVAILABLE)
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def consume_confluent(bootstrap: str, topic: str, partitions: Iterable[int],
                      start: dict[int, int] | None = None,
                      timeout: float = DEFAULT_TIMEOUT_S, **conf) -> list[Rec]:
    """Read every partition from `start` (default: beginning) up to its high watermark
    as of the call. Returns records in per-partition offset order."""
    partitions = list(partitions)
    c = Consumer(consumer_conf(bootstrap, **conf))
    try:
        ends = {p: _high_watermark(c, topic, p) for p in partitions}
        start = start or {}
        c.assign([TopicPartition(topic, p, start.get(p, OFFSET_BEGINNING)) for p in partitions])
        out: list[Rec] = []
        next_off = {p: start.get(p, 0) for p in partitions}
        deadline = time.monotonic() + timeout
        while any(next_off[p] < ends[p] for p in partitions):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"confluent consumer: timed out after {timeout}s; reached {next_off}, want {ends}")
            for msg in c.consume(num_messages=500, timeout=0.5):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(f"confluent consumer error: {msg.error()}")
                ts_type, ts = msg.timestamp()
                out.append(Rec(msg.partition(), msg.offset(), msg.key(), msg.value(),
                               _norm_headers(msg.headers()), ts))
                next_off[msg.partition()] = msg.offset() + 1
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()


# ---------------------------------------------------------------------------
# kafka-python
# ---------------------------------------------------------------------------

def kp_consumer(bootstrap: str, **extra):
    from kafka import KafkaConsumer
    conf = dict(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", request_timeout_ms=15000,
                consumer_timeout_ms=1000)
    conf.update(extra)
    return KafkaConsumer(**conf)


def consume_kafka_python(bootstrap: str, topic: str, partitions: Iterable[int],
                         timeout: float = DEFAULT_TIMEOUT_S) -> list[Rec]:
    from kafka import TopicPartition as KTP
    tps = [KTP(topic, p) for p in partitions]
    c = kp_consumer(bootstrap)
    try:
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps, timeout_ms=15000)
        out: list[Rec] = []
        next_off = {tp: 0 for tp in tps}
        deadline = time.monotonic() + timeout
        while any(next_off[tp] < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"kafka-python consumer: timed out after {timeout}s; reached {next_off}, want {ends}")
            for tp, msgs in c.poll(timeout_ms=500).items():
                for m in msgs:
                    out.append(Rec(m.partition, m.offset, m.key, m.value,
                                   _norm_headers(m.headers), m.timestamp))
                    next_off[tp] = m.offset + 1
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()


# ---------------------------------------------------------------------------
# kcat
# ---------------------------------------------------------------------------

# One record: a text line "partition offset timestamp keylen valuelen headers",
# then the raw key and value bytes (lengths from the line), then a newline.
_KCAT_FMT = "%p\\t%o\\t%T\\t%K\\t%S\\t%h\\n%k%s\\n"


def consume_kcat(kcat: str, bootstrap: str, topic: str, timeout: float = DEFAULT_TIMEOUT_S,
                 extra_args: tuple[str, ...] = ()) -> list[Rec]:
    """`kcat -C -e -o beginning` over all partitions, parsed binary-safely.
    Header values must not contain ',' '=' or a newline (kcat prints them raw)."""
    cmd = [kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q",
           "-f", _KCAT_FMT, *extra_args]
    res = run(cmd, timeout=timeout)
    data = res.stdout
    out: list[Rec] = []
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        fields = data[pos:nl].decode().split("\t")
        assert len(fields) == 6, f"unexpected kcat line {data[pos:nl]!r}"
        p, o, ts, klen, vlen = (int(x) for x in fields[:5])
        pos = nl + 1
        key = None if klen < 0 else data[pos:pos + klen]
        pos += max(klen, 0)
        value = None if vlen < 0 else data[pos:pos + vlen]
        pos += max(vlen, 0)
        assert data[pos:pos + 1] == b"\n", f"kcat output out of sync at byte {pos}"
        pos += 1
        headers: list[Header] = []
        if fields[5]:
            for item in fields[5].split(","):
                name, _, val = item.partition("=")
                headers.append((name, None if val == "NULL" else val.encode()))
        out.append(Rec(p, o, key, value, tuple(headers), ts))
    return sorted(out, key=lambda r: (r.partition, r.offset))


def run(cmd: list[str], input: bytes | None = None, timeout: float = DEFAULT_TIMEOUT_S,
        check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s; "
                             f"stderr: {(e.stderr or b'')[-2000:]!r}") from None
    if check and res.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited with {res.returncode}; "
                             f"stderr: {res.stderr[-2000:].decode(errors='replace')}")
    return res


# ---------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------

def assert_contiguous(recs: list[Rec], expected_counts: dict[int, int] | None = None) -> None:
    """Offsets in every partition are 0, 1, 2, ... with no gap or duplicate."""
    by_p: dict[int, list[int]] = {}
    for r in recs:
        by_p.setdefault(r.partition, []).append(r.offset)
    for p, offs in by_p.items():
        assert offs == list(range(len(offs))), \
            f"partition {p}: offsets are not contiguous from 0: {_summarise(offs)}"
    if expected_counts is not None:
        got = {p: len(by_p.get(p, [])) for p in expected_counts}
        assert got == expected_counts, f"records per partition: got {got}, want {expected_counts}"


def _summarise(offs: list[int]) -> str:
    if len(offs) <= 20:
        return str(offs)
    return f"{offs[:10]} ... {offs[-10:]} ({len(offs)} offsets)"


def assert_same_records(got: list[Rec], want: list[Rec], who: str) -> None:
    """Same (partition, offset) set, and equal key/value/headers/timestamp at each."""
    g = {(r.partition, r.offset): r for r in got}
    w = {(r.partition, r.offset): r for r in want}
    missing = sorted(set(w) - set(g))
    extra = sorted(set(g) - set(w))
    assert not missing and not extra, \
        f"{who}: missing (partition, offset) {missing[:10]}, unexpected {extra[:10]}"
    for k in sorted(w):
        if g[k].content() != w[k].content():
            raise AssertionError(f"{who}: record at partition {k[0]} offset {k[1]} differs:\n"
                                 f"  got  {_short(g[k])}\n  want {_short(w[k])}")


def _short(r: Rec) -> str:
    def b(x):
        if x is None:
            return "None"
        return repr(x[:40]) + (f"...({len(x)} bytes)" if len(x) > 40 else "")
    return f"key={b(r.key)} value={b(r.value)} headers={r.headers!r} ts={r.timestamp}"


def kafka_error_code(exc: BaseException) -> int | None:
    """The Kafka error code carried by a confluent-kafka exception, if any."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0].code()
    return None
