"""Load-balancing policies: each picks a backend from a precomputed group in O(1) or O(log n)."""
from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from bisect import bisect_left
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Protocol, cast

from .kvmodel import CacheIndex, EngineCache, Placement, Revisits, Slot
from .prompt import PromptKey, prompt_key, session_of

if TYPE_CHECKING:
    from ..config.router import RouterConfig
    from .table import Backend, Group

# Asks a backend's engine for its slot count in the background: (backend, callback with the count or None).
PropsReader = Callable[["Backend", Callable[[int | None], None]], None]
log = logging.getLogger(__name__)

_NOTHING: frozenset = frozenset()


class Route:
    """The routing fields of one request (parsed once), and where the cache model placed it."""

    __slots__ = ("model", "session_key", "prompt", "in_flight", "placement")

    def __init__(self, model: str, session_key: str | None = None, prompt: PromptKey | None = None) -> None:
        self.model = model
        self.session_key = session_key
        self.prompt = prompt
        self.in_flight = 0  # requests in flight for this model (bounded-load hashing)
        self.placement: Placement | None = None   # set by cache_aware's pick


class PolicyState:
    """What a policy keeps per group of backends: at least a turn counter (ties and round robin)."""

    __slots__ = ("turn",)

    def __init__(self) -> None:
        self.turn = 0


class WeightedState(PolicyState):
    """The interleaved sequence weighted round robin walks."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        super().__init__()
        self.seq: list[Backend] = []


class RingState(PolicyState):
    """The consistent-hash ring: sorted point hashes and the backend at each point."""

    __slots__ = ("hashes", "ring")

    def __init__(self) -> None:
        super().__init__()
        self.hashes: list[int] = []
        self.ring: list[Backend] = []


class Policy(Protocol):
    """What every load-balancing policy offers the table and the proxy."""

    name: str

    def prepare(self, route: Route, data: dict | None, headers: Mapping[str, str], in_flight: int) -> None:
        """Fill in the fields of `route` this policy picks by."""

    def new_state(self) -> PolicyState:
        """A fresh per-group state."""

    def refresh(self, group: "Group") -> None:
        """The group's backends changed: recompute what picking needs."""

    def pick(self, group: "Group", route: Route, exclude: Collection = ...) -> "Backend | None":
        """A backend of the group for this request (not in `exclude`), or None."""


def _first_ok(backends: list["Backend"], start: int, exclude: Collection) -> "Backend | None":
    n = len(backends)
    for i in range(n):
        b = backends[(start + i) % n]
        if b.available and b not in exclude:
            return b
    return None


class RoundRobin:
    """Rotates through the group's backends; one counter per model (and pool)."""

    name = "round_robin"

    def prepare(self, route: Route, data: dict | None, headers: Mapping[str, str], in_flight: int) -> None:
        """Fill in the fields of `route` this policy picks by (most policies need none)."""

    def new_state(self) -> PolicyState:
        return PolicyState()

    def refresh(self, group: "Group") -> None:
        pass

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        backends = group.backends
        if not backends:
            return None
        st = group.state
        i = st.turn
        st.turn = i + 1
        b = backends[i % len(backends)]
        if b.available and b not in exclude:
            return b
        return _first_ok(backends, i, exclude)


class Weighted(RoundRobin):
    """Round robin over a list where each backend appears `weight` times (gcd-reduced, interleaved)."""

    name = "weighted"

    def new_state(self) -> PolicyState:
        return WeightedState()

    def refresh(self, group: "Group") -> None:
        ws = [max(1, min(100, int(b.weight))) for b in group.backends]
        g = 0
        for w in ws:
            g = math.gcd(g, w)
        ws = [w // (g or 1) for w in ws]
        # Interleave by smooth weighted round robin once, so picks spread evenly.
        current = [0] * len(ws)
        total = sum(ws)
        seq = []
        for _ in range(total):
            for i, w in enumerate(ws):
                current[i] += w
            j = max(range(len(ws)), key=current.__getitem__)
            current[j] -= total
            seq.append(group.backends[j])
        cast(WeightedState, group.state).seq = seq

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        st = cast(WeightedState, group.state)
        seq = st.seq
        if not seq:
            return None
        i = st.turn
        st.turn = i + 1
        b = seq[i % len(seq)]
        if b.available and b not in exclude:
            return b
        return _first_ok(group.backends, i, exclude)


class LeastRequests(RoundRobin):
    """The backend with the fewest requests in flight (ties rotate); scans the model's group."""

    name = "least_requests"

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        backends = group.backends
        n = len(backends)
        if not n:
            return None
        st = group.state
        start = st.turn
        st.turn = start + 1
        best = None
        best_load = 1 << 62
        for k in range(n):
            b = backends[(start + k) % n]
            load = b.stats.in_flight
            if load < best_load and b.available and b not in exclude:
                best, best_load = b, load
        return best


class PowerOfTwo(RoundRobin):
    """Two random backends; the one with fewer requests in flight."""

    name = "power_of_two"

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        backends = group.backends
        n = len(backends)
        if not n:
            return None
        if n == 1:
            b = backends[0]
            return b if b.available and b not in exclude else None
        i = random.randrange(n)
        j = random.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = backends[i], backends[j]
        if b.stats.in_flight < a.stats.in_flight:
            a, b = b, a
        for c in (a, b):
            if c.available and c not in exclude:
                return c
        return _first_ok(backends, i, exclude)


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Session(RoundRobin):
    """Consistent hashing with bounded load on the session key; round robin without a key."""

    name = "session"
    VNODES = 64
    # Ring points at most: past 1,024 backends each gets fewer than VNODES points (6 each at
    # 10,000), so a rebuild sorts at most this many, not 640,000 (14 s measured). The keys of
    # a group move once whenever its size crosses a point where the share changes.
    MAX_POINTS = 65536

    def __init__(self, load_factor: float, header: str) -> None:
        self.load_factor = load_factor
        self.header = header
        self.points: dict[str, list[int]] = {}    # backend name -> its ring hashes (hashed once)

    def prepare(self, route: Route, data: dict | None, headers: Mapping[str, str], in_flight: int) -> None:
        """The session key: the body's `prompt_cache_key`, else the session header, else `user`."""
        route.session_key = session_of(data, headers, self.header)
        route.in_flight = in_flight

    def new_state(self) -> PolicyState:
        return RingState()

    def refresh(self, group: "Group") -> None:
        vnodes = max(1, min(self.VNODES, self.MAX_POINTS // max(1, len(group.backends))))
        cache = self.points
        if len(cache) > 4 * len(group.backends) + 1024:
            cache.clear()     # names long gone
        points: list[tuple[int, Any]] = []
        for b in group.backends:
            hashes = cache.get(b.name)
            if hashes is None or len(hashes) < vnodes:
                hashes = cache[b.name] = [_hash64(f"{b.name}#{v}") for v in range(vnodes)]
            points.extend((h, b) for h in hashes[:vnodes])
        points.sort(key=itemgetter(0))
        st = cast(RingState, group.state)
        st.hashes = [h for h, _ in points]
        st.ring = [b for _, b in points]

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        key = route.session_key
        if key is None:
            return RoundRobin.pick(self, group, route, exclude)
        st = cast(RingState, group.state)
        hashes, ring = st.hashes, st.ring
        n = len(group.backends)
        if not n:
            return None
        cap = math.ceil(self.load_factor * (route.in_flight + 1) / n)
        i = bisect_left(hashes, _hash64(key))
        size = len(ring)
        fallback = None
        for k in range(size):
            b = ring[(i + k) % size]
            if not b.available or b in exclude:
                continue
            if b.stats.in_flight < cap:
                return b
            if fallback is None:
                fallback = b
        return fallback


class CacheAware(LeastRequests):
    """Places each prompt on the engine (and, for engines with slots, the slot) where its predicted
    time to first token is least: the work queued there, plus the uncached part of the prompt at
    that engine's prefill speed, plus, for a slot, the wait while it is busy and what overwriting it
    costs the conversation it holds (by how likely that one is to come back). The predictions and
    their checks are the cache model's (`kvmodel`)."""

    name = "cache_aware"
    SPREAD_TOKENS = 8       # what one more request in flight on an engine costs, in prefill tokens
    SCAN = 64               # engines looked at per request at most, besides those holding a match

    def __init__(self, config: "RouterConfig", read_props: "PropsReader | None" = None) -> None:
        self.read_props = read_props
        self.block = config.cache_block_chars
        self.max_chars = config.cache_max_chars
        self.min_blocks = max(1, -(-config.cache_min_match // config.cache_block_chars))
        self.ratio = config.cache_balance_ratio
        self.abs = config.cache_balance_abs
        self.memory_blocks = config.cache_max_entries
        self.pin = config.cache_pin_slots
        self.header = config.session_header
        self.index = CacheIndex()
        self.revisits = Revisits()

    def prepare(self, route: Route, data: dict | None, headers: Mapping[str, str], in_flight: int) -> None:
        if data is not None:
            route.prompt = prompt_key(data, route.model, self.block, self.max_chars,
                                      session_of(data, headers, self.header))

    def engine(self, b: "Backend") -> EngineCache:
        """`b`'s cache model (made on first use), with as many slots as its engine reports."""
        e = b.cache
        if e is None or e.index is not self.index:
            e = b.cache = EngineCache(b, self.index, self.memory_blocks)
            e.on_suspect = self._suspect
        n = b.total_slots if self.pin else 0
        if n != len(e.slots):
            e.set_slots(n)
        if b.host_cache is not e.host_cache:
            e.set_host_cache(b.host_cache)
        return e

    def refresh(self, group: "Group") -> None:
        for b in group.backends:
            self.engine(b)

    def _suspect(self, e: EngineCache) -> None:
        """An engine keeps denying the hits its slots should give: ask it how many slots it has."""
        b = e.backend
        if self.read_props is None:
            e.checking = False
            return

        def counted(n: int | None) -> None:
            why = e.slots_counted(n)
            if why is not None:
                log.warning("backend %s: %s; it is routed without slots from now on", b.name, why)
        self.read_props(b, counted)

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        prompt = route.prompt
        route.placement = None
        if prompt is None:
            return LeastRequests.pick(self, group, route, exclude)
        backends = group.backends
        if not backends:
            return None
        now = time.monotonic()
        hashes = prompt.hashes
        found = self.index.matches(hashes, self.min_blocks) if len(hashes) >= self.min_blocks else {}
        if len(backends) > self.SCAN:
            members = set(backends)
            near = {h.engine.backend for h in found} & members
            backends = [*near, *random.sample(backends, self.SCAN)]
        else:           # ties go round: the scan starts one further each time
            st = group.state
            k = st.turn % len(backends)
            st.turn += 1
            if k:
                backends = backends[k:] + backends[:k]
        block, chars, session = self.block, prompt.chars, prompt.session
        weight = self.revisits.weight
        best: tuple | None = None      # (tier, cost, predicted ms, backend, engine, slot, slot match, memory match)
        returned = 0.0
        for b in backends:
            if not b.available or b in exclude:
                continue
            e = b.cache or self.engine(b)
            if e.timed:
                ms, cpt = e.ms_per_token, e.chars_per_token
            else:                                 # not heard from yet: like the fleet on average
                ms, cpt = e.ms_per_token, e.chars_per_token = self.index.ms_per_token, self.index.chars_per_token
            base = e.base_ms + (e.pending + b.stats.in_flight * self.SPREAD_TOKENS) * ms
            mem = found.get(e.memory, 0)
            if not e.slotted:
                cost = base + max(0, chars - mem * block) / cpt * ms
                if best is None or (0, cost) < best[:2]:
                    best = (0, cost, cost, b, e, None, 0, mem)
                continue
            # Beyond a slot's exact match, the memory's counts only as often as it came true here.
            odds = e.memory_odds if e.extra > 1.0 else 0.0
            for s in e.slots:
                m = found.get(s, 0)
                own = (m and m == len(s.hashes)) or (session is not None and s.session == session)
                if own and m and not s.busy:
                    returned = max(returned, now - s.released_at)
                likely = m + odds * (mem - m) if mem > m else m
                predicted = base + max(0.0, chars - likely * block) / cpt * ms
                if s.busy:
                    predicted += e.remaining_ms(s, now)
                cost = predicted
                if s.hashes and not own:
                    # What the conversation holding the slot loses if it comes back: its part beyond
                    # the prefix this prompt shares with it (that prefix stays in the slot).
                    lost = s.chars - m * block
                    if lost > 0:
                        cost += weight(0.0 if s.busy else now - s.released_at) * lost / cpt * ms
                if best is None or (0, cost) < best[:2]:
                    best = (0, cost, predicted, b, e, s, m, mem)
        if best is None:
            return None
        _, _, predicted, b, e, slot, m, mem = best
        if slot is None and mem and found:
            b, e, predicted, mem = self._balanced(backends, b, e, predicted, mem, exclude)
        if returned:
            self.revisits.returned(returned)
        if log.isEnabledFor(logging.DEBUG):
            owner = next((h for h, k in found.items() if isinstance(h, Slot) and k == len(h.hashes)), None)
            log.debug("placed %s/%s: match %d blocks (slot %d, memory %d) of %d, cost %.1f ms; own slot %s",
                      b.name, slot.id if slot is not None else "-", max(m, mem), m, mem, len(hashes), best[1],
                      f"{owner.engine.backend.name}/{owner.id} busy {owner.busy}" if owner is not None else "none")
        trust = e.extra > 1.0 or slot is None
        match = max(m, mem) if trust else m
        route.placement = Placement(e, slot, prompt, match * block, m * block, mem * block, block, predicted,
                                    self.revisits)
        return b

    def _balanced(self, backends: list, b: "Backend", e: EngineCache, predicted: float, mem: int,
                  exclude: Collection) -> tuple:
        """For an engine without slots the model's timing is rough: a match is not taken where its
        backend is far busier than the least busy (`cache_balance_ratio` and `cache_balance_abs`)."""
        least = min((c for c in backends if c.available and c not in exclude), key=lambda c: c.stats.in_flight,
                    default=b)
        load, low = b.stats.in_flight, least.stats.in_flight
        if load - low > self.abs and load > low * self.ratio:
            le = least.cache or self.engine(least)
            return least, le, predicted, 0
        return b, e, predicted, mem


def make_policy(name: str, config: "RouterConfig", read_props: PropsReader | None = None) -> Policy:
    """The policy object for a policy name from the config."""
    if name == "weighted":
        return Weighted()
    if name == "least_requests":
        return LeastRequests()
    if name == "power_of_two":
        return PowerOfTwo()
    if name == "session":
        return Session(config.session_load_factor, config.session_header)
    if name == "cache_aware":
        return CacheAware(config, read_props)
    return RoundRobin()
