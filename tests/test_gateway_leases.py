"""The gateway watches the leader and sync keys in a real etcd (one member on loopback): a
primary's key that expires is one `lease_expired` incident, fast; a takeover, an unreachable etcd
or a key already absent at start is none. Agents' lease reports become alerts."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from drflow.etcd import put_op, value_is
from drflow.leader_keys import Leader, SyncState, leader_key, sync_key
from lab import etcd
from lab.procs import free_port
from orchestrator.gateway import Action, IncidentKind
from orchestrator.gateway.contracts import Alert
from orchestrator.gateway.lease_decide import LeaderSeen, decide_lease_expired
from orchestrator.gateway.settings import GatewaySettings, GroupNode, GroupPolicy, GroupRoster
from orchestrator.gateway.status import PROTECTED, UNPROTECTED, Assessment, with_sync_key
from tests.test_gateway import (
    SECRET,
    Gateway,
    event,
    post,
    running_gateway,
)

PRIMARY, STANDBY = "pg-a", "pg-b"

needs_etcd = pytest.mark.skipif(not __import__("shutil").which("etcd"),
                                reason="etcd is not installed (scripts/bootstrap.sh)")


@dataclass
class Etcd:
    url: str
    info: dict[str, Any]

    def client(self, timeout: float = 2.0) -> etcd.Client:
        return etcd.Client(self.url, timeout)


def _start(tmp: Path) -> Etcd:
    member = etcd.Member("etcd-1", "127.0.0.1", [], client_port=free_port(), peer_port=free_port())
    info = etcd.start_cluster(tmp, [member])
    return Etcd(member.client_url, info)


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    if not __import__("shutil").which("etcd"):
        pytest.skip("etcd is not installed")
    e = _start(tmp_path_factory.mktemp("etcd"))
    try:
        yield e
    finally:
        etcd.stop_cluster(e.info)


_n = iter(range(1, 10_000))


def groups(count: int = 1) -> list[str]:
    """Group names no other test of the module uses (they share one etcd)."""
    base = next(_n)
    return [f"t{base}g{i}" for i in range(1, count + 1)]


def _roster() -> GroupRoster:
    return GroupRoster(primary=GroupNode(site="prod", vm=PRIMARY, host="127.0.0.1", port=5432),
                       standby=GroupNode(site="dr", vm=STANDBY, host="127.0.0.2", port=5432))


def lease_settings(state: Path, names: list[str], url: str, **kw: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        # Heartbeat loss must not be what opens the incidents here: only the keys.
        "webhook_secret": SECRET, "state_path": state, "heartbeat_timeout_s": 120.0,
        "groups": {g: GroupPolicy(auto_failover=True) for g in names},
        "rosters": {g: _roster() for g in names},
        "etcd_endpoints": [url], "etcd_timeout_s": 0.5,
    }
    return GatewaySettings(**{**base, **kw})


def name_primary(gw: Gateway, group: str) -> None:
    r = post(gw.url, event("heartbeat", agent=PRIMARY, group=group, role="primary"))
    assert r.status_code == 202, r.text


def hold(client: etcd.Client, group: str, agent: str = PRIMARY, ttl: int = 2) -> tuple[int, str]:
    """The agent's leader key bound to a fresh lease that nobody renews: (lease, value)."""
    lease, _granted = client.grant(ttl)
    value = Leader(agent_id=agent, by="agent", since=time.time()).encode()
    client.put(leader_key(group), value, lease)
    return lease, value


class AbsenceClock:
    """Polls keys every 5 ms from a thread; records when each was first read absent."""

    def __init__(self, client: etcd.Client, keys: list[str]) -> None:
        self.client, self.keys = client, keys
        self.gone: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AbsenceClock:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.gone) < len(self.keys):
            _, kvs = self.client.get_prefix("/drflow/groups/")
            now = time.perf_counter()
            present = {kv.key for kv in kvs}
            for k in self.keys:
                if k not in present and k not in self.gone:
                    self.gone[k] = now
            self._stop.wait(0.005)


def wait_until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def leases_view(gw: Gateway, group: str) -> dict[str, Any]:
    out: dict[str, Any] = gw.groups()[group]["leases"]
    return out


# -- the pure decision ------------------------------------------------------------------------------


def _seen(agent: str, by: str = "agent") -> LeaderSeen:
    ld = Leader(agent_id=agent, by=by)  # type: ignore[arg-type]
    return LeaderSeen(ld.encode(), ld, 7, 42, 9, 1_700_000_000.0)


@pytest.mark.parametrize(("holder", "known", "auto", "open_key", "action", "words"), [
    (PRIMARY, PRIMARY, True, None, Action.FAILOVER, "leader key of pg-a"),
    (PRIMARY, STANDBY, True, None, Action.ALERT, "not the group's known primary (pg-b)"),
    (PRIMARY, None, True, None, Action.ALERT, "not the group's known primary (none known)"),
    (PRIMARY, PRIMARY, True, "failover:g:1", Action.NONE, "already open"),
    (PRIMARY, PRIMARY, False, None, Action.ALERT, "auto_failover is off"),
])
def test_decide_lease_expired(holder: str, known: str | None, auto: bool, open_key: str | None,
                              action: Action, words: str) -> None:
    d = decide_lease_expired(group="g", vanished=_seen(holder), absent_at=1_700_000_003.0,
                             known_primary=known, auto_failover=auto, open_incident=open_key)
    assert d.action is action and words in d.reason, d.reason
    assert "revision 7" in d.reason


def test_a_relaxed_sync_key_makes_a_sync_group_unprotected() -> None:
    from orchestrator.gateway.status import NodeState

    p = NodeState("prod", "db-prod", "prod:5432", "primary")
    ok = Assessment(PROTECTED, "fine", primary=p)
    keys = {"sync": {"primary": "db-prod", "standby": None, "since": "…"},
            "protection_reason": "sync relaxed by db-prod at …: no standby holds every write"}
    a = with_sync_key(ok, "sync", keys)
    assert a.protection == UNPROTECTED and a.reason.startswith("sync relaxed by db-prod")
    assert with_sync_key(ok, "async", keys) is ok
    named = {"sync": {"primary": "db-prod", "standby": "db-dr"}}
    assert with_sync_key(ok, "sync", named) is ok


# -- against a real etcd ----------------------------------------------------------------------------


@needs_etcd
def test_an_expired_primary_lease_is_one_incident_within_half_a_second(
        shared_etcd: Etcd, tmp_path: Path) -> None:
    (g,) = groups()
    client = shared_etcd.client()
    with running_gateway(lease_settings(tmp_path / "gw.sqlite", [g], shared_etcd.url)) as gw:
        name_primary(gw, g)
        lease, _ = hold(client, g)
        assert wait_until(lambda: leases_view(gw, g)["leader_holder"] == PRIMARY, 2)
        with AbsenceClock(client, [leader_key(g)]) as clock:
            assert gw.starter.wait(1, 10), "no incident after the leader key expired"
        called_at, incident = gw.starter.calls[0]
        delay = called_at - clock.gone[leader_key(g)]
        print(f"\nleader key deleted by etcd -> start_incident: {delay * 1000:.0f} ms")
        assert delay <= 0.5
        assert incident.kind is IncidentKind.LEASE_EXPIRED
        assert incident.idempotency_key == f"failover:{g}:1"
        ev = incident.evidence
        assert ev["agent_id"] == PRIMARY and ev["lease_id"] == lease and ev["by"] == "agent"
        assert ev["last_seen_revision"] > 0 and ev["absent_at"] > ev["last_seen_at"]
        assert "its lease expired" in incident.reason
        time.sleep(1.0)  # the key stays absent: still one incident
        assert len(gw.starter.calls) == 1
        view = leases_view(gw, g)
        assert view["leader_holder"] == "absent" and view["etcd"] == "reachable"
        metrics = httpx.get(gw.url + "/metrics").text
        assert f'drflow_gateway_leader_key_present{{group="{g}"}} 0.0' in metrics
        # The counter exists; a read timing out on a loaded machine is counted, not an incident.
        assert re.search(r"^drflow_gateway_etcd_read_failures_total \d", metrics, re.M)
        opened = gw.audit.of("incident.open")
        assert [o["parameters"]["kind"] for o in opened] == ["lease_expired"]


@needs_etcd
def test_fifty_groups_expiring_at_once_are_fifty_incidents(shared_etcd: Etcd,
                                                          tmp_path: Path) -> None:
    names = groups(50)
    client = shared_etcd.client()
    with running_gateway(lease_settings(tmp_path / "gw.sqlite", names, shared_etcd.url)) as gw:
        with httpx.Client(timeout=5) as http:
            for g in names:
                r = post(gw.url, event("heartbeat", agent=PRIMARY, group=g), client=http)
                assert r.status_code == 202
        lease, _ = client.grant(2)  # one lease: every key goes in the same instant
        for g in names:
            client.put(leader_key(g), Leader(agent_id=PRIMARY).encode(), lease)
        assert wait_until(lambda: all(v["leases"]["leader_holder"] == PRIMARY
                                      for v in gw.groups().values()), 3)
        with AbsenceClock(client, [leader_key(g) for g in names]) as clock:
            assert gw.starter.wait(50, 10), f"{len(gw.starter.calls)} incidents of 50"
        time.sleep(1.0)
        calls = gw.starter.calls
        assert len(calls) == 50
        assert sorted(i.group for _, i in calls) == sorted(names)
        assert {i.kind for _, i in calls} == {IncidentKind.LEASE_EXPIRED}
        gone = min(clock.gone.values())
        slowest = max(t for t, _ in calls) - gone
        print(f"\n50 leader keys deleted -> 50th start_incident: {slowest * 1000:.0f} ms")
        assert slowest <= 0.5


@needs_etcd
def test_an_unreachable_etcd_is_no_expiry(tmp_path: Path) -> None:
    (g,) = groups()
    own = _start(tmp_path / "etcd")
    try:
        client = own.client()
        with running_gateway(lease_settings(tmp_path / "gw.sqlite", [g], own.url)) as gw:
            name_primary(gw, g)
            client.put(leader_key(g), Leader(agent_id=PRIMARY).encode())
            client.put(sync_key(g), SyncState(PRIMARY, STANDBY, time.time()).encode())
            assert wait_until(lambda: leases_view(gw, g)["leader_holder"] == PRIMARY, 2)
            etcd.stop_cluster(own.info)
            assert wait_until(lambda: leases_view(gw, g)["etcd"] == "unreachable", 5)
            time.sleep(1.5)
            assert gw.starter.calls == []
            view = leases_view(gw, g)
            assert view["etcd_error"].startswith("etcd unreachable since ")
            assert view["leader_holder"] == PRIMARY  # as last read, and said so
            assert view["sync"]["standby"] == STANDBY
            metrics = httpx.get(gw.url + "/metrics").text
            failures = next(line for line in metrics.splitlines()
                            if line.startswith("drflow_gateway_etcd_read_failures_total "))
            assert float(failures.split()[1]) >= 1
            assert "drflow_gateway_etcd_up 0.0" in metrics
            assert gw.audit.of("incident.open") == [] and gw.audit.of("incident.alert") == []
    finally:
        etcd.stop_cluster(own.info)


@needs_etcd
def test_a_takeover_replacing_the_key_is_no_incident(shared_etcd: Etcd, tmp_path: Path) -> None:
    (g,) = groups()
    client = shared_etcd.client()
    with running_gateway(lease_settings(tmp_path / "gw.sqlite", [g], shared_etcd.url)) as gw:
        name_primary(gw, g)
        lease, value = hold(client, g)
        assert wait_until(lambda: leases_view(gw, g)["leader_holder"] == PRIMARY, 2)
        # The failover flow's takeover: one txn on the exact old value, its own lease.
        takeover_lease, _ = client.grant(30)
        new = Leader(agent_id=STANDBY, by="takeover", incident=f"failover:{g}:1").encode()
        ok, _ = client.txn([value_is(leader_key(g), value)],
                           [put_op(leader_key(g), new, takeover_lease)])
        assert ok
        client.revoke(lease)  # the old primary's lease ends too: nothing of it is left
        time.sleep(1.0)
        assert gw.starter.calls == []
        view = leases_view(gw, g)
        assert view["leader"]["by"] == "takeover" and view["leader_holder"] == STANDBY
        client.revoke(takeover_lease)


@needs_etcd
def test_a_key_absent_when_the_gateway_starts_is_no_incident(shared_etcd: Etcd,
                                                            tmp_path: Path) -> None:
    (g,) = groups()
    client = shared_etcd.client()
    settings = lease_settings(tmp_path / "gw.sqlite", [g], shared_etcd.url)
    with running_gateway(settings) as gw:
        name_primary(gw, g)
        client.put(leader_key(g), Leader(agent_id=PRIMARY).encode())
        assert wait_until(lambda: leases_view(gw, g)["leader_holder"] == PRIMARY, 2)
    assert client.delete(leader_key(g)) == 1  # while no gateway watches
    with running_gateway(settings) as gw:
        assert gw.groups()[g]["primary"] == PRIMARY  # known from its state file
        assert wait_until(lambda: leases_view(gw, g)["leader_holder"] == "absent", 2)
        time.sleep(1.0)
        assert gw.starter.calls == []
        # It learned; a key that vanishes from now on is news.
        hold(client, g)
        assert wait_until(lambda: leases_view(gw, g)["leader_holder"] == PRIMARY, 2)
        assert gw.starter.wait(1, 10)
        assert gw.starter.calls[0][1].kind is IncidentKind.LEASE_EXPIRED


@needs_etcd
def test_status_shows_holder_standby_and_relaxed_sync(shared_etcd: Etcd, tmp_path: Path) -> None:
    (g,) = groups()
    client = shared_etcd.client()
    with running_gateway(lease_settings(tmp_path / "gw.sqlite", [g], shared_etcd.url)) as gw:
        assert wait_until(lambda: leases_view(gw, g)["read_at"] is not None, 2)
        assert leases_view(gw, g)["leader_holder"] == "absent"
        assert client.txn_create_if_absent(leader_key(g), Leader(agent_id=PRIMARY).encode())
        client.put(sync_key(g), SyncState(PRIMARY, STANDBY, time.time()).encode())
        assert wait_until(lambda: leases_view(gw, g)["leader_holder"] == PRIMARY, 2)
        view = leases_view(gw, g)
        assert view["sync"]["standby"] == STANDBY and "protection" not in view
        client.put(sync_key(g), SyncState(PRIMARY, None, 1_800_000_000.0).encode())
        assert wait_until(lambda: (leases_view(gw, g)["sync"] or {}).get("standby", "") is None,
                          2)
        view = leases_view(gw, g)
        assert view["protection"] == "unprotected"
        at = datetime.fromtimestamp(1_800_000_000, UTC).isoformat(timespec="milliseconds")
        assert view["protection_reason"] == (
            f"sync relaxed by {PRIMARY} at {at}: no standby holds every write")


class RecordingAlerter:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    async def alert(self, alert: Alert) -> None:
        self.alerts.append(alert)


def test_lease_reports_of_agents_are_alerts(tmp_path: Path) -> None:
    (g,) = groups()
    alerter = RecordingAlerter()
    settings = lease_settings(tmp_path / "gw.sqlite", [g], "http://127.0.0.1:9", etcd_endpoints=[])
    with running_gateway(settings, alerter=alerter) as gw:
        name_primary(gw, g)
        reports = [
            event("heartbeat", group=g, details={"drflow_lease": "failsafe"}),
            event("resource_failed", group=g, resource="postgres",
                  details={"drflow_lease": "fenced"}),
            event("resource_failed", group=g, resource="postgres",
                  details={"drflow_lease": "fenced"}),  # the same again: not paged twice
            event("heartbeat", group=g, details={"drflow_sync": "relaxed"}),
            event("heartbeat", group=g, details={"drflow_lease": "held"}),  # not an alert
        ]
        for body in reports:
            assert gw.post(body).status_code == 202
        assert wait_until(lambda: len(alerter.alerts) >= 3, 2)
        time.sleep(0.2)
        kinds = [a.kind for a in alerter.alerts]
        assert kinds == ["lease_failsafe", "lease_fenced", "sync_relaxed"]
        why = {a.kind: a.reason for a in alerter.alerts}
        assert "synchronous standby streams from it" in why["lease_failsafe"]
        assert "fenced itself" in why["lease_fenced"]
        assert "no standby holds every write" in why["sync_relaxed"]
        assert [a["parameters"]["kind"] for a in gw.audit.of("incident.alert")] == kinds
        assert "drflow_gateway_alerts_suppressed_total" in httpx.get(gw.url + "/metrics").text
        assert "leases" not in gw.groups()[g]  # no etcd configured: no watch
        assert gw.starter.calls == []


@needs_etcd
def test_drflow_status_reads_the_keys_itself(shared_etcd: Etcd,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`drflow status` (GroupStatusProvider) asks etcd directly: holder, standby, or unreachable."""
    from drflow.config import load_config
    from drflow.config.models import EtcdConfig
    from orchestrator.gateway.status import GroupStatusProvider
    from orchestrator.status_cli import render

    cfg = load_config(Path(__file__).parents[1] / "examples" / "drflow.yaml")
    g = cfg.groups[0].name
    client = shared_etcd.client()
    client.put(leader_key(g), Leader(agent_id=cfg.groups[0].primary.vm).encode())
    client.put(sync_key(g), SyncState(cfg.groups[0].primary.vm, None, time.time()).encode())
    try:
        here = cfg.model_copy(update={"etcd": EtcdConfig.model_validate(
            {"endpoints": [shared_etcd.url]})})
        st = GroupStatusProvider(here, timeout_s=0.5).collect()[g]
        assert st["leases"]["etcd"] == "reachable"
        assert st["leases"]["leader_holder"] == cfg.groups[0].primary.vm
        assert st["leases"]["sync"]["standby"] is None
        assert st["leases"]["protection_reason"].startswith(
            f"sync relaxed by {cfg.groups[0].primary.vm} at ")
        render({"groups": {g: st}, "gateway": {}})
        shown = " ".join(capsys.readouterr().out.split())
        assert f"{g}: leader key {cfg.groups[0].primary.vm} (by agent), sync key standby none" in shown
        gone = cfg.model_copy(update={"etcd": EtcdConfig.model_validate(
            {"endpoints": [f"http://127.0.0.1:{free_port()}"]})})
        st = GroupStatusProvider(gone, timeout_s=0.5).collect()[g]
        assert st["leases"]["etcd"] == "unreachable"
        assert st["leases"]["leader_holder"] == "unknown (etcd not read)"
        assert any(n.startswith("leader keys unknown: etcd unreachable") for n in st["notes"])
        render({"groups": {g: st}, "gateway": {}})
        shown = " ".join(capsys.readouterr().out.split())
        assert f"{g}: leader key unknown (etcd not read)" in shown
        assert "etcd unreachable: etcd at http://127.0.0.1:" in shown
        without = cfg.model_copy(update={"etcd": None})
        assert GroupStatusProvider(without, timeout_s=0.5).collect()[g]["leases"] is None
    finally:
        client.delete(leader_key(g))
        client.delete(sync_key(g))
