"""Where the registry keeps its table: in this process ("memory") or in etcd; one interface for both."""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Protocol

import aiohttp

from ..background import TaskSupervisor
from ..config import RegistryConfig
from ..errors import ApiError
from .store import StateFile, StateNotSaved
from .table import ServiceTable

log = logging.getLogger(__name__)


class Store(Protocol):
    """The write side of the registry. Reads go to `table`, which the store keeps current."""

    kind: str
    epoch: str          # the table's identity: changes when a registry starts with a table it did not keep

    @property
    def table(self) -> ServiceTable: ...

    @property
    def stale(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    async def start(self, session: aiohttp.ClientSession, tasks: TaskSupervisor | None = None) -> None: ...

    async def close(self) -> None: ...

    async def register(self, fields: dict) -> dict: ...

    async def update(self, name: str, fields: dict) -> dict | None: ...

    async def heartbeat(self, name: str, status: str | None = None, metadata: dict | None = None) -> dict | None: ...

    async def deregister(self, name: str) -> bool: ...


class MemoryStore:
    """Today's registry: the table lives in this process, optionally kept in a state file.

    With a state file, a change is answered only once it is on disk; one that cannot be saved is
    answered 503 (it stays in memory and is saved once the file can be written again) and the
    registry says `degraded` until then.
    """

    kind = "memory"

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.table = ServiceTable(config.heartbeat_ttl, config.expire_after)
        self._own: TaskSupervisor | None = None     # when not started under the app's supervisor
        self._state: StateFile | None = StateFile(config.state_file) if config.state_file else None
        # The table's identity: new with every start, unless a state file brings the table back.
        self.epoch = uuid.uuid4().hex

    @property
    def stale(self) -> bool:
        return self._state is not None and self._state.error is not None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"store": self.kind}
        if self._state is not None:
            out["state_file"] = {"path": self._state.path, "error": self._state.error}
        return out

    async def start(self, session: aiohttp.ClientSession, tasks: TaskSupervisor | None = None) -> None:
        """Restore the state file, then run the sweep under `tasks` (the app's supervisor)."""
        if self._state is not None:
            await self._state.load(self.table)
            self.epoch = self._state.epoch or self.epoch
        if tasks is None:
            tasks = self._own = TaskSupervisor("registry")
        tasks.spawn("sweep", self._sweep_loop)

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
        if self._state is not None:
            await self._state.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            for name in self.table.sweep():
                log.warning("expired %s: no heartbeat for %.0f s", name, self.config.expire_after)
                if self._state is not None:
                    self._state.mark(name, None)

    async def _save(self, name: str, rec: dict | None) -> None:
        if self._state is None:
            return
        self._state.mark(name, rec)
        try:
            await self._state.saved()
        except StateNotSaved as exc:
            raise ApiError(503, f"the change could not be saved, so it is not acknowledged: {exc}; "
                                "the registry keeps trying to save it", code="state_not_saved",
                           headers={"Retry-After": "1"}) from exc

    async def register(self, fields: dict) -> dict:
        rec = self.table.register(fields)
        await self._save(rec["name"], rec)
        return rec

    async def update(self, name: str, fields: dict) -> dict | None:
        rec = self.table.update(name, fields)
        if rec is not None:
            await self._save(name, rec)
        return rec

    async def heartbeat(self, name: str, status: str | None = None, metadata: dict | None = None) -> dict | None:
        before = self.table.index
        rec = self.table.heartbeat(name, status, metadata)
        # Only a heartbeat that changed the status or metadata is written (the time of the last
        # heartbeat is not kept: a restored record counts as freshly heartbeated).
        if rec is not None and self.table.index != before and (status is not None or metadata):
            await self._save(name, rec)
        return rec

    async def deregister(self, name: str) -> bool:
        if not self.table.deregister(name):
            return False
        await self._save(name, None)
        return True


def make_store(config: RegistryConfig) -> Store:
    if config.store == "etcd":
        from .etcd_store import EtcdStore
        return EtcdStore(config)
    return MemoryStore(config)
