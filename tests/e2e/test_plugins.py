"""WASM transform plugins through the `weir plugin` CLI.

The example plugins (plugins-sdk/examples) are built from source by tests/run with
`weir plugin build` into $WEIR_PLUGIN_DIR; these tests run them offline with `weir plugin test`
over sample records and check what comes out and what goes to the dead letters. The `hostile`
plugin misbehaves on request (panic, endless loop, memory, recursion): each bad record is
dead-lettered with its reason and the records around it still come out. The last tests walk
the plugin author's loop: `weir plugin new`, `weir plugin build`, `weir plugin test`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 900.0


@pytest.fixture(scope="session")
def plugin_dir() -> Path:
    d = os.environ.get("WEIR_PLUGIN_DIR")
    if not d:
        pytest.fail("WEIR_PLUGIN_DIR is not set: tests/run builds the example plugins there "
                    "(weir plugin build plugins-sdk/examples --out DIR)", pytrace=False)
    return Path(d)


def module(plugin_dir: Path, name: str) -> Path:
    path = plugin_dir / f"{name}.wasm"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the example plugins were not built "
                    f"(see the 'weir plugin build' step of tests/run)", pytrace=False)
    return path


def run(cmd: list[str], timeout: float = 120.0, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`{' '.join(map(str, cmd))}` did not finish within {timeout:.0f}s; "
                             f"stderr: {(e.stderr or b'')[-2000:]!r}") from None


class Result:
    def __init__(self, res: subprocess.CompletedProcess):
        self.res = res
        self.stderr = res.stderr.decode(errors="replace")
        self.lines = [json.loads(line) for line in res.stdout.decode().splitlines() if line.strip()]
        self.records = [(x["input"], x["record"]) for x in self.lines if "record" in x]
        self.dead = [(x["input"], x["dead_letter"]) for x in self.lines if "dead_letter" in x]

    def values(self) -> list[tuple[int, str]]:
        return [(i, r["value"]) for i, r in self.records]


def plugin_test(weir_bin: str, wasm: Path, tmp_path: Path, records=None, lines=None,
                config: dict | None = None, args: tuple[str, ...] = (), ok: bool = True,
                env: dict | None = None) -> Result:
    """`weir plugin test` over records (dicts, one JSON object per line) or raw lines."""
    inp = tmp_path / "input.ndjson"
    cmd = [weir_bin, "plugin", "test", str(wasm), "--input", str(inp)]
    if lines is not None:
        inp.write_text("".join(line + "\n" for line in lines))
        cmd += ["--input-format", "lines"]
    else:
        inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    for k, v in (config or {}).items():
        cmd += ["--config", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    cmd += list(args)
    res = run(cmd, env=env)
    out = Result(res)
    if ok:
        assert res.returncode == 0, f"`{' '.join(cmd)}` exited with {res.returncode}: {out.stderr}"
    return out


# ---------------------------------------------------------------------------------------------
# the example plugins
# ---------------------------------------------------------------------------------------------

def test_json_filter(weir_bin, plugin_dir, tmp_path):
    docs = [{"status": 200, "path": "/a"}, {"status": 404, "path": "/b"},
            {"status": "200", "path": "/c"}, {"path": "/d"}]
    records = [{"key": f"k{i}", "value": d} for i, d in enumerate(docs)]
    records.append({"key": "bad", "value": "this is not json"})
    out = plugin_test(weir_bin, module(plugin_dir, "json_filter"), tmp_path, records=records,
                      config={"field": "status", "equals": 200})
    assert [(i, json.loads(r["value"])["path"]) for i, r in out.records] == [(0, "/a"), (2, "/c")]
    assert [r["key"] for _, r in out.records] == ["k0", "k2"]
    assert len(out.dead) == 1
    index, dl = out.dead[0]
    assert index == 4 and dl["kind"] == "plugin-error"
    assert "not JSON" in dl["reason"], dl
    assert dl["record"]["key"] == "bad", "the dead letter carries the original record"
    assert "5 record(s) in, 2 out, 1 dead letter(s)" in out.stderr, out.stderr

    # negate, and one_of given as a list
    out = plugin_test(weir_bin, module(plugin_dir, "json_filter"), tmp_path, records=records[:4],
                      config={"field": "status", "one_of": [404, 500], "negate": True})
    assert [i for i, _ in out.records] == [0, 2, 3]


def test_pii_redact(weir_bin, plugin_dir, tmp_path):
    lines = [
        "login ok for jane.doe@example.com from 203.0.113.7",
        "charge 4111-1111-1111-1111 approved, order 4111111111111112",
        "nothing to hide here",
        "ipv6 client 2001:db8::1 via std::net",
    ]
    out = plugin_test(weir_bin, module(plugin_dir, "pii_redact"), tmp_path, lines=lines)
    assert out.values() == [
        (0, "login ok for [EMAIL] from [IP]"),
        (1, "charge [CARD] approved, order 4111111111111112"),
        (2, "nothing to hide here"),
        (3, "ipv6 client [IP] via std::net"),
    ]
    counts = [dict(r["headers"])["redactions"] for _, r in out.records]
    assert counts == ["2", "1", "0", "1"]
    assert not out.dead

    out = plugin_test(weir_bin, module(plugin_dir, "pii_redact"), tmp_path, lines=lines[:1],
                      config={"kinds": "ip", "mask": "xxx"})
    assert out.values() == [(0, "login ok for jane.doe@example.com from xxx")]


def test_access_log(weir_bin, plugin_dir, tmp_path):
    lines = [
        '198.51.100.4 - - [25/Nov/2026:08:15:02 +0000] "GET /index.html HTTP/1.1" 200 5120 '
        '"https://example.org/" "Mozilla/5.0 (X11; Linux x86_64)"',
        '10.1.2.3 - bob [25/Nov/2026:09:15:02 +0100] "POST /api/orders HTTP/2.0" 201 - "-" "curl/8.5.0"',
        "this line is not an access log",
        '192.0.2.1 - - [25/Nov/2026:08:15:03 +0000] "GET /health HTTP/1.1" 304 0',
    ]
    out = plugin_test(weir_bin, module(plugin_dir, "access_log"), tmp_path, lines=lines)
    docs = {i: json.loads(r["value"]) for i, r in out.records}
    assert sorted(docs) == [0, 1, 3]
    assert docs[0] == {
        "remote_addr": "198.51.100.4", "remote_user": None, "time": "2026-11-25T08:15:02+00:00",
        "method": "GET", "path": "/index.html", "protocol": "HTTP/1.1", "status": 200,
        "bytes": 5120, "referer": "https://example.org/",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
    }
    assert docs[1]["remote_user"] == "bob" and docs[1]["bytes"] == 0 and docs[1]["referer"] is None
    assert docs[3]["status"] == 304 and docs[3]["user_agent"] is None
    # the record timestamp is taken from the line: 08:15:02Z and 09:15:02+01:00 are the same instant
    stamps = {i: r["timestamp"] for i, r in out.records}
    assert stamps[0] == stamps[1] == 1795594502000
    assert stamps[3] == stamps[0] + 1000
    assert [(i, d["kind"]) for i, d in out.dead] == [(2, "plugin-error")]
    assert "not an access-log line" in out.dead[0][1]["reason"]


def test_enrich_from_a_config_table(weir_bin, plugin_dir, tmp_path):
    cfg = tmp_path / "enrich.json"
    cfg.write_text(json.dumps({
        "field": "customer.country",
        "table": {"FR": {"region": "EU", "currency": "EUR"}, "US": {"region": "NA", "currency": "USD"}},
        "on_missing": "error",
    }))
    records = [
        {"key": "o1", "value": {"id": 1, "customer": {"country": "FR"}}},
        {"key": "o2", "value": {"id": 2, "customer": {"country": "JP"}}},
        {"key": "o3", "value": {"id": 3, "customer": {"country": "US"}}},
    ]
    out = plugin_test(weir_bin, module(plugin_dir, "enrich"), tmp_path, records=records,
                      args=("--config-file", str(cfg)))
    docs = {i: json.loads(r["value"]) for i, r in out.records}
    assert docs == {
        0: {"id": 1, "customer": {"country": "FR"}, "region": "EU", "currency": "EUR"},
        2: {"id": 3, "customer": {"country": "US"}, "region": "NA", "currency": "USD"},
    }
    assert [(i, d["kind"]) for i, d in out.dead] == [(1, "plugin-error")]
    assert "`JP` is not in the lookup table" in out.dead[0][1]["reason"]

    # --config wins over --config-file: a default instead of an error
    out = plugin_test(weir_bin, module(plugin_dir, "enrich"), tmp_path, records=records[1:2],
                      config={"default": {"region": "unknown"}}, args=("--config-file", str(cfg)))
    assert json.loads(out.records[0][1]["value"])["region"] == "unknown"


def test_split_array_flat_map(weir_bin, plugin_dir, tmp_path):
    records = [
        {"key": "batch-1", "value": {"events": [{"n": 1}, {"n": 2}, {"n": 3}]}, "headers": {"src": "app"}},
        {"key": "batch-2", "value": {"events": []}},
        {"key": "batch-3", "value": {"events": "oops"}},
        {"key": "batch-4", "value": {"events": [{"n": 4}]}},
    ]
    out = plugin_test(weir_bin, module(plugin_dir, "split_array"), tmp_path, records=records,
                      config={"field": "events"})
    assert [(i, json.loads(r["value"])["n"]) for i, r in out.records] == [(0, 1), (0, 2), (0, 3), (3, 4)]
    first = out.records[0][1]
    assert first["key"] == "batch-1"
    assert dict(first["headers"]) == {"src": "app", "split-index": "0"}
    assert [(i, d["kind"]) for i, d in out.dead] == [(2, "plugin-error")]


def test_passthrough_keeps_every_field(weir_bin, plugin_dir, tmp_path):
    rec = {"key": "k", "value": "v", "headers": [["h", "1"], ["h", "2"], ["n", None]],
           "timestamp": 1700000000123, "topic": "orders", "partition": 3, "offset": 42}
    out = plugin_test(weir_bin, module(plugin_dir, "passthrough"), tmp_path,
                      records=[rec, {"value": None}])
    assert out.records[0] == (0, rec)
    assert out.records[1][1]["value"] is None and out.records[1][1]["key"] is None


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------

def test_a_hostile_plugin_only_costs_its_bad_records(weir_bin, plugin_dir, tmp_path):
    values = ["a", "panic", "b", "loop", "c", "oom", "recurse", "error", "big-frames", "d"]
    out = plugin_test(weir_bin, module(plugin_dir, "hostile"), tmp_path,
                      records=[{"value": v} for v in values],
                      args=("--memory-mb", "16", "--fuel-per-record", "20000000"))
    assert out.values() == [(0, "a"), (2, "b"), (4, "c"), (9, "d")]
    kinds = {i: d["kind"] for i, d in out.dead}
    assert kinds == {1: "panic", 3: "cpu-budget", 5: "memory-limit", 6: "stack-overflow",
                     7: "plugin-error", 8: "trap"}, out.dead
    reasons = {i: d["reason"] for i, d in out.dead}
    assert "hostile plugin: panic requested" in reasons[1], reasons[1]
    assert "16777216 bytes" in reasons[5], reasons[5]
    assert reasons[7] == "hostile plugin: error requested"
    assert "out of bounds memory access" in reasons[8] and "stack" in reasons[8], reasons[8]
    # every fault replaced the instance: the batch's, then each bad record's but the error
    assert "6 restart(s)" in out.stderr, out.stderr

    # --fail-on-dead-letter turns dead letters into a failing exit status
    out = plugin_test(weir_bin, module(plugin_dir, "hostile"), tmp_path,
                      records=[{"value": "ok"}, {"value": "error"}],
                      args=("--fail-on-dead-letter",), ok=False)
    assert out.res.returncode == 1
    assert "1 record(s) went to the dead letters" in out.stderr
    assert out.values() == [(0, "ok")]


def wasm_importing_wasi() -> bytes:
    """A module that imports wasi_snapshot_preview1.fd_write, encoded by hand."""
    def name(s: str) -> bytes:
        return bytes([len(s)]) + s.encode()

    def section(sid: int, body: bytes) -> bytes:
        return bytes([sid, len(body)]) + body

    types = section(1, bytes([1, 0x60, 4, 0x7F, 0x7F, 0x7F, 0x7F, 1, 0x7F]))
    imports = section(2, bytes([1]) + name("wasi_snapshot_preview1") + name("fd_write") + bytes([0, 0]))
    return b"\0asm" + bytes([1, 0, 0, 0]) + types + imports


def test_broken_modules_and_bad_config_fail_with_clear_messages(weir_bin, plugin_dir, tmp_path):
    garbage = tmp_path / "garbage.wasm"
    garbage.write_bytes(b"this is not webassembly")
    wasi = tmp_path / "wasi.wasm"
    wasi.write_bytes(wasm_importing_wasi())
    cases = [
        (garbage, {}, (), "not a valid WebAssembly module"),
        (wasi, {}, (), "imports wasi_snapshot_preview1.fd_write"),
        (tmp_path / "missing.wasm", {}, (), "cannot read plugin"),
        (module(plugin_dir, "enrich"), {"field": "x"}, (), "init failed: the plugin config needs `table`"),
        (module(plugin_dir, "json_filter"), {"field": "a"}, ("--config", "novalue"), "expected KEY=VALUE"),
        (module(plugin_dir, "pii_redact"), {"kinds": "phone"}, (), "unknown kind `phone`"),
    ]
    for wasm, config, args, message in cases:
        out = plugin_test(weir_bin, wasm, tmp_path, records=[{"value": "x"}], config=config,
                          args=args, ok=False)
        assert out.res.returncode == 1, (wasm, out.stderr)
        assert message in out.stderr, (message, out.stderr)
        assert "panicked" not in out.stderr, out.stderr


def test_precompiled_modules_are_reused_across_runs(weir_bin, plugin_dir, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, WEIR_PLUGIN_CACHE=str(cache))
    wasm = module(plugin_dir, "passthrough")
    first = plugin_test(weir_bin, wasm, tmp_path, records=[{"value": "x"}], env=env)
    artifacts = list(cache.glob("*.cwasm"))
    assert len(artifacts) == 1, artifacts
    stamp = artifacts[0].stat().st_mtime_ns
    second = plugin_test(weir_bin, wasm, tmp_path, records=[{"value": "x"}], env=env)
    assert second.values() == first.values() == [(0, "x")]
    assert artifacts[0].stat().st_mtime_ns == stamp, "the second run compiled the module again"
    assert oct(cache.stat().st_mode & 0o777) == "0o700"


def test_plugin_bench_reports_a_rate(weir_bin, plugin_dir):
    res = run([weir_bin, "plugin", "bench", str(module(plugin_dir, "passthrough")), "-n", "200000"])
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()
    assert "records/s" in out, out
    assert "output: 200000 records, 0 dead letters, 0 restarts" in out, out


# ---------------------------------------------------------------------------------------------
# the author's loop
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(BUILD_TIMEOUT_S + 60)
def test_new_build_test_loop(weir_bin, tmp_path):
    crate = tmp_path / "shouty"
    res = run([weir_bin, "plugin", "new", "shouty", "--path", str(crate), "--kind", "map",
               "--sdk", str(REPO / "plugins-sdk")])
    assert res.returncode == 0, res.stderr.decode()
    assert (crate / "src/lib.rs").is_file() and (crate / "sample.ndjson").is_file()
    # a second `new` into the same place refuses to overwrite
    again = run([weir_bin, "plugin", "new", "shouty", "--path", str(crate)])
    assert again.returncode == 1 and b"not empty" in again.stderr

    out_dir = tmp_path / "out"
    toolchain = os.environ.get("WEIR_PLUGIN_TOOLCHAIN") or "auto"
    res = run([weir_bin, "plugin", "build", str(crate), "--toolchain", toolchain, "--out", str(out_dir)],
              timeout=BUILD_TIMEOUT_S)
    assert res.returncode == 0, res.stderr.decode()[-4000:]
    wasm = out_dir / "shouty.wasm"
    assert wasm.is_file(), res.stdout.decode()

    inp = crate / "sample.ndjson"
    res = run([weir_bin, "plugin", "test", str(wasm), "--input", str(inp), "--config", "prefix=> "])
    assert res.returncode == 0, res.stderr.decode()
    values = [json.loads(line)["record"]["value"] for line in res.stdout.decode().splitlines()]
    assert values == ["> HELLO WORLD", "> SECOND RECORD", "> SKIP ME"]
    assert "[plugin shouty] info: starting, prefix \"> \"" in res.stderr.decode()
