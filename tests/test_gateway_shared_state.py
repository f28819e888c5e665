"""Two gateway replicas sharing their state in a real etcd, behind a round-robin TCP balancer:
any replica answers any agent, and together they act exactly as one gateway would."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from drflow.approval import Ledger
from drflow.etcd import Client, EtcdError, EtcdLeaseNotFound, EtcdRefused, KeyValue
from drflow.events import EventKind, HealthEvent
from drflow.leader_keys import Leader, leader_key
from drflow.signing import sign_headers
from lab.balancer import RoundRobin
from lab.procs import free_port
from orchestrator.gateway import Incident, IncidentKind
from orchestrator.gateway.etcd_state import (
    PREFIX,
    EtcdGatewayStore,
    EtcdLedgerStore,
    EtcdRolesStore,
)
from orchestrator.gateway.roles import RolesService
from orchestrator.gateway.roles_decide import (
    BOOT_HELD,
    BOOT_SECOND_PRIMARY,
    RolesRecord,
    RolesUpdate,
)
from orchestrator.gateway.store import Seen
from tests.harness import wait_for
from tests.test_gateway import (
    PRIMARY,
    SECRET,
    STANDBY,
    Gateway,
    RecordingAudit,
    RecordingStarter,
    event,
    make_settings,
    post,
    running_gateway,
)
from tests.test_gateway_leases import (  # noqa: F401  (shared_etcd: a module fixture)
    Etcd,
    RecordingAlerter,
    shared_etcd,
)

_n = iter(range(1, 10_000))


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    balancer: RoundRobin
    starter: RecordingStarter
    group: str


def _settings(tmp: Path, etcd_url: str, group: str, **kw: Any) -> Any:
    base = make_settings(tmp, etcd_endpoints=[etcd_url], state_in_etcd=True, **kw)
    # A fresh group name per test: the module's tests share one etcd.
    return base.model_copy(update={"groups": {group: base.groups["g1"]},
                                   "rosters": {group: base.rosters["g1"]}})


@pytest.fixture
def pair(shared_etcd: Etcd, tmp_path: Path) -> Iterator[Pair]:  # noqa: F811
    group = f"rep{next(_n)}"
    starter = RecordingStarter()
    with ExitStack() as stack:
        a = stack.enter_context(running_gateway(_settings(tmp_path / "a.sqlite", shared_etcd.url,
                                                          group), starter))
        b = stack.enter_context(running_gateway(_settings(tmp_path / "b.sqlite", shared_etcd.url,
                                                          group), starter))
        backends = [("127.0.0.1", int(g.url.rsplit(":", 1)[1])) for g in (a, b)]
        balancer = stack.enter_context(RoundRobin(backends))
        yield Pair(a, b, balancer, starter, group)


def test_a_thousand_duplicate_incident_events_over_two_replicas_start_one_run(pair: Pair) -> None:
    same = json.dumps(event("recovery_exhausted", group=pair.group)).encode()
    now = time.time()
    # 500 copies of one event (10 distinct signatures: replays and re-signed duplicates) and
    # 500 distinct reports of the same failure, interleaved, over connections the balancer
    # spreads over both replicas.
    bodies: list[tuple[bytes, float]] = [(same, now - (i % 10)) for i in range(500)]
    bodies += [(json.dumps(event("recovery_exhausted", group=pair.group)).encode(), now)
               for _ in range(500)]
    random.Random(7).shuffle(bodies)
    local = threading.local()

    def send(item: tuple[bytes, float]) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        return post(pair.balancer.url, item[0], now=item[1], client=local.client).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        codes = list(pool.map(send, bodies))
    time.sleep(0.5)
    # Both replicas answered a fair share (a backend never used has no count at all).
    used = pair.balancer.connections
    assert all(used[b] >= 10 for b in pair.balancer.backends), used
    assert codes.count(202) == 501 and codes.count(409) == 499, sorted(set(codes))
    assert len(pair.starter.calls) == 1
    assert pair.starter.calls[0][1].idempotency_key == f"failover:{pair.group}:1"
    # Both replicas see the one open incident, whichever opened it.
    for g in (pair.a, pair.b):
        assert g.groups()[pair.group]["open_incident"]["idempotency_key"] == \
            f"failover:{pair.group}:1"


def test_the_balancer_stops_without_leaking() -> None:
    def open_fds() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    with socket.create_server(("127.0.0.1", 0)) as backend:
        before = open_fds()
        for _ in range(5):
            balancer = RoundRobin([backend.getsockname()])
            with balancer, socket.create_connection(("127.0.0.1", balancer.port),
                                                    timeout=5) as client:
                client.sendall(b"x")
                accepted, _ = backend.accept()  # a connection still piped when it stops
                accepted.close()
            with pytest.raises(OSError):  # no longer listening
                socket.create_connection(("127.0.0.1", balancer.port), timeout=2).close()
        del balancer
        # Each one's event loop (its selector, its self-pipe: 3 descriptors) closed with it; a
        # little slack for whatever else the process opens meanwhile.
        assert open_fds() <= before + 2


def test_a_webhook_replayed_to_the_other_replica_is_refused(pair: Pair) -> None:
    raw = json.dumps(event("recovery_exhausted", agent=STANDBY, role="standby",
                           group=pair.group)).encode()
    headers = sign_headers(SECRET.encode(), raw) | {"Content-Type": "application/json"}
    first = httpx.post(pair.a.url + "/v1/events", content=raw, headers=headers)
    assert first.status_code == 202
    replay = httpx.post(pair.b.url + "/v1/events", content=raw, headers=headers)
    assert replay.status_code == 409 and replay.json()["reason"] == "replayed"
    resigned = post(pair.b.url, raw, now=time.time() - 20)
    assert resigned.status_code == 409 and resigned.json()["reason"] == "duplicate"


def test_an_incident_opened_by_one_replica_is_closed_by_the_other(pair: Pair) -> None:
    assert pair.a.post(event("recovery_exhausted", group=pair.group)).status_code == 202
    assert pair.starter.wait(1, 5)
    key = f"failover:{pair.group}:1"
    assert pair.b.close(key, pair.group).status_code == 200
    assert pair.a.close(key, pair.group).status_code == 409  # closed once, everywhere
    # The closed incident's hold-down holds on either replica: a further report joins it.
    joined = pair.a.post(event("recovery_exhausted", group=pair.group)).json()
    assert joined["action"] == "join" and joined["incident"] == key
    assert len(pair.starter.calls) == 1


def test_a_boot_check_answered_by_either_replica_is_correct(pair: Pair) -> None:
    body = json.dumps({"primary_site": "dr", "protected": False,
                       "reason": "failover to dr"}).encode()
    r = post(pair.a.url, body, path=f"/v1/groups/{pair.group}/roles")
    assert r.status_code == 200, r.text
    for url in (pair.a.url, pair.b.url, pair.balancer.url, pair.balancer.url):
        view = httpx.get(f"{url}/v1/groups/{pair.group}/roles", params={"nonce": "n1"}).json()
        assert (view["primary_site"], view["protected"], view["nonce"]) == ("dr", False, "n1")


def test_heartbeats_moving_between_replicas_are_no_silence(pair: Pair) -> None:
    # The primary's connection is on A, then on B (a balancer moved it): A does not take the
    # move for a silent primary. Then it goes silent for real: exactly one incident.
    _beat(pair.a.url, pair.group, 1.5)
    _beat(pair.b.url, pair.group, 2.5)  # > A's 1 s heartbeat timeout
    assert pair.starter.calls == []
    assert pair.starter.wait(1, 5)
    time.sleep(1.5)
    assert len(pair.starter.calls) == 1
    incident = pair.starter.calls[0][1]
    assert incident.kind is IncidentKind.HEARTBEAT_LOST


def _beat(url: str, group: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < end:
            r = post(url, event("heartbeat", group=group,
                                details={"postgres": {"role": "primary", "wal_lsn": "0/3000060",
                                                      "replicas": []}}), client=client)
            assert r.status_code == 202, r.text
            time.sleep(0.2)


def test_failover_evidence_includes_what_the_other_replica_heard(pair: Pair) -> None:
    _beat(pair.a.url, pair.group, 0.6)
    # B never heard the primary; its incident still carries A's replication reports.
    assert pair.b.post(event("recovery_exhausted", group=pair.group)).status_code == 202
    assert pair.starter.wait(1, 5)
    evidence = pair.starter.calls[0][1].evidence
    assert evidence["primary_last_lsn"] == 0x3000060, evidence


# -- the etcd state itself ------------------------------------------------------------------------


def test_seen_events_and_signatures_expire_with_their_leases(shared_etcd: Etcd) -> None:  # noqa: F811
    store = EtcdGatewayStore(Client(shared_etcd.url), 2.0, 2.0, 1.0)
    eid = f"ev-{next(_n)}-{time.time()}"
    assert store.record_event(eid, "sig-" + eid, "g", "heartbeat") is Seen.NEW
    assert store.record_event(eid, "sig-" + eid, "g", "heartbeat") is Seen.REPLAYED
    assert store.record_event(eid, "other-" + eid, "g", "heartbeat") is Seen.DUPLICATE
    # Kept at least the retention, gone within retention + its slice (+ etcd's rounding).
    time.sleep(1.5)
    assert store.record_event(eid, "sig-" + eid, "g", "heartbeat") is Seen.REPLAYED
    deadline = time.monotonic() + 8
    while shared_etcd.client().get(f"{PREFIX}event/{eid}") is not None:
        assert time.monotonic() < deadline, "the seen event never expired"
        time.sleep(0.25)
    assert store.record_event(eid, "sig-" + eid, "g", "heartbeat") is Seen.NEW


def test_an_event_whose_handling_failed_is_taken_again(shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    # etcd fails after the event was recorded as seen, before the incident decision (reading
    # the agent's hold-down): the agent gets a 503 (which does not name etcd's addresses) and
    # sends the event again, re-signed as its outbox does: the retry is acted on, not refused
    # as a duplicate.
    group = f"rep{next(_n)}"
    with running_gateway(_settings(tmp_path / "a.sqlite", shared_etcd.url, group)) as gw:
        store = gw.app.state.gateway.store
        real = store.join
        failures = iter([EtcdError(f"etcd at {shared_etcd.url} did not answer /kv/range")])

        def join(g: str, agent: str) -> Any:
            for exc in failures:
                raise exc
            return real(g, agent)

        store.join = join
        raw = json.dumps(event("recovery_exhausted", group=group)).encode()
        failed = post(gw.url, raw, now=time.time() - 5)
        assert failed.status_code == 503, failed.text
        assert failed.json()["reason"] == "state_unavailable"
        assert shared_etcd.url not in failed.text and "127.0.0.1" not in failed.text
        retry = post(gw.url, raw)
        assert retry.status_code == 202, retry.text
        assert retry.json()["action"] == "failover"
        assert retry.json()["incident"] == f"failover:{group}:1"
        assert gw.starter.wait(1, 5)
        assert post(gw.url, raw, now=time.time() - 10).json()["reason"] == "duplicate"


def test_a_forgotten_event_is_new_again_in_etcd(shared_etcd: Etcd) -> None:  # noqa: F811
    store = EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60)
    eid = f"ev-{next(_n)}-{time.time()}"
    assert store.record_event(eid, "sig-" + eid, "g", "recovery_exhausted") is Seen.NEW
    store.forget_event(eid, "sig-" + eid)
    assert store.record_event(eid, "sig-" + eid, "g", "recovery_exhausted") is Seen.NEW
    assert store.record_event(eid, "other-" + eid, "g", "recovery_exhausted") is Seen.DUPLICATE


def test_a_claim_lost_to_another_replica_names_its_incident(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    # Between this replica's read of the group and its claim, another replica opens an
    # incident, and closes it before the answer: the agent is told no failover starts here,
    # and which incident won.
    group = f"rep{next(_n)}"
    other = EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60)
    with running_gateway(_settings(tmp_path / "a.sqlite", shared_etcd.url, group)) as gw:
        store = gw.app.state.gateway.store
        real = store.claim_incident

        def claim_incident(g: str, *args: Any) -> Any:
            won = other.claim_incident(g, IncidentKind.HEARTBEAT_LOST, "silent", {}, datetime.now(UTC))
            assert isinstance(won, Incident)
            try:
                return real(g, *args)
            finally:
                assert other.close_incident(g, won.idempotency_key, "failed_over", "done")

        store.claim_incident = claim_incident
        r = gw.post(event("recovery_exhausted", group=group))
        assert r.status_code == 202, r.text
        body = r.json()
        assert (body["action"], body["incident"]) == ("none", f"failover:{group}:1"), body
        assert "claimed elsewhere" in body["reason"]
        time.sleep(0.2)
        assert gw.starter.calls == []


def test_writes_whose_lease_etcd_lost_take_new_leases(shared_etcd: Etcd) -> None:  # noqa: F811
    client = shared_etcd.client()
    store = EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60)
    eid = f"ev-{next(_n)}-{time.time()}"
    assert store.record_event(eid, "sig-" + eid, "g", "heartbeat") is Seen.NEW
    event_kv = client.get_kv(f"{PREFIX}event/{eid}")
    sig_lease = next(kv.lease for kv in client.get_prefix(PREFIX + "sig/")[1]
                     if json.loads(kv.value)["event_id"] == eid)
    assert event_kv is not None and event_kv.lease and sig_lease
    # Both leases gone (as after etcd lost them): the store's next write takes new ones.
    for lease in {event_kv.lease, sig_lease}:
        client.revoke(lease)
    with pytest.raises(EtcdLeaseNotFound):
        client.put(f"{PREFIX}probe", "x", event_kv.lease)
    assert store.record_event(eid, "sig-" + eid, "g", "heartbeat") is Seen.NEW
    store.note_heard("g", "a", time.time(), {})
    assert store.heard("g", "a") is not None


def test_an_incident_closes_although_etcd_lost_the_leases_of_closed_ones(
        shared_etcd: Etcd) -> None:  # noqa: F811
    client = shared_etcd.client()
    store = EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60)
    group = f"rep{next(_n)}"
    first = store.claim_incident(group, IncidentKind.HEARTBEAT_LOST, "silent",
                                 {"agent_id": "pg-a"}, datetime.now(UTC))
    assert isinstance(first, Incident)
    assert store.close_incident(group, first.idempotency_key, "failed_over", "ok", hold_down_s=60)
    closed = client.get_kv(f"{PREFIX}incident/{first.idempotency_key}")
    hold = client.get_kv(f"{PREFIX}hold/{group}/pg-a")
    assert closed is not None and hold is not None
    for lease in {closed.lease, hold.lease}:
        client.revoke(lease)  # as after etcd lost them: the store's cached leases are stale
    store.join(group, "pg-a")  # the hold went with its lease
    second = store.claim_incident(group, IncidentKind.HEARTBEAT_LOST, "silent again",
                                  {"agent_id": "pg-a"}, datetime.now(UTC))
    assert isinstance(second, Incident)
    assert store.close_incident(group, second.idempotency_key, "failed_over", "ok",
                                hold_down_s=60)
    assert store.open_incident(group) is None


def test_only_a_lost_lease_is_a_lease_refusal(shared_etcd: Etcd) -> None:  # noqa: F811
    # An endpoint whose URL says "lease" refusing for another reason is a plain refusal.
    odd = Client(shared_etcd.url + "/lease")
    with pytest.raises(EtcdRefused) as refused:
        odd.put(f"{PREFIX}probe", "x")
    assert "lease" in str(refused.value) and not isinstance(refused.value, EtcdLeaseNotFound)


def test_concurrent_claims_from_many_replicas_open_one_incident(shared_etcd: Etcd) -> None:  # noqa: F811
    stores = [EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60) for _ in range(8)]
    group = f"claim{next(_n)}"
    now = datetime.now().astimezone()

    def claim(s: EtcdGatewayStore) -> str | None:
        inc = s.claim_incident(group, IncidentKind.LEASE_EXPIRED, "test", {"agent_id": "x"}, now)
        return inc.idempotency_key if isinstance(inc, Incident) else None

    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(claim, stores * 4))
    assert [k for k in keys if k] == [f"failover:{group}:1"]
    # The losers learn which incident won.
    assert stores[0].claim_incident(group, IncidentKind.LEASE_EXPIRED, "test", {}, now) == \
        f"failover:{group}:1"
    assert stores[3].close_incident(group, f"failover:{group}:1", "done", "test")
    assert not stores[5].close_incident(group, f"failover:{group}:1", "done", "test")
    assert claim(stores[6]) == f"failover:{group}:2"


def test_a_ledger_changes_only_from_what_was_read(shared_etcd: Etcd) -> None:  # noqa: F811
    a, b = EtcdLedgerStore(Client(shared_etcd.url)), EtcdLedgerStore(Client(shared_etcd.url))
    run = f"run-{next(_n)}-{time.time()}"
    first = Ledger(approvals=("U1",))
    assert a.put(run, "g", Ledger(), first)
    assert not b.put(run, "g", Ledger(), Ledger(approvals=("U2",)))  # raced: read again
    assert b.get(run) == first
    assert b.put(run, "g", first, Ledger(approvals=("U1", "U2"), decided="approved",
                                         decided_by=("U1", "U2")))
    assert a.get(run).decided == "approved"


# -- the roles record and the primary, changed by two replicas at once ----------------------------


class Interleaved:
    """An etcd client that runs `then` once, right after its first read of `key`: another
    replica's change lands between this replica's read of the record and its write."""

    def __init__(self, client: Client, key: str, then: Callable[[], None]) -> None:
        self._client, self._key = client, key
        self._then: Callable[[], None] | None = then

    def get_kv(self, key: str, serializable: bool = False) -> KeyValue | None:
        kv = self._client.get_kv(key, serializable)
        if key == self._key and self._then is not None:
            then, self._then = self._then, None
            then()
        return kv

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _interleave(roles: RolesService, group: str, then: Callable[[], None]) -> None:
    """Run `then` once, right after the replica's first read of the group's roles record."""
    store = roles.store
    assert isinstance(store, EtcdRolesStore)
    store._etcd = Interleaved(store._etcd, f"{PREFIX}roles/{group}", then)  # type: ignore[assignment]


class NoIncidents:
    """The gateway and its store, as far as the roles service asks them: no incident is open."""

    def __init__(self) -> None:
        self.store = self

    def open_incident(self, group: str) -> None:
        return None


def _roles(tmp: Path, url: str, group: str) -> tuple[RolesService, RecordingAudit]:
    audit = RecordingAudit()
    return RolesService(_settings(tmp, url, group), NoIncidents(), audit), audit  # type: ignore[arg-type]


def _boot(group: str, agent: str, site: str, report: str, **details: Any) -> HealthEvent:
    return HealthEvent(agent_id=agent, group=group, kind=EventKind.HEARTBEAT,
                       details={"drflow_boot": report, "site": site, **details})


def _brief(rec: RolesRecord) -> dict[str, Any]:
    return {"primary_site": rec.primary_site, "protected": rec.protected, "seq": rec.seq,
            "transition": rec.transition}


@pytest.mark.parametrize("first", ["report", "correction"])
def test_roles_changed_on_two_replicas_at_once_both_land(
        shared_etcd: Etcd, tmp_path: Path, first: str) -> None:  # noqa: F811
    # A flow reports a switchover to replica A while the prod agent, held at boot by a writable
    # peer, makes replica B correct a stale record; each lands between the other's read of the
    # record and its write. Neither is lost, and the one written last is audited as applied to
    # the other's record.
    group = f"rep{next(_n)}"
    a, a_audit = _roles(tmp_path / "a.sqlite", shared_etcd.url, group)
    b, b_audit = _roles(tmp_path / "b.sqlite", shared_etcd.url, group)

    def report() -> None:
        a.update(group, RolesUpdate(transition="switchover", reason="switchover begins"))

    def correction() -> None:
        b.on_event(_boot(group, PRIMARY, "prod", BOOT_HELD, peer_writable=True))

    later, audit, sooner, other = ((a, a_audit, correction, b) if first == "report"
                                   else (b, b_audit, report, a))
    between: list[RolesRecord] = []

    def interleave() -> None:
        sooner()
        between.append(other.record(group))

    _interleave(later, group, interleave)
    try:
        (report if first == "report" else correction)()
        assert between, "the other replica's change never ran in between"
        final = a.record(group)
        assert _brief(final) == {"primary_site": "dr", "protected": False, "seq": 1,
                                 "transition": "switchover"}
        assert b.record(group) == final
        written = audit.of("roles.update")[-1]["parameters"]
        assert written["before"] == _brief(between[0]) and written["after"] == _brief(final)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("report", [BOOT_HELD, BOOT_SECOND_PRIMARY])
def test_a_boot_report_taken_by_two_replicas_at_once_claims_one_reprotect(
        shared_etcd: Etcd, tmp_path: Path, report: str) -> None:  # noqa: F811
    # The old primary's agent (on dr, the record's standby side) reports at boot twice, to A and
    # to B, B's report landing between A's read and write: one re-protect run is claimed.
    group = f"rep{next(_n)}"
    a, a_audit = _roles(tmp_path / "a.sqlite", shared_etcd.url, group)
    b, b_audit = _roles(tmp_path / "b.sqlite", shared_etcd.url, group)
    _interleave(a, group, lambda: b.on_event(_boot(group, STANDBY, "dr", report)))
    try:
        a.on_event(_boot(group, STANDBY, "dr", report))
        claims = [r for au in (a_audit, b_audit) for r in au.of("roles.reprotect")]
        assert [r["parameters"]["idempotency_key"] for r in claims] == [f"reprotect:{group}:1"]
        assert claims[0] in b_audit.of("roles.reprotect")  # B's write came first
        rec = a.record(group)
        assert (rec.protected, rec.seq, rec.reprotect_key) == (False, 1, f"reprotect:{group}:1")
    finally:
        a.close()
        b.close()


def _heard(gw: Gateway, group: str, agent: str, role: str) -> None:
    r = gw.post(event("heartbeat", agent=agent, group=group, role=role))
    assert r.status_code == 202, r.text


@contextmanager
def _replicas(tmp: Path, url: str, group: str) -> Iterator[tuple[Gateway, Gateway]]:
    """Two replicas on one etcd; nobody goes silent (the heartbeat timeout is long)."""
    with ExitStack() as stack:
        a, b = (stack.enter_context(running_gateway(_settings(
            tmp / f"{n}.sqlite", url, group, heartbeat_timeout_s=60))) for n in "ab")
        yield a, b


def test_a_standby_report_to_a_replica_behind_leaves_the_stored_primary(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    # A heard pg-a as the primary; after a failover, B heard pg-b claim it. Then pg-a, now a
    # standby, says so to A, whose tracker still named pg-a: the primary every replica decides
    # with stays pg-b, and A takes it.
    group = f"rep{next(_n)}"
    shared = EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60)
    with _replicas(tmp_path, shared_etcd.url, group) as (a, b):
        _heard(a, group, PRIMARY, "primary")
        _heard(b, group, STANDBY, "primary")
        assert shared.primary_of(group) == STANDBY
        _heard(a, group, PRIMARY, "standby")
        assert shared.primary_of(group) == STANDBY
        assert a.groups()[group]["primary"] == STANDBY
        # The stored primary saying it is a standby is forgotten.
        _heard(b, group, STANDBY, "standby")
        assert shared.primary_of(group) is None


def test_closing_an_incident_forgets_its_agent_only_while_it_is_the_stored_primary(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    group = f"rep{next(_n)}"
    shared = EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60)
    with _replicas(tmp_path, shared_etcd.url, group) as (a, b):
        # pg-a failed on A; B heard the promoted pg-b before the incident closed on A.
        _heard(a, group, PRIMARY, "primary")
        assert a.post(event("recovery_exhausted", group=group)).status_code == 202
        assert a.starter.wait(1, 5)
        _heard(b, group, STANDBY, "primary")
        assert a.close(f"failover:{group}:1", group, outcome="failed_over").status_code == 200
        assert shared.primary_of(group) == STANDBY
        assert a.groups()[group]["primary"] == STANDBY
    group = f"rep{next(_n)}"
    with _replicas(tmp_path / "again", shared_etcd.url, group) as (a, b):
        # Only B heard pg-a; its incident closed on A: pg-a is forgotten all the same.
        _heard(b, group, PRIMARY, "primary")
        assert b.post(event("recovery_exhausted", group=group)).status_code == 202
        assert b.starter.wait(1, 5)
        assert a.groups()[group]["primary"] is None
        assert a.close(f"failover:{group}:1", group, outcome="failed_over").status_code == 200
        assert shared.primary_of(group) is None


def test_a_primary_closed_without_a_promotion_stays_the_stored_primary(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    # pg-a's beats go to A; its incident (it fenced itself, then re-acquired its lease) closed
    # on B without a promotion. pg-a still serves: every replica still decides with it as the
    # primary, so its death is failed over.
    group = f"rep{next(_n)}"
    shared = EtcdGatewayStore(Client(shared_etcd.url), 60, 60, 60)
    with _replicas(tmp_path, shared_etcd.url, group) as (a, b):
        _heard(a, group, PRIMARY, "primary")
        assert b.post(event("recovery_exhausted", group=group)).status_code == 202
        assert b.starter.wait(1, 5)
        assert b.close(f"failover:{group}:1", group, outcome="reacquired").status_code == 200
        assert shared.primary_of(group) == PRIMARY
        _heard(a, group, PRIMARY, "primary")
        assert b.groups()[group]["primary"] == PRIMARY


def test_a_primary_a_replica_still_believed_in_is_stored_again_by_its_beats(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    # A heard pg-a as the primary; after a failover B heard pg-b claim it, and the incident
    # closed. A failback makes pg-a the primary again, and its beats go to A, whose tracker
    # never stopped naming it: they store it again, or a death of pg-a would be judged against
    # pg-b (alert only). A stale claim, against a leader key naming another, stores nothing.
    group = f"rep{next(_n)}"
    etcd = Client(shared_etcd.url)
    shared = EtcdGatewayStore(etcd, 60, 60, 60)
    with _replicas(tmp_path, shared_etcd.url, group) as (a, b):
        _heard(a, group, PRIMARY, "primary")
        assert a.post(event("recovery_exhausted", group=group)).status_code == 202
        assert a.starter.wait(1, 5)
        _heard(b, group, STANDBY, "primary")
        assert b.close(f"failover:{group}:1", group, outcome="failed_over").status_code == 200
        assert shared.primary_of(group) == STANDBY
        etcd.put(leader_key(group), Leader(STANDBY).encode())
        time.sleep(0.7)  # past A's note interval, and a read of the leader keys
        _heard(a, group, PRIMARY, "primary")  # pg-a fenced, reporting its last role
        assert shared.primary_of(group) == STANDBY
        etcd.put(leader_key(group), Leader(PRIMARY).encode())  # failed back
        time.sleep(0.7)
        _heard(a, group, PRIMARY, "primary")
        assert shared.primary_of(group) == PRIMARY
        etcd.delete(leader_key(group))


def test_state_in_etcd_needs_etcd(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="state_in_etcd needs etcd_endpoints"):
        make_settings(tmp_path / "x.sqlite", state_in_etcd=True)


def test_a_frozen_etcd_holds_up_decisions_not_the_gateway(pair: Pair, shared_etcd: Etcd) -> None:  # noqa: F811
    # etcd stopped dead (as while it elects a leader, or its machine is stunned): events wait
    # for it on the state thread, then are refused 503 and kept by the agent; meanwhile the
    # gateway still answers everything that needs no state at once.
    pid = int(shared_etcd.info["members"][0]["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            waiting = [pool.submit(pair.a.post, event("heartbeat", group=pair.group))
                       for _ in range(4)]
            time.sleep(0.3)
            worst = 0.0
            for _ in range(10):
                t = time.perf_counter()
                assert httpx.get(pair.a.url + "/healthz", timeout=5).status_code == 200
                worst = max(worst, time.perf_counter() - t)
            answers = [f.result(30) for f in waiting]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert worst < 0.2, f"/healthz took {worst:.2f} s while etcd was frozen"
    refused = [r for r in answers if r.status_code == 503]
    assert refused and refused[0].json()["reason"] == "state_unavailable", \
        [r.status_code for r in answers]
    assert "etcd" in refused[0].json()["detail"]
    # etcd back: the next event is accepted.
    assert pair.a.post(event("heartbeat", group=pair.group)).status_code == 202


def test_a_failure_not_acted_on_for_want_of_etcd_is_told_to_on_call(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    # The etcd majority lost with the primary's site: no incident can be opened, so on-call is
    # told from memory (once), with the way forward that needs no etcd.
    group = f"rep{next(_n)}"
    alerter = RecordingAlerter()
    with running_gateway(_settings(tmp_path / "a.sqlite", shared_etcd.url, group,
                                   etcd_timeout_s=0.5), alerter=alerter) as gw:
        assert gw.post(event("heartbeat", group=group)).status_code == 202  # the primary
        pid = int(shared_etcd.info["members"][0]["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            failed = gw.post(event("recovery_exhausted", group=group))
            assert failed.status_code == 503, failed.text
            told = wait_for(lambda: [a for a in alerter.alerts if a.kind == "state_unavailable"],
                            10, "the alert")
            # Then silent too (no more heartbeats): still one page, not one per look.
            time.sleep(2.5)
            assert gw.starter.calls == []
        finally:
            os.kill(pid, signal.SIGCONT)
        # etcd back: the silent primary's incident opens and its failover starts by itself.
        assert gw.starter.wait(1, 10)
    assert len([a for a in alerter.alerts if a.kind == "state_unavailable"]) == 1, alerter.alerts
    assert told[0].agent_id == PRIMARY and told[0].group == group
    assert f"drflow failover {group} --declare-fenced --reason TEXT" in told[0].reason
    assert "no failover started" in told[0].reason


def test_a_primary_silent_while_etcd_is_out_of_reach_is_told_to_on_call(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    group = f"rep{next(_n)}"
    alerter = RecordingAlerter()
    with running_gateway(_settings(tmp_path / "a.sqlite", shared_etcd.url, group,
                                   etcd_timeout_s=0.5), alerter=alerter) as gw:
        assert gw.post(event("heartbeat", group=group)).status_code == 202
        pid = int(shared_etcd.info["members"][0]["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            told = wait_for(lambda: [a for a in alerter.alerts if a.kind == "state_unavailable"],
                            15, "the alert of a silent primary")
        finally:
            os.kill(pid, signal.SIGCONT)
    assert "went silent" in told[0].reason and "--declare-fenced" in told[0].reason


@pytest.mark.parametrize("graceful", [True, False], ids=["stopped", "died"])
def test_an_incident_of_a_stopped_replica_is_adopted_and_driven_once(
        shared_etcd: Etcd, tmp_path: Path, graceful: bool) -> None:  # noqa: F811
    # Replica A claims an incident and stops before its run starts (its starter hangs); B, alive
    # all along, adopts the incident once A's liveness lease is gone and starts it, same key.
    # A stopped gracefully ends its lease; one that died leaves it to expire.
    group = f"rep{next(_n)}"
    hung = HangingStarter()
    starter = RecordingStarter()
    with running_gateway(_settings(tmp_path / "b.sqlite", shared_etcd.url, group),
                         starter) as b:
        with running_gateway(_settings(tmp_path / "a.sqlite", shared_etcd.url, group,
                                       start_timeout_s=60), hung) as a:
            assert a.post(event("recovery_exhausted", group=group)).status_code == 202
            assert hung.called.wait(5)
            assert starter.calls == []  # A drives it: B leaves it alone
            if not graceful:
                a.app.state.gateway.store.close = lambda: None
        t = time.monotonic()
        assert starter.wait(1, 15), "B never adopted the incident"
        adopted_after = time.monotonic() - t
        time.sleep(2)
        assert len(starter.calls) == 1
        assert starter.calls[0][1].idempotency_key == f"failover:{group}:1"
        assert b.groups()[group]["open_incident"]["status"] == "open"
        assert [r["outcome"] for r in b.audit.of("incident.adopt")] == ["adopted"]
    if graceful:  # B's next look for orphans (1 to 2 s apart), well before the lease's TTL
        assert adopted_after <= 2.5, adopted_after
    else:  # the lease's TTL, etcd's rounding, a look
        assert 3 <= adopted_after <= 5 + 1 + 1.5, adopted_after


class HangingStarter(RecordingStarter):
    def __init__(self) -> None:
        super().__init__()
        self.called = threading.Event()

    async def start_incident(self, incident: Any) -> str:
        self.called.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


def test_the_balancer_redispatches_a_refused_connection_only_when_asked() -> None:
    dead = ("127.0.0.1", free_port())  # nothing listens: refused at once

    def answered(balancer: RoundRobin) -> int:
        ok = 0
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", balancer.port), timeout=5) as client:
                client.sendall(b"ping")
                client.settimeout(2)
                with suppress(OSError):
                    ok += client.recv(4) == b"ping"
        return ok

    with socket.create_server(("127.0.0.1", 0)) as live:
        stop = threading.Event()

        def echo() -> None:
            live.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = live.accept()
                except OSError:
                    continue
                with conn:
                    conn.sendall(conn.recv(4))
        t = threading.Thread(target=echo, daemon=True)
        t.start()
        try:
            with RoundRobin([dead, live.getsockname()]) as plain:
                assert answered(plain) == 3  # every other connection went to the dead one
            with RoundRobin([dead, live.getsockname()], redispatch=True) as checked:
                assert answered(checked) == 6
        finally:
            stop.set()
            t.join(5)
