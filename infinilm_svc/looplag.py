"""Event-loop lag: how late the loop runs a timer, which is how long something blocked it."""
from __future__ import annotations

import asyncio
import gc
import time
from bisect import bisect_left

# Bucket bounds in seconds: a healthy loop is late by well under a millisecond.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


_freezes = 0    # times freeze_heap ran


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's sight (gc.freeze).

    A full collection walks every object the collector sees, with the loop stopped: about 90 ms for
    a router holding 10,000 backends on a small machine, several times over while such a fleet is
    taken in (the collector runs a full pass each time the heap has grown by a quarter). Long-lived
    objects frozen once are never walked again. The cost: an object frozen here that later becomes
    cyclic garbage stays in memory; what the router drops is released by reference count. Freezing
    costs next to nothing; counting what is frozen walks it all, so it is counted only when asked.
    """
    global _freezes
    gc.freeze()
    _freezes += 1


class LoopLag:
    """Wakes every `every` seconds and records how much later than asked it woke.

    A callback that keeps the loop for 300 ms makes the next wake-up about 300 ms late, so the
    worst lag seen is the longest stall (to within `every`). Kept: a histogram of every sample,
    the worst since start, and the worst of the current and previous minute (`recent_max`).
    """

    WINDOW = 60.0
    FREEZE_AFTER = 0.05    # a full collection slower than this freezes what survived it

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.buckets = [0] * (len(LAG_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0
        self.max = 0.0
        self._window_max = [0.0, 0.0]     # previous window, current window
        self._window_end = 0.0
        # The garbage collector's pauses, the one stall no code of ours shows: (count, longest) of
        # the full collections (generation 2), and the longest of any generation.
        self.gc_full = 0
        self.gc_full_max = 0.0
        self.gc_max = 0.0
        self._gc_start = 0.0
        self._frozen = (-1, 0)            # (freezes, objects frozen) when last counted
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_start
        if took > self.gc_max:
            self.gc_max = took
        if info.get("generation") == 2:
            self.gc_full += 1
            if took > self.gc_full_max:
                self.gc_full_max = took
            if took > self.FREEZE_AFTER and self._loop is not None:
                self._loop.call_soon(self._freeze)

    def _freeze(self) -> None:
        """Freeze the heap after a slow full collection (freeze_heap): it means many long-lived
        objects, which each later full collection would walk again. Right after a full collection
        what is left is alive, so freezing it loses nothing."""
        freeze_heap()

    @property
    def gc_frozen(self) -> int:
        """Objects out of the collector's sight (frozen at start, as a fleet is taken in, or after
        a slow full collection). Counting walks them all (about 1 ms for 200,000), so it is
        counted again only after a freeze, not on every /health."""
        if self._frozen[0] != _freezes:
            self._frozen = (_freezes, gc.get_freeze_count())
        return self._frozen[1]

    def add(self, lag: float, now: float) -> None:
        self.buckets[bisect_left(LAG_BUCKETS, lag)] += 1
        self.total += lag
        self.count += 1
        if lag > self.max:
            self.max = lag
        if now >= self._window_end:
            self._window_max = [self._window_max[1] if now - self._window_end < self.WINDOW else 0.0, 0.0]
            self._window_end = now + self.WINDOW
        if lag > self._window_max[1]:
            self._window_max[1] = lag

    @property
    def recent_max(self) -> float:
        """The worst lag of the last one to two minutes."""
        return max(self._window_max)

    def histogram(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) pairs, the last bound being +inf."""
        out, acc = [], 0
        for bound, c in zip(LAG_BUCKETS, self.buckets, strict=False):   # +inf is added below
            acc += c
            out.append((bound, acc))
        out.append((float("inf"), acc + self.buckets[-1]))
        return out

    def to_json(self) -> dict:
        return {"max_ms": round(self.max * 1000, 1), "recent_max_ms": round(self.recent_max * 1000, 1),
                "mean_ms": round(self.total / self.count * 1000, 2) if self.count else None,
                "samples": self.count, "gc_full_collections": self.gc_full,
                "gc_full_max_ms": round(self.gc_full_max * 1000, 1), "gc_max_ms": round(self.gc_max * 1000, 1),
                "gc_frozen_objects": self.gc_frozen}

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_gc)
        try:
            while True:
                asked = loop.time() + self.every
                await asyncio.sleep(self.every)
                now = loop.time()
                self.add(max(0.0, now - asked), now)
        finally:
            gc.callbacks.remove(self._on_gc)
