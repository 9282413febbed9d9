"""What the console shows, as plain data: one row per service and per model, and a poll's snapshot."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

GONE_STATES = ("gone", "expired")   # rows of records the registry no longer holds


@dataclass(frozen=True)
class Latency:
    """Latency percentiles in milliseconds (None when unknown)."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class Route:
    """Whether the routers can send requests to a backend and, if not, why (from their /stats)."""

    routers: int                  # routers that answered
    routable: int                 # of them, how many would route to it now
    reason: str = ""              # why not, as the first router that refuses says it
    retry_in: float | None = None  # seconds until an open circuit lets a trial request through

    @property
    def ok(self) -> bool:
        return self.routers > 0 and self.routable == self.routers


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
    migrations: int | None = None   # streams that failed here mid-answer and were continued elsewhere
    latency: Latency = Latency()
    cache_hit: float | None = None  # cached prompt tokens / prompt tokens, as the engine reports them
    route: Route | None = None    # what the routers make of a backend (None: not a backend, or no router answered)
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
    backends: tuple[str, ...]     # registered backends serving it
    healthy: int                  # of them, running and routable
    requests: int | None = None   # summed over its backends, so ERRS agrees with the services view
    errors: int | None = None
    rate: float | None = None     # requests per second
    latency: Latency = Latency()  # the routers' per-model percentiles
    cache_hit: float | None = None
    lost: tuple[str, ...] = ()    # backends that served it and left the registry recently


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

    @property
    def registered(self) -> int:
        """Services the registry holds now (rows of vanished records not counted)."""
        return sum(1 for s in self.services if s.state not in GONE_STATES)

    def service(self, name: str) -> ServiceRow | None:
        for s in self.services:
            if s.name == name:
                return s
        return None


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


def as_int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def as_float(v: Any) -> float | None:
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
    hb = as_float(record.get("last_heartbeat"))
    age = max(0.0, now - hb) if hb is not None else None
    models = meta.get("models") or []
    role = _role(meta)
    bs_url = meta.get("babysitter_url")
    if role == "babysitter" and not bs_url:
        bs_url = record.get("url")
    return ServiceRow(
        name=str(record.get("name", "?")), role=role, host=str(record.get("host", "")),
        port=as_int(record.get("port")) or 0, url=str(record.get("url") or ""),
        state=service_state(record, age, stale_after), heartbeat_age=age,
        healthy=bool(record.get("is_healthy", record.get("status") == "running")),
        restarts=as_int(meta.get("restarts")), models=tuple(str(m) for m in models if m is not None),
        babysitter_url=str(bs_url) if bs_url else None,
        backend=str(meta["backend"]) if meta.get("backend") else None,
        pid=as_int(meta.get("pid")), started_at=as_float(meta.get("started_at")), metadata=dict(meta))


def vanished_row(row: ServiceRow) -> ServiceRow:
    """How a record the registry dropped is shown: deregistered (`gone`) or `expired`."""
    if row.state == "stale" or not row.healthy and row.state == "running":
        return replace(row, state="expired", healthy=False, in_flight=None, route=None)
    return replace(row, state="gone", healthy=False, in_flight=None, heartbeat_age=None, route=None)


def backend_target(snapshot: Snapshot | None, row: ServiceRow | None) -> ServiceRow | None:
    """The backend row an action or detail view is about: the row itself, or a babysitter's backend."""
    if row is None:
        return None
    if row.role == "babysitter" and snapshot is not None and row.backend:
        b = snapshot.service(row.backend)
        if b is not None:
            return b
    return row if row.role in ("backend", "babysitter") else None
