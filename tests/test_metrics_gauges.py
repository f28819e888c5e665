"""The gateway's status gauges on `/metrics`, and the Grafana dashboard that uses them: every
PromQL expression of docs/grafana/drflow.json lexes, and names only metrics a real gateway (with a
status provider, stand-in probes) serves."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pygments.lexers.promql import PromQLLexer
from pygments.token import Error, Keyword, Name

from drflow.audit import open_store
from orchestrator.gateway import create_app
from orchestrator.gateway.metrics import STATUS_GAUGES, StatusInput, status_samples
from tests.test_gateway import (
    RecordingAudit,
    RecordingStarter,
    event,
    make_settings,
    post,
    serve_app,
)
from tests.test_status_fresh import StandInProvider, config

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "drflow.json"
# Label lists follow these keywords: `by (group)`, `on (group)`, … are labels, not metrics.
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (pygments' PromQL lexer; label lists of
    grouping clauses skipped). Fails on what the lexer cannot read or unbalanced brackets."""
    names: set[str] = set()
    depth: list[str] = []
    in_grouping: int | None = None  # depth of the label list being read
    after_grouping = False
    pairs = {")": "(", "]": "[", "}": "{"}
    for tok, text in PromQLLexer().get_tokens(expr):
        assert tok not in Error, f"cannot lex {text!r} in {expr!r}"
        if tok in Keyword and text in GROUPING:
            after_grouping = True
            continue
        if text in ("(", "[", "{"):
            depth.append(text)
            if after_grouping and text == "(":
                in_grouping = len(depth)
            after_grouping = False
            continue
        if text in pairs:
            assert depth and depth[-1] == pairs[text], f"unbalanced {text!r} in {expr!r}"
            if in_grouping == len(depth):
                in_grouping = None
            depth.pop()
            continue
        if tok in Name.Variable and in_grouping is None and "{" not in depth:
            names.add(text)
    assert not depth, f"unclosed {depth} in {expr!r}"
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 30 and dash["title"]
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus"
               for i in dash["__inputs"])
    exprs = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            exprs.append(t["expr"])
    return exprs


def test_the_expression_reader_finds_metrics_not_labels() -> None:
    assert metric_names('max by (group, state) (a_b{group=~"$g"} == 1) + rate(c_total[5m]) '
                        'or on(group) dd_x') == {"a_b", "c_total", "dd_x"}
    with pytest.raises(AssertionError):
        metric_names("sum(a_b")


def test_status_samples_from_a_snapshot() -> None:
    st = {"protection": "unprotected", "serving": {"site": "dr"},
          "replication": {"lag_bytes": None, "lag_s": None, "rpo_budget_s": 5},
          "last_failover": {"at": "2026-12-04T05:21:03.123+00:00", "rto_s": 6.1, "rpo_s": 0.0},
          "last_failback": {"at": "2026-12-04T06:00:00+00:00", "downtime_s": 1.4},
          "last_reprotect": None, "last_drill": {"at": "x", "rto_s": None},
          "pending_approvals": [{"run": "flow:failback/1"}]}
    out = status_samples(StatusInput({"orders": st, "broken": {"error": "boom"}}, 100.0,
                                     {"orders": {"open_incident": {"idempotency_key": "k"}}},
                                     {"orders": 98.5}), 102.0)
    assert sorted(out["drflow_group_protection_state"]) == [
        (("orders", s), float(s == "unprotected"))
        for s in ("degraded", "protected", "unknown", "unprotected")]
    assert out["drflow_group_serving_site"] == [(("orders", "dr"), 1.0)]
    assert out["drflow_group_replication_lag_seconds"] == []  # no standby: no lag, not 0
    assert out["drflow_group_rpo_budget_seconds"] == [(("orders",), 5.0)]
    assert sorted(out["drflow_group_last_rto_seconds"]) == [
        (("orders", "failback"), 1.4), (("orders", "failover"), 6.1)]
    assert out["drflow_group_last_rpo_seconds"] == [(("orders", "failover"), 0.0)]
    assert len(out["drflow_group_last_run_timestamp_seconds"]) == 2  # "x" is no time
    assert out["drflow_group_pending_approvals"] == [(("orders",), 1.0)]
    assert out["drflow_group_status_age_seconds"] == [(("orders",), 2.0)]
    assert out["drflow_gateway_open_incidents"] == [(("orders",), 1.0)]
    assert out["drflow_gateway_lease_age_seconds"] == [(("orders",), 3.5)]


@contextmanager
def gateway_with_status(tmp: Path) -> Iterator[str]:
    """A real gateway (uvicorn on loopback, its lifespan) with a status provider whose probes
    are stand-ins, over an audit trail holding one run of each kind."""
    store = open_store(f"sqlite:///{tmp / 'audit.db'}")
    for kind, figures in (("failover", {"rto_s": 6.1, "rpo_s": 0.0}),
                          ("reprotect", {"reprotect_s": 12.0}),
                          ("failback", {"downtime_s": 1.4}),
                          ("drill", {"rto_s": 4.2, "rpo_s": 0.0})):
        store.append(f"flow:{kind}/1", f"{kind}.finish", "g1", figures, "ok", "done")
    store.append("flow:failback/2", "failback.wait for approval", "g1", {"timeout_s": 600},
                 "started")
    app = create_app(make_settings(tmp / "gw.sqlite"), RecordingStarter(), RecordingAudit())
    provider = StandInProvider(config(tmp, ["g1", "g2"]), audit=store, interval_s=0.2)
    provider.serving = "dr"
    app.state.group_status = provider
    try:
        with serve_app(app) as url:
            yield url
    finally:
        store.close()


def test_every_dashboard_metric_is_served_by_a_gateway(tmp_path: Path) -> None:
    with gateway_with_status(tmp_path) as url:
        assert post(url, event("heartbeat")).status_code == 202
        time.sleep(0.5)  # a refresh after the heartbeat, with the gateway's view
        text = httpx.get(f"{url}/metrics", timeout=5).text
        groups: dict[str, Any] = httpx.get(f"{url}/v1/groups", timeout=5).json()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    used: set[str] = set()
    for expr in dashboard_exprs():
        used |= metric_names(expr)
    missing = used - set(families)
    assert not missing, missing
    # Served with samples, not only described (the lease age needs etcd: none here).
    empty = {n for n in used if not families[n].samples} - {"drflow_gateway_lease_age_seconds"}
    assert not empty, empty
    assert set(STATUS_GAUGES) <= used  # the dashboard shows every status gauge
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("drflow_group_protection_state",
                    (("group", "g1"), ("state", "protected")))] == 1.0
    assert samples[("drflow_group_serving_site", (("group", "g1"), ("site", "dr")))] == 1.0
    assert samples[("drflow_group_last_rto_seconds", (("group", "g1"), ("kind", "reprotect")))] \
        == 12.0
    assert samples[("drflow_group_pending_approvals", (("group", "g1"),))] == 1.0
    assert samples[("drflow_group_pending_approvals", (("group", "g2"),))] == 0.0
    assert samples[("drflow_gateway_open_incidents", (("group", "g1"),))] == 0.0
    assert 0 <= samples[("drflow_group_status_age_seconds", (("group", "g1"),))] < 1.2
    # GET /v1/groups: the same status, with its age and ISO times.
    st = groups["g1"]["status"]
    assert st["protection"] == "protected" and st["checked_at"].endswith("+00:00")
    assert 0 <= st["age_s"] < 1.2 and st["stale"] is False
    assert st["pending_approvals"][0]["run"] == "flow:failback/2"
    assert st["last_failback"]["downtime_s"] == 1.4
