"""The console: what it shows (console_view, pure), and its pages, JSON and static files served
by a real gateway over HTTP (no lab; the browser test is in test_failback.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from drflow.audit import AuditStore, open_store
from drflow.audit.records import AuditRecord, VerifyResult
from orchestrator.gateway import console_view as view
from orchestrator.gateway import create_app
from tests.test_gateway import RecordingStarter, make_settings, serve_app

RUN = "0b5f3c1e-9a43-4f5e-8d2a-7c6b1a2d3e4f"
UI = "http://127.0.0.1:4200"


def _rec(seq: int, action: str, target: str = "g1", params: dict[str, Any] | None = None,
         outcome: str = "ok", actor: str = f"flow:failover/{RUN}", reason: str = "",
         at: str = "2026-11-24T10:00:00+00:00") -> AuditRecord:
    return AuditRecord(seq=seq, time=at, actor=actor, action=action, target=target,
                       parameters=params or {}, outcome=outcome, reason=reason,
                       prev_hash="0" * 64, hash="0" * 64)


def _status(protection: str = "protected", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "group": "g1", "serving": {"site": "dr", "vm": "pg-b", "endpoint": "127.0.0.2:5432"},
        "home_site": "prod", "roles": "prod: down, dr: primary",
        "replication": {"configured": "sync", "state": "none", "lag_bytes": None, "lag_s": None,
                        "rpo_budget_s": 5.0},
        "protection": protection, "protection_reason": "after failover: pg-b (dr) serves alone",
        "notes": [], "checked_at": 1000.0,
    }
    return {**base, **kw}


# -- pure: what to show -----------------------------------------------------------------------


def test_fold_keeps_history_and_pending_approvals() -> None:
    fb = "flow:failback/11111111-2222-3333-4444-555555555555"
    h: dict[str, view.GroupHistory] = {}
    view.fold(h, [
        _rec(1, "failover.start", outcome="started"),
        _rec(2, "failover.finish", params={"rto_s": 4.2, "rpo_s": 0.0, "rpo_bytes": 0,
                                           "trigger": {"x": 1}}, reason="failed over"),
        _rec(3, "reprotect.finish", params={"reprotect_s": 9.5},
             actor="flow:reprotect/local"),
        _rec(4, "failback.request approval in Slack", actor=fb,
             params={"approvers": ["U0ONCALL1"], "approvals_required": 1, "started_seq": 3,
                     "result": {"message_ts": "1700000000.000100"}}),
        _rec(5, "failback.wait for approval", actor=fb, outcome="started",
             params={"timeout_s": 60}),
        _rec(6, "slack.approval", actor="gateway"),  # not a runbook's: ignored
        _rec(7, "failover.finish", target="g2", params={"rto_s": 3.0}),
    ])
    g1 = h["g1"]
    assert [e.runbook for e in g1.entries] == ["failover", "reprotect"]
    assert g1.entries[0].run_id == RUN and g1.entries[1].run_id is None
    assert g1.entries[0].figures == {"rto_s": 4.2, "rpo_s": 0.0, "rpo_bytes": 0}
    (p,) = g1.pending.values()
    assert (p.approvers, p.message_ts, p.run_id) == (
        ["U0ONCALL1"], "1700000000.000100", "11111111-2222-3333-4444-555555555555")
    # The wait's closing record names its started seq: nothing is pending any more.
    view.fold(h, [_rec(8, "failback.wait for approval", actor=fb, outcome="refused",
                       params={"started_seq": 5})])
    assert g1.pending == {}
    # A run that finishes waits for nobody, even without the step's closing record.
    view.fold(h, [_rec(9, "failback.wait for approval", actor=fb, outcome="started"),
                  _rec(10, "failback.finish", actor=fb, outcome="expired")])
    assert g1.pending == {} and g1.entries[-1].outcome == "expired"
    assert list(h) == ["g1", "g2"]


def test_links() -> None:
    assert view.prefect_ui_url({"PREFECT_API_URL": "http://h:4200/api"}) == "http://h:4200"
    assert view.prefect_ui_url({"PREFECT_UI_URL": "https://ui/", "PREFECT_API_URL": "x"}) == \
        "https://ui"
    assert view.prefect_ui_url({}) is None
    assert view.run_links(UI, RUN) == {"run": f"{UI}/runs/flow-run/{RUN}",
                                       "report": f"{UI}/runs/flow-run/{RUN}?tab=Artifacts"}
    assert view.run_links(None, RUN) == {} and view.run_links(UI, None) == {}
    assert view.slack_link("C0123ABCD", "1700000000.000100") == \
        "https://slack.com/archives/C0123ABCD/p1700000000000100"
    assert view.slack_link("#oncall", "1.2") is None and view.slack_link("C0123ABCD", None) is None


def test_checked_age_and_staleness() -> None:
    assert view.checked({"checked_at": 1000.0}, 1002.0) == {
        "age_s": 2.0, "stale": False, "label": "checked 2.00 s ago", "at": view.short_time(1000.0)}
    old = view.checked({"checked_at": 1000.0}, 1060.0)
    assert old["stale"] and "OLD" in old["label"]
    # The ISO form with the age the status computed itself wins over our clock.
    iso = view.checked({"checked_at": "2026-11-24T10:00:00+00:00", "age_s": 0.4}, 0.0)
    assert iso["age_s"] == 0.4 and not iso["stale"]
    said = view.checked({"checked_at": "2026-11-24T10:00:00+00:00", "age_s": 4.0, "stale": True}, 0)
    assert said["stale"] and said["label"] == "checked 4.00 s ago — OLD"
    assert view.checked({"checked_at": "2026-11-24T10:00:00Z"}, 1.8e9)["stale"]
    assert view.checked({}, 5.0) == {"age_s": None, "label": "never checked", "stale": True}


def test_replication_against_the_rpo_budget() -> None:
    ok = view.replication_row({"configured": "sync", "state": "sync", "lag_s": None,
                               "lag_bytes": 0, "rpo_budget_s": 5})
    assert ok["label"] == "sync, caught up" and not ok["over_budget"]
    late = view.replication_row({"configured": "sync", "state": "async", "lag_s": 7.5,
                                 "lag_bytes": 4096, "rpo_budget_s": 5})
    assert late["over_budget"] and late["label"] == \
        "async (configured sync), 7.50 s behind (4.0 KiB)"
    assert view.replication_row(None) == {"label": "unknown", "over_budget": False}


def test_group_card_after_a_failover_with_a_pending_approval() -> None:
    h: dict[str, view.GroupHistory] = {}
    view.fold(h, [
        _rec(1, "failover.finish", params={"rto_s": 4.2, "rpo_s": 0.0}),
        _rec(2, "failback.wait for approval", outcome="started",
             actor="flow:failback/abc"),
    ])
    entry = {
        "auto_failover": True, "primary": "pg-b", "primary_heartbeat_age_s": 0.3,
        "agents": [{"agent_id": "pg-b", "role": "primary", "heartbeat_age_s": 0.3},
                   {"agent_id": "pg-a", "role": "unknown", "heartbeat_age_s": 42.0}],
        "open_incident": {"idempotency_key": "k", "kind": "primary_lost", "status": "running",
                          "run_id": RUN, "reason": "host down",
                          "first_failure_at": "2026-11-24T10:00:00+00:00", "error": None},
        "leases": {"etcd": "reachable", "leader_holder": "pg-b",
                   "sync": {"primary": "pg-b", "standby": None}},
        "status": _status("unprotected"),
    }
    card = view.group_card("g1", entry, h.get("g1"), 1001.0, ui=UI, approvers=["U0ONCALL1",
                           "U0ONCALL2"], approvals_required=2, slack_channel="#oncall")
    assert (card["protection"], card["protection_word"]) == ("unprotected", "UNPROTECTED")
    assert card["serving"] == "pg-b at dr (away from home (prod))"
    assert card["replication"]["label"] == "none (configured sync)"
    assert [hb["late"] for hb in card["heartbeats"]] == [False, True]
    assert card["leases"] == {"holder": "pg-b", "sync_standby": "none", "etcd": "reachable",
                              "error": None}
    assert card["incident"]["links"]["run"] == f"{UI}/runs/flow-run/{RUN}"
    (ap,) = card["approvals"]
    # Who may approve: the config's approvers when the request did not say.
    assert ap["who"] == "U0ONCALL1, U0ONCALL2" and ap["required"] == 2 and ap["slack"] is None
    assert ap["what"] == "failback approval"
    # Past its timeout (plus a grace), a run that never closed its wait waits for nobody.
    view.fold(h, [_rec(3, "failback.wait for approval", outcome="started", target="g3",
                       actor="flow:failback/old", params={"timeout_s": 60},
                       at="2026-11-24T10:00:00+00:00")])
    t0 = view.epoch("2026-11-24T10:00:00+00:00") or 0.0
    assert len(view.group_card("g3", entry, h["g3"], t0 + 100)["approvals"]) == 1
    assert view.group_card("g3", entry, h["g3"], t0 + 121)["approvals"] == []
    assert card["last"]["failover"].endswith("RTO 4.20 s, RPO 0.00 s")
    assert card["checked"]["age_s"] == 1.0


def test_group_card_without_status() -> None:
    card = view.group_card("g2", {"agents": []}, None, 0.0)
    assert card["protection"] == "unknown" and "no status yet" in card["reason"]
    assert card["checked"]["stale"] and card["approvals"] == [] and card["last"] == {}
    err = view.group_card("g2", {"status": {"error": "TimeoutError: x"}}, None, 0.0)
    assert err["reason"] == "TimeoutError: x"


def test_history_rows_and_chart_series() -> None:
    h: dict[str, view.GroupHistory] = {}
    view.fold(h, [
        _rec(1, "drill.finish", params={"rto_s": 12.0, "rpo_s": 0.5},
             at="2026-11-24T09:00:00+00:00", actor="flow:drill/d1"),
        _rec(2, "failover.finish", params={"rto_s": 4.2, "rpo_s": 0.0, "rpo_bytes": 0},
             at="2026-11-24T10:00:00+00:00"),
        _rec(3, "reprotect.finish", params={"reprotect_s": 9.5}, actor="flow:reprotect/r1",
             at="2026-11-24T10:01:00+00:00"),
        _rec(4, "failover.finish", outcome="failed", params={}, at="2026-11-24T11:00:00+00:00"),
    ])
    rows = view.history_rows(h["g1"], UI)
    assert [r["runbook"] for r in rows] == ["failover", "reprotect", "failover", "drill"]
    assert rows[2]["figures"] == ["RTO 4.20 s", "RPO 0.00 s", "RPO 0 B"]
    assert rows[1]["figures"] == ["re-protect 9.50 s"]
    assert rows[0]["ok"] is False and rows[2]["links"]["report"].endswith("?tab=Artifacts")
    chart = view.chart_series(h["g1"])
    # The failed failover measured nothing: no point.
    assert chart["rto_s"] == [12.0, 4.2] and chart["rpo_s"] == [0.5, 0.0]
    assert chart["failover"] == [0.0, 1.0]
    assert chart["t"] == [view.epoch("2026-11-24T09:00:00Z"), view.epoch("2026-11-24T10:00:00Z")]
    assert view.chart_series(None) == {"t": [], "rto_s": [], "rpo_s": [], "failover": []}


def test_headlines_written_for_slack_read_as_plain_text() -> None:
    assert view.plain("✅ *orders* failed over to orders-dr: RTO 3.5 s") == \
        "orders failed over to orders-dr: RTO 3.5 s"
    assert view.plain("⚠️ *orders*: failback expired") == "orders: failback expired"
    assert view.plain("(no emoji) 2*3*4") == "(no emoji) 2*3*4"


def test_verify_row_and_formatting() -> None:
    ok = VerifyResult(ok=True, checked=12, head_seq=12, head_hash="ab" * 32)
    assert view.verify_row(ok, 100.0, 103.0)["label"].startswith("audit trail intact: 12 records")
    bad = VerifyResult(ok=False, checked=3, first_bad_seq=3, problem="altered")
    assert view.verify_row(bad, None, 0.0)["state"] == "failed"
    assert view.verify_row(None, None, 0.0)["state"] == "pending"
    assert view.verify_row(None, None, 0.0, "OSError: gone")["state"] == "error"
    assert [view.seconds(v) for v in (0.123, 42.0, 300, None)] == \
        ["0.12 s", "42.0 s", "5 min 0 s", "—"]
    assert [view.size(v) for v in (10, 2048, 3 << 20, None)] == ["10 B", "2.0 KiB", "3.0 MiB", "—"]
    assert view.overview([{"protection": "protected"}, {"protection": "protected"},
                          {"protection": "degraded"}]) == {"protected": 2, "degraded": 1}


# -- served by a gateway ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    groups: dict[str, dict[str, Any]]
    taken_at: float = 0.0
    gateway: dict[str, Any] = field(default_factory=dict)


class StatusStub:
    """Stands in for GroupStatusProvider (which probes real databases): its last refresh only,
    as `latest()` (refreshed in the background) and as `snapshot()` (refreshed on demand)."""

    interval_s = 2.0

    def __init__(self, status: dict[str, dict[str, Any]]) -> None:
        self.status = status

    async def start(self, gateway: Any = None, first_within_s: float = 5.0) -> None:
        """Nothing to refresh: the status is the test's."""

    async def stop(self) -> None:
        pass

    def latest(self) -> Snapshot:
        return Snapshot(self.status, time.time())

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.status


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, AuditStore]]:
    monkeypatch.setenv("PREFECT_API_URL", f"{UI}/api")
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    store = open_store(f"sqlite:///{tmp_path / 'audit.db'}")
    store.append(f"flow:failover/{RUN}", "failover.finish", "g1",
                 {"rto_s": 4.2, "rpo_s": 0.0, "rpo_bytes": 0}, "ok", reason="failed over")
    fb = "flow:failback/11111111-2222-3333-4444-555555555555"
    store.append(fb, "failback.request approval in Slack", "g1",
                 {"approvers": ["U0ONCALL1"], "result": {"message_ts": "1.2"}}, "ok")
    store.append(fb, "failback.wait for approval", "g1", {"timeout_s": 60}, "started")
    settings = make_settings(tmp_path / "gw.sqlite")
    app = create_app(settings, RecordingStarter(), store)
    app.state.group_status = StatusStub(
        {"g1": _status("unprotected", checked_at=datetime.now(UTC).isoformat())})
    try:
        with serve_app(app) as url:
            yield url, store
    finally:
        store.close()


def test_console_pages_json_and_static_files_are_served(served: tuple[str, AuditStore]) -> None:
    url, store = served
    page = httpx.get(f"{url}/console", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "UNPROTECTED" in page.text and 'href="/console/groups/g1"' in page.text
    assert "/console/static/uPlot.iife.min.js" in page.text
    assert "failbacks go through approvals in Slack" in page.text  # read-only footer
    assert page.headers["cache-control"] == "no-store"
    assert "<form" not in page.text and 'method="post"' not in page.text.lower()

    data = httpx.get(f"{url}/console/api/groups", timeout=5).json()
    cards = {c["group"]: c for c in data["groups"]}
    assert set(cards) == {"g1", "g2"}
    g1 = cards["g1"]
    assert g1["protection"] == "unprotected" and not g1["checked"]["stale"]
    assert g1["approvals"][0]["approvers"] == ["U0ONCALL1"]
    assert g1["last"]["failover"].endswith("RTO 4.20 s, RPO 0.00 s")
    assert cards["g2"]["protection"] == "unknown"  # the stub knows no status for it
    assert 'data-protection="unprotected"' in data["html"]

    detail = httpx.get(f"{url}/console/api/groups/g1", timeout=5).json()
    assert detail["chart"]["rto_s"] == [4.2] and detail["chart"]["rpo_s"] == [0.0]
    assert detail["history"][0]["links"]["run"] == f"{UI}/runs/flow-run/{RUN}"
    assert f"{UI}/runs/flow-run/{RUN}?tab=Artifacts" in detail["history_html"]
    html = httpx.get(f"{url}/console/groups/g1", timeout=5)
    assert html.status_code == 200 and 'id="chart-rto"' in html.text
    assert 'data-api="/console/api/groups/g1"' in html.text

    # The trail is verified off the event loop; a later poll shows the result.
    def verified() -> dict[str, Any]:
        return dict(httpx.get(f"{url}/console/api/groups", timeout=5).json()["audit"])

    deadline = time.monotonic() + 5
    while (audit := verified())["state"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert audit["state"] == "ok" and "3 records" in audit["label"], audit

    # New records show at the next poll: the history is read incrementally.
    store.append("flow:failback/11111111-2222-3333-4444-555555555555",
                 "failback.wait for approval", "g1", {"started_seq": 3}, "refused")
    time.sleep(0.6)
    g1 = next(c for c in httpx.get(f"{url}/console/api/groups", timeout=5).json()["groups"]
              if c["group"] == "g1")
    assert g1["approvals"] == []

    assert httpx.get(f"{url}/console/groups/nope", timeout=5).status_code == 404
    assert httpx.get(f"{url}/console/api/groups/nope", timeout=5).status_code == 404
    vendored = Path(__file__).parents[1] / "orchestrator" / "gateway" / "console_static"
    for name, kind in (("uPlot.iife.min.js", "text/javascript"), ("uPlot.min.css", "text/css"),
                       ("console.js", "text/javascript"), ("uPlot.LICENSE", "text/plain")):
        r = httpx.get(f"{url}/console/static/{name}", timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert r.content == (vendored / name).read_bytes()
    for bad in ("nope.js", "..%2Fconsole.py", "uPlot.VERSION"):
        assert httpx.get(f"{url}/console/static/{bad}", timeout=5).status_code == 404
