"""On a real llama-server: a non-streamed answer assembled by the router is the engine's own, and a
client that leaves stops the engine's work, streamed or not."""
from __future__ import annotations

import json
import socket

import pytest

from harness import free_port, http_get_json, http_json, wait_for, write_toml
from test_babysitter import record, write_babysitter
from test_engine import engine_backend

pytestmark = pytest.mark.e2e


def start(procs, tmp_path, engine, big: bool = False) -> tuple[int, int]:
    """A node: registry, router and one babysitter running llama-server (2 slots); (router, engine) ports."""
    reg, rtr, port = free_port(), free_port(), free_port(pair=True)
    backend = engine_backend(engine, model=engine.model_big if big else None)
    if big:
        backend["args"] = ["-c", "8192", "-np", "2", "--threads", "1"]
    sitter = write_babysitter(tmp_path, "bs-eng", port, backend, registry=reg)
    node = write_toml(tmp_path / "node.toml", {
        "babysitters": [sitter.name],
        "registry": {"bind": "127.0.0.1", "port": reg, "heartbeat_ttl": 5, "sweep_interval": 0.2},
        "router": {"bind": "127.0.0.1", "port": rtr, "registry_url": f"http://127.0.0.1:{reg}",
                   "heartbeat_interval": 0.5, "health_interval": 0.5}})
    procs.pyz("--config", str(node), name="node")
    wait_for(lambda: (r := record(reg, "bs-eng-server")) and r["status"] == "running", timeout=30, what="engine")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{rtr}/stats")[1].get("healthy_services") == 1,
             timeout=30, what="the engine routable")
    return rtr, port


def comparable(answer: dict) -> dict:
    """What must be the same whoever sent it (ids, times and cache figures differ by nature)."""
    usage = {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"choices": answer["choices"], "model": answer["model"], "object": answer["object"],
            "system_fingerprint": answer.get("system_fingerprint"), "usage": usage}


def test_an_assembled_answer_is_the_engines_own(engine, pyz_path, procs, tmp_path):
    rtr, port = start(procs, tmp_path, engine)
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me of the sea."}]}),
                       ("/v1/completions", {"prompt": "Once upon a time"})):
        req = {"model": "tiny", "max_tokens": 12, "temperature": 0, "seed": 3, **body}
        code, own = http_json("POST", f"http://127.0.0.1:{port}{path}", req, timeout=60)
        assert code == 200, own
        code, assembled = http_json("POST", f"http://127.0.0.1:{rtr}{path}", req, timeout=60)
        assert code == 200, assembled
        assert comparable(assembled) == comparable(own)
        assert "timings" in assembled            # the engine's own extras come through
    stats = http_get_json(f"http://127.0.0.1:{rtr}/stats")[1]
    assert stats["models"]["tiny"]["ttft_ms"]["p50"] is not None   # a non-streamed request has a TTFT


def busy(port: int) -> bool:
    return any(s["is_processing"] for s in http_get_json(f"http://127.0.0.1:{port}/slots")[1])


@pytest.mark.parametrize("stream", [False, True], ids=["not-streamed", "streamed"])
def test_a_client_that_leaves_frees_the_engine_at_once(engine, pyz_path, procs, tmp_path, stream):
    # The bigger model: a non-streamed answer whose client has gone is otherwise generated to its end
    # (about 14 s for these 3,000 tokens, measured on llama-server alone; 0.02 s when streamed).
    rtr, port = start(procs, tmp_path, engine, big=True)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Go on and on."}],
                       "max_tokens": 3000, "ignore_eos": True, "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", rtr))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: busy(port), timeout=20, what="the engine at work on it")
    s.close()
    # Gone long before the 3,000 tokens could be done.
    wait_for(lambda: not busy(port), timeout=5, what="the engine to stop once the client left")
    stats = http_get_json(f"http://127.0.0.1:{rtr}/stats")[1]
    assert stats["models"]["tiny"]["errors"].get("client_disconnect", 0) >= (1 if stream else 0)
