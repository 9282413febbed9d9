"""The cache model and the cache_aware policy against fake engines with slots (the mock's emulation,
in process): placement, eviction, and correction when the engine says otherwise."""
from __future__ import annotations

import json
import random
from dataclasses import replace

from infinilm_svc.config.router import RouterConfig
from infinilm_svc.mock.slots import SlotEngine
from infinilm_svc.router.balancer import CacheAware, Route
from infinilm_svc.router.kvmodel import HIT_TOKENS, CacheIndex, EngineCache, engine_report
from infinilm_svc.router.prompt import prompt_key
from infinilm_svc.router.proxy import slot_refused, with_slot
from infinilm_svc.router.table import Backend, Group

WORDS = "ledger harbor falcon quartz meadow lantern cobalt saffron glacier orbit tundra velvet".split()


def system(group: int) -> str:
    rng = random.Random(group)
    return f"Team {group} handbook. " + " ".join(rng.choice(WORDS) for _ in range(150))


class Fleet:
    """Backends with fake slot engines behind one cache_aware policy (one router's view)."""

    def __init__(self, backends: int = 2, slots: int = 2, policy: CacheAware | None = None,
                 engines: dict | None = None, **config) -> None:
        cfg = replace(RouterConfig(registry_url="http://127.0.0.1:1"), policy="cache_aware", **config)
        self.policy = policy or CacheAware(cfg)
        self.backends = []
        self.engines = engines if engines is not None else {}
        for i in range(backends):
            b = Backend(f"b{i}")
            b.url, b.models, b.total_slots = f"http://127.0.0.1:{9000 + i}", ("m",), slots
            self.backends.append(b)
            self.engines.setdefault(b.name, SlotEngine(slots, 0.0))
        self.group = Group(("m", None), self.policy)
        self.group.refresh(self.backends)

    async def ask(self, messages: list[dict], session: str | None = None, hold: bool = False):
        """One request through pick, the engine and back; (backend, placement, engine's lease)."""
        data = {"model": "m", "messages": messages}
        if session:
            data["prompt_cache_key"] = session
        route = Route("m")
        self.policy.prepare(route, data, {}, 0)
        b = self.policy.pick(self.group, route)
        pl = route.placement
        assert b is not None and pl is not None
        body = dict(data)
        if pl.pin is not None:
            body["id_slot"] = pl.pin
        pl.sent()
        engine = self.engines[b.name]
        lease = await engine.acquire(body)
        pl.first_byte()
        pl.observe(json.dumps({"usage": {"prompt_tokens": lease.prompt_tokens},
                               "timings": lease.timings(8)}).encode())
        if not hold:
            self.done(b, pl, lease)
        return b, pl, lease

    def done(self, b, pl, lease) -> None:
        self.engines[b.name].release(lease, " fine answer")
        pl.finish(True)

    def stats(self) -> dict:
        tot: dict = {}
        for b in self.backends:
            for k, v in b.cache.stats.to_json().items():
                if isinstance(v, int):
                    tot[k] = tot.get(k, 0) + v
        return tot


def turn(messages: list[dict], i: int) -> list[dict]:
    return [*messages, {"role": "assistant", "content": " fine answer"}, {"role": "user", "content": f"And {i}?"}]


async def test_a_conversation_stays_on_its_slot_and_every_predicted_hit_is_confirmed():
    f = Fleet()
    msgs = [{"role": "system", "content": system(1)}, {"role": "user", "content": "Question 0?"}]
    b0, pl0, lease0 = await f.ask(msgs)
    assert lease0.cached == 0 and pl0.pin is not None
    for i in range(1, 5):
        msgs = turn(msgs, i)
        b, pl, lease = await f.ask(msgs)
        assert (b, pl.pin) == (b0, pl0.pin), "a continuation left the slot holding its history"
        assert lease.cached >= lease.prompt_tokens - 8
    s = f.stats()
    assert s["predicted_hits"] == 4 and s["confirmed_hits"] == 4 and s["engine_hits"] == 4


async def test_a_new_conversation_takes_a_free_slot_not_a_busy_one_sharing_its_prefix():
    f = Fleet(backends=2, slots=1)
    a = [{"role": "system", "content": system(1)}, {"role": "user", "content": "Question A?"}]
    held = await f.ask(a, hold=True)                   # conversation A running on one engine's only slot
    b = [{"role": "system", "content": system(1)}, {"role": "user", "content": "Question B?"}]
    bb, pl, _ = await f.ask(b)
    assert bb is not held[0], "queued behind another conversation while a slot was free"
    f.done(*held)


async def test_a_new_prompt_overwrites_the_slot_least_likely_to_be_wanted_again():
    f = Fleet(backends=1, slots=3)
    convs = [[{"role": "system", "content": system(g)}, {"role": "user", "content": f"Q{g}?"}] for g in (1, 2, 3)]
    slots = {}
    for g, c in zip((1, 2, 3), convs, strict=True):
        _, pl, _ = await f.ask(c)
        slots[g] = pl.pin
    assert len(set(slots.values())) == 3, "three conversations and three empty slots: one each"
    # Conversations 2 and 3 come back (their slots were just used); a fourth prompt then takes the
    # slot of conversation 1, the one that has been idle the longest.
    for g in (2, 3):
        await f.ask(turn(convs[g - 1], 1))
    _, pl, _ = await f.ask([{"role": "system", "content": system(9)}, {"role": "user", "content": "Q9?"}])
    assert pl.pin == slots[1]


async def test_a_restarted_engine_stops_getting_predicted_hits_at_its_first_answer():
    f = Fleet(backends=1, slots=2)
    c1 = [{"role": "system", "content": system(1)}, {"role": "user", "content": "Q1?"}]
    c2 = [{"role": "system", "content": system(2)}, {"role": "user", "content": "Q2?"}]
    await f.ask(c1)
    await f.ask(c2)
    f.engines["b0"].clear()                       # the engine restarted: every slot empty
    _, pl, lease = await f.ask(turn(c1, 1))
    assert f.policy.engine(f.backends[0]).tokens(pl.match_chars) >= HIT_TOKENS and lease.cached < HIT_TOKENS
    assert f.backends[0].cache.stats.resets == 1
    # The model was reset at that first answer: conversation 2's slot is not predicted a hit any more.
    _, pl2, lease2 = await f.ask(turn(c2, 1))
    assert pl2.match_chars == 0 and lease2.cached < HIT_TOKENS
    s = f.stats()
    assert s["predicted_hits"] == 1 and s["confirmed_hits"] == 0


async def test_two_routers_on_the_same_engines_each_recover_precision_after_the_others_traffic():
    engines: dict = {}
    ours = Fleet(backends=2, slots=2, engines=engines)
    other = Fleet(backends=2, slots=2, engines=engines)
    convs = [[{"role": "system", "content": system(g)}, {"role": "user", "content": f"Q{g}?"}] for g in range(4)]
    for c in convs:
        await ours.ask(c)
    # The other router writes every slot with prompts of its own.
    for g in range(10, 14):
        await other.ask([{"role": "system", "content": system(g)}, {"role": "user", "content": "other?"}])
    before = ours.stats()
    for r in range(1, 4):
        for i, c in enumerate(convs):
            convs[i] = turn(c, r)
            await ours.ask(convs[i])
    after = ours.stats()
    assert after["predicted_hits"] - before["predicted_hits"] > after["confirmed_hits"] - before["confirmed_hits"], \
        "the other router's writes went unnoticed"
    # Once the other router has stopped, every hit predicted is a hit.
    mid = ours.stats()
    for r in range(4, 7):
        for i, c in enumerate(convs):
            convs[i] = turn(c, r)
            await ours.ask(convs[i])
    end = ours.stats()
    assert end["predicted_hits"] - mid["predicted_hits"] >= 8
    assert end["confirmed_hits"] - mid["confirmed_hits"] == end["predicted_hits"] - mid["predicted_hits"]


async def test_a_match_on_a_backend_buried_in_prefill_work_loses_to_an_idle_backend():
    f = Fleet(backends=2, slots=2)
    c = [{"role": "system", "content": system(1)}, {"role": "user", "content": "Q?"}]
    b0, pl0, _ = await f.ask(c)
    e0 = f.policy.engine(b0)
    e0.pending = 100_000            # a mountain of prefill queued there by other requests
    b, _, _ = await f.ask(turn(c, 1))
    assert b is not b0
    e0.pending = 0


async def test_an_engine_without_slots_is_modelled_by_its_memory_and_a_denial_drops_what_was_denied():
    index = CacheIndex()
    b = Backend("x")
    e = EngineCache(b, index, memory_blocks=10_000)
    p1 = prompt_key({"messages": [{"role": "user", "content": "a" * 640}]}, "m", 64, 65536)
    p2 = prompt_key({"messages": [{"role": "user", "content": "b" * 640}]}, "m", 64, 65536)
    assert p1 is not None and p2 is not None
    e.memory.add(p1.hashes)
    e.memory.add(p2.hashes)
    assert index.matches(p2.hashes, 1)[e.memory] == len(p2.hashes)
    e.memory.denied(p1.hashes[3:])        # the engine holds only p1's first 3 blocks
    assert index.matches(p1.hashes, 1)[e.memory] == 3
    assert index.matches(p2.hashes, 1)[e.memory] == len(p2.hashes)


def test_prompt_keys_differ_by_role_tools_and_model_and_ignore_a_partial_last_block():
    base = {"messages": [{"role": "system", "content": "x" * 130}]}
    k = prompt_key(base, "m", 64, 65536)
    assert k is not None and len(k.hashes) == 2 and k.chars > 128
    as_user = prompt_key({"messages": [{"role": "user", "content": "x" * 130}]}, "m", 64, 65536)
    with_tools = prompt_key({**base, "tools": [{"type": "function", "function": {"name": "f"}}]}, "m", 64, 65536)
    other_model = prompt_key(base, "n", 64, 65536)
    for other in (as_user, with_tools, other_model):
        assert other is not None and other.hashes[0] != k.hashes[0]
    longer = prompt_key({"messages": [*base["messages"], {"role": "user", "content": "more"}]}, "m", 64, 65536)
    assert longer is not None and longer.hashes[:2] == k.hashes
    assert prompt_key({"input": "no prompt"}, "m", 64, 65536) is None


def test_the_slot_field_is_spliced_into_the_body_and_a_refusal_is_recognised():
    assert json.loads(with_slot(b' {"model": "m"}', 3)) == {"id_slot": 3, "model": "m"}
    assert json.loads(with_slot(b"{ }", 0)) == {"id_slot": 0}
    assert with_slot("\ufeff{}".encode(), 1) is None            # a byte-order mark: sent as it is
    assert slot_refused(400, b'{"error":{"message":"Unrecognized request argument supplied: id_slot"}}')
    assert not slot_refused(400, b'{"error":{"message":"messages must be an array"}}')


def test_engine_reports_are_read_from_llama_server_timings_and_from_openai_usage():
    r = engine_report(b'{"timings":{"cache_n":269,"prompt_n":19,"prompt_ms":12.5}}')
    assert r is not None and (r.cached, r.prompt, r.prefill_ms) == (269, 288, 12.5)
    r = engine_report(b'{"usage":{"prompt_tokens":300,"prompt_tokens_details":{"cached_tokens":256}}}')
    assert r is not None and (r.cached, r.prompt, r.prefill_ms) == (256, 300, None)
    assert engine_report(b'{"usage":{"prompt_tokens":3}}') is None
