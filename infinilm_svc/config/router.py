"""The `[router]` table of a node file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .schema import check_port, check_positive, check_url, check_urls

POLICIES = ("round_robin", "weighted", "least_requests", "power_of_two", "session", "cache_aware")


@dataclass(frozen=True)
class RouterConfig:
    """Settings of the router role."""

    bind: str = "0.0.0.0"
    port: int = 8000
    registry_url: str | tuple[str, ...] | None = None  # one URL, or several to fail over along
    registry_token: str | None = None       # the registry's write token, to register the router
    public_url: str | None = None           # the URL registered for this router (default http://bind:port)
    name: str | None = None                 # registry name (default router-<host>-<port>)
    static_services: str | None = None      # upstream-format static services JSON file
    policy: str = "round_robin"
    model_policies: Mapping[str, str] = field(default_factory=dict)  # per-model override
    api_keys: tuple[str, ...] = ()          # when set, clients need `Authorization: Bearer <key>`
    admin_keys: tuple[str, ...] = ()        # for /services, /stats, /metrics; when empty, any api_key opens them
    public_metrics: bool = False            # leave /metrics open (for a scraper) even when keys are set
    backend_api_key: str | None = None      # Authorization sent to backends (client's is never forwarded)
    backend_api_keys: Mapping[str, str] = field(default_factory=dict)  # per backend name, overrides backend_api_key
    max_body: int = 32 * 1024 * 1024        # bytes; long prompts are big
    heartbeat_interval: float = 10.0
    watch_wait: float = 30.0
    registry_reset_grace: float = 30.0      # keep backends a restarted registry does not list yet this long                # blocking-query wait against the registry
    health_interval: float = 5.0
    health_timeout: float = 1.0
    health_path: str = "/health"            # probed on each backend's own URL
    health_max_rate: float = 30.0           # health checks started per second at most, over all backends
    health_concurrency: int = 64            # health checks in flight at most
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2
    eject_after_failures: int = 1           # passive: consecutive failures that open the circuit
    eject_cooldown: float = 10.0            # open circuit duration before a half-open trial
    retries: int = 2                        # extra attempts, each on a different backend
    retry_backoff: float = 0.05             # base of the jittered back-off between attempts (s)
    retry_on_timeout: bool = False
    migrations: int = 1                     # times a stream that fails mid-answer may continue elsewhere
    connect_timeout: float = 5.0
    upstream_max_idle: int = 32             # idle keep-alive connections kept per backend
    upstream_idle_timeout: float = 30.0     # an idle connection to a backend is closed after this long
    read_timeout: float = 600.0             # idle time between bytes from a backend (no total timeout)
    max_in_flight: int = 0                  # requests per backend at once, for every backend (0: see below)
    backend_capacity: Mapping[str, int] = field(default_factory=dict)   # per backend name, before max_in_flight
    capacity_from_slots: bool = True        # else: what the engine says it runs at once (metadata.total_slots)
    default_capacity: int = 0               # else this (0: no limit)
    queue_size: int = 100                   # requests waiting per model, at most
    queue_timeout: float = 30.0             # longest wait in the queue, then 503
    reserve_share: float = 0.25             # of a model's places, at most, kept from flex (batch) work (see queueing.py)
    tier_header: str = "X-Service-Tier"     # the class when the body has no service_tier
    tenant_weights: Mapping[str, float] = field(default_factory=dict)   # fair-share weight per tenant (default 1)
    priority_keys: tuple[str, ...] = ()     # with api_keys: the keys allowed to ask for service_tier priority
    stream_upstream: bool = True            # ask engines for a stream and assemble non-streamed answers from it
    stream_upstream_models: Mapping[str, bool] = field(default_factory=dict)   # per model, overrides it
    session_load_factor: float = 1.25       # bounded-load consistent hashing
    cache_min_match: int = 64               # cache_aware: shortest useful prefix match (chars)
    cache_balance_ratio: float = 1.5        # cache_aware: skip the match if its load is this much over the least
    cache_balance_abs: int = 8              # ... and more than this many requests over the least
    cache_block_chars: int = 64             # cache_aware: granularity of the approximate prefix tree
    cache_max_chars: int = 65536            # cache_aware: prompt text beyond this is not indexed
    cache_max_entries: int = 200000         # cache_aware: prefix blocks remembered per engine beyond its slots (LRU, learned below this)
    cache_pin_slots: bool = True            # cache_aware: send each request to a chosen slot on engines that report slots
    session_header: str = "X-Session-ID"    # session policy key header (after prompt_cache_key)
    cache_type_threshold: int = 51200       # bytes of message text above which "static" pools are used
    access_log: bool = True
    drain_timeout: float = 30.0             # on SIGTERM: how long in-flight requests and streams may finish
    keepalive_drain: float = 2.0            # on SIGTERM: how long keep-alive clients get Connection: close before idle connections close
    reuse_port: bool = True                 # SO_REUSEPORT: a new router can bind the port while this one drains

    def check(self) -> list[tuple[str, str]]:
        out = []
        if (m := check_port(self.port)):
            out.append(("port", m))
        if (m := check_urls(self.registry_url)):
            out.append(("registry_url", m))
        if (m := check_url(self.public_url)):
            out.append(("public_url", m))
        if self.policy not in POLICIES:
            out.append(("policy", f"unknown policy {self.policy!r} (one of {', '.join(POLICIES)})"))
        for model, pol in self.model_policies.items():
            if pol not in POLICIES:
                out.append((f"model_policies.{model}", f"unknown policy {pol!r} (one of {', '.join(POLICIES)})"))
        for name in ("heartbeat_interval", "watch_wait", "health_interval", "health_timeout",
                     "eject_cooldown", "connect_timeout", "read_timeout", "upstream_idle_timeout", "drain_timeout", "queue_timeout",
                     "session_load_factor", "cache_balance_ratio", "health_max_rate"):
            if (m := check_positive(getattr(self, name), name)):
                out.append((name, m))
        for name in ("unhealthy_threshold", "healthy_threshold", "eject_after_failures", "health_concurrency"):
            if getattr(self, name) < 1:
                out.append((name, f"{name} must be >= 1, got {getattr(self, name)}"))
        for name in ("cache_block_chars", "cache_max_chars", "cache_max_entries"):
            if getattr(self, name) < 1:
                out.append((name, f"{name} must be >= 1, got {getattr(self, name)}"))
        if not self.health_path.startswith("/"):
            out.append(("health_path", f"health_path must start with '/', got {self.health_path!r}"))
        for name in ("retries", "migrations", "upstream_max_idle", "max_in_flight", "queue_size", "cache_min_match", "cache_type_threshold",
                     "cache_balance_abs"):
            if getattr(self, name) < 0:
                out.append((name, f"{name} must be >= 0, got {getattr(self, name)}"))
        for name, n in self.backend_capacity.items():
            if n < 0:
                out.append((f"backend_capacity.{name}", f"a capacity must be >= 0, got {n}"))
        if self.default_capacity < 0:
            out.append(("default_capacity", f"default_capacity must be >= 0, got {self.default_capacity}"))
        if not 0 <= self.reserve_share < 1:
            out.append(("reserve_share", f"reserve_share must be at least 0 and below 1, got {self.reserve_share}"))
        for name, w in self.tenant_weights.items():
            if not w > 0:
                out.append((f"tenant_weights.{name}", f"a tenant's weight must be > 0, got {w}"))
        if self.priority_keys and not self.api_keys:
            out.append(("priority_keys", "priority_keys name API keys: set api_keys too"))
        elif any(k not in self.api_keys for k in self.priority_keys):
            out.append(("priority_keys", "every priority key must be one of api_keys"))
        if self.keepalive_drain < 0:
            out.append(("keepalive_drain", f"keepalive_drain must be >= 0, got {self.keepalive_drain}"))
        if self.registry_reset_grace < 0:
            out.append(("registry_reset_grace", f"registry_reset_grace must be >= 0, got {self.registry_reset_grace}"))
        if self.session_load_factor < 1:
            out.append(("session_load_factor", f"session_load_factor must be >= 1, got {self.session_load_factor}"))
        if self.max_body < 1024:
            out.append(("max_body", f"max_body must be at least 1024 bytes, got {self.max_body}"))
        for name in ("api_keys", "admin_keys"):
            if any(not k.strip() for k in getattr(self, name)):
                out.append((name, f"{name} must not hold an empty key"))
        if not self.registry_url and not self.static_services:
            out.append(("registry_url", "a router needs registry_url or static_services (or both)"))
        return out
