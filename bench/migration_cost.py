"""Benchmark: what a request migration costs the client, as the delay of its next chunk.

Two mock backends stream 40 chunks 5 ms apart; the first drops every stream after 20 chunks, so each
request through the router migrates once to the second. For every stream the load generator notes
when each content chunk arrived; the migration's cost is the gap between the last chunk from the
failed backend and the first from the other (failure noticed, continuation sent, the other backend's
first chunk back), printed beside the stream's usual gap between chunks. Prints numbers only.

    .venv/bin/python bench/migration_cost.py [--streams 100]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router_overhead import HOST, Procs, free_port, wait_http  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHUNKS, DIE_AFTER, INTERVAL = 40, 20, 0.005


async def one_stream(session, url: str) -> tuple[str, list[float]]:
    """(the backend the stream began on, when each content chunk arrived)."""
    body = {"model": "bench-model", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    times = []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                times.append(time.perf_counter())
        return r.headers.get("X-InfiniLM-Backend", ""), times


async def run(url: str, n: int) -> tuple[list[float], list[float], int, int]:
    import aiohttp
    costs, gaps, complete, moved = [], [], 0, 0
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            backend, t = await one_stream(session, url)
            complete += len(t) == CHUNKS
            if backend != "a-dies" or len(t) != CHUNKS:
                continue
            moved += 1
            deltas = [b - a for a, b in pairwise(t)]
            usual = statistics.median(deltas[:DIE_AFTER - 1] + deltas[DIE_AFTER:])
            gaps.append(usual)
            costs.append(deltas[DIE_AFTER - 1])
    return costs, gaps, complete, moved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=100)
    a = p.parse_args()
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="migration-bench-"))
    try:
        ports = [free_port(), free_port()]
        for name, port, knobs in (("a-dies", ports[0], ["--die-mid-stream-after", str(DIE_AFTER)]),
                                  ("b-good", ports[1], [])):
            procs.start([sys.executable, "-m", "infinilm_svc", "mock", "--name", name, "--port", str(port), "--host",
                         HOST, "--models", "bench-model", "--chunks", str(CHUNKS), "--chunk-interval", str(INTERVAL),
                         *knobs], cwd=ROOT)
            wait_http(f"http://{HOST}:{port}/health")
        static = tmp / "services.json"
        static.write_text(json.dumps({"services": [
            {"name": n, "host": HOST, "port": p, "metadata": {"type": "openai-api", "models": ["bench-model"]}}
            for n, p in zip(("a-dies", "b-good"), ports, strict=True)]}))
        rport = free_port()
        cfg = tmp / "router.toml"
        # A high eject_after_failures keeps the dying backend routable, so half the streams begin there.
        cfg.write_text(f'[router]\nbind = "{HOST}"\nport = {rport}\nstatic_services = "{static}"\naccess_log = false\n'
                       f'policy = "round_robin"\neject_after_failures = 1000000\nhealth_interval = 60.0\n')
        procs.start([sys.executable, "-m", "infinilm_svc", "--config", str(cfg)], cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
        url = f"http://{HOST}:{rport}"
        wait_http(url + "/health")
        costs, gaps, complete, moved = asyncio.run(run(url, a.streams))
        q = statistics.quantiles(costs, n=100) if len(costs) > 1 else [0.0] * 99
        print(f"{a.streams} streams of {CHUNKS} chunks {INTERVAL * 1000:g} ms apart; round robin over a backend that "
              f"drops every stream after {DIE_AFTER} chunks and one that does not; {os.cpu_count()} CPUs")
        print(f"streams complete: {complete}/{a.streams}; migrated: {moved}; usual gap between chunks: p50 "
              f"{statistics.median(gaps) * 1000:.2f} ms")
        print(f"gap before the first chunk after a migration: p50 "
              f"{statistics.median(costs) * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms, max {max(costs) * 1000:.2f} ms")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
