"""Shared test fixtures: free loopback ports, waiting on conditions, and processes that always die."""
from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "infinilm-svc.pyz"
# The event loop of this run: INFINILM_LOOP=asyncio or uvloop (./build.sh test runs the suite under
# both). In-process tests run on it, and the processes the tests start inherit the variable.
LOOP = os.environ.get("INFINILM_LOOP", "uvloop")


def pytest_asyncio_loop_factories(config, item):
    if LOOP == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop
    return {"uvloop": uvloop.new_event_loop}


def pytest_report_header(config):
    return f"event loop: {LOOP} (INFINILM_LOOP)"


def free_port(host: str = "127.0.0.1", pair: bool = False) -> int:
    """A free TCP port on `host`; with pair=True, P such that P and P+1 are both free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind((host, port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair found")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - shown in the failure message
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


async def async_wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
                         interval: float = 0.05, what: str = "condition") -> Any:
    """Async twin of wait_for: `predicate()` (awaited when it returns an awaitable) until truthy,
    or fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
        except Exception as exc:  # noqa: BLE001
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)


class ProcessGroup:
    """Processes started by a test, each in its own process group, all killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], name: str = "proc", env: dict | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        log = self.tmp_path / f"{name}-{len(self.procs)}.log"
        fh = open(log, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, cwd=cwd, start_new_session=True)
        fh.close()
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append((proc, log))
        return proc

    def pyz(self, *args: str, name: str = "pyz", **kw) -> subprocess.Popen:
        """Run the built pyz exactly as a user would."""
        assert PYZ.exists(), "build the pyz first: ./build.sh"
        return self.start([sys.executable, str(PYZ), *args], name=name, **kw)

    @staticmethod
    def output(proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def kill_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc, _ in self.procs:
            # Whatever is left in the group (the process or its children) gets KILL.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=5)


@pytest.fixture
def procs(tmp_path):
    """Start processes with procs.start([...]) or procs.pyz(...); all are killed at teardown."""
    group = ProcessGroup(tmp_path)
    yield group
    group.kill_all()


@pytest.fixture(scope="session")
def pyz_path() -> Path:
    if not PYZ.exists():
        pytest.fail("infinilm-svc.pyz is missing: run ./build.sh (./build.sh test builds it first)")
    return PYZ


def http_get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """Blocking GET returning (status, parsed JSON or text); for process-level tests."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def http_json(method: str, url: str, body: Any = None, headers: dict | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    """Blocking request with an optional JSON body; returns (status, parsed JSON or text)."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One real etcd member on loopback for the whole session (tests use their own key prefix)."""
    from etcd_cluster import EtcdCluster

    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "etcd"])
def registry_config(request):
    """Make a RegistryConfig for the store under test; with etcd, a fresh key prefix per test.

    etcd leases are whole seconds: `make.ttl(memory, etcd)` picks the duration for this store."""
    import uuid

    from infinilm_svc.config import RegistryConfig

    extra: dict[str, Any] = {}
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd_server")
        extra = {"store": "etcd", "etcd_endpoints": tuple(etcd.endpoints),
                 "etcd_prefix": f"/test-{uuid.uuid4().hex[:12]}/"}

    def make(**kw: Any) -> RegistryConfig:
        return RegistryConfig(**{**extra, **kw})

    make.store = request.param  # type: ignore[attr-defined]
    make.ttl = lambda memory, etcd: etcd if request.param == "etcd" else memory  # type: ignore[attr-defined]
    return make


from engine import engine  # noqa: E402,F401  - the `engine` fixture (llama-server and tiny models)
