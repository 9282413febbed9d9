"""The router as a user runs it: the built pyz, a node file with registry and router, a mock backend."""
from __future__ import annotations

import pytest

from harness import free_port, http_get_json, http_json, wait_for, write_toml

pytestmark = pytest.mark.e2e


def test_pyz_router_routes_through_registry_and_registers_itself(pyz_path, procs, tmp_path):
    reg, rtr, mock = free_port(), free_port(), free_port()
    node = write_toml(tmp_path / "node.toml", {
        "registry": {"bind": "127.0.0.1", "port": reg},
        "router": {"bind": "127.0.0.1", "port": rtr, "registry_url": f"http://127.0.0.1:{reg}",
                   "heartbeat_interval": 0.5, "health_interval": 0.5}})
    server = procs.pyz("--config", str(node), name="node")
    procs.pyz("mock", "--name", "m1", "--port", str(mock), "--models", "model-x", name="mock")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{mock}/health")[0] == 200, timeout=20, what="mock up")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{reg}/health")[0] == 200, timeout=20, what="registry up")
    status, _ = http_json("POST", f"http://127.0.0.1:{reg}/services", {
        "name": "m1-server", "host": "127.0.0.1", "port": mock, "status": "running",
        "metadata": {"type": "openai-api", "models": ["model-x"]}})
    assert status == 201
    body = {"model": "model-x", "messages": [{"role": "user", "content": "hi"}]}
    status, data = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(
        http_json("POST", f"http://127.0.0.1:{rtr}/v1/chat/completions", body, headers={"X-Request-ID": "e2e-1"})),
        timeout=20, what="a chat answer through the router")
    assert "Hello from m1" in data["choices"][0]["message"]["content"]
    # The mock logged the request id the router passed on; the router is in the registry.
    wait_for(lambda: "id=e2e-1" in procs.output(procs.procs[1][0]), timeout=5, what="mock access line")
    _, services = http_get_json(f"http://127.0.0.1:{reg}/services")
    routers = [s for s in services["services"] if s["metadata"].get("type") == "router"]
    assert routers and routers[0]["metadata"]["url"] == f"http://127.0.0.1:{rtr}"
    assert server.poll() is None
