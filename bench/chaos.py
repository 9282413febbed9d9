"""Benchmark: what each fault costs the clients of a running deployment, injected in turn under load.

Starts, from the built pyz on loopback: a registry, a router, N babysitters each running a mock
backend of the model `chaos-main`, and one more babysitter whose backend is the only one of
`chaos-solo`. Several clients send plain and streamed chat requests through the router at a steady
rate (a share of them to `chaos-solo`) while the faults below are injected one after another, each
given time to recover before the next:

    hang             SIGSTOP of one chaos-main backend for --hang-seconds, then SIGCONT
    backend-kill     kill -9 of one chaos-main backend (its babysitter starts it again)
    babysitter-kill  kill -9 of one babysitter (its backend must die with it); the bench starts the
                     babysitter again at once, as systemd would
    registry-restart the registry (no state_file) stopped and started again on its port, empty
    registry-kill9   kill -9 of the registry running with a state_file, during a burst of
                     registrations, and a restart: every acknowledged registration must be back
    router-restart   rolling restart: a new router on the same port (SO_REUSEPORT), then SIGTERM
                     to the old one, which drains and exits
    solo-loss        kill -9 of the only backend of chaos-solo (the one fault where requests fail)

Prints one table row per fault (requests in flight during the fault, failed, slowest, time until
the fault was detected and until it was recovered from) and a total. Asserts nothing. Everything it
starts is stopped at the end, on Ctrl-C and on an error too (and, through a parent-death signal,
if the bench itself is killed).

    .venv/bin/python bench/chaos.py [--duration-per-fault 30] [--rate 30] [--faults a,b] [--seed 1]
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "infinilm-svc.pyz"
HOST = "127.0.0.1"
MAIN, SOLO = "chaos-main", "chaos-solo"
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")
FAULTS = ("hang", "backend-kill", "babysitter-kill", "registry-restart", "registry-kill9", "router-restart",
          "solo-loss")
_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_bench() -> None:
    """In the child between fork and exec: SIGTERM when the bench dies, however it dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(pair: bool = False) -> int:
    """A free loopback port; with pair=True, P such that P+1 is free too (a babysitter's API port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as s2:
            try:
                s2.bind((HOST, port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- the deployment
class Cluster:
    """The processes of one deployment, by role, and every process ever started (for the teardown)."""

    def __init__(self, work: Path, backends: int, restart_delay: float, mock_options: list[str]) -> None:
        self.work = work
        self.registry_port = free_port()
        self.router_port = free_port()
        self.registry_url = f"http://{HOST}:{self.registry_port}"
        self.router_url = f"http://{HOST}:{self.router_port}"
        self.babysitters = {f"main-{i + 1}": free_port(pair=True) for i in range(backends)}
        self.babysitters["solo-1"] = free_port(pair=True)
        self.restart_delay = restart_delay
        self.mock_options = mock_options
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: list[subprocess.Popen] = []
        self.backend_pids: set[int] = set()   # every backend pid seen, checked dead at the end
        self.stopped: set[int] = set()        # SIGSTOPped pids, continued before the teardown
        self.registry_with_state: bool | None = None
        self.router_name = ""
        self.routers = 0

    def spawn(self, key: str, config: Path) -> subprocess.Popen:
        log = open(self.work / f"{key}.log", "ab")
        try:
            p = subprocess.Popen([sys.executable, str(PYZ), "--config", str(config), "--log-level", "warning"],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, preexec_fn=_die_with_bench, cwd=self.work)
        finally:
            log.close()
        self.procs[key] = p
        self.started.append(p)
        return p

    def start_registry(self, state: bool) -> None:
        cfg = self.work / ("registry-state.toml" if state else "registry.toml")
        cfg.write_text(f'[registry]\nbind = "{HOST}"\nport = {self.registry_port}\nprobe_interval = 0\n'
                       + (f'state_file = "{self.work / "registry.db"}"\n' if state else ""))
        self.spawn("registry", cfg)
        self.registry_with_state = state

    def start_router(self) -> str:
        self.routers += 1
        name = f"chaos-router-{self.routers}"
        cfg = self.work / f"{name}.toml"
        cfg.write_text(f'[router]\nbind = "{HOST}"\nport = {self.router_port}\nregistry_url = "{self.registry_url}"\n'
                       f'name = "{name}"\naccess_log = false\n')
        self.spawn(name, cfg)
        self.router_name = name
        return name

    def start_babysitter(self, name: str) -> None:
        port = self.babysitters[name]
        model = SOLO if name.startswith("solo") else MAIN
        opts = ", ".join(json.dumps(o) for o in self.mock_options)
        cfg = self.work / f"{name}.toml"
        cfg.write_text(f'name = "{name}"\nhost = "{HOST}"\nbind = "{HOST}"\nport = {port}\n'
                       f'registry_url = "{self.registry_url}"\n'
                       f'[babysitter]\nrestart_delay = {self.restart_delay}\nlog_dir = "{self.work / "logs"}"\n'
                       f'[backend]\ntype = "mock"\nmodels = ["{model}"]\nmock_options = [{opts}]\n')
        self.spawn(name, cfg)

    def backend_names(self) -> list[str]:
        return [f"{b}-server" for b in self.babysitters]

    def teardown(self) -> list[str]:
        """SIGTERM to everything started (each babysitter stops its backend), SIGKILL to what is still
        up 20 s later; returns what had to be killed, backends that outlived their babysitter included."""
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for p in self.started:
            if p.poll() is None:
                _signal_group(p.pid, signal.SIGTERM)
        killed = []
        deadline = time.monotonic() + 20
        for p in self.started:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(f"{_key(self, p)} (pid {p.pid})")
                _signal_group(p.pid, signal.SIGKILL)
                p.wait()
        for pid in self.backend_pids:   # a backend outlives its babysitter only if something is wrong
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                killed.append(f"backend pid {pid}")
                _signal_group(pid, signal.SIGKILL)
        return killed


def _key(cluster: Cluster, p: subprocess.Popen) -> str:
    for k, q in cluster.procs.items():
        if q is p:
            return k
    return "old process"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- the load
@dataclass
class Request:
    start: float
    end: float
    ok: bool
    why: str
    model: str
    stream: bool


def check_stream(text: str) -> tuple[bool, str]:
    """A stream is good when it ends with one data: [DONE], carries no error event, and has content."""
    events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return False, "stream without [DONE]"
    content = []
    for e in events[:-1]:
        try:
            obj = json.loads(e)
        except ValueError:
            return False, "malformed stream event"
        if "error" in obj:
            return False, "error event in stream"
        for c in obj.get("choices") or ():
            content.append((c.get("delta") or {}).get("content") or "")
    return (True, "") if "".join(content) else (False, "stream without content")


class Load:
    """Clients sending plain and streamed chat requests at a steady total rate; every request recorded."""

    def __init__(self, url: str, rate: float, clients: int, solo_share: float, seed: int, new_connections: bool) -> None:
        self.url = url + "/v1/chat/completions"
        self.rate, self.clients, self.solo_share, self.seed = rate, clients, solo_share, seed
        self.new_connections = new_connections
        self.requests: list[Request] = []
        self.stop = asyncio.Event()

    async def client(self, k: int) -> None:
        """One client's session: a request every clients/rate seconds (open loop: a slow answer does
        not hold back the next request), each on a free keep-alive connection or a new one."""
        rng = random.Random(self.seed * 1000 + k)
        period = self.clients / self.rate
        due = time.monotonic() + rng.random() * period
        connector = aiohttp.TCPConnector(force_close=self.new_connections, limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        pending: set[asyncio.Task] = set()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
            try:
                while not self.stop.is_set():
                    wait = due - time.monotonic()
                    if wait > 0:
                        try:
                            await asyncio.wait_for(self.stop.wait(), wait)
                            break
                        except asyncio.TimeoutError:
                            pass
                    due += period
                    model = SOLO if rng.random() < self.solo_share else MAIN
                    task = asyncio.create_task(self.one(s, model, rng.random() < 0.5))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*pending)
            finally:
                for t in pending:
                    t.cancel()

    async def one(self, s: aiohttp.ClientSession, model: str, stream: bool) -> None:
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "tell me about faults"}]}
        t0 = time.monotonic()
        ok, why = False, ""
        try:
            async with s.post(self.url, json=body) as r:
                text = (await r.read()).decode("utf-8", "replace")
                if r.status != 200:
                    why = f"HTTP {r.status}"
                elif stream:
                    ok, why = check_stream(text)
                else:
                    try:
                        ok = bool(json.loads(text)["choices"][0]["message"]["content"])
                        why = "" if ok else "answer without content"
                    except (ValueError, KeyError, IndexError, TypeError):
                        why = "malformed answer"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            why = type(exc).__name__
        self.requests.append(Request(t0, time.monotonic(), ok, why, model, stream))

    def window(self, t0: float, t1: float) -> list[Request]:
        """The requests in flight at any moment between t0 and t1."""
        return [r for r in self.requests if r.start <= t1 and r.end >= t0]


# ----------------------------------------------------------------------------- what the roles say
@dataclass
class Snapshot:
    t: float
    router: dict[str, tuple[bool, int | None]] | None     # backend -> (routable, pid); None: no answer
    registry: dict[str, str] | None                      # record name -> status; None: no answer


class Monitor:
    """Polls the router's and the registry's tables every 0.1 s; faults wait on its snapshots."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.snap = Snapshot(0.0, None, None)
        self.history: list[Snapshot] = []

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout) as s:
            while True:
                router = await self._get(s, self.cluster.router_url + "/services")
                registry = await self._get(s, self.cluster.registry_url + "/services")
                self.snap = Snapshot(
                    time.monotonic(),
                    None if router is None else {b["name"]: (bool(b["healthy"]), (b.get("metadata") or {}).get("pid"))
                                                 for b in router["services"]},
                    None if registry is None else {r["name"]: r.get("status") for r in registry["services"]})
                self.history.append(self.snap)
                await asyncio.sleep(0.1)

    @staticmethod
    async def _get(s: aiohttp.ClientSession, url: str) -> dict | None:
        try:
            async with s.get(url) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async def until(self, pred: Callable[[Snapshot], bool], timeout: float) -> float | None:
        """The time of the first snapshot (taken from now on) where pred holds; None after timeout."""
        deadline = time.monotonic() + timeout
        seen = self.snap
        while time.monotonic() < deadline:
            if self.snap is not seen:
                seen = self.snap
                if pred(seen):
                    return seen.t
            await asyncio.sleep(0.02)
        return None

    def all_routable(self, snap: Snapshot, not_pid: tuple[str, int] | None = None) -> bool:
        if snap.router is None:
            return False
        for name in self.cluster.backend_names():
            routable, pid = snap.router.get(name, (False, None))
            if not routable or (not_pid and not_pid[0] == name and pid == not_pid[1]):
                return False
        return True

    def registry_complete(self, snap: Snapshot) -> bool:
        """Every babysitter's two records say running, and the current router is listed."""
        if snap.registry is None or self.cluster.router_name not in snap.registry:
            return False
        return all(snap.registry.get(n) == "running" and snap.registry.get(n + "-server") == "running"
                   for n in self.cluster.babysitters)

    def min_routable(self, t0: float, t1: float, model_prefix: str = "main-") -> int | None:
        counts = [sum(1 for n, (ok, _) in s.router.items() if ok and n.startswith(model_prefix))
                  for s in self.history if t0 <= s.t <= t1 and s.router is not None]
        return min(counts) if counts else None


async def babysitter_status(port: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async with s.get(f"http://{HOST}:{port + 1}/status") as r:
            return await r.json()


async def wait_exit(p: subprocess.Popen, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while p.poll() is None:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)
    return time.monotonic()


async def wait_dead(pid: int, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)
    return time.monotonic()


# ----------------------------------------------------------------------------- the faults
@dataclass
class Outcome:
    """One fault's times (monotonic; None when it did not happen) and what else was seen."""
    label: str
    t0: float
    detected: float | None = None
    recovered: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    cluster: Cluster
    monitor: Monitor
    rng: random.Random
    args: argparse.Namespace

    def victim(self) -> str:
        return self.rng.choice([b for b in self.cluster.babysitters if b.startswith("main-")])


def _out_of_rotation(ctx: Context, name: str) -> Callable[[Snapshot], bool]:
    return lambda s: s.router is not None and not s.router.get(name, (False, None))[0]


async def fault_hang(ctx: Context) -> Outcome:
    bs = ctx.victim()
    name = f"{bs}-server"
    pid = (await babysitter_status(ctx.cluster.babysitters[bs]))["pid"]
    ctx.cluster.backend_pids.add(pid)
    out = Outcome(f"hang: SIGSTOP {ctx.args.hang_seconds:g} s", time.monotonic())
    os.kill(pid, signal.SIGSTOP)
    ctx.cluster.stopped.add(pid)
    unresponsive = asyncio.create_task(ctx.monitor.until(lambda s: (s.registry or {}).get(name) == "unresponsive",
                                                         ctx.args.hang_seconds))
    out.detected = await ctx.monitor.until(_out_of_rotation(ctx, name), ctx.args.hang_seconds)
    await asyncio.sleep(max(0.0, out.t0 + ctx.args.hang_seconds - time.monotonic()))
    if alive(pid):
        os.kill(pid, signal.SIGCONT)
        out.notes.append("continued by SIGCONT")
    else:
        out.notes.append("its babysitter restarted it before the SIGCONT")
    ctx.cluster.stopped.discard(pid)
    if (t := await unresponsive) is not None:
        out.notes.append(f"registry: unresponsive after {t - out.t0:.1f} s")
    out.recovered = await ctx.monitor.until(ctx.monitor.all_routable, ctx.args.recovery_timeout)
    return out


async def _kill_backend(ctx: Context, bs: str, label: str) -> Outcome:
    name = f"{bs}-server"
    pid = (await babysitter_status(ctx.cluster.babysitters[bs]))["pid"]
    ctx.cluster.backend_pids.add(pid)
    out = Outcome(label, time.monotonic())
    os.kill(pid, signal.SIGKILL)
    out.detected = await ctx.monitor.until(_out_of_rotation(ctx, name), ctx.args.recovery_timeout)
    out.recovered = await ctx.monitor.until(lambda s: ctx.monitor.all_routable(s, (name, pid)), ctx.args.recovery_timeout)
    return out


async def fault_backend_kill(ctx: Context) -> Outcome:
    return await _kill_backend(ctx, ctx.victim(), "backend kill -9")


async def fault_solo_loss(ctx: Context) -> Outcome:
    out = await _kill_backend(ctx, "solo-1", f"only backend of {SOLO} kill -9")
    out.notes.append("failures expected")
    return out


async def fault_babysitter_kill(ctx: Context) -> Outcome:
    bs = ctx.victim()
    name = f"{bs}-server"
    pid = (await babysitter_status(ctx.cluster.babysitters[bs]))["pid"]
    ctx.cluster.backend_pids.add(pid)
    proc = ctx.cluster.procs[bs]
    out = Outcome("babysitter kill -9", time.monotonic())
    proc.send_signal(signal.SIGKILL)
    await wait_exit(proc, 10)
    ctx.cluster.start_babysitter(bs)   # as systemd would, at once
    gone = await wait_dead(pid, 10)
    out.notes.append(f"backend died with it after {gone - out.t0:.2f} s" if gone else "backend ORPHANED (alive 10 s later)")
    out.detected = await ctx.monitor.until(_out_of_rotation(ctx, name), ctx.args.recovery_timeout)
    out.recovered = await ctx.monitor.until(lambda s: ctx.monitor.all_routable(s, (name, pid)), ctx.args.recovery_timeout)
    return out


async def _restart_registry(ctx: Context, sig: int, state: bool) -> None:
    proc = ctx.cluster.procs["registry"]
    proc.send_signal(sig)
    if await wait_exit(proc, 30) is None:
        proc.kill()
        await wait_exit(proc, 10)
    ctx.cluster.start_registry(state)


async def _recovered_registry(ctx: Context, out: Outcome | None = None) -> float | None:
    """When the table is complete again; notes when the babysitters' records alone were (the router
    registers again at its own next heartbeat, which routing does not wait for)."""
    answering = asyncio.create_task(ctx.monitor.until(lambda s: s.registry is not None, ctx.args.recovery_timeout))
    babysitters = asyncio.create_task(ctx.monitor.until(
        lambda s: s.registry is not None and all(s.registry.get(n) == s.registry.get(n + "-server") == "running"
                                                 for n in ctx.cluster.babysitters), ctx.args.recovery_timeout))
    done = await ctx.monitor.until(lambda s: ctx.monitor.registry_complete(s) and ctx.monitor.all_routable(s),
                                   ctx.args.recovery_timeout)
    up, t = await answering, await babysitters
    if out is not None and up is not None and t is not None:
        out.notes.append(f"the registry answered at +{up - out.t0:.1f} s, every babysitter's records were back "
                         f"at +{t - out.t0:.1f} s")
    return done


async def fault_registry_restart(ctx: Context) -> Outcome:
    if ctx.cluster.registry_with_state:
        await _prepare_registry(ctx, state=False)
    out = Outcome("registry restart, no state_file", time.monotonic())
    await _restart_registry(ctx, signal.SIGTERM, state=False)
    out.recovered = await _recovered_registry(ctx, out)
    low = ctx.monitor.min_routable(out.t0, out.recovered or time.monotonic())
    out.notes.append(f"router kept >= {low} of {ctx.args.backends} {MAIN} backends routable")
    return out


async def _prepare_registry(ctx: Context, state: bool) -> None:
    """Not measured: restart the registry into the mode a fault needs, and let everything settle."""
    print(f"  (preparation, not measured: registry restarted {'with' if state else 'without'} a state_file)", flush=True)
    await _restart_registry(ctx, signal.SIGTERM, state)
    if await _recovered_registry(ctx) is None:
        raise RuntimeError("the registry did not come back after the preparation restart")
    await asyncio.sleep(2)


async def fault_registry_kill9(ctx: Context) -> Outcome:
    if not ctx.cluster.registry_with_state:
        await _prepare_registry(ctx, state=True)
    acked: list[str] = []
    stop = asyncio.Event()

    async def writer(k: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            i = 0
            while not stop.is_set():
                name = f"chaos-probe-{k}-{i}"
                i += 1
                try:
                    async with s.post(ctx.cluster.registry_url + "/services", json={
                            "name": name, "host": HOST, "port": 9, "metadata": {"type": "chaos-probe"}}) as r:
                        if 200 <= r.status < 300:
                            acked.append(name)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)

    writers = [asyncio.create_task(writer(k)) for k in range(4)]
    await asyncio.sleep(2)   # the burst is under way
    out = Outcome("registry kill -9, state_file", time.monotonic())
    ctx.cluster.procs["registry"].send_signal(signal.SIGKILL)
    await wait_exit(ctx.cluster.procs["registry"], 10)
    stop.set()
    await asyncio.gather(*writers)
    ctx.cluster.start_registry(True)
    out.recovered = await _recovered_registry(ctx, out)
    if out.recovered is not None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(ctx.cluster.registry_url + "/services") as r:
                present = {rec["name"] for rec in (await r.json())["services"]}
            lost = [n for n in acked if n not in present]
            out.notes.append(f"{len(lost)} of {len(acked)} acknowledged registrations lost")
            gate = asyncio.Semaphore(8)

            async def forget(n: str) -> None:
                async with gate, s.delete(f"{ctx.cluster.registry_url}/services/{n}") as r:
                    await r.read()
            await asyncio.gather(*(forget(n) for n in present if n.startswith("chaos-probe-")))
    return out


async def fault_router_restart(ctx: Context) -> Outcome:
    old = ctx.cluster.procs[ctx.cluster.router_name]
    out = Outcome("rolling router restart", time.monotonic())
    new = ctx.cluster.start_router()
    up = await ctx.monitor.until(lambda s: s.registry is not None and new in s.registry, ctx.args.recovery_timeout)
    if up is None:
        out.notes.append("the new router never registered")
        return out
    out.detected = up
    old.send_signal(signal.SIGTERM)
    term = time.monotonic()
    out.recovered = await wait_exit(old, 60)
    if out.recovered is not None:
        out.notes.append(f"SIGTERM to the old router at +{term - out.t0:.1f} s; it drained and exited "
                         f"({old.returncode}) {out.recovered - term:.1f} s later")
    return out


RUNNERS: dict[str, Callable[[Context], Awaitable[Outcome]]] = {
    "hang": fault_hang, "backend-kill": fault_backend_kill, "babysitter-kill": fault_babysitter_kill,
    "registry-restart": fault_registry_restart, "registry-kill9": fault_registry_kill9,
    "router-restart": fault_router_restart, "solo-loss": fault_solo_loss,
}

RECOVERY = {
    "hang": "every backend routable in the router again (SIGCONT at --hang-seconds, or the babysitter's restart "
            "after 3 missed liveness probes, whichever comes first)",
    "backend-kill": "the router routes to the backend's new process (every backend routable, a new pid)",
    "babysitter-kill": "the router routes to the new babysitter's new backend",
    "registry-restart": "the registry lists every babysitter, backend and the router again, running, and the "
                        "router routes to every backend (the router's own record comes back at its next heartbeat, "
                        "heartbeat_interval 10 s)",
    "registry-kill9": "as registry-restart",
    "router-restart": "detected = the new router is listed in the registry (then SIGTERM to the old one); "
                      "recovered = the old router has drained and exited",
    "solo-loss": f"the router routes to {SOLO}'s new backend process",
}


# ----------------------------------------------------------------------------- the run
def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def row(label: str, reqs: list[Request], t0: float | None, detected: float | None, recovered: float | None,
        notes: list[str]) -> list[str]:
    failed = [r for r in reqs if not r.ok]
    why = Counter(f"{r.model}: {r.why}" for r in failed)
    notes = notes + [f"{n} x {w}" for w, n in why.most_common(3)]
    if failed and t0 is not None:
        notes.append(f"failures ended between +{min(r.end for r in failed) - t0:.2f} and "
                     f"+{max(r.end for r in failed) - t0:.2f} s")
    slowest = max((r.end - r.start for r in reqs), default=None)
    return [label, str(len(reqs)), str(len(failed)), _fmt(slowest), _fmt(detected), _fmt(recovered), "; ".join(notes)]


def print_table(rows: list[list[str]]) -> None:
    head = ["fault", "sent", "failed", "slowest (s)", "detected (s)", "recovered (s)", "notes"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    for r in [head] + rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:], strict=True)]
        print("  ".join(cells) + "  " + r[-1], flush=True)


async def run(cluster: Cluster, args: argparse.Namespace, faults: list[str]) -> int:
    monitor = Monitor(cluster)
    poller = asyncio.create_task(monitor.run())
    load = Load(cluster.router_url, args.rate, args.clients, args.solo_share, args.seed, args.new_connections)
    ctx = Context(cluster, monitor, random.Random(args.seed), args)
    clients: list[asyncio.Task] = []
    rows: list[list[str]] = []
    try:
        t_up = await monitor.until(lambda s: monitor.all_routable(s) and monitor.registry_complete(s), 120)
        if t_up is None:
            raise RuntimeError(f"the deployment did not come up in 120 s (logs in {cluster.work})")
        clients = [asyncio.create_task(load.client(k)) for k in range(args.clients)]
        await asyncio.sleep(min(5.0, args.duration_per_fault))   # warm-up
        t_start = time.monotonic()
        for name in faults:
            out = await RUNNERS[name](ctx)
            if out.recovered is None:
                out.notes.append(f"NOT recovered within {args.recovery_timeout:g} s")
            end = out.recovered or time.monotonic()
            rows.append(row(out.label, load.window(out.t0, end), out.t0, out.detected and out.detected - out.t0,
                            out.recovered and out.recovered - out.t0, out.notes))
            print(f"  {rows[-1][0]}: sent {rows[-1][1]}, failed {rows[-1][2]}, slowest {rows[-1][3]} s, "
                  f"recovered {rows[-1][5]} s", flush=True)
            await asyncio.sleep(max(2.0, out.t0 + args.duration_per_fault - time.monotonic()))
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 90)
        t_end = time.monotonic()
    finally:
        load.stop.set()
        for t in clients + [poller]:
            t.cancel()
        await asyncio.gather(*clients, poller, return_exceptions=True)
    total = load.window(t_start, t_end)
    if args.work_dir:   # every request, for a closer look: times relative to the first fault
        with open(cluster.work / "requests.jsonl", "w") as fh:
            for r in load.requests:
                fh.write(json.dumps({**r.__dict__, "start": round(r.start - t_start, 3),
                                     "end": round(r.end - t_start, 3)}) + "\n")
    rows.append(row(f"total ({t_end - t_start:.0f} s)", total, None, None, None, []))
    print()
    print_table(rows)
    print("\nsent: requests in flight at any moment from the fault's injection until its recovery (total: the whole "
          "run after the warm-up); failed: not 200, a connection error or timeout, a malformed answer, a stream "
          "without data: [DONE] or with an error event; slowest: the longest of them, from sending to the last "
          "byte; detected: injection until the router stopped routing to the faulty backend.")
    print("recovered: injection until")
    for name in faults:
        print(f"  {name}: {RECOVERY[name]}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-per-fault", type=float, default=30.0,
                   help="seconds from one fault's injection to the next (longer if recovery takes longer)")
    p.add_argument("--rate", type=float, default=30.0, help="requests per second, all clients together")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backends", type=int, default=4, help=f"backends of {MAIN}")
    p.add_argument("--solo-share", type=float, default=0.2, help=f"share of the requests sent to {SOLO}")
    p.add_argument("--hang-seconds", type=float, default=20.0)
    p.add_argument("--recovery-timeout", type=float, default=120.0)
    p.add_argument("--restart-delay", type=float, default=1.0, help="the babysitters' restart_delay")
    p.add_argument("--chunks", type=int, default=10, help="content chunks per answer (mock --chunks)")
    p.add_argument("--chunk-interval", type=float, default=0.05, help="seconds between chunks (mock --chunk-interval)")
    p.add_argument("--new-connections", action="store_true", help="a new connection per request (default: keep-alive)")
    p.add_argument("--work-dir", help="configs, logs and requests.jsonl (every request) go here and are kept "
                        "(default: a temporary directory, removed)")
    args, _ = p.parse_known_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in RUNNERS]
    if unknown:
        p.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    if not PYZ.exists():
        p.error(f"{PYZ} is missing: run ./build.sh")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="chaos-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    migrate_before = None
    try:
        migrate_before = MIGRATE_REQ.read_text().strip()
        MIGRATE_REQ.write_text("1")
        migrate = "net.ipv4.tcp_migrate_req set to 1 for the run"
    except OSError as exc:
        migrate = f"net.ipv4.tcp_migrate_req = {migrate_before or 'absent'}, not writable ({exc.strerror})"
        migrate_before = None

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminated)

    cluster = Cluster(work, args.backends, args.restart_delay,
                      ["--chunks", str(args.chunks), "--chunk-interval", str(args.chunk_interval)])
    print(f"chaos: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start; {migrate}", flush=True)
    print(f"  {args.backends} backends of {MAIN} and 1 of {SOLO} (mock, {args.chunks} chunks {args.chunk_interval:g} s "
          f"apart), each under a babysitter (restart_delay {args.restart_delay:g} s, other keys default); one registry, "
          f"one router (defaults); {args.rate:g} req/s from {args.clients} clients "
          f"({'a new connection per request' if args.new_connections else 'keep-alive'}), half streamed, "
          f"{args.solo_share:.0%} to {SOLO}", flush=True)
    status = 1
    killed: list[str] = []
    try:
        cluster.start_registry(state=False)
        for bs in cluster.babysitters:
            cluster.start_babysitter(bs)
        cluster.start_router()
        status = asyncio.run(run(cluster, args, faults))
    except KeyboardInterrupt:
        print("chaos: interrupted; stopping everything it started", file=sys.stderr, flush=True)
        status = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the teardown itself is not interrupted
        killed = cluster.teardown()
        if migrate_before is not None:
            MIGRATE_REQ.write_text(migrate_before)
        if not args.work_dir and status == 0:
            shutil.rmtree(work, ignore_errors=True)
        elif status != 0:
            print(f"chaos: configs and logs kept in {work}", file=sys.stderr)
    print(f"chaos: stopped {len(cluster.started)} processes it started"
          + (f"; had to kill: {', '.join(killed)}" if killed else "; none needed SIGKILL"), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
