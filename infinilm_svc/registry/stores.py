"""Where the registry keeps its table: in this process ("memory") or in etcd; one interface for both."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aiohttp

from ..background import TaskSupervisor
from ..config import RegistryConfig
from .store import StateWriter, load_state
from .table import ServiceTable

log = logging.getLogger(__name__)


class Store(Protocol):
    """The write side of the registry. Reads go to `table`, which the store keeps current."""

    kind: str
    table: ServiceTable

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
    """Today's registry: the table lives in this process (optionally saved to a state file)."""

    kind = "memory"
    stale = False

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.table = ServiceTable(config.heartbeat_ttl, config.expire_after)
        self._own: TaskSupervisor | None = None     # when not started under the app's supervisor
        self._writer: StateWriter | None = None

    def describe(self) -> dict[str, Any]:
        return {"store": self.kind}

    async def start(self, session: aiohttp.ClientSession, tasks: TaskSupervisor | None = None) -> None:
        """Restore the state file, then run the sweep (and the state writer) under `tasks`."""
        cfg = self.config
        if cfg.state_file:
            load_state(cfg.state_file, self.table)
            self._writer = StateWriter(cfg.state_file, self.table)
        if tasks is None:
            tasks = self._own = TaskSupervisor("registry")
        if self._writer is not None:
            tasks.spawn("state", self._writer.run)
        tasks.spawn("sweep", self._sweep_loop)

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
        if self._writer is not None:
            self._writer.flush()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            for name in self.table.sweep():
                log.warning("expired %s: no heartbeat for %.0f s", name, self.config.expire_after)

    async def register(self, fields: dict) -> dict:
        return self.table.register(fields)

    async def update(self, name: str, fields: dict) -> dict | None:
        return self.table.update(name, fields)

    async def heartbeat(self, name: str, status: str | None = None, metadata: dict | None = None) -> dict | None:
        return self.table.heartbeat(name, status, metadata)

    async def deregister(self, name: str) -> bool:
        return self.table.deregister(name)


def make_store(config: RegistryConfig) -> Store:
    if config.store == "etcd":
        from .etcd_store import EtcdStore
        return EtcdStore(config)
    return MemoryStore(config)
