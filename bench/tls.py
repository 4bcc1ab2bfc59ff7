#!/usr/bin/env python3
"""Produce and consume throughput over TLS against plaintext, on one weir node, with the same
standard client (confluent-kafka, i.e. librdkafka) on both listeners.

Usage: bench/tls.py [--weir-bin PATH] [--records N] [--rounds R]

Starts `weir serve` in a scratch directory with a PLAINTEXT and an SSL listener (a throwaway
certificate made with openssl), then for each record size and listener produces N records
(acks=1, lz4 off, linger 5 ms) into a fresh 1-partition topic and reads them back from the
beginning with kcat (librdkafka's consumer, printing nothing, timed as a whole run). Prints
records/s and MB/s; the rounds alternate plaintext and TLS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(d: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", d / "server.key", "-out", d / "server.pem", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)


def produce(conf: dict, topic: str, n: int, size: int) -> float:
    p = Producer({**conf, "acks": "1", "linger.ms": 5, "batch.size": 1 << 20,
                  "queue.buffering.max.messages": 1_000_000})
    value = os.urandom(size)
    start = time.perf_counter()
    for _ in range(n):
        while True:
            try:
                p.produce(topic, value)
                break
            except BufferError:
                p.poll(0.01)
    assert p.flush(60) == 0, "undelivered records"
    return time.perf_counter() - start


def consume(kcat: str, conf: dict, topic: str, n: int) -> float:
    """Reads the topic from the beginning to its end with kcat (librdkafka's consumer, nothing
    printed per record so the client is not the bottleneck): the wall time of the whole run,
    connecting included. A second, untimed read checks that every record is there."""
    cmd = [kcat, "-C", "-b", conf["bootstrap.servers"], "-t", topic, "-p", "0", "-o", "beginning",
           "-e", "-q"]
    for key, value in conf.items():
        if key != "bootstrap.servers":
            cmd += ["-X", f"{key}={value}"]
    start = time.perf_counter()
    subprocess.run([*cmd, "-f", ""], check=True)
    elapsed = time.perf_counter() - start
    read = subprocess.run([*cmd, "-f", "%o\n"], stdout=subprocess.PIPE, check=True).stdout.count(b"\n")
    assert read == n, f"kcat read {read} of {n} records"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weir-bin", default=str(Path.home() / ".cache/weir/target/release/weir"))
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kcat", default=shutil.which("kcat") or "kcat")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="weir-tls-bench-"))
    make_cert(scratch)
    plain, tls, http = free_port(), free_port(), free_port()
    daemon = subprocess.Popen(
        [args.weir_bin, "serve", "--data-dir", str(scratch / "data"), "--http-addr", f"127.0.0.1:{http}",
         "--listener", f"PLAINTEXT://127.0.0.1:{plain}", "--listener", f"SSL://127.0.0.1:{tls}",
         "--tls-cert", str(scratch / "server.pem"), "--tls-key", str(scratch / "server.key")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        listeners = {
            "plaintext": {"bootstrap.servers": f"127.0.0.1:{plain}"},
            "tls": {"bootstrap.servers": f"127.0.0.1:{tls}", "security.protocol": "SSL",
                    "ssl.ca.location": str(scratch / "server.pem")},
        }
        print(f"{'size':>6} {'listener':>10} {'produce rec/s':>14} {'MB/s':>7} {'consume rec/s':>14} {'MB/s':>7}")
        for size in (100, 1024):
            for r in range(args.rounds):
                for name, conf in listeners.items():
                    topic = f"t-{size}-{name}-{r}"
                    tp = produce(conf, topic, args.records, size)
                    tc = consume(args.kcat, conf, topic, args.records)
                    n = args.records
                    print(f"{size:>6} {name:>10} {n / tp:>14,.0f} {n * size / tp / 1e6:>7.1f} "
                          f"{n / tc:>14,.0f} {n * size / tc / 1e6:>7.1f}", flush=True)
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
