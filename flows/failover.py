"""Failover runbook: confirm → fence → check lag → promote → relax sync → DNS → verify → report.

Every step is idempotent, so a run re-started after a crash at any point completes without a
second promotion: the fence is checked before promoting, a promoted standby is not promoted again,
and the DNS change and the verification write are safe to repeat.

Whatever started it (the gateway, `drflow failover`, a worker), the run holds its group's
`roles-<group>` lock (flows/locks.py) and moves the gateway's roles record itself: roles in motion
before the fence, the promoted side serving right after the promotion (docs/safety.md).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow

from drflow.config import GroupConfig, NodeConfig
from flows.cutover import point_dns_and_verify
from flows.decisions import (
    Decision,
    confirm_failure,
    fence_result,
    lag_estimate,
    promotion,
    relax_sync,
)
from flows.locks import exclusive, roles_limit
from flows.run import RunbookRun
from flows.runtime import Runtime, runtime
from tasks import gateway as gw
from tasks import postgres as pg
from tasks import vsphere


class FailoverStopped(Exception):
    """A safety check stopped the failover; the reason is in the audit trail and in Slack."""


def _first_failure_epoch(incident: dict[str, Any]) -> float:
    raw = incident.get("first_failure_at")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        return datetime.fromisoformat(raw).timestamp()
    return time.time()


@flow(name="failover", log_prints=False, persist_result=False)
def failover(group: str, incident: dict[str, Any] | None = None, force: bool = False,
             config_path: str | None = None) -> dict[str, Any]:
    """Move group `group`'s service to its standby. `incident` carries what triggered it (the
    gateway's evidence); `force` accepts promoting beyond the RPO budget, audited."""
    with exclusive(roles_limit(group)):
        return _failover(group, dict(incident or {}), force, config_path)


def _failover(group: str, incident: dict[str, Any], force: bool,
              config_path: str | None) -> dict[str, Any]:
    rt = runtime(config_path)
    g = rt.cfg.group(group)
    reported = str(incident.get("reason") or incident.get("kind") or "failover requested")
    first_failure = _first_failure_epoch(incident)
    evidence = incident.get("evidence") or {}
    old, new = failed_and_target(g, incident)
    old_vc = rt.vcenter(old.site)
    old_primary = rt.db(g, old)
    standby = rt.db(g, new)
    run = RunbookRun(rt, "failover", group, title=f"Failover of {group}")
    run.start(f"🔴 *{group}*: {reported}. Failing over to {new.vm} ({new.site}).",
              {"incident": incident, "force": force, "primary": old.vm,
               "standby": new.vm})

    def stop(outcome: str, why: str) -> dict[str, Any]:
        if moving:  # nothing was promoted: roles are where they were
            report_roles(rt, group, transition="none", reason=f"failover stopped: {why}")
        run.finish(outcome, f"⚠️ *{group}*: failover stopped — {why}",
                   {"outcome": outcome}, f"# Failover of {group}: {outcome}\n\n{why}\n\n"
                   + run.steps_table())
        return {"outcome": outcome, "reason": why, "group": group}

    with run.step("confirm failure", old.vm) as s:
        power, power_err = vsphere.power_state(old_vc, old.vm)
        app = pg.check_primary(old_primary)
        d = confirm_failure(old.vm, power, app, reported)
        s.result = {"power_state": power, "power_error": power_err, "app": app.detail}
        _decide(s, d)
    moving = False
    if not d.proceed:
        return stop("not_confirmed", d.reason)

    with run.step("tell the gateway roles are moving", g.name) as s:
        # From here until the new roles are recorded, a booting agent of the group waits
        # instead of starting a primary (agents/boot.py).
        s.reason = report_roles(rt, group, transition="failover",
                                reason=f"failover of {group} from {old.vm}: {reported}")
        moving = True
        if s.reason != "gateway told":
            s.outcome = "skipped"

    with run.step("fence old primary", old.vm) as s:
        state, err = vsphere.fence(old_vc, old.vm)
        d = fence_result(old.vm, state, err)
        s.result = {"power_state": state, "error": err}
        _decide(s, d)
    if not d.proceed:
        return stop("not_fenced", d.reason)

    with run.step("check standby lag", new.vm, {"rpo_budget_s": g.rpo_budget_s,
                                                      "force": force}) as s:
        st = pg.standby_status(standby)
        if not _has_replication_evidence(evidence):
            # Started outside a gateway incident (`drflow failover`): only the gateway heard
            # the old primary's heartbeats; ask it (read after the fence, so no later report).
            evidence, s.result["evidence_source"] = gateway_evidence(rt, group, old.vm)
        history = [(float(t), int(lsn)) for t, lsn in evidence.get("primary_lsn_history", [])]
        last = evidence.get("primary_last_lsn")
        lag = lag_estimate(st.received_lsn, int(last) if last is not None else None, history,
                           was_sync_standby=g.replication == "sync"
                           and bool(evidence.get("sync_standby_streaming")))
        if st.in_recovery is False:
            lag = lag_estimate(0, 0, [])  # promoted by an earlier run: its lag was audited then
        d = promotion(st.in_recovery, lag, g.rpo_budget_s, force)
        s.result.update({"lag_s": lag.seconds, "lag_bytes": lag.bytes, "standby": st.detail,
                         "sync_standby_streaming": evidence.get("sync_standby_streaming"),
                         "primary_last_heard_at": evidence.get("last_heard_at")})
        _decide(s, d)
    if not d.proceed:
        return stop("refused", d.reason)
    rpo_s, rpo_bytes = lag.seconds, lag.bytes

    with run.step("promote standby", new.vm) as s:
        promoted_now = pg.promote(standby)
        s.reason = ("promoted" if promoted_now
                    else "already a primary: not promoted a second time")

    with run.step("relax synchronous replication", new.vm) as s:
        left, setting = pg.sync_standby_count(standby)
        d = relax_sync(g.replication, left, setting)
        if d.proceed:
            pg.relax_synchronous(standby)
        else:
            s.outcome = "skipped"
        s.reason = d.reason
    relaxed = d.proceed or "already relaxed" in d.reason

    with run.step("record the new roles", g.name, {"primary_site": new.site}) as s:
        # As soon as the standby takes writes: the old primary's agent must find it serving.
        s.reason = report_roles(rt, group, primary_site=new.site, protected=False,
                                transition="none",
                                reason=f"failed over to {new.vm} ({new.site}): {reported}")
        moving = False
        if s.reason != "gateway told":
            s.outcome = "skipped"

    acked = point_dns_and_verify(run, rt, g, new, "point DNS at the new primary")

    rto_s = acked - first_failure
    figures = {"rto_s": round(rto_s, 3), "rpo_s": rpo_s, "rpo_bytes": rpo_bytes,
               "promoted_now": promoted_now, "sync_relaxed": relaxed}
    sync_note = (" Synchronous replication relaxed on purpose (no standby left); re-protect "
                 "restores it." if relaxed and g.replication == "sync" else "")
    headline = (f"✅ *{group}* failed over to {new.vm}: RTO {rto_s:.1f} s, "
                f"RPO {_fmt(rpo_s)} s ({rpo_bytes if rpo_bytes is not None else '?'} bytes). "
                f"Old primary {old.vm} fenced.{sync_note}")
    markdown = (f"# Failover of {group}\n\n{headline}\n\n"
                f"* trigger: {reported}\n* first failure evidence: "
                f"{datetime.fromtimestamp(first_failure, UTC).isoformat()}\n"
                f"* RTO (first failure → verified write through DNS): **{rto_s:.2f} s**\n"
                f"* RPO (standby lag at promotion): **{_fmt(rpo_s)} s / {rpo_bytes} bytes**\n\n"
                + run.steps_table())
    run.finish("ok", headline, figures, markdown)
    return {"outcome": "failed_over", "group": group, **figures}


def report_roles(rt: Runtime, group: str, **update: Any) -> str:
    """Tell the gateway (at gateway.url) what changed; best effort, says what happened."""
    return gw.report_roles(rt.cfg.gateway.client_url, rt.secret(rt.cfg.gateway.webhook_secret),
                           group, **update)


def gateway_evidence(rt: Runtime, group: str, agent_id: str) -> tuple[dict[str, Any], str]:
    """(the failed primary's replication evidence from the gateway, or {}; where it came from)."""
    url = rt.cfg.gateway.client_url
    try:
        ev = gw.fetch_evidence(url, rt.secret(rt.cfg.gateway.webhook_secret), group, agent_id)
    except gw.EvidenceUnavailable as exc:
        return {}, f"none: {exc}"
    return ev, f"gateway {url}"


def _has_replication_evidence(evidence: dict[str, Any]) -> bool:
    return "sync_standby_streaming" in evidence or "primary_last_lsn" in evidence


def failed_and_target(g: GroupConfig, incident: dict[str, Any]) -> tuple[NodeConfig, NodeConfig]:
    """(the failed primary, the node to promote). The incident names the failed primary's VM
    (an agent's id is its VM's name; `drflow failover` names the node DNS points at); it is a
    flow parameter, so a re-run after a crash acts on the same nodes even after DNS moved."""
    evidence = incident.get("evidence") or {}
    failed = incident.get("primary_vm") or evidence.get("agent_id")
    if failed == g.standby.vm:
        return g.standby, g.primary
    return g.primary, g.standby


def _decide(step: Any, d: Decision) -> None:
    step.reason = d.reason
    if not d.proceed:
        step.outcome = "refused"


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"
