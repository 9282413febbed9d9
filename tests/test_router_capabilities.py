"""What a backend cannot do is not a failure: an endpoint the engine lacks (501) never opens its
circuit; the router learns it and sends that endpoint elsewhere, or says plainly that none can."""
from __future__ import annotations

from router_harness import dep  # noqa: F401 - the fixture


async def embed(dep, model: str = "m") -> tuple[int, dict]:
    status, data, _ = await dep.post("/v1/embeddings", {"model": model, "input": ["one", "two"]})
    return status, data


async def test_an_endpoint_the_engine_lacks_never_takes_it_out_and_goes_where_it_is_served(dep):
    await dep.start_mock("chat-only", ["m"], no_embeddings=True)
    await dep.start_mock("full", ["m"])
    await dep.start_router(policy="round_robin", eject_cooldown=30)
    await dep.wait_routable(2)
    for _ in range(6):
        status, data = await embed(dep)
        assert status == 200 and len(data["data"]) == 2, data
    _, stats, _ = await dep.get("/stats")
    by_name = {s["name"]: s for s in stats["services"]}
    assert by_name["chat-only"]["circuit"] == "closed" and by_name["chat-only"]["healthy"] is True
    assert by_name["chat-only"]["lacks"] == ["/v1/embeddings"]
    # It is asked for embeddings once (then known not to serve them), and still gets chats.
    assert by_name["chat-only"]["request_count"] == 1 and by_name["full"]["request_count"] == 6
    served = {await dep.chat("m") for _ in range(4)}
    assert served == {"chat-only", "full"}


async def test_when_no_backend_serves_an_endpoint_the_client_is_told_so_and_none_is_ejected(dep):
    for name in ("a", "b"):
        await dep.start_mock(name, ["m"], no_embeddings=True)
    await dep.start_router(policy="round_robin")
    await dep.wait_routable(2)
    for _ in range(3):
        status, data = await embed(dep)
        assert status == 501, data
        assert data["error"]["code"] == "unsupported_endpoint"
        assert "no backend serving model 'm' answers /v1/embeddings" in data["error"]["message"]
    await dep.wait_routable(2)
    assert {await dep.chat("m") for _ in range(4)} == {"a", "b"}
