"""A backend's passive circuit breaker: what requests to it say about it, kept by one type.

Closed, it lets every request through and counts failures in a row; `eject_after` of them open it.
Open, the backend takes no requests for `cooldown` seconds (the router's table leaves it out);
then it is half-open and lets one trial request through: a success closes it, a failure opens it
again. The timer that turns open into half-open is the owner's (the health checker's): this type
holds no loop, so it can be tested with a clock alone.
"""
from __future__ import annotations

from enum import Enum


class CircuitState(str, Enum):
    """The breaker's three states (their values are what /stats shows)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Circuit:
    """One backend's breaker."""

    __slots__ = ("eject_after", "cooldown", "state", "failures", "trial", "reopen_at")

    def __init__(self, eject_after: int, cooldown: float) -> None:
        self.eject_after = eject_after
        self.cooldown = cooldown
        self.state = CircuitState.CLOSED
        self.failures = 0            # failures in a row
        self.trial = False           # a half-open trial request is in flight
        self.reopen_at = 0.0         # when an open circuit turns half-open (the owner's clock)

    @property
    def closed(self) -> bool:
        return self.state is CircuitState.CLOSED

    @property
    def is_open(self) -> bool:
        return self.state is CircuitState.OPEN

    @property
    def clean(self) -> bool:
        """Closed with no failure counted: a success changes nothing."""
        return self.state is CircuitState.CLOSED and not self.failures

    def can_execute(self) -> bool:
        """May a request go now: not while open, and one at a time while half-open."""
        return self.state is CircuitState.CLOSED or (self.state is CircuitState.HALF_OPEN and not self.trial)

    def started(self) -> None:
        """A request is going out: while half-open it is the trial."""
        if self.state is CircuitState.HALF_OPEN:
            self.trial = True

    def abandoned(self) -> None:
        """The request ended with no verdict (its client went away): another may be the trial."""
        if self.state is CircuitState.HALF_OPEN:
            self.trial = False

    def record_outcome(self, ok: bool, now: float) -> bool:
        """A request's verdict; True when the state changed (the caller re-derives routability)."""
        if ok:
            self.failures = 0
            if self.state is CircuitState.CLOSED:
                return False
            self.state = CircuitState.CLOSED
            self.trial = False
            return True
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or (self.state is CircuitState.CLOSED
                                                    and self.failures >= self.eject_after):
            self.state = CircuitState.OPEN
            self.trial = False
            self.reopen_at = now + self.cooldown
            return True
        return False

    def half_open(self) -> bool:
        """The cool-down is over; True when that changed the state."""
        if self.state is not CircuitState.OPEN:
            return False
        self.state = CircuitState.HALF_OPEN
        return True

    def retry_in(self, now: float) -> float | None:
        """Seconds until an open circuit lets a trial through (None unless open)."""
        return round(max(0.0, self.reopen_at - now), 1) if self.state is CircuitState.OPEN else None

    def reset(self) -> None:
        """Forget every verdict (a new process behind the same name)."""
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.trial = False


__all__ = ["Circuit", "CircuitState"]
