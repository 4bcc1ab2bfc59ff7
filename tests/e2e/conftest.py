"""Fixtures for the end-to-end suite: run a real `weir serve` per test.

The binary comes from the WEIR_BIN environment variable (tests/run sets it).
Every daemon gets free ports, a fresh data directory under the test's tmp_path
and a log file next to it; when a test fails the tail of every daemon log it
started is attached to the failure report.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

HEALTH_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 80

_LIVE_DAEMONS: set["WeirDaemon"] = set()


@atexit.register
def _kill_leftover_daemons() -> None:
    # Last resort if pytest itself is interrupted: never leave daemons behind.
    for d in list(_LIVE_DAEMONS):
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()


def _pick_free_ports(n: int) -> list[int]:
    """Ports the kernel picks as free; all sockets are held until every port is chosen."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "(no log file)"
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class DaemonError(AssertionError):
    pass


class WeirDaemon:
    """One `weir serve` process and its data directory.

    The data directory survives stop()/kill(), so start() again (or restart())
    reopens the same data. Ports are kept across restarts unless they turn out
    to be taken.
    """

    def __init__(self, binary: str, workdir: Path, name: str = "weir",
                 extra_args: tuple[str, ...] = (), config_yaml: str | None = None):
        self.binary = binary
        self.workdir = workdir
        self.name = name
        self.data_dir = workdir / f"{name}-data"
        self.log_path = workdir / f"{name}.log"
        self.extra_args = list(extra_args)
        self.config_path: Path | None = None
        if config_yaml is not None:
            self.config_path = workdir / f"{name}.yaml"
            self.config_path.write_text(config_yaml)
        self.proc: subprocess.Popen | None = None
        self.kafka_port: int | None = None
        self.http_port: int | None = None
        self.starts = 0
        # A CA file when the HTTP API is served over TLS (http_tls): https:// and verified.
        self.http_ca: str | None = None
        # Extra environment variables for the daemon.
        self.env: dict[str, str] = {}
        self.data_dir.mkdir(parents=True, exist_ok=True)

    # -- addresses -----------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.http_ca else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def __repr__(self) -> str:
        return f"WeirDaemon({self.name}, kafka={self.kafka_port}, http={self.http_port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    # -- lifecycle -----------------------------------------------------------
    def _command(self) -> list[str]:
        cmd = [
            self.binary, "serve",
            "--data-dir", str(self.data_dir),
            "--kafka-addr", f"127.0.0.1:{self.kafka_port}",
            "--http-addr", f"127.0.0.1:{self.http_port}",
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.extra_args

    def start(self, timeout: float = HEALTH_TIMEOUT_S) -> "WeirDaemon":
        """Start the daemon and wait until GET /health answers 200."""
        assert not self.running(), f"{self} is already running"
        if self.kafka_port is None:
            self.kafka_port, self.http_port = _pick_free_ports(2)
        for attempt in range(3):
            self.starts += 1
            cmd = self._command()
            with open(self.log_path, "ab") as log:
                log.write(f"\n===== start #{self.starts}: {' '.join(cmd)}\n".encode())
                log.flush()
                env = dict(os.environ)
                env.setdefault("RUST_BACKTRACE", "1")
                env.update(self.env)
                # The daemon's working directory is the test's own: defaults such as
                # ./pipelines must not pick up the repository's example pipelines.
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, cwd=self.workdir,
                )
            _LIVE_DAEMONS.add(self)
            outcome = self._wait_healthy(timeout)
            if outcome == "ok":
                return self
            if outcome == "addr-in-use" and attempt < 2:
                # Someone grabbed one of our ports between picking and binding.
                self.kafka_port, self.http_port = _pick_free_ports(2)
                continue
            break
        rc = self.proc.poll()
        if rc is None:
            self.proc.kill()
            self.proc.wait(10)
            why = f"GET {self.http_url}/health did not answer 200 within {timeout:.0f}s"
        else:
            why = f"the daemon exited with code {rc} before answering GET /health"
        raise DaemonError(f"weir did not come up: {why}\ncommand: {' '.join(self._command())}\n"
                          f"--- log tail ({self.log_path}) ---\n{self.log_tail()}")

    def _wait_healthy(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        session = requests.Session()
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    this_run = self.log_tail(200).split("===== start #")[-1].lower()
                    if "address already in use" in this_run or "addrinuse" in this_run:
                        return "addr-in-use"
                    return "exited"
                try:
                    r = session.get(f"{self.http_url}/health", timeout=1.0, verify=self.http_ca or True)
                    if r.status_code == 200:
                        return "ok"
                except requests.RequestException:
                    pass
                time.sleep(0.05)
            return "timeout"
        finally:
            session.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S,
             expect_clean: bool = True) -> int:
        """Send SIGTERM (or SIGINT) and wait; by default assert a clean exit (code 0)."""
        assert self.proc is not None, "daemon was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                _LIVE_DAEMONS.discard(self)
                raise DaemonError(f"weir did not exit within {timeout:.0f}s after {signal.Signals(sig).name}; "
                                  f"killed it\n--- log tail ---\n{self.log_tail()}")
        _LIVE_DAEMONS.discard(self)
        rc = self.proc.returncode
        if expect_clean and rc != 0:
            raise DaemonError(f"weir exited with code {rc} after {signal.Signals(sig).name} "
                              f"(expected 0)\n--- log tail ---\n{self.log_tail()}")
        return rc

    def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        assert self.running(), f"{self} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        _LIVE_DAEMONS.discard(self)

    def restart(self, timeout: float = HEALTH_TIMEOUT_S) -> "WeirDaemon":
        """Clean stop (asserting exit 0), then start again on the same data dir."""
        self.stop()
        return self.start(timeout)

    # -- CLI -----------------------------------------------------------------
    def cli(self, *args: str, input: bytes | str | None = None, timeout: float = CLI_TIMEOUT_S,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `weir ARGS... --brokers <this daemon>`; check=True asserts exit code 0."""
        cmd = [self.binary, *args, "--brokers", self.bootstrap]
        if isinstance(input, str):
            input = input.encode()
        try:
            res = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s\n"
                                 f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}") from None
        if check and res.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` exited with {res.returncode}\n"
                                 f"stdout: {res.stdout.decode(errors='replace')}\n"
                                 f"stderr: {res.stderr.decode(errors='replace')}")
        return res


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def weir_bin() -> str:
    path = os.environ.get("WEIR_BIN")
    if not path:
        pytest.fail("WEIR_BIN is not set: point it at a built weir binary "
                    "(tests/run does this), e.g. WEIR_BIN=target/debug/weir", pytrace=False)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"WEIR_BIN={path} is not an executable file", pytrace=False)
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def kcat_bin() -> str:
    path = shutil.which("kcat")
    if path is None:
        pytest.fail("kcat is not installed (tests/run installs the Debian package 'kcat')", pytrace=False)
    return path


@pytest.fixture
def weir_factory(request, weir_bin, tmp_path):
    """Create (and by default start) daemons; all are stopped at teardown,
    asserting that SIGTERM makes them exit with code 0."""
    daemons: list[WeirDaemon] = []
    request.node._weir_daemons = daemons

    def make(name: str | None = None, extra_args: tuple[str, ...] = (),
             config_yaml: str | None = None, start: bool = True) -> WeirDaemon:
        d = WeirDaemon(weir_bin, tmp_path, name=name or f"weir{len(daemons)}",
                       extra_args=tuple(extra_args), config_yaml=config_yaml)
        daemons.append(d)
        if start:
            d.start()
        return d

    yield make

    errors = []
    for d in daemons:
        if d.running():
            try:
                d.stop()
            except DaemonError as e:
                errors.append(f"{d.name}: {e}")
    if errors:
        pytest.fail("daemon shutdown at teardown was not clean:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def weir(weir_factory) -> WeirDaemon:
    """A running single-node daemon with default settings."""
    return weir_factory("weir")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for d in getattr(item, "_weir_daemons", []):
            title = f"{d.name} log ({d.log_path})"
            if not any(name == title for name, _ in report.sections):
                report.sections.append((title, d.log_tail()))
