"""A TCP proxy in front of a weir daemon that loses Kafka requests and responses.

It reads the Kafka framing (a 4-byte length before every request and response) to know
which API each response answers. For the APIs it is told to disturb it, at random:

- "request-lost": the connection is cut before the request reaches the broker;
- "response-lost": the request reaches the broker and is handled, then the connection is
  cut before the response reaches the client, so the client cannot know it succeeded.

Clients reach the proxy because the daemon advertises the proxy's port (the
`advertised_port` setting).

`hold()` stops relaying in both directions (frames wait inside the proxy), `reset()` cuts
every open connection and drops what was held, `release()` relays again: a partition of
the network between whoever uses the proxy and the daemon behind it. Setting `delay_s` holds
every frame (or chunk of bytes) that long before relaying it, in each direction: a slow link.

With `kafka=False` it relays bytes as they come (no framing, nothing lost at random): for
the cluster links (Raft and cluster RPCs over HTTP), which only hold, reset and release.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter

PRODUCE = 0


def _read_frame(sock: socket.socket) -> bytes | None:
    head = _read_exact(sock, 4)
    if head is None:
        return None
    (size,) = struct.unpack(">i", head)
    body = _read_exact(sock, size)
    return None if body is None else head + body


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class FaultProxy:
    def __init__(self, seed: int, fault_rate: float, apis: tuple[int, ...] = (PRODUCE,),
                 kafka: bool = True):
        self.kafka = kafka
        self.rng = random.Random(seed)
        self.fault_rate = fault_rate
        self.apis = apis
        self.upstream_port: int | None = None
        self.faults: Counter[str] = Counter()
        self.forwarded: Counter[int] = Counter()
        self.enabled = True
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        self._relaying = threading.Event()
        self._relaying.set()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def hold(self) -> None:
        self._relaying.clear()

    def release(self) -> None:
        self._relaying.set()

    def reset(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            _close(s)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._conns:
                _close(s)

    def _decide(self) -> str | None:
        with self._lock:
            if not self.enabled or self.rng.random() >= self.fault_rate:
                return None
            return self.rng.choice(["request-lost", "response-lost"])

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.upstream_port is None:
                _close(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                _close(client)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, server]
            if not self.kafka:
                for src, dst in ((client, server), (server, client)):
                    threading.Thread(target=self._relay, args=(src, dst), daemon=True).start()
                continue
            # correlation id -> (api key, fault to apply to its response)
            pending: dict[int, tuple[int, str | None]] = {}
            threading.Thread(target=self._upstream, args=(client, server, pending),
                             daemon=True).start()
            threading.Thread(target=self._downstream, args=(client, server, pending),
                             daemon=True).start()

    def _relay(self, src, dst) -> None:
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            self._pass()
            if src.fileno() < 0:
                break
            try:
                dst.sendall(chunk)
            except OSError:
                break
        _close(src)
        _close(dst)

    def _pass(self) -> None:
        """Wait until the proxy relays, and out the link's delay."""
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        self._relaying.wait()

    def _upstream(self, client, server, pending) -> None:
        while True:
            frame = _read_frame(client)
            if frame is None:
                break
            api_key, _version, correlation = struct.unpack(">hhi", frame[4:12])
            fault = self._decide() if api_key in self.apis else None
            if fault == "request-lost":
                with self._lock:
                    self.faults[fault] += 1
                break
            pending[correlation] = (api_key, fault)
            self._pass()
            if client.fileno() < 0:
                break
            try:
                server.sendall(frame)
            except OSError:
                break
        _close(client)
        _close(server)

    def _downstream(self, client, server, pending) -> None:
        while True:
            frame = _read_frame(server)
            if frame is None:
                break
            (correlation,) = struct.unpack(">i", frame[4:8])
            api_key, fault = pending.pop(correlation, (-1, None))
            if fault == "response-lost":
                with self._lock:
                    self.faults[fault] += 1
                break
            with self._lock:
                self.forwarded[api_key] += 1
            self._pass()
            if server.fileno() < 0:
                break
            try:
                client.sendall(frame)
            except OSError:
                break
        _close(client)
        _close(server)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
