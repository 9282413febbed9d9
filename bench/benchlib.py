"""What the benchmarks share: a process's CPU time, a free loopback port, percentiles, waiting
for a server to answer."""
from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

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
