"""cache_aware over real sockets: a router in front of mock engines with slots and a prompt cache."""
from __future__ import annotations

import logging
import random

from harness import async_wait_for
from router_harness import dep  # noqa: F401 - the fixture

WORDS = "ledger harbor falcon quartz meadow lantern cobalt saffron glacier orbit tundra velvet".split()


def system(group: int) -> str:
    rng = random.Random(group)
    return f"Team {group} handbook. " + " ".join(rng.choice(WORDS) for _ in range(150))


async def converse(dep, group: int, turns: int, key: str | None = None, stream: bool = False) -> list[dict]:
    """One conversation: every turn resends the whole of it. The usage and backend of each turn."""
    msgs = [{"role": "system", "content": system(group)}]
    out = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {t} of group {group}?"})
        body = {"model": "m", "messages": msgs, "max_tokens": 4}
        if key:
            body["prompt_cache_key"] = key
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            async with dep.session.post(dep.router_url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                raw = (await r.read()).decode()
                backend = r.headers["X-InfiniLM-Backend"]
            import json
            usage = [json.loads(line[6:]) for line in raw.splitlines()
                     if line.startswith("data: {") and '"usage"' in line][-1]["usage"]
            text = "answer"
        else:
            status, data, headers = await dep.post("/v1/chat/completions", body)
            assert status == 200, data
            usage, backend = data["usage"], headers["X-InfiniLM-Backend"]
            text = data["choices"][0]["message"]["content"]
        out.append({"backend": backend, "cached": usage["prompt_tokens_details"]["cached_tokens"],
                    "prompt": usage["prompt_tokens"]})
        msgs.append({"role": "assistant", "content": text})
    return out


async def cache_models(dep) -> dict[str, dict]:
    _, stats, _ = await dep.get("/stats")
    return {s["name"]: s["cache_model"] for s in stats["services"] if "cache_model" in s}


async def test_conversations_keep_their_slots_and_the_engines_confirm_every_predicted_hit(dep):
    for name in ("a", "b"):
        port = await dep.start_mock(name, ["m"], register=False, slots=2, prefill_ms_per_token=0.02)
        await dep.register(name, port, ["m"], total_slots=2)
    await dep.start_router(policy="cache_aware")
    await dep.wait_routable(2)
    turns = [await converse(dep, g, 4, stream=g % 2 == 1) for g in range(4)]
    for conv in turns:
        assert len({t["backend"] for t in conv}) == 1, f"a conversation moved: {conv}"
        assert all(t["cached"] >= t["prompt"] // 2 for t in conv[1:]), conv
    models = await cache_models(dep)
    assert set(models) == {"a", "b"}
    for m in models.values():
        assert m["slots"] == 2 and m["pinning"] and m["precision"] == 1.0 and m["recall"] == 1.0
        assert m["pinned"] == 8 and m["predicted_hits"] == 6
    # Four conversations on four slots: two per engine.
    assert sorted({t[0]["backend"] for t in turns}) == ["a", "b"]


async def test_an_engine_that_refuses_the_slot_field_still_answers_and_is_routed_without_slots(dep, caplog):
    port = await dep.start_mock("strict", ["m"], register=False, slots=2, strict_fields=True)
    await dep.register("strict", port, ["m"], total_slots=2)
    await dep.start_router(policy="cache_aware")
    await dep.wait_routable(1)
    with caplog.at_level(logging.WARNING, logger="infinilm_svc.router"):
        for g in range(3):
            conv = await converse(dep, g, 2)
            assert all(t["backend"] == "strict" for t in conv)
    refusals = [r for r in caplog.records if "refuses the slot field" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
    m = (await cache_models(dep))["strict"]
    assert not m["pinning"] and "refused the slot field" in m["note"]
    assert m["pinned"] == 0 and m["unpinned"] == 6


async def test_an_engine_with_fewer_slots_than_its_record_says_is_found_out_and_routed_without_slots(dep, caplog):
    port = await dep.start_mock("small", ["m"], register=False, slots=1)
    await dep.register("small", port, ["m"], total_slots=4)
    await dep.start_router(policy="cache_aware")
    await dep.wait_routable(1)
    with caplog.at_level(logging.WARNING, logger="infinilm_svc.router"):
        async def found_out():
            # Conversations the model spreads over 4 slots the engine does not have.
            for g in range(4):
                await converse(dep, g, 1)
            m = (await cache_models(dep))["small"]
            return m if not m["pinning"] else None
        m = await async_wait_for(found_out, timeout=10, what="the router to find the engine's real slot count")
    assert "reports 1 slot(s) where its record says 4" in m["note"]
    assert sum("routed without slots" in r.getMessage() for r in caplog.records) == 1


async def test_a_restarted_engine_is_forgotten_when_its_record_says_it_is_a_new_process(dep):
    port = await dep.start_mock("a", ["m"], register=False, slots=2)
    await dep.register("a", port, ["m"], total_slots=2, pid=100, restarts=0, started_at=1.0)
    await dep.start_router(policy="cache_aware")
    await dep.wait_routable(1)
    await converse(dep, 1, 2)
    assert (await cache_models(dep))["a"]["filled_slots"] == 1
    await dep.register("a", port, ["m"], total_slots=2, pid=101, restarts=1, started_at=2.0)

    async def forgotten():
        m = (await cache_models(dep))["a"]
        return m if m["filled_slots"] == 0 else None
    m = await async_wait_for(forgotten, timeout=10, what="the model to forget the old process's slots")
    assert m["resets"] == 1


async def test_cache_model_figures_are_in_the_metrics(dep):
    port = await dep.start_mock("a", ["m"], register=False, slots=2)
    await dep.register("a", port, ["m"], total_slots=2)
    await dep.start_router(policy="cache_aware")
    await dep.wait_routable(1)
    await converse(dep, 1, 3)
    async with dep.session.get(dep.router_url + "/metrics") as r:
        text = await r.text()
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
             if line.startswith("infinilm_router_cache_model_") and 'backend="a"' in line}
    assert lines['infinilm_router_cache_model_predicted_hits_total{backend="a"}'] == 2
    assert lines['infinilm_router_cache_model_confirmed_hits_total{backend="a"}'] == 2
    assert lines['infinilm_router_cache_model_slots{backend="a"}'] == 2
