"""Requests waiting at the router for a place on an engine: one queue per model, in priority
order, fair between tenants, bounded, and honest about when to come back.

A backend takes as many requests at once as its engine can run (its `Admission`); beyond that a
request waits here, not in the engine. When a place frees on a backend, it goes to the best
request waiting for any model that backend serves: the highest class first (`priority`, then
`default`, then `flex`), and within a class the request whose tenant has had the least work done
for it so far (start-time fair queuing by tokens: each tenant's virtual time advances by the
tokens of its requests, divided by its weight, so a tenant sending twice as much waits its turn
twice as often). `flex` work never takes the last places of a model (`reserve`), so a flood of
batch work cannot keep everyone else waiting for a whole request's time.

The queue is bounded: `queue_size` requests per model, and a tenant holding its fair share of
them cannot push others out (a newcomer under its share takes the place of the newest request of
the tenant most over it). A refused request gets 429 with a Retry-After computed from how fast its
tenant's requests have been leaving the queue, and a ticket: the same request sent again by the
same tenant once that time has passed is queued whatever the bounds.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import time
from bisect import insort
from collections import OrderedDict, deque
from itertools import count
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple

from ..errors import ApiError
from .stats import Samples

if TYPE_CHECKING:
    from .table import Backend, Group

CLASSES = ("priority", "default", "flex")
# OpenAI's service_tier values, to a class ("auto" and "scale" are served as "default").
TIERS = {"priority": 0, "default": 1, "auto": 1, "scale": 1, "flex": 2}
FLEX = 2
_TICKETS_MAX = 1000          # tickets a tenant may hold (beyond: refused without one)
_TENANTS_MAX = 256           # tenants whose figures are kept per model (the idle ones go first)


class QueueFull(Exception):
    """Not queued: come back after `retry_after` seconds."""

    def __init__(self, retry_after: int, why: str) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class QueueTimeout(Exception):
    """Queued for longer than the caller would wait."""


class Ticket(NamedTuple):
    """A refused request's promise of a place when it comes back."""

    key: bytes
    due: float
    expires: float


class Tenant:
    """What one tenant has waiting, has been served, and its standing in the fair order."""

    __slots__ = ("name", "weight", "vfinish", "waiting", "tickets", "left", "admitted", "rejected", "cancelled",
                 "tokens", "wait")

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.weight = weight
        self.vfinish = 0.0
        self.waiting = 0
        self.tickets: deque[Ticket] = deque()
        self.left: deque[float] = deque(maxlen=64)    # when its last requests left the queue
        self.admitted = 0        # started on an engine (at once or after waiting)
        self.rejected = 0        # answered 429
        self.cancelled = 0       # its client left while it waited
        self.tokens = 0          # tokens served (usage, or the estimate)
        self.wait = Samples()    # seconds waited by those that waited

    def live_tickets(self, now: float) -> int:
        t = self.tickets
        while t and t[0].expires < now:
            t.popleft()
        return len(t)

    def rate(self, now: float) -> float | None:
        """Requests per second leaving the queue for this tenant lately (None before two)."""
        left = self.left
        if len(left) < 2:
            return None
        span = max(now - left[0], left[-1] - left[0], 1e-3)
        return (len(left) - 1) / span

    def to_json(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "admitted": self.admitted, "rejected": self.rejected,
                "cancelled": self.cancelled, "tokens": self.tokens, "tickets": len(self.tickets),
                "wait_ms": self.wait.percentiles_ms()}


class Ask:
    """One request's place in a queue."""

    __slots__ = ("queue", "tenant", "rank", "cost", "vstart", "seq", "fut", "since", "started")

    def __init__(self, queue: "ModelQueue", tenant: Tenant, rank: int, cost: float) -> None:
        self.queue = queue
        self.tenant = tenant
        self.rank = rank
        self.cost = cost                 # estimated tokens
        self.vstart = 0.0
        self.seq = 0
        self.fut: asyncio.Future[Backend] | None = None
        self.since = 0.0
        self.started = False

    def __lt__(self, other: "Ask") -> bool:
        return (self.rank, self.vstart, self.seq) < (other.rank, other.vstart, other.seq)

    def finished(self, tokens: int | None) -> None:
        """The request is over: its place in the model's counts is given back, and its tenant's
        virtual time corrected by what it really cost (`tokens`, when the engine said)."""
        if not self.started:
            return
        self.started = False
        q, t = self.queue, self.tenant
        q.running[self.rank] -= 1
        if tokens is not None:
            t.vfinish += (tokens - self.cost) / t.weight
            t.tokens += tokens
        else:
            t.tokens += int(self.cost)


class ModelQueue:
    """The requests of one model (one group of backends) waiting for a place."""

    def __init__(self, scheduler: "Scheduler", group: "Group") -> None:
        self.scheduler = scheduler
        self.group = group
        self.waiting: list[Ask] = []               # sorted: class, virtual start, arrival
        self.tenants: OrderedDict[str, Tenant] = OrderedDict()
        self.running = [0, 0, 0]                   # requests of each class on an engine now
        self.vtime = 0.0
        self._members: tuple[list, frozenset] = ([], frozenset())
        self._capacity: tuple[list, int] = ([], 0)
        self.left: deque[float] = deque(maxlen=128)
        self.peaks: deque[tuple[float, int]] = deque(maxlen=4096)   # (when, non-flex running) at each start
        self.dispatched = 0
        self.rejected = 0
        self.cancelled = 0
        self.timeouts = 0
        self.waits = [Samples(), Samples(), Samples()]   # per class, seconds waited

    # -- who and how much ----------------------------------------------------------------------
    def tenant(self, name: str) -> Tenant:
        t = self.tenants.get(name)
        if t is None:
            weights = self.scheduler.config.tenant_weights
            t = self.tenants[name] = Tenant(name, float(weights.get(name, 1.0)))
            if len(self.tenants) > _TENANTS_MAX:
                for old, ot in list(self.tenants.items()):
                    if not ot.waiting and not ot.tickets:
                        del self.tenants[old]
                        break
        else:
            self.tenants.move_to_end(name)
        return t

    def members(self) -> frozenset:
        backends = self.group.backends
        if self._members[0] is not backends:
            self._members = (backends, frozenset(backends))
        return self._members[1]

    def capacity(self) -> int:
        """Places on the model's backends (0: some backend has no limit)."""
        backends = self.group.backends
        if self._capacity[0] is not backends:
            limits = [b.admission.limit for b in backends]
            self._capacity = (backends, 0 if not limits or 0 in limits else sum(limits))
        return self._capacity[1]

    def reserve(self) -> int:
        """Places flex work leaves free: what the other classes have needed at once lately (their
        peak over the last minute, plus one for the next arrival), at least one, at most
        `reserve_share` of the model's places. Work-conserving when they are quiet, room when not."""
        cap = self.capacity()
        share = self.scheduler.config.reserve_share
        if cap < 2 or share <= 0:
            return 0
        now = time.monotonic()
        peaks = self.peaks
        while peaks and peaks[0][0] < now - 60:
            peaks.popleft()
        needed = max((n for _, n in peaks), default=0) + 1
        return max(1, min(needed, round(cap * share)))

    def may_start(self, rank: int) -> bool:
        """Whether a request of this class may take a free place now (flex leaves the reserve)."""
        if rank < FLEX:
            return True
        cap = self.capacity()
        return not cap or self.running[FLEX] < cap - self.reserve()

    # -- in and out ------------------------------------------------------------------------------
    def ask(self, tenant: str, rank: int, cost: float) -> Ask:
        return Ask(self, self.tenant(tenant), rank, max(1.0, cost))

    def started(self, ask: Ask) -> None:
        ask.started = True
        self.running[ask.rank] += 1
        ask.tenant.admitted += 1
        if ask.rank < FLEX:
            self.peaks.append((time.monotonic(), self.running[0] + self.running[1]))

    async def wait(self, ask: Ask, key: bytes, timeout: float) -> "Backend":
        """Queue `ask` until a backend of the model hands it a place; that backend (its place taken)."""
        now = time.monotonic()
        t = ask.tenant
        self._admit(ask, key, now)
        loop = asyncio.get_running_loop()
        ask.fut = fut = loop.create_future()
        t.vfinish = max(t.vfinish, 0.0)
        ask.vstart = max(self.vtime, t.vfinish)
        t.vfinish = ask.vstart + ask.cost / t.weight
        ask.seq = next(self.scheduler.seq)
        ask.since = now
        insort(self.waiting, ask)
        t.waiting += 1
        self.scheduler.active.add(self)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.timeouts += 1
            raise QueueTimeout() from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().admission.leave()       # handed a place as its client left
            elif not (fut.done() and not fut.cancelled() and fut.exception() is not None):
                t.cancelled += 1
                self.cancelled += 1
            raise
        finally:
            if ask in self.waiting:
                self._remove(ask)

    def _admit(self, ask: Ask, key: bytes, now: float) -> None:
        """Room for `ask`, or QueueFull: a ticket first, then the bounds, then pushing out."""
        t = ask.tenant
        t.live_tickets(now)                            # drops the expired ones
        tk = next((x for x in t.tickets if x.key == key), None)
        if tk is not None:
            if now >= tk.due - 0.5:
                t.tickets.remove(tk)
                return                                 # it came back when told: queued
            raise self._refuse(t, now, "it came back before its Retry-After", after=math.ceil(tk.due - now))
        size = self.scheduler.config.queue_size
        present = {a.tenant.name for a in self.waiting} | {t.name}
        share = max(1, size // len(present))
        if t.waiting + len(t.tickets) >= share:
            raise self._refuse(t, now, f"tenant {t.name!r} holds its share of the queue ({share})", key, share)
        if len(self.waiting) >= size:
            victim = self._most_over(share)
            if victim is None:
                raise self._refuse(t, now, f"the queue of {size} is full", key, share)
            # The newcomer is under its share: the newest request of the tenant most over it goes.
            self._remove(victim)
            assert victim.fut is not None
            vt = victim.tenant
            victim.fut.set_exception(self._refuse(vt, now, "pushed out by a tenant under its share", share=share))

    def _most_over(self, share: int) -> Ask | None:
        counts: dict[str, int] = {}
        for a in self.waiting:
            counts[a.tenant.name] = counts.get(a.tenant.name, 0) + 1
        worst = max(counts.items(), key=lambda kv: kv[1], default=None)
        if worst is None or worst[1] <= share:
            return None
        return max((a for a in self.waiting if a.tenant.name == worst[0]), key=lambda a: a.seq)

    def _refuse(self, t: Tenant, now: float, why: str, key: bytes | None = None, share: int = 1,
                after: int | None = None) -> QueueFull:
        """A 429 for tenant `t`, with when to come back, and a ticket for `key` holding a place
        for it then: the tenant's requests waiting and promised beyond its share must leave the
        queue first, at the rate its requests have been leaving it (the model's, shared, before
        it has one)."""
        t.rejected += 1
        self.rejected += 1
        if after is None:
            rate = t.rate(now) or ((self.rate(now) or 0.0) / max(1, len(self.tenants))) or 1.0
            ahead = max(1, t.waiting + len(t.tickets) - share + 1)
            after = max(1, min(120, math.ceil(ahead / rate)))
            if key is not None and len(t.tickets) < _TICKETS_MAX:
                due = now + after
                t.tickets.append(Ticket(key, due, due + max(2.0, after)))
        return QueueFull(after, why)

    def rate(self, now: float) -> float | None:
        left = self.left
        if len(left) < 2:
            return None
        return (len(left) - 1) / max(now - left[0], 1e-3)

    def _remove(self, ask: Ask) -> None:
        i = self.waiting.index(ask)
        del self.waiting[i]
        ask.tenant.waiting -= 1
        if not self.waiting:
            self.scheduler.active.discard(self)

    def best_for(self, b: "Backend") -> Ask | None:
        """The first waiting request that may take a place on `b`."""
        if b not in self.members():
            return None
        for a in self.waiting:
            if self.may_start(a.rank):
                return a
        return None

    def hand(self, ask: Ask, b: "Backend") -> None:
        """Give `ask` the place on `b` that was just freed (already counted as taken)."""
        now = time.monotonic()
        self._remove(ask)
        self.vtime = max(self.vtime, ask.vstart)
        waited = now - ask.since
        self.waits[ask.rank].add(waited)
        ask.tenant.wait.add(waited)
        ask.tenant.left.append(now)
        self.left.append(now)
        self.dispatched += 1
        assert ask.fut is not None
        ask.fut.set_result(b)

    def to_json(self) -> dict[str, Any]:
        return {
            "waiting": len(self.waiting),
            "waiting_by_class": {c: sum(1 for a in self.waiting if a.rank == i) for i, c in enumerate(CLASSES)},
            "running_by_class": dict(zip(CLASSES, self.running, strict=True)),
            "capacity": self.capacity() or None, "reserve": self.reserve(),
            "dispatched_from_queue": self.dispatched, "rejected": self.rejected, "cancelled": self.cancelled,
            "timed_out": self.timeouts,
            "wait_ms_by_class": {c: self.waits[i].percentiles_ms() for i, c in enumerate(CLASSES)},
            "tenants": {name: t.to_json() for name, t in self.tenants.items()},
        }


class Scheduler:
    """Every model's queue, and who gets a place when one frees."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.queues: dict[tuple, ModelQueue] = {}
        self.active: set[ModelQueue] = set()      # queues with requests waiting
        self.seq = count()

    def queue(self, group: "Group") -> ModelQueue:
        q = self.queues.get(group.key)
        if q is None or q.group is not group:
            q = self.queues[group.key] = ModelQueue(self, group)
        return q

    def freed(self, b: "Backend") -> bool:
        """A place on `b` is free: hand it to the best request waiting for it; True if one took it."""
        if not self.active:
            return False
        best: Ask | None = None
        for q in self.active:
            a = q.best_for(b)
            if a is not None and (best is None or a < best):
                best = a
        if best is None:
            return False
        best.queue.hand(best, b)
        return True

    def all(self) -> Iterable[ModelQueue]:
        return self.queues.values()


def tier_of(value: Any, where: str) -> int:
    """The class of a service_tier value (body field or header), or 400 naming the allowed ones."""
    if isinstance(value, str) and value in TIERS:
        return TIERS[value]
    raise ApiError(400, f"{where} must be one of {', '.join(sorted(TIERS))}, got {value!r}",
                   "invalid_request_error", "invalid_service_tier")


def classify(data: dict | None, headers: Mapping[str, str], token: str | None, config: Any,
             may_promote: bool) -> tuple[int, str]:
    """(class, tenant) of a request. The class: the body's service_tier, else the tier header,
    else default; priority only for a key allowed to ask for it (`may_promote`), otherwise served
    as default. The tenant: the API key (by a digest of it, never the key) when keys are on, else
    the body's `user`, else everyone together."""
    tier = data.get("service_tier") if data is not None else None
    if tier is not None:
        rank = tier_of(tier, "service_tier")
    elif (h := headers.get(config.tier_header)) is not None:
        rank = tier_of(h.strip().lower(), config.tier_header)
    else:
        rank = TIERS["default"]
    if rank < TIERS["default"] and not may_promote:
        rank = TIERS["default"]
    if token is not None:
        tenant = "key-" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    else:
        user = data.get("user") if data is not None else None
        tenant = f"user:{user[:64]}" if isinstance(user, str) and user else "(anyone)"
    return rank, tenant


def request_key(tenant: str, body: bytes) -> bytes:
    """What identifies a request sent again (for its ticket)."""
    return hashlib.blake2b(body, digest_size=16, key=tenant.encode()[:64]).digest()


__all__ = ["CLASSES", "FLEX", "TIERS", "Ask", "ModelQueue", "QueueFull", "QueueTimeout", "Scheduler", "Tenant",
           "classify", "request_key", "tier_of"]
