"""The poller: one round of HTTP calls (the registry, then every router's /stats) into a Snapshot."""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import aiohttp

from infinilm_svc.client.registry import RegistryClient, RegistryRejected, RegistryUnavailable

from .rows import (
    Latency,
    ModelRow,
    Point,
    Route,
    ServiceRow,
    Snapshot,
    as_float,
    as_int,
    row_from_record,
    vanished_row,
)

HISTORY = 60            # points kept per backend for the sparklines
EXPIRED_LINGER = 30.0   # seconds a vanished record stays on screen marked "gone" or "expired"
LOST_MEMORY = 300.0     # seconds the models view remembers a backend that left
STATS_TIMEOUT = 3.0
NO_MODEL = "(none)"      # the routers' counter for requests that named no model: not a model


def route_reason(entry: dict) -> tuple[str, float | None]:
    """Why one router will not route to a backend, from its /stats entry (empty when it will)."""
    if entry.get("healthy"):
        return "", None
    if entry.get("registry_healthy") is False:
        return f"registry: {entry.get('state') or 'not running'}", None
    if entry.get("active_healthy") is False:
        return "health check failing", None
    if entry.get("circuit") == "open":
        return "circuit open", as_float(entry.get("circuit_retry_in"))
    if entry.get("circuit") == "half_open":
        return "circuit half-open", None
    return "not routable", None


@dataclass
class _Sum:
    requests: int = 0
    migrations: int = 0
    errors: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_seen: bool = False
    weight: list = field(default_factory=list)  # [(requests, Latency)]
    seen: bool = False

    def add(self, s: dict) -> None:
        self.seen = True
        self.requests += as_int(s.get("request_count")) or 0
        self.migrations += as_int(s.get("migrations")) or 0
        self.errors += as_int(s.get("error_count")) or 0
        self.in_flight += as_int(s.get("in_flight")) or 0
        tokens = s.get("tokens") or {}
        if isinstance(tokens, dict):
            self.prompt_tokens += as_int(tokens.get("prompt")) or 0
            cached = as_int(tokens.get("cached"))
            if cached is not None:            # null: the engine does not report its cache
                self.cached_tokens += cached
                self.cache_seen = True
        lat = s.get("latency_ms") or {}
        if isinstance(lat, dict):
            self.weight.append((as_int(s.get("request_count")) or 0,
                                Latency(as_float(lat.get("p50")), as_float(lat.get("p90")), as_float(lat.get("p99")))))

    def cache_hit(self) -> float | None:
        """The engine-reported prompt cache hit ratio over every router (None before any prompt)."""
        return self.cached_tokens / self.prompt_tokens if self.cache_seen and self.prompt_tokens else None

    def latency(self) -> Latency:
        """Percentiles averaged over routers, weighted by requests (exact with one router)."""
        out: list[float | None] = []
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
        self._lost: dict[str, tuple[tuple[str, ...], float]] = {}  # backend -> (its models, left at)

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
        verdicts: dict[str, list[dict]] = {}
        errors: list[str] = []
        answered = 0
        for url, res in zip(urls, results, strict=True):
            if isinstance(res, BaseException):
                errors.append(f"{url}: {type(res).__name__} {res}".strip())
                continue
            answered += 1
            for s in res.get("services") or []:
                if isinstance(s, dict) and s.get("name"):
                    per_backend.setdefault(str(s["name"]), _Sum()).add(s)
                    verdicts.setdefault(str(s["name"]), []).append(s)
            for m, s in (res.get("models") or {}).items():
                if isinstance(s, dict) and m != NO_MODEL:
                    per_model.setdefault(str(m), _Sum()).add(s)
        joined = []
        for r in rows:
            agg = per_backend.get(r.name)
            if agg is not None:
                r = replace(r, requests=agg.requests, errors=agg.errors, in_flight=agg.in_flight,
                            migrations=agg.migrations,
                            latency=agg.latency(), cache_hit=agg.cache_hit())
            if r.role == "backend" and answered:
                r = replace(r, route=backend_route(verdicts.get(r.name, []), answered))
            joined.append(r)
        # A babysitter row shows its backend's restarts and models when it does not carry them.
        by_name = {r.name: r for r in joined}
        for i, r in enumerate(joined):
            b = by_name.get(r.backend or "") if r.role == "babysitter" else None
            if b is not None:
                joined[i] = replace(r, restarts=r.restarts if r.restarts is not None else b.restarts,
                                    models=r.models or b.models, route=b.route)
        # Records that vanished stay a while, so an operator sees what went away: `gone` when the
        # service was fresh when last seen (it deregistered), `expired` when its heartbeat had lapsed.
        present = {r.name for r in joined}
        for name, row in self._last.items():
            if name not in present and name not in self._gone:
                self._gone[name] = (vanished_row(row), now)
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
        for name, (row, _) in self._gone.items():
            if row.role == "backend":
                self._lost[name] = (row.models, now)
        for name in list(self._lost):
            if name in present or now - self._lost[name][1] > LOST_MEMORY:
                del self._lost[name]
        lost: dict[str, list[str]] = {}
        for name, (models_of, _) in sorted(self._lost.items()):
            for m in models_of:
                lost.setdefault(m, []).append(name)
        models = build_models(joined, per_model, lambda m, c: self._rate("model:" + m, now, c), lost)
        return Snapshot(taken_at=now, services=tuple(sorted(shown, key=lambda r: (r.role, r.name))),
                        models=models, routers_answered=answered, router_errors=tuple(errors),
                        history=history)


def backend_route(entries: list[dict], routers: int) -> Route:
    """One backend's routability over every router that answered (`entries`: their /stats rows for it)."""
    if not entries:
        return Route(routers, 0, "not in the routers' table")
    ok = 0
    reason, retry_in = "", None
    for e in entries:
        why, retry = route_reason(e)
        if not why:
            ok += 1
        elif not reason:
            reason, retry_in = why, retry
    missing = routers - len(entries)
    if missing and not reason:
        reason = "not in every router's table"
    return Route(routers, ok, reason, retry_in)


def build_models(rows: list[ServiceRow], per_model: dict[str, "_Sum"],
                 rate: Callable[[str, int | None], float | None],
                 lost: dict[str, list[str]] | None = None) -> tuple[ModelRow, ...]:
    """One ModelRow per model a backend serves, a router counted, or a backend that left served."""
    lost = lost or {}
    backends: dict[str, list[ServiceRow]] = {}
    for r in rows:
        if r.role == "backend":
            for m in r.models:
                backends.setdefault(m, []).append(r)
    out = []
    for m in sorted(set(backends) | set(per_model) | set(lost)):
        bs = backends.get(m, [])
        agg = per_model.get(m)
        counted = [b for b in bs if b.requests is not None]
        if counted:
            reqs: int | None = sum(b.requests or 0 for b in counted)
            errs: int | None = sum(b.errors or 0 for b in counted)
        else:
            reqs, errs = (agg.requests, agg.errors) if agg else (None, None)
        healthy = sum(1 for b in bs if b.healthy and b.state == "running" and (b.route is None or b.route.ok))
        out.append(ModelRow(name=m, backends=tuple(b.name for b in bs), healthy=healthy,
                            requests=reqs, errors=errs, rate=rate(m, reqs),
                            latency=agg.latency() if agg else Latency(), lost=tuple(lost.get(m, ())),
                            cache_hit=agg.cache_hit() if agg else None))
    return tuple(out)
