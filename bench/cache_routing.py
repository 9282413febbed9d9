#!/usr/bin/env python3
"""Cache routing measured on real engines: the same fresh llama-servers and the same workload behind
each contender (our policies, sglang-router and vllm-router with their cache_aware policy), every
contender in the same run, several repetitions, medians printed. Prints numbers, asserts nothing.

For every run: BACKENDS llama-servers start fresh (cold caches) on a random llama model 256 wide and
4 blocks deep (prefill costs real time on one thread), the contender starts in front of them, the
workload runs, and both stop. Workloads (each takes its shape from the options):

  a  capacity-bound: GROUPS groups of conversations sharing a ~1,900-character system prompt,
     CONVERSATIONS per group, TURNS turns each (every turn resends the conversation), CONCURRENCY
     conversations at a time, 8 tokens generated per turn; --parallel SLOTS, --cache-ram 0, so
     only the slots hold prompts.
  b  accumulating context (upstream's shape): 4 conversations of 8 messages, each starting at
     ~2,048 characters and growing by ~128 a message, one prompt_cache_key per conversation.
  c  the 16-group shape with llama-server's host-memory prompt cache on: 16 groups x 2
     conversations x 4 turns, 8 at a time, --parallel 4.

Printed per workload and contender (medians of the repetitions):
  cached%     cached prompt tokens / prompt tokens, as the engines report them
  TTFT        time to the first streamed content token, p50 and p99 (ms)
  beyond      TTFT minus the engine's own prefill time (timings.prompt_ms), p50 (ms): the router's
              added time plus time queued in the engine
  router      our router's own time per request, p50 (ms; its /stats router_overhead_ms)
  spread      max / mean requests per engine (from the engines' own logs)
  precision, recall   of our cache model (its /stats), for cache_aware

Needs the pyz (./build.sh) and the engine (./build.sh engine). The peers are installed into a venv
of the bench's own (never a dependency of the product); a peer that cannot be installed is
skipped, and the table says so.

    python bench/cache_routing.py [--workloads a,b,c] [--reps 3] [--contenders ...]
        [--groups 8 --conversations 4 --turns 4 --concurrency 8 --slots 2 --backends 4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import HOST, ROOT, Engines, bench_model, engine_dir, free_port, pct, stop_all  # noqa: E402

PYZ = ROOT / "infinilm-svc.pyz"
PEERS = {"sglang": ("sglang-router", "0.3.2"), "vllm": ("vllm-router", "0.1.17")}
OURS = ("round_robin", "cache_aware")
WORDS = ("ledger invoice harbor falcon quartz meadow lantern cobalt saffron glacier orbit tundra velvet "
         "canyon ember willow pixel granite monsoon citadel prairie nectar basalt comet").split()


@dataclass(frozen=True)
class Shape:
    """One workload: what the clients send, and how the engines are started."""

    name: str
    groups: int = 8
    conversations: int = 4
    turns: int = 4
    concurrency: int = 8
    slots: int = 2
    backends: int = 4
    cache_ram: bool = False          # llama-server's host-memory prompt cache
    system_words: int = 260          # ~1,900 characters
    accumulate: bool = False         # workload b: long growing histories, prompt_cache_key
    max_tokens: int = 8

    def describe(self) -> str:
        if self.accumulate:
            what = f"{self.groups} conversations x {self.turns} messages from ~2,048 chars (+~128 a message)"
        else:
            what = f"{self.groups} groups x {self.conversations} conversations x {self.turns} turns"
        return (f"{what}, {self.concurrency} at a time; {self.backends} llama-servers, --parallel {self.slots}, "
                f"host prompt cache {'on' if self.cache_ram else 'off'}")


WORKLOADS = {
    "a": Shape("a"),
    "b": Shape("b", groups=4, conversations=1, turns=8, concurrency=4, accumulate=True),
    "c": Shape("c", groups=16, conversations=2, turns=4, concurrency=8, slots=4, cache_ram=True),
}


def peer_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "infinilm-svc" / "bench-peers"


def install_peers(wanted: list[str]) -> dict[str, str]:
    """Each wanted peer's launcher in the bench's venv (installed when missing), or why it is not."""
    venv = peer_venv()
    out: dict[str, str] = {}
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for peer in wanted:
        pkg, version = PEERS[peer]
        exe = venv / "bin" / pkg
        if not exe.exists():
            r = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                                f"{pkg}=={version}"], capture_output=True, text=True)
            if r.returncode != 0 or not exe.exists():
                out[peer] = "skipped: " + (r.stderr.strip().splitlines() or ["not installable"])[-1][:120]
                continue
        out[peer] = str(exe)
    return out


def start_router(contender: str, peers: dict[str, str], engines: Engines, slots: list[int], tmp: Path
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp / f"router-{contender}-{port}.log", "wb")
    if contender.startswith("ours:"):
        services = [{"name": f"e{i}", "host": HOST, "port": int(u.rsplit(":", 1)[1]),
                     # what a babysitter puts in the record: the engine's /props, and its arguments
                     "metadata": {"type": "openai-api", "models": ["bench"], "total_slots": n,
                                  "host_prompt_cache": engines.host_cache}}
                    for i, (u, n) in enumerate(zip(engines.urls, slots, strict=True))]
        (tmp / "services.json").write_text(json.dumps({"services": services}))
        node = tmp / f"router-{port}.toml"
        node.write_text(f'[router]\nbind = "{HOST}"\nport = {port}\nstatic_services = "{tmp / "services.json"}"\n'
                        f'policy = "{contender[5:]}"\naccess_log = false\n')
        argv = [sys.executable, str(PYZ), "--config", str(node), "--log-level",
                os.environ.get("CACHE_ROUTING_LOG", "warning")]
        if os.environ.get("CACHE_ROUTING_LOG"):
            print(f"router log: {log.name}", file=sys.stderr)
    else:
        exe = peers[contender]
        argv = [exe, *(["launch"] if contender == "sglang" else []), "--worker-urls", *engines.urls, "--policy", "cache_aware", "--host", HOST, "--port", str(port),
                "--log-level", "warn" if contender == "sglang" else "warning"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    return proc, f"http://{HOST}:{port}"


async def router_ready(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen) -> None:
    """The router answers a chat (so every peer has found its workers)."""
    deadline = time.monotonic() + 120
    body = {"model": "bench", "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the router exited with {proc.returncode}")
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                if r.status == 200:
                    await r.read()
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"the router at {url} did not route within 120 s")


def system_prompt(group: int, words: int, rng: random.Random) -> str:
    """A long system prompt whose first words already differ between groups."""
    return f"Team {group} {WORDS[group % len(WORDS)]} handbook. " + " ".join(rng.choice(WORDS) for _ in range(words))


async def one_turn(session: aiohttp.ClientSession, url: str, messages: list, extra: dict, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    ttft = None
    text: list[str] = []
    usage, timings = None, None
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for raw in resp.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices") or ():
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    usage, timings = usage or {}, timings or {}
    ttft = ttft if ttft is not None else time.perf_counter() - t0
    return {"ttft": ttft, "prompt": usage.get("prompt_tokens", 0),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "prefill_ms": timings.get("prompt_ms"), "text": "".join(text)}


async def workload(url: str, shape: Shape) -> list[dict]:
    rng = random.Random(7)
    chat = url + "/v1/chat/completions"
    results: list[dict] = []
    if shape.accumulate:
        convs = [(c, 0) for c in range(shape.groups)]
    else:
        systems = [system_prompt(g, shape.system_words, rng) for g in range(shape.groups)]
        convs = [(g, c) for g in range(shape.groups) for c in range(shape.conversations)]
        rng.shuffle(convs)
    queue: asyncio.Queue = asyncio.Queue()
    for conv in convs:
        queue.put_nowait(conv)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            g, c = queue.get_nowait()
            if shape.accumulate:
                seed = random.Random(1000 + g)
                messages = [{"role": "user", "content": " ".join(seed.choice(WORDS) for _ in range(300))[:2048]}]
                extra = {"prompt_cache_key": f"conversation-{g}"}
            else:
                messages = [{"role": "system", "content": systems[g]}]
                extra = {"user": f"g{g}-c{c}"}
            for t in range(shape.turns):
                if shape.accumulate and t:
                    messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(18))[:128]})
                elif not shape.accumulate:
                    messages.append({"role": "user", "content": f"Conversation {c}, question {t}: "
                                                                f"{' '.join(rng.choice(WORDS) for _ in range(12))}?"})
                r = await one_turn(session, chat, list(messages), extra, shape.max_tokens)
                r["turn"] = t
                results.append(r)
                messages.append({"role": "assistant", "content": r["text"]})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(shape.concurrency)))
    return results


async def ours_stats(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/stats") as r:
        stats = await r.json()
    out: dict = {"router_p50": (stats["models"].get("bench") or {}).get("router_overhead_ms", {}).get("p50")}
    models = [s["cache_model"] for s in stats["services"] if "cache_model" in s]
    if models:
        pred = sum(m["predicted_hits"] for m in models)
        eng = sum(m["engine_hits"] for m in models)
        conf = sum(m["confirmed_hits"] for m in models)
        out["precision"] = conf / pred if pred else None
        out["recall"] = conf / eng if eng else None
    return out


async def run_once(contender: str, shape: Shape, peers: dict[str, str], server: Path, model: Path) -> dict:
    keep = os.environ.get("CACHE_ROUTING_LOG")
    with tempfile.TemporaryDirectory(prefix="cache-routing-") if not keep else _kept() as tmpdir:
        tmp = Path(tmpdir)
        engines = Engines(shape, tmp, server, model)
        router = None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                slots = await engines.ready(s)
                router, url = start_router(contender, peers, engines, slots, tmp)
                await router_ready(s, url, router)
                warm = engines.requests_each()
                results = await workload(url, shape)
                extra = await ours_stats(s, url) if contender.startswith("ours:") else {}
                if os.environ.get("CACHE_ROUTING_DUMP") and contender.startswith("ours:"):
                    async with s.get(url + "/stats") as r:
                        for svc in (await r.json())["services"]:
                            print(svc["name"], json.dumps(svc.get("cache_model")), file=sys.stderr)
            per = [n - w for n, w in zip(engines.requests_each(), warm, strict=True)]
        finally:
            if router is not None:
                stop_all([router])
            engines.stop()
    prompt = sum(r["prompt"] for r in results)
    cached = sum(r["cached"] for r in results)
    ttft = [r["ttft"] for r in results]
    beyond = [r["ttft"] - r["prefill_ms"] / 1000 for r in results if r["prefill_ms"] is not None]
    first = [r for r in results if r["turn"] == 0]
    later = [r for r in results if r["turn"] > 0]
    hit = sum(1 for r in first if r["cached"] >= 32) / len(first) if first else None
    kept = sum(1 for r in later if r["cached"] >= r["prompt"] // 2) / len(later) if later else None
    split = {f"{k}_{q}": pct([r["ttft"] for r in rs], p) * 1000 if rs else None
             for k, rs in (("first", first), ("later", later)) for q, p in (("p50", 0.5), ("p90", 0.9))}
    prefill = {f"prefill_{k}": pct([r["prefill_ms"] for r in rs if r["prefill_ms"] is not None], 0.5)
               if rs else None for k, rs in (("first", first), ("later", later))}
    return {"requests": len(results), "cached": cached / prompt if prompt else 0.0, "first_hits": hit,
            "kept": kept, **split, **prefill,
            "ttft_p50": pct(ttft, 0.5) * 1000, "ttft_p99": pct(ttft, 0.99) * 1000,
            "beyond_p50": pct(beyond, 0.5) * 1000 if beyond else None,
            "spread": max(per) / (sum(per) / len(per)) if sum(per) else None, "per": per, **extra}


class _kept:
    """A directory left in place (for the logs, with CACHE_ROUTING_LOG set)."""

    def __enter__(self) -> str:
        return tempfile.mkdtemp(prefix="cache-routing-")

    def __exit__(self, *exc: object) -> None:
        pass


def median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    """`v` formatted, or a dash as wide."""
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 0) + len(suffix))
    return f"{v:{spec}}{suffix}"


def main() -> int:
    ap = argparse.ArgumentParser(description="cache routing on real engines, ours against sglang-router and vllm-router")
    ap.add_argument("--workloads", default="a,b,c", help="a, b, c (see the module's docstring), or x: the shape options")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contenders", default=",".join([*(f"ours:{p}" for p in OURS), *PEERS]))
    for opt, default in (("groups", 8), ("conversations", 4), ("turns", 4), ("concurrency", 8), ("slots", 2),
                         ("backends", 4)):
        ap.add_argument(f"--{opt}", type=int, default=None, help=f"workload shape (x: default {default}; "
                        "also overrides a, b and c)")
    ap.add_argument("--cache-ram", action="store_true", help="x: llama-server's host prompt cache on")
    args = ap.parse_args()
    d = engine_dir()
    server = d / "bin" / "llama-server"
    if not server.exists() or not PYZ.exists():
        print(f"cache_routing.py: needs {PYZ.name} (./build.sh) and the engine in {d} (./build.sh engine); skipped")
        return 0
    model = bench_model(d)
    contenders = [c for c in args.contenders.split(",") if c]
    peers = install_peers([c for c in contenders if c in PEERS])
    overrides = {k: getattr(args, k) for k in ("groups", "conversations", "turns", "concurrency", "slots", "backends")
                 if getattr(args, k) is not None}
    shapes = []
    for w in args.workloads.split(","):
        base = WORKLOADS.get(w) or Shape("x", cache_ram=args.cache_ram)
        shapes.append(replace(base, **overrides))
    versions = {p: f"{PEERS[p][0]} {PEERS[p][1]}" for p in peers if not peers[p].startswith("skipped")}
    print(f"cache_routing.py: {len(shapes)} workload(s) x {len(contenders)} contender(s) x {args.reps} repetition(s); "
          f"peers: {', '.join(f'{k}: {v}' for k, v in versions.items()) or 'none'}", file=sys.stderr)
    table: dict[tuple[str, str], list[dict]] = {}
    for shape in shapes:
        for rep in range(args.reps):
            order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]   # rotate who goes first
            for c in order:
                if c in peers and peers[c].startswith("skipped"):
                    continue
                t0 = time.monotonic()
                r = asyncio.run(run_once(c, shape, peers, server, model))
                table.setdefault((shape.name, c), []).append(r)
                print(f"  {shape.name} rep {rep + 1} {c}: cached {r['cached'] * 100:.1f}% (first turns hitting "
                      f"{fmt(r['first_hits'], '.2f')}, later turns keeping their history {fmt(r['kept'], '.2f')}), TTFT p50 "
                      f"{r['ttft_p50']:.0f} ms, p99 {r['ttft_p99']:.0f} ms, per engine {r['per']}; TTFT p50/p90 "
                      f"first {fmt(r['first_p50'], '.0f')}/{fmt(r['first_p90'], '.0f')}, later "
                      f"{fmt(r['later_p50'], '.0f')}/{fmt(r['later_p90'], '.0f')}, engine prefill p50 first "
                      f"{fmt(r['prefill_first'], '.0f')}, later {fmt(r['prefill_later'], '.0f')} "
                      f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    print(f"\nllama-server {server.parent.parent.name}, model {model.name}, "
          f"{shutil.which('nproc') and os.cpu_count()} cores; medians of {args.reps}")
    for shape in shapes:
        print(f"\nworkload {shape.name}: {shape.describe()}")
        print(f"{'contender':<18}{'cached%':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'beyond':>9}{'router':>8}"
              f"{'spread':>8}{'precision':>10}{'recall':>8}")
        for c in contenders:
            if c in peers and peers[c].startswith("skipped"):
                print(f"{c:<18}{peers[c]}")
                continue
            rows = table.get((shape.name, c), [])
            if not rows:
                continue
            cached = median(rows, "cached")
            print(f"{c:<18}{fmt(cached and cached * 100, '7.1f', '%')}{fmt(median(rows, 'ttft_p50'), '8.0f', 'ms')}"
                  f"{fmt(median(rows, 'ttft_p99'), '8.0f', 'ms')}{fmt(median(rows, 'beyond_p50'), '7.0f', 'ms')}"
                  f"{fmt(median(rows, 'router_p50'), '6.2f', 'ms')}{fmt(median(rows, 'spread'), '8.2f')}"
                  f"{fmt(median(rows, 'precision'), '10.3f')}{fmt(median(rows, 'recall'), '8.3f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
