"""Prometheus metrics of one gateway instance (own registry, so several apps can coexist).

Besides its counters, the gateway exports gauges computed at scrape time: the agents' heartbeat
ages, and per group what its last status refresh found (status.py: protection, lag, last
runs, pending approvals, …) with the age of that refresh. docs/grafana/drflow.json shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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


@dataclass(frozen=True)
class StatusInput:
    """What the status gauges are computed from (status.gauge_input builds it)."""

    groups: Mapping[str, Mapping[str, Any]]  # the last status refresh, per group
    taken_at: float | None  # wall clock of that refresh; None: none yet
    gateway: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # its groups view
    lease_read_at: Mapping[str, float] = field(default_factory=dict)  # leader key last seen


PROTECTION_STATES = ("protected", "unprotected", "degraded", "unknown")
RUN_KINDS = ("failover", "reprotect", "failback", "drill")
# A run's "RTO": how long the service (or, for a re-protect, the protection) was gone.
_RTO_KEYS = {"failover": "rto_s", "drill": "rto_s", "failback": "downtime_s",
             "reprotect": "reprotect_s"}

# name: (help, labels)
STATUS_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "drflow_group_protection_state": (
        "1 for the group's protection state at the last status refresh, 0 for the others.",
        ("group", "state")),
    "drflow_group_serving_site": ("1 for the site whose database serves the group (none: no "
                                  "writable primary).", ("group", "site")),
    "drflow_group_replication_lag_bytes": ("Bytes of WAL the standby has not replayed.",
                                           ("group",)),
    "drflow_group_replication_lag_seconds": ("Seconds the standby's replay is behind.",
                                             ("group",)),
    "drflow_group_rpo_budget_seconds": ("The group's RPO budget (the most lag a promotion "
                                        "accepts).", ("group",)),
    "drflow_group_last_rto_seconds": (
        "RTO of the group's last run of a kind (failback: its write pause; reprotect: its "
        "duration).", ("group", "kind")),
    "drflow_group_last_rpo_seconds": ("RPO of the group's last run of a kind.",
                                      ("group", "kind")),
    "drflow_group_last_run_timestamp_seconds": ("When the group's last run of a kind finished "
                                                "(Unix time).", ("group", "kind")),
    "drflow_group_pending_approvals": ("Runs of the group paused for its approvers (failback, "
                                       "attested failover), from the audit trail.", ("group",)),
    "drflow_group_status_age_seconds": ("Seconds since the group's status was last refreshed.",
                                        ("group",)),
    "drflow_gateway_open_incidents": ("Open incidents of the group (0 or 1) at the last status "
                                      "refresh.", ("group",)),
    "drflow_gateway_lease_age_seconds": (
        "Seconds since the gateway's last read of etcd that found the group's leader key "
        "(grows while etcd does not answer; absent while the key is).", ("group",)),
}

Sample = tuple[tuple[str, ...], float]


def status_samples(inp: StatusInput, now: float) -> dict[str, list[Sample]]:
    """Every status gauge's samples at `now` (pure: the collector only formats them)."""
    out: dict[str, list[Sample]] = {name: [] for name in STATUS_GAUGES}

    def put(name: str, labels: tuple[str, ...], value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name].append((labels, float(value)))

    for group, st in sorted(inp.groups.items()):
        if "protection" not in st:  # an error instead of a status
            continue
        for state in PROTECTION_STATES:
            put("drflow_group_protection_state", (group, state),
                1 if st.get("protection") == state else 0)
        serving = st.get("serving") or {}
        if serving.get("site"):
            put("drflow_group_serving_site", (group, str(serving["site"])), 1)
        rep = st.get("replication") or {}
        put("drflow_group_replication_lag_bytes", (group,), rep.get("lag_bytes"))
        put("drflow_group_replication_lag_seconds", (group,), rep.get("lag_s"))
        put("drflow_group_rpo_budget_seconds", (group,), rep.get("rpo_budget_s"))
        for kind in RUN_KINDS:
            last = st.get(f"last_{kind}") or {}
            put("drflow_group_last_rto_seconds", (group, kind), last.get(_RTO_KEYS[kind]))
            put("drflow_group_last_rpo_seconds", (group, kind), last.get("rpo_s"))
            put("drflow_group_last_run_timestamp_seconds", (group, kind),
                epoch(last.get("at")))
        put("drflow_group_pending_approvals", (group,), len(st.get("pending_approvals") or []))
        if inp.taken_at is not None:
            put("drflow_group_status_age_seconds", (group,), max(0.0, now - inp.taken_at))
    for group, view in sorted(inp.gateway.items()):
        put("drflow_gateway_open_incidents", (group,), 1 if view.get("open_incident") else 0)
    for group, read_at in sorted(inp.lease_read_at.items()):
        put("drflow_gateway_lease_age_seconds", (group,), max(0.0, now - read_at))
    return out


def epoch(text: Any) -> float | None:
    """ISO 8601 text (as the status or the audit trail writes it) as epoch seconds; else None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


class _StatusGauges(Collector):
    """The status gauges, from whatever `source()` gives at scrape time (nothing: no samples,
    the families still described)."""

    def __init__(self, source: Callable[[], StatusInput | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        inp = self._source()
        samples = status_samples(inp, time.time()) if inp is not None else {}
        for name, (documentation, labels) in STATUS_GAUGES.items():
            family = GaugeMetricFamily(name, documentation, labels=list(labels))
            for values, value in samples.get(name, []):
                family.add_metric(list(values), value)
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
        # Set by whoever refreshes the groups' status (status.start_status); none: no samples.
        self.status_source: Callable[[], StatusInput | None] = lambda: None
        self.registry.register(_StatusGauges(lambda: self.status_source()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
