"""Load-balancing policies: each picks a backend from a precomputed group in O(1) or O(log n)."""
from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_left
from collections import OrderedDict
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Collection, Mapping

if TYPE_CHECKING:
    from ..config.router import RouterConfig
    from .table import Backend, Group

_NOTHING: frozenset = frozenset()


def content_texts(content: Any) -> list[str]:
    """The text pieces of one message's `content`: a string, or a list of parts with `text`/`content`."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [v for p in content if isinstance(p, dict) for k in ("text", "content")
            if isinstance(v := p.get(k), str)]


def message_text(data: dict) -> str | None:
    """The prompt text of a chat or completion request (for prefix matching), or None."""
    msgs = data.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if isinstance(m, dict):
                parts.extend(content_texts(m.get("content")))
                parts.append("\x1e")  # message boundary
        return "".join(parts)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\x1e".join(prompt)
    return None


class Route:
    """The routing fields of one request (parsed once)."""

    __slots__ = ("model", "session_key", "text", "in_flight")

    def __init__(self, model: str, session_key: str | None = None, text: str | None = None) -> None:
        self.model = model
        self.session_key = session_key
        self.text = text
        self.in_flight = 0  # requests in flight for this model (bounded-load hashing)


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

    def new_state(self) -> Any:
        return [0]

    def refresh(self, group: "Group") -> None:
        pass

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        backends = group.backends
        if not backends:
            return None
        st = group.state
        i = st[0]
        st[0] = i + 1
        b = backends[i % len(backends)]
        if b.available and b not in exclude:
            return b
        return _first_ok(backends, i, exclude)


class Weighted(RoundRobin):
    """Round robin over a list where each backend appears `weight` times (gcd-reduced, interleaved)."""

    name = "weighted"

    def new_state(self) -> Any:
        return [0, []]

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
        group.state[1] = seq

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        seq = group.state[1]
        if not seq:
            return None
        st = group.state
        i = st[0]
        st[0] = i + 1
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
        start = st[0]
        st[0] = start + 1
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
        key = data.get("prompt_cache_key") if data is not None else None
        if not isinstance(key, str) or not key:
            key = headers.get(self.header)
            if not key and data is not None:
                u = data.get("user")
                key = u if isinstance(u, str) and u else None
        route.session_key = key
        route.in_flight = in_flight

    def new_state(self) -> Any:
        return [0, [], []]  # rr counter, sorted ring hashes, backends at those points

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
        group.state[1] = [h for h, _ in points]
        group.state[2] = [b for _, b in points]

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        key = route.session_key
        if key is None:
            return RoundRobin.pick(self, group, route, exclude)
        hashes, ring = group.state[1], group.state[2]
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
    """Sends a prompt where its longest known prefix was sent, unless that backend is overloaded."""

    name = "cache_aware"

    def __init__(self, config: "RouterConfig") -> None:
        self.block = config.cache_block_chars
        self.max_chars = config.cache_max_chars
        self.min_blocks = max(1, -(-config.cache_min_match // config.cache_block_chars))
        self.ratio = config.cache_balance_ratio
        self.abs = config.cache_balance_abs
        self.max_entries = config.cache_max_entries

    def prepare(self, route: Route, data: dict | None, headers: Mapping[str, str], in_flight: int) -> None:
        if data is not None:
            route.text = message_text(data)

    def new_state(self) -> Any:
        return [0, OrderedDict(), {}]  # rr counter, prefix-block hash -> backend name (LRU), name -> backend

    def refresh(self, group: "Group") -> None:
        group.state[2] = {b.name: b for b in group.backends}

    def pick(self, group: "Group", route: Route, exclude: Collection = _NOTHING) -> "Backend | None":
        text = route.text
        if not text:
            return LeastRequests.pick(self, group, route, exclude)
        index: OrderedDict = group.state[1]
        block = self.block
        hashes = []
        h = 0
        for start in range(0, min(len(text), self.max_chars), block):
            chunk = text[start:start + block]
            if len(chunk) < block:
                break
            h = hash((h, chunk))
            hashes.append(h)
        least = LeastRequests.pick(self, group, route, exclude)
        if least is None:
            return None
        chosen = least
        by_name = group.state[2]
        if len(hashes) >= self.min_blocks:
            for k in range(len(hashes) - 1, self.min_blocks - 2, -1):
                owner = by_name.get(index.get(hashes[k]))
                if owner is None:
                    continue
                if owner.available and owner not in exclude:
                    load, low = owner.stats.in_flight, least.stats.in_flight
                    if not (load - low > self.abs and load > low * self.ratio):
                        chosen = owner
                break
        name = chosen.name
        for hk in hashes:
            if hk in index:
                index.move_to_end(hk)
            index[hk] = name
        while len(index) > self.max_entries:
            index.popitem(last=False)
        return chosen


def make_policy(name: str, config: "RouterConfig") -> Any:
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
        return CacheAware(config)
    return RoundRobin()
