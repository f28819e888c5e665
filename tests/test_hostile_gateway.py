"""Hostile input against a real gateway on the lab: every finding gets its documented
4xx and changes nothing; event storms open one incident; slow clients are cut off while
heartbeats stay fast."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import statistics
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from drflow.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_headers, signature
from lab import vcsim
from lab.slack_standin import SlackLab
from tests.harness import Env, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def env(prefect_api: str) -> Iterator[Env]:
    e = start_env(groups=3, replication="sync")
    try:
        yield e
    finally:
        stop_env(e)


def _names(env: Env) -> list[str]:
    return [g["name"] for g in env.state["groups"]]


def _secret(env: Env) -> bytes:
    return str(env.state["secrets"]["webhook"]).encode()


def _event(agent: str, group: str, kind: str = "heartbeat", **details: Any) -> bytes:
    return json.dumps({"event_id": str(uuid.uuid4()), "agent_id": agent, "group": group,
                       "kind": kind, "resource": "postgres",
                       "observed_at": datetime.now(UTC).isoformat(), "details": details}).encode()


def _slack_post(env: Env, body: bytes, ts: str | None = None) -> httpx.Response:
    secret = str(env.state["slack"]["signing_secret"]).encode()
    ts = ts or str(int(time.time()))
    sig = "v0=" + hmac.new(secret, f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return httpx.post(env.gateway_url + "/slack/actions", content=body, timeout=10, headers={
        "Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": sig})


def _click(value: str) -> bytes:
    payload = {"type": "block_actions", "user": {"id": "U0ATTACK"},
               "actions": [{"action_id": "drflow_failback_approve", "value": value}],
               "response_url": "http://127.0.0.1:9/nowhere"}
    return urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()


def _snapshot(env: Env) -> dict[str, Any]:
    """What a refused request must not change: audit (other than refusals), incidents, agents
    the gateway knows, and each group's roles record."""
    audit = sorted((r.action, r.target, r.outcome) for r in env.audit_records()
                   if r.action != "request.refuse")
    groups = env.groups_status()
    roles = {}
    for g in _names(env):
        r = httpx.get(f"{env.gateway_url}/v1/groups/{g}/roles", timeout=5).json()
        roles[g] = {k: r[k] for k in ("primary_site", "protected", "seq", "transition")}
    return {"audit": audit, "roles": roles,
            "incidents": {g: v["open_incident"] for g, v in groups.items()},
            "agents": {g: sorted(a["agent_id"] for a in v["agents"]) for g, v in groups.items()}}


def _finding_cases(env: Env) -> dict[str, tuple[Callable[[], httpx.Response], int, str]]:
    group = _names(env)[2]
    agent = env.group(group)["primary"]["vm"]
    secret = _secret(env)
    url = env.gateway_url
    now = int(time.time())

    def with_ts(ts: str) -> httpx.Response:
        # The HMAC is right for this very timestamp string: only its form is wrong.
        heartbeat = _event(agent, group, role="primary")
        return httpx.post(url + "/v1/events", content=heartbeat, timeout=10, headers={
            **JSON, TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: signature(secret, ts, heartbeat)})

    def signed(body: bytes, path: str = "/v1/events", **headers: str) -> httpx.Response:
        return httpx.post(url + path, content=body, timeout=10,
                          headers={**JSON, **sign_headers(secret, body), **headers})

    deep = "[" * 10_000 + "]" * 10_000
    return {
        "slack payload nested 10,000 deep": (
            lambda: _slack_post(env, urllib.parse.urlencode({"payload": deep}).encode()),
            422, "too_complex"),
        "slack button value nested 5,000 deep": (
            lambda: _slack_post(env, _click("[" * 5_000 + "]" * 5_000)), 400, "malformed"),
        "slack body not UTF-8": (
            lambda: _slack_post(env, b"payload=%7B%7D&x=\xff\xfe"), 400, "malformed"),
        "slack timestamp with underscores": (
            lambda: _slack_post(env, _click("{}"), ts=f"{now:_}"), 401, "bad_timestamp"),
        "event body nested 10,000 deep": (lambda: signed(deep.encode()), 422, "too_complex"),
        "roles update nested 10,000 deep": (
            lambda: signed(deep.encode(), f"/v1/groups/{group}/roles"), 422, "too_complex"),
        "timestamp with leading zeros": (lambda: with_ts(f"000{now}"), 401, "bad_timestamp"),
        "timestamp with underscores": (lambda: with_ts(f"{now:_}"), 401, "bad_timestamp"),
        "timestamp with a sign": (lambda: with_ts(f"+{now}"), 401, "bad_timestamp"),
        "non-ASCII signature header": (
            lambda: httpx.post(url + "/v1/events", content=_event(agent, group), timeout=10,
                               headers=[
                (b"Content-Type", b"application/json"), (TIMESTAMP_HEADER.encode(), str(now).encode()),
                (SIGNATURE_HEADER.encode(), b"sha256=\xb2")]),
            401, "bad_signature"),
        "event as text/plain": (
            lambda: signed(_event(agent, group, role="primary"), **{"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type"),
        "heartbeat from an unknown agent (NUL in its id)": (
            lambda: signed(_event(agent + "\x00evil", group, role="primary")), 403,
            "unknown_agent"),
        # However the 60 KB head is cut into segments (one on loopback, dozens across a
        # network), the refusal is the same and arrives before the connection closes.
        "roles read with a 60 KB nonce": (
            lambda: httpx.get(f"{url}/v1/groups/{group}/roles", params={"nonce": "n" * 60_000},
                              timeout=10), 431, "oversized"),
    }


def _quiet(env: Env) -> dict[str, Any]:
    """The lab's own traffic has settled (every agent heard, boot reports in): a snapshot."""
    wait_for(lambda: all(len(v["agents"]) == 2 for v in env.groups_status().values()), 60,
             "every agent heard by the gateway", 0.5)
    last = _snapshot(env)
    for _ in range(60):
        time.sleep(2)
        now = _snapshot(env)
        if now == last:
            return now
        last = now
    raise TimeoutError("the lab did not settle")


def test_each_gateway_finding_gets_its_4xx_and_changes_nothing(env: Env) -> None:
    before = _quiet(env)
    log = env.lab_dir / "logs" / "gateway.log"
    log_start = log.stat().st_size
    failures = []
    for name, (send, status, reason) in _finding_cases(env).items():
        r = send()
        body = r.text
        got = (r.status_code, r.json().get("reason") if r.headers.get("content-type", "").startswith(
            "application/json") else None)
        print(f"{name}: {r.status_code} {body[:120]!r} ({len(body)} bytes)")
        if got != (status, reason):
            failures.append(f"{name}: expected {status} {reason}, got {got} {body[:200]!r}")
        elif len(body) > 2_000:
            failures.append(f"{name}: the refusal echoes {len(body)} bytes of input")
    # An unknown agent must not become an agent the gateway watches: no alert once its
    # "heartbeat" goes silent (the lab's heartbeat timeout is 3 s).
    time.sleep(4)
    assert failures == []
    assert _snapshot(env) == before
    text = log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in text and "Exception in ASGI application" not in text, \
        text[max(0, text.find("Traceback") - 300):][:4000]


# Before the storms: a failover running in the gateway's process (embedded mode) competes
# with its event loop, which is not what this test measures.
class SlowClient(threading.Thread):
    """Holds connections open by sending one byte a second: the request line and headers
    (`part="headers"`) or, after complete headers, the body. Reconnects whenever the server
    closes; records how long the server let each connection live."""

    def __init__(self, host: str, port: int, part: str, until: float) -> None:
        super().__init__(daemon=True)
        self.addr, self.part, self.until = (host, port), part, until
        self.lived: list[float] = []
        self.open_at_end = 0

    def _prefix(self) -> bytes:
        head = b"POST /v1/events HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        return head + b"Content-Length: 1000\r\n\r\n" if self.part == "body" else b""

    def run(self) -> None:
        trickle = (b"POST /v1/events HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * 200
                   if self.part == "headers" else b"{" + b" " * 999)
        while time.monotonic() < self.until:
            sock = socket.create_connection(self.addr, timeout=5)
            sock.settimeout(1.0)
            opened = time.monotonic()
            try:
                sock.sendall(self._prefix())
                for byte in trickle:
                    if time.monotonic() >= self.until:
                        self.open_at_end += 1
                        break
                    sock.sendall(bytes([byte]))
                    try:
                        sock.recv(4096)  # the server's 408 or its close: cut off
                        break
                    except TimeoutError:  # a second without an answer: next byte
                        continue
            except (ConnectionError, OSError):
                pass
            finally:
                if time.monotonic() < self.until:
                    self.lived.append(time.monotonic() - opened)
                sock.close()


def test_slow_clients_are_cut_off_while_heartbeats_stay_fast(env: Env) -> None:
    group = _names(env)[2]
    agent = env.group(group)["primary"]["vm"]
    secret = _secret(env)
    host, port = env.gateway_url.removeprefix("http://").rsplit(":", 1)
    log = env.lab_dir / "logs" / "gateway.log"
    log_start = log.stat().st_size
    alerts_before = len(env.audit_records("incident.alert", group))

    def heartbeats(seconds: float) -> list[float]:
        latencies = []
        end = time.monotonic() + seconds
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < end:
                body = _event(agent, group, role="primary")
                t = time.perf_counter()
                r = client.post(f"{env.gateway_url}/v1/events", content=body,
                                headers={**JSON, **sign_headers(secret, body)})
                latencies.append(time.perf_counter() - t)
                assert r.status_code == 202, r.text
                time.sleep(0.05)
        return latencies

    # The same heartbeats without slow clients, for comparison on this (shared) machine.
    quiet = heartbeats(5)
    until = time.monotonic() + 20
    clients = [SlowClient(host, int(port), "headers" if i % 2 else "body", until)
               for i in range(50)]
    for c in clients:
        c.start()
    latencies = heartbeats(until - time.monotonic())
    for c in clients:
        c.join(10)
    p99 = statistics.quantiles(latencies, n=100)[98]
    header_lives = [x for c in clients if c.part == "headers" for x in c.lived]
    body_lives = [x for c in clients if c.part == "body" for x in c.lived]
    print(f"\nwithout slow clients: p50 {statistics.median(quiet) * 1000:.1f} ms, p99 "
          f"{statistics.quantiles(quiet, n=100)[98] * 1000:.1f} ms")
    print(f"heartbeats: {len(latencies)}, p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; slow connections "
          f"closed by the server: headers {len(header_lives)} (longest "
          f"{max(header_lives, default=0):.1f} s), body {len(body_lives)} (longest "
          f"{max(body_lives, default=0):.1f} s)")
    assert all(c.lived for c in clients), "a slow connection was never closed by the server"
    assert max(header_lives) < 5 + 1.5  # header timeout 5 s
    assert max(body_lives) < 10 + 1.5  # body timeout 10 s
    assert p99 < 0.1
    assert env.groups_status()[group]["open_incident"] is None
    assert len(env.audit_records("incident.alert", group)) == alerts_before
    time.sleep(1)  # the connections the clients hung up themselves, logged
    text = log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in text and "Exception in ASGI application" not in text, \
        text[max(0, text.find("Traceback") - 300):][:4000]


def _storm(env: Env, group: str, n: int = 1_000, over_s: float = 10.0) -> list[int]:
    """`n` distinct, correctly signed recovery_exhausted events of the group's primary agent,
    spread evenly over `over_s` seconds."""
    agent = env.group(group)["primary"]["vm"]
    secret = _secret(env)
    bodies = [_event(agent, group, "recovery_exhausted", reason="storm") for _ in range(n)]
    t0 = time.monotonic()
    local = threading.local()

    def send(i: int) -> int:
        delay = t0 + i * over_s / n - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=10)
        body = bodies[i]
        r = client.post(f"{env.gateway_url}/v1/events", content=body,
                        headers={**JSON, **sign_headers(secret, body)})
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(send, range(n)))
    print(f"\n{n} events in {time.monotonic() - t0:.1f} s")
    return codes


def _slack_threads(env: Env, group: str) -> list[dict[str, Any]]:
    slack = SlackLab(env.state["slack"]["url"])
    return [m for m in slack.messages() if f"*{group}*" in m.get("text", "")
            and m.get("thread_ts", m.get("ts")) == m.get("ts")]


def _settle(env: Env, group: str) -> None:
    """The storm's incident has finished and the group has no open incident."""
    wait_for(lambda: env.audit_records("failover.finish", group), 90, f"failover of {group} ended")
    wait_for(lambda: env.groups_status()[group]["open_incident"] is None, 30,
             f"incident of {group} closed")
    time.sleep(2)


def _storm_outcome(env: Env, group: str) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """Once the storm settled: the group's incidents opened, runs started and finished, alerts."""
    _settle(env, group)
    opened = env.audit_records("incident.open", group)
    runs = env.audit_records("failover.start", group)
    finished = env.audit_records("failover.finish", group)
    alerts = env.audit_records("incident.alert", group)
    print(f"incidents {len(opened)}, runs {len(runs)}, outcome "
          f"{[f.outcome for f in finished]}, alerts {len(alerts)}, joins "
          f"{len(env.audit_records('incident.join', group))}")
    return opened, runs, finished, alerts


def test_storm_for_a_healthy_primary_is_one_incident_one_run_one_thread(env: Env) -> None:
    group = _names(env)[0]
    threads_before = len(_slack_threads(env, group))
    codes = _storm(env, group)
    assert set(codes) == {202}, sorted(set(codes))
    opened, runs, finished, alerts = _storm_outcome(env, group)
    assert len(opened) == 1 and len(runs) == 1
    assert finished[-1].outcome == "not_confirmed", finished[-1].reason
    assert len(alerts) <= 1
    assert len(_slack_threads(env, group)) == threads_before + 1
    assert env.writable(env.group(group)["primary"])


def test_storm_for_a_dead_primary_is_one_failover(env: Env) -> None:
    group = _names(env)[1]
    g = env.group(group)
    vcsim.power_off(env.si(), g["primary"]["vm"])
    codes = _storm(env, group)
    assert set(codes) <= {202}, sorted(set(codes))
    opened, runs, finished, alerts = _storm_outcome(env, group)
    assert len(opened) == 1 and len(runs) == 1
    assert finished[-1].outcome == "ok", finished[-1].reason
    # One run promoted (its step is audited before and after).
    promotions = env.audit_records("failover.promote standby", g["standby"]["vm"])
    assert len({r.actor for r in promotions}) == 1
    assert len(alerts) <= 2  # at most the old primary's silence, once
