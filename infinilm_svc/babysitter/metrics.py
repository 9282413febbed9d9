"""Prometheus metrics of one babysitter, read from the supervisor and the registration at scrape time."""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .logbook import LogBook
from .registration import Registration
from .supervisor import RUNNING, STATES, Supervisor


class BabysitterCollector(Collector):
    """The backend's state, restarts and uptime, the log ring's size, and the registry's view."""

    def __init__(self, supervisor: Supervisor, logbook: LogBook, registration: Registration | None) -> None:
        self.supervisor = supervisor
        self.logbook = logbook
        self.registration = registration
        self.name = supervisor.config.service_name

    def _gauge(self, metric: str, help_: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(metric, help_, labels=["name"])
        g.add_metric([self.name], value)
        return g

    def _counter(self, metric: str, help_: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(metric, help_, labels=["name"])
        c.add_metric([self.name], value)
        return c

    def collect(self) -> Iterable:
        sup, name = self.supervisor, self.name
        yield self._gauge("infinilm_babysitter_backend_up",
                          "1 while the backend is running (ready and answering).", sup.state == RUNNING)
        g = GaugeMetricFamily("infinilm_babysitter_backend_state", "The backend's state (1 for the current one).",
                              labels=["name", "state"])
        for s in STATES:
            g.add_metric([name, s], sup.state == s)
        yield g
        yield self._counter("infinilm_babysitter_restarts_total", "Backend restarts since the babysitter started.",
                            sup.restarts)
        yield self._gauge("infinilm_babysitter_backend_uptime_seconds", "Seconds since the backend became ready.",
                          sup.uptime)
        yield self._gauge("infinilm_babysitter_log_lines", "Lines in the in-memory log ring.", len(self.logbook.ring))
        reg = self.registration
        if reg is not None:
            yield self._gauge("infinilm_babysitter_registered", "1 while both records are registered.",
                              reg.registered)
            yield self._counter("infinilm_babysitter_heartbeats_total", "Heartbeat rounds that reached the registry.",
                                reg.heartbeats)


def make_metrics(supervisor: Supervisor, logbook: LogBook, registration: Registration | None) -> CollectorRegistry:
    """A registry of this babysitter's own (never the process-global one: several may share a process)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BabysitterCollector(supervisor, logbook, registration))
    return reg
