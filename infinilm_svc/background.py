"""Background loops that cannot die silently: each failure is logged, shown, and followed by a restart.

Every role runs loops beside its HTTP server (the registry's sweep, the router's registry watch,
the babysitter's heartbeats). A loop that raises would otherwise end without a word while the
role keeps answering as if all were well. A `TaskSupervisor` restarts such a loop with back-off
and keeps what happened for the role's `/health`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


@dataclass
class TaskState:
    """What a supervised loop is doing and how it has failed."""

    name: str
    state: str = "running"          # "running" | "backoff" (failed, waiting to restart) | "done"
    failures: int = 0
    last_error: str | None = None
    last_failure_at: float | None = None
    task: asyncio.Task | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "failures": self.failures, "last_error": self.last_error,
                "last_failure_at": self.last_failure_at}


class TaskSupervisor:
    """Runs named coroutine factories; restarts one that raises, with exponential back-off.

    A loop that ran for longer than `stable_after` before failing starts again from the shortest
    delay. A loop that returns normally is finished and is not restarted.
    """

    def __init__(self, role: str, min_delay: float = 0.5, max_delay: float = 30.0, stable_after: float = 60.0) -> None:
        self.role = role
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self.tasks: dict[str, TaskState] = {}

    def spawn(self, name: str, factory: Callable[[], Awaitable[Any]]) -> TaskState:
        """Start `factory()` now under supervision."""
        st = self.tasks[name] = TaskState(name)
        st.task = asyncio.create_task(self._run(st, factory), name=f"{self.role}-{name}")
        return st

    async def _run(self, st: TaskState, factory: Callable[[], Awaitable[Any]]) -> None:
        delay = self.min_delay
        while True:
            started = time.monotonic()
            st.state = "running"
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point is to catch whatever the loop did not
                if time.monotonic() - started > self.stable_after:
                    delay = self.min_delay
                st.failures += 1
                st.last_error = f"{type(exc).__name__}: {exc}"[:500]
                st.last_failure_at = time.time()
                st.state = "backoff"
                log.error("%s: background task %s failed (%d so far); restarting in %.1f s",
                          self.role, st.name, st.failures, delay, exc_info=exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            st.state = "done"
            return

    @property
    def degraded(self) -> bool:
        """True while some loop is waiting to be restarted after a failure."""
        return any(st.state == "backoff" for st in self.tasks.values())

    def report(self) -> dict[str, dict[str, Any]]:
        """Every loop's state, for /health."""
        return {name: st.as_dict() for name, st in self.tasks.items()}

    async def close(self) -> None:
        """Cancel every loop and wait for each to finish."""
        tasks = [st.task for st in self.tasks.values() if st.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
