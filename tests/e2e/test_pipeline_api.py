"""Pipelines over the HTTP API and `weir pipeline`: PUT writes the file (checked first, written
atomically) and starts the pipeline, DELETE stops it, invalid content is refused with its line
and column while the running version stays, and `weir pipeline validate` works offline."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import requests

from support import run, wait_until
from test_pipelines import (HTTP_PIPELINE, file_status, pipeline_state, pipelines_daemon, post,
                            read_committed)


def api(weir, method: str, path: str, body: str | bytes | None = None,
        content_type: str = "application/yaml") -> requests.Response:
    return requests.request(method, f"{weir.http_url}{path}", data=body,
                            headers={"Content-Type": content_type}, timeout=60)


def daemon(weir_factory, tmp_path: Path):
    return pipelines_daemon(weir_factory, tmp_path)


def test_put_get_delete_a_pipeline(weir_factory, tmp_path):
    weir, d = daemon(weir_factory, tmp_path)
    r = api(weir, "PUT", "/pipelines/activity", HTTP_PIPELINE)
    assert r.status_code == 201, r.text
    assert r.json()["pipeline"]["state"] == "running", r.json()
    # The file is there, with what was sent, and nothing else is left behind.
    assert (d / "activity.yaml").read_text() == HTTP_PIPELINE
    assert sorted(p.name for p in d.iterdir()) == ["activity.yaml"]
    assert post(weir, "/ingest/activity", b'{"user": "a"}\n').status_code == 200
    assert api(weir, "GET", "/pipelines/activity").json()["pipeline"]["name"] == "activity"

    # Invalid content: 400 naming line and column; the file and the running version stay.
    bad = HTTP_PIPELINE.replace("format: ndjson", "formatt: ndjson")
    r = api(weir, "PUT", "/pipelines/activity", bad)
    assert r.status_code == 400, r.text
    assert r.json()["line"] == 5 and "formatt" in r.json()["error"], r.json()
    assert (d / "activity.yaml").read_text() == HTTP_PIPELINE
    assert post(weir, "/ingest/activity", b'{"user": "b"}\n').status_code == 200
    # A name that is not the URL's is refused too.
    r = api(weir, "PUT", "/pipelines/activity", HTTP_PIPELINE.replace("name: activity", "name: x"))
    assert r.status_code == 400 and r.json()["line"] == 1, r.text

    # JSON works as well, and replaces the pipeline (200).
    spec = {"name": "activity", "source": {"http": {"path": "/ingest/v2", "format": "ndjson"}},
            "topic": {"name": "activity", "partitions": 3, "key": "user"}}
    r = api(weir, "PUT", "/pipelines/activity", json.dumps(spec), "application/json")
    assert r.status_code == 200, r.text
    wait_until(lambda: post(weir, "/ingest/v2", b'{"user": "c"}\n').status_code == 200,
               message="the replaced pipeline to serve")
    assert post(weir, "/ingest/activity", b'{"user": "d"}\n').status_code == 404

    r = api(weir, "DELETE", "/pipelines/activity")
    assert r.status_code == 200, r.text
    assert not (d / "activity.yaml").exists()
    assert pipeline_state(weir, "activity") is None
    assert post(weir, "/ingest/v2", b'{"user": "e"}\n').status_code == 404
    assert len(read_committed(weir.bootstrap, "activity")) == 3

    # Unknown names and oversized bodies.
    for method, path in (("GET", "/pipelines/nope"), ("DELETE", "/pipelines/nope"),
                         ("POST", "/pipelines/nope/restart")):
        r = api(weir, method, path)
        assert r.status_code == 404 and "nope" in r.json()["error"], (method, r.text)
    r = api(weir, "PUT", "/pipelines/big", "#" * (2 << 20))
    assert r.status_code == 413, r.text
    r = api(weir, "PUT", "/pipelines/bad%2Fname", HTTP_PIPELINE)
    assert r.status_code == 400, r.text


def test_concurrent_puts_of_one_name_are_serialised(weir_factory, tmp_path):
    weir, d = daemon(weir_factory, tmp_path)
    bodies = [HTTP_PIPELINE.replace("/ingest/activity", f"/ingest/v{i}") for i in range(6)]
    codes = []

    def put(body):
        codes.append(api(weir, "PUT", "/pipelines/activity", body).status_code)

    threads = [threading.Thread(target=put, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(codes) == [200] * 5 + [201], codes
    final = (d / "activity.yaml").read_text()
    assert final in bodies
    assert sorted(p.name for p in d.iterdir()) == ["activity.yaml"]
    # The one running is the one in the file.
    path = final.split("path: ")[1].split("\n")[0]
    assert post(weir, path, b'{"user": "a"}\n').status_code == 200
    assert file_status(weir, "activity.yaml")["invalid"] is None


def test_validate_and_the_cli(weir_factory, tmp_path, weir_bin):
    weir, d = daemon(weir_factory, tmp_path)
    r = api(weir, "POST", "/pipelines/validate", HTTP_PIPELINE.replace("path: /ingest", "path: ingest"))
    assert r.status_code == 400 and r.json()["line"] == 4 and "source.http.path" in r.json()["error"], r.text
    r = api(weir, "POST", "/pipelines/validate", HTTP_PIPELINE)
    assert r.status_code == 200 and r.json() == {"valid": True, "name": "activity"}, r.text

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(HTTP_PIPELINE)
    bad.write_text(HTTP_PIPELINE + "transforms:\n  - plugin: missing.wasm\n")
    # Offline: no daemon involved.
    res = run([weir_bin, "pipeline", "validate", str(good)])
    assert "pipeline 'activity' is valid" in res.stdout.decode()
    res = subprocess.run([weir_bin, "pipeline", "validate", str(bad)], capture_output=True, timeout=60)
    assert res.returncode != 0
    assert f"{bad}:11:5: transforms[0].plugin" in res.stderr.decode(), res.stderr.decode()

    url = ("--url", weir.http_url)
    res = run([weir_bin, "pipeline", "apply", str(good), *url])
    assert "pipeline 'activity' applied" in res.stdout.decode()
    assert (d / "activity.yaml").read_text() == HTTP_PIPELINE
    res = subprocess.run([weir_bin, "pipeline", "apply", str(bad), *url], capture_output=True,
                         timeout=60)
    assert res.returncode != 0 and "transforms[0].plugin" in res.stderr.decode()
    listing = run([weir_bin, "pipeline", "list", *url]).stdout.decode()
    assert "activity" in listing and "running" in listing, listing
    status = json.loads(run([weir_bin, "pipeline", "status", "activity", *url]).stdout)
    assert status["pipeline"]["state"] == "running"
    assert post(weir, "/ingest/activity", b'{"user": "a"}\n').status_code == 200
    run([weir_bin, "pipeline", "restart", "activity", *url])
    wait_until(lambda: post(weir, "/ingest/activity", b'{"user": "b"}\n').status_code == 200,
               message="the restarted pipeline to serve")
    # Exactly once across the restart: two posts, two records.
    assert len(read_committed(weir.bootstrap, "activity")) == 2
    run([weir_bin, "pipeline", "delete", "activity", *url])
    assert not (d / "activity.yaml").exists()
    res = subprocess.run([weir_bin, "pipeline", "delete", "activity", *url], capture_output=True,
                         timeout=60)
    assert res.returncode != 0 and "no pipeline named 'activity'" in res.stderr.decode()


def test_a_node_without_a_pipelines_directory_says_so(weir):
    r = api(weir, "PUT", "/pipelines/activity", HTTP_PIPELINE)
    assert r.status_code == 409 and "--pipelines" in r.json()["error"], r.text


COPY = """\
name: copy
source:
  topic: { name: cin }
topic: { name: cout }
"""


def test_pause_and_resume_keep_exactly_once_across_a_restart(weir_factory, tmp_path, weir_bin):
    from confluent_kafka import Producer
    weir, d = daemon(weir_factory, tmp_path)
    url = ("--url", weir.http_url)
    assert api(weir, "PUT", "/pipelines/copy", COPY).status_code == 201
    assert api(weir, "PUT", "/pipelines/activity", HTTP_PIPELINE).status_code == 201

    def produce(lo, hi):
        p = Producer({"bootstrap.servers": weir.bootstrap})
        for i in range(lo, hi):
            p.produce("cin", value=f"c{i}".encode())
        assert p.flush(30) == 0

    def copied():
        return sorted(v for _, _, _, v, _ in read_committed(weir.bootstrap, "cout"))

    produce(0, 100)
    wait_until(lambda: len(copied()) == 100, 30, message="the first records to be copied")
    run([weir_bin, "pipeline", "pause", "copy", *url])
    run([weir_bin, "pipeline", "pause", "activity", *url])
    assert pipeline_state(weir, "copy")["state"] == "paused"
    r = post(weir, "/ingest/activity", b'{"user": "a"}\n')
    assert r.status_code == 503 and "paused" in r.json()["error"], r.text
    produce(100, 200)
    time.sleep(2)
    assert len(copied()) == 100  # nothing flows while paused
    # Paused stays paused across a daemon restart.
    weir.stop()
    weir.start()
    wait_until(lambda: (pipeline_state(weir, "copy") or {}).get("state") == "paused", 30,
               message="the pipeline to be paused after the restart")
    time.sleep(1)
    assert len(copied()) == 100
    run([weir_bin, "pipeline", "resume", "copy", *url])
    run([weir_bin, "pipeline", "resume", "activity", *url])
    wait_until(lambda: len(copied()) >= 200, 30, message="the copy to resume")
    assert copied() == sorted(f"c{i}".encode() for i in range(200))
    assert post(weir, "/ingest/activity", b'{"user": "b"}\n').status_code == 200
