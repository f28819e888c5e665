"""Failback runbook: a planned switchover home with zero data loss, after a human says so in Slack.

find the serving side → check the home standby is in sync → post the approval request (Block
Kit, Approve / Reject) and pause for typed input → on approval: re-check → CHECKPOINT the DR
primary (so its shutdown checkpoint is small) → relax sync on home while it is still a standby →
stop the DR primary through its agent (fast shutdown) → wait until home replayed everything →
promote home → point DNS home → verify a write through DNS → rewind/attach DR as home's standby
→ restore sync → verify → tell the gateway, update Slack with who approved and the downtime.

Writes are stopped by a clean fast shutdown of the DR primary, not by read-only mode: it is a
fence no session can override, PostgreSQL itself then guarantees every WAL record up to the
shutdown checkpoint was flushed by the streaming standby before the server exits, and it leaves
DR exactly where `rewind_to` wants it (often "no rewind required"). Its cost is the shutdown
checkpoint, kept small by the CHECKPOINT taken just before while DR still serves. Read-only mode
would keep DR running, let background WAL (checkpoints, xlog switches) diverge after the LSN we
waited for, and still need a stop before DR could follow home.

Reject or no answer within the policy's timeout: nothing changes, and it is reported. A run
resumed after a crash continues where the roles are: a home already promoted is not promoted
again, DNS and re-attach are idempotent.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from prefect import flow
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from drflow.approval import check_answer
from drflow.config import GroupConfig, NodeConfig
from flows.cutover import point_dns_and_verify
from flows.decisions import Decision
from flows.locks import exclusive, roles_limit
from flows.prefect_results import RESULTS
from flows.reprotect import ReprotectStopped, agent_of, observe, protect, tell_gateway
from flows.run import RunbookRun, end_expired_pause, final_state, md, minute_key
from flows.runtime import Runtime, runtime
from tasks import agent as agents
from tasks import etcd
from tasks import postgres as pg
from tasks import replication as repl

APPROVE_ACTION = "drflow_failback_approve"
REJECT_ACTION = "drflow_failback_reject"
REPLAY_TIMEOUT_S = 30.0
MAX_LAG_BYTES = 16 * 1024 * 1024  # an async home standby further behind is not "in sync"


class ApprovalInput(RunInput):
    """What resumes a paused failback: the gateway's verified decision."""

    approved: bool
    approver: str
    comment: str = ""
    approvers: list[str] = []
    proof: str = ""


# -- pure decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HomeReadiness:
    decision: Decision
    lag_bytes: int | None = None
    sync_state: str | None = None


def home_ready(replication: str, replica: repl.Replica | None, primary_lsn: int,
               home: NodeConfig, name: str) -> HomeReadiness:
    """The home standby can take over without losing a commit: streaming, and in sync."""
    if replica is None:
        return HomeReadiness(Decision(False, f"{home.vm} ({name}) does not stream from the "
                                             "serving primary: re-protect it first "
                                             "(`drflow reprotect`)"))
    lag = max(0, primary_lsn - (replica.replay_lsn or 0))
    seen = f"{replica.state}, {replica.sync_state}, replay {lag} bytes behind"
    if replica.state != "streaming":
        return HomeReadiness(Decision(False, f"{home.vm} is {seen}: not ready"), lag,
                             replica.sync_state)
    if replication == "sync" and replica.sync_state not in ("sync", "quorum"):
        return HomeReadiness(Decision(False, f"{home.vm} is {seen}; a sync group fails back "
                                             "only to its synchronous standby"), lag,
                             replica.sync_state)
    if replication != "sync" and lag > MAX_LAG_BYTES:
        return HomeReadiness(Decision(False, f"{home.vm} is {seen}: too far behind"), lag,
                             replica.sync_state)
    return HomeReadiness(Decision(True, f"{home.vm} is {seen}: ready"), lag, replica.sync_state)


def replay_complete(pre_stop_lsn: int, received: int, replayed: int) -> Decision:
    """After DR's clean shutdown, home must hold and have replayed all DR wrote."""
    if received < pre_stop_lsn:
        return Decision(False, f"home received only up to {received}, below DR's last "
                               f"position {pre_stop_lsn}: not promoting")
    if replayed < received:
        return Decision(False, f"home replayed {replayed} of {received}: not yet")
    return Decision(True, f"home received and replayed up to {received} (≥ DR's last "
                          f"position before the stop, {pre_stop_lsn}; the clean shutdown "
                          "shipped the rest)")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def approval_blocks(group: str, run_id: str, text: str, title: str | None = None,
                    approve_text: str = "Approve failback") -> list[dict[str, Any]]:
    """An approval request the gateway's `/slack/actions` resumes (the attested failover uses
    it too, with its own title and button text)."""
    value = json.dumps({"run": run_id, "group": group})
    return [
        {"type": "header", "text": {"type": "plain_text",
                                    "text": (title or f"Failback of {group}")[:150]}},
        {"type": "section", "block_id": "drflow_request", "text": {"type": "mrkdwn",
                                                                    "text": text[:2900]}},
        {"type": "actions", "block_id": "drflow_failback", "elements": [
            {"type": "button", "action_id": APPROVE_ACTION, "style": "primary", "value": value,
             "text": {"type": "plain_text", "text": approve_text}},
            {"type": "button", "action_id": REJECT_ACTION, "style": "danger", "value": value,
             "text": {"type": "plain_text", "text": "Reject"}},
        ]},
    ]


# -- the flow -----------------------------------------------------------------------------------


@flow(name="failback", log_prints=False, persist_result=False, result_storage=RESULTS)
def failback(group: str, requested_by: str = "cli", approval_timeout_s: float | None = None,
             config_path: str | None = None) -> dict[str, Any]:
    """Move `group` home after approval in Slack; a planned switchover, zero data loss."""
    rt = runtime(config_path)
    return final_state(failback.fn,
                       _Failback(rt, rt.cfg.group(group)).run(requested_by, approval_timeout_s))


class _Failback:
    """One failback run: its runbook record, and the approval request it posted."""

    def __init__(self, rt: Runtime, g: GroupConfig) -> None:
        self.rt, self.g = rt, g
        self.home, self.dr = g.primary, g.standby
        self.run_ = RunbookRun(rt, "failback", g.name, title=f"Failback of {g.name}")
        self.request_ts: str | None = None
        self.request_channel: str | None = None  # the id Slack answered with (update wants it)

    def run(self, requested_by: str, approval_timeout_s: float | None) -> dict[str, Any]:
        g, run = self.g, self.run_
        run.label(minute_key(), self.home.site)
        run.start(f"↩️ *{g.name}*: failback to {self.home.vm} ({self.home.site}) requested by "
                  f"{requested_by}.", {"requested_by": requested_by, "home": self.home.vm,
                                       "dr": self.dr.vm})
        with run.step("find the serving primary", g.dns.record) as s:
            serving = observe(self.rt, g)
            s.reason = serving.decision.reason
            if not serving.decision.proceed:
                s.outcome = "refused"
        if serving.primary is None:
            return self.stop("refused", serving.decision.reason)
        if serving.primary is self.home:
            # Home already serves: a resumed run finishes the job, a new one finds it protected.
            with exclusive(roles_limit(g.name), etcd=self.rt.etcd):
                return self.after_switchover(None, {"resumed": True})

        readiness = self.check_home("check the home standby")
        if not readiness.decision.proceed:
            return self.stop("refused", readiness.decision.reason)
        timeout = approval_timeout_s if approval_timeout_s is not None else \
            g.policy.approval_timeout_s
        decision, approval = self.ask(readiness, timeout)
        if not decision.proceed or approval is None:
            outcome = "expired" if approval is None else "rejected"
            return self.stop(outcome, decision.reason + ": nothing was changed",
                             approver=approval.approver if approval else None)
        # From here on the roles change: never alongside a failover or a re-protect (the gateway
        # starts one when the DR node it sees stopped asks to be re-attached). The wait for a
        # human above holds no roles lock: a failover must never queue behind an approval.
        with exclusive(roles_limit(g.name), etcd=self.rt.etcd):
            readiness = self.check_home("check the home standby again")
            if not readiness.decision.proceed:
                self.update_request(f"⛔ Approved by {approval.approver}, but "
                                    f"{readiness.decision.reason}: nothing was changed")
                return self.stop("refused", readiness.decision.reason,
                                 approver=approval.approver)
            return self.switch(approval)

    def stop(self, outcome: str, why: str, **figures: Any) -> dict[str, Any]:
        self.run_.finish(outcome, f"⚠️ *{self.g.name}*: failback {outcome} — {why}",
                         {"outcome": outcome, **figures},
                         f"# Failback of {self.g.name}: {outcome}\n\n{md(why)}\n\n"
                         + self.run_.steps_table())
        return {"outcome": outcome, "reason": why, "group": self.g.name, **figures}

    def check_home(self, step: str) -> HomeReadiness:
        g, rt = self.g, self.rt
        with self.run_.step(step, self.home.vm) as s:
            name = repl.standby_name(rt.db(g, self.home))
            view = repl.primary_view(rt.db(g, self.dr))
            readiness = home_ready(g.replication, view.replica(name), view.lsn, self.home, name)
            s.result = {"application_name": name, "lag_bytes": readiness.lag_bytes,
                        "sync_state": readiness.sync_state}
            s.reason = readiness.decision.reason
            if not readiness.decision.proceed:
                s.outcome = "refused"
        return readiness

    def ask(self, readiness: HomeReadiness,
            timeout_s: float) -> tuple[Decision, ApprovalInput | None]:
        """Post the approval request; wait for the gateway to resume the run with a decision."""
        g, rt, run = self.g, self.rt, self.run_
        p = g.policy
        who = ", ".join(f"<@{u}>" for u in p.approvers) or "nobody (no approvers configured)"
        text = (f"*{g.name}* runs on {self.dr.vm} ({self.dr.site}) since its failover. "
                f"Approve to move it home to {self.home.vm} ({self.home.site}):\n"
                f"• planned switchover, zero data loss: stop writes on {self.dr.vm}, wait until "
                f"{self.home.vm} replayed its last LSN, promote {self.home.vm}, point "
                f"{g.dns.record} at it, re-attach {self.dr.vm} as its standby, restore "
                f"{g.replication} replication\n"
                "• expected write pause: about 1-2 s\n"
                f"• home standby now: {readiness.sync_state}, {readiness.lag_bytes} bytes behind\n"
                f"• needs {p.approvals_required} approval(s) from {who}; expires in "
                f"{_duration(timeout_s)} (then nothing happens)")
        with run.step("request approval in Slack", g.name,
                      {"approvers": p.approvers, "approvals_required": p.approvals_required,
                       "timeout_s": timeout_s}) as s:
            resp = rt.slack.client().chat_postMessage(
                channel=rt.slack.channel, text=f"Failback of {g.name}: approval needed",
                blocks=approval_blocks(g.name, run.run_id, rt.scrub(text)))
            self.request_ts = str(resp["ts"])
            self.request_channel = str(resp.get("channel") or rt.slack.channel)
            s.result = {"message_ts": self.request_ts}
            s.reason = f"approval requested from {who}"
        with run.step("wait for approval", g.name, {"timeout_s": timeout_s},
                      as_task=False) as s:
            try:
                answer = pause_flow_run(wait_for_input=ApprovalInput,
                                        timeout=max(1, math.ceil(timeout_s)), poll_interval=1)
            except FlowPauseTimeout:
                end_expired_pause()
                s.outcome = "refused"
                s.reason = f"no decision within {timeout_s:.0f} s"
                self.update_request(f"⌛ No decision within {_duration(timeout_s)}: the "
                                    "failback request expired, nothing was changed")
                return Decision(False, s.reason), None
            secret = rt.secret(rt.cfg.gateway.webhook_secret).get_secret_value().encode()
            check = check_answer(run_id=run.run_id, approved=answer.approved,
                                 approvers=list(answer.approvers) or [answer.approver],
                                 given_proof=answer.proof, secret=secret, allowed=p.approvers,
                                 required=p.approvals_required)
            s.result = {"approved": answer.approved, "approver": answer.approver,
                        "comment": answer.comment}
            s.reason = check.reason
            if not check.proceed:
                s.outcome = "refused"
                self.update_request(f"⛔ {check.reason}")
        return Decision(check.proceed, check.reason), answer

    def switch(self, approval: ApprovalInput) -> dict[str, Any]:
        g, rt, run, home, dr = self.g, self.rt, self.run_, self.home, self.dr
        home_db, dr_db = rt.db(g, home), rt.db(g, dr)
        dr_agent = agent_of(rt, dr)
        told = tell_gateway(rt, g.name, transition="failback",
                            reason=f"failback approved by {approval.approver}")
        with run.step("checkpoint the DR primary", dr.vm) as s:
            repl.checkpoint(dr_db)
            s.reason = "CHECKPOINT now, so the shutdown checkpoint in the write pause is small"
        with run.step("relax synchronous replication on home", home.vm) as s:
            _, setting = pg.sync_standby_count(home_db)
            if setting.strip():
                repl.set_sync_names(home_db, "")
                s.reason = (f"was {setting!r}: home has no standby until DR re-attaches; "
                            "cleared while still a standby so writes never wait; restored below")
            else:
                s.outcome, s.reason = "skipped", "already empty"

        down_at = time.time()
        with run.step("stop writes on the DR primary", dr.vm, {"mode": "fast"}) as s:
            pre_stop = repl.current_lsn(dr_db)
            try:
                s.result = {"stop": agents.stop(dr_agent, "fast"), "lsn_before_stop": pre_stop}
            except Exception:
                self.restart(dr_agent)
                raise
            s.reason = (f"fast shutdown of {dr.vm} through its agent: clients cut, every WAL "
                        "record shipped to the streaming standby before it exits")
        with run.step("wait until home replayed the last LSN", home.vm) as s:
            try:
                received, replayed, waited = repl.wait_replayed(home_db, pre_stop,
                                                                REPLAY_TIMEOUT_S)
                d = replay_complete(pre_stop, received, replayed)
            except TimeoutError as exc:
                d = Decision(False, str(exc))
            s.reason = d.reason
            if not d.proceed:
                s.outcome = "refused"
            else:
                s.result = {"received": received, "replayed": replayed,
                            "waited_s": round(waited, 3)}
        if not d.proceed:
            self.restart(dr_agent)
            tell_gateway(rt, g.name, transition="none", reason="failback aborted")
            why = f"{d.reason}; {dr.vm} restarted as the primary"
            self.update_request(f"⛔ Approved by {approval.approver}, but {why}: nothing changed")
            return self.stop("aborted", why, approver=approval.approver)
        return self.after_switchover(approval, {"down_at": down_at, "gateway": told})

    def after_switchover(self, approval: ApprovalInput | None,
                         figures: dict[str, Any]) -> dict[str, Any]:
        """Promote home (once), DNS home, verify, re-attach DR; a resumed run starts here."""
        g, rt, run, home, dr = self.g, self.rt, self.run_, self.home, self.dr
        client = rt.etcd
        if client is not None:
            with run.step("hand the leader key to home", home.vm) as s:
                # Before the promotion: home's agent adopts a key naming it; the gateway sees a
                # handover, not an expiry; DR's agent, finding another name, keeps its server down.
                handed, s.reason = etcd.hand_over(client, g.name, home.vm,
                                                  f"failback of {g.name} to {home.vm}")
                if not handed:
                    s.outcome = "refused"
            if not handed:
                self.restart(agent_of(rt, dr))
                tell_gateway(rt, g.name, transition="none", reason="failback aborted")
                why = f"{s.reason}; {dr.vm} restarted as the primary"
                self.update_request(f"⛔ {why}: nothing changed")
                return self.stop("aborted", why)
        with run.step("promote home", home.vm) as s:
            promoted_now = pg.promote(rt.db(g, home))
            s.reason = "promoted" if promoted_now else "already a primary: not promoted again"
        up_at = point_dns_and_verify(run, rt, g, home, "point DNS home")
        down_at = figures.pop("down_at", None)
        downtime = None if down_at is None else up_at - down_at
        figures.update(downtime_s=None if downtime is None else round(downtime, 3),
                       promoted_now=promoted_now)
        who = approval.approver if approval else "an earlier run's approval"
        try:
            figures.update(protect(run, rt, g, home, dr))
        except ReprotectStopped as exc:
            figures["not_protected"] = str(exc)
        except psycopg.OperationalError as exc:
            # Home serves and DNS points home: the failback is done. A DR node that cannot be
            # reached while it is re-attached leaves the group unprotected, said so, for
            # re-protect to finish; it must not fail the whole run.
            figures["not_protected"] = (f"{dr.vm} could not be re-attached: "
                                        f"{str(exc).splitlines()[0][:200]}")
        told = tell_gateway(rt, g.name, primary_site=home.site, transition="none",
                            protected="not_protected" not in figures,
                            reason=f"failed back to {home.vm}, approved by {who}")
        figures.setdefault("gateway", told)
        pause = f"write pause {downtime:.2f} s" if downtime is not None else \
            "write pause not measured (resumed run)"
        mode = "synchronous" if g.replication == "sync" else "asynchronous"
        tail = (f"{dr.vm} is its {mode} standby." if "not_protected" not in figures else
                f"⚠️ not yet protected: {figures['not_protected']}")
        headline = (f"✅ *{g.name}* is home on {home.vm}: approved by {who}; {pause} (stop on "
                    f"{dr.vm} → first write through DNS); {tail}")
        self.update_request(headline)
        run.finish("ok", headline, {**figures, "approver": who},
                   f"# Failback of {g.name}\n\n{md(headline)}\n\n" + run.steps_table())
        summary = (f"home on {home.vm} ({home.site}), approved by {who}; {pause}"
                   + ("" if "not_protected" not in figures else "; not yet protected"))
        return {"outcome": "failed_back", "reason": summary, "group": g.name, "approver": who,
                **figures}

    def restart(self, agent: agents.AgentRef) -> None:
        """Put the DR primary back in service after an aborted switchover (nothing changed)."""
        try:
            agents.start(agent)
        except Exception as exc:  # the abort is what gets reported; this goes to the thread
            self.run_.note("failed", f"could not restart {agent.name}: {type(exc).__name__}")

    def update_request(self, text: str) -> None:
        """Replace the approval request's buttons with what became of it."""
        if self.request_ts is None:
            return
        rt = self.rt
        try:
            rt.slack.client().chat_update(
                channel=self.request_channel or rt.slack.channel, ts=self.request_ts,
                text=rt.scrub(text),
                blocks=[{"type": "section",
                         "text": {"type": "mrkdwn", "text": rt.scrub(text)[:2900]}}])
        except Exception:  # Slack down must not change the outcome
            self.run_.note("info", "could not update the approval request in Slack")
