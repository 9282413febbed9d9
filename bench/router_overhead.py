"""Benchmark: the router's own CPU per proxied request and per streamed chunk, its added latency, its RSS.

Runs every contender as a separate process in front of the same mock backends, drives the same load
from a separate load-generator process, and reads the contender's utime+stime from /proc/<pid>/stat
around the measured run. Contenders: infinilm-svc's router (uvloop with the access log on, the
default; access log off; asyncio's own loop), the same router with 1,000 registered backends (one
mock process listening on 1,000 ports), vllm-router (if installed, e.g. `python -m venv
/tmp/vr-venv && /tmp/vr-venv/bin/pip install vllm-router`), and a bare aiohttp ClientSession proxy.
Prints numbers, and ratios against vllm-router measured in the same run.

    .venv/bin/python bench/router_overhead.py [--requests 4000] [--rounds 3] [--fleet 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import HOST, ROOT, cpu_seconds, free_port, wait_http  # noqa: F401 - also used by migration_cost

CHAT = {"model": "bench-model", "messages": [{"role": "user", "content": "Say hello in one short sentence."}]}








# ----------------------------------------------------------------------------- load generator
async def _load(url: str, n: int, c: int, stream: bool) -> dict:
    import aiohttp
    body = json.dumps({**CHAT, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    lat: list[float] = []
    errors = 0
    chunks = 0
    left = n
    conn = aiohttp.TCPConnector(limit=c, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker():
            nonlocal left, errors, chunks
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                try:
                    async with s.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                        if stream:
                            async for _ in r.content:  # one iteration per line
                                chunks += 1
                        else:
                            await r.read()
                        if r.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"n": n, "errors": errors, "wall": wall, "rps": n / wall, "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, "lines": chunks}


def loadgen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--c", type=int, required=True)
    p.add_argument("--stream", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(asyncio.run(_load(a.url, a.n, a.c, a.stream))))
    return 0


# ----------------------------------------------------------------------------- bare aiohttp proxy
def fleet_mock_main(argv: list[str]) -> int:
    """One mock app listening on many ports: a fleet of backends for the price of one process."""
    import resource

    from aiohttp import web

    from infinilm_svc.mock.app import create_app
    from infinilm_svc.mock.options import MockOptions
    first, n = int(argv[0]), int(argv[1])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def serve() -> None:
        runner = web.AppRunner(create_app(MockOptions(name="fleet", port=first, models=("bench-model",), host=HOST)),
                               access_log=None)
        await runner.setup()
        for port in range(first, first + n):
            await web.TCPSite(runner, HOST, port).start()
        await asyncio.Event().wait()
    asyncio.run(serve())
    return 0


def bare_proxy_main(argv: list[str]) -> int:
    """The simplest aiohttp proxy: one ClientSession, round robin, SSE relayed as it arrives."""
    import itertools

    import aiohttp
    from aiohttp import web
    port, backends = int(argv[0]), argv[1].split(",")
    rr = itertools.cycle(backends)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = request.app["s"]
        async with session.request(request.method, next(rr) + request.raw_path, data=body,
                                   headers={"Content-Type": request.headers.get("Content-Type", "application/json")}) as r:
            if r.headers.get("Content-Type", "").startswith("text/event-stream"):
                out = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers["Content-Type"]})
                await out.prepare(request)
                async for chunk in r.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            return web.Response(body=await r.read(), status=r.status,
                                headers={"Content-Type": r.headers.get("Content-Type", "application/json")})

    async def ctx(app):
        app["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["s"].close()

    app = web.Application()
    app.cleanup_ctx.append(ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)
    return 0


# ----------------------------------------------------------------------------- orchestration
class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL),
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self) -> None:
        for p in self.procs:
            try:
                self.stop(p)
            except ProcessLookupError:
                pass


def run_load(url: str, n: int, c: int, stream: bool) -> dict:
    args = [sys.executable, __file__, "loadgen", "--url", url, "--n", str(n), "--c", str(c)]
    if stream:
        args.append("--stream")
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def measure(pid: int | None, url: str, n: int, c: int, stream: bool) -> dict:
    run_load(url, max(200, n // 10), c, stream)  # warm-up: connections, caches
    before = cpu_seconds(pid) if pid else 0.0
    res = run_load(url, n, c, stream)
    res["cpu_s"] = (cpu_seconds(pid) - before) if pid else 0.0
    res["cpu_us_per_req"] = res["cpu_s"] / n * 1e6
    return res


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def static_file(path: Path, ports: list[int]) -> Path:
    path.write_text(json.dumps({"services": [
        {"name": f"b{i}", "host": HOST, "port": p, "metadata": {"type": "openai-api", "models": ["bench-model"]}}
        for i, p in enumerate(ports)]}))
    return path


def router_contender(tmp: Path, label: str, static: Path, access: bool, loop: str) -> tuple[str, list[str], int]:
    port = free_port()
    cfg = tmp / f"router-{port}.toml"
    # Active checks every 60 s: this measures the request path, not the health checker.
    cfg.write_text(f'[router]\nbind = "{HOST}"\nport = {port}\nstatic_services = "{static}"\n'
                   f"access_log = {'true' if access else 'false'}\nhealth_interval = 60.0\n")
    return label, [sys.executable, "-m", "infinilm_svc", "--config", str(cfg), "--log-level", "info",
                   "--loop", loop], port


def main(argv: list[str]) -> int:
    if argv and argv[0] == "loadgen":
        return loadgen_main(argv[1:])
    if argv and argv[0] == "bare-proxy":
        return bare_proxy_main(argv[1:])
    if argv and argv[0] == "fleet-mock":
        return fleet_mock_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=64, help="concurrency of the throughput runs")
    p.add_argument("--chunks", type=int, default=40, help="content chunks per streamed answer")
    p.add_argument("--chunk-interval", type=float, default=0.002,
                   help="seconds between streamed chunks at the mock, so each SSE event is its own read")
    p.add_argument("--backends", type=int, default=2)
    p.add_argument("--fleet", type=int, default=1000, help="backends of the fleet contender (0: skip it)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    p.add_argument("--bare", action="store_true", help="also run a bare aiohttp ClientSession proxy")
    p.add_argument("--only", default="", help="comma-separated words: run only the contenders whose label has one")
    p.add_argument("--vllm-router", default=shutil.which("vllm-router") or "/tmp/vr-venv/bin/vllm-router")
    a = p.parse_args(argv)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="router-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        ports = [free_port() for _ in range(a.backends)]
        backends = [f"http://{HOST}:{p}" for p in ports]

        def start_mocks(interval: float) -> list[subprocess.Popen]:
            out = [procs.start([sys.executable, "-m", "infinilm_svc", "mock", "--name", f"b{i}", "--port", str(p),
                                "--host", HOST, "--models", "bench-model", "--chunks", str(a.chunks),
                                "--chunk-interval", str(interval)], cwd=ROOT) for i, p in enumerate(ports)]
            for b in backends:
                wait_http(b + "/health")
            return out
        mocks = start_mocks(0.0)
        static = static_file(tmp / "services.json", ports)

        contenders = [router_contender(tmp, "infinilm-svc router (uvloop, access log)", static, True, "uvloop"),
                      router_contender(tmp, "infinilm-svc router, access log off", static, False, "uvloop"),
                      router_contender(tmp, "infinilm-svc router, asyncio loop", static, True, "asyncio")]
        if a.fleet:
            first = 20000 + os.getpid() % 20000
            procs.start([sys.executable, __file__, "fleet-mock", str(first), str(a.fleet)], cwd=ROOT, env=env)
            wait_http(f"http://{HOST}:{first + a.fleet - 1}/health", 60)
            fleet = static_file(tmp / "fleet.json", list(range(first, first + a.fleet)))
            contenders.append(router_contender(tmp, f"infinilm-svc router, {a.fleet} backends", fleet, True, "uvloop"))
        if a.bare:
            port = free_port()
            contenders.append(("bare aiohttp proxy", [sys.executable, __file__, "bare-proxy", str(port),
                                                      ",".join(backends)], port))
        vllm = "vllm-router (Rust)"
        if os.path.exists(a.vllm_router):
            port = free_port()
            contenders.append((vllm, [a.vllm_router, "--host", HOST, "--port", str(port), "--policy", "round_robin",
                                      "--log-level", "warning", "--worker-urls", *backends], port))
        else:
            print(f"vllm-router not found at {a.vllm_router}: skipped")

        if a.only:
            words = [w.strip() for w in a.only.split(",") if w.strip()]
            contenders = [c for c in contenders if any(w in c[0] for w in words)]
        print(f"backends: {a.backends} mocks ({a.fleet} in the fleet row); {a.requests} requests at concurrency "
              f"{a.concurrency}; streams of {a.chunks} content chunks {a.chunk_interval * 1000:g} ms apart; "
              f"{a.rounds} rounds (medians); {os.cpu_count()} CPUs\n")
        direct = {"plain": measure(None, backends[0], a.requests, a.concurrency, False),
                  "serial": measure(None, backends[0], 300, 1, False)}
        running = []
        for label, args, port in contenders:
            proc = procs.start(args, cwd=ROOT, stderr=open(tmp / f"{port}.log", "wb"), env=env)
            url = f"http://{HOST}:{port}"
            try:
                wait_http(url + "/health", 60)
            except RuntimeError as exc:
                print(f"{label}: did not start ({exc}); see {tmp / f'{port}.log'}")
                procs.stop(proc)
                continue
            running.append((label, proc, url))
        # Rounds interleave the contenders so that noise from other load on the machine spreads
        # over all of them; each figure is the median over the rounds.
        results: dict[str, list] = {label: [] for label, _, _ in running}
        for _ in range(a.rounds):
            for label, proc, url in running:
                plain = measure(proc.pid, url, a.requests, a.concurrency, False)
                serial = measure(proc.pid, url, 300, 1, False)
                results[label].append([plain, None, serial])
        rss = {label: rss_mb(proc.pid) for label, proc, _ in running}
        # Streams: the same mocks restarted on the same ports with a pause between chunks, so each
        # SSE event reaches the router as its own read (as tokens do from a real backend).
        for m in mocks:
            procs.stop(m)
        mocks = start_mocks(a.chunk_interval)
        for i in range(a.rounds):
            for label, proc, url in running:
                if "backends" in label:   # the fleet mock streams without pauses: no per-chunk figure
                    results[label][i][1] = results[label][i][0]
                    continue
                results[label][i][1] = measure(proc.pid, url, a.requests // 8, a.concurrency, True)
        med = statistics.median
        events = a.chunks + 3  # role delta, content chunks, final chunk, [DONE]
        rows = {}
        for label, runs in results.items():
            plain = {k: med(r[0][k] for r in runs) for k in ("cpu_us_per_req", "rps", "p50_ms", "p99_ms")}
            stream = {k: med(r[1][k] for r in runs) for k in ("cpu_us_per_req",)}
            serial = {k: med(r[2][k] for r in runs) for k in ("p50_ms", "p99_ms")}
            per_chunk = max(0.0, stream["cpu_us_per_req"] - plain["cpu_us_per_req"]) / events
            errs = sum(r[0]["errors"] + r[1]["errors"] + r[2]["errors"] for r in runs)
            rows[label] = (plain, stream, serial, per_chunk, errs)
        d1, d64 = direct["serial"], direct["plain"]
        print(f"{'contender':42} {'CPU µs/req':>10} {'µs/chunk':>8} {'+p50 c1':>8} {'+p99 c1':>8} "
              f"{'+p50 c' + str(a.concurrency):>9} {'+p99 c' + str(a.concurrency):>9} {'req/s':>7} {'RSS MB':>7} {'errors':>6}")
        print(f"{'direct to backend':42} {'-':>10} {'-':>8} {d1['p50_ms']:8.2f} {d1['p99_ms']:8.2f} "
              f"{d64['p50_ms']:9.2f} {d64['p99_ms']:9.2f} {d64['rps']:7.0f} {'-':>7} {0:6d}")
        for label, (plain, _stream, serial, per_chunk, errs) in rows.items():
            chunk = "-" if "backends" in label else f"{per_chunk:8.1f}"
            print(f"{label:42} {plain['cpu_us_per_req']:10.1f} {chunk:>8} {serial['p50_ms'] - d1['p50_ms']:8.2f} "
                  f"{serial['p99_ms'] - d1['p99_ms']:8.2f} {plain['p50_ms'] - d64['p50_ms']:9.2f} "
                  f"{plain['p99_ms'] - d64['p99_ms']:9.2f} {plain['rps']:7.0f} {rss[label]:7.1f} {int(errs):6d}")
        print("\nCPU = router process utime+stime over the measured run / requests; per chunk = a streamed "
              "request's CPU beyond a plain one's, over its SSE events. +pNN = latency through the router minus "
              "direct, at concurrency 1 and the throughput concurrency. Medians over the rounds.")
        ours = rows.get(contenders[0][0])
        if ours is not None and vllm in rows:
            v = rows[vllm]
            print(f"\nratio to vllm-router (same run): CPU per request {ours[0]['cpu_us_per_req'] / v[0]['cpu_us_per_req']:.2f}x"
                  f" (target <= 0.7x); CPU per chunk {ours[3] / v[3]:.2f}x (target <= 0.8x)" if v[3] else "")
        fleet_label = f"infinilm-svc router, {a.fleet} backends"
        if ours is not None and fleet_label in rows:
            print(f"{a.fleet} backends vs {a.backends}: CPU per request "
                  f"{rows[fleet_label][0]['cpu_us_per_req'] / ours[0]['cpu_us_per_req']:.2f}x (target <= 1.10x)")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
