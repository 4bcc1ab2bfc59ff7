"""WASM transforms inside pipelines: the example plugins (built from source by tests/run into
$WEIR_PLUGIN_DIR) parsing access logs, hostile plugins contained with their records in the
dead-letter topic, bad modules reported while the daemon and other pipelines keep running,
hot reload of a changed module, and a topic-to-topic transform that is exactly once across
kill -9."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import requests
from confluent_kafka import Producer

from support import create_topic, wait_until
from test_metrics import scrape, total, value
from test_pipelines import (file_status, pipeline_state, pipelines_daemon, post,
                            read_committed)


@pytest.fixture(scope="session")
def plugin_dir() -> Path:
    d = os.environ.get("WEIR_PLUGIN_DIR")
    if not d or not list(Path(d).glob("*.wasm")):
        pytest.fail("WEIR_PLUGIN_DIR does not hold the built example plugins: tests/run builds "
                    "them with `weir plugin build plugins-sdk/examples`", pytrace=False)
    return Path(d)


def install(plugin_dir: Path, pipelines: Path, name: str, as_name: str | None = None) -> str:
    """Copies a built plugin next to the pipeline files; returns the path to write in YAML."""
    (pipelines / "plugins").mkdir(parents=True, exist_ok=True)
    dest = pipelines / "plugins" / (as_name or f"{name}.wasm")
    shutil.copy(plugin_dir / f"{name}.wasm", dest.with_suffix(".tmp"))
    os.replace(dest.with_suffix(".tmp"), dest)  # atomic: the watcher never sees half a module
    return f"plugins/{dest.name}"


ACCESS_LINES = [
    '203.0.113.9 - alice [10/Oct/2023:13:55:36 -0700] "GET /index.html HTTP/1.1" 200 2326 "-" "curl/8"',
    '198.51.100.7 - - [10/Oct/2023:13:55:37 -0700] "POST /login HTTP/1.1" 302 0 "-" "Mozilla/5.0"',
    'this is not an access log line',
    '203.0.113.9 - alice [10/Oct/2023:13:55:38 -0700] "GET /cart HTTP/1.1" 404 12 "-" "curl/8"',
]


def test_access_log_lines_parsed_by_a_plugin_keyed_by_client(weir_factory, tmp_path, plugin_dir):
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    plugin = install(plugin_dir, d, "access_log")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "access.log").write_text("".join(line + "\n" for line in ACCESS_LINES))
    (d / "nginx.yaml").write_text(f"""\
name: nginx-access
source:
  file: {{ paths: ["{logs}/access.log*"] }}
transforms:
  - plugin: {plugin}
topic: {{ name: nginx-access, partitions: 3, key: remote_addr }}
errors: {{ tolerance: all }}
""")
    got = wait_until(lambda: len(read_committed(weir.bootstrap, "nginx-access")) == 3
                     and read_committed(weir.bootstrap, "nginx-access"), message="parsed lines")
    parsed = [json.loads(v) for _, _, _, v, _ in got]
    assert sorted(p["path"] for p in parsed) == ["/cart", "/index.html", "/login"]
    by_key = {k.decode() for _, _, k, _, _ in got}
    assert by_key == {"203.0.113.9", "198.51.100.7"}
    dead = wait_until(lambda: read_committed(weir.bootstrap, "nginx-access.dlq"), message="a dead letter")
    assert len(dead) == 1 and dead[0][3] == b"this is not an access log line"
    h = {k: v.decode() for k, v in dead[0][4]}
    assert h["weir.stage"] == "transforms[0]" and "plugin-error" in h["weir.error"], h


def test_hostile_plugins_are_contained(weir_factory, tmp_path, plugin_dir):
    """Records that make the plugin panic, loop, exhaust memory or overflow its stack go to the
    dead-letter topic with the reason; the records around them go through; another pipeline
    keeps running; a pipeline that stops on errors says why."""
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    plugin = install(plugin_dir, d, "hostile")
    (d / "hostile.yaml").write_text(f"""\
name: hostile
source:
  http: {{ path: /ingest/hostile, format: lines }}
transforms:
  - plugin: {plugin}
topic: {{ name: hostile }}
errors: {{ tolerance: all }}
""")
    (d / "other.yaml").write_text("""\
name: other
source:
  http: { path: /ingest/other, format: lines }
topic: { name: other }
""")
    wait_until(lambda: pipeline_state(weir, "hostile") and pipeline_state(weir, "other"),
               message="both pipelines to start")
    body = b"ok-1\npanic\nok-2\nloop\noom\nrecurse\nok-3\nerror\n"
    r = post(weir, "/ingest/hostile", body, timeout=120)
    assert r.status_code == 200, r.text
    assert [v for _, _, _, v, _ in read_committed(weir.bootstrap, "hostile")] == [b"ok-1", b"ok-2", b"ok-3"]
    dead = {v.decode(): {k: x.decode() for k, x in h}["weir.error"]
            for _, _, _, v, h in read_committed(weir.bootstrap, "hostile.dlq")}
    assert set(dead) == {"panic", "loop", "oom", "recurse", "error"}
    assert dead["panic"].startswith("panic") and dead["loop"].startswith("cpu-budget")
    assert dead["oom"].startswith("memory-limit") and dead["error"].startswith("plugin-error")
    assert post(weir, "/ingest/other", b"still here\n").status_code == 200
    assert weir.running()
    # The dead letters through the API, with their reasons.
    api = requests.get(f"{weir.http_url}/pipelines/hostile/dead-letters", timeout=10).json()
    assert api["topic"] == "hostile.dlq"
    listed = {r["value"]: dict(r["headers"])["weir.error"]
              for p in api["partitions"] for r in p["records"]}
    assert listed == dead
    # The plugin's metrics: every record in, three out, the faults by kind.
    m = scrape(weir)
    labels = {"pipeline": "hostile", "plugin": "hostile"}
    assert value(m, "weir_plugin_records_in_total", **labels) == 8
    assert value(m, "weir_plugin_records_out_total", **labels) == 3
    assert total(m, "weir_plugin_faults_total", **labels) == 5
    assert value(m, "weir_plugin_faults_total", kind="cpu-budget", **labels) == 1
    assert value(m, "weir_plugin_restarts_total", **labels) >= 3
    # The endless loop alone used up a call's budget (100M + 10M a record, one record).
    assert value(m, "weir_plugin_fuel_consumed_total", **labels) >= 110_000_000
    # The same through the HTTP API, for the console's plugins page.
    listed = requests.get(f"{weir.http_url}/plugins", timeout=10).json()
    (mine,) = [p for p in listed["plugins"] if p["pipeline"] == "hostile"]
    assert mine["plugin"] == "hostile" and mine["stage"] == "transforms[0]", mine
    assert mine["path"].endswith("hostile.wasm") and mine["state"] == "running", mine
    assert (mine["records_in"], mine["records_out"]) == (8, 3), mine
    assert mine["faults"]["cpu-budget"] == 1 and sum(mine["faults"].values()) == 5, mine
    assert mine["fuel"] >= 110_000_000 and mine["restarts"] >= 3, mine
    assert listed["host"]["compiled"] + listed["host"]["from_disk_cache"] >= 1, listed

    # With tolerance none the pipeline stops and shows the reason.
    (d / "strict.yaml").write_text((d / "hostile.yaml").read_text()
                                   .replace("name: hostile", "name: strict")
                                   .replace("/ingest/hostile", "/ingest/strict")
                                   .replace("topic: { name: hostile }", "topic: { name: strict }")
                                   .replace("errors: { tolerance: all }", ""))
    wait_until(lambda: pipeline_state(weir, "strict"), message="the strict pipeline")
    assert post(weir, "/ingest/strict", b"panic\n", timeout=60).status_code == 503
    state = wait_until(lambda: (pipeline_state(weir, "strict") or {}).get("state") == "failed"
                       and pipeline_state(weir, "strict"), message="the strict pipeline to stop")
    assert "panic" in state["error"]
    # Its one task, the source, failed; GET .../status has the pipeline's status alone.
    status = requests.get(f"{weir.http_url}/pipelines/strict/status", timeout=10).json()
    assert status["state"] == "failed" and status["tasks"] == {"source": "failed"}, status


def test_stages_over_a_topic_see_each_record_origin_in_small_batches(weir_factory, tmp_path,
                                                                    plugin_dir):
    """Two stages over a topic source, in batches of 40 read ahead of the one being transformed:
    the second stage sees the topic, partition and offset each input was read at (after the
    first stage), records it refuses go to the dead letters, and every input comes out once."""
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    create_topic(weir.bootstrap, "src", 2)
    first = install(plugin_dir, d, "passthrough")
    second = install(plugin_dir, d, "hostile")
    n = 1200
    p = Producer({"bootstrap.servers": weir.bootstrap, "linger.ms": 5})
    for i in range(n):
        p.produce("src", partition=i % 2, value=b"error" if i % 97 == 0 else b"origin")
    assert p.flush(60) == 0
    inputs = read_committed(weir.bootstrap, "src")
    assert len(inputs) == n
    (d / "stages.yaml").write_text(f"""\
name: stages
source:
  topic: {{ name: src }}
transforms:
  - plugin: {first}
  - plugin: {second}
topic: {{ name: stages-out, partitions: 1 }}
batch_records: 40
errors: {{ tolerance: all }}
""")
    refused = [(part, off) for part, off, _, v, _ in inputs if v == b"error"]
    wanted = sorted(f"src/{part}/{off}" for part, off, _, v, _ in inputs if v == b"origin")
    out = wait_until(lambda: (lambda o: len(o) >= len(wanted) and o)(
        read_committed(weir.bootstrap, "stages-out")), timeout=90, message="every input")
    dead = wait_until(lambda: (lambda o: len(o) >= len(refused) and o)(
        read_committed(weir.bootstrap, "stages.dlq")), timeout=30, message="the dead letters")
    time.sleep(1)
    out = read_committed(weir.bootstrap, "stages-out")
    assert sorted(v.decode() for _, _, _, v, _ in out) == wanted
    dead = read_committed(weir.bootstrap, "stages.dlq")
    assert len(dead) == len(refused)
    for _, _, _, v, h in dead:
        headers = {k: x.decode() for k, x in h}
        assert v == b"error" and headers["weir.stage"] == "transforms[1]", headers
    status = pipeline_state(weir, "stages")
    assert status["records_in"] == len(wanted) and status["dead_letters"] == len(refused), status


def test_bad_modules_are_reported_and_a_changed_module_is_reloaded(weir_factory, tmp_path, plugin_dir):
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    (d / "plugins").mkdir()
    (d / "plugins" / "broken.wasm").write_bytes(b"\0asm\x01\0\0\0garbage")
    (d / "broken.yaml").write_text("""\
name: broken
source: { http: { path: /ingest/broken } }
transforms:
  - plugin: plugins/broken.wasm
topic: { name: broken }
""")
    plugin = install(plugin_dir, d, "passthrough", as_name="stage.wasm")
    (d / "stage.yaml").write_text(f"""\
name: stage
source: {{ http: {{ path: /ingest/stage, format: lines }} }}
transforms:
  - plugin: {plugin}
topic: {{ name: stage }}
errors: {{ tolerance: all }}
""")
    reason = wait_until(lambda: (file_status(weir, "broken.yaml") or {}).get("invalid"),
                        message="the broken module to be reported")
    assert "transforms[0].plugin" in reason and "broken.wasm" in reason, reason
    wait_until(lambda: pipeline_state(weir, "stage"), message="the good pipeline to run")
    assert post(weir, "/ingest/stage", b"panic\n").status_code == 200
    assert [v for _, _, _, v, _ in read_committed(weir.bootstrap, "stage")] == [b"panic"]
    # Replacing the module restarts the pipeline with it: the hostile plugin now refuses
    # "panic", which goes to the dead letters instead.
    time.sleep(1.1)  # a new modification time
    install(plugin_dir, d, "hostile", as_name="stage.wasm")

    def reloaded():
        post(weir, "/ingest/stage", b"panic\n")
        return read_committed(weir.bootstrap, "stage.dlq")

    wait_until(reloaded, timeout=30, message="the changed module to be used")
    assert weir.starts == 1


def test_topic_to_topic_transform_is_exactly_once_across_kill_9(weir_factory, tmp_path, plugin_dir):
    weir, d = pipelines_daemon(weir_factory, tmp_path)
    create_topic(weir.bootstrap, "clicks", 3)
    plugin = install(plugin_dir, d, "pii_redact")
    n = 4000

    def produce(lo, hi):
        p = Producer({"bootstrap.servers": weir.bootstrap, "linger.ms": 5})
        for i in range(lo, hi):
            p.produce("clicks", key=f"u{i % 50}".encode(),
                      value=json.dumps({"n": i, "email": f"user{i}@example.com"}).encode())
            p.poll(0)
        assert p.flush(60) == 0

    produce(0, n // 2)
    (d / "redact.yaml").write_text(f"""\
name: redact
source:
  topic: {{ name: clicks }}
transforms:
  - plugin: {plugin}
topic: {{ name: clicks-redacted, partitions: 3 }}
batch_records: 200
""")
    wait_until(lambda: len(read_committed(weir.bootstrap, "clicks-redacted")) > 200, timeout=60,
               message="the transform to start writing")
    weir.kill()
    weir.start()
    produce(n // 2, n)
    wait_until(lambda: len(read_committed(weir.bootstrap, "clicks-redacted")) >= n, timeout=90,
               message="every input transformed")
    time.sleep(1)
    out = [json.loads(v) for _, _, _, v, _ in read_committed(weir.bootstrap, "clicks-redacted")]
    assert sorted(o["n"] for o in out) == list(range(n)), "an input's result is missing or repeated"
    assert all("@example.com" not in o["email"] for o in out), "e-mails must be masked"
