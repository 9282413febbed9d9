"""Prometheus metrics of the registry, computed from the table at scrape time."""
from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .table import ServiceTable


class TableCollector:
    """Exports services by type and health, and the table's event counters."""

    def __init__(self, table: ServiceTable) -> None:
        self.table = table

    def collect(self):
        now = self.table.clock()
        total: Counter[str] = Counter()
        healthy: Counter[str] = Counter()
        for rec in self.table.records.values():
            md = rec.get("metadata") or {}
            t = str(md.get("type", "unknown")) if isinstance(md, dict) else "unknown"
            total[t] += 1
            if self.table.is_healthy(rec, now):
                healthy[t] += 1
        g = GaugeMetricFamily("infinilm_registry_services", "Registered services by metadata.type", labels=["type"])
        for t, n in sorted(total.items()):
            g.add_metric([t], n)
        yield g
        g = GaugeMetricFamily("infinilm_registry_healthy_services", "Healthy services by metadata.type", labels=["type"])
        for t in sorted(total):
            g.add_metric([t], healthy[t])
        yield g
        for key, help_ in (("registrations", "Registrations (POST /services)"),
                           ("heartbeats", "Heartbeats received for known services"),
                           ("expiries", "Records deleted because their heartbeats stopped"),
                           ("deregistrations", "Records deleted by DELETE /services/{name}")):
            c = CounterMetricFamily(f"infinilm_registry_{key}", help_)
            c.add_metric([], self.table.counters[key])
            yield c
        g = GaugeMetricFamily("infinilm_registry_index", "Change index of the table (watch position)")
        g.add_metric([], self.table.index)
        yield g
        g = GaugeMetricFamily("infinilm_registry_watchers", "Blocking queries (watches) parked now")
        g.add_metric([], self.table.watchers)
        yield g


def make_metrics(table: ServiceTable) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(TableCollector(table))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
