"""Pipelines with SQL and HTTP connectors against real databases and a real HTTP server:
PostgreSQL, MariaDB and SQLite sinks (exactly once across kill -9), a PostgreSQL source, and
the HTTP sink. The databases come from WEIR_TEST_POSTGRES_URL / WEIR_TEST_MYSQL_URL (tests/run
sets them, starting throwaway servers when the machine has none)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import psycopg
import pymysql
import pytest
import requests
from confluent_kafka import Producer

from support import create_topic, wait_until
from test_pipelines import pipeline_state, pipelines_daemon, post, read_committed

POSTGRES_URL = os.environ.get("WEIR_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("WEIR_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")


@pytest.fixture
def pg():
    try:
        conn = psycopg.connect(POSTGRES_URL.replace("postgres://", "postgresql://", 1),
                               autocommit=True, connect_timeout=5)
    except Exception as e:  # noqa: BLE001 - the message says what is missing
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} ({e}); tests/run starts a "
                    "throwaway server when none runs, or set WEIR_TEST_POSTGRES_URL", pytrace=False)
    yield conn
    conn.close()


@pytest.fixture
def my():
    u = urlparse(MYSQL_URL)
    try:
        conn = pymysql.connect(host=u.hostname, port=u.port or 3306, user=u.username or "root",
                               password=u.password or "", database=u.path.lstrip("/"),
                               autocommit=True, connect_timeout=5)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"MariaDB/MySQL is not reachable at {MYSQL_URL} ({e}); tests/run starts a "
                    "throwaway server when none runs, or set WEIR_TEST_MYSQL_URL", pytrace=False)
    yield conn
    conn.close()


def table_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def post_orders(weir, path: str, n: int, per_request: int, kill_after: int | None = None):
    """POSTs orders 0..n with idempotency keys, retrying until 200; kills the daemon with -9
    after `kill_after` requests and restarts it."""
    for r in range(0, n // per_request):
        body = b"".join(json.dumps({"order_id": i, "amount": i * 10, "note": f"order {i}"}).encode()
                        + b"\n" for i in range(r * per_request, (r + 1) * per_request))
        if kill_after is not None and r == kill_after:
            weir.kill()
            weir.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = post(weir, path, body, key=f"orders-{r}", timeout=10)
                if resp.status_code == 200:
                    break
                assert resp.status_code in (503, 429), resp.text
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"request {r} never got 200"
            time.sleep(0.1)


def test_orders_into_postgres_exactly_once_across_kill_9(weir_factory, tmp_path, pg):
    """Peak shaving: orders POSTed in bursts land in a topic and drain into PostgreSQL at the
    database's pace. Plain inserts into a table without a key: a repeated batch after the
    kill -9 would show as extra rows."""
    table = table_name("orders")
    # The sink's offsets live in the shared database under the pipeline's name: make it unique.
    name = table.replace("_", "-")
    text = f"""\
name: {name}
source:
  http: {{ path: /ingest/orders, format: ndjson }}
topic: {{ name: orders, partitions: 3, key: order_id }}
sinks:
  - sql:
      url: {POSTGRES_URL}
      table: {table}
      mode: insert
      create_table: true
"""
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **{"orders.yaml": text})
    wait_until(lambda: pipeline_state(weir, name), message="the pipeline to start")
    n = 600
    post_orders(weir, "/ingest/orders", n, 10, kill_after=30)

    def rows():
        try:
            return pg.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0

    wait_until(lambda: rows() >= n, timeout=60, message="the rows to arrive")
    time.sleep(1)
    assert rows() == n, "rows written twice or lost"
    got = pg.execute(f"SELECT order_id, amount FROM {table} ORDER BY order_id").fetchall()
    assert [tuple(r) for r in got] == [(i, i * 10) for i in range(n)]
    # The offsets the sink applied are in the same database: per partition, just past the last
    # record (transaction markers take offsets too).
    applied = dict(pg.execute("SELECT topic_partition, next_offset FROM weir_sink_offsets "
                              "WHERE sink_name = %s", (f"{name}/0",)).fetchall())
    last = {}
    for partition, offset, _, _, _ in read_committed(weir.bootstrap, "orders"):
        last[partition] = offset + 1
    assert applied == last
    pg.execute(f"DROP TABLE {table}")
    pg.execute("DELETE FROM weir_sink_offsets WHERE sink_name = %s", (f"{name}/0",))


def test_topic_into_mariadb_upsert_and_sqlite(weir_factory, tmp_path, my):
    table = table_name("accounts")
    db = tmp_path / "accounts.db"
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    create_topic(weir.bootstrap, "accounts", 2)
    p = Producer({"bootstrap.servers": weir.bootstrap})
    # 100 accounts, then a second version of the first 50: upserts keep the latest.
    for version in (1, 2):
        for i in range(100 if version == 1 else 50):
            p.produce("accounts", key=str(i).encode(),
                      value=json.dumps({"id": i, "balance": i * version, "v": version}).encode())
    assert p.flush(30) == 0
    name = table.replace("_", "-")
    (d / "accounts.yaml").write_text(f"""\
name: {name}
source:
  topic: {{ name: accounts }}
sinks:
  - sql:
      url: {MYSQL_URL}
      table: {table}
      mode: upsert
      key: [id]
      create_table: true
  - sql:
      url: sqlite://{db}
      table: accounts
      mode: upsert
      key: [id]
      create_table: true
""")
    wait_until(lambda: pipeline_state(weir, name), message="the pipeline to start")

    def maria():
        with my.cursor() as c:
            try:
                c.execute(f"SELECT id, balance, v FROM {table} ORDER BY id")
            except pymysql.err.ProgrammingError:
                return []
            return [tuple(r) for r in c.fetchall()]

    want = [(i, i * 2, 2) if i < 50 else (i, i, 1) for i in range(100)]
    wait_until(lambda: maria() == want, timeout=60, message="MariaDB to hold the latest rows")
    import sqlite3

    def lite():
        try:
            with sqlite3.connect(db) as c:
                return [tuple(r) for r in c.execute("SELECT id, balance, v FROM accounts ORDER BY id")]
        except sqlite3.OperationalError:
            return []

    wait_until(lambda: lite() == want, timeout=60, message="SQLite to hold the latest rows")
    with my.cursor() as c:
        c.execute(f"DROP TABLE {table}")
        c.execute("DELETE FROM weir_sink_offsets WHERE sink_name = %s", (f"{name}/0",))


def test_postgres_table_into_a_topic_exactly_once_across_kill_9(weir_factory, tmp_path, pg):
    table = table_name("signups")
    pg.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, email text NOT NULL, "
               f"plan text, created timestamptz NOT NULL DEFAULT now(), extra jsonb)")

    def insert(lo, hi):
        with pg.cursor() as c:
            c.executemany(f"INSERT INTO {table} (email, plan, extra) VALUES (%s, %s, %s)",
                          [(f"user{i}@example.com", "pro" if i % 2 else None,
                            json.dumps({"n": i})) for i in range(lo, hi)])

    insert(0, 100)
    text = f"""\
name: signups
source:
  sql:
    url: {POSTGRES_URL}
    table: {table}
    mode: incrementing
    incrementing_column: id
    poll_interval_ms: 100
    batch_size: 40
topic: {{ name: signups, partitions: 2, key: email }}
"""
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **{"signups.yaml": text})
    wait_until(lambda: len(read_committed(weir.bootstrap, "signups")) >= 100, timeout=60,
               message="the first rows")
    insert(100, 200)
    time.sleep(0.3)
    weir.kill()
    insert(200, 250)
    weir.start()
    wait_until(lambda: len(read_committed(weir.bootstrap, "signups")) >= 250, timeout=60,
               message="every row")
    time.sleep(1)
    got = [json.loads(v) for _, _, _, v, _ in read_committed(weir.bootstrap, "signups")]
    ids = sorted(r["id"] for r in got)
    assert ids == list(range(1, 251)), "rows missing or repeated"
    first = next(r for r in got if r["id"] == 2)
    assert first["email"] == "user1@example.com" and first["plan"] == "pro"
    assert first["extra"] == {"n": 1} and first["created"].endswith(("Z", "+00:00"))
    assert next(r for r in got if r["id"] == 1)["plan"] is None
    pg.execute(f"DROP TABLE {table}")


class Receiver(BaseHTTPRequestHandler):
    """Collects POSTed NDJSON batches; answers 503 to the first `fail_first` requests."""
    batches: list[tuple[str, list[dict]]] = []
    fail_first = 0
    seen = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Receiver.lock:
            Receiver.seen += 1
            failing = Receiver.seen <= Receiver.fail_first
            if not failing:
                Receiver.batches.append((self.headers.get("Idempotency-Key"),
                                         [json.loads(line) for line in body.splitlines() if line]))
        self.send_response(503 if failing else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_sink_retries_with_idempotency_keys(weir_factory, tmp_path):
    Receiver.batches, Receiver.seen, Receiver.fail_first = [], 0, 2
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        weir, d = pipelines_daemon(weir_factory, tmp_path)
        create_topic(weir.bootstrap, "events", 1)
        p = Producer({"bootstrap.servers": weir.bootstrap})
        for i in range(200):
            p.produce("events", value=json.dumps({"n": i}).encode())
        assert p.flush(30) == 0
        (d / "hook.yaml").write_text(f"""\
name: hook
source:
  topic: {{ name: events }}
sinks:
  - http:
      url: http://127.0.0.1:{server.server_port}/hook
      format: ndjson
      batch_size: 50
""")

        def received():
            by_key = {}
            with Receiver.lock:
                for key, records in Receiver.batches:
                    by_key[key] = records
            return sorted(r["n"] for records in by_key.values() for r in records)

        wait_until(lambda: received() == list(range(200)), timeout=60,
                   message="every record delivered")
        assert Receiver.seen > len({k for k, _ in Receiver.batches}), "the 503s were not retried"
        assert all(k for k, _ in Receiver.batches), "every batch carries an Idempotency-Key"
    finally:
        server.shutdown()
