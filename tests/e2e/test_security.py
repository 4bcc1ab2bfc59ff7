"""TLS and SASL on the Kafka listeners: SSL, SASL_SSL and SASL_PLAINTEXT with real
clients (confluent-kafka, kafka-python, kcat), client certificates, SCRAM users managed
with `weir user` and with Kafka's own admin APIs, refusals, certificate reload and the
address each listener advertises.

Every daemon here has a PLAINTEXT listener first: `weir` commands and the checks of
what was (or was not) written go through it. Certificates come from a throwaway PKI made
with the openssl command line (the `pki` fixture). Requests that real clients never send
are written by hand with kafka_wire.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (NewTopic, ScramCredentialInfo, ScramMechanism, UserScramCredentialDeletion,
                                   UserScramCredentialUpsertion)

import kafka_wire as kw
from conftest import DaemonError, WeirDaemon, _pick_free_ports
from support import (Outgoing, admin, consume_confluent, consume_kcat, create_topic, kafka_error_code,
                     kp_consumer, now_ms, produce_confluent, run, wait_until, watermarks)

TIMEOUT = 20.0            # seconds for one client operation
CLOSE_TIMEOUT_S = 10.0    # a refused raw connection must be closed within this
RELOAD_WAIT_S = 30.0      # replaced certificate files are picked up within ~10 s
GROUP_YAML = "group_initial_rebalance_delay_ms: 200\n"

PASSWORD = "correct-horse-battery-staple"
OTHER_PASSWORD = "tr0ub4dor-and-3"

API_FIND_COORDINATOR = 10
API_SASL_HANDSHAKE = 17
API_SASL_AUTHENTICATE = 36
ERR_UNSUPPORTED_SASL_MECHANISM = 33
ERR_SASL_AUTHENTICATION_FAILED = 58

DEFAULT_MECHANISMS = {"SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"}


# ---------------------------------------------------------------------------
# a throwaway PKI, made with the openssl command line
# ---------------------------------------------------------------------------

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
# `openssl ca` is only used for the expired certificate: `openssl x509 -req` of
# OpenSSL 3.0 cannot set a start date in the past (-not_before arrived in 3.4).
[ca]
default_ca = weir_ca
[weir_ca]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial.txt
default_md = sha256
policy = policy_any
unique_subject = no
[policy_any]
commonName = supplied
"""


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path                  # the trusted CA
    server: KeyPair           # EC P-256, for 127.0.0.1 and localhost, signed by `ca`
    server_rsa: KeyPair       # the same with an RSA 2048 key
    server_chain: KeyPair     # signed by an intermediate of `ca`; the file holds leaf + intermediate
    alice: KeyPair            # client certificate CN=alice, signed by `ca`
    alice_expired: KeyPair    # CN=alice, signed by `ca`, valid only in January 2020
    rogue_ca: Path            # a CA nobody trusts
    rogue_alice: KeyPair      # CN=alice, signed by `rogue_ca`
    ca2: Path                 # a second CA, for the certificate reload
    server2: KeyPair          # RSA server pair signed by `ca2`


class _Openssl:
    def __init__(self, d: Path):
        self.d = d
        self.cnf = d / "openssl.cnf"
        self.cnf.write_text(_OPENSSL_CNF.format(dir=d))
        (d / "index.txt").write_text("")
        (d / "serial.txt").write_text("1000\n")

    def run(self, *args: str) -> None:
        res = subprocess.run(["openssl", *args], cwd=self.d, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=60)
        if res.returncode != 0:
            raise AssertionError(f"`openssl {' '.join(args)}` failed: "
                                 f"{res.stderr.decode(errors='replace')[-2000:]}")

    def key(self, name: str, kind: str) -> Path:
        """A PKCS#8 PEM private key ("ec": P-256, "rsa": 2048 bits)."""
        path = self.d / f"{name}.key"
        if kind == "ec":
            self.run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        else:
            self.run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path))
        return path

    def csr(self, name: str, cn: str, key: Path) -> Path:
        path = self.d / f"{name}.csr"
        self.run("req", "-config", str(self.cnf), "-new", "-key", str(key), "-subj", f"/CN={cn}",
                 "-out", str(path))
        return path

    def root(self, name: str) -> KeyPair:
        key = self.key(name, "ec")
        cert = self.d / f"{name}.pem"
        self.run("req", "-config", str(self.cnf), "-new", "-x509", "-key", str(key),
                 "-subj", f"/CN=weir e2e {name}", "-days", "2", "-extensions", "v3_ca", "-out", str(cert))
        return KeyPair(cert, key)

    def issue(self, name: str, cn: str, issuer: KeyPair, profile: str, kind: str = "ec") -> KeyPair:
        """A certificate with the extensions of `profile` (server, client or v3_ca)."""
        key = self.key(name, kind)
        cert = self.d / f"{name}.pem"
        serial = "0x" + os.urandom(8).hex()
        self.run("x509", "-req", "-in", str(self.csr(name, cn, key)), "-CA", str(issuer.cert),
                 "-CAkey", str(issuer.key), "-set_serial", serial, "-days", "2",
                 "-extfile", str(self.cnf), "-extensions", profile, "-out", str(cert))
        return KeyPair(cert, key)

    def issue_expired(self, name: str, cn: str, issuer: KeyPair) -> KeyPair:
        key = self.key(name, "rsa")
        cert = self.d / f"{name}.pem"
        self.run("ca", "-batch", "-config", str(self.cnf), "-cert", str(issuer.cert),
                 "-keyfile", str(issuer.key), "-in", str(self.csr(name, cn, key)), "-out", str(cert),
                 "-startdate", "20200101000000Z", "-enddate", "20200201000000Z",
                 "-extfile", str(self.cnf), "-extensions", "client", "-notext")
        return KeyPair(cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """Every certificate the tests need, made once per module. Tests that change
    files on disk (the reload test) work on copies."""
    o = _Openssl(tmp_path_factory.mktemp("pki"))
    ca = o.root("ca")
    intermediate = o.issue("intermediate", "weir e2e intermediate", ca, "v3_ca")
    chain_leaf = o.issue("server-chain", "127.0.0.1", intermediate, "server")
    chain_file = o.d / "server-chain-full.pem"
    chain_file.write_text(chain_leaf.cert.read_text() + intermediate.cert.read_text())
    rogue = o.root("rogue-ca")
    ca2 = o.root("ca2")
    return Pki(
        ca=ca.cert,
        server=o.issue("server", "127.0.0.1", ca, "server", "ec"),
        server_rsa=o.issue("server-rsa", "127.0.0.1", ca, "server", "rsa"),
        server_chain=KeyPair(chain_file, chain_leaf.key),
        alice=o.issue("alice", "alice", ca, "client", "rsa"),
        alice_expired=o.issue_expired("alice-expired", "alice", ca),
        rogue_ca=rogue.cert,
        rogue_alice=o.issue("rogue-alice", "alice", rogue, "client", "rsa"),
        ca2=ca2.cert,
        server2=o.issue("server2", "127.0.0.1", ca2, "server", "rsa"),
    )


# ---------------------------------------------------------------------------
# daemons with listeners
# ---------------------------------------------------------------------------

@dataclass
class Listener:
    name: str
    protocol: str
    sasl_mechanisms: Optional[list[str]] = None
    advertised: Optional[str] = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Secured:
    """A running daemon and its listeners by name; "PLAIN" is the PLAINTEXT one."""

    def __init__(self, daemon: WeirDaemon, listeners: list[Listener]):
        self.daemon = daemon
        self.listeners = {listener.name: listener for listener in listeners}

    @property
    def plain(self) -> str:
        return self.daemon.bootstrap

    def addr(self, name: str) -> str:
        return self.listeners[name].address

    def port(self, name: str) -> int:
        return self.listeners[name].port


def tls_section(server: KeyPair, client_ca: Optional[Path] = None,
                client_auth: Optional[str] = None) -> dict[str, str]:
    tls = {"cert_file": str(server.cert), "key_file": str(server.key)}
    if client_ca is not None:
        tls["client_ca_file"] = str(client_ca)
    if client_auth is not None:
        tls["client_auth"] = client_auth
    return tls


def security_yaml(listeners: list[Listener], tls: Optional[dict[str, str]], extra_yaml: str = "") -> str:
    q = json.dumps  # a JSON string is a valid double-quoted YAML scalar
    out = [GROUP_YAML.rstrip("\n"), *extra_yaml.splitlines(), "listeners:"]
    for listener in listeners:
        out += [f"  - name: {q(listener.name)}",
                f"    address: {q(listener.address)}",
                f"    protocol: {listener.protocol}"]
        if listener.advertised is not None:
            out.append(f"    advertised: {q(listener.advertised)}")
        if listener.sasl_mechanisms is not None:
            out.append(f"    sasl_mechanisms: [{', '.join(listener.sasl_mechanisms)}]")
    if tls is not None:
        out.append("tls:")
        out += [f"  {k}: {q(v)}" for k, v in tls.items()]
    return "\n".join(out) + "\n"


def start_secured(weir_factory, listeners: list[Listener],
                  tls: Optional[dict[str, str]] = None, extra_yaml: str = "") -> Secured:
    """A daemon whose first listener is PLAINTEXT on its usual Kafka port, followed by
    `listeners` on free ports, all declared in the config file."""
    kafka_port, http_port, *ports = _pick_free_ports(2 + len(listeners))
    plain = Listener("PLAIN", "PLAINTEXT", port=kafka_port)
    for listener, port in zip(listeners, ports):
        listener.port = port
    everything = [plain, *listeners]
    d = weir_factory("weir", config_yaml=security_yaml(everything, tls, extra_yaml), start=False)
    d.kafka_port, d.http_port = kafka_port, http_port
    d.start()
    return Secured(d, everything)


# ---------------------------------------------------------------------------
# client settings
# ---------------------------------------------------------------------------

def rk_ssl(ca: Path, client: Optional[KeyPair] = None) -> dict[str, str]:
    """librdkafka (confluent-kafka, kcat) settings for an SSL listener."""
    conf = {"security.protocol": "SSL", "ssl.ca.location": str(ca)}
    if client is not None:
        conf["ssl.certificate.location"] = str(client.cert)
        conf["ssl.key.location"] = str(client.key)
    return conf


def rk_sasl(mechanism: str, user: str, password: str, ca: Optional[Path] = None) -> dict[str, str]:
    """librdkafka settings for SASL_SSL (with `ca`) or SASL_PLAINTEXT."""
    conf = {"security.protocol": "SASL_SSL" if ca is not None else "SASL_PLAINTEXT",
            "sasl.mechanisms": mechanism, "sasl.username": user, "sasl.password": password}
    if ca is not None:
        conf["ssl.ca.location"] = str(ca)
    return conf


def kcat_args(conf: dict[str, str]) -> list[str]:
    args = []
    for k, v in conf.items():
        args += ["-X", f"{k}={v}"]
    return args


def kp_ssl(ca: Path) -> dict:
    """kafka-python settings for an SSL listener (hostname checked, as by default)."""
    return dict(security_protocol="SSL", ssl_cafile=str(ca))


def kp_sasl(mechanism: str, user: str, password: str, ca: Optional[Path] = None) -> dict:
    conf = dict(security_protocol="SASL_SSL" if ca is not None else "SASL_PLAINTEXT",
                sasl_mechanism=mechanism, sasl_plain_username=user, sasl_plain_password=password)
    if ca is not None:
        conf["ssl_cafile"] = str(ca)
    return conf


def fast(conf: dict[str, str]) -> dict:
    """A short librdkafka socket timeout, so that a broken daemon fails a test quickly."""
    return {"socket.timeout.ms": 10000, **conf}


def fast_producer(conf: dict[str, str]) -> dict:
    """The same for producers, whose records also give up after TIMEOUT."""
    return {"message.timeout.ms": int(TIMEOUT * 1000), **fast(conf)}


# ---------------------------------------------------------------------------
# produce / consume with real clients
# ---------------------------------------------------------------------------

def values_for(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i:03d}".encode() for i in range(n)]


def produce_values_confluent(addr: str, topic: str, values: list[bytes], partitions: int,
                             conf: dict[str, str]) -> None:
    produce_confluent(addr, topic,
                      [Outgoing(value=v, key=v, partition=i % partitions) for i, v in enumerate(values)],
                      timeout=TIMEOUT, **fast_producer(conf))


def produce_values_kafka_python(addr: str, topic: str, values: list[bytes], partitions: int,
                                **security) -> None:
    from kafka import KafkaProducer
    p = KafkaProducer(bootstrap_servers=addr, acks="all", linger_ms=5, request_timeout_ms=15000,
                      max_block_ms=int(TIMEOUT * 1000), bootstrap_timeout_ms=int(TIMEOUT * 1000),
                      **security)
    try:
        futures = [p.send(topic, key=v, value=v, partition=i % partitions) for i, v in enumerate(values)]
        p.flush(timeout=TIMEOUT)
        for f in futures:
            f.get(timeout=TIMEOUT)
    finally:
        p.close(timeout=10)


def produce_lines_kcat(kcat: str, addr: str, topic: str, values: list[bytes],
                       conf: dict[str, str]) -> None:
    run([kcat, "-P", "-b", addr, "-t", topic, "-p", "0", *kcat_args(fast_producer(conf))],
        input=b"\n".join(values) + b"\n", timeout=TIMEOUT + 10)


def all_values(addr: str, topic: str, partitions: int, conf: Optional[dict[str, str]] = None) -> list[bytes]:
    """Every value in the topic (confluent-kafka, assigned partitions), sorted."""
    recs = consume_confluent(addr, topic, range(partitions), timeout=TIMEOUT, **fast(conf or {}))
    return sorted(r.value for r in recs)


def collect(batch, want: int, what: str) -> list[bytes]:
    """Calls `batch()` (yielding ((partition, offset), value)) until `want` distinct records
    are in; their values, sorted."""
    got: dict[tuple[int, int], bytes] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(got) < want:
        assert time.monotonic() < deadline, f"{what} read {len(got)} of {want} records within {TIMEOUT}s"
        got.update(batch())
    assert len(got) == want, f"{what} read {len(got)} records, want {want}"
    return sorted(got.values())


def group_consume_confluent(addr: str, topic: str, group: str, want: int,
                            conf: dict[str, str]) -> list[bytes]:
    """Subscribe in a consumer group, read `want` records, commit synchronously."""
    c = Consumer({"bootstrap.servers": addr, "group.id": group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "session.timeout.ms": 10000,
                  "heartbeat.interval.ms": 1000, **fast(conf)})
    try:
        c.subscribe([topic])

        def batch():
            for m in c.consume(num_messages=100, timeout=0.5):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(f"group consumer of {group}: {m.error()}")
                yield (m.partition(), m.offset()), m.value()

        values = collect(batch, want, f"group consumer of {group}")
        c.commit(asynchronous=False)
        return values
    finally:
        c.close()


def group_consume_kafka_python(addr: str, topic: str, group: str, want: int, **security) -> list[bytes]:
    c = kp_consumer(addr, group_id=group, session_timeout_ms=10000, heartbeat_interval_ms=1000,
                    bootstrap_timeout_ms=int(TIMEOUT * 1000), **security)
    try:
        c.subscribe([topic])

        def batch():
            for _tp, msgs in c.poll(timeout_ms=500).items():
                for m in msgs:
                    yield (m.partition, m.offset), m.value

        values = collect(batch, want, f"kafka-python group consumer of {group}")
        c.commit(timeout_ms=int(TIMEOUT * 1000))
        return values
    finally:
        c.close(autocommit=False)


def committed_offsets(plain: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets, read over the PLAINTEXT listener."""
    c = Consumer({"bootstrap.servers": plain, "group.id": group, "enable.auto.commit": False,
                  "socket.timeout.ms": 10000})
    try:
        res = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=TIMEOUT)
        return {tp.partition: tp.offset for tp in res}
    finally:
        c.close()


def end_offsets(plain: str, topic: str, partitions: int) -> dict[int, int]:
    return {p: hi for p, (_lo, hi) in watermarks(plain, topic, range(partitions)).items()}


def read_values(addr: str, topic: str, partitions: int, isolation: str,
                conf: Optional[dict[str, str]] = None) -> list[bytes]:
    """Every value a consumer with `isolation` sees up to the end of each partition."""
    c = Consumer({"bootstrap.servers": addr, "group.id": "weir-e2e-reader", "enable.auto.commit": False,
                  "isolation.level": isolation, "enable.partition.eof": True,
                  "auto.offset.reset": "earliest", **fast(conf or {})})
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        out: list[tuple[int, int, bytes]] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + TIMEOUT
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, f"{isolation} reader: no end of {topic} after {TIMEOUT}s"
            for m in c.consume(num_messages=500, timeout=0.5):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                        continue
                    raise AssertionError(f"{isolation} reader: {m.error()}")
                at_end.discard(m.partition())
                out.append((m.partition(), m.offset(), m.value()))
        return [v for _p, _o, v in sorted(out)]
    finally:
        c.close()


def is_auth_error(e: KafkaError) -> bool:
    # librdkafka turns SASL_AUTHENTICATION_FAILED into a local _AUTHENTICATION error,
    # "SASL authentication error: ...".
    return e.code() == KafkaError._AUTHENTICATION or "authentication" in e.str().lower()


def produce_or_refused(addr: str, topic: str, conf: dict[str, str], value: bytes,
                       what: str) -> tuple[list[Optional[KafkaError]], list[KafkaError]]:
    """Produces one record with a confluent-kafka producer until it is acknowledged or the
    client reports an authentication error (a record still queued then is purged); returns
    the delivery reports and the client's errors."""
    errors: list[KafkaError] = []
    reports: list[Optional[KafkaError]] = []
    p = Producer({"bootstrap.servers": addr, "acks": "all", "linger.ms": 0, "enable.idempotence": False,
                  "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 1000,
                  "error_cb": errors.append, **fast_producer(conf)})
    p.produce(topic, value=value, partition=0, on_delivery=lambda err, msg: reports.append(err))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not reports and not any(is_auth_error(e) for e in errors):
            assert time.monotonic() < deadline, \
                f"{what}: neither delivered nor refused within {TIMEOUT}s; errors: {[e.str() for e in errors]}"
            p.poll(0.1)
    finally:
        if not reports:
            p.purge()
        p.flush(10)
    return reports, errors


def expect_auth_failure(addr: str, topic: str, conf: dict[str, str], what: str) -> KafkaError:
    """A confluent-kafka producer with these credentials gets an authentication error and
    no acknowledgement."""
    reports, errors = produce_or_refused(addr, topic, conf, f"must-not-be-written {what}".encode(), what)
    assert not any(r is None for r in reports), f"{what}: the record was acknowledged"
    auth = [e for e in errors if is_auth_error(e)]
    assert auth, f"{what}: delivery failed without an authentication error: {reports}, {errors}"
    return auth[0]


def expect_no_delivery(addr: str, topic: str, conf: dict[str, str], what: str) -> None:
    """A confluent-kafka producer with these settings cannot deliver anything: its
    record fails once message.timeout.ms (6 s) runs out."""
    errors: list[KafkaError] = []
    reports: list[Optional[KafkaError]] = []
    p = Producer({"bootstrap.servers": addr, "acks": "all", "linger.ms": 0, "enable.idempotence": False,
                  "socket.timeout.ms": 5000, "message.timeout.ms": 6000,
                  "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 1000,
                  "error_cb": errors.append, **conf})
    p.produce(topic, value=f"must-not-be-written {what}".encode(), partition=0,
              on_delivery=lambda err, msg: reports.append(err))
    left = p.flush(TIMEOUT)
    assert left == 0 and len(reports) == 1, f"{what}: no delivery report within {TIMEOUT}s"
    assert reports[0] is not None, f"{what}: the record was acknowledged"


# ---------------------------------------------------------------------------
# raw connections: TLS, SASL frames, metadata
# ---------------------------------------------------------------------------

def tls_socket(port: int, ca: Path, client: Optional[KeyPair] = None,
               timeout: float = 10.0) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def tls_api_versions(port: int, ca: Path, client: Optional[KeyPair] = None) -> None:
    """TLS handshake, then an ApiVersions round trip; raises if either fails."""
    with tls_socket(port, ca, client) as s:
        resp = kw.parse_api_versions_v0(kw.roundtrip(s, kw.api_versions_request(4242, 0)))
    assert (resp.correlation_id, resp.error_code) == (4242, kw.ERR_NONE)


def tls_works(port: int, ca: Path) -> bool:
    try:
        tls_api_versions(port, ca)
        return True
    except (ssl.SSLError, ConnectionError):
        return False


def assert_tls_refused(port: int, ca: Path, client: Optional[KeyPair], what: str) -> None:
    """The daemon refuses the client in the TLS handshake. With TLS 1.3 the client sees
    its handshake finish before the server has checked its certificate, so the refusal
    (an alert, or the connection closed) may only show on the first read; what matters
    is that no Kafka response ever comes back."""
    try:
        s = tls_socket(port, ca, client)
    except (ssl.SSLError, ConnectionError):
        return
    with s:
        try:
            s.sendall(kw.api_versions_request(7, 0))
            data = s.recv(4096)
        except (ssl.SSLError, ConnectionError):
            return
        except TimeoutError:
            raise AssertionError(f"{what}: neither refused nor answered within 10s") from None
    assert data == b"", f"{what}: the daemon answered a client it must refuse: {data[:40]!r}"


def plain_token(user: str, password: str) -> bytes:
    return b"\x00" + user.encode() + b"\x00" + password.encode()


def sasl_handshake_request(corr: int, mechanism: str) -> bytes:
    return kw.frame(kw.request_header(API_SASL_HANDSHAKE, 1, corr) + kw.string(mechanism))


def parse_sasl_handshake(payload: bytes) -> tuple[int, int, list[str]]:
    r = kw.Reader(payload)
    corr, err = r.i32(), r.i16()
    mechanisms = [r.str() for _ in range(r.i32())]
    return corr, err, mechanisms


def sasl_authenticate_request(corr: int, auth: bytes, declared_len: Optional[int] = None) -> bytes:
    """SaslAuthenticate v1; `declared_len` lets the auth bytes claim another length."""
    n = len(auth) if declared_len is None else declared_len
    return kw.frame(kw.request_header(API_SASL_AUTHENTICATE, 1, corr) + struct.pack(">i", n) + auth)


def parse_sasl_authenticate(payload: bytes) -> tuple[int, int, str]:
    r = kw.Reader(payload)
    corr, err, message = r.i32(), r.i16(), r.str()
    return corr, err, message


def correlation_id(payload: bytes) -> int:
    return struct.unpack(">i", payload[:4])[0]


def split_frames(data: bytes) -> list[bytes]:
    """The complete response frames in `data` (a trailing partial frame is ignored)."""
    frames, pos = [], 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack(">i", data[pos:pos + 4])
        if n < 0 or pos + 4 + n > len(data):
            break
        frames.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames


def sasl_plain_login(sock: socket.socket, user: str, password: str) -> int:
    """SaslHandshake(PLAIN) + SaslAuthenticate on an open connection: the error code."""
    corr, err, mechanisms = parse_sasl_handshake(kw.roundtrip(sock, sasl_handshake_request(1, "PLAIN")))
    assert (corr, err) == (1, 0), f"SaslHandshake(PLAIN) failed with error {err}; offered {mechanisms}"
    corr, err, _msg = parse_sasl_authenticate(
        kw.roundtrip(sock, sasl_authenticate_request(2, plain_token(user, password))))
    assert corr == 2
    return err


def raw_produce(sock: socket.socket, corr: int, topic: str, value: bytes) -> kw.ProducePartitionResult:
    batch = kw.record_batch([(None, value)], now_ms())
    got_corr, [res] = kw.parse_produce_v3_response(kw.roundtrip(sock, kw.produce_v3(corr, topic, 0, batch)))
    assert got_corr == corr
    return res


def assert_sasl_serves(addr: str, topic: str, user: str, password: str) -> int:
    """Positive control on the wire: PLAIN login, then a Produce that is accepted.
    Returns the offset it got."""
    with kw.connect(addr) as s:
        err = sasl_plain_login(s, user, password)
        assert err == 0, f"PLAIN login of {user} with the right password failed with error {err}"
        res = raw_produce(s, 3, topic, b"canary")
    assert res.error_code == 0, f"produce after a successful login failed with error {res.error_code}"
    return res.base_offset


def metadata_brokers(sock: socket.socket) -> list[tuple[int, str, int]]:
    """Metadata v1 for no topic: the brokers, as (node id, host, port)."""
    body = struct.pack(">i", 0)
    r = kw.Reader(kw.roundtrip(sock, kw.frame(kw.request_header(kw.API_METADATA, 1, 9) + body)))
    assert r.i32() == 9
    brokers = []
    for _ in range(r.i32()):
        node, host, port = r.i32(), r.str(), r.i32()
        r.str()  # rack
        brokers.append((node, host, port))
    return brokers


def find_coordinator(sock: socket.socket, group: str) -> tuple[int, str, int]:
    """FindCoordinator v1 for a group: (node id, host, port)."""
    body = kw.string(group) + struct.pack(">b", 0)
    r = kw.Reader(kw.roundtrip(sock, kw.frame(kw.request_header(API_FIND_COORDINATOR, 1, 11) + body)))
    assert r.i32() == 11
    r.i32()  # throttle_time_ms
    err = r.i16()
    r.str()  # error message
    assert err == 0, f"FindCoordinator failed with error {err}"
    return r.i32(), r.str(), r.i32()


def user_lines(d: WeirDaemon) -> set[tuple[str, str, str]]:
    """`weir user list`: a header, then one (name, mechanism, iterations) per credential."""
    out = d.cli("user", "list").stdout.decode().splitlines()
    assert out and out[0].split() == ["USER", "MECHANISM", "ITERATIONS"], out
    rows = [tuple(line.split()) for line in out[1:] if line.strip()]
    assert all(len(row) == 3 for row in rows), f"`weir user list` lines are not NAME MECHANISM ITERATIONS: {out}"
    assert len(rows) == len(set(rows)), f"duplicate lines in `weir user list`: {out}"
    return set(rows)  # type: ignore[arg-type]


def authenticates(addr: str, topic: str, mechanism: str, user: str, password: str,
                  ca: Optional[Path] = None) -> bool:
    """True when confluent-kafka can produce with these credentials, False when it gets an
    authentication error (anything else fails the test)."""
    what = f"{user}/{mechanism}"
    reports, errors = produce_or_refused(addr, topic, rk_sasl(mechanism, user, password, ca),
                                         f"{user} via {mechanism}".encode(), what)
    if reports and reports[0] is None:
        return True
    assert any(is_auth_error(e) for e in errors), \
        f"{what}: delivery failed without an authentication error: {reports}, {errors}"
    return False


# ---------------------------------------------------------------------------
# 1. SSL
# ---------------------------------------------------------------------------

def test_ssl_listener_with_all_clients(weir_factory, kcat_bin, pki):
    """Encryption only: the three clients produce and consume over an SSL listener,
    verifying the server certificate (CA and hostname), consumers in groups commit, and
    what they wrote is what the PLAINTEXT listener serves."""
    s = start_secured(weir_factory, [Listener("TLS", "SSL")], tls_section(pki.server))
    addr, topic, partitions = s.addr("TLS"), "ssl-clients", 2
    create_topic(s.plain, topic, partitions)
    conf = rk_ssl(pki.ca)

    ck, kp, kc = values_for("confluent", 30), values_for("kafka-python", 30), values_for("kcat", 10)
    produce_values_confluent(addr, topic, ck, partitions, conf)
    produce_values_kafka_python(addr, topic, kp, partitions, **kp_ssl(pki.ca))
    produce_lines_kcat(kcat_bin, addr, topic, kc, conf)
    everything = sorted(ck + kp + kc)

    assert all_values(s.plain, topic, partitions) == everything
    assert all_values(addr, topic, partitions, conf) == everything
    got = consume_kcat(kcat_bin, addr, topic, timeout=TIMEOUT + 10, extra_args=tuple(kcat_args(fast(conf))))
    assert sorted(r.value for r in got) == everything

    ends = end_offsets(s.plain, topic, partitions)
    assert group_consume_confluent(addr, topic, "ssl-confluent", len(everything), conf) == everything
    assert committed_offsets(s.plain, "ssl-confluent", topic, partitions) == ends
    assert group_consume_kafka_python(addr, topic, "ssl-kp", len(everything), **kp_ssl(pki.ca)) == everything
    assert committed_offsets(s.plain, "ssl-kp", topic, partitions) == ends

    md = json.loads(run([kcat_bin, "-L", "-J", "-b", addr, *kcat_args(fast(conf))], timeout=TIMEOUT + 10).stdout)
    assert [(b["id"], b["name"]) for b in md["brokers"]] == [(0, addr)], md["brokers"]


@pytest.mark.parametrize("variant", ["rsa-key", "intermediate-chain"])
def test_ssl_server_key_and_chain_variants(weir_factory, pki, variant):
    """The server key may be RSA as well as EC, and cert_file may hold a chain: a client
    that trusts only the root CA must get the intermediate from the daemon."""
    pair = pki.server_rsa if variant == "rsa-key" else pki.server_chain
    s = start_secured(weir_factory, [Listener("TLS", "SSL")], tls_section(pair))
    tls_api_versions(s.port("TLS"), pki.ca)
    topic = f"ssl-{variant}"
    create_topic(s.plain, topic, 1)
    produce_values_confluent(s.addr("TLS"), topic, values_for(variant, 5), 1, rk_ssl(pki.ca))
    assert all_values(s.addr("TLS"), topic, 1, rk_ssl(pki.ca)) == values_for(variant, 5)


# ---------------------------------------------------------------------------
# 2-4. SASL
# ---------------------------------------------------------------------------

def test_sasl_ssl_scram_sha512_with_all_clients(weir_factory, kcat_bin, pki):
    """SCRAM-SHA-512 over TLS for a user made with `weir user create`: produce, group
    consume with commit and a transaction (confluent-kafka), produce and consume
    (kafka-python, kcat)."""
    s = start_secured(weir_factory, [Listener("SECURE", "SASL_SSL")], tls_section(pki.server))
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)
    addr, topic, partitions = s.addr("SECURE"), "scram512", 2
    create_topic(s.plain, topic, partitions)
    conf = rk_sasl("SCRAM-SHA-512", "alice", PASSWORD, pki.ca)
    kp_conf = kp_sasl("SCRAM-SHA-512", "alice", PASSWORD, pki.ca)

    ck, kp, kc = values_for("confluent", 20), values_for("kafka-python", 20), values_for("kcat", 10)
    produce_values_confluent(addr, topic, ck, partitions, conf)
    produce_values_kafka_python(addr, topic, kp, partitions, **kp_conf)
    produce_lines_kcat(kcat_bin, addr, topic, kc, conf)
    everything = sorted(ck + kp + kc)
    assert all_values(s.plain, topic, partitions) == everything

    ends = end_offsets(s.plain, topic, partitions)
    assert group_consume_confluent(addr, topic, "scram-confluent", len(everything), conf) == everything
    assert committed_offsets(s.plain, "scram-confluent", topic, partitions) == ends
    assert group_consume_kafka_python(addr, topic, "scram-kp", len(everything), **kp_conf) == everything
    assert committed_offsets(s.plain, "scram-kp", topic, partitions) == ends
    got = consume_kcat(kcat_bin, addr, topic, timeout=TIMEOUT + 10, extra_args=tuple(kcat_args(fast(conf))))
    assert sorted(r.value for r in got) == everything

    # A transaction: the aborted batch is written but hidden from read_committed.
    txn_topic = "scram512-txn"
    create_topic(s.plain, txn_topic, 1)
    p = Producer({"bootstrap.servers": addr, "transactional.id": "scram-txn",
                  "transaction.timeout.ms": 30000, "linger.ms": 5, **fast_producer(conf)})
    p.init_transactions(TIMEOUT)
    p.begin_transaction()
    for v in values_for("aborted", 3):
        p.produce(txn_topic, value=v, partition=0)
    assert p.flush(TIMEOUT) == 0
    p.abort_transaction(TIMEOUT)
    p.begin_transaction()
    for v in values_for("committed", 5):
        p.produce(txn_topic, value=v, partition=0)
    p.commit_transaction(TIMEOUT)
    assert read_values(addr, txn_topic, 1, "read_committed", conf) == values_for("committed", 5)
    assert read_values(s.plain, txn_topic, 1, "read_uncommitted") == \
        values_for("aborted", 3) + values_for("committed", 5)


def test_sasl_ssl_plain_checks_the_stored_scram_credential(weir_factory, kcat_bin, pki):
    """PLAIN (offered by default) authenticates against the user's SCRAM credential;
    confluent-kafka and kcat produce and consume with it."""
    s = start_secured(weir_factory, [Listener("SECURE", "SASL_SSL")], tls_section(pki.server))
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)
    addr, topic = s.addr("SECURE"), "sasl-plain"
    create_topic(s.plain, topic, 1)
    conf = rk_sasl("PLAIN", "alice", PASSWORD, pki.ca)

    ck, kc = values_for("confluent", 10), values_for("kcat", 10)
    produce_values_confluent(addr, topic, ck, 1, conf)
    produce_lines_kcat(kcat_bin, addr, topic, kc, conf)
    assert all_values(s.plain, topic, 1) == sorted(ck + kc)
    assert all_values(addr, topic, 1, conf) == sorted(ck + kc)
    got = consume_kcat(kcat_bin, addr, topic, timeout=TIMEOUT + 10, extra_args=tuple(kcat_args(fast(conf))))
    assert sorted(r.value for r in got) == sorted(ck + kc)


def test_sasl_plaintext_scram_sha256_with_listener_flags(weir_factory):
    """SASL_PLAINTEXT declared with --listener flags, a SCRAM-SHA-256 user, kafka-python
    producing and consuming in a group. The user has no SCRAM-SHA-512 credential, so
    that mechanism must refuse it."""
    kafka_port, http_port, sasl_port = _pick_free_ports(3)
    addr = f"127.0.0.1:{sasl_port}"
    d = weir_factory("weir", config_yaml=GROUP_YAML, start=False, extra_args=(
        "--listener", f"PLAIN=PLAINTEXT://127.0.0.1:{kafka_port}",
        "--listener", f"SASL=SASL_PLAINTEXT://{addr}"))
    d.kafka_port, d.http_port = kafka_port, http_port
    d.start()
    d.cli("user", "create", "bob", "--mechanism", "SCRAM-SHA-256", "--password", PASSWORD)
    topic, partitions = "scram256", 2
    create_topic(d.bootstrap, topic, partitions)
    kp_conf = kp_sasl("SCRAM-SHA-256", "bob", PASSWORD)

    values = values_for("kafka-python", 40)
    produce_values_kafka_python(addr, topic, values, partitions, **kp_conf)
    assert all_values(d.bootstrap, topic, partitions) == sorted(values)
    assert group_consume_kafka_python(addr, topic, "scram256-kp", len(values), **kp_conf) == sorted(values)
    assert committed_offsets(d.bootstrap, "scram256-kp", topic, partitions) == \
        end_offsets(d.bootstrap, topic, partitions)

    expect_auth_failure(addr, topic, rk_sasl("SCRAM-SHA-512", "bob", PASSWORD), "bob with SCRAM-SHA-512")
    assert all_values(d.bootstrap, topic, partitions) == sorted(values)


def test_sasl_handshake_offers_the_configured_mechanisms(weir_factory):
    """SaslHandshake lists the listener's mechanisms: all three by default, only the
    configured ones otherwise, and UNSUPPORTED_SASL_MECHANISM for anything else."""
    s = start_secured(weir_factory, [Listener("DEFAULT", "SASL_PLAINTEXT"),
                                     Listener("ONLY512", "SASL_PLAINTEXT", sasl_mechanisms=["SCRAM-SHA-512"])])
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)

    def handshake(name: str, mechanism: str) -> tuple[int, set[str]]:
        with kw.connect(s.addr(name)) as sock:
            corr, err, mechanisms = parse_sasl_handshake(
                kw.roundtrip(sock, sasl_handshake_request(5, mechanism)))
        assert corr == 5
        return err, set(mechanisms)

    assert handshake("DEFAULT", "PLAIN") == (0, DEFAULT_MECHANISMS)
    assert handshake("DEFAULT", "SCRAM-SHA-256") == (0, DEFAULT_MECHANISMS)
    assert handshake("DEFAULT", "GSSAPI") == (ERR_UNSUPPORTED_SASL_MECHANISM, DEFAULT_MECHANISMS)
    assert handshake("ONLY512", "SCRAM-SHA-512") == (0, {"SCRAM-SHA-512"})
    for refused in ("PLAIN", "SCRAM-SHA-256"):
        assert handshake("ONLY512", refused) == (ERR_UNSUPPORTED_SASL_MECHANISM, {"SCRAM-SHA-512"}), refused

    topic = "only512"
    create_topic(s.plain, topic, 1)
    assert authenticates(s.addr("ONLY512"), topic, "SCRAM-SHA-512", "alice", PASSWORD)


# ---------------------------------------------------------------------------
# 5. client certificates
# ---------------------------------------------------------------------------

def test_mtls_requires_a_certificate_from_the_client_ca(weir_factory, pki):
    """With client_ca_file and client_auth required, only clients with a valid certificate
    from that CA get through; the others are refused in the TLS handshake, nothing of theirs
    is written, and the daemon keeps serving good clients."""
    s = start_secured(weir_factory, [Listener("MTLS", "SSL")],
                      tls_section(pki.server, client_ca=pki.ca, client_auth="required"))
    addr, port, topic = s.addr("MTLS"), s.port("MTLS"), "mtls"
    create_topic(s.plain, topic, 1)
    good = rk_ssl(pki.ca, pki.alice)

    tls_api_versions(port, pki.ca, pki.alice)
    produce_values_confluent(addr, topic, values_for("alice", 5), 1, good)
    assert all_values(addr, topic, 1, good) == values_for("alice", 5)

    refused = [("no client certificate", None),
               ("a certificate from an untrusted CA", pki.rogue_alice),
               ("an expired certificate from the trusted CA", pki.alice_expired)]
    for what, client in refused:
        assert_tls_refused(port, pki.ca, client, what)
        expect_no_delivery(addr, topic, rk_ssl(pki.ca, client), what)
        tls_api_versions(port, pki.ca, pki.alice)

    assert s.daemon.running()
    produce_values_confluent(addr, topic, values_for("alice-again", 2), 1, good)
    assert all_values(s.plain, topic, 1) == sorted(values_for("alice", 5) + values_for("alice-again", 2))


def test_tls_flags_and_default_client_auth(weir_factory, pki):
    """--listener/--tls-cert/--tls-key/--tls-client-ca configure the same thing as the
    file, and a client CA alone means client certificates are required."""
    kafka_port, http_port, tls_port = _pick_free_ports(3)
    d = weir_factory("weir", config_yaml=GROUP_YAML, start=False, extra_args=(
        "--listener", f"PLAIN=PLAINTEXT://127.0.0.1:{kafka_port}",
        "--listener", f"MTLS=SSL://127.0.0.1:{tls_port}",
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca)))
    d.kafka_port, d.http_port = kafka_port, http_port
    d.start()
    addr, topic = f"127.0.0.1:{tls_port}", "tls-flags"
    create_topic(d.bootstrap, topic, 1)

    assert_tls_refused(tls_port, pki.ca, None, "no client certificate")
    tls_api_versions(tls_port, pki.ca, pki.alice)
    produce_values_confluent(addr, topic, values_for("flags", 3), 1, rk_ssl(pki.ca, pki.alice))
    assert all_values(d.bootstrap, topic, 1) == values_for("flags", 3)


@pytest.mark.parametrize("client_auth", ["requested", "none"])
def test_optional_client_certificates(weir_factory, pki, client_auth):
    """client_auth requested or none: clients without a certificate are served, and so
    is a client presenting a valid one."""
    s = start_secured(weir_factory, [Listener("TLS", "SSL")],
                      tls_section(pki.server, client_ca=pki.ca, client_auth=client_auth))
    addr, topic = s.addr("TLS"), f"client-auth-{client_auth}"
    create_topic(s.plain, topic, 1)
    produce_values_confluent(addr, topic, values_for("anonymous", 3), 1, rk_ssl(pki.ca))
    produce_values_confluent(addr, topic, values_for("alice", 3), 1, rk_ssl(pki.ca, pki.alice))
    assert all_values(s.plain, topic, 1) == sorted(values_for("anonymous", 3) + values_for("alice", 3))


# ---------------------------------------------------------------------------
# 6. refusals
# ---------------------------------------------------------------------------

def test_failed_authentication_writes_nothing(weir_factory, pki):
    """Wrong passwords, unknown users and a mechanism the user has no credential for all
    get an authentication error in confluent-kafka, and the topic stays empty."""
    s = start_secured(weir_factory, [Listener("SECURE", "SASL_SSL")], tls_section(pki.server))
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)
    addr, topic = s.addr("SECURE"), "guarded"
    create_topic(s.plain, topic, 1)

    cases = [("SCRAM-SHA-512", "alice", OTHER_PASSWORD, "SCRAM-SHA-512 wrong password"),
             ("SCRAM-SHA-512", "mallory", PASSWORD, "SCRAM-SHA-512 unknown user"),
             ("PLAIN", "alice", OTHER_PASSWORD, "PLAIN wrong password"),
             ("PLAIN", "mallory", PASSWORD, "PLAIN unknown user"),
             ("SCRAM-SHA-256", "alice", PASSWORD, "SCRAM-SHA-256 without such a credential")]
    for mechanism, user, password, what in cases:
        expect_auth_failure(addr, topic, rk_sasl(mechanism, user, password, pki.ca), what)
        assert watermarks(s.plain, topic, [0]) == {0: (0, 0)}, f"{what}: something was written"

    assert s.daemon.running()
    produce_values_confluent(addr, topic, [b"legit"], 1, rk_sasl("SCRAM-SHA-512", "alice", PASSWORD, pki.ca))
    assert all_values(s.plain, topic, 1) == [b"legit"]


@pytest.fixture
def sasl_plaintext(weir_factory):
    """A daemon with a SASL_PLAINTEXT listener "SASL", user alice, an empty topic "guarded"
    and a topic "canary" for the positive controls."""
    s = start_secured(weir_factory, [Listener("SASL", "SASL_PLAINTEXT")])
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)
    create_topic(s.plain, "guarded", 1)
    create_topic(s.plain, "canary", 1)
    assert_sasl_serves(s.addr("SASL"), "canary", "alice", PASSWORD)
    return s


def test_failed_login_is_answered_then_closed(sasl_plaintext):
    """SaslAuthenticate with a wrong password gets SASL_AUTHENTICATION_FAILED, then the
    connection is closed; a Produce sent right behind the failed login is never written."""
    s = sasl_plaintext
    with kw.connect(s.addr("SASL")) as sock:
        err = sasl_plain_login(sock, "alice", OTHER_PASSWORD)
        assert err == ERR_SASL_AUTHENTICATION_FAILED, f"wrong password answered with error {err}"
        closed, data = kw.wait_closed(sock, CLOSE_TIMEOUT_S)
        assert closed and not data, f"connection not closed after a failed login (got {data[:40]!r})"

    batch = kw.record_batch([(None, b"smuggled")], now_ms())
    with kw.connect(s.addr("SASL")) as sock:
        sock.sendall(sasl_handshake_request(1, "PLAIN")
                     + sasl_authenticate_request(2, plain_token("alice", OTHER_PASSWORD))
                     + kw.produce_v3(3, "guarded", 0, batch))
        closed, data = kw.wait_closed(sock, CLOSE_TIMEOUT_S)
    assert closed, "connection not closed after a failed login with a pipelined Produce"
    corrs = [correlation_id(f) for f in split_frames(data)]
    assert 3 not in corrs, "the Produce sent after a failed login was answered"
    assert watermarks(s.plain, "guarded", [0]) == {0: (0, 0)}
    assert_sasl_serves(s.addr("SASL"), "canary", "alice", PASSWORD)


def test_failures_from_one_address_are_throttled(weir_factory):
    """After max_failed_authentications_per_minute failures from an address, even the right
    password is refused from there until the minute is over; other listeners' plaintext
    clients are not affected."""
    s = start_secured(weir_factory, [Listener("SASL", "SASL_PLAINTEXT")],
                      extra_yaml="max_failed_authentications_per_minute: 3\n"
                                 "connection_failed_authentication_delay_ms: 0\n")
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)
    create_topic(s.plain, "canary", 1)
    assert_sasl_serves(s.addr("SASL"), "canary", "alice", PASSWORD)
    for _ in range(3):
        with kw.connect(s.addr("SASL")) as sock:
            assert sasl_plain_login(sock, "alice", OTHER_PASSWORD) == ERR_SASL_AUTHENTICATION_FAILED
    with kw.connect(s.addr("SASL")) as sock:
        err = sasl_plain_login(sock, "alice", PASSWORD)
    assert err == ERR_SASL_AUTHENTICATION_FAILED, "the right password was accepted from a throttled address"
    assert watermarks(s.plain, "canary", [0]) == {0: (0, 1)}


def test_v0_handshake_takes_bare_tokens(sasl_plaintext):
    """After a v0 SaslHandshake (clients before KIP-152) the token travels as a bare
    size-prefixed frame, and so does the answer; then the connection speaks Kafka again."""
    s = sasl_plaintext
    with kw.connect(s.addr("SASL")) as sock:
        frame = kw.frame(kw.request_header(API_SASL_HANDSHAKE, 0, 1) + kw.string("PLAIN"))
        corr, err, _m = parse_sasl_handshake(kw.roundtrip(sock, frame))
        assert (corr, err) == (1, 0)
        token = plain_token("alice", PASSWORD)
        sock.sendall(struct.pack(">i", len(token)) + token)
        assert kw.roundtrip(sock, b"") == b"", "a PLAIN success is an empty bare token"
        res = raw_produce(sock, 2, "canary", b"after-v0")
    assert res.error_code == 0
    with kw.connect(s.addr("SASL")) as sock:
        frame = kw.frame(kw.request_header(API_SASL_HANDSHAKE, 0, 1) + kw.string("PLAIN"))
        parse_sasl_handshake(kw.roundtrip(sock, frame))
        token = plain_token("alice", OTHER_PASSWORD)
        sock.sendall(struct.pack(">i", len(token)) + token)
        closed, data = kw.wait_closed(sock, CLOSE_TIMEOUT_S)
    assert closed and not data, "a failed bare-token login must close the connection"


def test_clients_re_authenticate_when_the_session_expires(weir_factory):
    """With connections_max_reauth_ms the daemon tells clients how long their session lasts
    (KIP-368); confluent-kafka re-authenticates on the same connection and keeps producing,
    while a raw client that does not is disconnected at its next request after expiry."""
    s = start_secured(weir_factory, [Listener("SASL", "SASL_PLAINTEXT")],
                      extra_yaml="connections_max_reauth_ms: 1500\n")
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)
    create_topic(s.plain, "reauth", 1)
    with kw.connect(s.addr("SASL")) as sock:
        parse_sasl_handshake(kw.roundtrip(sock, sasl_handshake_request(1, "PLAIN")))
        payload = kw.roundtrip(sock, sasl_authenticate_request(2, plain_token("alice", PASSWORD)))
        r = kw.Reader(payload)
        corr, err, _msg = r.i32(), r.i16(), r.str()
        r._take(r.i32())  # the mechanism's last token (empty for PLAIN)
        lifetime = r.i64()
        assert (corr, err, lifetime) == (2, 0, 1500), (corr, err, lifetime)
        assert raw_produce(sock, 3, "reauth", b"in-session").error_code == 0
        served = 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                raw_produce(sock, 4, "reauth", b"until-expiry")
                served += 1
            except (AssertionError, ConnectionError, OSError, struct.error, EOFError):
                break
        else:
            pytest.fail("an expired session kept being served")
    conf = fast_producer({"bootstrap.servers": s.addr("SASL"),
                          **rk_sasl("PLAIN", "alice", PASSWORD)})
    p = Producer(conf)
    failures = []
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 5:
        p.produce("reauth", b"v%d" % n, on_delivery=lambda e, _m: e and failures.append(e))
        n += 1
        p.poll(0.1)
    assert p.flush(20) == 0 and not failures, failures
    assert watermarks(s.plain, "reauth", [0])[0][1] == served + n
    expired = s.daemon.log_tail(100000).count("SASL session expired")
    assert expired == 1, f"{expired} connections outlived their session; only the raw one should"


@pytest.mark.parametrize("prelude", ["nothing", "api-versions", "handshake"])
def test_produce_before_authentication_closes_the_connection(sasl_plaintext, prelude):
    """On a SASL listener a Produce before a successful SaslAuthenticate (first thing, after
    ApiVersions, or after SaslHandshake alone) closes the connection and writes nothing."""
    s = sasl_plaintext
    batch = kw.record_batch([(None, b"unauthenticated")], now_ms())
    with kw.connect(s.addr("SASL")) as sock:
        if prelude == "api-versions":
            resp = kw.parse_api_versions_v0(kw.roundtrip(sock, kw.api_versions_request(1, 0)))
            assert resp.error_code == 0, "ApiVersions must be answered before authentication"
        elif prelude == "handshake":
            _corr, err, _m = parse_sasl_handshake(kw.roundtrip(sock, sasl_handshake_request(1, "PLAIN")))
            assert err == 0
        sock.sendall(kw.produce_v3(7, "guarded", 0, batch))
        closed, data = kw.wait_closed(sock, CLOSE_TIMEOUT_S)
    assert closed, f"after {prelude}: an unauthenticated Produce did not close the connection"
    for f in split_frames(data):
        if correlation_id(f) == 7:
            _c, [res] = kw.parse_produce_v3_response(f)
            assert res.error_code != 0, f"after {prelude}: an unauthenticated Produce was accepted"
    assert watermarks(s.plain, "guarded", [0]) == {0: (0, 0)}
    assert_sasl_serves(s.addr("SASL"), "canary", "alice", PASSWORD)


MALFORMED = {
    # SaslAuthenticate whose auth bytes claim 1000 bytes; the frame holds 10
    "auth-bytes-beyond-frame": ("PLAIN", sasl_authenticate_request(2, b"\x00alice\x00pw", declared_len=1000)),
    # a PLAIN token cut off before the password
    "plain-token-cut-off": ("PLAIN", sasl_authenticate_request(2, b"\x00alice")),
    # a SCRAM client-first message cut off in the middle
    "scram-first-message-cut-off": ("SCRAM-SHA-512", sasl_authenticate_request(2, b"n,,n=ali")),
    # a frame claiming 1 GiB right after the handshake
    "huge-frame-after-handshake": ("PLAIN", struct.pack(">i", 0x4000_0000) + b"\x00\x24\x00\x01\x00\x00\x00\x02"),
    # a frame claiming 2 GiB as the very first bytes
    "huge-frame-first": (None, struct.pack(">i", 0x7FFF_FFFF) + b"\x00\x11\x00\x01\x00\x00\x00\x01"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_authentication_closes_the_connection(sasl_plaintext, case):
    """Truncated auth bytes and absurd frame sizes get the connection closed (never a
    successful login), and the daemon keeps serving."""
    s = sasl_plaintext
    mechanism, payload = MALFORMED[case]
    with kw.connect(s.addr("SASL")) as sock:
        if mechanism is not None:
            _corr, err, _m = parse_sasl_handshake(kw.roundtrip(sock, sasl_handshake_request(1, mechanism)))
            assert err == 0
        sock.sendall(payload)
        closed, data = kw.wait_closed(sock, CLOSE_TIMEOUT_S)
    assert closed, f"{case}: the connection was not closed within {CLOSE_TIMEOUT_S}s"
    for f in split_frames(data):
        if correlation_id(f) == 2:
            _c, err, _msg = parse_sasl_authenticate(f)
            assert err != 0, f"{case}: the malformed SaslAuthenticate succeeded"
    assert s.daemon.running()
    assert_sasl_serves(s.addr("SASL"), "canary", "alice", PASSWORD)


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_plaintext_client_on_a_tls_listener_is_closed(weir_factory, pki, protocol):
    """Kafka bytes without TLS on a TLS listener: the connection is closed without a
    Kafka response (a TLS alert is fine), and TLS clients are still served."""
    s = start_secured(weir_factory, [Listener("TLS", protocol)], tls_section(pki.server))
    with kw.connect(s.addr("TLS")) as sock:
        sock.sendall(kw.api_versions_request(31, 0))
        closed, data = kw.wait_closed(sock, CLOSE_TIMEOUT_S)
    assert closed, "a plaintext client on a TLS listener was not disconnected"
    assert data == b"" or data[0] == 0x15, f"expected nothing or a TLS alert, got {data[:40]!r}"
    assert s.daemon.running()
    tls_api_versions(s.port("TLS"), pki.ca)


# ---------------------------------------------------------------------------
# 7. users
# ---------------------------------------------------------------------------

def test_user_cli_round_trip(weir_factory, monkeypatch, tmp_path):
    """`weir user create/list/delete`: mechanisms and iterations as given, passwords from
    the flag, a file or WEIR_USER_PASSWORD, every credential usable (PLAIN with any of
    them), deletion per mechanism or whole, and no password stored or logged in clear."""
    s = start_secured(weir_factory, [Listener("SASL", "SASL_PLAINTEXT")])
    d, addr, topic = s.daemon, s.addr("SASL"), "whoami"
    create_topic(s.plain, topic, 1)

    d.cli("user", "create", "alice", "--password", PASSWORD)
    pw_file = tmp_path / "bob.password"
    pw_file.write_text(OTHER_PASSWORD)  # no trailing newline
    d.cli("user", "create", "bob", "--mechanism", "SCRAM-SHA-256", "--iterations", "8192",
          "--password-file", str(pw_file))
    carol_password = "carol-from-the-environment"
    monkeypatch.setenv("WEIR_USER_PASSWORD", carol_password)
    d.cli("user", "create", "carol")
    monkeypatch.delenv("WEIR_USER_PASSWORD")

    assert user_lines(d) == {("alice", "SCRAM-SHA-512", "4096"), ("bob", "SCRAM-SHA-256", "8192"),
                             ("carol", "SCRAM-SHA-512", "4096")}
    assert authenticates(addr, topic, "SCRAM-SHA-512", "alice", PASSWORD)
    assert authenticates(addr, topic, "SCRAM-SHA-256", "bob", OTHER_PASSWORD)
    assert authenticates(addr, topic, "PLAIN", "bob", OTHER_PASSWORD)
    assert not authenticates(addr, topic, "SCRAM-SHA-512", "bob", OTHER_PASSWORD)
    assert authenticates(addr, topic, "SCRAM-SHA-512", "carol", carol_password)
    assert authenticates(addr, topic, "PLAIN", "carol", carol_password)

    d.cli("user", "create", "alice", "--mechanism", "SCRAM-SHA-256", "--password", PASSWORD)
    assert ("alice", "SCRAM-SHA-256", "4096") in user_lines(d)
    assert authenticates(addr, topic, "SCRAM-SHA-256", "alice", PASSWORD)
    d.cli("user", "delete", "alice", "--mechanism", "SCRAM-SHA-256")
    assert not authenticates(addr, topic, "SCRAM-SHA-256", "alice", PASSWORD)
    assert authenticates(addr, topic, "SCRAM-SHA-512", "alice", PASSWORD)

    d.cli("user", "delete", "bob")
    assert user_lines(d) == {("alice", "SCRAM-SHA-512", "4096"), ("carol", "SCRAM-SHA-512", "4096")}
    assert not authenticates(addr, topic, "SCRAM-SHA-256", "bob", OTHER_PASSWORD)
    assert not authenticates(addr, topic, "PLAIN", "bob", OTHER_PASSWORD)

    for path in [d.log_path, *(p for p in d.data_dir.rglob("*") if p.is_file())]:
        data = path.read_bytes()
        for pw in (PASSWORD, OTHER_PASSWORD, carol_password):
            assert pw.encode() not in data, f"a password is stored in clear in {path}"


def test_admin_client_scram_credentials(weir_factory):
    """Kafka's AlterUserScramCredentials / DescribeUserScramCredentials through
    confluent-kafka's AdminClient: the same store as `weir user`, credentials usable at
    once, and gone once deleted."""
    s = start_secured(weir_factory, [Listener("SASL", "SASL_PLAINTEXT")])
    d, addr, topic = s.daemon, s.addr("SASL"), "admin-users"
    create_topic(s.plain, topic, 1)
    d.cli("user", "create", "frank", "--password", PASSWORD)
    a = admin(s.plain)

    futs = a.alter_user_scram_credentials([
        UserScramCredentialUpsertion("dave", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                     PASSWORD.encode()),
        UserScramCredentialUpsertion("erin", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096),
                                     OTHER_PASSWORD.encode(), salt=b"erin-fixed-salt"),
    ], request_timeout=TIMEOUT)
    assert set(futs) == {"dave", "erin"}
    for user, fut in futs.items():
        assert fut.result(TIMEOUT) is None, user

    assert authenticates(addr, topic, "SCRAM-SHA-512", "dave", PASSWORD)
    assert authenticates(addr, topic, "SCRAM-SHA-256", "erin", OTHER_PASSWORD)
    assert not authenticates(addr, topic, "SCRAM-SHA-512", "dave", OTHER_PASSWORD)

    def infos(desc) -> list[tuple[ScramMechanism, int]]:
        return sorted((i.mechanism, i.iterations) for i in desc.scram_credential_infos)

    described = a.describe_user_scram_credentials(["dave", "erin"], request_timeout=TIMEOUT)
    assert infos(described["dave"].result(TIMEOUT)) == [(ScramMechanism.SCRAM_SHA_512, 8192)]
    assert infos(described["erin"].result(TIMEOUT)) == [(ScramMechanism.SCRAM_SHA_256, 4096)]
    everyone = a.describe_user_scram_credentials(request_timeout=TIMEOUT).result(TIMEOUT)
    assert {u: infos(desc) for u, desc in everyone.items()} == {
        "dave": [(ScramMechanism.SCRAM_SHA_512, 8192)],
        "erin": [(ScramMechanism.SCRAM_SHA_256, 4096)],
        "frank": [(ScramMechanism.SCRAM_SHA_512, 4096)],
    }
    assert user_lines(d) == {("dave", "SCRAM-SHA-512", "8192"), ("erin", "SCRAM-SHA-256", "4096"),
                             ("frank", "SCRAM-SHA-512", "4096")}
    # as in Kafka, describing a user without credentials is an error for that user
    unknown = a.describe_user_scram_credentials(["nobody"], request_timeout=TIMEOUT)["nobody"]
    with pytest.raises(KafkaException) as exc:
        unknown.result(TIMEOUT)
    assert kafka_error_code(exc.value) == KafkaError.RESOURCE_NOT_FOUND, exc.value

    futs = a.alter_user_scram_credentials([UserScramCredentialDeletion("dave", ScramMechanism.SCRAM_SHA_512)],
                                          request_timeout=TIMEOUT)
    assert futs["dave"].result(TIMEOUT) is None
    assert not authenticates(addr, topic, "SCRAM-SHA-512", "dave", PASSWORD)
    assert not authenticates(addr, topic, "PLAIN", "dave", PASSWORD)
    everyone = a.describe_user_scram_credentials(request_timeout=TIMEOUT).result(TIMEOUT)
    assert set(everyone) == {"erin", "frank"}
    assert user_lines(d) == {("erin", "SCRAM-SHA-256", "4096"), ("frank", "SCRAM-SHA-512", "4096")}


# ---------------------------------------------------------------------------
# 8. certificate reload
# ---------------------------------------------------------------------------

def test_replaced_certificate_files_are_picked_up_without_restart(weir_factory, pki, tmp_path):
    """Replace the server certificate and key on disk with a pair from another CA (and
    another key type): new connections get the new certificate within the reload period,
    and the daemon is never restarted."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copyfile(pki.server.cert, cert)
    shutil.copyfile(pki.server.key, key)
    s = start_secured(weir_factory, [Listener("TLS", "SSL")], tls_section(KeyPair(cert, key)))
    port, addr, topic = s.port("TLS"), s.addr("TLS"), "reload"
    create_topic(s.plain, topic, 1)

    assert tls_works(port, pki.ca)
    assert not tls_works(port, pki.ca2), "a client trusting only the second CA got in before the reload"
    produce_values_confluent(addr, topic, [b"before"], 1, rk_ssl(pki.ca))
    pid, starts = s.daemon.pid, s.daemon.starts

    # atomic replacement of each file, as a certificate manager does
    for src, dst in ((pki.server2.key, key), (pki.server2.cert, cert)):
        tmp = dst.with_suffix(dst.suffix + ".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    wait_until(lambda: tls_works(port, pki.ca2), RELOAD_WAIT_S, interval=0.5,
               message="a client trusting only the new CA to get in")
    assert not tls_works(port, pki.ca), "new connections still get the old certificate"
    produce_values_confluent(addr, topic, [b"after"], 1, rk_ssl(pki.ca2))
    assert all_values(addr, topic, 1, rk_ssl(pki.ca2)) == [b"after", b"before"]
    assert s.daemon.running() and (s.daemon.pid, s.daemon.starts) == (pid, starts), \
        "the daemon was restarted"


# ---------------------------------------------------------------------------
# 9. advertised addresses
# ---------------------------------------------------------------------------

def test_metadata_advertises_the_listener_the_client_used(weir_factory, pki):
    """Metadata and FindCoordinator name the listener the request came in on (or its
    `advertised` address), so clients on each listener stay on it."""
    (elsewhere,) = _pick_free_ports(1)
    s = start_secured(weir_factory, [
        Listener("TLS", "SSL"),
        Listener("SECURE", "SASL_SSL"),
        Listener("EXTERNAL", "PLAINTEXT", advertised=f"localhost:{elsewhere}"),
    ], tls_section(pki.server))
    s.daemon.cli("user", "create", "alice", "--password", PASSWORD)

    with kw.connect(s.plain) as sock:
        assert metadata_brokers(sock) == [(0, "127.0.0.1", s.port("PLAIN"))]
        assert find_coordinator(sock, "g") == (0, "127.0.0.1", s.port("PLAIN"))
    with tls_socket(s.port("TLS"), pki.ca) as sock:
        assert metadata_brokers(sock) == [(0, "127.0.0.1", s.port("TLS"))]
        assert find_coordinator(sock, "g") == (0, "127.0.0.1", s.port("TLS"))
    with kw.connect(s.addr("EXTERNAL")) as sock:
        assert metadata_brokers(sock) == [(0, "localhost", elsewhere)]
        assert find_coordinator(sock, "g") == (0, "localhost", elsewhere)

    # confluent-kafka only works over SASL_SSL if the broker it is sent to is that listener
    conf = rk_sasl("SCRAM-SHA-512", "alice", PASSWORD, pki.ca)
    md = Producer({"bootstrap.servers": s.addr("SECURE"), **fast_producer(conf)}).list_topics(timeout=TIMEOUT)
    assert [(b.id, b.host, b.port) for b in md.brokers.values()] == [(0, "127.0.0.1", s.port("SECURE"))]
    topic = "advertised"
    create_topic(s.plain, topic, 1)
    produce_values_confluent(s.addr("SECURE"), topic, values_for("secure", 5), 1, conf)
    assert group_consume_confluent(s.addr("SECURE"), topic, "advertised", 5, conf) == values_for("secure", 5)


# ---------------------------------------------------------------------------
# a cluster
# ---------------------------------------------------------------------------

def start_sasl_cluster(weir_factory, extra_yaml: str = "") -> tuple[list[WeirDaemon], list[int]]:
    """Three nodes, each with a PLAINTEXT listener first and a SASL_PLAINTEXT one; returns the
    nodes and their SASL ports. The listener ports are fixed in each node's config, so a port
    another process took meanwhile (an outgoing connection's) means starting over with new
    ones, as new nodes."""
    for attempt in range(3):
        raft_ports = _pick_free_ports(3)
        voters = ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(raft_ports))
        nodes, sasl_ports = [], []
        for i in range(3):
            kafka_port, http_port, sasl_port = _pick_free_ports(3)
            yaml = ("raft_heartbeat_ms: 200\nraft_election_timeout_ms: 1500\n"
                    "node_session_timeout_ms: 3000\nmetadata_timeout_ms: 15000\n"
                    + security_yaml([Listener("PLAIN", "PLAINTEXT", port=kafka_port),
                                     Listener("SASL", "SASL_PLAINTEXT", port=sasl_port)], None, extra_yaml))
            name = f"node{i + 1}" + (f"-again{attempt}" if attempt else "")
            d = weir_factory(name, start=False, config_yaml=yaml,
                             extra_args=("--node-id", str(i + 1), "--voters", voters))
            d.kafka_port, d.http_port = kafka_port, http_port
            nodes.append(d)
            sasl_ports.append(sasl_port)
        try:
            with ThreadPoolExecutor(3) as pool:
                for f in [pool.submit(n.start, 60) for n in nodes]:
                    f.result()
            return nodes, sasl_ports
        except DaemonError:
            for n in nodes:
                if n.running():
                    n.kill()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def test_a_cluster_shares_users_and_advertises_each_listener(weir_factory, kcat_bin):
    """A user created through one node logs in on every node's SASL listener (credentials live
    in the Raft metadata), and a SASL client is given every node's SASL address, so it
    reaches partition leaders on other nodes without ever touching a plaintext port."""
    nodes, sasl_ports = start_sasl_cluster(weir_factory)

    nodes[0].cli("user", "create", "alice", "--password", PASSWORD)
    a = admin(nodes[0].bootstrap)
    a.create_topics([NewTopic("shared", num_partitions=3, replication_factor=3)])["shared"].result(30)
    for port in sasl_ports:
        addr = f"127.0.0.1:{port}"
        wait_until(lambda: authenticates(addr, "shared", "SCRAM-SHA-512", "alice", PASSWORD), 30,
                   message=f"alice to log in on {addr}")
        md = json.loads(subprocess.run(
            [kcat_bin, "-b", addr, "-L", "-J", *kcat_args(rk_sasl("SCRAM-SHA-512", "alice", PASSWORD))],
            capture_output=True, timeout=30, check=True).stdout)
        assert sorted(b["name"].rsplit(":", 1)[1] for b in md["brokers"]) == \
            sorted(str(p) for p in sasl_ports), md["brokers"]
    assert not authenticates(f"127.0.0.1:{sasl_ports[2]}", "shared", "PLAIN", "alice", OTHER_PASSWORD)
