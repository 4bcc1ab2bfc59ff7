"""Pipelines: YAML files in a watched directory, the HTTP source, topic-to-topic pipelines,
errors naming file/line/field, hot reload, and exactly-once output across kill -9."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from support import create_topic, wait_until


def pipelines_daemon(weir_factory, tmp_path: Path, name: str = "weir", **files: str):
    d = tmp_path / "pipelines"
    d.mkdir(exist_ok=True)
    for fname, text in files.items():
        (d / fname).write_text(text)
    return weir_factory(name, extra_args=("--pipelines", str(d))), d


def statuses(weir) -> list[dict]:
    r = requests.get(f"{weir.http_url}/pipelines", timeout=5)
    r.raise_for_status()
    return r.json()["pipelines"]


def pipeline_state(weir, name: str) -> dict | None:
    for f in statuses(weir):
        p = f.get("pipeline")
        if p and p["name"] == name:
            return p
    return None


def file_status(weir, fname: str) -> dict | None:
    for f in statuses(weir):
        if f["file"].endswith(fname):
            return f
    return None


def read_committed(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple]:
    """Every committed record of a topic, as (partition, offset, key, value, headers)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "weir-e2e-reader",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out, at_end = [], set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(parts):
            assert time.monotonic() < deadline, f"no end of {topic}"
            for m in c.consume(1000, timeout=0.5):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                        continue
                    raise AssertionError(str(m.error()))
                at_end.discard(m.partition())
                out.append((m.partition(), m.offset(), m.key(), m.value(), m.headers() or []))
        return sorted(out)
    finally:
        c.close()


HTTP_PIPELINE = """\
name: activity
source:
  http:
    path: /ingest/activity
    format: ndjson
topic:
  name: activity
  partitions: 3
  key: user
"""


def post(weir, path: str, body: bytes, key: str | None = None, timeout: float = 30) -> requests.Response:
    headers = {"Content-Type": "application/x-ndjson"}
    if key:
        headers["Idempotency-Key"] = key
    return requests.post(f"{weir.http_url}{path}", data=body, headers=headers, timeout=timeout)


def test_http_source_writes_records_keyed_and_answers_after_commit(weir_factory, tmp_path):
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": HTTP_PIPELINE})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    body = b"".join(json.dumps({"user": f"u{i % 5}", "n": i}).encode() + b"\n" for i in range(100))
    r = post(weir, "/ingest/activity", body)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 100}
    got = read_committed(weir.bootstrap, "activity")
    assert len(got) == 100
    # The key is the user field, so each user's records share one partition, in order.
    by_user: dict[bytes, set[int]] = {}
    for p, _, key, value, _ in got:
        by_user.setdefault(key, set()).add(p)
        assert json.loads(value)["user"].encode() == key
    assert all(len(ps) == 1 for ps in by_user.values())
    status = pipeline_state(weir, "activity")
    assert status["state"] == "running" and status["records_in"] == 100
    alone = requests.get(f"{weir.http_url}/pipelines/activity/status", timeout=10)
    assert alone.status_code == 200 and alone.json()["tasks"] == {"source": "running"}, alone.text
    missing = requests.get(f"{weir.http_url}/pipelines/nope/status", timeout=10)
    assert missing.status_code == 404 and "no pipeline named 'nope'" in missing.json()["error"]


def test_http_source_rejects_bad_input_with_clear_answers(weir_factory, tmp_path):
    text = HTTP_PIPELINE.replace("format: ndjson", "format: ndjson\n    max_body_bytes: 1000")
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": text})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    r = post(weir, "/ingest/activity", b'{"user": "a"}\n{"user": oops}\n')
    assert r.status_code == 400 and "line 2" in r.json()["error"], r.text
    r = post(weir, "/ingest/activity", b'{"user": "a"}\n' * 200)
    assert r.status_code == 413, r.text
    r = requests.get(f"{weir.http_url}/ingest/activity", timeout=5)
    assert r.status_code == 405
    r = post(weir, "/ingest/nothing-here", b"{}")
    assert r.status_code == 404
    # Nothing of the refused requests was written.
    assert read_committed(weir.bootstrap, "activity") == []


def test_idempotency_key_makes_a_retry_land_once_even_across_kill_9(weir_factory, tmp_path):
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": HTTP_PIPELINE})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    body = b'{"user": "a", "n": 1}\n{"user": "b", "n": 2}\n'
    assert post(weir, "/ingest/activity", body, key="req-1").status_code == 200
    assert post(weir, "/ingest/activity", body, key="req-1").status_code == 200
    weir.kill()
    weir.start()
    wait_until(lambda: (pipeline_state(weir, "activity") or {}).get("state") == "running",
               message="the pipeline to restart")
    assert post(weir, "/ingest/activity", body, key="req-1").status_code == 200
    assert post(weir, "/ingest/activity", body, key="req-2").status_code == 200
    assert len(read_committed(weir.bootstrap, "activity")) == 4


def test_http_ingest_under_kill_9_loses_and_duplicates_nothing(weir_factory, tmp_path):
    """Clients POST numbered records with idempotency keys and retry until they get 200,
    while the daemon is killed with -9: afterwards each record is in the topic exactly once."""
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": HTTP_PIPELINE})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    n_requests, per_request = 120, 5
    done = threading.Event()
    errors: list[str] = []

    def client(first: int, step: int):
        for i in range(first, n_requests, step):
            body = b"".join(json.dumps({"user": f"u{i}", "n": i * per_request + j}).encode() + b"\n"
                            for j in range(per_request))
            deadline = time.monotonic() + 120
            while True:
                try:
                    r = post(weir, "/ingest/activity", body, key=f"k{i}", timeout=10)
                    if r.status_code == 200:
                        break
                    if r.status_code not in (503, 429):
                        errors.append(f"request {i}: {r.status_code} {r.text}")
                        return
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    errors.append(f"request {i}: no 200 within 120 s")
                    return
                time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(k, 3)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    weir.kill()
    weir.start()
    for t in threads:
        t.join(180)
    done.set()
    assert not errors, errors[:5]
    values = [json.loads(v)["n"] for _, _, _, v, _ in read_committed(weir.bootstrap, "activity")]
    assert len(values) == len(set(values)), "a record was written twice"
    assert sorted(values) == list(range(n_requests * per_request)), "records are missing"


def test_invalid_file_is_reported_and_the_running_version_kept(weir_factory, tmp_path):
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": HTTP_PIPELINE})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    (d / "activity.yaml").write_text(HTTP_PIPELINE.replace("format: ndjson", "formatt: ndjson"))
    status = wait_until(lambda: (file_status(weir, "activity.yaml") or {}).get("invalid"),
                        message="the invalid file to be reported")
    assert "activity.yaml:5:" in status and "formatt" in status, status
    # The previous version still serves.
    assert post(weir, "/ingest/activity", b'{"user": "a"}\n').status_code == 200
    assert "formatt" in weir.log_tail(200)
    # A broken new file names its field too, and does not disturb the others.
    (d / "broken.yaml").write_text("name: broken\nsource:\n  http:\n    path: no-slash\ntopic: { name: x }\n")
    status = wait_until(lambda: (file_status(weir, "broken.yaml") or {}).get("invalid"),
                        message="the broken file to be reported")
    assert "broken.yaml:4:" in status and "source.http.path" in status, status


def test_hot_reload_changes_and_removes_pipelines(weir_factory, tmp_path):
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": HTTP_PIPELINE})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    assert post(weir, "/ingest/activity", b'{"user": "a"}\n').status_code == 200
    # Changing the file restarts the pipeline with the new settings, without a daemon restart.
    (d / "activity.yaml").write_text(HTTP_PIPELINE.replace("/ingest/activity", "/ingest/v2"))
    wait_until(lambda: post(weir, "/ingest/v2", b'{"user": "b"}\n').status_code == 200,
               message="the new path to serve")
    assert post(weir, "/ingest/activity", b'{"user": "c"}\n').status_code == 404
    (d / "activity.yaml").unlink()
    wait_until(lambda: pipeline_state(weir, "activity") is None, message="the pipeline to stop")
    assert post(weir, "/ingest/v2", b'{"user": "d"}\n').status_code == 404
    assert len(read_committed(weir.bootstrap, "activity")) == 2
    assert weir.starts == 1


def test_topic_to_topic_pipeline_is_exactly_once_across_kill_9(weir_factory, tmp_path):
    """A pipeline copies `orders` into `orders-copy` (a topic sink) while a producer keeps
    writing and the daemon is killed with -9: the copy holds every input record once."""
    text = """\
name: copy
source:
  topic: { name: orders }
sinks:
  - topic: { name: orders-copy, partitions: 2 }
"""
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    create_topic(weir.bootstrap, "orders", 2)
    (d / "copy.yaml").write_text(text)
    wait_until(lambda: pipeline_state(weir, "copy"), message="the pipeline to start")
    n = 3000

    def produce(start: int, stop: int):
        p = Producer({"bootstrap.servers": weir.bootstrap, "enable.idempotence": True,
                      "linger.ms": 5, "message.timeout.ms": 60000})
        for i in range(start, stop):
            p.produce("orders", key=f"o{i}".encode(), value=f"order-{i}".encode())
            p.poll(0)
        assert p.flush(60) == 0

    produce(0, n // 2)
    time.sleep(0.3)
    weir.kill()
    weir.start()
    produce(n // 2, n)
    want = sorted(f"order-{i}".encode() for i in range(n))
    wait_until(lambda: len(read_committed(weir.bootstrap, "orders-copy")) >= n, timeout=60,
               message="the copy to catch up")
    got = sorted(v for _, _, _, v, _ in read_committed(weir.bootstrap, "orders-copy"))
    assert got == want
    # The sink's consumer group shows its position (lag 0 once caught up).
    def lag():
        out = weir.cli("group", "describe", "weir-pipeline-copy-sink-0", "--format", "json").stdout
        rows = json.loads(out)["offsets"]
        return len(rows) == 2 and sum(r["lag"] for r in rows) == 0

    wait_until(lag, message="the sink group's lag to reach 0")


def test_sink_failure_goes_to_dead_letters_or_stops_the_pipeline(weir_factory, tmp_path):
    """A record the output topic refuses (no JSON object for topic.key) goes to the dead-letter
    topic with headers naming the pipeline, stage and error (tolerance all), or stops the
    pipeline with the reason (tolerance none)."""
    tolerant = HTTP_PIPELINE.replace("key: user", "key: user\nerrors:\n  tolerance: all\n")
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": tolerant})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    r = post(weir, "/ingest/activity", b'{"user": "a"}\n[1, 2]\n{"user": "b"}\n')
    assert r.status_code == 200, r.text
    assert len(read_committed(weir.bootstrap, "activity")) == 2
    dead = wait_until(lambda: read_committed(weir.bootstrap, "activity.dlq"), message="a dead letter")
    assert len(dead) == 1
    _, _, _, value, headers = dead[0]
    assert value == b"[1,2]"
    h = {k: v.decode() for k, v in headers}
    assert h["weir.pipeline"] == "activity" and h["weir.stage"] == "topic"
    assert "JSON object" in h["weir.error"]

    strict = HTTP_PIPELINE.replace("name: activity", "name: strict").replace(
        "/ingest/activity", "/ingest/strict").replace("name: activity\n  partitions", "name: strict\n  partitions")
    (d / "strict.yaml").write_text(strict)
    wait_until(lambda: pipeline_state(weir, "strict"), message="the strict pipeline to start")
    r = post(weir, "/ingest/strict", b'[1, 2]\n')
    assert r.status_code == 503
    state = wait_until(lambda: (pipeline_state(weir, "strict") or {}).get("state") == "failed"
                       and pipeline_state(weir, "strict"), message="the pipeline to stop")
    assert "JSON object" in state["error"]


def test_log_file_pipeline_survives_rotation_and_kill_9(weir_factory, tmp_path):
    """Log ingestion: a file source follows access.log through a rename+create rotation and a
    kill -9 of the daemon; the topic and the file sink hold every line exactly once."""
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    out.mkdir()
    text = f"""\
name: access
source:
  file:
    paths: ["{logs}/access.log*"]
    format: lines
topic:
  name: access
  partitions: 2
sinks:
  - file:
      path: {out}/access.txt
      format: lines
"""
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"access.yaml": text})
    wait_until(lambda: pipeline_state(weir, "access"), message="the pipeline to start")
    n = 3000
    log = logs / "access.log"

    def write(lo, hi):
        with open(log, "a") as f:
            for i in range(lo, hi):
                f.write(f"GET /page/{i} 200\n")
                if i % 100 == 0:
                    f.flush()
                    time.sleep(0.01)

    write(0, 1000)
    log.rename(logs / "access.log.1")
    write(1000, 1500)
    weir.kill()
    write(1500, 2000)
    weir.start()
    write(2000, n)
    want = sorted(f"GET /page/{i} 200".encode() for i in range(n))

    def sink_lines():
        return sorted(line for p in out.glob("access*.txt") for line in p.read_bytes().splitlines())

    wait_until(lambda: len(sink_lines()) >= n, timeout=60, message="the file sink to catch up")
    assert sorted(v for _, _, _, v, _ in read_committed(weir.bootstrap, "access")) == want
    got = sink_lines()
    assert len(got) == len(set(got)), "the sink wrote a line twice"
    assert got == want


def test_bad_ndjson_line_goes_to_dead_letters_once(weir_factory, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events.ndjson").write_text('{"user": "a"}\n{"user": oops\n{"user": "b"}\n')
    text = f"""\
name: events
source:
  file:
    paths: ["{logs}/*.ndjson"]
    format: ndjson
topic: {{ name: events }}
errors: {{ tolerance: all }}
"""
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"events.yaml": text})
    wait_until(lambda: len(read_committed(weir.bootstrap, "events")) == 2, timeout=30,
               message="the good records")
    dead = wait_until(lambda: read_committed(weir.bootstrap, "events.dlq"), message="a dead letter")
    assert len(dead) == 1
    _, _, _, value, headers = dead[0]
    assert value == b'{"user": oops'
    h = {k: v.decode() for k, v in headers}
    assert h["weir.stage"] == "source" and "events.ndjson:2" in h["weir.error"], h
    # Restarting does not meet the bad line again: its offset was committed with the letter.
    weir.kill()
    weir.start()
    wait_until(lambda: (pipeline_state(weir, "events") or {}).get("state") == "running",
               message="the pipeline to restart")
    time.sleep(1.5)
    assert len(read_committed(weir.bootstrap, "events.dlq")) == 1
    assert len(read_committed(weir.bootstrap, "events")) == 2


def test_example_pipelines(weir_factory, tmp_path, monkeypatch):
    """The pipelines shipped in pipelines/ run as documented."""
    logs, archive = tmp_path / "logs", tmp_path / "archive"
    logs.mkdir()
    monkeypatch.setenv("WEIR_LOG_DIR", str(logs))
    monkeypatch.setenv("WEIR_ARCHIVE_DIR", str(archive))
    orders_db = tmp_path / "orders.db"
    monkeypatch.setenv("WEIR_ORDERS_DB", f"sqlite://{orders_db}")
    examples = Path(__file__).resolve().parents[2] / "pipelines"
    files = {p.name: p.read_text() for p in examples.glob("*.yaml")}
    assert {"user-activity.yaml", "service-logs.yaml", "orders.yaml"} <= set(files)
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **files)
    for name in ("user-activity", "service-logs", "orders"):
        wait_until(lambda: (pipeline_state(weir, name) or {}).get("state") == "running",
                   message=f"{name} to run")
    assert not [f for f in statuses(weir) if f.get("invalid")]

    events = b"".join(json.dumps({"user_id": f"u{i % 3}", "page": f"/p/{i}"}).encode() + b"\n"
                      for i in range(30))
    assert post(weir, "/ingest/activity", events, key="example-1").status_code == 200
    (logs / "api.log").write_text("".join(f"api line {i}\n" for i in range(20)))
    (logs / "web.log").write_text("".join(f"web line {i}\n" for i in range(20)))

    def archived(pattern):
        return sorted(line for p in archive.glob(pattern) for line in p.read_bytes().splitlines())

    wait_until(lambda: len(archived("user-activity*.ndjson")) == 30, message="the activity archive")
    wait_until(lambda: len(archived("service-logs*.txt")) == 40, message="the log archive")
    assert {json.loads(line)["page"] for line in archived("user-activity*.ndjson")} == \
        {f"/p/{i}" for i in range(30)}

    # Orders: a burst, then a correction of order 3 (upsert keeps the latest).
    orders = [{"order_id": i, "total": i * 1.5, "items": [{"sku": f"s{i}"}]} for i in range(50)]
    r = requests.post(f"{weir.http_url}/ingest/orders", json=orders, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.post(f"{weir.http_url}/ingest/orders", json={"order_id": 3, "total": 99.0,
                                                              "items": []}, timeout=30)
    assert r.status_code == 200, r.text
    import sqlite3

    def rows():
        try:
            with sqlite3.connect(orders_db) as c:
                return c.execute("SELECT order_id, total FROM orders ORDER BY order_id").fetchall()
        except sqlite3.OperationalError:
            return []

    wait_until(lambda: len(rows()) == 50 and dict(rows())[3] == 99.0, timeout=30,
               message="the orders in the database")


def test_a_refused_plugin_leaves_the_running_version(weir_factory, tmp_path):
    """Pointing a running pipeline at a module weir refuses reports the file, line and field,
    and the previous version keeps serving."""
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"activity.yaml": HTTP_PIPELINE})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    (d / "junk.wasm").write_bytes(b"\0asm this is not a module")
    (d / "activity.yaml").write_text(HTTP_PIPELINE + "transforms:\n  - plugin: junk.wasm\n")
    status = wait_until(lambda: (file_status(weir, "activity.yaml") or {}).get("invalid"),
                        message="the refused module to be reported")
    assert "activity.yaml:11:5: transforms[0].plugin: " in status, status
    assert file_status(weir, "activity.yaml")["pipeline"]["state"] == "running"
    assert post(weir, "/ingest/activity", b'{"user": "a"}\n').status_code == 200
    # Fixing the file brings the new version up.
    (d / "activity.yaml").write_text(HTTP_PIPELINE.replace("/ingest/activity", "/ingest/v2"))
    wait_until(lambda: post(weir, "/ingest/v2", b'{"user": "b"}\n').status_code == 200,
               message="the fixed version to serve")
    assert file_status(weir, "activity.yaml")["invalid"] is None


def test_a_file_refused_for_a_conflict_starts_once_the_other_goes(weir_factory, tmp_path):
    """`cp a.yaml b.yaml; rm a.yaml` moves a pipeline; a second file on the same HTTP path
    starts once the path is free. Both conflicts name the file, line and field."""
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"a.yaml": HTTP_PIPELINE})
    wait_until(lambda: pipeline_state(weir, "activity"), message="the pipeline to start")
    (d / "b.yaml").write_text(HTTP_PIPELINE)
    status = wait_until(lambda: (file_status(weir, "b.yaml") or {}).get("invalid"),
                        message="the name conflict to be reported")
    assert "b.yaml:1:1: name: 'activity' is already the name of the pipeline in" in status, status
    assert "a.yaml" in status, status
    (d / "a.yaml").unlink()
    wait_until(lambda: (file_status(weir, "b.yaml") or {}).get("pipeline"),
               message="b.yaml to take the pipeline over")
    assert file_status(weir, "b.yaml")["invalid"] is None
    assert post(weir, "/ingest/activity", b'{"user": "a"}\n').status_code == 200

    (d / "c.yaml").write_text(HTTP_PIPELINE.replace("name: activity", "name: other"))
    status = wait_until(lambda: (file_status(weir, "c.yaml") or {}).get("invalid"),
                        message="the path conflict to be reported")
    assert "c.yaml:4:5: source.http.path: /ingest/activity is already served by pipeline " \
           "'activity'" in status, status
    (d / "b.yaml").unlink()
    wait_until(lambda: pipeline_state(weir, "other"), message="c.yaml to start once the path is free")
    assert post(weir, "/ingest/activity", b'{"user": "b"}\n').status_code == 200


def test_null_header_values_stay_null_through_a_pipeline(weir_factory, tmp_path):
    """Kafka tells a null header value from an empty one; a topic-to-topic pipeline and a
    topic sink keep the difference."""
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    create_topic(weir.bootstrap, "hin", 1)
    (d / "copy.yaml").write_text("""\
name: copy
source:
  topic: { name: hin }
topic: { name: hmid }
sinks:
  - topic: { name: hout }
""")
    wait_until(lambda: pipeline_state(weir, "copy"), message="the pipeline to start")
    p = Producer({"bootstrap.servers": weir.bootstrap})
    p.produce("hin", value=b"v", headers=[("nullh", None), ("empty", b""), ("x", b"1")])
    assert p.flush(30) == 0
    want = [("nullh", None), ("empty", b""), ("x", b"1")]
    for topic in ("hmid", "hout"):
        got = wait_until(lambda: read_committed(weir.bootstrap, topic), timeout=30,
                         message=f"the record in {topic}")
        assert [h for h in got[0][4] if not h[0].startswith("weir.")] == want, (topic, got)


def test_a_benchmark_daemon_loads_no_pipelines(weir_bin, tmp_path):
    """`weir bench` run where ./pipelines exists (the repository root) starts its daemon
    without those pipelines."""
    out = tmp_path / "probe-out"
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "probe.yaml").write_text(f"""\
name: probe
source:
  topic: {{ name: probe }}
sinks:
  - file: {{ path: {out}/probe.txt }}
""")
    import subprocess
    res = subprocess.run([weir_bin, "bench", "--records", "2000", "--disk-baseline-mib", "0"],
                         cwd=tmp_path, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert not out.exists(), list(out.iterdir())
