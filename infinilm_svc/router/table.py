"""The router's table of backends and the per-model candidate lists precomputed from it."""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..client.registry import registry_urls
from ..wire import dumps
from .admission import Admission
from .circuit import Circuit
from .stats import Counters

if TYPE_CHECKING:
    from .balancer import Policy, PolicyState
    from .kvmodel import EngineCache


class Backend:
    """One OpenAI-compatible backend and every signal about its health."""

    __slots__ = ("name", "host", "port", "url", "babysitter_url", "models", "models_list", "metadata",
                 "weight", "cache_type", "static", "registry_healthy", "state", "active_ok",
                 "fail_streak", "ok_streak", "last_check", "response_time", "circuit",
                 "routable", "stats", "admission", "auth_lines", "reopen", "incarnation", "pending", "probing", "suspect_probe", "check_due", "total_slots",
                 "host_cache", "cache", "lacks")

    def __init__(self, name: str, circuit: Circuit | None = None,
                 on_free: "Callable[[Backend], bool] | None" = None) -> None:
        self.name = name
        self.host = ""
        self.port = 0
        self.url = ""
        self.babysitter_url = ""
        self.models: tuple[str, ...] = ()
        self.models_list: list[dict] = []
        self.metadata: dict[str, Any] = {}
        self.weight = 1
        self.cache_type: str | None = None
        self.static = False
        self.registry_healthy = True     # registry: status running and fresh heartbeat
        self.state = "running"
        self.active_ok = True            # active /health checks (thresholds)
        self.fail_streak = 0
        self.ok_streak = 0
        self.last_check: float | None = None
        self.response_time: float | None = None
        self.circuit = circuit or Circuit(1, 10.0)   # passive checks: what requests to it say
        self.routable = True
        self.stats = Counters()
        self.admission = Admission(self, self.stats, 0, on_free)   # its capacity: places for requests
        self.auth_lines = b""            # the same as request header lines, for the proxy path
        self.pending: set = set()        # replies sent here that have had no byte back yet
        self.probing = False             # an active check is in flight
        self.suspect_probe = 0.0         # loop time of the last probe made because requests waited
        self.check_due = 0.0             # loop time of the next scheduled active check (0: none yet)
        self.reopen: asyncio.TimerHandle | None = None   # the health checker's timer to half-open
        self.incarnation: tuple | None = None   # (pid, restarts, started_at) from the registry record
        self.total_slots = 0             # requests the engine runs at once, if it says (metadata.total_slots)
        self.host_cache: bool | None = None   # a prompt cache beyond the slots (metadata.host_prompt_cache)
        self.cache: EngineCache | None = None   # the cache model's view of this engine (cache_aware)
        self.lacks: set[str] = set()     # endpoints it answered 501 to (this process of it)

    @property
    def available(self) -> bool:
        """May take a request now (false only while a half-open trial is running)."""
        return not self.circuit.trial

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name, "host": self.host, "port": self.port, "url": self.url,
            "babysitter_url": self.babysitter_url, "healthy": self.routable, "state": self.state,
            "registry_healthy": self.registry_healthy, "active_healthy": self.active_ok,
            "circuit": self.circuit.state.value, "circuit_retry_in": self.circuit.retry_in(time.monotonic()),
            "response_time": self.response_time, "last_check": self.last_check,
            "active_fail_streak": self.fail_streak,
            "weight": self.weight, "models": list(self.models), "metadata": self.metadata,
            "lacks": sorted(self.lacks),
        }
        out.update(self.stats.to_json())
        if self.cache is not None:
            out["cache_model"] = self.cache.to_json()
        return out


class Group:
    """The routable backends for one (model, cache-type pool), with the policy's state."""

    __slots__ = ("key", "backends", "policy", "state")

    def __init__(self, key: tuple[str, str | None], policy: "Policy") -> None:
        self.key = key
        self.backends: list[Backend] = []
        self.policy = policy
        self.state: PolicyState = policy.new_state()

    def refresh(self, backends: list[Backend]) -> None:
        self.backends = backends
        self.policy.refresh(self)


class Table:
    """Backends by name, plus everything derived from them that requests need in O(1)."""

    def __init__(self, policy_for: Callable[[str], "Policy"], registry_url: str | Sequence[str] | None) -> None:
        self.policy_for = policy_for
        self.registry_urls = registry_urls(registry_url)
        self.registry_url = self.registry_urls[0] if self.registry_urls else None   # the one in use
        self.registry_failover: dict[str, Any] | None = None
        self.backends: dict[str, Backend] = {}
        self.groups: dict[tuple[str, str | None], Group] = {}
        self.known_models: set[str] = set()
        self.pooled_models: set[str] = set()   # models with cache-type pools
        self.model_stats: dict[str, Counters] = {"": Counters()}
        self.models_body = b'{"object":"list","data":[]}'
        self.model_bodies: dict[str, bytes] = {}   # model id -> its object in models_body
        self.routable_count = 0
        self.registry_ok = self.registry_url is None
        self.registry_error: str | None = None
        self.registry_synced_at: float | None = None
        self.registry_index = 0

    def rebuild(self) -> None:
        """Recompute routability, candidate lists and the aggregated model list (on changes only)."""
        by_model: dict[str, list[Backend]] = {"": []}
        known: set[str] = set()
        pooled: set[str] = set()
        seen_models: dict[str, dict] = {}
        count = 0
        ejected: dict[str, list[Backend]] = {}   # eligible but circuit open: the panic fallback
        for b in self.backends.values():
            eligible = b.registry_healthy and b.active_ok
            b.routable = eligible and not b.circuit.is_open
            known.update(b.models)
            if not b.routable:
                if eligible:
                    for m in ("", *b.models):
                        ejected.setdefault(m, []).append(b)
                continue
            count += 1
            by_model[""].append(b)
            for m in b.models:
                by_model.setdefault(m, []).append(b)
                if b.cache_type:
                    pooled.add(m)
            listed = b.models_list or [{"id": m, "object": "model", "owned_by": "infinilm-svc"} for m in b.models]
            for obj in listed:
                mid = obj.get("id") if isinstance(obj, dict) else None
                if isinstance(mid, str) and mid not in seen_models:
                    seen_models[mid] = obj
        for m, fallback in ejected.items():
            # Every eligible backend of a model ejected by the circuit breaker: rather than fail all
            # requests for the cool-down, keep trying them (retries still move between them).
            if not by_model.get(m):
                by_model[m] = fallback
        for m in known:
            by_model.setdefault(m, [])
            self.model_stats.setdefault(m, Counters())
        for key, group in self.groups.items():
            if key[0] not in by_model:
                group.refresh([])
        for m, backends in by_model.items():
            self._group(m, None).refresh(backends)
            if m in pooled:
                for pool in ("static", "paged"):
                    self._group(m, pool).refresh([b for b in backends if b.cache_type == pool])
        self.known_models = known
        self.pooled_models = pooled
        self.routable_count = count
        data = [dict(seen_models[k]) for k in sorted(seen_models)]
        for obj in data:
            obj.setdefault("object", "model")
        self.models_body = dumps({"object": "list", "data": data}).encode()
        self.model_bodies = {obj["id"]: dumps(obj).encode() for obj in data}

    def _group(self, model: str, pool: str | None) -> Group:
        g = self.groups.get((model, pool))
        if g is None:
            g = self.groups[(model, pool)] = Group((model, pool), self.policy_for(model))
        return g

    def health_json(self) -> dict[str, Any]:
        total = len(self.backends)
        h = self.routable_count
        out: dict[str, Any] = {
            "status": "healthy" if h else "running",
            "router": "running",
            "healthy_services": f"{h}/{total}",
            "registry_url": self.registry_url,
            "message": None if h else "No healthy services available",
            "timestamp": int(time.time()),
        }
        if self.registry_url:
            out["registry"] = {
                "reachable": self.registry_ok,
                "error": self.registry_error,
                "last_sync": self.registry_synced_at,
                "index": self.registry_index,
                "serving_last_known_table": not self.registry_ok,
                "urls": self.registry_urls,
                "last_failover": self.registry_failover,
            }
            if not self.registry_ok:
                out["message"] = (f"registry unreachable ({self.registry_error}); serving from the last "
                                  f"known table of {total} backend(s)")
        return out
