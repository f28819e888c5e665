"""Slack approvals: the pure rules, and `POST /slack/actions` over real HTTP resuming real paused
Prefect runs, with clicks signed by the Slack stand-in (a real process)."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from drflow.approval import Ledger, Verdict, answer, check_answer, decide_click
from drflow.audit import AuditStore, open_store
from lab import procs
from lab.slack_standin import SlackLab, start_slack
from orchestrator.gateway import GatewaySettings, GroupPolicy, Incident, create_app
from orchestrator.gateway.settings import GroupRoster

WEBHOOK_SECRET = "wh-secret-for-approval-tests-5d1e"
APPROVERS = ["U0ONCALL1", "U0ONCALL2"]
APPROVE, REJECT = "drflow_failback_approve", "drflow_failback_reject"


# -- the pure rules ---------------------------------------------------------------------------


def click(ledger: Ledger, user: str, choice: str = "approve", required: int = 1,
          waiting: bool = True) -> Any:
    return decide_click(ledger, user, choice, approvers=APPROVERS,  # type: ignore[arg-type]
                        required=required, waiting=waiting, waiting_detail="the run is Failed")


def test_one_approval_decides() -> None:
    out = click(Ledger(), "U0ONCALL1")
    assert out.verdict is Verdict.APPROVED and out.resumes
    assert out.ledger.decided == "approved" and out.ledger.decided_by == ("U0ONCALL1",)
    again = click(out.ledger, "U0ONCALL2", "reject")
    assert again.verdict is Verdict.CLOSED and not again.changes
    assert "already approved by <@U0ONCALL1>" in again.reason


def test_two_distinct_approvers_when_required() -> None:
    first = click(Ledger(), "U0ONCALL1", required=2)
    assert first.verdict is Verdict.RECORDED and not first.resumes and first.changes
    dup = click(first.ledger, "U0ONCALL1", required=2)
    assert dup.verdict is Verdict.DUPLICATE and not dup.changes
    second = click(first.ledger, "U0ONCALL2", required=2)
    assert second.verdict is Verdict.APPROVED
    assert second.ledger.decided_by == ("U0ONCALL1", "U0ONCALL2")


@pytest.mark.parametrize(("user", "choice", "waiting", "verdict", "words"), [
    ("U0STRANGER", "approve", True, Verdict.REFUSED, "is not an approver"),
    ("U0STRANGER", "reject", True, Verdict.REFUSED, "nothing changed"),
    ("U0ONCALL2", "reject", True, Verdict.REJECTED, "rejected by <@U0ONCALL2>"),
    ("U0ONCALL1", "approve", False, Verdict.CLOSED, "the run is Failed"),
])
def test_click_verdicts(user: str, choice: str, waiting: bool, verdict: Verdict,
                        words: str) -> None:
    out = click(Ledger(), user, choice, waiting=waiting)
    assert out.verdict is verdict and words in out.reason


def test_reject_vetoes_a_pending_second_approval() -> None:
    first = click(Ledger(), "U0ONCALL1", required=2)
    out = click(first.ledger, "U0ONCALL2", "reject", required=2)
    assert out.verdict is Verdict.REJECTED and out.ledger.decided == "rejected"


def test_the_flow_trusts_only_the_gateways_proof() -> None:
    secret = b"s3cret"
    led = click(Ledger(), "U0ONCALL1").ledger
    ans = answer(led, "run-1", secret)
    ok = check_answer(run_id="run-1", approved=True, approvers=ans["approvers"],
                      given_proof=ans["proof"], secret=secret, allowed=APPROVERS, required=1)
    assert ok.proceed
    typed_in_ui = check_answer(run_id="run-1", approved=True, approvers=["U0ONCALL1"],
                               given_proof="", secret=secret, allowed=APPROVERS, required=1)
    assert not typed_in_ui.proceed and "Prefect UI" in typed_in_ui.reason
    other_run = check_answer(run_id="run-2", approved=True, approvers=ans["approvers"],
                             given_proof=ans["proof"], secret=secret, allowed=APPROVERS,
                             required=1)
    assert not other_run.proceed
    too_few = check_answer(run_id="run-1", approved=True, approvers=ans["approvers"],
                           given_proof=ans["proof"], secret=secret, allowed=APPROVERS,
                           required=2)
    assert not too_few.proceed


# -- over HTTP, with real paused runs ---------------------------------------------------------


@dataclass
class Rig:
    url: str
    slack: SlackLab
    audit_path: Path
    signing_secret: str
    bot_token: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def audit(self) -> list[Any]:
        store = open_store(f"sqlite:///{self.audit_path}")
        try:
            return [r for r in store.records() if r.action == "slack.approval"]
        finally:
            store.close()


class NoIncidents:
    async def start_incident(self, incident: Incident) -> str:
        raise AssertionError("no incident expected here")


@pytest.fixture(scope="module")
def rig(prefect_api: str) -> Iterator[Rig]:
    tmp = Path(tempfile.mkdtemp(prefix="drflow-approvals-"))
    (tmp / "logs").mkdir()
    slack_info = start_slack(tmp)
    audit_path = tmp / "audit.db"
    audit: AuditStore = open_store(f"sqlite:///{audit_path}")
    settings = GatewaySettings(
        webhook_secret=WEBHOOK_SECRET, slack_signing_secret=slack_info["signing_secret"],
        state_path=tmp / "gw.sqlite",
        groups={"one": GroupPolicy(), "two": GroupPolicy()},
        rosters={"one": GroupRoster(approvers=APPROVERS, approvals_required=1),
                 "two": GroupRoster(approvers=APPROVERS, approvals_required=2)})
    app = create_app(settings, NoIncidents(), audit=audit)
    port = procs.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.02)
    slack = SlackLab(slack_info["url"])
    slack.set_request_url(f"http://127.0.0.1:{port}/slack/actions")
    try:
        yield Rig(f"http://127.0.0.1:{port}", slack, audit_path, slack_info["signing_secret"],
                  slack_info["bot_token"])
    finally:
        server.should_exit = True
        thread.join(10)
        audit.close()
        procs.stop_tree(slack_info["pid"], timeout=3)
        shutil.rmtree(tmp, ignore_errors=True)


def _paused_failback(rig: Rig, group: str, timeout_s: int = 60,
                     flow_name: str = "failback", post_to_pause_s: float = 0.0,
                     wait_paused: bool = True) -> tuple[str, str, threading.Thread]:
    """Start a stand-in flow run (a "failback" unless `flow_name` says otherwise) that posts its
    request and pauses (`post_to_pause_s` later: a busy machine); (run, ts, thread)."""
    from prefect import flow
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from slack_sdk import WebClient

    from flows.failback import ApprovalInput, approval_blocks

    marker = uuid.uuid4().hex

    @flow(name=flow_name, persist_result=False)
    def failback(group: str, marker: str) -> dict[str, Any]:
        run_id = str(flow_run.get_id())
        WebClient(token=rig.bot_token, base_url=rig.slack.base + "/api/").chat_postMessage(
            channel="C0DRFLOW1", text=f"approval {marker}",
            blocks=approval_blocks(group, run_id, f"request {marker}"))
        time.sleep(post_to_pause_s)
        try:
            got = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s,
                                 poll_interval=1)
        except FlowPauseTimeout:
            return {"outcome": "expired", "run_id": run_id}
        ok = check_answer(run_id=run_id, approved=got.approved, approvers=got.approvers,
                          given_proof=got.proof, secret=WEBHOOK_SECRET.encode(),
                          allowed=APPROVERS, required=2 if group == "two" else 1)
        return {"outcome": "resumed", "run_id": run_id, "input": got.model_dump(),
                "check": ok.proceed}

    def run() -> None:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            try:
                rig.runs[marker] = failback(group, marker)
            except Exception as exc:  # a timed-out pause fails the run: keep what we saw
                rig.runs[marker] = {"outcome": "error", "error": repr(exc)}

    t = threading.Thread(target=run, daemon=True)
    t.start()
    msg = rig.slack.wait_for_message(lambda m: m.get("text") == f"approval {marker}", 30)
    value = json.loads(msg["blocks"][-1]["elements"][0]["value"])
    if wait_paused:
        _wait_paused(value["run"])
    return marker, msg["ts"], t


def _wait_paused(run_id: str, timeout: float = 20) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while True:
            state = c.read_flow_run(uuid.UUID(run_id)).state
            if state is not None and state.is_paused():
                return
            assert time.monotonic() < deadline, f"run {run_id} never paused ({state})"
            time.sleep(0.1)


def _verdict(body: str) -> str:
    return str(json.loads(body)["verdict"])


def test_bad_signatures_and_strangers_change_nothing(rig: Rig) -> None:
    marker, ts, t = _paused_failback(rig, "one")
    before = len(rig.audit())
    assert rig.slack.click(ts, APPROVE, "U0ONCALL1", wrong_secret=True)[0] == 401
    assert rig.slack.click(ts, APPROVE, "U0ONCALL1", stale_by_s=301)[0] == 401
    unsigned = httpx.post(rig.url + "/slack/actions", content=b"payload=%7B%7D", timeout=5,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert unsigned.status_code == 401
    status, body = rig.slack.click(ts, APPROVE, "U0STRANGER")
    assert status == 200 and _verdict(body) == "refused"
    time.sleep(1.5)  # longer than the flow's poll interval: a resume would have shown
    assert t.is_alive(), "a refused click must not resume the run"
    refused = rig.audit()[before:]
    assert [r.outcome for r in refused] == ["refused"]
    assert refused[0].parameters["user_id"] == "U0STRANGER"
    # The stranger alone is told, the request message keeps its buttons.
    resp = wait_responses(rig, 1)
    assert resp[-1]["body"]["response_type"] == "ephemeral"
    # An approver then decides it.
    status, body = rig.slack.click(ts, APPROVE, "U0ONCALL2")
    assert (status, _verdict(body)) == (200, "approved")
    t.join(15)
    result = rig.runs[marker]
    assert result["outcome"] == "resumed" and result["check"] is True
    assert result["input"]["approved"] is True and result["input"]["approver"] == "U0ONCALL2"


def wait_responses(rig: Rig, n: int, timeout: float = 5) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        got = rig.slack.responses()
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_racing_clicks_give_exactly_one_outcome(rig: Rig) -> None:
    marker, ts, t = _paused_failback(rig, "one")
    clicks = [("U0ONCALL1", APPROVE)] * 4 + [("U0ONCALL2", REJECT)] * 4
    with ThreadPoolExecutor(len(clicks)) as pool:
        results = list(pool.map(lambda c: rig.slack.click(ts, c[1], c[0]), clicks))
    verdicts = [_verdict(b) for s, b in results if s == 200]
    assert len(verdicts) == len(clicks), results
    decisive = [v for v in verdicts if v in ("approved", "rejected")]
    assert len(decisive) == 1, verdicts
    assert all(v == "closed" for v in verdicts if v not in decisive)
    t.join(15)
    result = rig.runs[marker]
    assert result["outcome"] == "resumed"
    assert result["input"]["approved"] is (decisive[0] == "approved")


def test_two_approvers_needed_and_a_repeat_does_not_count(rig: Rig) -> None:
    marker, ts, t = _paused_failback(rig, "two")
    assert _verdict(rig.slack.click(ts, APPROVE, "U0ONCALL1")[1]) == "recorded"
    assert _verdict(rig.slack.click(ts, APPROVE, "U0ONCALL1")[1]) == "duplicate"
    time.sleep(1.5)
    assert t.is_alive(), "one approval of two must not resume the run"
    t0 = time.monotonic()
    status, body = rig.slack.click(ts, APPROVE, "U0ONCALL2")
    assert status == 200 and _verdict(body) == "approved"
    assert time.monotonic() - t0 < 3, "Slack needs the answer within 3 s"
    t.join(15)
    result = rig.runs[marker]
    assert result["input"]["approvers"] == ["U0ONCALL1", "U0ONCALL2"] and result["check"]
    # The request message now says who decided, without buttons.
    msg = next(m for m in rig.slack.messages() if m["ts"] == ts)
    assert not [b for b in msg.get("blocks", []) if b.get("type") == "actions"]
    assert "approved by <@U0ONCALL1>, <@U0ONCALL2>" in json.dumps(msg)


def test_an_attested_failover_is_resumed_by_two_approvers_and_other_flows_are_not(
        rig: Rig) -> None:
    # `drflow failover --declare-fenced` pauses a failover run for the same approvals.
    marker, ts, t = _paused_failback(rig, "two", flow_name="failover")
    assert _verdict(rig.slack.click(ts, APPROVE, "U0ONCALL1")[1]) == "recorded"
    assert _verdict(rig.slack.click(ts, APPROVE, "U0ONCALL2")[1]) == "approved"
    t.join(15)
    result = rig.runs[marker]
    assert result["outcome"] == "resumed" and result["check"] is True
    assert result["input"]["approvers"] == ["U0ONCALL1", "U0ONCALL2"]
    # A paused run of any other flow is no approval request, whatever its buttons say.
    marker, ts, t = _paused_failback(rig, "one", flow_name="drill", timeout_s=5)
    status, body = rig.slack.click(ts, APPROVE, "U0ONCALL1")
    assert status == 200 and _verdict(body) == "closed", body
    assert "not a failback or attested failover" in body
    t.join(15)
    assert rig.runs[marker]["outcome"] == "expired"


def test_reject_resumes_with_no(rig: Rig) -> None:
    marker, ts, t = _paused_failback(rig, "one")
    assert _verdict(rig.slack.click(ts, REJECT, "U0ONCALL1")[1]) == "rejected"
    t.join(15)
    assert rig.runs[marker]["input"]["approved"] is False
    assert rig.runs[marker]["check"] is False


def test_a_click_before_the_run_has_paused_waits_for_the_pause(rig: Rig) -> None:
    """The request is posted just before the run pauses; a quick click (or a busy machine)
    lands in between: it is decided once the run pauses, not refused."""
    marker, ts, t = _paused_failback(rig, "one", post_to_pause_s=0.5, wait_paused=False)
    status, body = rig.slack.click(ts, APPROVE, "U0ONCALL1")
    assert status == 200 and _verdict(body) == "approved", body
    t.join(15)
    assert rig.runs[marker]["outcome"] == "resumed" and rig.runs[marker]["check"] is True


def test_a_click_after_the_timeout_changes_nothing(rig: Rig) -> None:
    marker, ts, t = _paused_failback(rig, "one", timeout_s=2)
    t.join(20)
    assert rig.runs[marker]["outcome"] == "expired"
    status, body = rig.slack.click(ts, APPROVE, "U0ONCALL1")
    assert status == 200 and _verdict(body) == "closed"
    assert "no longer waiting" in json.loads(body)["reason"]


def test_malformed_interactions_are_400(rig: Rig) -> None:
    import hashlib
    import hmac
    import urllib.parse

    secret = rig.signing_secret
    for payload in ({"type": "view_submission"},
                    {"type": "block_actions", "user": {"id": "U0ONCALL1"},
                     "actions": [{"action_id": APPROVE, "value": "not json"}]}):
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        ts = str(int(time.time()))
        sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body,
                               hashlib.sha256).hexdigest()
        r = httpx.post(rig.url + "/slack/actions", content=body, timeout=5, headers={
            "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig,
            "Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400, r.text

