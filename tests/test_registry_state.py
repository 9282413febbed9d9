"""The optional state file: the table survives a registry restart and nothing expires because of it."""
from __future__ import annotations

import json

from infinilm_svc.config import RegistryConfig
from infinilm_svc.registry.app import create_app


async def test_table_survives_a_restart(aiohttp_client, tmp_path):
    state = tmp_path / "state" / "registry.json"
    cfg = RegistryConfig(state_file=str(state), probe_interval=0)
    app1 = create_app(cfg)
    c1 = await aiohttp_client(app1)
    await c1.post("/services", json={"name": "b-server", "host": "127.0.0.1", "port": 8100,
                                     "metadata": {"type": "openai-api", "models": ["m1"]}})
    await c1.post("/services", json={"name": "b", "host": "127.0.0.1", "port": 8101})
    assert saved_names(state) == {"b", "b-server"}  # answered = on disk
    await c1.close()  # runs cleanup: flushes the file

    c2 = await aiohttp_client(create_app(cfg))
    body = await (await c2.get("/services?healthy=true")).json()
    assert sorted(s["name"] for s in body["services"]) == ["b", "b-server"]
    server = next(s for s in body["services"] if s["name"] == "b-server")
    assert server["metadata"] == {"type": "openai-api", "models": ["m1"]}
    # A delete is persisted too.
    assert (await c2.delete("/services/b")).status == 200
    assert saved_names(state) == {"b-server"}


def saved_names(path) -> set[str]:
    """The names in a state file, read as another program would (a fresh SQLite connection)."""
    import sqlite3
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {json.loads(r[0])["name"] for r in db.execute("SELECT record FROM services")}
    finally:
        db.close()


async def test_restored_records_count_as_fresh_heartbeats(aiohttp_client, tmp_path):
    state = tmp_path / "registry.json"
    old = {"version": 1, "services": [{"name": "old", "host": "h", "port": 1, "hostname": "h", "url": "http://h:1",
                                       "status": "running", "timestamp": "2020-01-01T00:00:00Z",
                                       "last_heartbeat": 1.0, "health_status": "unknown", "metadata": {}}]}
    state.write_text(json.dumps(old))
    cfg = RegistryConfig(state_file=str(state), heartbeat_ttl=5, expire_after=10, sweep_interval=0.05, probe_interval=0)
    c = await aiohttp_client(create_app(cfg))
    body = await (await c.get("/services/old")).json()
    assert body["is_healthy"] is True and body["last_heartbeat"] > 1e9
    # The older JSON format is imported into the new file and kept aside.
    assert saved_names(state) == {"old"} and json.loads((tmp_path / "registry.json.v1.json").read_text()) == old


async def test_a_corrupt_state_file_is_set_aside_and_the_registry_starts_empty(aiohttp_client, tmp_path):
    state = tmp_path / "registry.json"
    state.write_text("{not json")
    c = await aiohttp_client(create_app(RegistryConfig(state_file=str(state), probe_interval=0)))
    assert (await (await c.get("/services")).json())["total"] == 0
    assert (tmp_path / "registry.json.corrupt").read_text() == "{not json"
