"""Statistics blame the right backend: a backend's latency is its own attempt's, the client's
whole wait is the model's, and errors a retry absorbed are counted apart from those a client saw."""
from __future__ import annotations

from router_harness import dep  # noqa: F401 - the fixture


async def test_a_retry_does_not_put_the_failed_backends_wait_on_the_one_that_answered(dep):
    await dep.start_mock("hung", ["m"], hang_after=0)          # accepts, never answers
    await dep.start_mock("good", ["m"])
    # A hung attempt ends after read_timeout (2 s) and is retried on "good".
    await dep.start_router(policy="round_robin", read_timeout=2.0, retry_on_timeout=True, health_interval=60,
                           eject_after_failures=100)
    await dep.wait_routable(2)
    for _ in range(4):
        assert await dep.chat("m") == "good"
    _, stats, _ = await dep.get("/stats")
    by_name = {s["name"]: s for s in stats["services"]}
    good, hung, model = by_name["good"], by_name["hung"], stats["models"]["m"]
    # The 2 s spent on "hung" are the model's (what its clients waited), never "good"'s.
    assert model["latency_ms"]["p99"] >= 2000
    assert good["latency_ms"]["p99"] < 2000, good["latency_ms"]
    # "hung" failed twice, and no client saw it: absorbed by the retries.
    assert hung["error_count"] == 2 and hung["errors_absorbed"] == 2
    assert model["error_count"] == 0
