"""Discovery: the registry watch, the static services file, and the router's own registry record."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from ..client.registry import RegistryClient, RegistryRejected, RegistryUnavailable
from ..config.router import RouterConfig
from ..looplag import freeze_heap
from .circuit import Circuit
from .health import Health
from .table import Backend, Table

log = logging.getLogger(__name__)


def load_static_services(path: str) -> list[dict]:
    """Read an upstream static services file: a list, {"services": [...]} or {"static_services": {...}}."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        if isinstance(data.get("static_services"), dict):
            data = data["static_services"].get("services", [])
        else:
            data = data.get("services", [])
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of services")
    out = []
    for item in data:
        if not isinstance(item, dict) or "name" not in item or "port" not in item:
            raise ValueError(f"{path}: each service needs at least name and port: {item!r}")
        meta = dict(item.get("metadata") or {})
        if meta.get("type", "openai-api") != "openai-api":
            continue
        meta.setdefault("type", "openai-api")
        meta["static"] = True
        out.append({"name": item["name"], "host": item.get("host", "127.0.0.1"), "port": int(item["port"]),
                    "weight": item.get("weight", 1), "metadata": meta, "status": "running", "is_healthy": True})
    return out


def capacity(config: RouterConfig, b: Backend) -> int:
    """Requests `b` runs at once (0: no limit): its own setting, else the router's for every
    backend, else what its engine says (its slots), else the default for engines that do not say."""
    return (config.backend_capacity.get(b.name) or config.max_in_flight
            or (b.total_slots if config.capacity_from_slots else 0) or config.default_capacity)


def unusable(rec: dict, meta: dict) -> str | None:
    """Why a registry record of type openai-api cannot be routed to, or None when it can."""
    url = rec.get("url")
    if url is not None:
        if not isinstance(url, str):
            return "url is not a string"
        try:
            u = urlparse(url)
            port = u.port
        except ValueError as exc:
            return f"url {url[:80]!r} is not valid ({exc})"
        if u.scheme not in ("http", "https") or not u.hostname:
            return f"url {url[:80]!r} is not an http(s) URL with a host"
        if port is not None and not 1 <= port <= 65535:
            return f"url {url[:80]!r} has a port outside 1..65535"
    port = rec.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        return f"port {port!r} is not a port number"
    if url is None and not isinstance(rec.get("host"), (str, type(None))):
        return "host is not a string"
    models = meta.get("models")
    if models is not None and not isinstance(models, list):
        return f"metadata.models is {type(models).__name__}, not a list"
    ml = meta.get("models_list")
    if ml is not None and not isinstance(ml, list):
        return f"metadata.models_list is {type(ml).__name__}, not a list"
    return None


def _routing_view(b: Backend) -> tuple:
    """What routing depends on: a change here rebuilds the candidate lists."""
    return (b.url, b.models, len(b.models_list), b.weight, b.cache_type, b.registry_healthy,
            [m.get("id") for m in b.models_list], b.total_slots, b.host_cache, b.admission.limit)


class Discovery:
    """Keeps the table in step with the registry (blocking queries) and the static file."""

    def __init__(self, config: RouterConfig, table: Table, health: Health,
                 on_free: "Callable[[Backend], bool] | None" = None) -> None:
        self.config = config
        self.on_free = on_free          # the scheduler, offered every place freed on a backend
        self.table = table
        self.health = health
        # After the registry may have restarted (its index went back, or it was unreachable), the
        # backends it does not list yet are kept until this loop time: they re-register within a
        # heartbeat, and dropping them meanwhile would fail every request for their models.
        self.grace_until = 0.0
        self.graced: set[str] = set()
        self.added_unfrozen = 0     # backends added since the heap was last frozen
        self.skipped: dict[str, str] = {}   # record name -> why it is not used (logged once per reason)
        self.first_try = asyncio.Event()    # set once the registry's table is applied, or could not be had

    def apply(self, records: list[dict], static: bool = False) -> None:
        """Merge records into the table; registry backends not in `records` are removed.

        A record this router cannot use is skipped with one warning (again only if the reason
        changes) and the rest are applied: one bad record must not stop discovery.
        """
        merge = _Merge()
        self._merge(records, static, merge)
        self._finish(static, merge)

    async def apply_in_slices(self, records: list[dict]) -> None:
        """`apply` for the registry's whole table, about SLICE_SECONDS of work at a time with the
        event loop free in between: 10,000 records applied in one go would hold it for a good while."""
        merge = _Merge()
        clock = time.perf_counter
        until = clock() + SLICE_SECONDS
        for i in range(0, len(records), STEP):
            if clock() > until:
                await asyncio.sleep(0)
                until = clock() + SLICE_SECONDS
            self._merge(records[i:i + STEP], False, merge)
            # A backend's objects live as long as it is registered: once a few hundred have come
            # in, they are frozen, so the full collections a growing heap sets off do not walk the
            # whole fleet again and again (8 of them, up to 90 ms each, taking in 10,000 backends).
            if self.added_unfrozen >= FREEZE_ADDED:
                self.added_unfrozen = 0
                freeze_heap()
        if len(records) > STEP:
            await asyncio.sleep(0)     # the rebuild below takes about 10 ms at 10,000 backends
        self._finish(False, merge)

    def _merge(self, records: list[dict], static: bool, merge: "_Merge") -> None:
        t = self.table
        seen, skipped = merge.seen, merge.skipped
        for rec in records:
            meta = rec.get("metadata") if isinstance(rec, dict) else None
            if not isinstance(meta, dict) or meta.get("type") != "openai-api":
                continue
            name = str(rec.get("name"))
            why = unusable(rec, meta)
            if why is None:
                b = t.backends.get(name) or Backend(
                    name, Circuit(self.config.eject_after_failures, self.config.eject_cooldown), self.on_free)
                before = _routing_view(b)
                reborn = False
                try:
                    reborn = self._update(b, rec, meta, static)
                except Exception as exc:  # noqa: BLE001 - whatever a record holds, skip it, keep the rest
                    why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                skipped[name] = why
                if self.skipped.get(name) != why:
                    log.warning("backend %s: record skipped, it cannot be routed to: %s", name, why)
                continue  # not routed to: a backend we had is removed below, like one whose record went
            seen.add(name)
            if name not in t.backends:
                t.backends[name] = b
                self.added_unfrozen += 1
                self.health.track(b)
                merge.changed = True
                log.info("backend %s: added (%s)", name, b.url)
            elif _routing_view(b) != before or reborn:
                merge.changed = True

    def _finish(self, static: bool, merge: "_Merge") -> None:
        t = self.table
        seen, skipped, changed = merge.seen, merge.skipped, merge.changed
        if not static:
            self.skipped = skipped
            missing = [n for n, b in t.backends.items() if not b.static and n not in seen]
            if missing and asyncio.get_running_loop().time() < self.grace_until:
                new = set(missing) - self.graced
                if new:
                    self.graced |= new
                    log.warning("the registry may have restarted: keeping %d backend(s) it does not list yet "
                                "(%s) for up to %gs", len(new), ", ".join(sorted(new)), self.config.registry_reset_grace)
                missing = []
            for name in missing:
                gone = t.backends.pop(name)
                self.health.forget(gone)
                if gone.cache is not None:
                    gone.cache.drop()
                self.graced.discard(name)
                changed = True
                log.info("backend %s: removed (gone from the registry)", name)
            self.graced &= set(t.backends) - seen
        # Heartbeats that change nothing routing depends on do not rebuild rings and lists.
        if changed:
            t.rebuild()

    def _update(self, b: Backend, rec: dict, meta: dict, static: bool) -> bool:
        """Copy a record into `b`; True when it is a new incarnation and old verdicts were dropped."""
        host = str(rec.get("host") or "127.0.0.1")
        port = int(rec.get("port") or 0)
        b.host, b.port = host, port
        b.url = (rec.get("url") or f"http://{host}:{port}").rstrip("/")
        b.babysitter_url = str(meta.get("babysitter_url") or f"http://{host}:{port + 1}")
        models = meta.get("models") or []
        b.models = tuple(str(m) for m in models if isinstance(m, (str, int)))
        ml = meta.get("models_list")
        b.models_list = [m for m in ml if isinstance(m, dict)] if isinstance(ml, list) else []
        if not b.models and b.models_list:
            b.models = tuple(str(m["id"]) for m in b.models_list if "id" in m)
        b.metadata = meta
        try:
            b.weight = max(1, int(meta.get("weight", rec.get("weight", 1)) or 1))
        except (TypeError, ValueError):
            b.weight = 1
        ct = meta.get("cache_type")
        b.cache_type = ct if ct in ("static", "paged") else None
        slots = meta.get("total_slots")
        b.total_slots = slots if isinstance(slots, int) and not isinstance(slots, bool) and 0 < slots <= 1024 else 0
        kept = meta.get("host_prompt_cache")
        b.host_cache = kept if isinstance(kept, bool) else None
        b.admission.limit = capacity(self.config, b)
        b.static = static
        was = b.state
        b.state = str(rec.get("status", "running"))
        healthy = rec.get("is_healthy")
        b.registry_healthy = bool(healthy) if healthy is not None else b.state == "running"
        key = self.config.backend_api_keys.get(b.name, self.config.backend_api_key)
        b.auth_lines = f"Authorization: Bearer {key}\r\n".encode() if key else b""
        return self._new_incarnation(b, meta, was)

    def _new_incarnation(self, b: Backend, meta: dict, was: str) -> bool:
        """A backend its babysitter restarted (new pid, restart count or start time, or back to
        `running` after any other state) is a new process: the open circuit and failed active
        checks were about the old one, so they are dropped."""
        incarnation = (meta.get("pid"), meta.get("restarts"), meta.get("started_at"))
        before, b.incarnation = b.incarnation, incarnation
        restarted = before is not None and incarnation != before and incarnation[0] is not None
        back = was != "running" and b.state == "running"
        if restarted or back:
            b.lacks.clear()       # a new process: it may serve what its predecessor did not
            if b.cache is not None:
                b.cache.reset()   # and its caches are empty
        if not (restarted or back) or (b.circuit.clean and b.active_ok and not b.fail_streak):
            return False
        log.info("backend %s: new incarnation (pid %s, restarts %s); circuit closed, health checks start afresh",
                 b.name, incarnation[0], incarnation[1])
        self.health.reset(b)
        return True

    def load_static(self) -> None:
        if self.config.static_services:
            self.apply(load_static_services(self.config.static_services), static=True)

    async def watch(self, client: RegistryClient) -> None:
        """Follow the registry with blocking queries; on failure keep the last table and retry."""
        t = self.table
        index = 0
        etag: str | None = None
        delay = 0.2
        while True:
            try:
                records, new_index, etag = await client.watch_services(
                    index, self.config.watch_wait if index else None, etag if index else None)
            except asyncio.CancelledError:
                raise
            except (RegistryUnavailable, RegistryRejected, ValueError) as exc:
                if t.registry_ok or t.registry_error != str(exc):
                    log.warning("registry unreachable, serving the last known table: %s", exc)
                t.registry_ok = False
                t.registry_error = str(exc)
                t.registry_url, t.registry_failover = client.url, client.last_failover
                self.first_try.set()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                if index:
                    self._start_grace()
                index = 0
                continue
            delay = 0.2
            t.registry_url, t.registry_failover = client.url, client.last_failover
            if not t.registry_ok:
                log.info("registry reachable again (%s)", client.url)
            t.registry_ok = True
            t.registry_error = None
            t.registry_synced_at = time.time()
            # A restarted registry starts its index again from zero: resynchronise, and keep what
            # it has not heard of again yet for a while.
            if new_index < index:
                self._start_grace()
            index = new_index if new_index >= index and new_index > 0 else 0
            t.registry_index = new_index
            if records is not None:    # None: the table is as we have it
                await self.apply_in_slices(records)
            self.first_try.set()
            if index == 0:
                await asyncio.sleep(min(1.0, self.config.watch_wait))


    def _start_grace(self) -> None:
        if self.config.registry_reset_grace > 0:
            self.grace_until = asyncio.get_running_loop().time() + self.config.registry_reset_grace


WILDCARD = ("", "0.0.0.0", "::", "[::]")
# The registry's table is applied STEP records at a time, yielding to the event loop once
# SLICE_SECONDS have passed. A fixed 250 records took 35-64 ms per turn while a 10,000-backend fleet
# came in (new backends cost more than unchanged ones: objects, scheduling, a log line each).
STEP = 25
SLICE_SECONDS = 0.005
FREEZE_ADDED = 250   # backends added between two freezes of the heap


class _Merge:
    """What one pass over the registry's records found (see Discovery.apply)."""

    __slots__ = ("seen", "skipped", "changed")

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.skipped: dict[str, str] = {}
        self.changed = False


def router_record(config: RouterConfig) -> dict[str, Any]:
    """The registry record of this router (metadata.type = "router").

    With a wildcard bind and no public_url the host is left to the registry, which records the
    address the registration came from; the URL it stores is then copied into metadata.url.
    """
    if config.public_url:
        url = config.public_url.rstrip("/")
        u = urlparse(url)
        host, port = u.hostname or config.bind, u.port or config.port
        label = host
    elif config.bind in WILDCARD:
        host, port, url = "0.0.0.0", config.port, None
        label = socket.gethostname()
    else:
        host, port = config.bind, config.port
        url = f"http://{host}:{port}"
        label = host
    record: dict[str, Any] = {
        "name": config.name or f"router-{label}-{port}", "host": host, "port": port, "status": "running",
        "metadata": {"type": "router", "role": "router", "url": url, "policy": config.policy}}
    if url:
        record["url"] = url
        record["hostname"] = host
    return record


async def keep_registered(client: RegistryClient, record: dict, interval: float) -> None:
    """Register, then heartbeat every `interval`; re-register when the registry forgot us."""
    registered = False
    meta = record["metadata"]
    refused: str | None = None  # the last refusal, said once (a 400 or 401 does not fix itself)
    while True:
        try:
            if not registered:
                stored = await client.register(record)
                registered = True
                if meta.get("url") is None and isinstance(stored, dict) and stored.get("url"):
                    meta["url"] = stored["url"]          # the address the registry saw us at
                    await client.heartbeat(record["name"], status="running", metadata={"url": meta["url"]})
                log.info("registered as %s in the registry (%s)", record["name"], meta.get("url"))
                refused = None
            elif not await client.heartbeat(record["name"], status="running"):
                registered = False
                continue
        except asyncio.CancelledError:
            raise
        except RegistryRejected as exc:
            registered = False
            if str(exc) != refused:
                log.warning("the registry refuses this router's record %s: %s", record["name"], exc)
            refused = str(exc)
        except RegistryUnavailable as exc:
            registered = False
            log.debug("router self-registration: %s", exc)
        await asyncio.sleep(interval)


async def deregister(client: RegistryClient, name: str) -> None:
    """Remove the router's record on shutdown (best effort, bounded)."""
    try:
        await asyncio.wait_for(client.deregister(name), 2.0)
    except (RegistryUnavailable, RegistryRejected, asyncio.TimeoutError):
        pass
