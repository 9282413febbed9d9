"""cache_aware on a real llama-server: requests pinned to slots, what an eviction does to the model,
and a restarted engine forgotten at once. The engine reports the truth the model is checked against."""
from __future__ import annotations

import os
import signal

import pytest

from harness import free_port, http_get_json, http_json, wait_for, write_toml
from test_babysitter import record, write_babysitter
from test_engine import engine_backend

pytestmark = pytest.mark.e2e


def prompt(topic: str) -> str:
    """A system prompt of a few hundred tokens whose first words differ by topic."""
    return f"{topic} desk manual. " + " ".join(f"Rule {i}: about {topic}, answer briefly and cite section {i}."
                                                for i in range(1, 20))


class Conversation:
    """Messages that grow by a user turn and the answer each time."""

    def __init__(self, router: int, topic: str) -> None:
        self.url = f"http://127.0.0.1:{router}/v1/chat/completions"
        self.messages = [{"role": "system", "content": prompt(topic)}]
        self.turns = 0

    def ask(self) -> dict:
        self.turns += 1
        self.messages.append({"role": "user", "content": f"Question {self.turns}?"})
        code, body = http_json("POST", self.url, {"model": "tiny", "messages": self.messages, "max_tokens": 4,
                                                  "temperature": 0}, timeout=60)
        assert code == 200, body
        self.messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        return body["usage"]


def model_of(router: int) -> dict:
    stats = http_get_json(f"http://127.0.0.1:{router}/stats")[1]
    return next(s["cache_model"] for s in stats["services"] if s["name"] == "bs-eng-server")


def cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def test_slots_pinned_hits_an_eviction_and_a_restart_on_a_real_engine(engine, pyz_path, procs, tmp_path):
    reg, rtr, port = free_port(), free_port(), free_port(pair=True)
    # --cache-ram 0: the slots are the engine's only cache (its host-memory cache would bring an
    # evicted prompt back, which the model learns separately).
    backend = engine_backend(engine)
    backend["args"] = [*backend["args"], "--cache-ram", "0"]
    sitter = write_babysitter(tmp_path, "bs-eng", port, backend, registry=reg,
                              policy={"restart_delay": 0.5, "backoff_max": 0.5})
    node = write_toml(tmp_path / "node.toml", {
        "babysitters": [sitter.name],
        "registry": {"bind": "127.0.0.1", "port": reg, "heartbeat_ttl": 5, "sweep_interval": 0.2},
        "router": {"bind": "127.0.0.1", "port": rtr, "registry_url": f"http://127.0.0.1:{reg}",
                   "heartbeat_interval": 0.5, "health_interval": 0.5, "policy": "cache_aware"}})
    procs.pyz("--config", str(node), name="node")
    # The babysitter put the engine's slot count (its /props) in the record, and the router uses it.
    rec = wait_for(lambda: (r := record(reg, "bs-eng-server")) and r["status"] == "running" and r, timeout=30,
                   what="the engine running")
    assert rec["metadata"]["total_slots"] == 2
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{rtr}/stats")[1].get("healthy_services") == 1,
             timeout=30, what="the engine routable")

    # A pinned hit: the second turn finds the first in its slot.
    a = Conversation(rtr, "Shipping")
    first = a.ask()
    second = a.ask()
    assert cached(first) < 32 and cached(second) >= first["prompt_tokens"]
    m = model_of(rtr)
    assert m["slots"] == 2 and m["pinning"] and m["pinned"] == 2
    assert (m["predicted_hits"], m["confirmed_hits"]) == (1, 1)

    # An eviction: B takes the other slot; C, a third prompt, overwrites one of the two. Whichever
    # it was, the model knows: that conversation's next turn is predicted a miss and the engine
    # agrees, and the other keeps its hit.
    b = Conversation(rtr, "Billing")
    b.ask()
    assert cached(b.ask()) >= 32
    before = model_of(rtr)
    Conversation(rtr, "Weather").ask()
    hits = sorted(cached(conv.ask()) >= 32 for conv in (a, b))
    assert hits == [False, True], "C should have overwritten exactly one of the two slots"
    m = model_of(rtr)
    assert m["predicted_hits"] - before["predicted_hits"] == 1
    assert m["predicted_hits"] == m["confirmed_hits"] == m["engine_hits"] == 3, m

    # A restart: the engine comes back with empty slots; the model forgets them at once (the
    # record says it is a new process, or the first answer denies a predicted hit), and is right again.
    pid = record(reg, "bs-eng-server")["metadata"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (r := record(reg, "bs-eng-server")) and r["status"] == "running"
             and r["metadata"]["pid"] != pid, timeout=30, what="the engine running again")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{rtr}/stats")[1].get("healthy_services") == 1,
             timeout=30, what="the engine routable again")
    before = model_of(rtr)
    assert cached(b.ask()) < 32                      # the engine's slots are empty
    after = model_of(rtr)
    assert after["resets"] > m["resets"]
    assert after["predicted_hits"] - before["predicted_hits"] <= 1
    assert cached(b.ask()) >= 32                     # and the model is right again from there
    end = model_of(rtr)
    assert end["confirmed_hits"] - after["confirmed_hits"] == end["predicted_hits"] - after["predicted_hits"] == 1
