"""Request statistics per backend and per model (their Prometheus exposition is in metrics.py)."""
from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from typing import Any

# Histogram bucket bounds in seconds (LLM latencies span milliseconds to minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_WINDOW = 1024  # samples kept for percentiles (a power of two)

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
# The engine's own measure of its prefix cache: usage.prompt_tokens_details.cached_tokens
# (vLLM, SGLang, llama-server and OpenAI all report it there).
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


def usage_of(data: bytes) -> tuple[int, int, int | None] | None:
    """(prompt, completion, cached prompt) tokens of an OpenAI `usage` object in `data`, if any."""
    if b'"usage"' not in data:
        return None
    m = _PROMPT.search(data)
    c = _COMPLETION.search(data)
    if m is None and c is None:
        return None
    k = _CACHED.search(data) if b'"cached_tokens"' in data else None
    # An engine that does not report cached tokens (the mock, many others) says nothing about its
    # cache: None, not 0, so no hit ratio is made up for it.
    return (int(m.group(1)) if m else 0, int(c.group(1)) if c else 0, int(k.group(1)) if k else None)


def hit_ratio(cached: int, prompt: int) -> float | None:
    """The share of prompt tokens the engine served from its cache; None before any prompt."""
    return round(cached / prompt, 4) if prompt else None


class Samples:
    """The last _WINDOW observations (for percentiles) plus cumulative histogram buckets."""

    __slots__ = ("buf", "n", "buckets", "total", "count")

    def __init__(self) -> None:
        # An array of doubles, grown as samples come: no float objects, nothing for the garbage
        # collector to walk (a list per backend made each full collection of a 10,000-backend
        # router walk 20 million references, about a second with the loop stopped), and an
        # idle backend costs no window at all.
        self.buf = array("d")
        self.n = 0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def add(self, v: float) -> None:
        if self.n < _WINDOW:
            self.buf.append(v)
        else:
            self.buf[self.n & (_WINDOW - 1)] = v
        self.n += 1
        self.buckets[bisect_left(BUCKETS, v)] += 1
        self.total += v
        self.count += 1

    def percentiles_ms(self) -> dict[str, float | None]:
        k = min(self.n, _WINDOW)
        if not k:
            return {"p50": None, "p90": None, "p99": None}
        vals = sorted(self.buf[:k])
        pick = lambda q: round(vals[min(k - 1, int(q * k))] * 1000, 2)  # noqa: E731
        return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


class Counters:
    """Counters of one backend or one model."""

    __slots__ = ("request_count", "error_count", "errors", "in_flight", "latency", "ttft", "migrations",
                 "prompt_tokens", "completion_tokens", "cached_tokens", "usage_count", "cache_reports", "last_error",
                 "overhead", "absorbed")

    def __init__(self) -> None:
        self.request_count = 0
        self.migrations = 0          # streams that failed here mid-answer and went on elsewhere
        self.error_count = 0
        self.errors: dict[str, int] = {}
        self.in_flight = 0
        self.latency = Samples()
        self.ttft = Samples()
        self.overhead = Samples()       # the router's own time on a request (models only; see Proxy)
        self.absorbed = 0               # errors here that no client saw (retried or migrated elsewhere)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0          # prompt tokens the engine reports it took from its cache
        self.usage_count = 0            # answers that carried a usage object
        self.cache_reports = 0          # ... of which said how many prompt tokens were cached
        self.last_error: str | None = None

    def error(self, kind: str, message: str, now: float) -> None:
        self.error_count += 1
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = f"{kind}: {message}"

    def add_tokens(self, usage: tuple[int, int, int | None] | None) -> None:
        if usage is not None:
            self.usage_count += 1
            self.prompt_tokens += usage[0]
            self.completion_tokens += usage[1]
            if usage[2] is not None:
                self.cached_tokens += usage[2]
                self.cache_reports += 1

    @property
    def cache_hit_ratio(self) -> float | None:
        """None until the engine has reported its cached tokens at least once."""
        return hit_ratio(self.cached_tokens, self.prompt_tokens) if self.cache_reports else None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_count": self.request_count,
            "error_count": self.error_count,
            "errors_absorbed": self.absorbed,
            "in_flight": self.in_flight,
            "errors": dict(self.errors),
            "migrations": self.migrations,
            "latency_ms": self.latency.percentiles_ms(),
            "ttft_ms": self.ttft.percentiles_ms(),
            "router_overhead_ms": self.overhead.percentiles_ms(),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "cached": self.cached_tokens if self.cache_reports else None,
                       "answers_with_usage": self.usage_count},
            "cache_hit_ratio": self.cache_hit_ratio,
            "last_error": self.last_error,
        }
