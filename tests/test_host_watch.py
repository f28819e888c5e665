"""The host watch: a primary's ESXi host lost to vCenter while the VM serves is an alert (Slack,
audit), not a failover.

The decision at its edges, the watcher against a vCenter that hangs (the event loop keeps
running), and the lab: real agents, the gateway (`drflow gateway`), vcsim's management-network
loss, PostgreSQL, the Slack stand-in.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import SecretStr

from lab import faults
from lab.harness import takes_write
from lab.slack_standin import SlackLab
from orchestrator.gateway.contracts import Alert
from orchestrator.gateway.decide import Role
from orchestrator.gateway.heartbeats import HeartbeatTracker
from orchestrator.gateway.host_watch import HostWatcher, VmRead
from orchestrator.gateway.host_watch_decide import (
    HOST_UNREACHABLE,
    VCENTER_UNREACHABLE,
    Observed,
    Verdict,
    judge,
)
from orchestrator.gateway.replication import ReplicationEvidence
from orchestrator.gateway.settings import GatewaySettings, GroupNode, GroupPolicy, GroupRoster
from tasks.vsphere import VCenter
from tests.harness import Env, start_env, stop_env, wait_for

NOT_RESPONDING_AFTER = 1.0
WATCH_EVERY_S = 5.0  # the gateway's default


def _obs(**kw: Any) -> Verdict:
    base: dict[str, Any] = dict(group="orders", vm="orders-prod", vcenter="of site prod",
                                heartbeat_timeout_s=3.0, heartbeat_age_s=0.4, host="esx-1",
                                host_state="connected", vm_state="connected")
    return judge(Observed(**{**base, **kw}))  # type: ignore[arg-type]


# -- the decision ---------------------------------------------------------------------------------


def test_connected_host_is_no_news() -> None:
    v = _obs()
    assert v.kind is None and v.healthy


def test_host_not_responding_with_fresh_heartbeats_alerts_management_network() -> None:
    v = _obs(host_state="notResponding", vm_state="disconnected", db_primary_age_s=0.7)
    assert v.kind == HOST_UNREACHABLE and not v.healthy
    for words in ("host esx-1", "orders-prod", "notResponding", "heartbeats (0.4 s ago)",
                  "PostgreSQL serving", "management network", "no failover",
                  "cannot power-off-fence"):
        assert words in v.reason, words
    assert _obs(host_state="disconnected").kind == HOST_UNREACHABLE


def test_host_not_responding_with_stale_heartbeats_is_left_to_the_failover_paths() -> None:
    at_timeout = _obs(host_state="notResponding", heartbeat_age_s=3.0)
    assert at_timeout.kind is None and not at_timeout.healthy
    assert "heartbeat and lease paths" in at_timeout.reason
    assert _obs(host_state="notResponding", heartbeat_age_s=2.99).kind == HOST_UNREACHABLE
    assert _obs(host_state="notResponding", heartbeat_age_s=None).kind is None


def test_unreachable_vcenter_is_its_own_alert() -> None:
    v = _obs(host=None, host_state=None, vm_state=None, error="no answer within 8 s")
    assert v.kind == VCENTER_UNREACHABLE and not v.healthy
    assert "does not answer (no answer within 8 s)" in v.reason and "check vCenter" in v.reason
    silent = _obs(host=None, host_state=None, vm_state=None, error="x", heartbeat_age_s=10.0)
    assert silent.kind == VCENTER_UNREACHABLE and "lease only" in silent.reason


def test_a_vm_vcenter_does_not_know_is_no_alert() -> None:
    v = _obs(host=None, host_state=None, vm_state=None, vm_missing=True)
    assert v.kind is None and not v.healthy


# -- the watcher, with a vCenter that hangs --------------------------------------------------------


@dataclass
class _Gateway:
    settings: GatewaySettings
    tracker: HeartbeatTracker = field(default_factory=HeartbeatTracker)
    replication: ReplicationEvidence = field(default_factory=ReplicationEvidence)
    alerts: list[Alert] = field(default_factory=list)
    records: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)

    def _raise_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def in_state(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    def _record(self, action: str, target: str, parameters: dict[str, Any], outcome: str,
                reason: str) -> None:
        self.records.append((action, parameters, outcome))


class _Reader:
    """Stands in for a site's vCenter: answers `state`, or hangs while `hang` is set."""

    label = "of site prod (stub)"

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.release = threading.Event()
        self.state = "connected"

    def read(self, names: list[str]) -> dict[str, VmRead]:
        if self.hang.is_set():
            self.release.wait(10)
        return {n: VmRead(host="esx-1", host_state=self.state, vm_state="connected") for n in names}

    def drop(self) -> None:
        pass


def test_watcher_alerts_recovers_and_never_holds_the_loop() -> None:
    settings = GatewaySettings(
        webhook_secret=SecretStr("x" * 32), state_path="/nonexistent/state.db",
        groups={"orders": GroupPolicy()},
        rosters={"orders": GroupRoster(primary=GroupNode(site="prod", vm="orders-prod",
                                                         host="10.0.0.1", port=5432))})
    gw = _Gateway(settings)
    gw.tracker.heartbeat("orders", "orders-prod", None)
    gw.tracker.set_role_claim("orders", "orders-prod", Role.PRIMARY)
    watcher = HostWatcher({"prod": VCenter("http://127.0.0.1:1/sdk", "u", SecretStr("p"))},
                          interval_s=0.2, read_timeout_s=0.3)
    reader = _Reader()
    watcher.readers["prod"] = reader  # type: ignore[assignment]

    async def scenario() -> float:
        worst = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal worst
            while not stop.is_set():
                t = time.monotonic()
                await asyncio.sleep(0.01)
                worst = max(worst, time.monotonic() - t)

        tick = asyncio.create_task(ticker())
        reader.state = "notResponding"
        await watcher.round(gw)  # type: ignore[arg-type]
        gw.tracker.heartbeat("orders", "orders-prod", None)
        reader.state = "connected"
        reader.hang.set()
        await watcher.round(gw)  # type: ignore[arg-type]  # times out: vCenter unreachable
        await watcher.round(gw)  # type: ignore[arg-type]  # the hung read is still running
        reader.hang.clear()
        reader.release.set()
        await asyncio.sleep(0.1)
        await watcher.round(gw)  # type: ignore[arg-type]  # answers again: recovered
        stop.set()
        await tick
        return worst

    worst = asyncio.run(scenario())
    kinds = [a.kind for a in gw.alerts]
    assert kinds == [HOST_UNREACHABLE, VCENTER_UNREACHABLE, VCENTER_UNREACHABLE], kinds
    assert "no answer within 0.3 s" in gw.alerts[1].reason
    assert "previous read has not ended" in gw.alerts[2].reason
    assert gw.records == [("incident.alert", {"kind": VCENTER_UNREACHABLE,
                                              "agent_id": "orders-prod", "recovered": True},
                           "recovered")]
    assert worst < 0.1, f"the event loop was held {worst:.3f} s"


# -- the lab ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(prefect_api: str) -> Iterator[Env]:
    e = start_env(groups=1, replication="sync")
    try:
        yield e
    finally:
        faults.heal(e.lab_dir)
        stop_env(e)


@pytest.mark.lab
def test_management_network_loss_alerts_in_slack_and_does_not_fail_over(env: Env) -> None:
    g = env.state["groups"][0]
    name, primary = g["name"], g["primary"]
    slack = SlackLab(env.state["slack"]["url"])
    channel = env.state["slack"]["channel"]

    def alerted() -> list[Any]:
        return [r for r in env.audit_records("incident.alert", name)
                if r.outcome == "alerted" and r.parameters.get("kind") == HOST_UNREACHABLE]

    assert alerted() == []
    f = faults.fail(env.lab_dir, "mgmt-loss", primary["vm"],
                    not_responding_after=NOT_RESPONDING_AFTER)
    try:
        rec = wait_for(alerted, NOT_RESPONDING_AFTER + WATCH_EVERY_S + 8,
                       "a host_unreachable alert in the audit trail")[0]
        took = time.time() - f.at
        print(f"alerted {took:.1f} s after the fault: {rec.reason}")
        assert rec.parameters["agent_id"] == primary["vm"]
        assert "management network" in rec.reason and "no failover" in rec.reason
        msg = slack.wait_for_message(
            lambda m: "host unreachable" in m.get("text", "") and primary["vm"] in m["text"],
            timeout=10)
        assert any(m.get("ts") == msg.get("ts") for m in slack.messages(channel))
        assert "management network" in msg["text"]
        assert env.audit_records("failover.start", name) == []
        assert env.groups_status()[name]["open_incident"] is None
        assert takes_write(env, primary)
    finally:
        faults.heal(env.lab_dir)
    recovered = wait_for(lambda: [r for r in env.audit_records("incident.alert", name)
                                  if r.outcome == "recovered"], WATCH_EVERY_S + 8,
                         "the alert's recovery in the audit trail")
    assert recovered[0].parameters["kind"] == HOST_UNREACHABLE
    assert env.audit_records("failover.start", name) == []
    assert len(alerted()) == 1
