"""Metrics: `GET /metrics` in Prometheus's text format, read back by Prometheus's own parser
and by a real Prometheus (Debian's package, started here on loopback) scraping a daemon while
a pipeline runs."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

import kafka_wire as kw
from conftest import _pick_free_ports
from support import create_topic, wait_until
from test_pipelines import pipelines_daemon

COPY_PIPELINE = """\
name: copy
source:
  topic: { name: pin }
topic: { name: pmid }
sinks:
  - topic: { name: pout }
"""


def scrape(weir) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics, by (name, labels)."""
    r = requests.get(f"{weir.http_url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples, name: str, **labels) -> float:
    """Sum over the series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def produce(bootstrap: str, topic: str, n: int, partitions: int, start: int = 0) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(start, start + n):
        p.produce(topic, value=b"x" * 100, key=f"k{i}".encode(), partition=i % partitions)
    assert p.flush(30) == 0


def consume_and_commit(bootstrap: str, topic: str, group: str, n: int) -> None:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        c.subscribe([topic])
        got = 0
        deadline = time.monotonic() + 60
        while got < n:
            assert time.monotonic() < deadline, f"consumed {got} of {n}"
            for m in c.consume(500, timeout=1):
                assert m.error() is None, m.error()
                got += 1
        c.commit(asynchronous=False)
    finally:
        c.close()


def test_metrics_count_what_clients_do(weir_factory, tmp_path):
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"copy.yaml": COPY_PIPELINE})
    create_topic(weir.bootstrap, "m", 2)
    produce(weir.bootstrap, "m", 500, 2)
    consume_and_commit(weir.bootstrap, "m", "g1", 500)

    # A produce to a partition that does not exist is counted under its Kafka error name.
    with kw.connect(weir.bootstrap) as s:
        batch = kw.record_batch([(None, b"v")], int(time.time() * 1000))
        _, results = kw.parse_produce_v3_response(kw.roundtrip(s, kw.produce_v3(1, "m", 7, batch)))
    assert results[0].error_code == 3, results

    # One committed and one aborted transaction.
    tp = Producer({"bootstrap.servers": weir.bootstrap, "transactional.id": "metrics-txn"})
    tp.init_transactions(30)
    for commit in (True, False):
        tp.begin_transaction()
        tp.produce("m", value=b"t", partition=0)
        assert tp.flush(30) == 0  # written before the end, also when aborted
        tp.commit_transaction(30) if commit else tp.abort_transaction(30)

    m = scrape(weir)
    assert value(m, "weir_produced_records_total", topic="m") == 502  # 500 + 2 transactional
    assert value(m, "weir_produced_bytes_total", topic="m") > 500 * 100
    assert total(m, "weir_kafka_requests_total", api="Produce") >= 3
    assert total(m, "weir_kafka_request_duration_seconds_count", api="Fetch") >= 1
    assert value(m, "weir_kafka_request_errors_total", api="Produce",
                 error="UNKNOWN_TOPIC_OR_PARTITION") == 1
    assert value(m, "weir_kafka_received_bytes_total") > 500 * 100
    assert value(m, "weir_kafka_sent_bytes_total") > 500 * 100
    assert value(m, "weir_kafka_connections_accepted_total") >= 3
    # Two transaction markers each, plus the committed records: end offsets count them all.
    assert total(m, "weir_partition_log_end_offset", topic="m") == 500 + 2 + 2
    assert value(m, "weir_partition_log_start_offset", topic="m", partition="0") == 0
    assert total(m, "weir_partition_size_bytes", topic="m") == value(m, "weir_topic_size_bytes", topic="m") > 0
    assert value(m, "weir_topic_partitions", topic="m") == 2
    assert value(m, "weir_group_offset_commits_total", group="g1") == 2
    assert value(m, "weir_group_state", group="g1", state="Empty") == 1
    # g1 committed 500 of the 504 offsets: the transactional records and markers are ahead.
    assert value(m, "weir_group_lag_records", group="g1") == 4
    assert total(m, "weir_group_partition_lag_records", group="g1", topic="m") == 4
    assert value(m, "weir_transactions_total", outcome="committed") >= 1
    assert value(m, "weir_transactions_total", outcome="aborted") == 1
    assert value(m, "weir_transactions_ongoing") == 0
    assert value(m, "process_resident_memory_bytes") > 1 << 20
    assert value(m, "process_open_fds") > 0

    # The pipeline's counts and state; a refused file shows as invalid.
    produce(weir.bootstrap, "pin", 40, 1)
    wait_until(lambda: value(scrape(weir), "weir_pipeline_records_in_total", pipeline="copy") == 40,
               30, message="the pipeline's records to be counted")
    m = scrape(weir)
    assert value(m, "weir_pipeline_records_out_total", pipeline="copy", sink="0") == 40
    assert value(m, "weir_pipeline_state", pipeline="copy", state="running") == 1
    # Its topic source has read everything committed.
    assert value(m, "weir_pipeline_source_lag_records", pipeline="copy") == 0
    # Where it would resume: past the 40 records, as stored with its output.
    status = requests.get(f"{weir.http_url}/pipelines/copy/status", timeout=10).json()
    assert status["source_offset"] == {"partitions": {"0": 40}}, status
    # Each batch is timed from its read to its commit, and each commit: the source's
    # transaction, the sink's write and commit.
    assert value(m, "weir_pipeline_batch_duration_seconds_count", pipeline="copy") >= 1
    assert value(m, "weir_pipeline_commit_duration_seconds_count", pipeline="copy",
                 stage="source") >= 1
    assert value(m, "weir_pipeline_commit_duration_seconds_count", pipeline="copy",
                 stage="sinks[0]") >= 1
    (d / "bad.yaml").write_text("name: bad\n")
    wait_until(lambda: value(scrape(weir), "weir_pipeline_file_invalid", file=str(d / "bad.yaml")) == 1,
               30, message="the refused file to show")


def test_per_partition_series_can_be_switched_off(weir_factory):
    weir = weir_factory("weir", config_yaml="metrics_per_partition: false\n")
    create_topic(weir.bootstrap, "many", 8)
    produce(weir.bootstrap, "many", 80, 8)
    consume_and_commit(weir.bootstrap, "many", "g", 80)
    m = scrape(weir)
    assert not [k for k in m if k[0] in ("weir_partition_log_end_offset",
                                         "weir_group_partition_lag_records")]
    assert value(m, "weir_topic_partitions", topic="many") == 8
    assert value(m, "weir_group_lag_records", group="g") == 0


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    assert path, "prometheus is not installed: run tests/run, which installs Debian's 'prometheus'"
    return path


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str):
        (self.port,) = _pick_free_ports(1)
        config = workdir / "prometheus.yml"
        config.write_text(f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: weir
    static_configs:
      - targets: ["{target}"]
""")
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 60, message="Prometheus to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "Prometheus exited; see prometheus.log"
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).ok
        except requests.ConnectionError:
            return False

    def query(self, promql: str) -> float | None:
        r = requests.get(f"http://127.0.0.1:{self.port}/api/v1/query",
                         params={"query": promql}, timeout=10)
        r.raise_for_status()
        result = r.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def test_a_real_prometheus_scrapes_a_running_pipeline(weir_factory, tmp_path, prometheus_bin):
    weir, _ = pipelines_daemon(weir_factory, tmp_path, **{"copy.yaml": COPY_PIPELINE})
    wait_until(lambda: value(scrape(weir), "weir_pipeline_state", pipeline="copy", state="running"),
               30, message="the pipeline to run")
    prom = Prometheus(prometheus_bin, tmp_path, f"127.0.0.1:{weir.http_port}")
    try:
        wait_until(lambda: prom.query('up{job="weir"}') == 1, 30, message="the first scrape")
        n = 2000  # into `pin`, which the pipeline created
        for start in range(0, n, 400):  # over a few scrapes
            produce(weir.bootstrap, "pin", 400, 1, start)
            time.sleep(0.5)
        wait_until(lambda: prom.query('weir_pipeline_records_in_total{pipeline="copy"}') == n, 60,
                   message="Prometheus to see every record go through the pipeline")
        assert prom.query('weir_produced_records_total{topic="pin"}') == n
        # The sink writes behind the source: its count may reach Prometheus a scrape later.
        wait_until(lambda: prom.query('weir_pipeline_records_out_total{pipeline="copy",sink="0"}')
                   == n, 60, message="Prometheus to see every record written by the sink")
        # The sink's consumer group caught up: no lag left.
        wait_until(lambda: prom.query('weir_group_lag_records{group="weir-pipeline-copy-sink-0"}') == 0,
                   60, message="the sink group's lag to reach 0 in Prometheus")
        assert prom.query('increase(weir_produced_records_total{topic="pin"}[1m])') > 0
        assert prom.query('sum(rate(weir_kafka_requests_total{api="Produce"}[1m]))') > 0
        assert prom.query('histogram_quantile(0.99, sum by (le) '
                          '(rate(weir_kafka_request_duration_seconds_bucket{api="Produce"}[1m])))') > 0
    finally:
        prom.close()
