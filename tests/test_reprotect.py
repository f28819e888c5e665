"""Re-protect: the pure decisions, then on a lab of its own (real agents, vcsim, PostgreSQL, moto,
Slack stand-in, Prefect): a diverged old primary fenced and rewound, a lost one rebuilt by base
backup, and the agent's boot check talking to a real gateway that starts re-protect itself."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from pydantic import SecretStr

from agents.boot import (
    BootDecision,
    BootGate,
    LocalState,
    PeerCheck,
    RolesUnavailable,
    decide_boot,
    fetch_roles,
    guard_peer,
    my_site,
    peer_node,
    roles_url,
)
from drflow.config import load_config
from drflow.control import ControlClient
from drflow.events import HealthEvent
from drflow.signing import sign_headers
from flows.decisions import AppCheck
from flows.reprotect import plan_target, restore_sync, rewind_reason, serving_side
from lab import manager, netns, vcsim
from lab import postgres as lp
from orchestrator.gateway.roles_decide import (
    BOOT_HELD,
    BOOT_SECOND_PRIMARY,
    ProtectAction,
    RolesRecord,
    RolesUpdate,
    after_failover,
    after_reprotect_failed,
    apply_update,
    decide_protection,
    stale_record,
)
from orchestrator.gateway.settings import GroupNode, GroupRoster
from tests.conftest import new_lab_dir, tracked_gate
from tests.harness import wait_for

EXAMPLE = load_config(Path(__file__).parents[1] / "examples" / "drflow.yaml")


# -- pure decisions ---------------------------------------------------------------------------

W = AppCheck(True, True, "answers as a writable primary")
RO = AppCheck(True, False, "answers, but in recovery or read-only")
DOWN = AppCheck(False, False, "connection refused")


def test_serving_side_follows_writes_and_dns() -> None:
    g = EXAMPLE.groups[0]
    home, dr = (g.primary.host, g.primary.port), (g.standby.host, g.standby.port)
    s = serving_side(g, dr, DOWN, W)
    assert s.decision.proceed and s.primary is g.standby and s.other is g.primary
    lagging = serving_side(g, home, DOWN, W)
    assert lagging.primary is g.standby and "DNS lags" in lagging.decision.reason
    both = serving_side(g, dr, W, W)
    assert both.primary is g.standby and "second writable primary" in both.decision.reason
    assert not serving_side(g, None, W, W).decision.proceed
    assert not serving_side(g, dr, RO, DOWN).decision.proceed


def test_plan_target() -> None:
    g = EXAMPLE.groups[0]
    up = f"{g.standby.host}:{g.standby.port}"
    streaming = {"running": True, "role": "standby", "upstream": up, "receiver": "streaming"}
    assert plan_target(g.primary, g.standby, W, {"running": True, "role": "primary"},
                       False).action == "fence"
    assert plan_target(g.primary, g.standby, DOWN, None, False).action == "unreachable"
    assert plan_target(g.primary, g.standby, RO, streaming, False).action == "none"
    assert plan_target(g.primary, g.standby, RO, streaming, True).action == "none"
    assert plan_target(g.primary, g.standby, DOWN, {"running": False}, True).action == "fence"
    stopped = plan_target(g.primary, g.standby, DOWN, {"running": False, "role": "down"}, False)
    assert stopped.action == "rewind" and "stopped" in stopped.reason


def test_restore_sync_and_rewind_reason() -> None:
    assert not restore_sync("async", "", "a").proceed
    assert restore_sync("sync", "", "orders-prod").proceed
    assert not restore_sync("sync", 'FIRST 1 ("orders-prod")', "orders-prod").proceed
    assert not restore_sync("sync", 'FIRST 1 ("orders-prod", "orders-dr")', "orders-prod").proceed
    assert restore_sync("sync", 'FIRST 1 ("orders-dr")', "orders-prod").proceed
    text = rewind_reason({"action": "rebuilt", "method": "pg_basebackup", "seconds": 1.2,
                          "reason": "pg_rewind failed: could not find WAL", "phases": {"x": 1.0}})
    assert "base backup" in text and "could not find WAL" in text


def test_roles_record_and_protection_decisions() -> None:
    rec = RolesRecord(group="g", primary_site="prod")
    moved = after_failover(rec, "dr", "failover g:1", 1.0)
    assert (moved.primary_site, moved.protected, moved.seq) == ("dr", False, 1)

    def decide(r: RolesRecord, site: str | None, report: str | None = None,
               incident: bool = False) -> Any:
        return decide_protection(r, agent_id="a", agent_site=site, report=report,
                                 incident_open=incident)

    assert decide(moved, None).action is ProtectAction.NONE
    assert decide(moved, "dr").action is ProtectAction.NONE
    d = decide(moved, "prod", BOOT_HELD)
    assert d.action is ProtectAction.REPROTECT and d.key == "reprotect:g:1"
    assert decide(moved, "prod", incident=True).action is ProtectAction.NONE
    started = moved.model_copy(update={"reprotect_key": "reprotect:g:1"})
    assert decide(started, "prod").action is ProtectAction.NONE
    done = apply_update(started, RolesUpdate(protected=True), 2.0)
    assert decide(done, "prod").action is ProtectAction.NONE
    held = decide(done, "prod", BOOT_HELD)  # a would-be primary is no standby
    assert held.action is ProtectAction.REPROTECT and held.key == "reprotect:g:2"
    second = decide(done, "prod", BOOT_SECOND_PRIMARY)
    assert second.action is ProtectAction.FENCE_AND_REPROTECT and second.key == "reprotect:g:2"
    moving = apply_update(moved, RolesUpdate(transition="failback"), 3.0)
    assert decide(moving, "prod").action is ProtectAction.NONE
    assert apply_update(moving, RolesUpdate(transition="none"), 4.0).transition is None


def test_a_failed_reprotect_is_tried_again_after_a_back_off(tmp_path: Path) -> None:
    def decide(r: RolesRecord, now: float, report: str | None = None) -> Any:
        return decide_protection(r, agent_id="a", agent_site="prod", report=report,
                                 incident_open=False, now=now)

    moved = after_failover(RolesRecord(group="g", primary_site="prod"), "dr", "failover", 1.0)
    started = moved.model_copy(update={"reprotect_key": "reprotect:g:1"})
    assert decide(started, 50.0).action is ProtectAction.NONE  # one run per attempt
    failed = after_reprotect_failed(started, "reprotect:g:1", "failed", 100.0)
    assert failed is not None and failed.reprotect_failures == 1
    assert failed.reprotect_retry_at == 130.0 and "after 30 s" in failed.reason
    wait = decide(failed, 110.0)
    assert wait.action is ProtectAction.NONE and "next attempt in 20 s" in wait.reason
    again = decide(failed, 131.0)
    assert again.action is ProtectAction.REPROTECT and again.key == "reprotect:g:1.1"
    # A second primary is fenced at once, back-off or not.
    urgent = decide(failed, 110.0, BOOT_SECOND_PRIMARY)
    assert urgent.action is ProtectAction.FENCE_AND_REPROTECT and urgent.key == "reprotect:g:1.1"
    retried = failed.model_copy(update={"reprotect_key": "reprotect:g:1.1"})
    # Only the generation's current run counts: a late report of the first attempt changes
    # nothing; the second failure doubles the wait.
    assert after_reprotect_failed(retried, "reprotect:g:1", "failed", 140.0) is None
    twice = after_reprotect_failed(retried, "reprotect:g:1.1", "failed", 140.0)
    assert twice is not None and twice.reprotect_retry_at == 200.0
    assert decide(twice, 201.0).key == "reprotect:g:1.2"
    # Protection restored, then lost again: a new generation starts with no failure.
    done = apply_update(twice, RolesUpdate(protected=True), 300.0)
    assert after_reprotect_failed(done, "reprotect:g:1.1", "failed", 301.0) is None
    lost = apply_update(done, RolesUpdate(protected=False), 400.0)
    assert (lost.seq, lost.reprotect_failures, lost.reprotect_key) == (2, 0, None)
    assert decide(lost, 400.0).key == "reprotect:g:2"

    # The gateway's side: the end of a run, reported by the starter's thread, is stored and
    # audited; a protected outcome changes nothing.
    from drflow.audit import open_store
    from orchestrator.gateway.roles import RolesService
    from orchestrator.gateway.settings import GatewaySettings

    audit = open_store(f"sqlite:///{tmp_path}/audit.db")
    settings = GatewaySettings(webhook_secret=SecretStr("s" * 32), state_path=tmp_path / "gw.db",
                               groups={})
    roles = RolesService(settings, gateway=None, audit=audit)  # type: ignore[arg-type]
    roles.store.change("g", lambda _: started)
    roles.reprotect_finished("g", "reprotect:g:1", "protected", "")
    assert roles.record("g").reprotect_failures == 0
    roles.reprotect_finished("g", "reprotect:g:1", "failed", "agent unreachable")
    stored = roles.record("g")
    assert stored.reprotect_failures == 1 and stored.reprotect_retry_at > time.time() + 25
    recs = [r for r in audit.records() if r.action == "roles.reprotect"]
    assert [r.outcome for r in recs] == ["retry_later"]
    assert "agent unreachable" in recs[0].reason
    roles.close()
    audit.close()


ROLES = {"group": "g", "primary_site": "dr", "in_transition": False,
         "nodes": {"prod": {"host": "127.0.0.1", "port": 5432},
                   "dr": {"host": "10.9.9.9", "port": 5432}}}


def test_failover_moves_are_absolute_and_idempotent() -> None:
    rec = RolesRecord(group="g", primary_site="prod")
    reported = apply_update(rec, RolesUpdate(primary_site="dr", protected=False,
                                             transition="none"), 1.0)
    assert (reported.primary_site, reported.protected, reported.seq) == ("dr", False, 1)
    # The gateway's close hook applies the same move after the flow's own report: no change.
    assert after_failover(reported, "dr", "failover g:1", 2.0) is reported
    again = apply_update(reported, RolesUpdate(primary_site="dr", protected=False,
                                               transition="none"), 3.0)
    assert (again.primary_site, again.seq) == ("dr", 1)
    # A failover back before any re-protect is a new generation: the other side needs its own.
    claimed = reported.model_copy(update={"reprotect_key": "reprotect:g:1"})
    back = apply_update(claimed, RolesUpdate(primary_site="prod", protected=False), 4.0)
    assert (back.primary_site, back.seq, back.reprotect_key) == ("prod", 2, None)
    # Failback home, protected: no new generation.
    home = apply_update(reported, RolesUpdate(primary_site="prod", protected=True), 5.0)
    assert (home.primary_site, home.protected, home.seq) == ("prod", True, 1)


def test_a_stale_record_is_corrected_only_by_a_held_agent_that_saw_a_writable_peer() -> None:
    roster = GroupRoster(primary=GroupNode(site="prod", vm="p", host="10.0.0.1", port=5432),
                         standby=GroupNode(site="dr", vm="d", host="10.0.1.1", port=5432))
    lost = RolesRecord(group="g", primary_site="prod")  # a gateway whose state was lost
    fixed = stale_record(lost, roster, agent_site="prod", report=BOOT_HELD, peer_writable=True)
    assert fixed is not None and (fixed.primary_site, fixed.protected) == ("dr", False)
    assert decide_protection(fixed, agent_id="p", agent_site="prod", report=BOOT_HELD,
                             incident_open=False).action is ProtectAction.REPROTECT
    for site, report, peer in (("prod", BOOT_HELD, False), ("dr", BOOT_HELD, True),
                               ("prod", "started", True)):
        assert stale_record(lost, roster, agent_site=site, report=report,
                            peer_writable=peer) is None


def test_the_boot_check_never_starts_a_primary_next_to_a_writable_peer() -> None:
    serving_here = {**ROLES, "primary_site": "prod"}  # what a stale gateway says
    down = LocalState(False, "down", False)
    d = decide_boot(serving_here, "prod", down)
    assert d.action == "start"
    assert peer_node(serving_here, "prod") == ("10.9.9.9", 5432)
    writable = PeerCheck("10.9.9.9:5432", True, True, "writable primary")
    held = guard_peer(d, down, writable)
    assert (held.action, held.report) == ("hold", BOOT_HELD) and "10.9.9.9" in held.reason
    # No evidence either way, or a standby there: the gateway's word stands.
    assert guard_peer(d, down, PeerCheck("10.9.9.9:5432", False, False, "timeout")) is d
    assert guard_peer(d, down, PeerCheck("10.9.9.9:5432", True, False, "in recovery")) is d
    # A standby (standby.signal) takes no writes: it starts whatever the peer is.
    standby = LocalState(False, "down", True)
    assert guard_peer(decide_boot(serving_here, "prod", standby), standby, writable).action \
        == "start"
    assert guard_peer(BootDecision("wait", "unsure"), down, writable).action == "wait"


@pytest.mark.parametrize(("roles", "site", "local", "action", "report"), [
    (ROLES, "prod", LocalState(False, "down", False), "hold", BOOT_HELD),
    (ROLES, "prod", LocalState(True, "primary", False), "fence", BOOT_SECOND_PRIMARY),
    (ROLES, "prod", LocalState(False, "down", True), "start", "started"),
    (ROLES, "prod", LocalState(True, "standby", True), "leave", "running"),
    (ROLES, "dr", LocalState(False, "down", False), "start", "started"),
    ({**ROLES, "in_transition": True, "incident_open": True}, "prod",
     LocalState(False, "down", False), "wait", None),
    ({**ROLES, "in_transition": True, "transition": "failback"}, "prod",
     LocalState(True, "primary", False), "wait", None),
    (None, None, LocalState(False, "down", False), "wait", None),
    (None, None, LocalState(True, "primary", False), "wait", None),
    (None, None, LocalState(False, "down", True), "start", "started"),
])
def test_decide_boot(roles: dict[str, Any] | None, site: str | None, local: LocalState,
                     action: str, report: str | None) -> None:
    d = decide_boot(roles, site, local, "gateway unreachable" if roles is None else "")
    assert (d.action, d.report) == (action, report), d.reason


def test_my_site_matches_port_on_a_local_address() -> None:
    assert my_site(ROLES, 5432, {"127.0.0.1"}) == "prod"
    assert my_site(ROLES, 5433, {"127.0.0.1"}) is None
    assert my_site(ROLES, 5432, {"10.9.9.9"}) == "dr"


# -- on a lab ---------------------------------------------------------------------------------


@dataclass
class Lab:
    dir: Path
    state: dict[str, Any]

    @property
    def config(self) -> str:
        return str(self.dir / "drflow.yaml")

    def group(self, name: str) -> dict[str, Any]:
        return next(g for g in self.state["groups"] if g["name"] == name)

    def inst(self, group: str, role: str) -> lp.Instance:
        return lp.Instance.from_dict(self.state["postgres"][group][role])

    def conn(self, node: dict[str, Any], timeout: int = 2) -> psycopg.Connection[Any]:
        db = self.state["database"]
        return psycopg.connect(host=node["host"], port=node["port"], user=db["user"],
                               password=db["password"], dbname=db["name"],
                               connect_timeout=timeout, autocommit=True)

    def control(self, node: dict[str, Any]) -> ControlClient:
        return ControlClient.for_agent(node["agent_url"],
                                       SecretStr(self.state["secrets"]["control"]), node["vm"])

    def audit(self, action: str, target: str) -> list[Any]:
        from drflow.audit import open_store

        store = open_store(f"sqlite:///{self.dir / 'audit.db'}")
        try:
            return [r for r in store.records() if r.action == action and r.target == target]
        finally:
            store.close()


@pytest.fixture(scope="module")
def lab(prefect_api: str) -> Iterator[Lab]:
    from lab import manager

    d = new_lab_dir("drflow-reprotect-")
    state = manager.up(d, groups=2, replication="sync", progress=lambda _m: None)
    try:
        yield Lab(d, state)
    finally:
        manager.down(d, progress=lambda _m: None)


def _flows() -> Any:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _fail_over_and_return(lab: Lab, group: str) -> None:
    """Host loss of the prod VM, failover, then the VM powered on again with its PostgreSQL
    running as a primary (the power bridge starts it, or the test does when the agent holds it)."""
    from flows.failover import failover

    g = lab.group(group)
    vc = lab.state["vcenter"]
    si = vcsim.connect(vc["url"], vc["user"], vc["password"])
    vcsim.power_off(si, g["primary"]["vm"])
    with _flows():
        # No gateway here, hence no heartbeat evidence of the lag: the override is the
        # audited way to say so (the gateway-driven path is in test_failback.py).
        result = failover(group, {"reason": "test host loss"}, force=True,
                          config_path=lab.config)
    assert result["outcome"] == "failed_over", result
    vcsim.power_on(si, g["primary"]["vm"])
    wait_for(lambda: _answers(lab, g["primary"]), 30, "the old primary's agent")
    inst = lab.inst(group, "primary")
    if lp.role(inst) == "down":
        # The agent's boot check holds it down (no gateway answers here): start it behind
        # drflow's back, the case re-protect must fence.
        lp.start(inst)
    wait_for(lambda: lp.role(inst) == "primary", 30, "old primary back up as a primary")


def _answers(lab: Lab, node: dict[str, Any]) -> bool:
    try:
        lab.control(node).call("status")
        return True
    except Exception:
        return False


def _diverge(lab: Lab, node: dict[str, Any], rows: int) -> None:
    with lab.conn(node) as c:
        c.execute("SET synchronous_commit = local")  # it has no standby: it is on its own
        c.execute("create table if not exists diverged (id int primary key, pad text)")
        c.execute("insert into diverged select g, repeat('x', 500) from generate_series(1, %s) g",
                  (rows,))


def _table_exists(lab: Lab, node: dict[str, Any], table: str) -> bool:
    with lab.conn(node) as c:
        return bool(c.execute("select to_regclass(%s) is not null", (table,)).fetchone()[0])  # type: ignore[index]


def _streams_in_sync(lab: Lab, primary: dict[str, Any], name: str) -> bool:
    with lab.conn(primary) as c:
        row = c.execute("select state, sync_state from pg_stat_replication "
                        "where application_name = %s", (name,)).fetchone()
    return row == ("streaming", "sync")


def test_a_diverged_old_primary_is_fenced_and_rewound(lab: Lab) -> None:
    from flows.reprotect import reprotect

    g = lab.group("orders")
    prod, dr = g["primary"], g["standby"]
    _fail_over_and_return(lab, "orders")
    _diverge(lab, prod, 200)  # writes the new primary never saw
    with _flows():
        result = reprotect("orders", {"reason": "test"}, config_path=lab.config)
    assert result["outcome"] == "protected", result
    assert result["fenced"] is True and result["rewind_method"] == "pg_rewind"
    assert result["rewind_action"] == "rewound"
    assert lp.role(lab.inst("orders", "primary")) == "standby"
    assert not _table_exists(lab, prod, "diverged"), "the diverged writes are rewound away"
    assert _streams_in_sync(lab, dr, "orders-prod")
    with lab.conn(dr) as c:
        assert c.execute("show synchronous_standby_names").fetchone() == ('FIRST 1 ("orders-prod")',)
    rewinds = [r for r in lab.audit("reprotect.rewind into a standby", "orders-prod")
               if r.outcome == "ok"]
    assert len(rewinds) == 1 and "pg_rewind" in rewinds[0].reason
    assert lab.audit("reprotect.fence the second primary", "orders-prod")[-1].outcome == "ok"
    # Idempotent: again, nothing is rewound.
    with _flows():
        again = reprotect("orders", {"reason": "test again"}, config_path=lab.config)
    assert again["outcome"] == "protected" and "rewind_method" not in again
    assert not again["sync_restored"]


def test_an_old_primary_that_cannot_be_rewound_is_rebuilt(lab: Lab) -> None:
    from flows.reprotect import reprotect

    g = lab.group("payments")
    prod = g["primary"]
    _fail_over_and_return(lab, "payments")
    _diverge(lab, prod, 50)
    # Crash it and lose its WAL: pg_rewind cannot find what to undo.
    lab.control(prod).call("stop", mode="immediate")
    inst = lab.inst("payments", "primary")
    for seg in (inst.datadir / "pg_wal").iterdir():
        if seg.is_file():
            seg.unlink()
    with _flows():
        result = reprotect("payments", {"reason": "test"}, config_path=lab.config)
    assert result["outcome"] == "protected", result
    assert result["rewind_method"] == "pg_basebackup" and result["rewind_action"] == "rebuilt"
    assert "pg_rewind failed" in result["rewind_reason"]
    rec = [r for r in lab.audit("reprotect.rewind into a standby", "payments-prod")
           if r.outcome == "ok"][-1]
    assert "base backup" in rec.reason and "pg_rewind failed" in rec.reason
    assert not _table_exists(lab, prod, "diverged")
    assert _streams_in_sync(lab, g["standby"], "payments-prod")


class AgentDriver:
    """The node's real agent, driven through its control API, as BootGate's driver (in the agent
    process the gate uses the agent's own driver object; here the test stands outside it)."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    def status(self) -> dict[str, Any]:
        return self.client.call("status")

    def start(self) -> dict[str, Any]:
        return self.client.call("start")

    def stop(self, mode: str = "fast") -> dict[str, Any]:
        return self.client.call("stop", mode=mode)


@pytest.fixture(scope="module")
def gateway(lab: Lab) -> Iterator[str]:
    """The gateway in this process, on the lab config's address (the lab's agents report there),
    starting re-protect runs itself."""
    from flows.runtime import runtime
    from orchestrator.embedded import EmbeddedStarter, ReprotectStarter
    from orchestrator.gateway import create_app
    from orchestrator.gateway.from_config import listen_address, settings_from_config

    rt = runtime(lab.config)
    starter = EmbeddedStarter(lab.config)
    app = create_app(settings_from_config(rt.cfg, lab.dir / "gateway" / "gw.db"), starter,
                     audit=rt.audit)
    starter.close = app.state.gateway.close_incident_threadsafe
    app.state.roles.starter = ReprotectStarter(lab.config,
                                               on_done=app.state.roles.reprotect_finished)
    host, port = listen_address(rt.cfg)

    def listening() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock

    # The socket is made on the orchestrator's host at the DR site (whose address the lab's
    # agents report to); this process serves it from here.
    topo = manager.topology(lab.state)
    sock = netns.call_in_host(topo, "orchestrator", listening) if topo else listening()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15, "gateway started")
    url = f"http://{host}:{port}"
    # Both groups run on dr, protected (the flows above ran while no gateway listened).
    for group in ("orders", "payments"):
        _post(lab, url, f"/v1/groups/{group}/roles",
              {"primary_site": "dr", "protected": True, "reason": "test setup"})
    # Agents whose own boot check kept asking while no gateway listened get their answer
    # within one retry (2 s), and the gateway may re-protect on it: let that settle (every
    # re-protect it started has finished) before the tests change roles under them.
    time.sleep(2.5)

    def settled() -> bool:
        for group in ("orders", "payments"):
            started = len([r for r in lab.audit("roles.reprotect", group) if r.outcome == "started"])
            if len(lab.audit("reprotect.finish", group)) < started or \
                    not _roles(url, group)["protected"]:
                return False
        return True

    wait_for(settled, 120, "re-protect runs started by the agents' first reports finished")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def _post(lab: Lab, url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    raw = json.dumps(body).encode()
    r = httpx.post(url + path, content=raw, timeout=10, headers={
        "Content-Type": "application/json",
        **sign_headers(lab.state["secrets"]["webhook"].encode(), raw)})
    assert r.status_code in (200, 202), r.text
    return r


def _roles(url: str, group: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/v1/groups/{group}/roles", timeout=5).json())


def _gate(lab: Lab, url: str, group: str, events: list[HealthEvent]) -> BootGate:
    node = lab.group(group)["primary"]

    def emit(ev: HealthEvent) -> None:
        events.append(ev)
        _post(lab, url, "/v1/events", json.loads(ev.to_json()))

    g = BootGate(agent_id=node["vm"], group=group, resource="postgres", port=node["port"],
                 host=node["host"], url=roles_url(url + "/v1/events", group),
                 secret=SecretStr(lab.state["secrets"]["webhook"]),
                 driver=AgentDriver(lab.control(node)), emit=emit, retry_s=0.5)
    return tracked_gate(g)



def test_boot_check_holds_a_would_be_primary_and_the_gateway_reprotects_it(
        lab: Lab, gateway: str) -> None:
    g = lab.group("orders")
    prod, dr = g["primary"], g["standby"]
    seq_before = _roles(gateway, "orders")["seq"]
    # The prod node becomes a would-be primary (promoted behind drflow's back, then its VM
    # rebooted: its PostgreSQL is down, without standby.signal).
    with lab.conn(prod) as c:
        c.execute("select pg_promote(true, 30)")
    _diverge(lab, prod, 20)
    lab.control(prod).call("stop", mode="immediate")
    events: list[HealthEvent] = []
    d = _gate(lab, gateway, "orders", events).start()
    assert d.action == "hold", d.reason
    assert lab.control(prod).call("status")["held_down"] is True
    assert events[-1].details["drflow_boot"] == "held_for_reprotect"
    assert events[-1].details["site"] == "prod"
    # The gateway starts re-protect on that report; it ends with the group protected again.
    roles = wait_for(lambda: (r := _roles(gateway, "orders"))["protected"] and
                     r["seq"] > seq_before and r, 120, "orders re-protected by the gateway")
    assert roles["primary_site"] == "dr" and roles["reprotect_key"] == f"reprotect:orders:{seq_before + 1}"
    assert _streams_in_sync(lab, dr, "orders-prod")
    assert not _table_exists(lab, prod, "diverged")
    # The same node rebooting now (a standby) just starts; nothing else happens.
    again = _gate(lab, gateway, "orders", []).start()
    assert again.action == "leave" and _roles(gateway, "orders")["seq"] == roles["seq"]


def test_a_second_primary_at_boot_is_stopped_then_fenced_and_reprotected(
        lab: Lab, gateway: str) -> None:
    g = lab.group("payments")
    prod, dr = g["primary"], g["standby"]
    seq_before = _roles(gateway, "payments")["seq"]
    with lab.conn(prod) as c:
        c.execute("select pg_promote(true, 30)")  # two writable primaries now
    events: list[HealthEvent] = []
    d = _gate(lab, gateway, "payments", events).start()
    assert d.action == "fence", d.reason
    assert lp.role(lab.inst("payments", "primary")) == "down"
    assert events[-1].kind.value == "resource_failed"
    assert events[-1].details["drflow_boot"] == "second_primary"
    roles = wait_for(lambda: (r := _roles(gateway, "payments"))["protected"] and
                     r["seq"] > seq_before and r, 120, "payments re-protected by the gateway")
    assert roles["reprotect_key"] == f"reprotect:payments:{seq_before + 1}"
    starts = [r for r in lab.audit("reprotect.start", "payments")
              if (r.parameters.get("trigger") or {}).get("idempotency_key") == roles["reprotect_key"]]
    assert len(starts) == 1 and starts[0].parameters["fence_first"] is True
    assert _streams_in_sync(lab, dr, "payments-prod")
    fences = lab.audit("reprotect.fence the second primary", "payments-prod")
    assert fences and fences[-1].outcome == "ok"


def test_the_roles_answer_must_be_the_gateways(lab: Lab, gateway: str) -> None:
    url = roles_url(gateway + "/v1/events", "orders")
    good = fetch_roles(url, SecretStr(lab.state["secrets"]["webhook"]))
    assert good["primary_site"] == "dr" and set(good["nodes"]) == {"prod", "dr"}
    with pytest.raises(RolesUnavailable, match="not the gateway's"):
        fetch_roles(url, SecretStr("some-other-secret-" + uuid.uuid4().hex))
    assert httpx.get(f"{gateway}/v1/groups/nope/roles", timeout=5).status_code == 404
    unsigned = httpx.post(f"{gateway}/v1/groups/orders/roles", json={"primary_site": "prod"},
                          timeout=5)
    assert unsigned.status_code == 401
    assert _roles(gateway, "orders")["primary_site"] == "dr"
    waiting = decide_boot(None, None, LocalState(False, "down", False), "unreachable")
    assert waiting.action == "wait" and not waiting.final
    assert time.time() - good["at"] < 10
