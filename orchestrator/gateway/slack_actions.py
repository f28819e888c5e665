"""`POST /slack/actions`: Approve / Reject clicks on a failback request resume the paused run.

Slack posts the interaction form-encoded (one field, `payload`) and signs it: `v0=` +
HMAC-SHA256(signing secret, `v0:{timestamp}:{raw body}`), refused beyond 300 s (401, changes
nothing, audited). A verified click is decided by `drflow.approval.decide_click` under one lock
per flow run and a ledger kept in the gateway's state file, so a double click or two approvers
racing give exactly one outcome; only the deciding click resumes the run
(`aresume_flow_run(run_id, run_input={approved, approver, comment, approvers, proof})`). Slack
gets its answer at once (200); what happened is posted to the click's `response_url`: the
request message is replaced with the decision, or the clicker alone is told why nothing changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from drflow.approval import ACTION_IDS, ClickOutcome, Verdict, answer, decide_click
from drflow.signing import SignatureError, parse_timestamp
from orchestrator.gateway.contracts import AuditSink
from orchestrator.gateway.intake import JsonLimits, Rejection, clip, load_json, read_body
from orchestrator.gateway.service import GatewayService
from orchestrator.gateway.settings import GatewaySettings
from orchestrator.gateway.state import LedgerState, open_ledger_state

log = logging.getLogger("drflow.gateway.slack")

ACTOR = "gateway"
PATH = "/slack/actions"
WINDOW_S = 300
FAILBACK_FLOW = "failback"
# Flows that pause for the group's approvers: a failback, and a failover whose fence an operator
# attests (`drflow failover --declare-fenced`).
APPROVAL_FLOWS = (FAILBACK_FLOW, "failover")
PAUSE_WAIT_S = 1.5  # a click between the request's post and the run's pause waits this long


@dataclass(frozen=True)
class RunView:
    """What the gateway needs to know of the flow run a button names."""

    paused: bool
    state: str
    flow: str | None
    group: str | None


class FlowRuns(Protocol):
    async def read(self, run_id: str) -> RunView: ...

    async def resume(self, run_id: str, run_input: dict[str, Any]) -> None: ...


class PrefectFlowRuns:
    """The Prefect API (PREFECT_API_URL) as FlowRuns."""

    async def read(self, run_id: str) -> RunView:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            fr = await client.read_flow_run(UUID(run_id))
            flow = await client.read_flow(fr.flow_id)
        state = fr.state
        group = fr.parameters.get("group") if isinstance(fr.parameters, dict) else None
        return RunView(paused=bool(state and state.is_paused()),
                       state=str(state.name) if state else "unknown", flow=flow.name,
                       group=group if isinstance(group, str) else None)

    async def resume(self, run_id: str, run_input: dict[str, Any]) -> None:
        from prefect.flow_runs import aresume_flow_run

        await aresume_flow_run(UUID(run_id), run_input=run_input)


@dataclass(frozen=True)
class Click:
    run_id: str
    group: str
    user_id: str
    choice: str
    response_url: str | None
    message: dict[str, Any]


def parse_click(body: bytes, limits: JsonLimits | None = None) -> Click:
    """The one button click a verified interaction carries; Rejection(4xx) says what is wrong."""
    limits = limits or JsonLimits()
    try:
        form = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=True,
                                     errors="strict", max_num_fields=10)
        raw = form["payload"][0]
    except (UnicodeDecodeError, ValueError, KeyError, IndexError):
        raise Rejection(400, "malformed", "expected a UTF-8 form with a field `payload` holding "
                        "the interaction JSON") from None
    payload = load_json(raw, limits, "interaction payload")
    if not isinstance(payload, dict) or payload.get("type") != "block_actions":
        raise Rejection(400, "malformed", "only block_actions interactions are handled here")
    user = payload.get("user") or {}
    actions = payload.get("actions") or []
    if not isinstance(user, dict) or not isinstance(user.get("id"), str) or not actions:
        raise Rejection(400, "malformed", "interaction without user.id or actions")
    action = actions[0] if isinstance(actions[0], dict) else {}
    action_id = action.get("action_id")
    choice = ACTION_IDS.get(action_id) if isinstance(action_id, str) else None
    if choice is None:
        raise Rejection(400, "malformed", f"unknown action_id {clip(action_id)}: "
                        f"expected one of {', '.join(sorted(ACTION_IDS))}")
    raw_value = action.get("value")
    try:
        value = load_json(raw_value, limits, "button value") if isinstance(raw_value, str) else None
        run_id, group = str(UUID(str(value["run"]))), value["group"]  # type: ignore[index]
        if not isinstance(group, str):
            raise TypeError(group)
    except (Rejection, ValueError, KeyError, TypeError):
        raise Rejection(400, "malformed", "button value must be JSON {run: <flow run id>, "
                        "group: <name>}") from None
    url = payload.get("response_url")
    message = payload.get("message") if isinstance(payload.get("message"), dict) else {}
    return Click(run_id, group, user["id"], choice, url if isinstance(url, str) else None,
                 message or {})


class SlackActions:
    """Verifies, decides and answers clicks; `app.state.slack_actions`."""

    def __init__(self, settings: GatewaySettings, gateway: GatewayService,
                 audit: AuditSink | None, flow_runs: FlowRuns | None = None,
                 clock: Any = time.time) -> None:
        self.settings = settings
        self.gateway = gateway
        self.audit = audit
        self.flow_runs: FlowRuns = flow_runs or PrefectFlowRuns()
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._ledgers: LedgerState | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ledgers(self) -> LedgerState:
        if self._ledgers is None:
            self._ledgers = open_ledger_state(self.settings)
        return self._ledgers

    def close(self) -> None:
        if self._ledgers is not None:
            self._ledgers.close()
            self._ledgers = None

    def verify(self, headers: Any, body: bytes) -> None:
        """Rejection(401) unless Slack signed this very body within the window."""
        secret = self.settings.slack_signing_secret
        if secret is None:
            raise Rejection(401, "unsigned", "no Slack signing secret configured: set "
                            "slack.signing_secret in the drflow config")
        ts, sig = headers.get("X-Slack-Request-Timestamp"), headers.get("X-Slack-Signature")
        if not ts or not sig:
            raise Rejection(401, "unsigned", "missing X-Slack-Request-Timestamp or "
                            "X-Slack-Signature")
        try:
            age = abs(self.clock() - parse_timestamp(ts, "X-Slack-Request-Timestamp"))
        except SignatureError as exc:
            raise Rejection(401, "bad_timestamp", str(exc)) from None
        # Slack's v0 scheme over the raw bytes (slack_sdk's verifier decodes the body first, so a
        # body that is not UTF-8 looked like a wrong signature there).
        if not _hmac_ok(secret.get_secret_value(), ts, body, sig):
            raise Rejection(401, "bad_signature", "X-Slack-Signature does not match the body: "
                            "check the Slack signing secret; nothing changed")
        if age > WINDOW_S:
            raise Rejection(401, "stale", f"request timestamp is {age:.0f} s away from now "
                            f"(window {WINDOW_S} s): check the clock; nothing changed")

    async def handle(self, click: Click) -> ClickOutcome:
        if click.group not in self.settings.groups:
            raise Rejection(404, "unknown_group", f"unknown protection group {click.group!r}")
        policy = self.settings.roster(click.group)
        lock = self._locks.setdefault(click.run_id, asyncio.Lock())
        async with lock:
            before = self.ledgers.get(click.run_id)
            waiting, detail = await self._waiting(click, settle=before.decided is None)
            outcome = decide_click(before, click.user_id, click.choice,  # type: ignore[arg-type]
                                   approvers=policy.approvers,
                                   required=policy.approvals_required, waiting=waiting,
                                   waiting_detail=detail)
            if outcome.changes:
                if outcome.resumes:
                    try:
                        await self.flow_runs.resume(click.run_id, answer(
                            outcome.ledger, click.run_id, self.settings.secret_bytes()))
                    except Exception as exc:
                        why = f"{type(exc).__name__}: {exc}"[:300]
                        outcome = ClickOutcome(Verdict.CLOSED, "could not resume the paused "
                                               f"run ({why}): nothing changed", before)
                if outcome.changes and not self.ledgers.put(click.run_id, click.group, before,
                                                            outcome.ledger):
                    outcome = ClickOutcome(Verdict.CLOSED, "another click was decided at the "
                                           "same moment: nothing changed", before)
        self._audit(click, outcome)
        return outcome

    async def _waiting(self, click: Click, settle: bool = True) -> tuple[bool, str]:
        """Is the run paused for this answer? A run posts its request just before it pauses:
        a click on an undecided request that lands in between waits up to `PAUSE_WAIT_S` for
        the pause (inside Slack's 3 s), instead of being refused."""
        deadline = time.monotonic() + (PAUSE_WAIT_S if settle else 0.0)
        while True:
            try:
                run = await self.flow_runs.read(click.run_id)
            except Exception as exc:
                return False, f"cannot read flow run {click.run_id}: {type(exc).__name__}"
            if run.flow not in APPROVAL_FLOWS or run.group != click.group:
                return False, (f"flow run {click.run_id} is not a failback or attested failover "
                               f"of {click.group}")
            if run.paused:
                return True, ""
            if run.state != "Running" or time.monotonic() >= deadline:
                return False, f"the run is {run.state}"
            await asyncio.sleep(0.1)

    def _audit(self, click: Click, outcome: ClickOutcome) -> None:
        log.warning("failback approval %s for %s by %s: %s", outcome.verdict.value, click.run_id,
                    click.user_id, outcome.reason)
        if self.audit is None:
            return
        try:
            self.audit.append(ACTOR, "slack.approval", click.group,
                              {"flow_run_id": click.run_id, "user_id": click.user_id,
                               "choice": click.choice, "verdict": outcome.verdict.value,
                               "approvals": list(outcome.ledger.approvals)},
                              outcome.verdict.value, outcome.reason)
        except Exception:
            log.exception("audit append failed for a Slack approval click")

    def reply_later(self, click: Click, outcome: ClickOutcome) -> None:
        """Tell Slack what happened through the click's response_url, off the request path."""
        if not click.response_url:
            return
        task = asyncio.get_running_loop().create_task(self._reply(click, outcome))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, click: Click, outcome: ClickOutcome) -> None:
        assert click.response_url
        icon = {Verdict.APPROVED: "✅", Verdict.REJECTED: "⛔", Verdict.RECORDED: "☑️"}.get(
            outcome.verdict, "💬")
        note = f"{icon} {outcome.reason}"
        if outcome.changes:
            blocks = [b for b in click.message.get("blocks", [])
                      if outcome.verdict is Verdict.RECORDED or b.get("type") != "actions"]
            blocks = [b for b in blocks if b.get("block_id") != "drflow_decision"]
            blocks.append({"type": "context", "block_id": "drflow_decision",
                           "elements": [{"type": "mrkdwn", "text": note[:2900]}]})
            body: dict[str, Any] = {"replace_original": True, "text": note, "blocks": blocks}
        else:
            body = {"response_type": "ephemeral", "replace_original": False, "text": note}
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                resp = await client.post(click.response_url, json=body)
                if resp.status_code >= 400:
                    log.warning("response_url answered %s", resp.status_code)
        except httpx.HTTPError as exc:
            log.warning("could not post to response_url: %s", type(exc).__name__)


def _hmac_ok(secret: str, ts: str, body: bytes, sig: str) -> bool:
    """`sig` is Slack's v0 signature of this timestamp and raw body."""
    import hashlib
    import hmac

    if not sig.isascii():
        return False
    mac = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest("v0=" + mac, sig)


def register_slack_actions(app: FastAPI, settings: GatewaySettings, gateway: GatewayService,
                           audit: AuditSink | None = None,
                           flow_runs: FlowRuns | None = None) -> SlackActions:
    """Add `POST /slack/actions` to the gateway app; returns the handler (`app.state`)."""
    actions = SlackActions(settings, gateway, audit, flow_runs)
    limits = JsonLimits(settings.max_json_depth, settings.max_json_elements)

    @app.post(PATH)
    async def slack_actions(request: Request) -> JSONResponse:
        """A Slack interaction: 200 once decided (what happened goes to response_url)."""
        try:
            body = await read_body(request, settings.max_body_bytes)
            actions.verify(request.headers, body)
            click = parse_click(body, limits)
            outcome = await actions.handle(click)
        except Rejection as rejection:
            gateway.refuse(rejection, request.url.path,
                           request.client.host if request.client else None)
            return JSONResponse(rejection.body(), status_code=rejection.status,
                                headers=rejection.headers())
        actions.reply_later(click, outcome)
        return JSONResponse({"ok": True, "verdict": outcome.verdict.value,
                             "reason": outcome.reason})

    return actions


__all__ = ["FlowRuns", "PrefectFlowRuns", "RunView", "SlackActions",
           "parse_click", "register_slack_actions"]
