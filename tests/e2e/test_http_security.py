"""The HTTP side of security: the HTTP API over TLS, callers proving a role with a token or a
SCRAM user (read or admin), HTTP sources with their own token, secrets in pipeline files taken
from files and the environment, and the HTTP connectors reaching an https:// endpoint.
Certificates come from test_security's throwaway PKI."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import requests
from support import Outgoing, create_topic, produce_confluent, wait_until
from test_pipelines_sql_http import Receiver
from test_security import PASSWORD, pki  # noqa: F401 - pki is a fixture

ADMIN_TOKEN = "admin-token-4f1c9a"
READ_TOKEN = "read-token-77d0e2"
INGEST_TOKEN = "ingest-token-a93b51"


def auth_yaml(tmp_path: Path) -> str:
    """An admin token from a file, a read token by its SHA-256, and the SCRAM user alice as a
    reader."""
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    digest = hashlib.sha256(READ_TOKEN.encode()).hexdigest()
    return ("http_auth:\n"
            "  tokens:\n"
            f"    - {{ name: ops, role: admin, token_file: {json.dumps(str(token_file))} }}\n"
            f"    - {{ name: dashboards, role: read, token_sha256: {digest} }}\n"
            "    - { name: ci, role: read, token_env: WEIR_TEST_CI_TOKEN }\n"
            "  users:\n"
            "    - { name: alice, role: read }\n")


def auth_daemon(weir_factory, tmp_path: Path, *extra_args: str):
    """A daemon with auth_yaml's callers (the ci token in its environment)."""
    d = weir_factory("weir", config_yaml=auth_yaml(tmp_path), start=False, extra_args=extra_args)
    d.env["WEIR_TEST_CI_TOKEN"] = "ci-token-0b7e"
    return d.start()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_callers_prove_a_role(weir_factory, tmp_path):
    """Everything but /health needs a caller: 401 with a Basic challenge without one (so a
    browser asks), reading needs the read role, changing anything admin; tokens come from a
    file, the environment or their SHA-256, and SCRAM users log in with HTTP Basic."""
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    d = auth_daemon(weir_factory, tmp_path, "--pipelines", str(pipelines))
    d.cli("user", "create", "alice", "--password", PASSWORD)
    url = d.http_url

    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    for path in ("/", "/pipelines", "/metrics", "/topics", "/groups", "/console/app.js"):
        r = requests.get(f"{url}{path}", timeout=5)
        assert r.status_code == 401, (path, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Basic realm=\"weir\""), r.headers
    for headers in (bearer(READ_TOKEN), bearer("ci-token-0b7e"), bearer(ADMIN_TOKEN)):
        assert requests.get(f"{url}/pipelines", headers=headers, timeout=5).status_code == 200
    assert requests.get(f"{url}/metrics", auth=("alice", PASSWORD), timeout=10).status_code == 200
    assert requests.get(f"{url}/topics", auth=("ops", ADMIN_TOKEN), timeout=5).status_code == 200
    for auth in (("alice", "wrong"), ("bob", PASSWORD), ("dashboards", ADMIN_TOKEN)):
        assert requests.get(f"{url}/pipelines", auth=auth, timeout=10).status_code == 401, auth
    assert requests.get(f"{url}/pipelines", headers=bearer("nope"), timeout=5).status_code == 401

    spec = "name: p1\nsource:\n  http: { path: /ingest/p1 }\ntopic: { name: p1-out }\n"
    r = requests.put(f"{url}/pipelines/p1", data=spec, headers=bearer(READ_TOKEN), timeout=10)
    assert r.status_code == 403 and "admin" in r.json()["error"], r.text
    assert not (pipelines / "p1.yaml").exists()
    # Validating writes nothing: readers may.
    r = requests.post(f"{url}/pipelines/validate", data=spec, headers=bearer(READ_TOKEN), timeout=10)
    assert r.status_code == 200, r.text
    r = requests.put(f"{url}/pipelines/p1", data=spec, headers=bearer(ADMIN_TOKEN), timeout=10)
    assert r.status_code in (200, 201), r.text

    # The CLI: a token from the environment or a file.
    res = subprocess.run([d.binary, "pipeline", "list", "--url", url], capture_output=True, timeout=30)
    assert res.returncode != 0 and b"authentication required" in res.stderr, res.stderr
    res = subprocess.run([d.binary, "pipeline", "pause", "p1", "--url", url], capture_output=True, timeout=30,
                         env={"WEIR_HTTP_TOKEN": READ_TOKEN, "PATH": "/usr/bin:/bin"})
    assert res.returncode != 0 and b"admin role" in res.stderr, res.stderr
    res = subprocess.run([d.binary, "pipeline", "pause", "p1", "--url", url,
                          "--token-file", str(tmp_path / "admin.token")], capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([d.binary, "pipeline", "list", "--url", url], capture_output=True, timeout=30,
                         env={"WEIR_HTTP_TOKEN": READ_TOKEN, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and b"paused" in res.stdout, res


def test_an_http_source_takes_its_own_token(weir_factory, tmp_path):
    """An HTTP source with `token` (here from a file, through ${file:...}) takes posts that
    carry that token, or an admin's; others get 401 and nothing is written. The token is not
    in the log."""
    secret = tmp_path / "ingest.token"
    secret.write_text(INGEST_TOKEN + "\n")
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "in.yaml").write_text(
        "name: in\nsource:\n  http:\n    path: /ingest/in\n    format: lines\n"
        f"    token: \"${{file:{secret}}}\"\ntopic: {{ name: ingested }}\n")
    d = auth_daemon(weir_factory, tmp_path, "--pipelines", str(pipelines))
    url = f"{d.http_url}/ingest/in"
    wait_until(lambda: requests.post(url, data=b"probe\n", timeout=5).status_code == 401, 30,
               message="the HTTP source to be served")
    assert requests.post(url, data=b"x\n", headers=bearer("wrong"), timeout=5).status_code == 401
    assert requests.post(url, data=b"x\n", headers=bearer(READ_TOKEN), timeout=5).status_code == 401
    r = requests.post(url, data=b"a\nb\n", headers=bearer(INGEST_TOKEN), timeout=30)
    assert r.status_code == 200 and r.json() == {"accepted": 2}, r.text
    r = requests.post(url, data=b"c\n", headers=bearer(ADMIN_TOKEN), timeout=30)
    assert r.status_code == 200, r.text
    out = d.cli("consume", "ingested", "--from-beginning", "--count", "3").stdout.split()
    assert out == [b"a", b"b", b"c"], out
    assert INGEST_TOKEN not in d.log_path.read_text()


def test_https_api_and_an_https_sink(weir_factory, tmp_path, pki):  # noqa: F811
    """The HTTP API over TLS (clients verify it against the CA; plain HTTP gets nothing), the
    CLI with --ca-file, and an HTTP sink delivering to an https:// endpoint it trusts through
    `ca_file`, with its bearer token from the environment."""
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    tls = (f"http_tls:\n  cert_file: {json.dumps(str(pki.server.cert))}\n"
           f"  key_file: {json.dumps(str(pki.server.key))}\n")
    d = weir_factory("weir", config_yaml=tls, start=False, extra_args=("--pipelines", str(pipelines)))
    d.http_ca = str(pki.ca)
    d.env["WEIR_TEST_SINK_TOKEN"] = "sink-token-5e2d"
    d.start()
    assert d.http_url.startswith("https://")
    assert requests.get(f"{d.http_url}/pipelines", verify=str(pki.ca), timeout=5).status_code == 200
    try:
        requests.get(f"http://127.0.0.1:{d.http_port}/health", timeout=5)
        raise AssertionError("plain HTTP was answered on the TLS port")
    except requests.RequestException:
        pass
    res = subprocess.run([d.binary, "pipeline", "list", "--url", d.http_url], capture_output=True, timeout=30)
    assert res.returncode != 0 and b"certificate" in res.stderr.lower(), res.stderr
    res = subprocess.run([d.binary, "pipeline", "list", "--url", d.http_url, "--ca-file", str(pki.ca)],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr

    # An https:// sink.
    Receiver.batches, Receiver.seen, Receiver.fail_first = [], 0, 0
    seen_auth: list[str] = []

    class Checking(Receiver):
        def do_POST(self):  # noqa: N802 - http.server's naming
            seen_auth.append(self.headers.get("Authorization", ""))
            super().do_POST()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Checking)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        create_topic(d.bootstrap, "events", 1)
        produce_confluent(d.bootstrap, "events", [Outgoing(json.dumps({"n": i}).encode()) for i in range(20)])
        (pipelines / "hook.yaml").write_text(f"""\
name: hook
source:
  topic: {{ name: events }}
sinks:
  - http:
      url: https://127.0.0.1:{server.server_port}/hook
      ca_file: {json.dumps(str(pki.ca))}
      headers: {{ Authorization: "Bearer ${{WEIR_TEST_SINK_TOKEN}}" }}
""")

        def received() -> list[int]:
            with Receiver.lock:
                return sorted({r["n"] for _key, records in Receiver.batches for r in records})

        wait_until(lambda: received() == list(range(20)), timeout=60, message="every record delivered over https")
        assert set(seen_auth) == {"Bearer sink-token-5e2d"}, seen_auth
        assert "sink-token-5e2d" not in d.log_path.read_text()
    finally:
        server.shutdown()


def test_basic_header_parsing_refuses_garbage(weir_factory, tmp_path):
    """Malformed Authorization headers are refused (401), never a server error."""
    d = auth_daemon(weir_factory, tmp_path)
    for value in ("Basic", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer",
                  "Token abc", "Basic " + base64.b64encode(b"\xff\xfe:x").decode()):
        r = requests.get(f"{d.http_url}/pipelines", headers={"Authorization": value}, timeout=5)
        assert r.status_code == 401, (value, r.status_code)
