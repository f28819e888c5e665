"""Status that is never stale: the background refresh (a node that hangs does not hold the others
up, a snapshot is never older than the interval plus a second while polled), ISO times and ages,
approvals pending in the audit trail, and `drflow status`' freshness lines. No lab: the probes
are stand-ins, the configuration points at nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from drflow.audit import open_store
from drflow.config import DrflowConfig, GroupConfig, NodeConfig, parse_config
from orchestrator.gateway.status import (
    AuditDigest,
    GroupStatusProvider,
    NodeState,
    Replica,
    aged,
    epoch,
    is_stale,
    iso,
    pending_approvals,
    with_read_age,
)
from orchestrator.status_cli import age_text, freshness_lines, with_ages

HEAD = """\
sites:
  prod:
    vcenter: {url: "http://127.0.0.1:9/sdk", datacenter: prod, username: drflow,
              password: {ref: "env:DRFLOW_TEST_VC_PASSWORD"}}
  dr:
    vcenter: {url: "http://127.0.0.1:9/sdk", datacenter: dr, username: drflow,
              password: {ref: "env:DRFLOW_TEST_VC_PASSWORD"}}
slack:
  api_url: "http://127.0.0.1:9/api/"
  channel: C0DRFLOW1
  bot_token: {ref: "env:SLACK_BOT_TOKEN"}
  signing_secret: {ref: "env:DRFLOW_TEST_SLACK_SIGNING"}
audit:
  url: "sqlite:///AUDIT"
gateway:
  listen: "127.0.0.1:8088"
  webhook_secret: {ref: "env:DRFLOW_WEBHOOK_SECRET"}
groups:
"""


def group_yaml(name: str, port: int) -> str:
    return f"""\
  - name: {name}
    replication: sync
    rpo_budget_s: 5
    database: {{name: postgres, user: drflow, password: {{ref: "env:DRFLOW_TEST_DB_PASSWORD"}}}}
    primary: {{site: prod, vm: {name}-prod, host: 127.0.0.1, port: {port}}}
    standby: {{site: dr, vm: {name}-dr, host: 127.0.0.1, port: {port + 1}}}
    dns: {{zone_id: Z123, record: {name}.db.lab.drflow.internal., ttl: 30}}
    policy: {{auto_failover: true}}
"""


def config(tmp: Path, groups: list[str]) -> DrflowConfig:
    text = HEAD.replace("AUDIT", str(tmp / "audit.db"))
    return parse_config(text + "".join(group_yaml(g, 5500 + 2 * i) for i, g in enumerate(groups)))


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DRFLOW_WEBHOOK_SECRET", "DRFLOW_TEST_VC_PASSWORD", "SLACK_BOT_TOKEN",
                 "DRFLOW_TEST_SLACK_SIGNING", "DRFLOW_TEST_DB_PASSWORD"):
        monkeypatch.setenv(name, f"test-{name.lower()}")


class StandInProvider(GroupStatusProvider):
    """Probes answer at once as a healthy sync pair, except the nodes in `hang`, which hang
    until released (a node that went silent); `serving` says which site is the primary."""

    def __init__(self, cfg: DrflowConfig, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.hang: set[str] = set()
        self.release = threading.Event()
        self.serving = "prod"
        self.calls: dict[str, int] = {}

    def _probe(self, g: GroupConfig, n: NodeConfig) -> NodeState:
        self.calls[n.vm] = self.calls.get(n.vm, 0) + 1
        if n.vm in self.hang:
            self.release.wait(30)
        if n.site == self.serving:
            return NodeState(n.site, n.vm, f"{n.host}:{n.port}", "primary",
                             replicas=(Replica("x", "streaming", "sync", 0, None),))
        return NodeState(n.site, n.vm, f"{n.host}:{n.port}", "standby", receiver="streaming")


# -- pure ----------------------------------------------------------------------------------------


def test_times_are_iso_utc_and_ages_are_computed_when_asked() -> None:
    t = datetime(2026, 12, 4, 5, 21, 3, 123000, tzinfo=UTC).timestamp()
    assert iso(t) == "2026-12-04T05:21:03.123+00:00"
    assert epoch(iso(t)) == pytest.approx(t)
    assert epoch("2026-12-04T05:21:03.123456") == pytest.approx(t + 0.000456)  # naive: UTC
    assert epoch("not a time") is None and epoch(None) is None and iso(None) is None
    st = {"checked_at": iso(t), "leases": {"read_at": iso(t - 1), "leader_holder": "a"}}
    out = aged(st, t + 2.5, 2.0)
    assert out["age_s"] == 2.5 and out["stale"] is False
    assert out["leases"]["read_age_s"] == 3.5
    assert "age_s" not in st  # a copy: the snapshot is shared by every request
    assert aged(st, t + 3.2, 2.0)["stale"] is True
    assert aged({"checked_at": None}, t, 2.0) == {"checked_at": None, "age_s": None,
                                                  "stale": True}
    assert with_read_age({"read_at": None}, t)["read_age_s"] is None
    assert not is_stale(3.0, 2.0) and is_stale(3.01, 2.0) and is_stale(None, 2.0)


def test_age_text_says_stale_beyond_the_interval_plus_a_second() -> None:
    assert age_text(0.4, 2.0) == "checked 0.4 s ago"
    assert age_text(5.2, 2.0) == "checked 5.2 s ago (stale)"
    assert age_text(None, 2.0) == "never checked (stale)"
    now = time.time()
    data = {"groups": {"orders": {"checked_at": iso(now - 0.5), "refresh_interval_s": 2.0,
                                  "gateway": {"status_age_s": 5.2}}}}
    aged_data = with_ages(data, now)
    assert aged_data["groups"]["orders"]["age_s"] == pytest.approx(0.5, abs=0.01)
    [line] = freshness_lines(aged_data)
    assert line.startswith("orders: checked 0.5 s ago (") and str(iso(now - 0.5)) in line
    assert "the gateway's status [yellow]checked 5.2 s ago (stale)[/]" in line


def test_pending_approvals_come_from_wait_steps_not_closed(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        waiting = store.append("flow:failback/1", "failback.wait for approval", "orders",
                               {"timeout_s": 3600}, "started")
        # A second run, answered: its wait closed.
        done = store.append("flow:failback/2", "failback.wait for approval", "payments",
                            {"timeout_s": 3600}, "started")
        store.append("flow:failback/2", "failback.wait for approval", "payments",
                     {"timeout_s": 3600, "started_seq": done.seq}, "ok")
        # A third, that crashed while paused and was finished by its next attempt.
        store.append("flow:failover/3", "failover.wait for the attestation", "ledger",
                     {"timeout_s": 600}, "started")
        store.append("flow:failover/3", "failover.finish", "ledger", {}, "failed")
        digest = AuditDigest(store)
        digest.refresh()
        now = epoch(waiting.time) or 0.0
        [p] = pending_approvals(digest.waiting("orders"), now + 10)
        assert p["runbook"] == "failback" and p["run"] == "flow:failback/1"
        assert p["since"] == waiting.time and epoch(p["expires_at"]) == pytest.approx(now + 3600)
        assert digest.waiting("payments") == [] and digest.waiting("ledger") == []
        # Long past its timeout, the run is no longer waiting (Prefect failed it).
        assert pending_approvals(digest.waiting("orders"), now + 3600 + 31) == []
        store.append("flow:failover/4", "failover.wait for the attestation", "ledger",
                     {"timeout_s": 600}, "started")
        digest.refresh()  # reads only what is new
        [att] = pending_approvals(digest.waiting("ledger"), now)
        assert att["runbook"] == "failover"
    finally:
        store.close()


# -- the background refresh -----------------------------------------------------------------------


def test_a_node_that_hangs_does_not_hold_up_the_others(tmp_path: Path) -> None:
    p = StandInProvider(config(tmp_path, ["orders", "payments"]), answer_within_s=0.3)
    p.hang = {"orders-dr"}
    try:
        t0 = time.monotonic()
        st = p.collect(p.answer_within_s)
        assert time.monotonic() - t0 < 1.0
        assert st["payments"]["protection"] == "protected"
        orders = st["orders"]
        assert orders["protection"] == "degraded"
        assert "orders-dr (dr) is down: no answer within 0.3 s" in orders["protection_reason"]
        assert epoch(orders["checked_at"]) == pytest.approx(time.time(), abs=1)
        # Still hanging: the next refresh waits for the same probe, it does not ask again.
        p.collect(p.answer_within_s)
        assert p.calls["orders-dr"] == 1 and p.calls["payments-dr"] == 2
        p.release.set()
        time.sleep(0.1)
        assert p.collect(p.answer_within_s)["orders"]["protection"] == "protected"
    finally:
        p.release.set()


def test_the_snapshot_is_never_older_than_the_interval_plus_a_second(tmp_path: Path) -> None:
    """Polled every 50 ms for 3 s while the standby of one group goes silent and its primary
    moves (a failover): the last completed refresh is always there at once, and young."""
    interval = 0.5
    p = StandInProvider(config(tmp_path, ["orders", "payments"]), interval_s=interval,
                        answer_within_s=0.3)
    ages: list[float] = []
    waits: list[float] = []
    serving: list[str | None] = []

    async def main() -> None:
        views = 0

        async def gateway_view() -> dict[str, Any]:
            nonlocal views
            views += 1
            return {"orders": {"open_incident": None}}

        await p.start(gateway_view)
        try:
            assert p.latest() is not None  # start() returns with a first refresh done
            t_end = time.monotonic() + 3.0
            while time.monotonic() < t_end:
                if time.monotonic() > t_end - 2.0:
                    p.hang, p.serving = {"orders-prod"}, "dr"  # prod silent, dr promoted
                t = time.monotonic()
                snap = p.latest()
                waits.append(time.monotonic() - t)
                assert snap is not None
                now = time.time()
                ages.append(now - snap.taken_at)
                st = aged(snap.groups["orders"], now, interval)
                assert st["age_s"] == pytest.approx(ages[-1], abs=0.01)
                serving.append((st["serving"] or {}).get("site"))
                await asyncio.sleep(0.05)
        finally:
            await p.stop()
            p.release.set()
        assert views >= 4 and p.latest() is not None and p.latest().gateway  # type: ignore[union-attr]

    asyncio.run(main())
    assert max(ages) <= interval + 1.0, ages
    assert max(waits) < 0.01
    assert serving[0] == "prod" and serving[-1] == "dr"


def test_a_refresh_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Every probe hangs: a ticker on the loop keeps ticking meanwhile."""
    p = StandInProvider(config(tmp_path, ["orders"]), interval_s=0.2, answer_within_s=0.5)
    p.hang = {"orders-prod", "orders-dr"}
    gaps: list[float] = []

    async def main() -> None:
        await p.start()
        try:
            last = time.monotonic()
            for _ in range(30):
                await asyncio.sleep(0.02)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()
        finally:
            await p.stop()
            p.release.set()

    asyncio.run(main())
    assert max(gaps) < 0.2, gaps
    snap = p.latest()
    assert snap is not None and snap.groups["orders"]["protection"] == "degraded"
