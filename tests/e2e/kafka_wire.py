"""Just enough of the Kafka wire protocol, written by hand, to send malformed
or unusual requests that real clients never produce."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

API_PRODUCE = 0
API_METADATA = 3
API_VERSIONS = 18

ERR_NONE = 0
ERR_CORRUPT_MESSAGE = 2
ERR_UNSUPPORTED_VERSION = 35


# ---------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def varint(n: int) -> bytes:
    """Zig-zag encoded signed varint (record fields)."""
    z = (n << 1) ^ (n >> 63)
    z &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def request_header(api_key: int, api_version: int, correlation_id: int,
                   client_id: str | None = "weir-e2e", flexible: bool = False) -> bytes:
    """Request header v1 (v2 when flexible: plus an empty tagged-field section)."""
    h = struct.pack(">hhi", api_key, api_version, correlation_id) + string(client_id)
    return h + (b"\x00" if flexible else b"")


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


# ---------------------------------------------------------------------------
# record batch v2
# ---------------------------------------------------------------------------

def record_batch(records: list[tuple[bytes | None, bytes | None]], base_timestamp: int,
                 headers: list[tuple[str, bytes]] | None = None,
                 producer: tuple[int, int, int] = (-1, -1, -1)) -> bytes:
    """An uncompressed magic-2 record batch (baseOffset 0); `producer` is
    (producer id, epoch, base sequence), none by default."""
    body = bytearray()
    for i, (key, value) in enumerate(records):
        rec = bytearray(b"\x00")                 # attributes
        rec += varint(0)                         # timestamp delta
        rec += varint(i)                         # offset delta
        rec += varint(-1) if key is None else varint(len(key)) + key
        rec += varint(-1) if value is None else varint(len(value)) + value
        hdrs = headers or []
        rec += varint(len(hdrs))
        for hk, hv in hdrs:
            rec += varint(len(hk.encode())) + hk.encode() + varint(len(hv)) + hv
        body += varint(len(rec)) + rec
    n = len(records)
    pid, epoch, seq = producer
    after_crc = struct.pack(">hiqqqhii", 0, n - 1, base_timestamp, base_timestamp, pid, epoch, seq,
                            n) + bytes(body)
    crc = crc32c(after_crc)
    batch_length = 4 + 1 + 4 + len(after_crc)  # partitionLeaderEpoch + magic + crc + rest
    return struct.pack(">qiibI", 0, batch_length, -1, 2, crc) + after_crc


CRC_OFFSET = 8 + 4 + 4 + 1          # where the CRC field starts in a batch
CRC_COVERED_FROM = CRC_OFFSET + 4   # first byte covered by the CRC (attributes)


def produce_v3(correlation_id: int, topic: str, partition: int, batch: bytes,
               acks: int = -1, timeout_ms: int = 10000) -> bytes:
    body = string(None)  # transactional id
    body += struct.pack(">hi", acks, timeout_ms)
    body += struct.pack(">i", 1) + string(topic)
    body += struct.pack(">i", 1) + struct.pack(">i", partition)
    body += struct.pack(">i", len(batch)) + batch
    return frame(request_header(API_PRODUCE, 3, correlation_id) + body)


@dataclass
class ProducePartitionResult:
    topic: str
    partition: int
    error_code: int
    base_offset: int


def parse_produce_v3_response(payload: bytes) -> tuple[int, list[ProducePartitionResult]]:
    r = Reader(payload)
    corr = r.i32()
    out = []
    for _ in range(r.i32()):
        topic = r.str()
        for _ in range(r.i32()):
            partition, err, base_offset = r.i32(), r.i16(), r.i64()
            r.i64()  # log_append_time_ms
            out.append(ProducePartitionResult(topic, partition, err, base_offset))
    r.i32()  # throttle_time_ms
    assert r.done(), f"{r.remaining()} unexpected trailing bytes in produce response"
    return corr, out


API_INIT_PRODUCER_ID = 22


def init_producer_id(bootstrap: str) -> tuple[int, int]:
    """InitProducerId v0 without a transactional id: (producer id, epoch)."""
    body = string(None) + struct.pack(">i", 60000)
    with connect(bootstrap) as s:
        r = Reader(roundtrip(s, frame(request_header(API_INIT_PRODUCER_ID, 0, 1) + body)))
    r.i32()  # correlation id
    r.i32()  # throttle_time_ms
    err, pid, epoch = r.i16(), r.i64(), r.i16()
    assert err == 0, f"InitProducerId failed with error {err}"
    return pid, epoch


def produce_idempotent(bootstrap: str, topic: str, pid: int, epoch: int, seq: int,
                       values: list[bytes], partition: int = 0) -> tuple[int, int]:
    """One batch with producer id, epoch and base sequence: (error code, base offset)."""
    batch = record_batch([(None, v) for v in values], int(time.time() * 1000),
                         producer=(pid, epoch, seq))
    with connect(bootstrap) as s:
        _, results = parse_produce_v3_response(roundtrip(s, produce_v3(1, topic, partition, batch)))
    return results[0].error_code, results[0].base_offset


API_LIST_OFFSETS = 2


def list_offset_v1(sock: socket.socket, topic: str, partition: int, timestamp: int = -1) -> int:
    """ListOffsets v1 on an open connection: the offset for `timestamp` (-1: the end a
    consumer may read to, the high watermark; -2: the log start)."""
    body = struct.pack(">i", -1)  # replica id: a consumer
    body += struct.pack(">i", 1) + string(topic)
    body += struct.pack(">i", 1) + struct.pack(">iq", partition, timestamp)
    r = Reader(roundtrip(sock, frame(request_header(API_LIST_OFFSETS, 1, 1) + body)))
    r.i32()  # correlation id
    assert r.i32() == 1 and r.str() == topic and r.i32() == 1
    got_partition, err = r.i32(), r.i16()
    r.i64()  # timestamp
    offset = r.i64()
    assert got_partition == partition and err == 0, f"ListOffsets failed with error {err}"
    return offset


# ---------------------------------------------------------------------------
# ApiVersions
# ---------------------------------------------------------------------------

def api_versions_request(correlation_id: int, version: int = 0) -> bytes:
    flexible = version >= 3
    body = b""
    if flexible:
        # client_software_name, client_software_version (compact strings), tagged fields
        body = b"\x09weir-e2e" + b"\x040.1" + b"\x00"
    return frame(request_header(API_VERSIONS, version, correlation_id, flexible=flexible) + body)


@dataclass
class ApiVersionsV0:
    correlation_id: int
    error_code: int
    api_keys: dict[int, tuple[int, int]]


def parse_api_versions_v0(payload: bytes) -> ApiVersionsV0:
    """Strict v0 layout: correlation id, error code, [api_key min max], nothing else."""
    r = Reader(payload)
    corr, err = r.i32(), r.i16()
    n = r.i32()
    assert 0 <= n < 1000, f"implausible api_keys count {n}"
    keys = {}
    for _ in range(n):
        k, lo, hi = r.i16(), r.i16(), r.i16()
        keys[k] = (lo, hi)
    assert r.done(), f"ApiVersions v0 response has {r.remaining()} trailing bytes (not v0 format?)"
    return ApiVersionsV0(corr, err, keys)


# ---------------------------------------------------------------------------
# sockets
# ---------------------------------------------------------------------------

class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "response shorter than its fields"
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def i16(self) -> int:
        return struct.unpack(">h", self._take(2))[0]

    def i32(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def i64(self) -> int:
        return struct.unpack(">q", self._take(8))[0]

    def str(self) -> str:
        n = self.i16()
        return "" if n < 0 else self._take(n).decode()

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def done(self) -> bool:
        return self.pos == len(self.data)


def connect(bootstrap: str, timeout: float = 10.0) -> socket.socket:
    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.settimeout(timeout)
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">i", recv_exact(sock, 4))
    assert 0 <= size < 64 * 1024 * 1024, f"implausible response size {size}"
    return recv_exact(sock, size)


def roundtrip(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    return recv_frame(sock)


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the peer closes. Returns (closed, bytes received meanwhile)."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, bytes(got)
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return False, bytes(got)
        except (ConnectionResetError, BrokenPipeError):
            return True, bytes(got)
        if not chunk:
            return True, bytes(got)
        got += chunk


# ---------------------------------------------------------------------------
# Fetch v7 (the first version with fetch sessions, KIP-227)
# ---------------------------------------------------------------------------

API_FETCH = 1
ERR_FETCH_SESSION_ID_NOT_FOUND = 70
ERR_INVALID_FETCH_SESSION_EPOCH = 71


def fetch_v7(correlation_id: int, session_id: int, session_epoch: int,
             partitions: list[tuple[str, int, int]],
             forgotten: list[tuple[str, int]] = (), max_wait_ms: int = 0) -> bytes:
    """Fetch v7 of `partitions` [(topic, partition, fetch offset)], consecutive partitions of a
    topic grouped, and `forgotten` [(topic, partition)] leaving the session."""
    def grouped(items):
        topics: list[tuple[str, list]] = []
        for topic, *rest in items:
            if not topics or topics[-1][0] != topic:
                topics.append((topic, []))
            topics[-1][1].append(rest)
        return topics

    body = struct.pack(">iiiib", -1, max_wait_ms, 0, 1 << 20, 0)  # replica, wait, min, max, isolation
    body += struct.pack(">ii", session_id, session_epoch)
    topics = grouped(partitions)
    body += struct.pack(">i", len(topics))
    for topic, parts in topics:
        body += string(topic) + struct.pack(">i", len(parts))
        for partition, offset in parts:
            body += struct.pack(">iqqi", partition, offset, -1, 1 << 20)
    gone = grouped(forgotten)
    body += struct.pack(">i", len(gone))
    for topic, parts in gone:
        body += string(topic) + struct.pack(">i", len(parts))
        for (partition,) in parts:
            body += struct.pack(">i", partition)
    return frame(request_header(API_FETCH, 7, correlation_id) + body)


@dataclass
class FetchedPartition:
    topic: str
    partition: int
    error_code: int
    high_watermark: int
    records: bytes


@dataclass
class FetchV7Response:
    error_code: int
    session_id: int
    partitions: list[FetchedPartition]

    def keys(self) -> list[tuple[str, int]]:
        return [(p.topic, p.partition) for p in self.partitions]


def parse_fetch_v7_response(payload: bytes) -> FetchV7Response:
    r = Reader(payload)
    r.i32()  # correlation id
    r.i32()  # throttle_time_ms
    error_code, session_id = r.i16(), r.i32()
    partitions = []
    for _ in range(r.i32()):
        topic = r.str()
        for _ in range(r.i32()):
            partition, err, hw = r.i32(), r.i16(), r.i64()
            r.i64()  # last_stable_offset
            r.i64()  # log_start_offset
            aborted = r.i32()
            for _ in range(max(aborted, 0)):
                r.i64()
                r.i64()
            size = r.i32()
            records = r._take(size) if size > 0 else b""
            partitions.append(FetchedPartition(topic, partition, err, hw, records))
    assert r.done(), f"{r.remaining()} unexpected trailing bytes in fetch response"
    return FetchV7Response(error_code, session_id, partitions)
