"""The router's model of each engine's prompt cache, checked against what the engine reports.

An engine with slots (llama-server: `total_slots` in its `/props`) keeps, per slot, the tokens of
the last prompt it processed there, and only there. When the router pins each request to a slot
(the request's `id_slot`), a slot is only ever overwritten by the router's own choice, so the
router knows what every slot holds: `Slot`. An engine can also keep prompts elsewhere (llama-server's
host-memory prompt cache; vLLM's and SGLang's paged caches, which have no slots at all): `Memory`,
an LRU of block keys whose capacity is learned from the engine's answers.

Every answer says how many prompt tokens the engine took from its cache
(`usage.prompt_tokens_details.cached_tokens`, llama-server's `timings.cache_n`). Each prediction is
checked against it (`Placement.observe`): a predicted hit the engine denies means the model was
wrong about that engine (it restarted, or another router wrote its slots), and what the model
believed about it is dropped; the engine's own figures also teach the model its prefill time per
token and its characters per token. The model heals; it never drifts.
"""
from __future__ import annotations

import math
import re
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from .prompt import PromptKey

if TYPE_CHECKING:
    from .table import Backend

SIBLING_SHARE = 0.3      # of a slot's content, its worth to other conversations that may share its prefix
HIT_TOKENS = 32          # cached prompt tokens that make an answer a cache hit (precision and recall)
_MEMORY_MIN = 256        # blocks an engine's memory keeps at least, whatever it learned
_EWMA = 0.2              # weight of a new observation in the learned rates
_MIN_MS_PER_TOKEN = 0.001
# Evidence of a cache beyond the slots to start from, by what the engine's record says of one
# (llama-server's host-memory prompt cache): trusted, distrusted, or to be learned (> 1 trusts).
_EXTRA_PRIOR = {True: 2.0, False: -4.0, None: 0.0}

_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_CACHE_N = re.compile(rb'"cache_n"\s*:\s*(\d+)')
_PROMPT_N = re.compile(rb'"prompt_n"\s*:\s*(\d+)')
_PROMPT_MS = re.compile(rb'"prompt_ms"\s*:\s*([0-9.eE+-]+)')


class EngineReport(NamedTuple):
    """What one answer says about the engine's cache."""

    cached: int                  # prompt tokens taken from the cache
    prompt: int                  # prompt tokens in all
    prefill_ms: float | None     # time spent on the uncached part (llama-server's timings)


def engine_report(data: bytes) -> EngineReport | None:
    """The cache figures in an answer or a stream's final chunk, or None when it has none."""
    if b'"cache_n"' in data:                     # llama-server's timings
        cn, pn = _CACHE_N.search(data), _PROMPT_N.search(data)
        if cn is not None and pn is not None:
            ms = _PROMPT_MS.search(data)
            try:
                prefill = float(ms.group(1)) if ms is not None else None
            except ValueError:
                prefill = None
            c = int(cn.group(1))
            return EngineReport(c, c + int(pn.group(1)), prefill)
    if b'"cached_tokens"' in data:
        k, t = _CACHED.search(data), _PROMPT_TOKENS.search(data)
        if k is not None and t is not None:
            return EngineReport(int(k.group(1)), int(t.group(1)), None)
    return None


class CacheIndex:
    """Block key -> the slots and memories that hold it, over every engine: a prompt's matches are
    found by looking up its own keys, never by going through the engines. It also keeps what the
    fleet's engines taught on average, which an engine not heard from yet is assumed to be like
    (a fixed guess would make every engine already measured look better or worse than new ones)."""

    __slots__ = ("holders", "ms_per_token", "chars_per_token", "timed", "rate")

    def __init__(self) -> None:
        self.holders: dict[int, set[Any]] = {}
        self.ms_per_token = 1.0
        self.chars_per_token = 4.0
        self.timed = False          # a prefill time has been learned
        self.rate = Rate()

    def add(self, holder: Any, hashes: list[int]) -> None:
        holders = self.holders
        for h in hashes:
            s = holders.get(h)
            if s is None:
                holders[h] = {holder}
            else:
                s.add(holder)

    def remove(self, holder: Any, hashes: Any) -> None:
        holders = self.holders
        for h in hashes:
            s = holders.get(h)
            if s is not None:
                s.discard(holder)
                if not s:
                    del holders[h]

    def matches(self, hashes: list[int], min_blocks: int, limit: int = 64) -> dict[Any, int]:
        """Each holder of a prefix of `hashes` at least `min_blocks` long -> its longest match (in
        blocks), the longest first; at most `limit` holders."""
        found: dict[Any, int] = {}
        holders = self.holders
        for k in range(len(hashes) - 1, min_blocks - 2, -1):
            hs = holders.get(hashes[k])
            if not hs:
                continue
            seen = 0
            for holder in hs:
                if holder not in found:
                    found[holder] = k + 1
                    if len(found) >= limit:
                        return found
                seen += 1
                if seen >= 4 * limit:     # a prefix every engine holds: enough candidates already
                    break
        return found


class Slot:
    """One slot of an engine: the prompt it holds (as its block keys) and whether it is at work."""

    __slots__ = ("engine", "id", "hashes", "chars", "session", "busy", "started_at", "released_at")

    def __init__(self, engine: "EngineCache", sid: int) -> None:
        self.engine = engine
        self.id = sid
        self.hashes: list[int] = []
        self.chars = 0
        self.session: str | None = None
        self.busy = 0                  # requests of ours on it (more than one: queued in the engine)
        self.started_at = 0.0
        self.released_at = 0.0         # when its last request ended (loop time)

    def hold(self, prompt: PromptKey) -> None:
        """From now on the slot holds `prompt` (the engine writes it when the request runs)."""
        index = self.engine.index
        index.remove(self, self.hashes)
        self.hashes = prompt.hashes
        self.chars = prompt.chars
        self.session = prompt.session
        index.add(self, prompt.hashes)

    def clear(self) -> None:
        self.engine.index.remove(self, self.hashes)
        self.hashes = []
        self.chars = 0
        self.session = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "busy": self.busy, "chars": self.chars, "blocks": len(self.hashes)}


class Rate:
    """Time per token, averaged as two decaying sums so that long prompts weigh more than short ones."""

    __slots__ = ("ms", "tokens")

    def __init__(self) -> None:
        self.ms = 0.0
        self.tokens = 0.0

    def add(self, ms: float, tokens: float) -> None:
        keep = 1.0 - _EWMA
        self.ms = self.ms * keep + ms
        self.tokens = self.tokens * keep + tokens

    def ratio(self) -> float:
        return self.ms / self.tokens if self.tokens else 0.0


class Memory:
    """What an engine may hold beyond its slots: an LRU of block keys, its capacity learned from
    the engine's answers (shrunk when the engine denies a hit it predicted, grown when the engine
    confirms hits it alone predicted)."""

    __slots__ = ("engine", "keys", "capacity", "limit")

    def __init__(self, engine: "EngineCache", limit: int) -> None:
        self.engine = engine
        self.keys: OrderedDict[int, None] = OrderedDict()
        self.limit = max(_MEMORY_MIN, limit)
        self.capacity = self.limit

    def add(self, hashes: list[int]) -> None:
        keys = self.keys
        new = []
        for h in hashes:
            if h in keys:
                keys.move_to_end(h)
            else:
                keys[h] = None
                new.append(h)
        self.engine.index.add(self, new)
        self._trim()

    def _trim(self) -> None:
        keys, index = self.keys, self.engine.index
        while len(keys) > self.capacity:
            h, _ = keys.popitem(last=False)
            index.remove(self, (h,))

    def denied(self, hashes: list[int]) -> None:
        """The engine does not hold these blocks of a prompt it was believed to hold: forget them,
        and believe it holds a little less in all (grown again by confirmations)."""
        keys, index = self.keys, self.engine.index
        gone = [h for h in hashes if h in keys]
        for h in gone:
            del keys[h]
        index.remove(self, gone)
        self.capacity = max(_MEMORY_MIN, min(self.capacity, int(len(keys) * 0.95)))
        self._trim()

    def confirmed(self) -> None:
        self.capacity = min(self.limit, int(self.capacity * 1.25) + 1)

    def clear(self) -> None:
        self.engine.index.remove(self, list(self.keys))
        self.keys.clear()


class CacheStats:
    """How well the model predicted this engine: precision, recall, and its time to first token."""

    __slots__ = ("reports", "predicted_hits", "engine_hits", "confirmed", "predicted_tokens", "cached_tokens",
                 "prompt_tokens", "resets", "ttft_n", "ttft_abs_err_ms", "ttft_predicted_ms", "ttft_actual_ms",
                 "pinned", "unpinned")

    def __init__(self) -> None:
        self.reports = 0
        self.predicted_hits = 0      # answers the model said would be hits
        self.engine_hits = 0         # answers the engine said were hits
        self.confirmed = 0           # both
        self.predicted_tokens = 0
        self.cached_tokens = 0
        self.prompt_tokens = 0
        self.resets = 0              # times what the model held about the engine was dropped
        self.ttft_n = 0
        self.ttft_abs_err_ms = 0.0
        self.ttft_predicted_ms = 0.0
        self.ttft_actual_ms = 0.0
        self.pinned = 0              # requests sent with a slot
        self.unpinned = 0

    def to_json(self) -> dict[str, Any]:
        n = self.ttft_n
        return {
            "reports": self.reports, "predicted_hits": self.predicted_hits, "engine_hits": self.engine_hits,
            "confirmed_hits": self.confirmed,
            "precision": round(self.confirmed / self.predicted_hits, 4) if self.predicted_hits else None,
            "recall": round(self.confirmed / self.engine_hits, 4) if self.engine_hits else None,
            "predicted_cached_tokens": self.predicted_tokens, "engine_cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens, "resets": self.resets,
            "pinned": self.pinned, "unpinned": self.unpinned,
            "ttft_predicted_ms_mean": round(self.ttft_predicted_ms / n, 2) if n else None,
            "ttft_actual_ms_mean": round(self.ttft_actual_ms / n, 2) if n else None,
            "ttft_abs_error_ms_mean": round(self.ttft_abs_err_ms / n, 2) if n else None,
        }


class EngineCache:
    """One backend's cache as the router models it, and what the engine taught it about its speed."""

    __slots__ = ("backend", "index", "slots", "pinning", "memory", "extra", "ms_per_token", "chars_per_token",
                 "base_ms", "pending", "duration_ms", "stats", "recent", "note", "on_suspect", "checking", "timed",
                 "rate", "host_cache", "memory_right", "memory_wrong")

    def __init__(self, backend: "Backend", index: CacheIndex, memory_blocks: int) -> None:
        self.backend = backend
        self.index = index
        self.slots: list[Slot] = []
        self.pinning = True          # send requests to a chosen slot (off once the engine refuses it)
        self.memory = Memory(self, memory_blocks)
        self.extra = 0.0             # evidence that the engine keeps prompts beyond its slots (> 1: trusted)
        self.ms_per_token = 1.0      # prefill time per uncached token (learned)
        self.chars_per_token = 4.0   # prompt characters per token (learned)
        self.base_ms = 0.0           # time to first token beyond prefill (learned)
        self.pending = 0.0           # uncached tokens of requests sent that have had no byte back yet
        self.duration_ms = 0.0       # a request's whole time here (learned; 0 until known)
        self.stats = CacheStats()
        self.recent = 0              # last predictions, one bit each (1: denied), for the pinning check
        self.note: str | None = None  # why pinning is off, said once
        self.on_suspect: Callable[["EngineCache"], None] | None = None   # told when denials pile up
        self.checking = False        # the engine's slot count is being asked
        self.timed = False           # its prefill time has been learned
        self.rate = Rate()
        self.host_cache: bool | None = None   # what its record says of a cache beyond the slots
        self.memory_right = 0.0      # the memory's claims beyond the slot, confirmed and denied (decaying)
        self.memory_wrong = 0.0

    @property
    def memory_odds(self) -> float:
        """How often the memory's claims beyond a slot came true here (a guess of 1/2 to start)."""
        return (self.memory_right + 1.0) / (self.memory_right + self.memory_wrong + 2.0)

    @property
    def slotted(self) -> bool:
        """Requests here go to slots the model chooses."""
        return self.pinning and bool(self.slots)

    def set_host_cache(self, flag: bool | None) -> None:
        """What the engine's record says of a prompt cache beyond its slots (None: it does not say)."""
        if flag is not self.host_cache:
            self.host_cache = flag
            self.extra = _EXTRA_PRIOR[flag]

    def set_slots(self, n: int) -> None:
        """The engine has `n` slots (from its record or its /props)."""
        n = max(0, min(int(n), 1024))
        while len(self.slots) > n:
            self.slots.pop().clear()
        while len(self.slots) < n:
            self.slots.append(Slot(self, len(self.slots)))

    def reset(self) -> None:
        """Forget what the engine holds: a new process, whose caches are empty (and which may take
        the slot field its predecessor refused)."""
        for s in self.slots:
            s.clear()
        self.memory.clear()
        self.memory.capacity = self.memory.limit
        self.extra = _EXTRA_PRIOR[self.host_cache]
        self.recent = 0
        self.pinning = True
        self.note = None
        self.stats.resets += 1

    def slots_counted(self, n: int | None) -> str | None:
        """The engine's own slot count, asked because it kept denying predicted hits: with fewer
        slots than the model has (the record overstates them) or none it will say, requests here
        go unpinned from now on (the reason is returned, to be logged once); with as many, the
        denials were another router's traffic, which the model recovers from by itself."""
        self.checking = False
        self.recent = 0
        if n is not None and n >= len(self.slots):
            return None
        why = (f"the engine reports {n} slot(s) where its record says {len(self.slots)}" if n is not None else
               "the engine does not report its slots (no total_slots in its /props)")
        self.pinning = False
        self.note = why
        for s in self.slots:
            if not s.busy:
                s.clear()
        return why

    def drop(self) -> None:
        """The backend is gone: take everything of it out of the index."""
        for s in self.slots:
            s.clear()
        self.memory.clear()

    def tokens(self, chars: float) -> float:
        return chars / self.chars_per_token

    def remaining_ms(self, slot: Slot, now: float) -> float:
        """How long until a busy slot is free, by this engine's usual request time."""
        per = self.duration_ms or 1000.0
        left = per * slot.busy - (now - slot.started_at) * 1000.0
        return max(left, 0.1 * per)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slots": len(self.slots), "pinning": self.slotted, "busy_slots": sum(1 for s in self.slots if s.busy),
            "filled_slots": sum(1 for s in self.slots if s.hashes), "extra_cache": self.extra > 1.0,
            "extra_evidence": self.extra,
            "memory_blocks": len(self.memory.keys), "memory_capacity": self.memory.capacity,
            "prefill_ms_per_token": round(self.ms_per_token, 4), "chars_per_token": round(self.chars_per_token, 3),
            "pending_prefill_tokens": round(self.pending, 1),
        }
        if self.note:
            out["note"] = self.note
        out.update(self.stats.to_json())
        return out


class Placement:
    """One request placed by the cache model: where, what was predicted, and the engine's verdict.

    The proxy calls `sent` when the request goes out, `first_byte` when the answer starts,
    `observe` with the answer's bytes that may carry the engine's figures, and `finish` once."""

    __slots__ = ("engine", "slot", "prompt", "match_chars", "slot_chars", "memory_chars", "block", "predicted_ms",
                 "uncached", "revisits", "sent_at", "first_at", "ttft_ms", "reported", "done")

    def __init__(self, engine: EngineCache, slot: Slot | None, prompt: PromptKey, match_chars: int, slot_chars: int,
                 memory_chars: int, block: int, predicted_ms: float, revisits: "Revisits") -> None:
        self.engine = engine
        self.slot = slot
        self.prompt = prompt
        self.match_chars = match_chars      # the prefix predicted cached
        self.slot_chars = slot_chars        # ... by the slot alone
        self.memory_chars = memory_chars    # ... by the engine's memory alone
        self.block = block                  # characters per block of the prompt's key
        self.predicted_ms = predicted_ms    # predicted time to first token
        self.uncached = engine.tokens(max(0, prompt.chars - match_chars))
        self.revisits = revisits
        self.sent_at = 0.0
        self.first_at: float | None = None
        self.ttft_ms: float | None = None    # measured on a stream only
        self.reported = False
        self.done = False

    @property
    def pin(self) -> int | None:
        """The slot to ask the engine for, or None to let it choose."""
        return self.slot.id if self.slot is not None and self.engine.slotted else None

    def sent(self) -> None:
        e, s = self.engine, self.slot
        self.sent_at = now = time.monotonic()
        if s is not None:
            s.busy += 1
            if s.busy == 1:
                s.started_at = now
            s.hold(self.prompt)
            e.stats.pinned += 1
        else:
            e.stats.unpinned += 1
        e.memory.add(self.prompt.hashes)
        e.pending += self.uncached

    def unpin(self, why: str) -> None:
        """The engine refused the slot field: this engine is routed without slots from now on."""
        e, s = self.engine, self.slot
        e.pinning = False
        e.note = why
        if s is not None:
            s.busy = max(0, s.busy - 1)
            s.clear()
            self.slot = None
            e.stats.pinned -= 1
            e.stats.unpinned += 1

    def first_byte(self, timed: bool = True) -> None:
        """The answer began (`timed`: a stream's first bytes, whose time is the time to first token)."""
        if self.first_at is not None or self.done:
            return
        self.first_at = now = time.monotonic()
        e = self.engine
        e.pending = max(0.0, e.pending - self.uncached)
        if not timed:
            return
        self.ttft_ms = actual = (now - self.sent_at) * 1000.0
        st = e.stats
        st.ttft_n += 1
        st.ttft_predicted_ms += self.predicted_ms
        st.ttft_actual_ms += actual
        st.ttft_abs_err_ms += abs(actual - self.predicted_ms)
        if self.slot is None or self.slot.busy <= 1:       # not queued behind another: the base is seen
            e.base_ms += _EWMA * (max(0.0, actual - (self.predicted_ms - e.base_ms)) - e.base_ms)

    def observe(self, data: bytes) -> None:
        """Learn from an answer's bytes if they carry the engine's cache figures (once)."""
        if self.reported:
            return
        report = engine_report(data)
        if report is not None:
            self.reported = True
            self.learn(report)

    def learn(self, r: EngineReport) -> None:
        e = self.engine
        st = e.stats
        st.reports += 1
        fleet = e.index
        first = st.reports == 1
        if r.prompt > 0 and self.prompt.chars > 0:
            cpt = min(20.0, max(0.5, self.prompt.chars / r.prompt))
            e.chars_per_token = cpt if first else e.chars_per_token + _EWMA * (cpt - e.chars_per_token)
            fleet.chars_per_token = cpt if not fleet.timed else fleet.chars_per_token + _EWMA * (cpt - fleet.chars_per_token)
        work = r.prompt - r.cached
        spent: float | None = None        # ms the engine spent on `work` prompt tokens
        if r.prefill_ms is not None and work >= 16:
            spent = r.prefill_ms
        elif r.prefill_ms is None and self.ttft_ms is not None and work >= 16:
            spent = max(0.0, self.ttft_ms - e.base_ms) * work / max(1.0, work + e.pending)
        if spent is not None:
            # Weighted by tokens (time and tokens averaged apart): a short prompt's time is mostly
            # the batch it shared with other slots' work, and must not speak for the engine's speed.
            e.rate.add(spent, work)
            fleet.rate.add(spent, work)
            # Never quite zero: costs are compared by it, and an engine that reports 0 ms is not free.
            e.ms_per_token = max(_MIN_MS_PER_TOKEN, e.rate.ratio())
            fleet.ms_per_token = max(_MIN_MS_PER_TOKEN, fleet.rate.ratio())
            e.timed = fleet.timed = True
        predicted = e.tokens(self.match_chars)
        predicted_hit = predicted >= HIT_TOKENS
        engine_hit = r.cached >= HIT_TOKENS
        st.predicted_tokens += int(predicted)
        st.cached_tokens += r.cached
        st.prompt_tokens += r.prompt
        st.predicted_hits += predicted_hit
        st.engine_hits += engine_hit
        st.confirmed += predicted_hit and engine_hit
        slot_tokens, memory_tokens = e.tokens(self.slot_chars), e.tokens(self.memory_chars)
        beyond = r.cached >= slot_tokens + HIT_TOKENS      # the engine held more than the slot did
        if self.slot is not None and (beyond or memory_tokens >= slot_tokens + HIT_TOKENS):
            # Evidence for or against the engine keeping prompts beyond its slots.
            e.extra = min(4.0, e.extra + 1.0) if beyond else max(-4.0, e.extra - 1.0)
            if memory_tokens >= slot_tokens + HIT_TOKENS:
                e.memory_right = e.memory_right * 0.95 + beyond
                e.memory_wrong = e.memory_wrong * 0.95 + (not beyond)
        if beyond and memory_tokens < r.cached - HIT_TOKENS:
            e.memory.confirmed()           # it holds more than the memory remembered
        elif not beyond and memory_tokens >= max(slot_tokens, r.cached) + HIT_TOKENS:
            self.forget_beyond(r.cached)   # the memory believed in a prefix the engine no longer has
        # Only the slot's own prediction is exact: when the engine denies it, the model was wrong
        # about the engine (a denied guess of the memory is not evidence of that).
        slot_denied = slot_tokens >= HIT_TOKENS and r.cached < HIT_TOKENS
        denied = predicted_hit and r.cached < HIT_TOKENS
        if predicted_hit:
            e.recent = ((e.recent << 1) | slot_denied) & 0xFF
        if slot_denied or (denied and self.slot is None):
            self.deny()
            if (self.slot is not None and not e.checking and e.on_suspect is not None
                    and bin(e.recent).count("1") >= 2):
                e.checking = True          # 2 of the last 8 predicted hits denied: ask the engine
                e.on_suspect(e)

    def deny(self) -> None:
        """A predicted hit the engine denied: what the model believed about this engine is dropped
        (a restart empties every slot; another router writing them makes each one suspect). The
        slot just used holds this prompt now, so it is kept."""
        e = self.engine
        for s in e.slots:
            if s is not self.slot and not s.busy:
                s.clear()
        self.forget_beyond(0)
        e.stats.resets += 1

    def forget_beyond(self, cached: int) -> None:
        """Drop from the engine's memory the blocks of this prompt past the `cached` tokens the
        engine reported, up to where the memory matched it."""
        e = self.engine
        start = int(cached * e.chars_per_token) // self.block
        end = self.memory_chars // self.block
        if end > start:
            e.memory.denied(self.prompt.hashes[start:end])

    def finish(self, ok: bool) -> None:
        """The request is over (`ok`: the answer was complete)."""
        if self.done:
            return
        self.done = True
        e, s = self.engine, self.slot
        now = time.monotonic()
        if self.first_at is None:
            e.pending = max(0.0, e.pending - self.uncached)
        if s is not None:
            s.busy = max(0, s.busy - 1)
            s.released_at = now
            self.revisits.released()
            if not ok and self.first_at is None:
                s.clear()          # the engine may not have run it: what the slot holds is unknown
        if ok:
            took = (now - self.sent_at) * 1000.0
            e.duration_ms = took if not e.duration_ms else e.duration_ms + _EWMA * (took - e.duration_ms)


class Revisits:
    """How likely a conversation is to come back to the cache it left after some time away, learned
    from this router's traffic: what a slot's content is still worth when another request would
    overwrite it."""

    WINDOW = 256

    __slots__ = ("ages", "n", "sorted", "releases", "returns")

    def __init__(self) -> None:
        self.ages = array("d")
        self.n = 0
        self.sorted: list[float] = []
        self.releases = 0.0
        self.returns = 0.0

    def released(self) -> None:
        self.releases += 1
        if self.releases > 4096:        # the recent past counts, not the whole life of the router
            self.releases /= 2
            self.returns /= 2

    def returned(self, age: float) -> None:
        if self.n < self.WINDOW:
            self.ages.append(age)
        else:
            self.ages[self.n % self.WINDOW] = age
        self.n += 1
        self.returns += 1
        if self.n <= 32 or self.n % 16 == 0:
            self.sorted = sorted(self.ages)

    def weight(self, age: float) -> float:
        """What a slot's content idle for `age` seconds is still worth, as a share of its size: the
        chance that its conversation comes back, plus a little that fades over minutes for other
        conversations sharing its prefix (so that, all else equal, the oldest content goes first)."""
        sibling = SIBLING_SHARE * math.exp(-age / 60.0)
        if self.n < 16 or self.releases < 1:
            return 0.5 * math.exp(-age / 30.0) + sibling      # before any evidence: half, fading
        p = min(1.0, self.returns / self.releases)
        ages = self.sorted
        return p * (1.0 - bisect_right(ages, age) / len(ages)) + sibling


__all__ = ["CacheIndex", "CacheStats", "EngineCache", "EngineReport", "HIT_TOKENS", "Memory", "Placement", "Revisits", "Slot",
           "engine_report"]
