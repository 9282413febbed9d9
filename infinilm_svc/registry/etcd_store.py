"""The etcd store: records in etcd under leases, a local mirror kept by a watch, index = etcd revision.

Keys under the prefix:
  services/<name>  the record (JSON), on a lease of `expire_after` seconds: it vanishes when the
                   heartbeats stop, even with every registry process down;
  alive/<name>     empty, on a lease of `heartbeat_ttl` seconds: present = heartbeat within the ttl.
A plain heartbeat only refreshes the two leases (no key is written, the revision does not move);
a heartbeat that changes the status or metadata, or brings back a lapsed record, writes a key.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Callable

import aiohttp

from ..config import RegistryConfig
from ..errors import ApiError
from ..runtime import StartupError
from .etcd import EtcdClient, EtcdError, EtcdUnavailable, b64, kv_json, kv_key
from .table import ServiceTable, apply_update, merge_heartbeat, new_record

log = logging.getLogger(__name__)

_LOCAL_FIELDS = ("last_heartbeat", "health_status")   # not compared when deciding "did it change"
RETRY_AFTER = "2"


class EtcdTable(ServiceTable):
    """The mirror of etcd's keys as last watched. `index` is the revision of the last change seen."""

    def __init__(self, heartbeat_ttl: float, expire_after: float, clock: Callable[[], float] = time.time) -> None:
        super().__init__(heartbeat_ttl, expire_after, clock)
        self.index = 0
        self.alive: dict[str, str] = {}            # name -> lease of its alive key
        self.leases: dict[str, str] = {}           # name -> lease of its record
        self.revisions: dict[str, int] = {}        # name -> mod_revision of its record
        self.deleting: set[str] = set()            # deleted by this process (not an expiry)
        self._applied = asyncio.Condition()

    def is_healthy(self, rec: dict, now: float) -> bool:
        return rec["status"] == "running" and rec["name"] in self.alive

    def _bump(self) -> None:                       # the revision, not a counter, is the index
        if self._event is not None:
            self._event.set()
            self._event = None
        for cb in self.on_change:
            cb()

    def load(self, revision: int, kvs: list[dict], prefix: str) -> None:
        """Replace the mirror with a full read of the prefix."""
        local = {n: (r["last_heartbeat"], r["health_status"]) for n, r in self.records.items()}
        self.records, self.alive, self.leases, self.revisions = {}, {}, {}, {}
        for kv in kvs:
            self._put(kv, prefix, local)
        self.index = max(self.index, revision)
        self._bump()

    def _put(self, kv: dict, prefix: str, local: dict | None = None) -> None:
        kind, _, name = kv_key(kv)[len(prefix):].partition("/")
        if kind == "alive":
            self.alive[name] = str(kv.get("lease", "0"))
        elif kind == "services":
            rec = kv_json(kv)
            if not isinstance(rec, dict):
                return
            old = self.records.get(name)
            seen = (old["last_heartbeat"], old["health_status"]) if old else (local or {}).get(name)
            if seen:
                rec["last_heartbeat"] = max(float(rec.get("last_heartbeat") or 0), seen[0])
                rec["health_status"] = seen[1] if old else rec.get("health_status", "unknown")
            self.records[name] = rec
            self.leases[name] = str(kv.get("lease", "0"))
            self.revisions[name] = int(kv.get("mod_revision", 0))

    def apply(self, events: list[dict], prefix: str) -> None:
        """Apply one watch response's events and move the index to the last event's revision."""
        last = 0
        for ev in events:
            kv = ev.get("kv") or {}
            last = max(last, int(kv.get("mod_revision", 0)))
            if ev.get("type") == "DELETE":
                kind, _, name = kv_key(kv)[len(prefix):].partition("/")
                if kind == "alive":
                    self.alive.pop(name, None)
                elif kind == "services" and self.records.pop(name, None) is not None:
                    self.leases.pop(name, None)
                    self.revisions.pop(name, None)
                    if name in self.deleting:
                        self.deleting.discard(name)
                    else:
                        self.counters["expiries"] += 1
                        log.warning("expired %s: no heartbeat for %.0f s", name, self.expire_after)
            else:
                self._put(kv, prefix)
        if last > self.index:
            self.index = last
            self._bump()

    async def wait_revision(self, revision: int, timeout: float) -> bool:
        """Wait until the mirror has applied `revision` (read-your-writes on this registry)."""
        deadline = time.monotonic() + timeout
        while self.index < revision:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._event is None:
                self._event = asyncio.Event()
            try:   # not counted as a parked watcher: this is a write waiting for its echo
                await asyncio.wait_for(self._event.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True


class EtcdStore:
    """Registry records in etcd: any number of registry processes serve the same table."""

    kind = "etcd"

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.prefix = config.etcd_prefix
        # The table's identity: the same for every registry on this prefix, and across their restarts.
        self.epoch = "etcd:" + config.etcd_prefix
        self.table = EtcdTable(config.heartbeat_ttl, config.expire_after)
        self.ttl = max(1, math.ceil(config.heartbeat_ttl))
        self.expire = max(self.ttl, math.ceil(config.expire_after))
        self.client: EtcdClient | None = None
        self.watching = False
        self.watch_error: str | None = None
        self.synced_at: float | None = None
        self._task: asyncio.Task | None = None
        self._revoking: set[asyncio.Task] = set()

    def _revoke(self, leases: tuple[str | None, ...]) -> None:
        """Revoke leases that hold nothing any more, in the background (they would lapse anyway)."""
        assert self.client is not None
        for lease in leases:
            if lease and lease != "0":
                task = asyncio.create_task(self.client.revoke(lease))
                self._revoking.add(task)
                task.add_done_callback(self._revoking.discard)

    @property
    def stale(self) -> bool:
        return not self.watching

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"store": self.kind, "stale": self.stale,
                               "etcd_endpoints": list(self.config.etcd_endpoints),
                               "etcd_endpoint": self.client.endpoint if self.client else None}
        if self.stale:
            out["etcd_error"] = self.watch_error
            out["synced_at"] = self.synced_at
        return out

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}/{name}"

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self, session: aiohttp.ClientSession, tasks: object = None) -> None:
        self.client = EtcdClient(session, self.config.etcd_endpoints, request_timeout=self.config.etcd_timeout,
                                 deadline=self.config.etcd_timeout * 2)
        try:
            revision, kvs = await self.client.range_prefix(self.prefix)
        except (EtcdUnavailable, EtcdError) as exc:
            raise StartupError(f"registry: cannot reach etcd at {', '.join(self.config.etcd_endpoints)}: {exc}") from exc
        self.table.load(revision, kvs, self.prefix)
        self.synced_at = time.time()
        self.watching = True
        log.info("registry: %d service(s) in etcd under %s at revision %d (%s)",
                 len(self.table.records), self.prefix, revision, self.client.endpoint)
        self._task = asyncio.create_task(self._watch_loop(), name="registry-etcd-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._revoking:
            await asyncio.wait(set(self._revoking), timeout=1.0)

    async def _watch_loop(self) -> None:
        assert self.client is not None
        client = self.client
        delay = 0.05
        while True:
            ep = client.endpoint
            try:
                async for result in client.watch(self.prefix, self.table.index + 1):
                    if not self.watching:
                        if self.watch_error is not None:
                            log.info("registry: etcd watch running again on %s", ep)
                        self.watching, self.watch_error, delay = True, None, 0.05
                    self.synced_at = time.time()
                    if result.get("events"):
                        self.table.apply(result["events"], self.prefix)
                raise EtcdUnavailable(f"{ep}: watch stream ended")
            except asyncio.CancelledError:
                raise
            except EtcdError as exc:
                # The history we need was compacted away: read everything again.
                log.warning("registry: etcd watch canceled (%s); reading the whole table again", exc)
                await self._resync()
            except EtcdUnavailable as exc:
                if self.watching or self.watch_error != str(exc):
                    log.warning("registry: etcd watch lost (%s); serving the last table, marked stale", exc)
                self.watching, self.watch_error = False, str(exc)
                client.rotate(ep)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _resync(self) -> None:
        assert self.client is not None
        try:
            revision, kvs = await self.client.range_prefix(self.prefix)
        except (EtcdUnavailable, EtcdError) as exc:
            self.watching, self.watch_error = False, str(exc)
            await asyncio.sleep(0.5)
            return
        self.table.load(revision, kvs, self.prefix)

    # -- writes ----------------------------------------------------------------------------------
    async def _call(self, make: Callable[[], Any]) -> Any:
        """Run one etcd exchange; etcd out of reach becomes a 503 the client can retry."""
        try:
            return await make()
        except EtcdUnavailable as exc:
            raise ApiError(503, f"the registry's store (etcd) is unreachable, nothing was changed: {exc}",
                           code="store_unavailable", headers={"Retry-After": RETRY_AFTER}) from exc
        except EtcdError as exc:
            raise ApiError(503, f"the registry's store (etcd) refused the change: {exc}",
                           code="store_error", headers={"Retry-After": RETRY_AFTER}) from exc

    async def _settle(self, revision: int) -> None:
        # Answer only once this registry's mirror shows the write, so a read right after sees it.
        await self.table.wait_revision(revision, self.config.etcd_timeout * 2)

    @staticmethod
    def _value(rec: dict) -> str:
        return json.dumps(rec, separators=(",", ":"))

    async def register(self, fields: dict) -> dict:
        assert self.client is not None
        client = self.client
        rec = new_record(fields, self.table.clock())
        name = rec["name"]
        old = (self.table.leases.get(name), self.table.alive.get(name))

        async def write() -> int:
            lease, alive = await asyncio.gather(client.grant(self.expire), client.grant(self.ttl))
            resp = await client.txn([], [
                {"request_put": {"key": b64(self._key("services", name)), "value": b64(self._value(rec)), "lease": lease}},
                {"request_put": {"key": b64(self._key("alive", name)), "value": "", "lease": alive}},
            ])
            return int(resp["header"]["revision"])

        revision = await self._call(write)
        self.table.counters["registrations"] += 1
        self._revoke(old)                              # the old registration's leases hold nothing now
        await self._settle(revision)
        return self.table.records.get(name, rec)

    async def _rewrite(self, name: str, change: Callable[[dict], bool]) -> int | None:
        """Compare-and-swap the record through `change` (which edits it, True if it changed).

        Returns the new revision, 0 if nothing changed, None if the record is gone."""
        assert self.client is not None
        key = self._key("services", name)
        rec = self.table.records.get(name)
        rev = self.table.revisions.get(name)
        for _ in range(8):
            if rec is None or rev is None:
                return None
            new = {k: v for k, v in json.loads(json.dumps(rec)).items() if k not in _LOCAL_FIELDS}
            new["metadata"] = dict(new.get("metadata") or {})
            if not change(new):
                return 0
            new["last_heartbeat"] = self.table.clock()
            resp = await self.client.txn(
                [{"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}],
                [{"request_put": {"key": b64(key), "value": b64(self._value(new)), "ignore_lease": True}}])
            if resp.get("succeeded"):
                return int(resp["header"]["revision"])
            _, kv = await self.client.get(key)         # someone else wrote it first: start from theirs
            rec, rev = (kv_json(kv), int(kv["mod_revision"])) if kv else (None, None)
        raise EtcdUnavailable(f"record {name} kept changing under a compare-and-swap")

    async def _refresh(self, name: str) -> tuple[bool, int]:
        """Refresh both leases (no write); bring back the alive key if it lapsed.

        Returns (record still exists, revision written or 0)."""
        assert self.client is not None
        client = self.client
        lease = self.table.leases.get(name)
        alive = self.table.alive.get(name)
        if lease is None:
            return False, 0
        left, alive_left = await asyncio.gather(
            client.keepalive(lease), client.keepalive(alive) if alive else asyncio.sleep(0, 0))
        if left <= 0:
            return False, 0                            # expired: the delete is on its way
        if alive_left > 0:
            return True, 0
        fresh = await client.grant(self.ttl)
        resp = await client.txn([], [{"request_put": {"key": b64(self._key("alive", name)), "value": "", "lease": fresh}}])
        return True, int(resp["header"]["revision"])

    async def heartbeat(self, name: str, status: str | None = None, metadata: dict | None = None) -> dict | None:
        async def beat() -> tuple[bool, int]:
            ok, rev = await self._refresh(name)
            if not ok:
                return False, 0
            if status is not None or metadata:
                written = await self._rewrite(name, lambda r: merge_heartbeat(r, status, metadata))
                if written is None:
                    return False, 0
                rev = max(rev, written)
            return True, rev

        ok, revision = await self._call(beat)
        if not ok:
            return None
        self.table.counters["heartbeats"] += 1
        rec = self.table.records.get(name)
        if rec is not None:
            rec["last_heartbeat"] = self.table.clock()
        if revision:
            await self._settle(revision)
        return self.table.records.get(name)

    async def update(self, name: str, fields: dict) -> dict | None:
        def change(rec: dict) -> bool:
            apply_update(rec, fields)
            return True                                # a PUT always writes, as in memory

        async def put() -> int | None:
            ok, rev = await self._refresh(name)
            if not ok:
                return None
            written = await self._rewrite(name, change)
            return None if written is None else max(rev, written)

        revision = await self._call(put)
        if revision is None:
            return None
        await self._settle(revision)
        return self.table.records.get(name)

    async def deregister(self, name: str) -> bool:
        assert self.client is not None
        client = self.client
        leases = (self.table.leases.get(name), self.table.alive.get(name))

        async def delete() -> tuple[int, int]:
            resp = await client.txn([], [
                {"request_delete_range": {"key": b64(self._key("services", name))}},
                {"request_delete_range": {"key": b64(self._key("alive", name))}},
            ])
            first = (resp.get("responses") or [{}])[0].get("response_delete_range") or {}
            return int(first.get("deleted", 0) or 0), int(resp["header"]["revision"])

        self.table.deleting.add(name)
        try:
            deleted, revision = await self._call(delete)
        except ApiError:
            self.table.deleting.discard(name)
            raise
        if not deleted:
            self.table.deleting.discard(name)
            return False
        self.table.counters["deregistrations"] += 1
        self._revoke(leases)
        await self._settle(revision)
        return True
