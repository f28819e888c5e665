"""The gateway over real HTTP on loopback: uvicorn in a thread (or a process, for restarts)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import sqlite3
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from drflow.signing import sign_headers, signature
from lab.procs import free_port, kill_tree, spawn, stop_tree, wait_port
from orchestrator.gateway import (
    Action,
    GatewaySettings,
    GroupPolicy,
    Incident,
    IncidentKind,
    Role,
    create_app,
    decide_incident,
    run,
)
from orchestrator.gateway.contracts import Alerter
from orchestrator.gateway.settings import GroupNode, GroupRoster

SECRET = "gw-test-secret-7f3a9c"  # a test value; the tests check it never leaks
PRIMARY, STANDBY = "pg-a", "pg-b"


# -- real implementations of the gateway's ports, recording what they are given -------------------


class RecordingStarter:
    """An IncidentStarter that records calls; optionally fails its first `fail_times` calls."""

    def __init__(self, fail_times: int = 0) -> None:
        self.fail_times = fail_times
        self.calls: list[tuple[float, Incident]] = []
        self.called_wall: list[datetime] = []  # wall-clock twin of calls[i][0]
        self._cond = threading.Condition()

    async def start_incident(self, incident: Incident) -> str:
        with self._cond:
            self.calls.append((time.perf_counter(), incident))
            self.called_wall.append(datetime.now(UTC))
            n = len(self.calls)
            self._cond.notify_all()
        if n <= self.fail_times:
            raise ConnectionError("Prefect API unreachable (injected)")
        return f"run-{n}"

    def wait(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.calls) >= count, timeout)


class RecordingAudit:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def append(self, actor: str, action: str, target: str, parameters: dict[str, Any],
               outcome: str, reason: str) -> None:
        with self._lock:
            self.records.append({"actor": actor, "action": action, "target": target,
                                 "parameters": parameters, "outcome": outcome, "reason": reason})

    def of(self, action: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r["action"] == action]


@dataclass
class Gateway:
    url: str
    app: FastAPI
    starter: RecordingStarter
    audit: RecordingAudit

    def post(self, body: dict[str, Any] | bytes, **kw: Any) -> httpx.Response:
        return post(self.url, body, **kw)

    def groups(self) -> dict[str, Any]:
        out: dict[str, Any] = httpx.get(self.url + "/v1/groups", timeout=5).json()
        return out

    def close(self, key: str, group: str = "g1", outcome: str | None = None) -> httpx.Response:
        body = {"idempotency_key": key, "reason": "test done"}
        if outcome is not None:
            body["outcome"] = outcome
        return self.post(body, path=f"/v1/groups/{group}/incident/close")


def _roster() -> GroupRoster:
    # The gateway takes events only from the VMs of a group's nodes.
    return GroupRoster(primary=GroupNode(site="prod", vm=PRIMARY, host="127.0.0.1", port=5432),
                       standby=GroupNode(site="dr", vm=STANDBY, host="127.0.0.2", port=5432))


def make_settings(state: Path, **kw: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        "webhook_secret": SECRET, "state_path": state, "heartbeat_timeout_s": 1.0,
        "groups": {"g1": GroupPolicy(auto_failover=True), "g2": GroupPolicy(auto_failover=False)},
        "rosters": {"g1": _roster(), "g2": _roster()},
    }
    return GatewaySettings(**{**base, **kw})


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve a gateway app on 127.0.0.1 (lifespan on) until the block ends; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def running_gateway(settings: GatewaySettings, starter: RecordingStarter | None = None,
                    alerter: Alerter | None = None) -> Iterator[Gateway]:
    starter = starter or RecordingStarter()
    audit = RecordingAudit()
    app = create_app(settings, starter, audit, alerter)
    with serve_app(app) as url:
        yield Gateway(url, app, starter, audit)


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(make_settings(tmp_path / "gw.sqlite")) as g:
        yield g


def event(kind: str, agent: str = PRIMARY, group: str = "g1", role: str | None = "primary",
          **extra: Any) -> dict[str, Any]:
    details = dict(extra.pop("details", {}))
    if role is not None:
        details["role"] = role
    return {"event_id": str(uuid.uuid4()), "agent_id": agent, "group": group, "kind": kind,
            "observed_at": datetime.now(UTC).isoformat(), "details": details, **extra}


def post(url: str, body: dict[str, Any] | bytes, *, secret: str | None = SECRET,
         now: float | None = None, path: str = "/v1/events",
         client: httpx.Client | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers |= sign_headers(secret.encode(), raw, now)
    if client is not None:
        return client.post(url + path, content=raw, headers=headers)
    return httpx.post(url + path, content=raw, headers=headers, timeout=10)


# -- the pure decision ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "role", "auto", "open_key", "silent", "action", "words"),
    [
        (IncidentKind.RECOVERY_EXHAUSTED, Role.PRIMARY, True, None, None, Action.FAILOVER,
         "primary agent a reported recovery_exhausted"),
        (IncidentKind.RECOVERY_EXHAUSTED, Role.STANDBY, True, None, None, Action.ALERT,
         "lost its protection"),
        (IncidentKind.RECOVERY_EXHAUSTED, None, True, None, None, Action.ALERT, "not the group's"),
        (IncidentKind.RECOVERY_EXHAUSTED, Role.PRIMARY, False, None, None, Action.ALERT,
         "auto_failover is off"),
        (IncidentKind.RECOVERY_EXHAUSTED, Role.PRIMARY, True, "failover:g:1", None, Action.NONE,
         "failover:g:1 is already open"),
        (IncidentKind.HEARTBEAT_LOST, Role.PRIMARY, True, None, 3.2, Action.FAILOVER,
         "silent for 3.2 s (heartbeat timeout 3 s)"),
        (IncidentKind.HEARTBEAT_LOST, Role.PRIMARY, True, None, 2.9, Action.NONE, "alive"),
        (IncidentKind.HEARTBEAT_LOST, Role.STANDBY, True, None, 9.0, Action.ALERT, "standby"),
    ],
)
def test_decide_incident(trigger: IncidentKind, role: Role | None, auto: bool,
                         open_key: str | None, silent: float | None, action: Action,
                         words: str) -> None:
    d = decide_incident(group="g", trigger=trigger, agent_id="a", role=role, auto_failover=auto,
                        open_incident=open_key, silent_for_s=silent, heartbeat_timeout_s=3.0)
    assert d.action is action
    assert words in d.reason


# -- bad input ----------------------------------------------------------------------------------------


def _rejection_cases() -> list[tuple[str, int, str]]:
    return [("unsigned", 401, "unsigned"), ("wrong_secret", 401, "bad_signature"),
            ("tampered", 401, "bad_signature"), ("stale", 401, "stale"),
            ("future", 401, "stale"), ("not_json", 422, "malformed"),
            ("bad_kind", 422, "malformed"), ("missing_field", 422, "malformed"),
            ("extra_field", 422, "malformed"), ("unknown_group", 404, "unknown_group"),
            ("oversized", 413, "oversized"), ("oversized_chunked", 413, "oversized"),
            ("unknown_agent", 403, "unknown_agent"), ("text_plain", 415, "unsupported_media_type"),
            ("too_deep", 422, "too_complex"), ("loose_timestamp", 401, "bad_timestamp"),
            ("non_ascii_signature", 401, "bad_signature")]


@pytest.mark.parametrize(("case", "status", "reason"), _rejection_cases())
def test_bad_input_is_refused_and_changes_nothing(gw: Gateway, case: str, status: int,
                                                  reason: str) -> None:
    good = event("recovery_exhausted")
    raw = json.dumps(good).encode()
    url = gw.url + "/v1/events"
    if case == "unsigned":
        r = httpx.post(url, content=raw)
    elif case == "wrong_secret":
        r = gw.post(raw, secret="not-the-secret")
    elif case == "tampered":
        headers = sign_headers(SECRET.encode(), raw)
        r = httpx.post(url, content=raw.replace(b"pg-a", b"pg-x"), headers=headers)
    elif case == "stale":
        r = gw.post(raw, now=time.time() - 400)
    elif case == "future":
        r = gw.post(raw, now=time.time() + 400)
    elif case == "not_json":
        r = gw.post(b'{"event_id": ')
    elif case == "bad_kind":
        r = gw.post({**good, "kind": "reboot_everything"})
    elif case == "missing_field":
        r = gw.post({k: v for k, v in good.items() if k != "agent_id"})
    elif case == "extra_field":
        r = gw.post({**good, "command": "rm -rf /"})
    elif case == "unknown_group":
        r = gw.post({**good, "group": "nope"})
    elif case == "oversized":
        r = gw.post({**good, "details": {"role": "primary", "pad": "x" * 70_000}})
    elif case == "unknown_agent":
        r = gw.post({**good, "agent_id": "pg-a\u0000"})
    elif case == "text_plain":
        r = httpx.post(url, content=raw, headers={**sign_headers(SECRET.encode(), raw),
                                                  "Content-Type": "text/plain"})
    elif case == "too_deep":
        r = gw.post({**good, "details": {"role": "primary", "x": json.loads("[" * 40 + "]" * 40)}})
    elif case == "loose_timestamp":
        ts = f"{int(time.time()):_}"
        r = httpx.post(url, content=raw, headers={
            "Content-Type": "application/json", "X-Drflow-Timestamp": ts,
            "X-Drflow-Signature": signature(SECRET.encode(), ts, raw)})
    elif case == "non_ascii_signature":
        r = httpx.post(url, content=raw, headers=[
            (b"Content-Type", b"application/json"), (b"X-Drflow-Timestamp", b"1"),
            (b"X-Drflow-Signature", b"sha256=\xb2")])
    else:
        def chunks() -> Iterator[bytes]:
            for _ in range(20):
                yield b"x" * 8192
        r = httpx.post(url, content=chunks(), headers=sign_headers(SECRET.encode(), b""))
    assert r.status_code == status, r.text
    body = r.json()
    assert body["reason"] == reason
    assert body["detail"]
    if case == "bad_kind":
        assert body["errors"][0]["field"] == "kind"
        assert "reboot_everything" not in r.text  # the input is never echoed
    if case == "missing_field":
        assert "agent_id" in body["detail"]
    if case == "extra_field":
        assert "command" in body["detail"] and "rm -rf" not in r.text

    # Nothing started, nothing learnt, nothing audited but the refusal (without secrets).
    time.sleep(0.05)
    assert gw.starter.calls == []
    assert gw.groups()["g1"]["agents"] == [] and gw.groups()["g1"]["open_incident"] is None
    assert [(a["action"], a["outcome"], a["parameters"]["reason"]) for a in gw.audit.records] == [
        ("request.refuse", "refused", reason)]
    assert SECRET not in json.dumps(gw.audit.records)

    # The same event, sent properly, is still new: the refusal did not record its id.
    ok = gw.post(good)
    assert ok.status_code == 202, ok.text
    assert ok.json()["action"] == "failover"
    assert gw.starter.wait(1, 2)


def test_replays_and_duplicates_are_409_and_act_once(gw: Gateway) -> None:
    alert = event("recovery_exhausted", agent=STANDBY, role="standby")
    raw = json.dumps(alert).encode()
    headers = sign_headers(SECRET.encode(), raw) | {"Content-Type": "application/json"}
    first = httpx.post(gw.url + "/v1/events", content=raw, headers=headers)
    assert first.status_code == 202 and first.json()["action"] == "alert"

    replay = httpx.post(gw.url + "/v1/events", content=raw, headers=headers)
    assert replay.status_code == 409 and replay.json()["reason"] == "replayed"
    resigned = gw.post(raw, now=time.time() - 30)  # same event, fresh valid signature
    assert resigned.status_code == 409 and resigned.json()["reason"] == "duplicate"
    assert "duplicate" in resigned.json()["detail"]

    assert len(gw.audit.of("incident.alert")) == 1
    refusals = [r["parameters"]["reason"] for r in gw.audit.of("request.refuse")]
    assert refusals == ["replayed", "duplicate"]
    assert gw.starter.calls == []


def test_a_forgotten_event_is_new_again(tmp_path: Path) -> None:
    from orchestrator.gateway.store import GatewayStore, Seen

    store = GatewayStore(tmp_path / "s.sqlite")
    try:
        assert store.record_event("e1", "sig-1", "g1", "recovery_exhausted") is Seen.NEW
        store.forget_event("e1", "sig-1")
        assert store.record_event("e1", "sig-1", "g1", "recovery_exhausted") is Seen.NEW
        assert store.record_event("e1", "sig-2", "g1", "recovery_exhausted") is Seen.DUPLICATE
    finally:
        store.close()


def test_the_stored_primary_is_forgotten_only_while_it_names_the_agent(tmp_path: Path) -> None:
    from orchestrator.gateway.store import GatewayStore

    store = GatewayStore(tmp_path / "s.sqlite")
    try:
        assert store.clear_primary("g1", PRIMARY) is None  # nothing stored: nothing to forget
        store.set_primary("g1", STANDBY)
        assert store.clear_primary("g1", PRIMARY) == STANDBY  # another agent's: it stays
        assert store.primary_of("g1") == STANDBY
        assert store.clear_primary("g1", STANDBY) is None
        assert store.primary_of("g1") is None and store.primaries() == {}
    finally:
        store.close()


# -- incidents ----------------------------------------------------------------------------------------


class Heartbeats:
    """Sends heartbeats for one agent from a thread until stopped; remembers the last one's timing."""

    def __init__(self, url: str, agent: str, role: str, every: float = 0.2) -> None:
        self.url, self.agent, self.role, self.every = url, agent, role, every
        self.last_sent = self.last_answered = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                sent = time.perf_counter()
                r = post(self.url, event("heartbeat", agent=self.agent, role=self.role),
                         client=client)
                assert r.status_code == 202, r.text
                self.last_sent, self.last_answered = sent, time.perf_counter()
                self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_silent_primary_is_one_incident_within_the_timeout(gw: Gateway) -> None:
    timeout = 1.0
    with Heartbeats(gw.url, STANDBY, "standby"):
        with Heartbeats(gw.url, PRIMARY, "primary") as primary:
            time.sleep(0.7)
        assert gw.groups()["g1"]["primary"] == PRIMARY
        assert gw.starter.wait(1, timeout + 2), "no incident after the primary went silent"
        called_at, incident = gw.starter.calls[0]
        assert called_at - primary.last_answered <= timeout + 0.2
        assert called_at - primary.last_sent >= timeout - 0.02
        assert incident.kind is IncidentKind.HEARTBEAT_LOST
        assert incident.idempotency_key == "failover:g1:1"
        assert incident.evidence["agent_id"] == PRIMARY
        assert "silent for" in incident.reason
        # Measured when the gateway opened it: a test thread starved on a busy machine reads later.
        age = gw.starter.called_wall[0] - incident.first_failure_at
        assert timedelta(seconds=timeout) <= age < timedelta(seconds=timeout + 1)
        time.sleep(timeout + 0.5)  # the silence continues: still one incident
        assert len(gw.starter.calls) == 1
        view = gw.groups()["g1"]
        assert view["open_incident"]["status"] == "open" and view["open_incident"]["run_id"] == "run-1"
        assert gw.audit.of("incident.alert") == []
    # Now the standby goes silent too: an alert, not a second failover.
    deadline = time.monotonic() + timeout + 1
    while not gw.audit.of("incident.alert") and time.monotonic() < deadline:
        time.sleep(0.05)
    alerts = gw.audit.of("incident.alert")
    assert len(alerts) == 1 and alerts[0]["parameters"]["agent_id"] == STANDBY
    assert len(gw.starter.calls) == 1


def test_a_failed_silence_decision_is_tried_again(gw: Gateway) -> None:
    # Opening the silent primary's incident fails twice (its state file is locked): it is
    # tried again at the next looks, not given up, and the silent standby is handled anyway.
    store = gw.app.state.gateway.store
    real = store.claim_incident
    claims: list[float] = []

    def claim_incident(*args: Any) -> Any:
        claims.append(time.monotonic())
        if len(claims) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(*args)

    store.claim_incident = claim_incident
    assert gw.post(event("heartbeat")).status_code == 202
    assert gw.post(event("heartbeat", agent=STANDBY, role="standby")).status_code == 202
    assert gw.starter.wait(1, 6), "the silent primary's incident was never opened"
    assert gw.starter.calls[0][1].kind is IncidentKind.HEARTBEAT_LOST
    alerts = gw.audit.of("incident.alert")
    assert [a["parameters"]["agent_id"] for a in alerts] == [STANDBY]
    # Tried again at the watch's pace (about a second apart), not in a busy loop; then once.
    assert all(b - a >= 0.5 for a, b in itertools.pairwise(claims)), claims
    time.sleep(1.5)
    assert len(claims) == 3 and len(gw.starter.calls) == 1


def test_a_failed_background_task_is_logged(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async def lease_check() -> None:
        raise RuntimeError("injected failure")

    async def waits() -> None:
        await asyncio.sleep(3600)

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "drflow.gateway" and r.exc_info]

    with running_gateway(make_settings(tmp_path / "gw.sqlite")) as gw:
        service = gw.app.state.gateway
        service.spawn(lease_check())
        service.spawn(waits())
        deadline = time.monotonic() + 5
        while not logged():
            assert time.monotonic() < deadline, "the task's failure was never logged"
            time.sleep(0.02)
    # Only the failure: the task cancelled by the gateway's stop is no error.
    assert len(logged()) == 1, [r.getMessage() for r in logged()]
    assert "lease_check" in logged()[0].getMessage()
    assert "injected failure" in str(logged()[0].exc_info[1])  # type: ignore[index]


def test_recovery_exhausted_is_one_incident_from_the_first_failure(gw: Gateway) -> None:
    failed_at = datetime.now(UTC) - timedelta(seconds=7)
    first = gw.post(event("resource_failed", resource="postgres",
                          observed_at=failed_at.isoformat()))
    assert first.status_code == 202 and first.json()["action"] == "none"
    r = gw.post(event("recovery_exhausted", resource="postgres", details={"attempts": 3}))
    assert r.status_code == 202 and r.json()["action"] == "failover", r.text
    assert r.json()["incident"] == "failover:g1:1"
    assert gw.starter.wait(1, 2)
    incident = gw.starter.calls[0][1]
    assert incident.kind is IncidentKind.RECOVERY_EXHAUSTED
    assert incident.first_failure_at == failed_at
    assert incident.evidence["details"] == {"attempts": 3}

    again = gw.post(event("recovery_exhausted"))
    assert again.status_code == 202 and again.json()["action"] == "none"
    assert "already open" in again.json()["reason"] and again.json()["incident"] == "failover:g1:1"
    time.sleep(0.1)
    assert len(gw.starter.calls) == 1
    started = gw.audit.of("incident.start")
    assert [s["outcome"] for s in started] == ["started"]
    assert started[0]["parameters"]["run_id"] == "run-1"


def test_standby_failure_and_manual_groups_alert_without_failover(gw: Gateway) -> None:
    assert gw.post(event("heartbeat")).status_code == 202
    assert gw.post(event("heartbeat", agent=STANDBY, role="standby")).status_code == 202
    r = gw.post(event("recovery_exhausted", agent=STANDBY, role=None))
    assert r.status_code == 202 and r.json()["action"] == "alert", r.text
    assert "standby" in r.json()["reason"] and "no failover" in r.json()["reason"]

    manual = gw.post(event("recovery_exhausted", group="g2"))
    assert manual.status_code == 202 and manual.json()["action"] == "alert"
    assert "auto_failover is off" in manual.json()["reason"]
    time.sleep(0.2)
    assert gw.starter.calls == []
    assert [a["target"] for a in gw.audit.of("incident.alert")] == ["g1", "g2"]
    assert gw.groups()["g1"]["primary"] == PRIMARY


def test_a_thousand_concurrent_incident_events_start_one_failover(gw: Gateway) -> None:
    same = json.dumps(event("recovery_exhausted")).encode()
    now = time.time()
    # 500 copies of one event (10 distinct signatures: replays and re-signed duplicates) and
    # 500 distinct incident events, interleaved.
    bodies: list[tuple[bytes, float]] = [(same, now - (i % 10)) for i in range(500)]
    bodies += [(json.dumps(event("recovery_exhausted")).encode(), now) for _ in range(500)]
    random.Random(4).shuffle(bodies)
    local = threading.local()

    def send(item: tuple[bytes, float]) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        return post(gw.url, item[0], now=item[1], client=local.client).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=48) as pool:
        codes = list(pool.map(send, bodies))
    elapsed = time.perf_counter() - started
    time.sleep(0.3)
    assert sorted(set(codes)) == [202, 409]
    assert codes.count(202) == 501 and codes.count(409) == 499
    assert len(gw.starter.calls) == 1
    assert gw.starter.calls[0][1].idempotency_key == "failover:g1:1"
    print(f"\n1,000 concurrent events in {elapsed:.2f} s; start_incident calls: 1")


async def _async_burst(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as client:
        async def one() -> int:
            raw = json.dumps(event("recovery_exhausted")).encode()
            r = await client.post(url + "/v1/events", content=raw,
                                  headers={**sign_headers(SECRET.encode(), raw),
                                           "Content-Type": "application/json"})
            return r.status_code
        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_concurrent_async_incidents_and_heartbeat_loss_start_one_failover(gw: Gateway) -> None:
    # The primary goes silent while a burst of incident events arrives: still one failover.
    assert gw.post(event("heartbeat")).status_code == 202
    time.sleep(0.9)
    codes = asyncio.run(_async_burst(gw.url, 200))
    assert codes == [202] * 200
    time.sleep(1.0)
    assert len(gw.starter.calls) == 1


def test_closing_the_incident_opens_the_next_epoch(gw: Gateway) -> None:
    assert gw.post(event("recovery_exhausted")).status_code == 202
    assert gw.starter.wait(1, 2)
    assert gw.close("failover:g1:9").status_code == 409
    unsigned = httpx.post(gw.url + "/v1/groups/g1/incident/close",
                          json={"idempotency_key": "failover:g1:1"})
    assert unsigned.status_code == 401
    assert gw.close("failover:g1:1", group="nope").status_code == 404
    assert gw.groups()["g1"]["open_incident"]["idempotency_key"] == "failover:g1:1"

    closed = gw.close("failover:g1:1", outcome="failed_over")
    assert closed.status_code == 200, closed.text
    assert closed.json() == {"closed": "failover:g1:1", "outcome": "failed_over",
                             "run_id": "run-1"}
    assert gw.close("failover:g1:1").status_code == 409
    view = gw.groups()["g1"]
    assert view["open_incident"] is None and view["primary"] is None

    nxt = gw.post(event("recovery_exhausted", agent=STANDBY))  # the new primary fails too
    assert nxt.status_code == 202 and nxt.json()["incident"] == "failover:g1:2"
    assert gw.starter.wait(2, 2)
    assert [c[1].idempotency_key for c in gw.starter.calls] == ["failover:g1:1", "failover:g1:2"]
    # The in-process way, from another thread (as a flow run in the same process would).
    service = gw.app.state.gateway
    rec = service.close_incident_threadsafe("g1", "failover:g1:2", "failed_over", "standby promoted")
    assert rec.status.value == "closed" and rec.run_id == "run-2"
    assert gw.groups()["g1"]["open_incident"] is None
    closes = gw.audit.of("incident.close")
    assert [c["parameters"]["outcome"] for c in closes] == ["failed_over", "failed_over"]


def test_an_incident_closed_without_a_promotion_leaves_its_primary_failed_over_next_time(
        gw: Gateway) -> None:
    # The primary's failure was not confirmed (it re-acquired its lease): it still serves, and
    # its next failure is a failover, not "not the known primary".
    assert gw.post(event("heartbeat")).status_code == 202
    assert gw.post(event("recovery_exhausted")).status_code == 202
    assert gw.starter.wait(1, 2)
    assert gw.close("failover:g1:1", outcome="reacquired").status_code == 200
    assert gw.groups()["g1"]["primary"] == PRIMARY
    assert gw.post(event("heartbeat", role=None)).status_code == 202  # then silence
    assert gw.starter.wait(2, 5)
    incident = gw.starter.calls[1][1]
    assert incident.kind is IncidentKind.HEARTBEAT_LOST and incident.idempotency_key == \
        "failover:g1:2", incident


def test_a_failed_start_is_retried_with_the_same_key(tmp_path: Path) -> None:
    with running_gateway(make_settings(tmp_path / "s.sqlite"), RecordingStarter(fail_times=2)) as g:
        assert g.post(event("recovery_exhausted")).status_code == 202
        assert g.starter.wait(3, 5)
        assert {c[1].idempotency_key for c in g.starter.calls} == {"failover:g1:1"}
        time.sleep(0.1)
        assert g.groups()["g1"]["open_incident"]["run_id"] == "run-3"
        assert [s["outcome"] for s in g.audit.of("incident.start")] == ["failed", "failed", "started"]
        time.sleep(0.5)
        assert len(g.starter.calls) == 3


def test_metrics_health_and_groups(gw: Gateway) -> None:
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    assert gw.post(event("heartbeat")).status_code == 202
    assert httpx.post(gw.url + "/v1/events", content=b"{}").status_code == 401
    assert gw.post(event("recovery_exhausted")).status_code == 202
    assert gw.starter.wait(1, 2)
    time.sleep(0.05)
    text = httpx.get(gw.url + "/metrics").text
    assert 'drflow_gateway_events_total{kind="heartbeat",result="accepted"} 1.0' in text
    assert 'drflow_gateway_rejections_total{reason="unsigned"} 1.0' in text
    assert 'drflow_gateway_incidents_started_total{group="g1",kind="recovery_exhausted"} 1.0' in text
    assert 'drflow_gateway_heartbeat_age_seconds{agent_id="pg-a",group="g1",role="primary"}' in text
    assert "drflow_gateway_incident_start_seconds_count 1.0" in text
    view = gw.groups()
    assert view["g1"]["primary"] == PRIMARY and view["g1"]["primary_heartbeat_age_s"] < 5
    assert view["g1"]["open_incident"]["kind"] == "recovery_exhausted"
    assert view["g2"] == {"auto_failover": False, "primary": None, "primary_heartbeat_age_s": None,
                          "agents": [], "open_incident": None}


def test_incident_start_latency(gw: Gateway) -> None:
    """Event sent → start_incident called (includes HTTP and signing), over many incidents."""
    runs = 60
    latencies = []
    with httpx.Client(timeout=5) as client:
        post(gw.url, event("heartbeat"), client=client)  # warm the connection and the app
        for i in range(1, runs + 1):
            body = event("recovery_exhausted")
            sent = time.perf_counter()
            assert post(gw.url, body, client=client).status_code == 202
            assert gw.starter.wait(i, 2)
            latencies.append(gw.starter.calls[-1][0] - sent)
            r = post(gw.url, {"idempotency_key": f"failover:g1:{i}"}, client=client,
                     path="/v1/groups/g1/incident/close")
            assert r.status_code == 200, r.text
            # The agent recovers, so its next report is a new failure (not held down).
            assert post(gw.url, event("resource_recovered"), client=client).status_code == 202
    p50 = statistics.median(latencies)
    p90 = statistics.quantiles(latencies, n=10)[-1]
    print(f"\nevent sent -> start_incident called over {runs} incidents: "
          f"p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert p50 < 0.05


def test_agent_style_roles_name_the_primary(gw: Gateway) -> None:
    """The guest agent reports `details.roles` (resource → role) and role_changed `to`."""
    hb = event("heartbeat", role=None, details={"roles": {"postgres": "primary"}})
    assert gw.post(hb).status_code == 202
    standby = event("heartbeat", agent=STANDBY, role=None, details={"roles": {"postgres": "standby"}})
    assert gw.post(standby).status_code == 202
    assert gw.groups()["g1"]["primary"] == PRIMARY
    # The standby is promoted: it says so, and becomes the group's primary.
    changed = event("role_changed", agent=STANDBY, role=None, resource="postgres",
                    details={"from": "standby", "to": "primary"})
    assert gw.post(changed).status_code == 202
    assert gw.groups()["g1"]["primary"] == STANDBY
    # The old primary's exhaustion is now only an alert; the new primary's is a failover.
    old = gw.post(event("recovery_exhausted", role=None, resource="postgres"))
    assert old.json()["action"] == "alert", old.text
    new = gw.post(event("recovery_exhausted", agent=STANDBY, role=None, resource="postgres"))
    assert new.json()["action"] == "failover", new.text
    assert gw.starter.wait(1, 2) and gw.starter.calls[0][1].evidence["agent_id"] == STANDBY


def test_with_the_real_audit_store(tmp_path: Path) -> None:
    from drflow.audit import open_store

    store = open_store(f"sqlite:///{tmp_path / 'audit.db'}", secret_values=[SECRET])
    settings = make_settings(tmp_path / "gw.sqlite")
    app = create_app(settings, RecordingStarter(), store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(port, 10, "gateway")
        url = f"http://127.0.0.1:{port}"
        assert post(url, event("recovery_exhausted"), secret="wrong").status_code == 401
        assert post(url, event("recovery_exhausted")).status_code == 202
        assert _wait_for(lambda: len(store.records()) >= 3, 3)
    finally:
        server.should_exit = True
        thread.join(10)
    records = store.records()
    assert [(r.action, r.outcome) for r in records] == [
        ("request.refuse", "refused"), ("incident.open", "opened"), ("incident.start", "started")]
    assert store.verify().ok
    assert SECRET not in json.dumps([r.model_dump(mode="json") for r in records])
    store.close()


def test_settings_from_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from drflow import secrets
    from drflow.config import load_config
    from orchestrator.gateway.from_config import listen_address, settings_from_config

    secrets.clear_cache()
    monkeypatch.setenv("DRFLOW_WEBHOOK_SECRET", SECRET)
    cfg = load_config(Path(__file__).parents[1] / "examples" / "drflow.yaml")
    settings = settings_from_config(cfg, tmp_path / "gw.sqlite", max_body_bytes=1024)
    assert settings.webhook_secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    assert settings.heartbeat_timeout_s == cfg.gateway.heartbeat_timeout_s
    assert settings.groups == {g.name: GroupPolicy(auto_failover=g.policy.auto_failover)
                               for g in cfg.groups}
    assert settings.max_body_bytes == 1024
    assert cfg.etcd is not None  # the example names three members: the gateway watches them
    assert settings.etcd_endpoints == [str(u) for u in cfg.etcd.endpoints]
    assert settings.etcd_timeout_s == cfg.etcd.timeout_s
    no_etcd = settings_from_config(cfg.model_copy(update={"etcd": None}), tmp_path / "gw.sqlite")
    assert no_etcd.etcd_endpoints == []
    assert listen_address(cfg) == ("127.0.0.1", 8088)
    secrets.clear_cache()


# -- restart: a real process, killed and started again on the same state ------------------------------


def _serve_from_file(config_path: str) -> None:
    """Entry point of the gateway process used by the restart test."""
    cfg = json.loads(Path(config_path).read_text())
    calls, audit_path = Path(cfg["calls"]), Path(cfg["audit"])

    class FileStarter:
        async def start_incident(self, incident: Incident) -> str:
            with calls.open("a") as f:
                f.write(incident.model_dump_json() + "\n")
            if cfg["fail"]:
                raise ConnectionError("Prefect API unreachable (injected)")
            return f"run-{incident.idempotency_key}"

    class FileAudit:
        def append(self, actor: str, action: str, target: str, parameters: dict[str, Any],
                   outcome: str, reason: str) -> None:
            with audit_path.open("a") as f:
                f.write(json.dumps({"action": action, "outcome": outcome, "reason": reason}) + "\n")

    settings = make_settings(Path(cfg["state"]), heartbeat_timeout_s=60)
    run(settings, FileStarter(), port=cfg["port"], audit=FileAudit(), log_level="info")


@contextmanager
def gateway_process(tmp: Path, fail: bool) -> Iterator[str]:
    port = free_port()
    cfg = {"state": str(tmp / "state.sqlite"), "calls": str(tmp / "calls.jsonl"),
           "audit": str(tmp / "audit.jsonl"), "port": port, "fail": fail}
    cfg_path = tmp / f"gw-{port}.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = spawn([sys.executable, __file__, str(cfg_path)], tmp / "gateway.log")
    try:
        wait_port(port, 30, "gateway", proc, tmp / "gateway.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        # SIGKILL: the state must survive a crash, not only a clean stop.
        kill_tree(proc.pid)
        stop_tree(proc.pid)
        proc.wait(10)


def _calls(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_for(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_state_survives_a_gateway_crash_and_restart(tmp_path: Path) -> None:
    heartbeat = json.dumps(event("heartbeat")).encode()
    heartbeat_headers = {**sign_headers(SECRET.encode(), heartbeat),
                         "Content-Type": "application/json"}
    with gateway_process(tmp_path, fail=False) as url:
        r = httpx.post(url + "/v1/events", content=heartbeat, headers=heartbeat_headers)
        assert r.status_code == 202
        assert post(url, event("recovery_exhausted")).json()["incident"] == "failover:g1:1"
        assert _wait_for(lambda: httpx.get(url + "/v1/groups").json()["g1"]["open_incident"]
                         ["status"] == "open", 5)

    with gateway_process(tmp_path, fail=False) as url:
        replay = httpx.post(url + "/v1/events", content=heartbeat, headers=heartbeat_headers)
        assert replay.status_code == 409 and replay.json()["reason"] == "replayed"
        dup = post(url, heartbeat, now=time.time() - 20)
        assert dup.status_code == 409 and dup.json()["reason"] == "duplicate"
        view = httpx.get(url + "/v1/groups").json()["g1"]
        assert view["primary"] == PRIMARY
        assert view["open_incident"]["run_id"] == "run-failover:g1:1"
        again = post(url, event("recovery_exhausted"))
        assert again.json()["action"] == "none" and again.json()["incident"] == "failover:g1:1"
        time.sleep(0.2)
        assert len(_calls(tmp_path)) == 1
        # Closing works across the restart, and the epoch keeps counting (no key is reused).
        assert post(url, {"idempotency_key": "failover:g1:1"},
                    path="/v1/groups/g1/incident/close").status_code == 200
        # The same agent's next report is held down into the closed incident, until it recovers.
        held = post(url, event("recovery_exhausted")).json()
        assert held["action"] == "join" and held["incident"] == "failover:g1:1"
        assert post(url, event("resource_recovered")).status_code == 202
        assert post(url, event("recovery_exhausted")).json()["incident"] == "failover:g1:2"
        assert _wait_for(lambda: len(_calls(tmp_path)) == 2, 5)
    log = (tmp_path / "gateway.log").read_text() + (tmp_path / "audit.jsonl").read_text()
    assert SECRET not in log


def test_an_unstarted_incident_is_started_after_a_restart(tmp_path: Path) -> None:
    with gateway_process(tmp_path, fail=True) as url:
        assert post(url, event("recovery_exhausted")).json()["action"] == "failover"
        assert _wait_for(lambda: len(_calls(tmp_path)) >= 1, 5)
        view = httpx.get(url + "/v1/groups").json()["g1"]["open_incident"]
        assert view["status"] == "start_failed" and "unreachable" in view["error"]
    n_failed = len(_calls(tmp_path))
    with gateway_process(tmp_path, fail=False) as url:
        # No new event: the restarted gateway re-drives the start with the same key.
        assert _wait_for(lambda: httpx.get(url + "/v1/groups").json()["g1"]["open_incident"]
                         ["status"] == "open", 5)
        keys = {c["idempotency_key"] for c in _calls(tmp_path)}
        assert keys == {"failover:g1:1"} and len(_calls(tmp_path)) == n_failed + 1


if __name__ == "__main__":
    _serve_from_file(sys.argv[1])


def test_replication_evidence_from_primary_heartbeats() -> None:
    from orchestrator.gateway.replication import ReplicationEvidence, parse_heartbeat

    hb = {"postgres": {"role": "primary", "wal_lsn": "0/3000060",
                       "replicas": [{"name": "s", "state": "streaming", "sync_state": "sync"}]}}
    assert parse_heartbeat(hb) == (0x3000060, True)
    assert parse_heartbeat({"postgres": {"role": "standby"}}) == (None, None)
    ev = ReplicationEvidence()
    ev.record("g", "a", hb, now=100.0)
    ev.record("g", "a", {"postgres": {"role": "primary", "wal_lsn": "0/3000100",
                                      "replicas": []}}, now=101.0)
    out = ev.evidence("g", "a")
    assert out["primary_last_lsn"] == 0x3000100
    assert out["primary_lsn_history"] == [[100.0, 0x3000060], [101.0, 0x3000100]]
    assert out["sync_standby_streaming"] is False  # the last report had no sync standby


def test_replication_evidence_merged_from_other_replicas_is_pruned() -> None:
    from orchestrator.gateway.replication import HISTORY_S, ReplicationEvidence

    # An agent only another replica hears: its reports arrive by merge() alone, twenty at a
    # time, here those of the last ten minutes; what is older than HISTORY_S goes, as with
    # record().
    ev = ReplicationEvidence()
    start = time.time() - 600
    for t in range(0, 600, 5):
        points = [[start + t - i * 0.25, 1000 + t] for i in range(20)]
        ev.merge("g", "a", {"primary_lsn_history": points}, start + t)
    hist = ev.evidence("g", "a")["primary_lsn_history"]
    assert hist and min(t for t, _ in hist) >= time.time() - HISTORY_S - 1, len(hist)
    assert hist[-1][1] == 1595
