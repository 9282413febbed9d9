"""Benchmark: the memory store with a state file holding 10,000 records, under a stream of changes.

Starts the registry from the built pyz with `state_file` in a temporary directory, registers N
services (each answered only once it is on disk), then for D seconds C clients send heartbeats
that change a record's status (each one a write to the file) while a prober sends GET /health
every 10 ms and times it: how much the writes cost the registry's event loop. Prints the
registration and change rates, the registry's CPU per change, and /health latency percentiles.
Asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchlib import ROOT, cpu_seconds, free_port, pct, register_all


def record(i: int) -> dict:
    return {"name": f"bench-{i}-server", "host": "127.0.0.1", "port": 10000 + i % 50000, "status": "running",
            "metadata": {"type": "openai-api", "role": "backend", "parent_service": f"bench-{i}",
                         "babysitter": "enhanced", "babysitter_url": f"http://127.0.0.1:{10001 + i % 50000}",
                         "models": ["model-1"], "models_list": [{"id": "model-1", "object": "model"}],
                         "state": "running", "restarts": 0, "pid": 1000 + i, "started_at": 1.7e9}}


async def run(args: argparse.Namespace, base: str, pid: int) -> None:
    conn = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        t0 = time.perf_counter()
        failed = await register_all(s, base, (record(i) for i in range(args.services)), args.concurrency)
        took = time.perf_counter() - t0
        print(f"registered {args.services} services in {took:.1f} s ({args.services / took:.0f}/s, "
              f"{failed} not 201), each answered once on disk")

        stop = time.perf_counter() + args.duration
        changes = 0

        async def churn(w: int) -> None:
            nonlocal changes
            i = w
            while time.perf_counter() < stop:
                status = "starting" if (i // args.services) % 2 == 0 else "running"
                async with s.post(f"{base}/services/bench-{i % args.services}-server/heartbeat",
                                  json={"status": status}) as r:
                    await r.read()
                    changes += r.status == 200
                i += args.concurrency

        lat: list[float] = []

        async def prober() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with s.get(f"{base}/health") as r:
                    await r.read()
                lat.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(0.01)

        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(prober(), *(churn(w) for w in range(args.concurrency)))
        took, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        print(f"changes: {changes} in {took:.1f} s ({changes / took:.0f}/s), registry CPU {cpu / max(changes, 1) * 1e3:.2f} ms "
              f"per change ({cpu / took:.2f} of a core)")
        print(f"GET /health during the changes ({len(lat)} probes): p50 {statistics.median(lat):.1f} ms, "
              f"p99 {pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms")
        if os.path.exists(args.state):
            print(f"state file: {os.path.getsize(args.state) / 1e6:.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--pyz", default=str(ROOT / "infinilm-svc.pyz"))
    ap.add_argument("--no-state-file", action="store_true", help="the same load without a state file, to compare")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        args.state = os.path.join(tmp, "registry.db")
        cfg = Path(tmp) / "registry.toml"
        cfg.write_text(f'[registry]\nbind = "127.0.0.1"\nport = {port}\nprobe_interval = 0\n'
                       f'heartbeat_ttl = 600\nexpire_after = 600\n'
                       + ("" if args.no_state_file else f'state_file = "{args.state}"\n'))
        proc = subprocess.Popen([sys.executable, args.pyz, "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=open(os.environ.get("BENCH_REGISTRY_LOG", os.devnull), "wb"))
        try:
            base = f"http://127.0.0.1:{port}"
            import urllib.request
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.05)
            asyncio.run(run(args, base, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
