"""The registry's table of services: records, health, expiry, and a change index for watchers."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

RECORD_FIELDS = ("name", "host", "port", "hostname", "url", "status", "timestamp", "last_heartbeat",
                 "health_status", "metadata")


def rfc3339(ts: float | None = None) -> str:
    """UTC time as RFC 3339 with microseconds (the upstream `timestamp` format)."""
    return datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc).isoformat().replace("+00:00", "Z")


def format_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def new_record(fields: dict, now: float) -> dict[str, Any]:
    """A full record from checked registration fields (defaults as upstream fills them)."""
    return {
        "name": fields["name"],
        "host": fields["host"],
        "port": fields["port"],
        "hostname": fields.get("hostname") or fields["host"],
        "url": fields.get("url") or format_url(fields["host"], fields["port"]),
        "status": fields.get("status") or "running",
        "timestamp": rfc3339(now),
        "last_heartbeat": now,
        "health_status": "unknown",
        "metadata": dict(fields.get("metadata") or {}),
    }


def apply_update(rec: dict, fields: dict) -> None:
    """PUT semantics: replace any of host/port/hostname/url/status/metadata."""
    for key in ("host", "port", "hostname", "url", "status"):
        if key in fields:
            rec[key] = fields[key]
    if "metadata" in fields:
        rec["metadata"] = dict(fields["metadata"] or {})


def merge_heartbeat(rec: dict, status: str | None, metadata: dict | None) -> bool:
    """Heartbeat semantics: set the status, merge metadata; True if anything changed."""
    changed = False
    if status is not None and status != rec["status"]:
        rec["status"] = status
        changed = True
    if metadata:
        md = rec["metadata"]
        for k, v in metadata.items():
            if md.get(k, _ABSENT) != v:
                md[k] = v
                changed = True
    return changed


class ServiceTable:
    """Services keyed by name. Every change that a reader could see bumps `index` and wakes watchers.

    Plain heartbeats that change nothing do not bump the index; a heartbeat that changes the
    status or metadata, or brings back a record whose heartbeat had lapsed, does.
    """

    def __init__(self, heartbeat_ttl: float, expire_after: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = heartbeat_ttl
        self.expire_after = expire_after
        self.clock = clock
        self.records: dict[str, dict[str, Any]] = {}
        self._healthy: dict[str, bool] = {}   # health as last published, to detect lapses
        self.index = 1
        self._event: asyncio.Event | None = None
        self.watchers = 0                      # blocking queries parked right now
        self.closing = False                   # shutting down: watches answer at once
        self.on_change: list[Callable[[], None]] = []
        self.counters = {"registrations": 0, "heartbeats": 0, "expiries": 0, "deregistrations": 0}

    # -- change notification -------------------------------------------------------------
    def _bump(self) -> None:
        self.index += 1
        if self._event is not None:
            self._event.set()
            self._event = None
        for cb in self.on_change:
            cb()

    async def wait_change(self, index: int, timeout: float) -> None:
        """Return when the table's index exceeds `index`, after `timeout` seconds, or at shutdown."""
        if self.index > index or self.closing:
            return
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        self.watchers += 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.watchers -= 1

    def close_watches(self) -> None:
        """The registry is shutting down: answer every parked watch now, and later ones at once."""
        self.closing = True
        if self._event is not None:
            self._event.set()
            self._event = None

    # -- health --------------------------------------------------------------------------
    def is_healthy(self, rec: dict, now: float) -> bool:
        return rec["status"] == "running" and now - rec["last_heartbeat"] < self.ttl

    def view(self, rec: dict, now: float) -> dict:
        """The record as clients see it (with the computed `is_healthy`)."""
        out = dict(rec)
        out["is_healthy"] = self.is_healthy(rec, now)
        return out

    def healthy_count(self) -> int:
        now = self.clock()
        return sum(1 for rec in self.records.values() if self.is_healthy(rec, now))

    def select(self, *, status: str | None = None, healthy: bool | None = None) -> list[dict]:
        now = self.clock()
        out = []
        for rec in self.records.values():
            if status is not None and rec["status"] != status:
                continue
            h = self.is_healthy(rec, now)
            if healthy is not None and h != healthy:
                continue
            v = dict(rec)
            v["is_healthy"] = h
            out.append(v)
        return out

    # -- writes --------------------------------------------------------------------------
    def register(self, record: dict) -> dict:
        """Insert or overwrite a record (re-registering a name replaces it)."""
        now = self.clock()
        rec = new_record(record, now)
        self.records[rec["name"]] = rec
        self._healthy[rec["name"]] = self.is_healthy(rec, now)
        self.counters["registrations"] += 1
        self._bump()
        return rec

    def restore(self, records: Iterable[dict]) -> int:
        """Load records saved by a previous run; each counts as freshly heartbeated."""
        now = self.clock()
        n = 0
        for r in records:
            if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                continue
            name: str = r["name"]
            rec = {k: r.get(k) for k in RECORD_FIELDS}
            rec["last_heartbeat"] = now
            rec["metadata"] = dict(rec.get("metadata") or {})
            rec["health_status"] = rec.get("health_status") or "unknown"
            self.records[name] = rec
            self._healthy[name] = self.is_healthy(rec, now)
            n += 1
        if n:
            self._bump()
        return n

    def update(self, name: str, fields: dict) -> dict | None:
        """PUT: replace any of host/port/hostname/url/status/metadata; refreshes the heartbeat."""
        rec = self.records.get(name)
        if rec is None:
            return None
        apply_update(rec, fields)
        rec["last_heartbeat"] = self.clock()
        self._healthy[name] = self.is_healthy(rec, rec["last_heartbeat"])
        self._bump()
        return rec

    def heartbeat(self, name: str, status: str | None = None, metadata: dict | None = None) -> dict | None:
        """Refresh a record's heartbeat, optionally setting its status and merging metadata."""
        rec = self.records.get(name)
        if rec is None:
            return None
        now = self.clock()
        changed = merge_heartbeat(rec, status, metadata)
        rec["last_heartbeat"] = now
        healthy = self.is_healthy(rec, now)
        if healthy != self._healthy.get(name):
            self._healthy[name] = healthy
            changed = True
        self.counters["heartbeats"] += 1
        if changed:
            self._bump()
        return rec

    def deregister(self, name: str) -> bool:
        if self.records.pop(name, None) is None:
            return False
        self._healthy.pop(name, None)
        self.counters["deregistrations"] += 1
        self._bump()
        return True

    def sweep(self) -> list[str]:
        """Publish health lapses and delete records whose heartbeat is older than expire_after."""
        now = self.clock()
        changed = False
        expired = [name for name, rec in self.records.items() if now - rec["last_heartbeat"] > self.expire_after]
        for name in expired:
            del self.records[name]
            self._healthy.pop(name, None)
            self.counters["expiries"] += 1
            changed = True
        for name, rec in self.records.items():
            h = self.is_healthy(rec, now)
            if h != self._healthy.get(name):
                self._healthy[name] = h
                changed = True
        if changed:
            self._bump()
        return expired


_ABSENT = object()
