"""Re-protect runbook: make the old primary a streaming standby of the group's serving primary.

find the serving side → (fence a second primary) → rewind the other node through its agent
(pg_rewind; a base backup when rewind is impossible, with the reason) → wait until it streams
and has caught up → restore synchronous replication (sync groups) → verify a write reaches it →
tell the gateway the group is protected, notify, audit.

Idempotent and resumable: a node already streaming from the primary is not rewound again, a
synchronous_standby_names already naming it is left alone, and every step checks first.
Triggered by `drflow reprotect GROUP` and by the gateway when the old primary's agent reports in
after a failover (`orchestrator.embedded.ReprotectStarter`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prefect import flow

from drflow.config import GroupConfig, NodeConfig
from drflow.control import ControlError
from flows.decisions import AppCheck, Decision
from flows.locks import exclusive, roles_limit
from flows.prefect_results import RESULTS
from flows.run import RunbookRun, final_state, md, minute_key
from flows.runtime import Runtime, runtime
from tasks import agent as agents
from tasks import gateway as gateway_tasks
from tasks import postgres as pg
from tasks import replication as repl
from tasks import vsphere
from tasks.dns import resolve_endpoint_or_none

log = logging.getLogger("drflow.reprotect")

CATCH_UP_TIMEOUT_S = 300.0
SYNC_TIMEOUT_S = 30.0


# -- pure decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """Which node serves the group now, and the other one (to protect, or to fail back to)."""

    decision: Decision
    primary: NodeConfig | None = None
    other: NodeConfig | None = None


def serving_side(g: GroupConfig, dns_target: tuple[str, int] | None, home: AppCheck,
                 dr: AppCheck) -> Serving:
    """The node behind the group's DNS name that takes writes; never guess between two."""
    nodes = [(g.primary, home), (g.standby, dr)]
    writable = [n for n, app in nodes if app.writable_primary]
    behind = next((n for n, _ in nodes if dns_target == (n.host, n.port)), None)
    where = f"{g.dns.record} → {dns_target[0]}:{dns_target[1]}" if dns_target else \
        f"{g.dns.record} does not resolve"
    if len(writable) == 2:
        if behind is None:
            return Serving(Decision(False, f"two writable primaries ({g.primary.vm}, "
                                           f"{g.standby.vm}) and {where}: refusing to choose"))
        other = g.standby if behind is g.primary else g.primary
        return Serving(Decision(True, f"{where} ({behind.vm}); {other.vm} is a second writable "
                                      "primary: it must be fenced"), behind, other)
    if not writable:
        return Serving(Decision(False, f"no node takes writes ({g.primary.vm}: {home.detail}; "
                                       f"{g.standby.vm}: {dr.detail}): nothing to protect"))
    primary = writable[0]
    other = g.standby if primary is g.primary else g.primary
    if behind is primary:
        return Serving(Decision(True, f"{where}: {primary.vm} ({primary.site}) serves"),
                       primary, other)
    return Serving(Decision(True, f"{primary.vm} ({primary.site}) is the only writable primary; "
                                  f"{where} (DNS lags behind: the failover or failback that "
                                  "moved it points it)"), primary, other)


@dataclass(frozen=True)
class TargetPlan:
    action: str  # "fence", "rewind", "none", "unreachable"
    reason: str


def plan_target(target: NodeConfig, primary: NodeConfig, app: AppCheck,
                status: dict[str, Any] | None, fence_first: bool) -> TargetPlan:
    """What to do with the node to protect, given a direct check and its agent's status."""
    role = (status or {}).get("role")
    if app.writable_primary or role == "primary":
        return TargetPlan("fence", f"{target.vm} runs as a writable primary while "
                                   f"{primary.vm} serves: a second primary; fence it (stop "
                                   "through its agent), then rewind")
    if status is None:
        return TargetPlan("unreachable", f"the agent of {target.vm} does not answer: re-protect "
                                         "needs it (is the VM on and its agent running?)")
    upstream = f"{primary.host}:{primary.port}"
    if role == "standby" and status.get("upstream") == upstream and \
            status.get("receiver") == "streaming":
        return TargetPlan("none", f"{target.vm} already streams from {upstream}: nothing to "
                                  "rewind")
    if fence_first:
        return TargetPlan("fence", f"{target.vm} was reported as a second primary: make sure "
                                   "it is stopped (fence) first, then rewind")
    state = "stopped" if not status.get("running") else f"running as {role}"
    return TargetPlan("rewind", f"{target.vm} is {state}: rewind it into a standby of "
                                f"{primary.vm} ({upstream})")


def restore_sync(replication: str, current: str, name: str) -> Decision:
    """A sync group names its re-protected standby in synchronous_standby_names; once."""
    if replication != "sync":
        return Decision(False, "group replicates asynchronously: nothing to restore")
    if current.strip() == repl.sync_setting([name]) or (
            f'"{name}"' in current and current.strip().upper().startswith("FIRST 1")):
        return Decision(False, f"synchronous_standby_names already names {name} ({current!r})")
    return Decision(True, f"naming {name} the synchronous standby (was {current!r})")


def rewind_reason(result: dict[str, Any]) -> str:
    """The audit reason of a rewind_to result: what was done, how, and why."""
    action, method = result.get("action"), result.get("method")
    if action == "none":
        return f"nothing to do: {result.get('reason')}"
    how = "pg_rewind" if method == "pg_rewind" else "a fresh base backup (pg_basebackup)"
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in (result.get("phases") or {}).items())
    return (f"{action} with {how} in {result.get('seconds')} s ({phases}); why: "
            f"{result.get('reason')}")


# -- shared steps (failback uses them too) ------------------------------------------------------


def agent_of(rt: Runtime, node: NodeConfig) -> agents.AgentRef:
    secret_ref = rt.cfg.gateway.control_secret
    if node.agent_url is None or secret_ref is None:
        raise RuntimeError(f"{node.vm} has no agent_url, or gateway.control_secret is not set: "
                           "re-protect and failback drive PostgreSQL through the agent")
    return agents.AgentRef(node.vm, node.agent_url, rt.secret(secret_ref))


def observe(rt: Runtime, g: GroupConfig) -> Serving:
    dns = resolve_endpoint_or_none(rt.route53, g.dns.zone_id, g.dns.record)
    home = pg.check_primary(rt.db(g, g.primary))
    dr = pg.check_primary(rt.db(g, g.standby))
    return serving_side(g, dns, home, dr)


def tell_gateway(rt: Runtime, group: str, **update: Any) -> str:
    """Report changed roles to the gateway at `gateway.url` (signed); best effort, says what
    happened."""
    return gateway_tasks.report_roles(rt.cfg.gateway.client_url,
                                      rt.secret(rt.cfg.gateway.webhook_secret), group, **update)


def protect(run: RunbookRun, rt: Runtime, g: GroupConfig, primary: NodeConfig,
            target: NodeConfig, fence_first: bool = False) -> dict[str, Any]:
    """Fence if needed, rewind `target` into a standby of `primary`, wait for it to catch up,
    restore sync, verify. Returns figures; raises (audited) when a step fails."""
    primary_db, target_db = rt.db(g, primary), rt.db(g, target)
    target_agent = agent_of(rt, target)
    out: dict[str, Any] = {}

    with run.step("check the node to protect", target.vm, {"fence_first": fence_first}) as s:
        app = pg.check_primary(target_db)
        status = agents.read_status(target_agent)
        plan = plan_target(target, primary, app, status, fence_first)
        s.result = {"app": app.detail, "agent_status": _brief_status(status), "plan": plan.action}
        s.reason = plan.reason
        if plan.action == "unreachable":
            s.outcome = "refused"
            raise ReprotectStopped(plan.reason)

    if plan.action == "fence":
        with run.step("fence the second primary", target.vm) as s:
            try:
                stopped = agents.stop(target_agent, "immediate")
                after = pg.check_primary(target_db)
                fenced = not after.reachable
                s.result = {"stop": stopped, "after": after.detail}
            except ControlError as exc:
                fenced, s.result = False, {"error": str(exc)}
            if not fenced:
                # The agent could not stop it: power the VM off, the fence of last resort.
                state, err = vsphere.fence(rt.vcenter(target.site), target.vm)
                s.result["power_state"], s.result["power_error"] = state, err
                s.outcome = "refused"
                s.reason = (f"could not stop PostgreSQL on {target.vm} through its agent; "
                            f"vSphere power state now {state}: re-protect it when it returns")
                raise ReprotectStopped(s.reason)
            s.reason = f"PostgreSQL on {target.vm} stopped (immediate) and held down"
        out["fenced"] = True

    if plan.action in ("fence", "rewind"):
        with run.step("rewind into a standby", target.vm,
                      {"source": f"{primary.host}:{primary.port}"}) as s:
            result = agents.rewind_to(target_agent, primary.host, primary.port)
            s.result = {k: result.get(k) for k in ("action", "method", "reason", "streaming",
                                                   "seconds", "phases")}
            s.reason = rewind_reason(result)
        out.update(rewind_method=result.get("method"), rewind_action=result.get("action"),
                   rewind_reason=result.get("reason"), rewind_s=result.get("seconds"))

    with run.step("wait until streaming and caught up", target.vm) as s:
        name = repl.standby_name(target_db)
        replica, view, waited = repl.wait_streaming(primary_db, name, CATCH_UP_TIMEOUT_S)
        lag = max(0, view.lsn - (replica.replay_lsn or 0))
        s.result = {"application_name": name, "sync_state": replica.sync_state,
                    "lag_bytes": lag, "waited_s": round(waited, 3)}
        s.reason = (f"{name} streams from {primary.vm} and replayed up to its WAL position "
                    f"({waited:.2f} s)")
    out["standby_name"] = name

    with run.step("restore synchronous replication", primary.vm) as s:
        view = repl.primary_view(primary_db)
        d = restore_sync(g.replication, view.sync_names, name)
        if d.proceed:
            s.result["previous"] = repl.set_sync_names(primary_db, repl.sync_setting([name]))
        else:
            s.outcome = "skipped"
        if g.replication == "sync":
            replica, _, waited = repl.wait_streaming(primary_db, name, SYNC_TIMEOUT_S,
                                                     caught_up=False, sync=True)
            s.result["sync_state"] = replica.sync_state
        s.reason = d.reason
    out["sync_restored"] = d.proceed

    with run.step("verify replication", target.vm) as s:
        marker = f"{run.runbook}-{run.run_id}-{uuid.uuid4().hex[:8]}"
        pg.verify_write(primary_db, marker)
        seen_after = repl.wait_marker(target_db, marker, 30)
        s.reason = f"a write on {primary.vm} reached {target.vm} in {seen_after:.2f} s"
        s.result = {"marker": marker, "replicated_in_s": round(seen_after, 3)}
    return out


class ReprotectStopped(Exception):
    """A check stopped re-protect; the reason is in the audit trail and in Slack."""


def _brief_status(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {k: status.get(k) for k in ("running", "role", "upstream", "receiver", "lsn",
                                       "held_down")}


# -- the flow -----------------------------------------------------------------------------------


@flow(name="reprotect", log_prints=False, persist_result=False, result_storage=RESULTS)
def reprotect(group: str, trigger: dict[str, Any] | None = None, fence_first: bool = False,
              config_path: str | None = None) -> dict[str, Any]:
    """Make the node that does not serve `group` a synchronous (or async) standby again."""
    # Never alongside a failover, whoever started either.
    with exclusive(roles_limit(group), etcd=runtime(config_path).etcd):
        return final_state(reprotect.fn, _reprotect(group, dict(trigger or {}), fence_first,
                                                    config_path))


def _reprotect(group: str, trigger: dict[str, Any], fence_first: bool,
               config_path: str | None) -> dict[str, Any]:
    rt = runtime(config_path)
    g = rt.cfg.group(group)
    reason = str(trigger.get("reason") or "re-protect requested")
    run = RunbookRun(rt, "reprotect", group, title=f"Re-protect of {group}")
    key = str(trigger.get("idempotency_key") or minute_key())
    run.label(key, None)
    run.start(f"🛡️ *{group}*: {reason}. Re-protecting.", {"trigger": trigger,
                                                         "fence_first": fence_first})
    t0 = time.monotonic()

    def stop(outcome: str, why: str) -> dict[str, Any]:
        run.finish(outcome, f"⚠️ *{group}*: re-protect stopped — {why}", {"outcome": outcome},
                   f"# Re-protect of {group}: {outcome}\n\n{md(why)}\n\n" + run.steps_table())
        return {"outcome": outcome, "reason": why, "group": group}

    with run.step("find the serving primary", g.dns.record) as s:
        serving = observe(rt, g)
        s.reason = serving.decision.reason
        if not serving.decision.proceed:
            s.outcome = "refused"
    if serving.primary is None or serving.other is None:
        return stop("refused", serving.decision.reason)
    primary, target = serving.primary, serving.other
    run.label(key, target.site)  # where it acts: known once DNS said which side serves
    try:
        figures = protect(run, rt, g, primary, target, fence_first)
    except ReprotectStopped as exc:
        return stop("refused", str(exc))
    seconds = time.monotonic() - t0
    # primary_site too: a record that lost track (a gateway whose state was lost says "home
    # serves") is set right by what re-protect found.
    told = tell_gateway(rt, group, primary_site=primary.site, protected=True, transition="none",
                        reason=f"re-protected: {target.vm} streams from {primary.vm}")
    mode = "synchronous" if g.replication == "sync" else "asynchronous"
    how = figures.get("rewind_reason") if figures.get("rewind_method") == "pg_basebackup" else None
    headline = (f"✅ *{group}* protected again: {target.vm} is a {mode} standby of "
                f"{primary.vm} ({seconds:.1f} s"
                + (f", rebuilt by base backup because {how}" if how else "") + ")")
    figures.update(reprotect_s=round(seconds, 3), primary=primary.vm, standby=target.vm,
                   gateway=told)
    run.finish("ok", headline, figures, f"# Re-protect of {group}\n\n{md(headline)}\n\n"
               + run.steps_table())
    summary = f"{target.vm} is a {mode} standby of {primary.vm} again, in {seconds:.1f} s"
    return {"outcome": "protected", "reason": summary, "group": group, **figures}
