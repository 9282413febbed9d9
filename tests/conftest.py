"""Fixtures and hooks only: what the tests run with lives in harness.py."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from harness import PYZ, ProcessGroup

# The event loop of this run: INFINILM_LOOP=asyncio or uvloop (./build.sh test runs the suite under
# both). In-process tests run on it, and the processes the tests start inherit the variable.
LOOP = os.environ.get("INFINILM_LOOP", "uvloop")


def pytest_asyncio_loop_factories(config, item):
    if LOOP == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop
    return {"uvloop": uvloop.new_event_loop}


def pytest_report_header(config):
    return f"event loop: {LOOP} (INFINILM_LOOP)"


# Modules that run the real engine, or etcd clusters or load against several processes: in parallel
# runs (./build.sh test runs pytest-xdist with --dist loadgroup) each kind takes turns on one worker,
# so no two of a kind compete for this machine's cores and their deadlines hold. The demo's tests
# are among the engines: one runs llama-servers (two at once made the migration test time out), and
# the demo's babysitters share one log and pid directory, so two demo tests at once end each
# other's backends. The chaos bench's test is among the loads also because it sets the host-wide
# net.ipv4.tcp_migrate_req for its run and puts the old value back at the end, as the rolling
# restart test does: run side by side, one put 0 back in the middle of the other's restart, and
# about 1 connection in 3,000 to the closing router was reset (2 of 8,682 in a CI run).
HEAVY = {"test_demo_e2e": "engines", "test_engine": "engines", "test_router_migration_engine": "engines",
         "test_engine_cache": "engines", "test_engine_overload": "engines",
         "test_registry_ha": "load", "test_router_hang": "load", "test_router_restart": "load",
         "test_bench_chaos": "load"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """One xdist group per module (its module-scoped fixtures are then started once), one for each
    kind of heavy module; those go first, as they take the longest."""
    def group(item) -> str:
        return HEAVY.get(item.path.stem, item.path.stem)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda item: item.path.stem not in HEAVY)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test, so fixtures can tell at teardown that it failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def procs(request, tmp_path):
    """Start processes with procs.start([...]) or procs.pyz(...); all are killed at teardown. When
    the test failed, the end of each process's log is printed (shown with the failure, so a
    failure seen only in CI can be diagnosed from its output)."""
    group = ProcessGroup(tmp_path)
    yield group
    group.kill_all()
    if any(getattr(getattr(request.node, f"report_{when}", None), "failed", False) for when in ("setup", "call")):
        group.print_log_tails()


@pytest.fixture(scope="session")
def pyz_path() -> Path:
    if not PYZ.exists():
        pytest.fail("infinilm-svc.pyz is missing: run ./build.sh (./build.sh test builds it first)")
    return PYZ


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One real etcd member on loopback for the whole session (tests use their own key prefix)."""
    from etcd_cluster import EtcdCluster

    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "etcd"])
def registry_config(request):
    """Make a RegistryConfig for the store under test; with etcd, a fresh key prefix per test.

    etcd leases are whole seconds: `make.ttl(memory, etcd)` picks the duration for this store."""
    import uuid

    from infinilm_svc.config import RegistryConfig

    extra: dict[str, Any] = {}
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd_server")
        extra = {"store": "etcd", "etcd_endpoints": tuple(etcd.endpoints),
                 "etcd_prefix": f"/test-{uuid.uuid4().hex[:12]}/"}

    def make(**kw: Any) -> RegistryConfig:
        return RegistryConfig(**{**extra, **kw})

    make.store = request.param  # type: ignore[attr-defined]
    make.ttl = lambda memory, etcd: etcd if request.param == "etcd" else memory  # type: ignore[attr-defined]
    return make


from engine import engine  # noqa: E402,F401  - the `engine` fixture (llama-server and tiny models)
