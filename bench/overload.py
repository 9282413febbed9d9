#!/usr/bin/env python3
"""Overload on real engines: one interactive tenant keeps a modest rate of short chats while four
batch tenants flood long prompts at several times what the engines can serve; then the same
interactive load alone, for its unloaded baseline. Prints numbers, asserts nothing.

Four llama-servers (the 256 x 4 model, --parallel 2, one thread each) behind our router, which takes
each engine's capacity from its slots (8 places). Contenders, same run, same engines (fresh for
each): `admission` (the router's queue: capacity from the slots, classes, fair shares) and
`engine-queues` (no limit at the router: every request goes straight to an engine's own queue, as
routers do without admission). The interactive tenant sends `service_tier` default, the batch ones
`flex`; a batch request refused with 429 waits its Retry-After and is sent again once.

Printed:
  interactive TTFT p50/p95 (ms), loaded and alone, and their ratio
  batch tokens per tenant and Jain's fairness index over them
  engines busy: among samples (every 50 ms) taken while requests waited (at the router, or in the
      engines' own queues), the mean share of engines working, and the share with all of them working
  5xx answers; 429s, those with a Retry-After, and how many were admitted when sent again
  cancellation: a client leaves a 3,000-token answer; time until the engine's slot is idle, p50 and
      p99 over the trials, streamed and not

    python bench/overload.py [--seconds 60] [--flood 5] [--interactive-rate 1.0] [--trials 10]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import HOST, ROOT, Engines, bench_model, engine_dir, free_port, pct, stop_all  # noqa: E402

PYZ = ROOT / "infinilm-svc.pyz"
WORDS = "ledger harbor falcon quartz meadow lantern cobalt saffron glacier orbit tundra velvet".split()


@dataclass(frozen=True)
class Fleet:
    """The engines' shape (what benchlib.Engines reads)."""

    backends: int = 4
    slots: int = 2
    cache_ram: bool = False


def start_router(contender: str, engines: Engines, slots: list[int], tmp: Path, args) -> tuple[object, str]:
    import subprocess
    port = free_port()
    services = [{"name": f"e{i}", "host": HOST, "port": int(u.rsplit(":", 1)[1]),
                 "metadata": {"type": "openai-api", "models": ["bench"], "total_slots": n}}
                for i, (u, n) in enumerate(zip(engines.urls, slots, strict=True))]
    (tmp / "services.json").write_text(json.dumps({"services": services}))
    extra = 'capacity_from_slots = false\n' if contender == "engine-queues" else ""
    node = tmp / f"router-{port}.toml"
    node.write_text(f'[router]\nbind = "{HOST}"\nport = {port}\nstatic_services = "{tmp / "services.json"}"\n'
                    f'policy = "{args.policy}"\naccess_log = false\nqueue_size = 200\nqueue_timeout = 120\n'
                    f'read_timeout = 300\nreserve_share = {args.reserve}\n{extra}')
    log = open(tmp / f"router-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, str(PYZ), "--config", str(node), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc, f"http://{HOST}:{port}"


async def router_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/stats") as r:
                if r.status == 200 and (await r.json()).get("healthy_services") == 4:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the router did not see its 4 engines")


class Run:
    """Everything measured in one contender's run."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.ttft_alone: list[float] = []
        self.tokens: dict[str, int] = {}
        self.status: dict[int, int] = {}
        self.refused = 0
        self.with_retry_after = 0
        self.retried = 0
        self.admitted_on_retry = 0
        self.busy_samples: list[bool] = []
        self.busy_share: list[float] = []     # of the engines, working, at each such sample


async def interactive(session, url: str, run: Run, rate: float, until: float, alone: bool, rng: random.Random):
    """Short streamed chats at `rate` a second (Poisson arrivals) until `until`."""
    tasks = []

    async def one() -> None:
        body = {"model": "bench", "messages": [{"role": "user", "content": "Quick question: "
                                                + " ".join(rng.choice(WORDS) for _ in range(8))}],
                "max_tokens": 16, "stream": True, "user": "interactive"}
        t0 = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            run.status[r.status] = run.status.get(r.status, 0) + 1
            first = None
            async for line in r.content:
                if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                    first = time.perf_counter() - t0
            if r.status == 200 and first is not None:
                (run.ttft_alone if alone else run.ttft).append(first)

    while time.monotonic() < until:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks, return_exceptions=True)


async def batch(session, url: str, run: Run, tenant: str, rate: float, until: float, rng: random.Random):
    """Long flex prompts at `rate` a second until `until`; a 429 is sent again once after its Retry-After."""
    tasks = []

    async def one() -> None:
        body = {"model": "bench", "service_tier": "flex", "user": tenant, "max_tokens": 48,
                "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(250))}]}
        for attempt in (0, 1):
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                data = await r.json(content_type=None)
                run.status[r.status] = run.status.get(r.status, 0) + 1
                if r.status == 200:
                    run.tokens[tenant] = run.tokens.get(tenant, 0) + data["usage"]["completion_tokens"]
                    run.admitted_on_retry += attempt
                    return
                if r.status != 429 or attempt:
                    return
                run.refused += 1
                after = r.headers.get("Retry-After")
                if after is None:
                    return
                run.with_retry_after += 1
                run.retried += 1
                await asyncio.sleep(float(after))

    while time.monotonic() < until:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks, return_exceptions=True)


async def sample_busy(session, engines: Engines, url: str, run: Run, until: float) -> None:
    """Every 50 ms: are all engines at work, while requests wait at the router (or in the engines)?"""
    while time.monotonic() < until:
        try:
            async with session.get(url + "/stats") as r:
                stats = await r.json()
            waiting = sum(q["waiting"] for q in stats.get("queues", {}).values())
            working = []
            for e in engines.urls:
                async with session.get(e + "/slots") as r:
                    slots = await r.json()
                working.append(any(s["is_processing"] for s in slots))
            # Work waits at the router (its queue), or in the engines (more in flight than slots).
            queued_in_engines = sum(s["in_flight"] for s in stats["services"]) > 8
            if waiting or queued_in_engines:
                run.busy_samples.append(all(working))
                run.busy_share.append(sum(working) / len(working))
        except (aiohttp.ClientError, KeyError, ValueError):
            pass
        await asyncio.sleep(0.05)


async def capacity(session, url: str, seconds: float) -> float:
    """Batch requests a second the engines finish with 8 at a time (closed loop)."""
    done = 0
    until = time.monotonic() + seconds
    rng = random.Random(1)

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < until:
            body = {"model": "bench", "max_tokens": 48,
                    "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(250))}]}
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                done += r.status == 200
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(8)))
    return done / (time.monotonic() - t0)


async def cancel_trial(url: str, engines: Engines, stream: bool) -> float | None:
    """Seconds from a client leaving a 3,000-token answer until no engine slot is at work."""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Go on and on."}],
                       "max_tokens": 3000, "ignore_eos": True, "stream": stream}).encode()
    s = socket.create_connection((HOST, int(url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    async with aiohttp.ClientSession() as session:
        async def working() -> bool:
            for e in engines.urls:
                async with session.get(e + "/slots") as r:
                    if any(x["is_processing"] for x in await r.json()):
                        return True
            return False
        deadline = time.monotonic() + 30
        while not await working():
            if time.monotonic() > deadline:
                s.close()
                return None
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)                 # well under way
        t0 = time.perf_counter()
        s.close()
        while await working():
            await asyncio.sleep(0.005)
        return time.perf_counter() - t0


def jain(xs: list[float]) -> float | None:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else None


async def run_contender(contender: str, args, server: Path, model: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="overload-") as tmpdir:
        tmp = Path(tmpdir)
        engines = Engines(Fleet(), tmp, server, model)
        router = None
        try:
            timeout = aiohttp.ClientTimeout(total=600)
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
                slots = await engines.ready(session)
                router, url = start_router(contender, engines, slots, tmp, args)
                await router_ready(session, url)
                cap = await capacity(session, url, args.calibrate)
                run = Run()
                rng = random.Random(7)
                until = time.monotonic() + args.seconds
                flood = args.flood * cap / 4
                await asyncio.gather(
                    interactive(session, url, run, args.interactive_rate, until, False, rng),
                    *(batch(session, url, run, f"batch-{i}", flood, until, random.Random(i)) for i in range(4)),
                    sample_busy(session, engines, url, run, until))
                # Drain what the flood left, then the interactive load alone.
                await asyncio.sleep(1)
                await interactive(session, url, run, args.interactive_rate, time.monotonic() + args.baseline,
                                  True, rng)
            cancels = {s: [t for t in [await cancel_trial(url, engines, s) for _ in range(args.trials)]
                           if t is not None] for s in (False, True)}
        finally:
            if router is not None:
                stop_all([router])  # type: ignore[list-item]
            engines.stop()
    tokens = [run.tokens.get(f"batch-{i}", 0) for i in range(4)]
    return {
        "capacity": cap, "ttft_p50": pct(run.ttft, 0.5) * 1000 if run.ttft else None,
        "ttft_p95": pct(run.ttft, 0.95) * 1000 if run.ttft else None,
        "alone_p50": pct(run.ttft_alone, 0.5) * 1000 if run.ttft_alone else None,
        "alone_p95": pct(run.ttft_alone, 0.95) * 1000 if run.ttft_alone else None,
        "tokens": tokens, "jain": jain([float(t) for t in tokens]),
        "busy": sum(run.busy_samples) / len(run.busy_samples) if run.busy_samples else None,
        "busy_mean": sum(run.busy_share) / len(run.busy_share) if run.busy_share else None,
        "samples": len(run.busy_samples), "5xx": sum(n for st, n in run.status.items() if st >= 500),
        "refused": run.refused, "with_retry_after": run.with_retry_after, "retried": run.retried,
        "admitted_on_retry": run.admitted_on_retry, "status": run.status,
        "cancel": {("streamed" if s else "not streamed"): (pct(v, 0.5) * 1000, pct(v, 0.99) * 1000, len(v))
                   for s, v in cancels.items() if v},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="overload on real engines: admission, classes, fairness, cancellation")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the overload (s)")
    ap.add_argument("--baseline", type=float, default=30.0, help="length of the interactive load alone (s)")
    ap.add_argument("--calibrate", type=float, default=15.0, help="seconds measuring the engines' capacity")
    ap.add_argument("--flood", type=float, default=5.0, help="batch arrivals, as a multiple of capacity")
    ap.add_argument("--interactive-rate", type=float, default=1.0, help="interactive chats a second")
    ap.add_argument("--trials", type=int, default=10, help="cancellation trials of each kind")
    ap.add_argument("--contenders", default="admission,engine-queues")
    ap.add_argument("--policy", default="cache_aware", help="the router's policy (default cache_aware)")
    ap.add_argument("--reserve", type=float, default=0.25, help="the router's reserve_share (default 0.25)")
    args = ap.parse_args()
    d = engine_dir()
    server = d / "bin" / "llama-server"
    if not server.exists() or not PYZ.exists():
        print(f"overload.py: needs {PYZ.name} (./build.sh) and the engine in {d} (./build.sh engine); skipped")
        return 0
    model = bench_model(d)
    results = {}
    for c in args.contenders.split(","):
        print(f"  {c}: running ({args.calibrate + args.seconds + args.baseline:.0f} s + cancellations)", file=sys.stderr)
        results[c] = asyncio.run(run_contender(c, args, server, model))
        print(f"  {c}: {json.dumps(results[c])}", file=sys.stderr)
    print(f"\n4 llama-servers ({model.name}, --parallel 2), {args.seconds:g} s of overload: interactive "
          f"{args.interactive_rate:g}/s, 4 batch tenants at {args.flood:g}x capacity in all")
    for c, r in results.items():
        f = lambda v, spec=".0f": "-" if v is None else format(v, spec)  # noqa: E731
        ratio = r["ttft_p95"] / r["alone_p95"] if r["ttft_p95"] and r["alone_p95"] else None
        print(f"\n{c} (capacity measured {r['capacity']:.2f} batch requests/s)")
        print(f"  interactive TTFT p50/p95: loaded {f(r['ttft_p50'])}/{f(r['ttft_p95'])} ms, alone "
              f"{f(r['alone_p50'])}/{f(r['alone_p95'])} ms, p95 ratio {f(ratio, '.2f')}")
        print(f"  batch tokens per tenant {r['tokens']}, Jain index {f(r['jain'], '.3f')}")
        print(f"  while work waited: engines busy {f(r['busy_mean'] and r['busy_mean'] * 100, '.1f')}% on average, "
              f"all four in {f(r['busy'] and r['busy'] * 100, '.1f')}% of {r['samples']} samples")
        print(f"  5xx {r['5xx']}; 429 {r['refused']}, with Retry-After {r['with_retry_after']}, admitted when sent "
              f"again {r['admitted_on_retry']} of {r['retried']}")
        for kind, (p50, p99, n) in r["cancel"].items():
            print(f"  cancel, {kind}: slot idle after p50 {p50:.0f} ms, p99 {p99:.0f} ms ({n} trials)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
