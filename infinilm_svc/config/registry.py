"""The `[registry]` table of a node file."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .schema import check_port, check_positive, check_url

STORES = ("memory", "etcd")


@dataclass(frozen=True)
class RegistryConfig:
    """Settings of the registry role."""

    bind: str = "0.0.0.0"
    port: int = 18000
    heartbeat_ttl: float = 120.0      # healthy = status running and a heartbeat within this
    expire_after: float = 300.0       # records are deleted this long after their last heartbeat
    sweep_interval: float = 1.0       # how often health lapses and expiries are looked for
    probe_interval: float = 30.0      # informational active probes (upstream health_status); 0 = off
    probe_timeout: float = 5.0
    token: str | None = None          # when set, writes need `Authorization: Bearer <token>`
    state_file: str | None = None     # when set, the table survives a restart
    max_body: int = 1 << 20           # bytes; larger requests get 413
    max_wait: float = 300.0           # longest watch (?wait=) a client may ask for
    store: str = "memory"             # "memory" (in this process) or "etcd" (shared by many registries)
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_prefix: str = "/infinilm-svc/"
    etcd_timeout: float = 2.0         # one etcd request; a write tries other members for twice this
    max_metadata_bytes: int = 16384   # a record's metadata as JSON; larger gets 413
    max_services: int = 10000         # records held at most; registering one more gets 429
    insecure: bool = False            # allow a non-loopback bind without a token (anyone may write)

    def check(self) -> list[tuple[str, str]]:
        out = []
        if (m := check_port(self.port)):
            out.append(("port", m))
        for name in ("heartbeat_ttl", "expire_after", "sweep_interval", "probe_timeout", "max_wait"):
            if (m := check_positive(getattr(self, name), name)):
                out.append((name, m))
        if (m := check_positive(self.probe_interval, "probe_interval", allow_zero=True)):
            out.append(("probe_interval", m))
        if self.expire_after < self.heartbeat_ttl:
            out.append(("expire_after", f"expire_after ({self.expire_after}) must be >= heartbeat_ttl ({self.heartbeat_ttl})"))
        if self.max_body < 1024:
            out.append(("max_body", f"max_body must be at least 1024 bytes, got {self.max_body}"))
        if self.store not in STORES:
            out.append(("store", f"unknown store {self.store!r} (one of {', '.join(STORES)})"))
        if self.store == "etcd":
            if not self.etcd_endpoints:
                out.append(("etcd_endpoints", "store = \"etcd\" needs at least one endpoint"))
            for ep in self.etcd_endpoints:
                if (m := check_url(ep)):
                    out.append(("etcd_endpoints", m))
            if not self.etcd_prefix.startswith("/") or not self.etcd_prefix.endswith("/"):
                out.append(("etcd_prefix", f"etcd_prefix must start and end with '/', got {self.etcd_prefix!r}"))
            if self.state_file:
                out.append(("state_file", "state_file is for store = \"memory\"; etcd keeps the table itself"))
        if (m := check_positive(self.etcd_timeout, "etcd_timeout")):
            out.append(("etcd_timeout", m))
        if self.token is not None and not self.token.strip():
            out.append(("token", "token must not be empty (leave it out to disable auth)"))
        if self.max_metadata_bytes < 256:
            out.append(("max_metadata_bytes", f"max_metadata_bytes must be at least 256, got {self.max_metadata_bytes}"))
        if self.max_services < 1:
            out.append(("max_services", f"max_services must be >= 1, got {self.max_services}"))
        if self.token is None and not self.insecure and not is_loopback(self.bind):
            out.append(("bind", f"the registry would listen on {self.bind or '0.0.0.0'} with no token: anyone who "
                                "can reach it could register, overwrite or delete services and so take over "
                                "traffic. Set token = \"...\" (and the same token in every babysitter and "
                                "router), or bind to a loopback address, or say insecure = true"))
        return out


def is_loopback(bind: str) -> bool:
    """True for loopback addresses and "localhost"; a wildcard or any other address is not."""
    host = bind.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
