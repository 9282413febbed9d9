"""The console's data layer: polls the registry, routers and babysitters over HTTP into plain dataclasses."""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

import aiohttp

from infinilm_svc.client.registry import RegistryClient, RegistryRejected, RegistryUnavailable

HISTORY = 60            # points kept per backend for the sparklines
EXPIRED_LINGER = 30.0   # seconds a vanished record stays on screen marked "expired"
STATS_TIMEOUT = 3.0


@dataclass(frozen=True)
class Latency:
    """Latency percentiles in milliseconds (None when unknown)."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class ServiceRow:
    """One registry record, joined with the routers' statistics when it is a backend."""

    name: str
    role: str                     # babysitter, backend, router, other
    host: str
    port: int
    url: str
    state: str                    # running, starting, backoff, fatal, stopping, stopped, stale, expired
    heartbeat_age: float | None   # seconds since the last heartbeat
    healthy: bool
    restarts: int | None = None
    models: tuple[str, ...] = ()
    babysitter_url: str | None = None
    backend: str | None = None    # a babysitter's backend record name
    pid: int | None = None
    started_at: float | None = None
    requests: int | None = None
    errors: int | None = None
    in_flight: int | None = None
    latency: Latency = Latency()
    cache_hit: float | None = None  # cached prompt tokens / prompt tokens, as the engine reports them
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def matches(self, text: str) -> bool:
        """Case-insensitive substring match on what the services view shows."""
        text = text.lower().strip()
        if not text:
            return True
        hay = " ".join([self.name, self.role, self.address, self.state, " ".join(self.models)]).lower()
        return text in hay


@dataclass(frozen=True)
class ModelRow:
    """One model: where it runs and how busy it is."""

    name: str
    backends: tuple[str, ...]
    healthy: int
    requests: int | None = None
    errors: int | None = None
    rate: float | None = None     # requests per second, summed over routers
    latency: Latency = Latency()
    cache_hit: float | None = None


@dataclass(frozen=True)
class Point:
    """One sample of a backend's statistics, for the detail view's sparklines."""

    ts: float
    rate: float
    latency_p50: float


@dataclass(frozen=True)
class Snapshot:
    """Everything the console shows, as of one poll."""

    taken_at: float
    services: tuple[ServiceRow, ...]
    models: tuple[ModelRow, ...]
    routers_answered: int = 0
    router_errors: tuple[str, ...] = ()
    history: dict[str, tuple[Point, ...]] = field(default_factory=dict, compare=False)

    def service(self, name: str) -> ServiceRow | None:
        for s in self.services:
            if s.name == name:
                return s
        return None


@dataclass(frozen=True)
class LogLine:
    """One line of a backend's log, as the babysitter reports it."""

    ts: float
    stream: str
    line: str


class ActionFailed(Exception):
    """A babysitter refused or could not be reached for restart/stop/start."""


def _role(meta: dict) -> str:
    role = meta.get("role")
    if isinstance(role, str) and role:
        return role
    kind = meta.get("type")
    if kind == "openai-api":
        return "backend"
    if kind == "router":
        return "router"
    if meta.get("babysitter") == "enhanced":
        return "babysitter"
    return "other"


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def service_state(record: dict, heartbeat_age: float | None, stale_after: float) -> str:
    """The state shown for a record: its status, or `stale` when its heartbeat is late."""
    status = str(record.get("status") or "unknown")
    meta = record.get("metadata") or {}
    if meta.get("role") == "babysitter" and isinstance(meta.get("state"), str):
        status = meta["state"]
    if heartbeat_age is not None and heartbeat_age > stale_after:
        return "stale"
    if status == "running" and record.get("is_healthy") is False:
        return "stale"
    return status


def row_from_record(record: dict, now: float, stale_after: float) -> ServiceRow:
    """A ServiceRow from one registry record (router statistics are joined later)."""
    meta = record.get("metadata") or {}
    if not isinstance(meta, dict):
        meta = {}
    hb = _float(record.get("last_heartbeat"))
    age = max(0.0, now - hb) if hb is not None else None
    models = meta.get("models") or []
    role = _role(meta)
    bs_url = meta.get("babysitter_url")
    if role == "babysitter" and not bs_url:
        bs_url = record.get("url")
    return ServiceRow(
        name=str(record.get("name", "?")), role=role, host=str(record.get("host", "")),
        port=_int(record.get("port")) or 0, url=str(record.get("url") or ""),
        state=service_state(record, age, stale_after), heartbeat_age=age,
        healthy=bool(record.get("is_healthy", record.get("status") == "running")),
        restarts=_int(meta.get("restarts")), models=tuple(str(m) for m in models if m is not None),
        babysitter_url=str(bs_url) if bs_url else None,
        backend=str(meta["backend"]) if meta.get("backend") else None,
        pid=_int(meta.get("pid")), started_at=_float(meta.get("started_at")), metadata=dict(meta))


@dataclass
class _Sum:
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    weight: list = field(default_factory=list)  # [(requests, Latency)]
    seen: bool = False

    def add(self, s: dict) -> None:
        self.seen = True
        self.requests += _int(s.get("request_count")) or 0
        self.errors += _int(s.get("error_count")) or 0
        self.in_flight += _int(s.get("in_flight")) or 0
        tokens = s.get("tokens") or {}
        if isinstance(tokens, dict):
            self.prompt_tokens += _int(tokens.get("prompt")) or 0
            self.cached_tokens += _int(tokens.get("cached")) or 0
        lat = s.get("latency_ms") or {}
        if isinstance(lat, dict):
            self.weight.append((_int(s.get("request_count")) or 0,
                                Latency(_float(lat.get("p50")), _float(lat.get("p90")), _float(lat.get("p99")))))

    def cache_hit(self) -> float | None:
        """The engine-reported prompt cache hit ratio over every router (None before any prompt)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def latency(self) -> Latency:
        """Percentiles averaged over routers, weighted by requests (exact with one router)."""
        out = []
        for attr in ("p50", "p90", "p99"):
            pairs = [(n, getattr(lat, attr)) for n, lat in self.weight if getattr(lat, attr) is not None]
            total = sum(n for n, _ in pairs)
            if not pairs:
                out.append(None)
            elif total == 0:
                out.append(sum(v for _, v in pairs) / len(pairs))
            else:
                out.append(sum(n * v for n, v in pairs) / total)
        return Latency(*out)


class Poller:
    """Turns one round of HTTP calls into a Snapshot; keeps what rates and 'expired' rows need."""

    def __init__(self, session: aiohttp.ClientSession, registry_url: str, *, timeout: float = 5.0,
                 stale_after: float = 120.0, clock: Callable[[], float] = time.time) -> None:
        self.session = session
        self.registry_url = registry_url.rstrip("/")
        self.registry = RegistryClient(session, self.registry_url, timeout=timeout)
        self.stale_after = stale_after
        self.clock = clock
        self._gone: dict[str, tuple[ServiceRow, float]] = {}   # name -> (last row, first missing at)
        self._last: dict[str, ServiceRow] = {}
        self._prev_counts: dict[str, tuple[float, int]] = {}    # backend or "model:M" -> (ts, requests)
        self._history: dict[str, deque] = {}

    async def _router_stats(self, url: str) -> dict:
        timeout = aiohttp.ClientTimeout(total=STATS_TIMEOUT)
        async with self.session.get(url.rstrip("/") + "/stats", timeout=timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url}/stats answered {resp.status}")
            body = await resp.json(content_type=None)
            if not isinstance(body, dict):
                raise RuntimeError(f"{url}/stats: not a JSON object")
            return body

    def _rate(self, key: str, now: float, count: int | None) -> float | None:
        if count is None:
            return None
        prev = self._prev_counts.get(key)
        self._prev_counts[key] = (now, count)
        if prev is None or now <= prev[0] or count < prev[1]:
            return None if prev is None else 0.0
        return (count - prev[1]) / (now - prev[0])

    async def poll(self) -> Snapshot:
        """One poll: the registry (raises RegistryUnavailable if it does not answer), then every router."""
        try:
            records, _ = await self.registry.services()
        except RegistryRejected as exc:
            raise RegistryUnavailable(str(exc)) from exc
        now = self.clock()
        rows = [row_from_record(r, now, self.stale_after) for r in records if isinstance(r, dict)]
        routers = [r for r in rows if r.role == "router"]
        urls = [str(r.metadata.get("url") or r.url) for r in routers]
        results = await asyncio.gather(*(self._router_stats(u) for u in urls), return_exceptions=True)
        per_backend: dict[str, _Sum] = {}
        per_model: dict[str, _Sum] = {}
        errors: list[str] = []
        answered = 0
        for url, res in zip(urls, results):
            if isinstance(res, BaseException):
                errors.append(f"{url}: {type(res).__name__} {res}".strip())
                continue
            answered += 1
            for s in res.get("services") or []:
                if isinstance(s, dict) and s.get("name"):
                    per_backend.setdefault(str(s["name"]), _Sum()).add(s)
            for m, s in (res.get("models") or {}).items():
                if isinstance(s, dict):
                    per_model.setdefault(str(m), _Sum()).add(s)
        joined = []
        for r in rows:
            agg = per_backend.get(r.name)
            if agg is not None:
                r = replace(r, requests=agg.requests, errors=agg.errors, in_flight=agg.in_flight,
                            latency=agg.latency(), cache_hit=agg.cache_hit())
            joined.append(r)
        # A babysitter row shows its backend's restarts and models when it does not carry them.
        by_name = {r.name: r for r in joined}
        for i, r in enumerate(joined):
            b = by_name.get(r.backend or "") if r.role == "babysitter" else None
            if b is not None:
                joined[i] = replace(r, restarts=r.restarts if r.restarts is not None else b.restarts,
                                    models=r.models or b.models)
        # Records that vanished stay a while, marked expired, so an operator sees what went away.
        present = {r.name for r in joined}
        for name, row in self._last.items():
            if name not in present and name not in self._gone:
                self._gone[name] = (replace(row, state="expired", healthy=False, in_flight=None), now)
        for name in list(self._gone):
            if name in present or now - self._gone[name][1] > EXPIRED_LINGER:
                del self._gone[name]
        self._last = {r.name: r for r in joined}
        shown = joined + [row for row, _ in self._gone.values()]
        # History for the sparklines.
        history: dict[str, tuple[Point, ...]] = {}
        for r in joined:
            if r.role != "backend":
                continue
            rate = self._rate(r.name, now, r.requests)
            if rate is not None or r.latency.p50 is not None:
                h = self._history.setdefault(r.name, deque(maxlen=HISTORY))
                h.append(Point(now, rate or 0.0, r.latency.p50 or 0.0))
            if r.name in self._history:
                history[r.name] = tuple(self._history[r.name])
        models = build_models(joined, per_model, lambda m, c: self._rate("model:" + m, now, c))
        return Snapshot(taken_at=now, services=tuple(sorted(shown, key=lambda r: (r.role, r.name))),
                        models=models, routers_answered=answered, router_errors=tuple(errors),
                        history=history)


def build_models(rows: list[ServiceRow], per_model: dict[str, "_Sum"],
                 rate: Callable[[str, int | None], float | None]) -> tuple[ModelRow, ...]:
    """One ModelRow per model any backend serves (or any router counted)."""
    backends: dict[str, list[ServiceRow]] = {}
    for r in rows:
        if r.role == "backend":
            for m in r.models:
                backends.setdefault(m, []).append(r)
    out = []
    for m in sorted(set(backends) | set(per_model)):
        bs = backends.get(m, [])
        agg = per_model.get(m)
        reqs = agg.requests if agg else None
        out.append(ModelRow(name=m, backends=tuple(b.name for b in bs),
                            healthy=sum(1 for b in bs if b.healthy and b.state == "running"),
                            requests=reqs, errors=agg.errors if agg else None, rate=rate(m, reqs),
                            latency=agg.latency() if agg else Latency(),
                            cache_hit=agg.cache_hit() if agg else None))
    return tuple(out)


class Babysitters:
    """Talks to babysitters: log tail, log follow (SSE) and the restart/stop/start actions."""

    def __init__(self, session: aiohttp.ClientSession, token: str | None = None) -> None:
        self.session = session
        self.token = token

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def follow(self, url: str, tail: int = 100) -> AsyncIterator[LogLine]:
        """Lines from `GET /logs?follow=1` as they arrive; ends when the stream closes."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with self.session.get(url.rstrip("/") + "/logs", params={"follow": "1", "tail": str(tail)},
                                    timeout=timeout) as resp:
            if resp.status != 200:
                raise ActionFailed(f"{url}/logs answered {resp.status}")
            data: list[str] = []
            async for raw in resp.content:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith("data:"):
                    data.append(text[5:].lstrip())
                elif text == "" and data:
                    payload = "\n".join(data)
                    data = []
                    try:
                        d = json.loads(payload)
                    except ValueError:
                        continue
                    if isinstance(d, dict):
                        yield _log_line(d)

    async def act(self, url: str, action: str) -> str:
        """POST /restart, /stop or /start; returns the babysitter's message."""
        if action not in ("restart", "stop", "start"):
            raise ValueError(action)
        try:
            async with self.session.post(url.rstrip("/") + "/" + action, headers=self._headers(),
                                         timeout=aiohttp.ClientTimeout(total=15)) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 400:
                    msg = body.get("error", body) if isinstance(body, dict) else body
                    if isinstance(msg, dict):
                        msg = msg.get("message")
                    raise ActionFailed(f"{action} refused ({resp.status}): {msg}")
                if isinstance(body, dict):
                    return str(body.get("message") or body.get("status") or "ok")
                return "ok"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ActionFailed(f"{action}: cannot reach {url}: {type(exc).__name__} {exc}") from exc


def _log_line(d: dict) -> LogLine:
    return LogLine(ts=_float(d.get("ts")) or 0.0, stream=str(d.get("stream", "stdout")), line=str(d.get("line", "")))


def backend_target(snapshot: Snapshot | None, row: ServiceRow | None) -> ServiceRow | None:
    """The backend row an action or detail view is about: the row itself, or a babysitter's backend."""
    if row is None:
        return None
    if row.role == "babysitter" and snapshot is not None and row.backend:
        b = snapshot.service(row.backend)
        if b is not None:
            return b
    return row if row.role in ("backend", "babysitter") else None


class HttpSource:
    """Where the app gets its data: the registry and what it lists, over HTTP (tests pass a fake)."""

    def __init__(self, registry_url: str, token: str | None = None, stale_after: float = 120.0) -> None:
        self.registry_url = registry_url.rstrip("/")
        self.token = token
        self.stale_after = stale_after
        self._session: aiohttp.ClientSession | None = None
        self._poller: Poller | None = None
        self._babysitters: Babysitters | None = None

    def _ensure(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._poller = Poller(self._session, self.registry_url, stale_after=self.stale_after)
            self._babysitters = Babysitters(self._session, self.token)

    async def poll(self) -> Snapshot:
        self._ensure()
        assert self._poller is not None
        return await self._poller.poll()

    def follow_logs(self, babysitter_url: str, tail: int = 200) -> AsyncIterator[LogLine]:
        self._ensure()
        assert self._babysitters is not None
        return self._babysitters.follow(babysitter_url, tail)

    async def act(self, babysitter_url: str, action: str) -> str:
        self._ensure()
        assert self._babysitters is not None
        return await self._babysitters.act(babysitter_url, action)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
