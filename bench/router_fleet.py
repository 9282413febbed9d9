"""Benchmark: a router watching a registry of 10,000 backends, idle and while /metrics is scraped.

Starts a fleet server (one process answering GET /health on N loopback addresses, 127.64.x.y, all
on one port), the registry and the router from the built pyz, and registers N backend records in
the registry. Once the router lists them all it measures, with no client traffic:
- the router's CPU while idle (share of one core over --idle seconds);
- its event-loop stalls: GET /health sent every 20 ms and timed from outside, and the router's own
  loop-lag monitor read from /metrics;
- health checks per second the fleet received;
- a /metrics scrape: its time and size, and GET /health latency while it is being built.
Prints the numbers. Asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchlib import ROOT, cpu_seconds, free_port, pct, register_all, wait_http

FLEET_NET = (127, 64)


def fleet_host(i: int) -> str:
    return f"{FLEET_NET[0]}.{FLEET_NET[1]}.{i // 250}.{i % 250 + 1}"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the fleet: N addresses, one tiny HTTP answer ----------------------------------------------
_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
       b'{"status":"ok"}')


class _Answer(asyncio.Protocol):
    checks = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            _Answer.checks += 1
            self.transport.write(_OK)
            if b"connection: close" in head.lower():
                self.transport.close()
                return


def serve_fleet(n: int, port: int) -> None:
    raise_fd_limit()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(n):
            await loop.create_server(_Answer, fleet_host(i), port, backlog=64)
        print("ready", flush=True)
        while True:
            await asyncio.sleep(1.0)
            print(f"checks {_Answer.checks}", flush=True)

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# -- the measurement --------------------------------------------------------------------------
def record(i: int, port: int) -> dict:
    return {"name": f"fleet-{i}-server", "host": fleet_host(i), "port": port, "status": "running",
            "metadata": {"type": "openai-api", "role": "backend", "models": ["fleet-model"],
                         "models_list": [{"id": "fleet-model", "object": "model"}]}}


class FleetChecks:
    """Reads the fleet's running count of health checks from its stdout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.count = 0
        self.proc = proc

    async def follow(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, self.proc.stdout.readline)
            if not line:
                return
            if line.startswith(b"checks "):
                self.count = int(line.split()[1])


async def health_probe(s: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        async with s.get(url) as r:
            await r.read()
        out.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(0.02)


async def print_lag(s: aiohttp.ClientSession, router: str) -> None:
    """What the router's own loop-lag monitor says (in /health)."""
    async with s.get(f"{router}/health") as r:
        lag = (await r.json()).get("event_loop_lag", {})
    print(f"  router's loop-lag monitor: worst stall of the last minute {lag.get('recent_max_ms')} ms; "
          f"{lag.get('gc_full_collections')} full garbage collections since start, the longest "
          f"{lag.get('gc_full_max_ms')} ms, longest of any generation {lag.get('gc_max_ms')} ms")


def loop_lag_max(metrics: str) -> str:
    m = re.search(r"^infinilm_router_event_loop_lag_max_seconds (\S+)", metrics, re.M)
    return f"{float(m.group(1)) * 1000:.1f} ms" if m else "(not exported)"


async def measure(args: argparse.Namespace, reg: str, router: str, router_pid: int, fleet: FleetChecks) -> None:
    follow = asyncio.create_task(fleet.follow())
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        t0 = time.perf_counter()
        failed = await register_all(s, reg, (record(i, args.fleet_port) for i in range(args.backends)), 32)
        print(f"registered {args.backends} backends in {time.perf_counter() - t0:.1f} s ({failed} not 201)")
        deadline = time.monotonic() + 300
        while True:
            async with s.get(f"{router}/health") as r:
                h = await r.json()
            if h["healthy_services"] == f"{args.backends}/{args.backends}":
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"router never listed every backend: {h['healthy_services']}")
            await asyncio.sleep(0.5)
        print(f"router lists {h['healthy_services']} routable {time.perf_counter() - t0:.1f} s after the first "
              "registration")
        await asyncio.sleep(args.settle)   # let a first round of checks pass

        # Idle, no request at all: CPU and health checks.
        cpu0, checks0, t0 = cpu_seconds(router_pid), fleet.count, time.perf_counter()
        await asyncio.sleep(args.idle)
        took = time.perf_counter() - t0
        cpu, checks = cpu_seconds(router_pid) - cpu0, fleet.count - checks0
        print(f"idle {took:.0f} s, no requests: router CPU {cpu / took * 100:.1f}% of a core, {checks / took:.0f} "
              f"health checks/s received by the fleet ({checks / took * args.health_interval / args.backends:.2f} "
              f"per backend per health_interval of {args.health_interval:g} s)")
        await print_lag(s, router)
        # Loop stalls seen from outside: GET /health every 20 ms.
        lat: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(health_probe(s, f"{router}/health", stop, lat))
        await asyncio.sleep(args.idle / 2)
        stop.set()
        await probe
        print(f"GET /health every 20 ms for {args.idle / 2:.0f} s ({len(lat)} probes): p50 {statistics.median(lat):.1f} "
              f"ms, p99 {pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms")

        # /metrics: time, size, /health latency while it is built.
        lat = []
        stop = asyncio.Event()
        probe = asyncio.create_task(health_probe(s, f"{router}/health", stop, lat))
        await asyncio.sleep(0.1)
        sizes, times = [], []
        for _ in range(args.scrapes):
            t = time.perf_counter()
            async with s.get(f"{router}/metrics") as r:
                body = await r.read()
            times.append(time.perf_counter() - t)
            sizes.append(len(body))
        stop.set()
        await probe
        print(f"/metrics x{args.scrapes}: {statistics.median(times) * 1000:.0f} ms each (median), "
              f"{sizes[-1] / 1e6:.1f} MB")
        print(f"GET /health during the scrapes ({len(lat)} probes): p50 {statistics.median(lat):.1f} ms, "
              f"p99 {pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms")
        await print_lag(s, router)
        print(f"router's loop-lag monitor: worst stall since start {loop_lag_max(body.decode())} (includes "
              "taking in the whole fleet at once)")
    follow.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", type=int, default=10000)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after all are listed before measuring")
    ap.add_argument("--scrapes", type=int, default=3)
    ap.add_argument("--health-interval", type=float, default=5.0)
    ap.add_argument("--router-extra", default="", help="extra [router] TOML lines")
    ap.add_argument("--debug-stalls", action="store_true",
                    help="run the router on asyncio's loop in debug mode: its log (BENCH_ROUTER_LOG) names "
                         "every callback that held the loop over 100 ms")
    ap.add_argument("--pyz", default=str(ROOT / "infinilm-svc.pyz"))
    ap.add_argument("--serve-fleet", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fleet-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_fleet:
        serve_fleet(args.serve_fleet, args.fleet_port)
        return
    raise_fd_limit()
    args.fleet_port = free_port()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fleet = subprocess.Popen([sys.executable, __file__, "--serve-fleet", str(args.backends),
                                      "--fleet-port", str(args.fleet_port)], stdout=subprocess.PIPE)
            procs.append(fleet)
            if fleet.stdout.readline().strip() != b"ready":
                raise SystemExit("the fleet server did not start")
            rport, xport = free_port(), free_port()
            (Path(tmp) / "registry.toml").write_text(
                f'[registry]\nbind = "127.0.0.1"\nport = {rport}\nprobe_interval = 0\nheartbeat_ttl = 3600\n'
                f'expire_after = 3600\nmax_services = {args.backends + 100}\n')
            (Path(tmp) / "router.toml").write_text(
                f'[router]\nbind = "127.0.0.1"\nport = {xport}\nregistry_url = "http://127.0.0.1:{rport}"\n'
                f'health_interval = {args.health_interval}\naccess_log = false\n{args.router_extra}\n')
            log = open(os.environ.get("BENCH_ROUTER_LOG", os.devnull), "wb")
            for role in ("registry", "router"):
                env = dict(os.environ)
                if role == "router" and args.debug_stalls:
                    # asyncio's debug mode logs each callback that held the loop over 100 ms
                    env.update(INFINILM_LOOP="asyncio", PYTHONASYNCIODEBUG="1")
                procs.append(subprocess.Popen([sys.executable, args.pyz, "--config", str(Path(tmp) / f"{role}.toml")],
                                              stdout=subprocess.DEVNULL, stderr=log, env=env))
            wait_http(f"http://127.0.0.1:{rport}/health")
            wait_http(f"http://127.0.0.1:{xport}/health")
            asyncio.run(measure(args, f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{xport}", procs[-1].pid,
                                FleetChecks(fleet)))
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    main()
