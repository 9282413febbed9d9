"""What the tests run on: loopback ports of their own, waiting on conditions with a deadline, processes
that always die, blocking HTTP calls, and config files written from data."""
from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "infinilm-svc.pyz"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_slice() -> range:
    """The ports of this test process: outside the kernel's ephemeral range, so no outgoing
    connection and no bind to port 0 is ever given one between free_port() and the server's own
    bind; a slice of its own per event loop and xdist worker, so the runs on the two loops and their
    parallel workers never race for one."""
    eph_low, eph_high = _ephemeral_range()
    if eph_low - 10000 >= 4000:
        low, high = 10000, eph_low
    elif 65536 - (eph_high + 1) >= 4000:
        low, high = eph_high + 1, 65536
    else:  # an ephemeral range over nearly every port: share it, and the rare race, with the kernel
        low, high = 10000, 30000
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    lane = worker + (workers if os.environ.get("INFINILM_LOOP") == "asyncio" else 0)
    size = (high - low) // (2 * workers)
    return range(low + lane * size, low + (lane + 1) * size)


_SLICE = _port_slice()
# A random start, so two suites run at once on one machine rarely walk the same ports together;
# ports are handed out in order and not again until the slice wraps round.
_next = itertools.count(random.Random().randrange(len(_SLICE)))


def bindable(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (nothing listens there)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", pair: bool = False) -> int:
    """A free TCP port on `host` that no other free_port() call of this run gives out (see
    _port_slice); with pair=True, P such that P and P+1 are both free."""
    for _ in range(len(_SLICE)):
        i = next(_next) % len(_SLICE)
        port = _SLICE[i]
        if pair:
            if i + 1 == len(_SLICE):
                continue
            next(_next)  # P+1 is the caller's too
            if bindable(host, port) and bindable(host, port + 1):
                return port
        elif bindable(host, port):
            return port
    raise RuntimeError(f"no free port on {host} in {_SLICE}")


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a config file from data (tables as dicts); returns the path."""
    path.write_text(tomli_w.dumps(data))
    return path


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

    def print_log_tails(self, lines: int = 25) -> None:
        for proc, log in self.procs:
            try:
                tail = log.read_text(errors="replace").splitlines()[-lines:]
            except OSError as exc:
                tail = [f"(log unreadable: {exc})"]
            print(f"----- {log.name}: {' '.join(map(str, proc.args))[:160]} (exit {proc.returncode}); last "
                  f"{len(tail)} lines -----")
            print("\n".join(tail))

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


def http_get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """Blocking GET returning (status, parsed JSON or text); for process-level tests."""
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
