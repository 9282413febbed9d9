"""The babysitter against hostile and mismatched surroundings, with real processes: a hijacked
record is taken back, a heartbeat too slow for the registry's TTL is reported, the bearer scheme
is case-insensitive, and /logs stays bounded and behind the token."""
from __future__ import annotations

from harness import free_port, http_get_json, http_json, wait_for
from test_babysitter import MOCK, PY, SERVE_MODELS, record, start_babysitter, start_registry, status, write_babysitter


def test_a_hijacked_record_is_taken_back_at_the_next_heartbeat(procs, tmp_path):
    """Someone re-registers our backend's name pointing elsewhere: the babysitter sees the
    registry's answer differ from its own record, warns, and registers again."""
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-hijack", port, MOCK, registry=reg)
    bs = start_babysitter(procs, cfg)
    ours = wait_for(lambda: (r := record(reg, "bs-hijack-server")) and r["status"] == "running" and r,
                    what="registered and running")
    attacker = {"name": "bs-hijack-server", "host": "127.0.0.1", "port": 1, "url": "http://127.0.0.1:1",
                "status": "running", "metadata": {"type": "openai-api", "models": ["model-1"]}}
    code, _ = http_json("POST", f"http://127.0.0.1:{reg}/services", attacker)
    assert code == 201
    back = wait_for(lambda: (r := record(reg, "bs-hijack-server")) and r["url"] == ours["url"] and r,
                    what="the babysitter's own record restored")
    assert back["port"] == port and back["host"] == ours["host"]
    assert status(port)["registry"]["overwritten"] >= 1
    wait_for(lambda: "someone re-registered our name" in procs.output(bs), what="the warning in its log")


def test_a_heartbeat_interval_too_slow_for_the_registry_ttl_is_reported(procs, tmp_path):
    _, reg = start_registry(procs, tmp_path)          # heartbeat_ttl = 2
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-slowbeat", port, MOCK, registry=reg, policy={"heartbeat_interval": 1.5})
    bs = start_babysitter(procs, cfg)
    st = wait_for(lambda: (s := status(port)["registry"]) and s["warning"] and s, what="the TTL warning in /status")
    assert st["heartbeat_ttl"] == 2 and st["heartbeat_interval"] == 1.5
    assert "more than a third of the registry's heartbeat_ttl" in st["warning"]
    wait_for(lambda: "more than a third of the registry's heartbeat_ttl" in procs.output(bs), what="the warning logged")


def test_a_heartbeat_interval_within_the_ttl_gives_no_warning(procs, tmp_path):
    _, reg = start_registry(procs, tmp_path)          # heartbeat_ttl = 2; FAST heartbeats every 0.3 s
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-okbeat", port, MOCK, registry=reg)
    start_babysitter(procs, cfg)
    st = wait_for(lambda: (s := status(port)["registry"]) and s["heartbeat_ttl"] and s, what="the TTL learned")
    assert st["warning"] is None


def test_the_bearer_scheme_is_case_insensitive_and_logs_need_the_token(procs, tmp_path):
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-auth", port, MOCK, top={"token": "tok"})
    start_babysitter(procs, cfg)
    base = f"http://127.0.0.1:{port + 1}"
    wait_for(lambda: status(port)["state"] == "running", what="running")
    for scheme in ("Bearer", "bearer", "BEARER"):
        code, body = http_json("POST", base + "/restart", None, headers={"Authorization": f"{scheme} tok"})
        assert code == 202, (scheme, body)
    code, body = http_json("POST", base + "/restart", None, headers={"Authorization": "Bearer nope"})
    assert code == 401 and body["error"]["code"] == "invalid_token"
    code, body = http_get_json(base + "/logs")
    assert code == 401 and body["error"]["code"] == "invalid_token"
    code, body = http_get_json(base + "/logs?follow=1")
    assert code == 401
    code, body = http_json("GET", base + "/logs?tail=5", None, headers={"Authorization": "bearer tok"})
    assert code == 200 and isinstance(body["lines"], list)
    code, body = http_get_json(base + "/health")  # probes stay open (503 only while it restarts)
    assert code in (200, 503) and body["service"] == "bs-auth"


FLOOD = """\
import http.server, json, sys
sys.stdout.write("before\\n")
sys.stdout.write("x" * (20 * 1024 * 1024) + "\\n")      # one 20 MB line
for i in range(3000):
    sys.stdout.write(f"line {i} " + "y" * 4000 + "\\n")  # 12 MB more in ordinary lines
sys.stdout.write("after\\n")
sys.stdout.flush()
""" + SERVE_MODELS


def test_one_huge_line_and_a_flood_leave_the_log_ring_bounded_in_bytes(procs, tmp_path):
    port = free_port(pair=True)
    script = tmp_path / "flood.py"
    script.write_text(FLOOD)
    cfg = write_babysitter(tmp_path, "bs-flood", port, {"type": "command", "command": PY,
                                                       "args": [str(script), str(port)]},
                           policy={"log_ring_lines": 100000, "log_ring_bytes": 1 << 20, "log_max_bytes": 1 << 30})
    start_babysitter(procs, cfg)
    base = f"http://127.0.0.1:{port + 1}"
    wait_for(lambda: any(e["line"] == "after" for e in http_get_json(base + "/logs?tail=5")[1]["lines"]),
             timeout=30, what="the flood logged")
    lines = http_get_json(base + "/logs?tail=100000")[1]["lines"]
    assert sum(len(e["line"]) for e in lines) <= 1 << 20
    assert all(len(e["line"]) <= 16384 + 100 for e in lines)
    # the file keeps the huge line's start, marked as cut, not 20 MB of it
    text = (tmp_path / "logs" / "bs-flood.log").read_text()
    assert "line cut: longer than 16384 characters" in text
    assert len(text) < 14 * 1024 * 1024
    metrics = http_get_json(base + "/metrics")[1]
    assert "infinilm_babysitter_log_lines" in metrics
