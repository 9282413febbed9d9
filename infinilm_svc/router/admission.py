"""How many requests a backend runs at once through this router.

Every path to a backend takes its place here: a new request, a retry and a migration alike, so the
limit holds whatever path a request took. The limit is the engine's capacity (its slots, or what
the config says); with none, taking a place always succeeds. The count is the backend's
`in_flight` statistic (one count, read by the policies and the metrics). A place given back goes
first to a request waiting for it (the scheduler's queues, `queueing.py`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .stats import Counters

if TYPE_CHECKING:
    from .table import Backend


class Admission:
    """One backend's limit on requests in flight."""

    __slots__ = ("owner", "counters", "limit", "on_free")

    def __init__(self, owner: "Backend", counters: Counters, limit: int = 0,
                 on_free: "Callable[[Backend], bool] | None" = None) -> None:
        self.owner = owner
        self.counters = counters
        self.limit = limit               # 0: no limit
        self.on_free = on_free           # offered a freed place; True when it took it

    @property
    def free(self) -> bool:
        return not self.limit or self.counters.in_flight < self.limit

    def try_enter(self) -> bool:
        """Take a place if one is free (always, without a limit)."""
        c = self.counters
        if self.limit and c.in_flight >= self.limit:
            return False
        c.in_flight += 1
        return True

    def leave(self) -> None:
        """Give a place back: straight to a request waiting for it, if one is."""
        c = self.counters
        c.in_flight -= 1
        if self.on_free is not None and self.free:
            c.in_flight += 1             # taken on the waiter's behalf before it is told
            if not self.on_free(self.owner):
                c.in_flight -= 1


__all__ = ["Admission"]
