"""The mock's stand-in for an engine with slots and a prompt cache, after llama-server's behaviour.

An engine started with N slots runs at most N requests at once, each in a slot that keeps the
tokens of the last prompt it processed (plus what it generated). A request may name its slot
(`id_slot`, taken modulo N as llama-server does) and then waits for that slot; otherwise it takes
the free slot whose content shares the longest prefix with its prompt (at least a tenth of it),
else the least recently used free slot. The prompt's tokens that the slot already holds are not
processed again: they are reported as cached (`usage.prompt_tokens_details.cached_tokens` and
`timings.cache_n`), and only the rest costs `prefill_ms_per_token` each. A token here is 4
characters of the rendered prompt.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

CHARS_PER_TOKEN = 4


def render(body: dict) -> str:
    """The text an engine would tokenize for a chat or completion request."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        out = []
        for m in msgs:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
                out.append(f"<|{m.get('role', '?')}|>{content if isinstance(content, str) else ''}\n")
        return "".join(out) + "<|assistant|>"
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return "".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n        # a[:lo] == b[:lo]; find the largest such lo by halving (strings compare fast)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Lease:
    """One request's hold on a slot, and the cache figures it will report."""

    __slots__ = ("slot", "prompt_tokens", "cached", "prompt_ms", "text")

    def __init__(self, slot: "MockSlot", text: str, cached_chars: int, ms_per_token: float) -> None:
        self.slot = slot
        self.text = text
        self.prompt_tokens = max(1, -(-len(text) // CHARS_PER_TOKEN))
        # As llama-server: at least one prompt token is always processed.
        self.cached = min(cached_chars // CHARS_PER_TOKEN, self.prompt_tokens - 1)
        self.prompt_ms = (self.prompt_tokens - self.cached) * ms_per_token

    def usage_details(self) -> dict[str, Any]:
        return {"cached_tokens": self.cached}

    def timings(self, generated: int) -> dict[str, Any]:
        n = self.prompt_tokens - self.cached
        return {"cache_n": self.cached, "prompt_n": n, "prompt_ms": round(self.prompt_ms, 3),
                "prompt_per_token_ms": round(self.prompt_ms / n, 4) if n else 0.0,
                "predicted_n": generated, "predicted_ms": 0.0}


class MockSlot:
    """One slot: what it holds, whether it is at work, and when it was last used."""

    __slots__ = ("id", "text", "busy", "last_used")

    def __init__(self, sid: int) -> None:
        self.id = sid
        self.text = ""
        self.busy = False
        self.last_used = 0.0


class SlotEngine:
    """N slots and the queue in front of them."""

    def __init__(self, n: int, ms_per_token: float) -> None:
        self.slots = [MockSlot(i) for i in range(n)]
        self.ms_per_token = ms_per_token
        self.waiters: list[asyncio.Future] = []     # requests waiting for a slot to free

    def props(self) -> dict[str, Any]:
        return {"total_slots": len(self.slots), "default_generation_settings": {"n_ctx": 4096}}

    def status(self) -> list[dict[str, Any]]:
        return [{"id": s.id, "is_processing": s.busy} for s in self.slots]

    def _choose(self, text: str) -> MockSlot | None:
        best, best_sim = None, 0.1
        for s in self.slots:
            if s.busy or not s.text:
                continue
            sim = _common_prefix(s.text, text) / max(1, len(text))
            if sim > best_sim:
                best, best_sim = s, sim
        if best is not None:
            return best
        free = [s for s in self.slots if not s.busy]
        return min(free, key=lambda s: s.last_used) if free else None

    async def acquire(self, body: dict) -> Lease:
        """Wait for a slot (the one named by `id_slot`, if any), then take it."""
        text = render(body)
        want = body.get("id_slot")
        pin = want if isinstance(want, int) and not isinstance(want, bool) and want >= 0 else None
        while True:
            slot = self.slots[pin % len(self.slots)] if pin is not None else self._choose(text)
            if slot is not None and not slot.busy:
                break
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self.waiters:
                    self.waiters.remove(fut)
        slot.busy = True
        cached = _common_prefix(slot.text, text)
        slot.text = text
        lease = Lease(slot, text, cached, self.ms_per_token)
        if lease.prompt_ms > 0:
            try:
                await asyncio.sleep(lease.prompt_ms / 1000.0)
            except BaseException:
                self.release(lease, "")
                raise
        return lease

    def release(self, lease: Lease, generated: str) -> None:
        """The request is over (finished or abandoned): the slot keeps what it processed."""
        slot = lease.slot
        if not slot.busy:
            return
        slot.text = lease.text + generated
        slot.busy = False
        slot.last_used = time.monotonic()
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        """Every slot emptied (as when the engine restarts)."""
        for s in self.slots:
            s.text = ""


__all__ = ["Lease", "SlotEngine", "render"]
