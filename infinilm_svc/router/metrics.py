"""The router's Prometheus exposition, written in slices so a fleet never holds the event loop.

With 10,000 backends the text is tens of megabytes (each backend has two histograms). Built in
one go it kept the loop for seconds, and every request waited behind the scrape. Here it is
written family by family and `SLICE` rows at a time, yielding to the loop between slices, so
requests are served between them; the text format itself is written here (it is small and
fixed), which also costs a fraction of building one object per sample.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterable

from ..looplag import LoopLag
from .stats import BUCKETS, Counters

if TYPE_CHECKING:
    from .health import Health
    from .kvmodel import EngineCache
    from .queueing import Scheduler
    from .table import Table

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SLICE = 100   # rows (backends or models) formatted between two yields to the loop

Rows = Callable[[str, Counters], Iterable[str]]


def label(value: str) -> str:
    """A label value escaped for the text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def num(v: float) -> str:
    """A sample value as the text format writes it (4 -> 4.0, inf -> +Inf)."""
    f = float(v)
    if f != f:
        return "NaN"
    if f in (float("inf"), float("-inf")):
        return "+Inf" if f > 0 else "-Inf"
    return repr(f)


def header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


_LE = [repr(b) for b in BUCKETS] + ["+Inf"]


def _histogram(name: str, field: str) -> Rows:
    def rows(lab: str, c: Counters) -> Iterable[str]:
        s = getattr(c, field)
        acc = 0
        for le, n in zip(_LE, s.buckets, strict=True):
            acc += n
            yield f'{name}_bucket{{{lab},le="{le}"}} {num(acc)}\n'
        yield f"{name}_count{{{lab}}} {num(acc)}\n{name}_sum{{{lab}}} {num(s.total)}\n"
    return rows


def families(group: str) -> list[tuple[str, str, str, Rows]]:
    """The per-backend or per-model families: (name, type, help, rows of one label set)."""
    p = f"infinilm_router_{group}"

    def hit(lab: str, c: Counters) -> Iterable[str]:
        if c.cache_reports and c.prompt_tokens:
            yield f"{p}_cache_hit_ratio{{{lab}}} {num(c.cached_tokens / c.prompt_tokens)}\n"

    return [
        (f"{p}_requests_total", "counter", f"Requests per {group}",
         lambda lab, c: (f"{p}_requests_total{{{lab}}} {num(c.request_count)}\n",)),
        (f"{p}_errors_total", "counter", f"Errors per {group} by kind",
         lambda lab, c: (f'{p}_errors_total{{{lab},kind="{label(k)}"}} {num(n)}\n' for k, n in c.errors.items())),
        (f"{p}_errors_absorbed_total", "counter", f"Errors per {group} that no client saw (the request was "
         "retried or its stream continued elsewhere)",
         lambda lab, c: (f"{p}_errors_absorbed_total{{{lab}}} {num(c.absorbed)}\n",)),
        (f"{p}_in_flight", "gauge", f"Requests in flight per {group}",
         lambda lab, c: (f"{p}_in_flight{{{lab}}} {num(c.in_flight)}\n",)),
        (f"{p}_tokens_total", "counter", f"Tokens reported in usage per {group} (type: prompt, completion, "
         "cached = prompt tokens served from the engine's cache)",
         lambda lab, c: (f'{p}_tokens_total{{{lab},type="prompt"}} {num(c.prompt_tokens)}\n'
                         f'{p}_tokens_total{{{lab},type="completion"}} {num(c.completion_tokens)}\n'
                         f'{p}_tokens_total{{{lab},type="cached"}} {num(c.cached_tokens)}\n',)),
        (f"{p}_cache_hit_ratio", "gauge", f"Cached prompt tokens / prompt tokens per {group}, as the engine "
         "reports them", hit),
        (f"{p}_latency_seconds", "histogram", f"Request latency per {group}", _histogram(f"{p}_latency_seconds", "latency")),
        (f"{p}_ttft_seconds", "histogram", f"Time to first byte per {group}", _histogram(f"{p}_ttft_seconds", "ttft")),
        (f"{p}_migrations_total", "counter", f"Streams continued elsewhere after failing mid-answer, per {group}",
         lambda lab, c: (f"{p}_migrations_total{{{lab}}} {num(c.migrations)}\n",)),
    ]


def _cache_model_rows() -> list[tuple[str, str, str, Callable[[str, "EngineCache"], str]]]:
    """The cache model's families, per backend it models (cache_aware)."""
    p = "infinilm_router_cache_model"
    return [
        (f"{p}_slots", "gauge", "Slots of the engine the model places requests in (0: none known, or not pinned)",
         lambda lab, e: f"{p}_slots{{{lab}}} {num(len(e.slots) if e.slotted else 0)}\n"),
        (f"{p}_busy_slots", "gauge", "Slots running a request of this router",
         lambda lab, e: f"{p}_busy_slots{{{lab}}} {num(sum(1 for s in e.slots if s.busy))}\n"),
        (f"{p}_predicted_hits_total", "counter", "Answers the model predicted would be cache hits",
         lambda lab, e: f"{p}_predicted_hits_total{{{lab}}} {num(e.stats.predicted_hits)}\n"),
        (f"{p}_engine_hits_total", "counter", "Answers the engine reported as cache hits",
         lambda lab, e: f"{p}_engine_hits_total{{{lab}}} {num(e.stats.engine_hits)}\n"),
        (f"{p}_confirmed_hits_total", "counter", "Predicted hits the engine confirmed (precision = confirmed / "
         "predicted, recall = confirmed / engine)",
         lambda lab, e: f"{p}_confirmed_hits_total{{{lab}}} {num(e.stats.confirmed)}\n"),
        (f"{p}_cached_tokens_total", "counter", "Cached prompt tokens, as predicted and as the engine reported",
         lambda lab, e: (f'{p}_cached_tokens_total{{{lab},source="predicted"}} {num(e.stats.predicted_tokens)}\n'
                         f'{p}_cached_tokens_total{{{lab},source="engine"}} {num(e.stats.cached_tokens)}\n')),
        (f"{p}_resets_total", "counter", "Times what the model held about the engine was dropped (a denied hit, a "
         "new process)", lambda lab, e: f"{p}_resets_total{{{lab}}} {num(e.stats.resets)}\n"),
        (f"{p}_ttft_seconds_total", "counter", "Time to first token of streams, as predicted, as measured, and "
         "their absolute difference (divide by _ttft_predictions_total for means)",
         lambda lab, e: (f'{p}_ttft_seconds_total{{{lab},kind="predicted"}} {num(e.stats.ttft_predicted_ms / 1000)}\n'
                         f'{p}_ttft_seconds_total{{{lab},kind="actual"}} {num(e.stats.ttft_actual_ms / 1000)}\n'
                         f'{p}_ttft_seconds_total{{{lab},kind="abs_error"}} {num(e.stats.ttft_abs_err_ms / 1000)}\n')),
        (f"{p}_ttft_predictions_total", "counter", "Streams whose time to first token was predicted and measured",
         lambda lab, e: f"{p}_ttft_predictions_total{{{lab}}} {num(e.stats.ttft_n)}\n"),
        (f"{p}_prefill_seconds_per_token", "gauge", "The engine's prefill time per uncached prompt token, as learned",
         lambda lab, e: f"{p}_prefill_seconds_per_token{{{lab}}} {num(e.ms_per_token / 1000)}\n"),
    ]


class Exposition:
    """Everything /metrics shows about one router."""

    def __init__(self, table: "Table", health: "Health", lag: LoopLag, scheduler: "Scheduler | None" = None) -> None:
        self.table = table
        self.health = health
        self.lag = lag
        self.scheduler = scheduler

    async def chunks(self) -> AsyncIterator[bytes]:
        """The exposition text, in pieces of at most SLICE rows of one family."""
        t = self.table
        # Snapshots of who is listed: a backend removed meanwhile is still written with its last
        # numbers, one added meanwhile waits for the next scrape.
        groups = (("backend", [(label(b.name), b.stats) for b in list(t.backends.values())]),
                  ("model", [(label(m or "(none)"), c) for m, c in list(t.model_stats.items())]))
        for group, members in groups:
            for name, kind, help_text, rows in families(group):
                out = [header(name, kind, help_text)]
                for i in range(0, len(members), SLICE):
                    for value, c in members[i:i + SLICE]:
                        out.extend(rows(f'{group}="{value}"', c))
                    yield "".join(out).encode()
                    out = []
                    await asyncio.sleep(0)
                if out:
                    yield "".join(out).encode()
        backends = list(t.backends.values())
        name = "infinilm_router_backend_routable"
        out = [header(name, "gauge", "1 if the backend receives requests")]
        for i in range(0, len(backends), SLICE):
            out.extend(f'{name}{{backend="{label(b.name)}"}} {"1.0" if b.routable else "0.0"}\n'
                       for b in backends[i:i + SLICE])
            yield "".join(out).encode()
            out = []
            await asyncio.sleep(0)
        modelled = [(label(b.name), b.cache) for b in backends if b.cache is not None]
        if modelled:
            for name, kind, help_text, row in _cache_model_rows():
                out = [header(name, kind, help_text)]
                for i in range(0, len(modelled), SLICE):
                    out.extend(row(f'backend="{value}"', e) for value, e in modelled[i:i + SLICE])
                    yield "".join(out).encode()
                    out = []
                    await asyncio.sleep(0)
        if self.scheduler is not None:
            yield self.queue_text().encode()
        yield self.router_text().encode()

    def queue_text(self) -> str:
        """The models' queues: waiting and running by class, and what each tenant got."""
        from .queueing import CLASSES
        assert self.scheduler is not None
        qs = [("/".join(k for k in key if k) or "(none)", q) for key, q in list(self.scheduler.queues.items())
              if q.tenants or q.waiting]
        p = "infinilm_router_queue"
        out = [header(f"{p}_waiting", "gauge", "Requests waiting at the router for a place on an engine"),
               *(f'{p}_waiting{{model="{label(m)}",class="{c}"}} {num(sum(1 for a in q.waiting if a.rank == i))}\n'
                 for m, q in qs for i, c in enumerate(CLASSES)),
               header(f"{p}_running", "gauge", "Requests on an engine now, by class"),
               *(f'{p}_running{{model="{label(m)}",class="{c}"}} {num(q.running[i])}\n'
                 for m, q in qs for i, c in enumerate(CLASSES))]
        for name, help_text, attr in (("admitted", "Requests given a place on an engine", "admitted"),
                                      ("rejected", "Requests refused with 429 (queue full for them)", "rejected"),
                                      ("cancelled", "Requests whose client left while they waited", "cancelled"),
                                      ("tokens", "Tokens served, by tenant (usage, else the estimate)", "tokens")):
            out.append(header(f"{p}_{name}_total", "counter", help_text))
            out.extend(f'{p}_{name}_total{{model="{label(m)}",tenant="{label(t.name)}"}} {num(getattr(t, attr))}\n'
                       for m, q in qs for t in list(q.tenants.values()))
        name = f"{p}_wait_seconds"
        out.append(header(name, "histogram", "Time waited at the router before a place on an engine, by class"))
        for m, q in qs:
            for i, c in enumerate(CLASSES):
                s, acc = q.waits[i], 0
                lab = f'model="{label(m)}",class="{c}"'
                for le, n in zip(_LE, s.buckets, strict=True):
                    acc += n
                    out.append(f'{name}_bucket{{{lab},le="{le}"}} {num(acc)}\n')
                out.append(f"{name}_count{{{lab}}} {num(acc)}\n{name}_sum{{{lab}}} {num(s.total)}\n")
        return "".join(out)

    def router_text(self) -> str:
        """The router-wide families: registry, event loop, health checks."""
        t, lag, h = self.table, self.lag, self.health
        out = [header("infinilm_router_registry_reachable", "gauge", "1 if the last registry call worked"),
               f"infinilm_router_registry_reachable {'1.0' if t.registry_ok else '0.0'}\n"]
        name = "infinilm_router_event_loop_lag_seconds"
        out.append(header(name, "histogram", "How late the event loop ran a timer due every "
                          f"{lag.every:g} s (the length of stalls)"))
        for bound, acc in lag.histogram():
            out.append(f'{name}_bucket{{le="{num(bound)}"}} {num(acc)}\n')
        out.append(f"{name}_count {num(lag.count)}\n{name}_sum {num(lag.total)}\n")
        out += [header("infinilm_router_event_loop_lag_max_seconds", "gauge", "The longest event-loop stall since start"),
                f"infinilm_router_event_loop_lag_max_seconds {num(lag.max)}\n",
                header("infinilm_router_event_loop_lag_recent_max_seconds", "gauge",
                       "The longest event-loop stall of the last one to two minutes"),
                f"infinilm_router_event_loop_lag_recent_max_seconds {num(lag.recent_max)}\n",
                header("infinilm_router_gc_full_collections_total", "counter",
                       "Full (generation 2) garbage collections, each a stall of the event loop"),
                f"infinilm_router_gc_full_collections_total {num(lag.gc_full)}\n",
                header("infinilm_router_gc_pause_max_seconds", "gauge", "The longest garbage-collection pause since start"),
                f"infinilm_router_gc_pause_max_seconds {num(lag.gc_max)}\n"]
        name = "infinilm_router_health_checks_total"
        out += [header(name, "counter", "Active health checks of backends by result"),
                f'{name}{{result="ok"}} {num(h.checks[1])}\n', f'{name}{{result="failed"}} {num(h.checks[0])}\n',
                header("infinilm_router_health_check_interval_seconds", "gauge",
                       "How often each backend is checked: health_interval, or longer when the backends are "
                       "more than health_max_rate allows per interval"),
                f"infinilm_router_health_check_interval_seconds {num(h.effective_interval)}\n",
                header("infinilm_router_health_checks_behind_seconds", "gauge",
                       "How late the last scheduled health check started"),
                f"infinilm_router_health_checks_behind_seconds {num(h.behind)}\n"]
        return "".join(out)
