"""Malformed and hostile input on the Kafka port, sent over raw sockets. After
each, the daemon must still serve ordinary clients (and shut down cleanly at
teardown)."""

from __future__ import annotations

import random
import socket
import struct

import pytest

import kafka_wire as w
from support import (Outgoing, consume_confluent, create_topic, now_ms, produce_confluent,
                     watermarks)

# A peer that sends an impossible frame must be disconnected within this time.
CLOSE_TIMEOUT_S = 10.0


def assert_still_serving(weir, tag: str) -> None:
    assert weir.running(), f"daemon died ({tag}); exit code {weir.proc.returncode}"
    # raw ApiVersions v0 on a fresh connection
    with w.connect(weir.bootstrap) as s:
        resp = w.parse_api_versions_v0(w.roundtrip(s, w.api_versions_request(4242, 0)))
        assert (resp.correlation_id, resp.error_code) == (4242, w.ERR_NONE)
        assert w.API_PRODUCE in resp.api_keys and w.API_VERSIONS in resp.api_keys
    # a real client round trip
    acked = produce_confluent(weir.bootstrap, "canary", [Outgoing(value=tag.encode(), partition=0)])
    got = consume_confluent(weir.bootstrap, "canary", [0])
    assert got[-1].offset == acked[0].offset and got[-1].value == tag.encode()


@pytest.fixture
def served(weir):
    create_topic(weir.bootstrap, "canary", 1)
    assert_still_serving(weir, "before")
    return weir


def test_wire_helpers_selfcheck():
    """The hand-written encoder is right (standard CRC-32C check value, and a batch
    whose CRC covers exactly the bytes it should)."""
    assert w.crc32c(b"123456789") == 0xE3069283
    batch = w.record_batch([(b"k", b"v")], 1_700_000_000_000)
    (crc,) = struct.unpack(">I", batch[w.CRC_OFFSET:w.CRC_OFFSET + 4])
    assert crc == w.crc32c(batch[w.CRC_COVERED_FROM:])
    (length,) = struct.unpack(">i", batch[8:12])
    assert length == len(batch) - 12


@pytest.mark.parametrize("payload", [
    b"\x00\x00\x00\x10" + bytes(range(16)),              # a complete frame holding nonsense
    random.Random(99).randbytes(4096),                    # noise
    b"\x00\x00\x00\x00",                                  # empty frame
    b"\x00\x00\x00\x06\x00\x12\x00\x00\x00\x01",          # header cut off after correlation id
], ids=["nonsense-frame", "noise", "empty-frame", "short-header"])
def test_garbage_bytes(served, payload):
    with w.connect(served.bootstrap) as s:
        s.sendall(payload)
        w.wait_closed(s, 2.0)  # the daemon may answer, close, or wait for more; all fine
    assert_still_serving(served, "after garbage")


@pytest.mark.parametrize("size", [-1, -2147483648, 0x7FFFFFFF, 0x4000_0000],
                         ids=["minus-one", "int-min", "int-max", "one-gib"])
def test_impossible_frame_length_closes_connection(served, size):
    with w.connect(served.bootstrap) as s:
        s.sendall(struct.pack(">i", size) + b"\x00\x12\x00\x00\x00\x00\x00\x01")
        closed, _ = w.wait_closed(s, CLOSE_TIMEOUT_S)
        assert closed, f"frame length {size}: the connection was not closed within {CLOSE_TIMEOUT_S}s"
    assert_still_serving(served, f"after frame length {size}")


def test_http_request_on_kafka_port(served):
    # "GET " read as a frame length is ~1.2 GB
    with w.connect(served.bootstrap) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        closed, _ = w.wait_closed(s, CLOSE_TIMEOUT_S)
        assert closed, "an HTTP request on the Kafka port should get the connection closed"
    assert_still_serving(served, "after HTTP request")


def test_truncated_frame(served):
    request = w.api_versions_request(1, 0)
    # announce more than we send, keep the connection open: other clients are unaffected
    stalled = w.connect(served.bootstrap)
    try:
        stalled.sendall(struct.pack(">i", 100) + request[4:])
        assert_still_serving(served, "while a truncated frame is pending")
        stalled.shutdown(socket.SHUT_WR)
        closed, data = w.wait_closed(stalled, CLOSE_TIMEOUT_S)
        assert closed, "after EOF in the middle of a frame the daemon should close the connection"
    finally:
        stalled.close()
    # half a frame then an abrupt close
    with w.connect(served.bootstrap) as s:
        s.sendall(request[: len(request) // 2])
    assert_still_serving(served, "after truncated frame")


def test_unknown_api_key(served):
    with w.connect(served.bootstrap) as s:
        s.sendall(w.frame(w.request_header(9999, 0, 77)))
        closed, data = w.wait_closed(s, CLOSE_TIMEOUT_S)
        # Either an error response for correlation id 77 or a closed connection is
        # acceptable; silently ignoring the request (client hangs) is not.
        if data:
            assert len(data) >= 8, f"short response {data!r}"
            (corr,) = struct.unpack(">i", data[4:8])
            assert corr == 77, f"response carries correlation id {corr}"
        else:
            assert closed, "no response and no disconnect for an unknown API key"
    assert_still_serving(served, "after unknown API key")


def test_api_versions_unsupported_version(served):
    with w.connect(served.bootstrap) as s:
        payload = w.roundtrip(s, w.api_versions_request(31337, 99))
        resp = w.parse_api_versions_v0(payload)  # strict v0 layout
        assert resp.correlation_id == 31337
        assert resp.error_code == w.ERR_UNSUPPORTED_VERSION
        assert w.API_VERSIONS in resp.api_keys, "the error response should still list the supported versions"
        lo, hi = resp.api_keys[w.API_VERSIONS]
        assert lo == 0 and hi >= 3
        # clients retry on the same connection with a version from that list
        again = w.parse_api_versions_v0(w.roundtrip(s, w.api_versions_request(31338, 0)))
        assert (again.correlation_id, again.error_code) == (31338, w.ERR_NONE)
        assert again.api_keys == resp.api_keys
    assert_still_serving(served, "after ApiVersions v99")


def test_produce_with_corrupted_crc(served):
    topic = "crc"
    create_topic(served.bootstrap, topic, 1)
    ts = now_ms()
    good = w.record_batch([(b"good-key", b"good-value")], ts)
    with w.connect(served.bootstrap) as s:
        corr, results = w.parse_produce_v3_response(w.roundtrip(s, w.produce_v3(1, topic, 0, good)))
        assert corr == 1
        assert [(r.topic, r.partition, r.error_code, r.base_offset) for r in results] == \
            [(topic, 0, w.ERR_NONE, 0)], "a valid hand-built batch should be accepted"

        bad = bytearray(w.record_batch([(b"bad-key", b"bad-value")], ts))
        bad[-2] ^= 0x5A  # inside the value: covered by the CRC, lengths stay intact
        corr, results = w.parse_produce_v3_response(w.roundtrip(s, w.produce_v3(2, topic, 0, bytes(bad))))
        assert corr == 2
        assert [(r.topic, r.partition, r.error_code) for r in results] == \
            [(topic, 0, w.ERR_CORRUPT_MESSAGE)]

        # the connection stays usable
        corr, results = w.parse_produce_v3_response(
            w.roundtrip(s, w.produce_v3(3, topic, 0, w.record_batch([(None, b"after")], ts))))
        assert (corr, results[0].error_code, results[0].base_offset) == (3, w.ERR_NONE, 1)

    assert watermarks(served.bootstrap, topic, [0]) == {0: (0, 2)}
    got = consume_confluent(served.bootstrap, topic, [0])
    assert [(r.offset, r.key, r.value) for r in got] == [(0, b"good-key", b"good-value"), (1, None, b"after")]
    assert_still_serving(served, "after corrupted batch")


def test_many_connections_opened_and_dropped(served):
    socks = [w.connect(served.bootstrap) for _ in range(100)]
    for i, s in enumerate(socks):
        if i % 2:
            s.sendall(w.api_versions_request(i, 0)[:7])  # some leave a partial frame behind
        s.close()
    assert_still_serving(served, "after 100 dropped connections")
