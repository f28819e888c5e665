"""Prometheus metrics of one gateway instance (own registry, so several apps can coexist)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.gateway.heartbeats import HeartbeatTracker


class _HeartbeatAges(Collector):
    """Ages computed at scrape time, so they are never stale."""

    def __init__(self, tracker: HeartbeatTracker) -> None:
        self._tracker = tracker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "drflow_gateway_heartbeat_age_seconds",
            "Seconds since the agent's last heartbeat (since gateway start if none yet).",
            labels=["group", "agent_id", "role"],
        )
        for s in self._tracker.agents():
            role = self._tracker.effective_role(s.group, s.agent_id)
            family.add_metric([s.group, s.agent_id, role or "unknown"], self._tracker.age(s))
        yield family


# attribute: (metric name, help, labels)
_COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "events": ("drflow_gateway_events_total", "Events received, by kind and result.",
               ("kind", "result")),
    "rejections": ("drflow_gateway_rejections_total", "Requests refused, by reason.", ("reason",)),
    "incidents": ("drflow_gateway_incidents_started_total",
                  "Incidents whose failover run was started.", ("group", "kind")),
    "start_errors": ("drflow_gateway_incident_start_errors_total",
                     "Failed start_incident attempts.", ("group",)),
    "alerts": ("drflow_gateway_alerts_total", "Alerts raised instead of a failover.",
               ("group", "kind")),
    "alerts_suppressed": ("drflow_gateway_alerts_suppressed_total", "Alerts not repeated: the "
                          "same agent alerted the same way within the hold-down.",
                          ("group", "kind")),
    "joined": ("drflow_gateway_incident_joins_total",
               "Failure reports joined to an incident closed within the hold-down.", ("group",)),
}


class GatewayMetrics:
    events: Counter
    rejections: Counter
    incidents: Counter
    start_errors: Counter
    alerts: Counter
    alerts_suppressed: Counter
    joined: Counter

    def __init__(self, tracker: HeartbeatTracker) -> None:
        self.registry = CollectorRegistry()
        for attr, (name, documentation, labels) in _COUNTERS.items():
            setattr(self, attr, Counter(name, documentation, labels, registry=self.registry))
        self.start_latency = Histogram(
            "drflow_gateway_incident_start_seconds",
            "From the incident's decision to start_incident being called.",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        # The leader-key watch (leases.py); without etcd configured, etcd_up stays 0.
        self.leader_key_present = Gauge(
            "drflow_gateway_leader_key_present",
            "1 when the group's leader key exists in etcd at the last successful read, else 0.",
            ["group"], registry=self.registry)
        self.etcd_up = Gauge("drflow_gateway_etcd_up",
                             "1 when the last read of the leader keys succeeded, else 0.",
                             registry=self.registry)
        self.etcd_read_failures = Counter(
            "drflow_gateway_etcd_read_failures_total",
            "Reads of the leader keys that failed (etcd unreachable or unable to serve).",
            registry=self.registry)
        self.registry.register(_HeartbeatAges(tracker))

    def render(self) -> bytes:
        return generate_latest(self.registry)
