"""What validate checks and where (ValidateOptions, ExpectedService), and the result of one check."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check, as shown in the table, the JSON and the console."""

    number: int
    name: str
    passed: bool
    detail: str
    ran: bool = True              # False: not run, because something it needs is missing (detail says what)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else ("FAIL" if self.ran else "SKIP")


@dataclass(frozen=True)
class ExpectedService:
    """A babysitter the deployment must have, and the models its backend must serve (empty: any)."""

    name: str
    models: tuple[str, ...] = ()

    @property
    def backend(self) -> str:
        return f"{self.name}-server"


DEMO_SERVICES = (
    ExpectedService("babysitter-a", ("model-1",)),
    ExpectedService("babysitter-b", ("model-2",)),
    ExpectedService("babysitter-c", ("model-1",)),
    ExpectedService("babysitter-d", ("model-2",)),
)


@dataclass(frozen=True)
class ValidateOptions:
    """What to check and where; the defaults describe the integration demo."""

    registry: str = "http://127.0.0.1:18000"
    router: str | None = None                 # default: the router registered in the registry
    expect_services: tuple[ExpectedService, ...] = DEMO_SERVICES
    expect_models: tuple[str, ...] | None = None   # default: every model of expect_services
    expect_hosts: tuple[str, ...] = ()        # addresses that must each host an expected record
    expect_host_count: int = 2                # distinct hosts among the expected records
    lb_requests: int = 8                      # requests per model for the load-balancing check
    log_tail: int = 2000                      # lines read from each babysitter's /logs
    log_wait: float = 5.0                     # how long a request may take to reach its backend's log
    chaos: bool = False
    chaos_service: str | None = None          # default: the last expected service that has a peer
    chaos_timeout: float = 30.0
    token: str | None = None                  # babysitter token for GET /logs and POST /stop and /start
    timeout: float = 10.0                     # per HTTP request
    wait: float = 0.0                         # wait up to this long for discovery before checking

    @property
    def models(self) -> tuple[str, ...]:
        if self.expect_models is not None:
            return self.expect_models
        seen: list[str] = []
        for s in self.expect_services:
            for m in s.models:
                if m not in seen:
                    seen.append(m)
        return tuple(seen)
