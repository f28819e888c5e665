"""Failover runbook: confirm → fence → check lag → promote → relax sync → DNS → verify → report.

Every step is idempotent, so a run re-started after a crash at any point completes without a
second promotion: the fence is checked before promoting, a promoted standby is not promoted again,
and the DNS change and the verification write are safe to repeat.

Whatever started it (the gateway, `drflow failover`, a worker), the run holds its group's
`roles-<group>` lock (flows/locks.py) and moves the gateway's roles record itself: roles in motion
before the fence, the promoted side serving right after the promotion (docs/safety.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from prefect import flow

from drflow.config import GroupConfig, NodeConfig
from drflow.etcd import Client as EtcdClient
from drflow.etcd import EtcdError
from drflow.leader_keys import Leader, LeaderBy
from flows import confirm_prefetch
from flows.cutover import point_dns_and_verify
from flows.decisions import (
    Decision,
    confirm_failure,
    lag_estimate,
    promotion,
    relax_sync,
)
from flows.fencing import (
    FenceDecision,
    FenceView,
    Receiver,
    TakeoverView,
    VmView,
    decide_fence,
    fence_wait_limit,
    takeover_outcome,
)
from flows.locks import exclusive, roles_limit
from flows.prefect_results import RESULTS
from flows.run import RunbookRun, end_expired_pause, final_state, md, run_name, run_tags
from flows.runtime import Runtime, runtime
from tasks import etcd as etcd_task
from tasks import gateway as gw
from tasks import postgres as pg
from tasks import vsphere

# The confirm step's two looks, in parallel: a silent address must not cost libpq's 2 s minimum.
VM_READ_S = 0.8
APP_CHECK_S = 0.5
POLL_S = 0.1  # etcd is polled this often while the fence is not yet proven
VM_POLL_S = 0.5  # vCenter is re-read this often (a stun task ends, a power-off completes)
POWER_OFF_FENCE_S = 2.0  # a power-off counts as the fence only if it completed this soon
POWER_OFF_AFTER_S = 5.0  # the attempt after a lease takeover: bounded, never blocking
ETCD_DOWN_AFTER_S = 1.0  # etcd counts as unreachable after failing this long
RECEIVER_S = 0.5


class FailoverStopped(Exception):
    """A safety check stopped the failover; the reason is in the audit trail and in Slack."""


def _first_failure_epoch(incident: dict[str, Any]) -> float:
    raw = incident.get("first_failure_at")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        return datetime.fromisoformat(raw).timestamp()
    return time.time()


@flow(name="failover", log_prints=False, persist_result=False, result_storage=RESULTS)
def failover(group: str, incident: dict[str, Any] | None = None, force: bool = False,
             config_path: str | None = None, declare_fenced: str | None = None,
             approval_timeout_s: float | None = None) -> dict[str, Any]:
    """Move group `group`'s service to its standby. `incident` carries what triggered it (the
    gateway's evidence); `force` accepts promoting beyond the RPO budget, audited.
    `declare_fenced` (the operator's reason): no fence can be proven, the operator attests it;
    the run asks the group's approvers in Slack first (`drflow failover --declare-fenced`)."""
    with exclusive(roles_limit(group), etcd=runtime(config_path).etcd):
        return final_state(failover.fn, _failover(group, dict(incident or {}), force,
                                                  config_path, declare_fenced,
                                                  approval_timeout_s))


def labels(config_path: str | None, group: str,
           incident: dict[str, Any]) -> tuple[str, list[str]]:
    """(name, tags) of the failover run of this incident, as the run gives itself: a starter
    that creates or claims the run names it so, and the run sends nothing."""
    g = runtime(config_path).cfg.group(group)
    _, new = failed_and_target(g, incident)
    return run_name("failover", group, incident_key(group, incident)), \
        run_tags("failover", group, new.site)


def incident_key(group: str, incident: dict[str, Any]) -> str:
    """What names this incident in the takeover's leader value: the gateway's idempotency key,
    else a digest of the parameters, so a re-run of the same incident finds its own takeover
    and accepts it."""
    key = incident.get("idempotency_key") or incident.get("incident_key")
    if key:
        return str(key)
    digest = hashlib.sha256(json.dumps(incident, sort_keys=True, default=str).encode())
    return f"failover:{group}:{digest.hexdigest()[:16]}"


def _failover(group: str, incident: dict[str, Any], force: bool,
              config_path: str | None, declare_fenced: str | None = None,
              approval_timeout_s: float | None = None) -> dict[str, Any]:
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
    key = incident_key(group, incident)
    run.label(key, new.site)
    run.start(f"🔴 *{group}*: {reported}. Failing over to {new.vm} ({new.site}).",
              {"incident": incident, "force": force, "primary": old.vm,
               "standby": new.vm, "takeover_incident": key, "declare_fenced": declare_fenced})
    moving = False

    def stop(outcome: str, why: str) -> dict[str, Any]:
        if moving:  # nothing was promoted: roles are where they were
            report_roles(rt, group, transition="none", reason=f"failover stopped: {why}")
        run.finish(outcome, f"⚠️ *{group}*: failover stopped — {why}",
                   {"outcome": outcome}, f"# Failover of {group}: {outcome}\n\n{md(why)}\n\n"
                   + run.steps_table())
        return {"outcome": outcome, "reason": why, "group": group}

    attested: str | None = None
    if declare_fenced is not None:
        d, attested = ask_attestation(run, rt, g, old, new, declare_fenced, approval_timeout_s)
        if attested is None:
            return stop("not_attested", d.reason)

    with run.step("confirm failure", old.vm, {"vm_read_s": VM_READ_S,
                                              "app_check_s": APP_CHECK_S}) as s:
        looks = confirm_prefetch.take(key)
        if looks is not None:  # started with the run by the warm runner (flows/confirm_prefetch.py)
            vm_state, app = looks.vm, looks.app
        else:
            with ThreadPoolExecutor(2, thread_name_prefix="confirm") as pool:
                vm_f = pool.submit(vsphere.read_vm_state, old_vc, old.vm, VM_READ_S)
                app_f = pool.submit(pg.check_primary_within, old_primary, APP_CHECK_S)
                vm_state, app = vm_f.result(), app_f.result()
        d = confirm_failure(old.vm, vm_state.power_state, app, reported)
        s.result = {"power_state": vm_state.power_state, "power_error": vm_state.error,
                    "host_connection": vm_state.host_connection,
                    "stun_task": vm_state.stun_task, "app": app.detail,
                    "looked_s_before_the_step": round(looks.age_s, 2) if looks else 0.0}
        _decide(s, d)
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

    with run.step("fence old primary", old.vm,
                  {"lease_s": g.policy.lease_s, "stun_grace_s": g.policy.stun_grace_s,
                   "leases": rt.etcd is not None}) as s:
        fence = prove_fence(rt, g, old, new, key, vm_state, attested)
        s.result = fence.evidence
        s.reason = fence.decision.reason
        if not fence.decision.proceed:
            s.outcome = "refused"
    if not fence.decision.proceed:
        return stop(fence.decision.outcome or "not_fenced", fence.decision.reason)
    keys = fence.keys

    with run.step("check standby lag", new.vm, {"rpo_budget_s": g.rpo_budget_s,
                                                      "force": force}) as s:
        st = pg.standby_status(standby)
        if not _has_replication_evidence(evidence):
            # Started outside a gateway incident (`drflow failover`): only the gateway heard
            # the old primary's heartbeats; ask it (read after the fence, so no later report).
            evidence, s.result["evidence_source"] = gateway_evidence(rt, group, old.vm)
        history = [(float(t), int(lsn)) for t, lsn in evidence.get("primary_lsn_history", [])]
        last = evidence.get("primary_last_lsn")
        named = keys is not None and keys.sync is not None and keys.sync.standby == new.vm
        s.result["sync_names_standby"] = named
        lag = lag_estimate(st.received_lsn, int(last) if last is not None else None, history,
                           was_sync_standby=g.replication == "sync"
                           and (named or bool(evidence.get("sync_standby_streaming"))))
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

    leader_raw: str | None = None
    if rt.etcd is not None:
        with run.step("take over the leader key", g.name, {"takeover_incident": key,
                                                          "fence": fence.kind}) as s:
            td, leader_raw, s.result = take_over(rt.etcd, g, old, new, key, fence, force)
            s.reason = td.reason
            if td.action == "stop":
                s.outcome = "refused"
            elif fence.kind == "taken_over":
                s.outcome = "skipped"
        if td.action == "stop":
            return stop(td.outcome or "refused", td.reason)
    power_after = fence.power_off
    power_skipped: str | None = None
    if fence.kind in ("lease", "taken_over", "attested") and power_after is None \
            and not fence.vm.stunned and fence.vm.power_state != "poweredOff":
        if fence.vm.error is not None:
            # A request to an unreachable vCenter is not bounded by our timeout: it may land
            # when the network heals and power off a VM that re-protect would bring back.
            power_skipped = (f"not attempted: vCenter did not answer ({fence.vm.error}); a "
                             "request sent now could reach it after a heal and power off the "
                             f"VM re-protect brings back (the fence was the {fence.kind})")
        else:
            power_after = vsphere.PowerOff(old_vc, old.vm)  # audited below, never waited for

    with run.step("promote standby", new.vm) as s:
        promoted_now = pg.promote(standby)
        s.reason = ("promoted" if promoted_now
                    else "already a primary: not promoted a second time")

    sync_ok = True
    if rt.etcd is not None:
        with run.step("record the new primary in the sync key", new.vm) as s:
            sync_ok, s.reason = write_sync_key(rt.etcd, g, new, leader_raw, fence.kind)
            if not sync_ok:
                s.outcome = "refused"

    with run.step("relax synchronous replication", new.vm) as s:
        left, setting = pg.sync_standby_count(standby)
        d = relax_sync(g.replication, left, setting)
        if d.proceed and not sync_ok:
            d = Decision(False, "not relaxed: the sync key could not be written first, so "
                                "writes wait rather than be acknowledged by a primary etcd "
                                "does not name")
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

    if power_skipped is not None:
        with run.step("power off the old primary (after the takeover)", old.vm) as s:
            s.outcome, s.reason = "skipped", power_skipped
    if power_after is not None and fence.kind != "vsphere":
        with run.step("power off the old primary (after the takeover)", old.vm,
                      {"bound_s": POWER_OFF_AFTER_S}) as s:
            res = power_after.result(POWER_OFF_AFTER_S - power_after.elapsed_s)
            if res is None:
                s.outcome = "failed"
                s.reason = (f"the power-off of {old.vm} did not complete within "
                            f"{POWER_OFF_AFTER_S:g} s (the fence was the {fence.kind}; "
                            "the promotion did not wait for it)")
            else:
                s.result = {"power_state": res[0], "error": res[1]}
                s.reason = f"{old.vm} is {res[0]}" + (f" ({res[1]})" if res[1] else "")
                if res[0] != "poweredOff":
                    s.outcome = "failed"

    rto_s = acked - first_failure
    figures = {"rto_s": round(rto_s, 3), "rpo_s": rpo_s, "rpo_bytes": rpo_bytes,
               "promoted_now": promoted_now, "sync_relaxed": relaxed, "fence": fence.kind}
    sync_note = (" Synchronous replication relaxed on purpose (no standby left); re-protect "
                 "restores it." if relaxed and g.replication == "sync" else "")
    headline = (f"✅ *{group}* failed over to {new.vm}: RTO {rto_s:.1f} s, "
                f"RPO {_fmt(rpo_s)} s ({rpo_bytes if rpo_bytes is not None else '?'} bytes). "
                f"Old primary {old.vm} fenced ({fence.kind}).{sync_note}")
    markdown = (f"# Failover of {group}\n\n{md(headline)}\n\n"
                f"* trigger: {reported}\n* first failure evidence: "
                f"{datetime.fromtimestamp(first_failure, UTC).isoformat()}\n"
                f"* RTO (first failure → verified write through DNS): **{rto_s:.2f} s**\n"
                f"* RPO (standby lag at promotion): **{_fmt(rpo_s)} s / {rpo_bytes} bytes**\n\n"
                + run.steps_table())
    run.finish("ok", headline, figures, markdown)
    summary = (f"failed over to {new.vm} ({new.site}) in {rto_s:.1f} s, RPO {_fmt(rpo_s)} s"
               + (f" / {rpo_bytes} bytes" if rpo_bytes is not None else ""))
    return {"outcome": "failed_over", "reason": summary, "group": group, **figures}


# -- the fence (rule 7 of docs/fencing.md) ---------------------------------------------------------


@dataclass
class FenceResult:
    decision: FenceDecision
    vm: VmView
    keys: etcd_task.Keys | None = None
    power_off: vsphere.PowerOff | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.decision.fence or "none"


class _VmWatch:
    """Re-reads vCenter's view of the old VM in the background, so the etcd poll never waits."""

    def __init__(self, vc: vsphere.VCenter, vm: str, first: vsphere.VmState) -> None:
        self.latest = first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(vc, vm), daemon=True,
                                        name=f"vm-watch-{vm}")
        self._thread.start()

    def _run(self, vc: vsphere.VCenter, vm: str) -> None:
        while not self._stop.wait(VM_POLL_S):
            self.latest = vsphere.read_vm_state(vc, vm, VM_READ_S)

    def stop(self) -> None:
        self._stop.set()


def _vm_view(v: vsphere.VmState) -> VmView:
    return VmView(v.power_state, v.host_connection, v.stun_task, v.error)


def prove_fence(rt: Runtime, g: GroupConfig, old: NodeConfig, new: NodeConfig, key: str,
                first: vsphere.VmState, attested: str | None) -> FenceResult:
    """Poll until one fence holds (vSphere powered off, the lease, an attestation) or a stop;
    a power-off is tried (bounded) unless vCenter shows a stun."""
    client = rt.etcd
    lease_s, grace = float(g.policy.lease_s), float(g.policy.stun_grace_s)
    limit = fence_wait_limit(lease_s)
    hard_stop = limit + grace + 2 * POWER_OFF_FENCE_S
    t0 = time.monotonic()
    watch = _VmWatch(rt.vcenter(old.site), old.vm, first)
    standby = rt.db(g, new)
    power: vsphere.PowerOff | None = None
    power_tried, power_err = False, None
    seen_absent, stun_seen_at = False, None
    absent_since: float | None = None
    absent_revision = 0
    keys: etcd_task.Keys | None = None
    etcd_err: str | None = None
    etcd_ok_at = t0
    receiver: pg.ReceiverState | None = None
    polls = 0
    try:
        while True:
            polls += 1
            waited = time.monotonic() - t0
            vm = _vm_view(watch.latest)
            if power is not None and not power_tried:
                res = power.result(0)
                if res is not None:
                    power_tried, power_err = True, res[1]
                    if res[0] == "poweredOff":
                        vm = replace(vm, power_state="poweredOff")
                elif power.elapsed_s >= POWER_OFF_FENCE_S:
                    power_tried = True
                    power_err = f"did not complete within {POWER_OFF_FENCE_S:g} s"
            if client is not None:
                try:
                    keys = etcd_task.read_keys(client, g.name)
                    etcd_err, etcd_ok_at = None, time.monotonic()
                except EtcdError as exc:
                    if time.monotonic() - etcd_ok_at >= ETCD_DOWN_AFTER_S or keys is None:
                        etcd_err = str(exc)[:300]
                if keys is not None and etcd_err is None and keys.leader_raw is None:
                    if not seen_absent:
                        seen_absent, absent_since = True, time.time()
                        absent_revision = keys.revision
                    receiver = pg.wal_receiver(standby, RECEIVER_S)
            if vm.stunned and stun_seen_at is None:
                stun_seen_at = waited
            view = FenceView(
                group=g.name, old_vm=old.vm, new_vm=new.vm, incident=key, lease_s=lease_s,
                stun_grace_s=grace, waited_s=waited, vm=vm, etcd=client is not None,
                etcd_error=etcd_err,
                leader=keys.leader if keys is not None and etcd_err is None else None,
                leader_raw=keys.leader_raw if keys is not None else None,
                receiver=_receiver(receiver) if receiver is not None else None,
                attested=attested, key_seen_absent=seen_absent and keys is not None
                and keys.leader_raw is not None, stun_seen_at=stun_seen_at,
                power_off_tried=power_tried, power_off_error=power_err, limit_s=limit)
            d = decide_fence(view)
            if d.action == "power_off" and power is None:
                power = vsphere.PowerOff(rt.vcenter(old.site), old.vm)
            if d.action in ("fenced", "stop"):
                break
            if waited >= hard_stop:
                d = FenceDecision("stop", f"no fence proven within {waited:.1f} s: {d.reason}",
                                  outcome="not_fenced")
                break
            time.sleep(max(0.0, POLL_S - (time.monotonic() - t0 - waited)))
    finally:
        watch.stop()
    evidence: dict[str, Any] = {
        "fence": d.fence, "waited_s": round(time.monotonic() - t0, 3), "polls": polls,
        "vsphere": {"power_state": vm.power_state, "host_connection": vm.host_connection,
                    "stun_task": vm.stun_task, "error": vm.error},
        "power_off": None if power is None else {"tried": True, "error": power_err},
        "stun_seen_after_s": stun_seen_at,
    }
    if client is not None:
        evidence["etcd"] = {"error": etcd_err,
                            "leader": keys.leader_raw if keys is not None else None,
                            "revision": keys.revision if keys is not None else None,
                            "lease_absent_since": absent_since,
                            "absent_at_revision": absent_revision or None}
        evidence["standby_receiver"] = receiver.detail if receiver is not None else None
    return FenceResult(d, vm, keys if etcd_err is None else None, power, evidence)


def _receiver(r: pg.ReceiverState) -> Receiver:
    return Receiver(r.answered, r.status, r.sender, r.last_msg_age_s, r.detail)


def take_over(client: EtcdClient, g: GroupConfig, old: NodeConfig, new: NodeConfig, key: str,
              fence: FenceResult, force: bool) -> tuple[FenceDecision, str | None, dict[str, Any]]:
    """The ONE takeover txn (rule 7): (its outcome, the leader value now naming `new`, evidence).
    With etcd unreachable, only a vSphere or attested fence goes on without it."""
    if fence.kind == "taken_over" and fence.keys is not None:
        return (FenceDecision("fenced", f"already taken over for this incident: "
                                        f"{fence.decision.reason}", "taken_over"),
                fence.keys.leader_raw, {"leader": fence.keys.leader_raw})
    by: LeaderBy = "attested" if fence.kind == "attested" else "takeover"
    result: dict[str, Any] = {}
    for _attempt in range(3):
        try:
            keys = etcd_task.read_keys(client, g.name)
            ld = keys.leader
            expect = keys.leader_raw if ld is not None and ld.agent_id == old.vm \
                and fence.kind in ("vsphere", "attested") else None
            if ld is not None and ld.agent_id == new.vm and (ld.by == "agent"
                                                             or ld.incident == key):
                # A re-run: this incident's takeover (or the promoted agent's key) stands.
                d = takeover_outcome(TakeoverView(False, new.vm, old.vm, key, leader=ld), force)
                result["found_leader"] = keys.leader_raw
                return d, keys.leader_raw, result
            sync = keys.sync
            # The sync key names the standby, or already records it as the primary (a re-run
            # after the sync key was written, the takeover lease since gone).
            sync_raw = keys.sync_raw if g.replication == "sync" and sync is not None \
                and new.vm in (sync.standby, sync.primary) else None
            # A sync key never written (no agent of the group has held the leader key yet)
            # tells nothing: the lag check before this step stays the guard, and the txn
            # compares its absence. A key naming another standby, or none, refuses.
            never_written = g.replication == "sync" and keys.sync_raw is None
            if never_written:
                result["sync"] = "absent: never written; the RPO check decided"
            if g.replication == "sync" and sync_raw is None and not never_written:
                pre = takeover_outcome(TakeoverView(
                    False, new.vm, old.vm, key, leader=None,
                    sync_standby=sync.standby if sync else None, sync_present=sync is not None,
                    sync_required=True), force)
                result["sync"] = keys.sync_raw
                if pre.action == "stop":
                    return pre, None, result
                result["override"] = pre.reason
            leader = Leader(agent_id=new.vm, by=by, incident=key, since=time.time())
            tk = etcd_task.take_over(client, g.name, leader, expect, sync_raw,
                                     sync_absent=never_written)
        except EtcdError as exc:
            result["etcd_error"] = str(exc)[:300]
            time.sleep(0.3)
            continue
        result.update({"succeeded": tk.succeeded, "leader": tk.leader_raw,
                       "lease": tk.lease, "lease_ttl_s": tk.lease_ttl,
                       "compared_leader": expect or "absent", "compared_sync": sync_raw})
        if tk.succeeded:
            d = takeover_outcome(TakeoverView(True, new.vm, old.vm, key), force)
            return FenceDecision("fenced", d.reason + (f" ({result['override']})"
                                                       if "override" in result else ""),
                                 fence.decision.fence), tk.leader_raw, result
        after = tk.after
        s = after.sync
        d = takeover_outcome(TakeoverView(False, new.vm, old.vm, key, leader=after.leader,
                                          sync_standby=s.standby if s else None,
                                          sync_present=s is not None,
                                          sync_required=g.replication == "sync"), force)
        result["found_leader"] = after.leader_raw
        if d.action == "fenced":
            return d, after.leader_raw, result
        if d.action == "stop":
            return d, None, result
    if fence.kind in ("vsphere", "attested"):
        return (FenceDecision("fenced", f"etcd unreachable ({result.get('etcd_error')}): no "
                                        f"takeover txn; the fence stands by {fence.kind}",
                              fence.decision.fence), None, result)
    return (FenceDecision("stop", f"the takeover txn could not be made "
                                  f"({result.get('etcd_error', 'keys kept changing')}): not "
                                  "promoting", outcome="not_fenced"), None, result)


def write_sync_key(client: EtcdClient, g: GroupConfig, new: NodeConfig,
                   leader_raw: str | None, fence_kind: str) -> tuple[bool, str]:
    """Write `SyncState(primary=new, standby=None)` guarded by the takeover's leader value,
    before the new primary relaxes synchronous replication (rule 5)."""
    if leader_raw is None:
        return True, (f"no takeover value to guard with (etcd unreachable; fence by "
                      f"{fence_kind}): not written. The key cannot name a stale standby a "
                      f"takeover would accept: it names {new.vm}, now the primary")
    try:
        return etcd_task.write_sync_none(client, g.name, new.vm, leader_raw)
    except EtcdError as exc:
        if fence_kind in ("vsphere", "attested"):
            return True, (f"etcd unreachable ({str(exc)[:200]}): not written; fence by "
                          f"{fence_kind}")
        return False, f"etcd unreachable ({str(exc)[:200]}): sync key not written"


# -- the attested fence (`drflow failover --declare-fenced`) ----------------------------------------


def attestation_text(g: GroupConfig, old: NodeConfig, new: NodeConfig, reason: str,
                     timeout_s: float) -> str:
    p = g.policy
    who = ", ".join(f"<@{u}>" for u in p.approvers) or "nobody (no approvers configured)"
    return (f"*Declare {old.vm} fenced and fail {g.name} over to {new.vm} ({new.site})?*\n"
            f"You attest that *{old.vm} can no longer acknowledge writes: powered off, "
            "isolated, or destroyed*. drflow could not prove it (no vSphere power-off seen, no "
            "expired leader lease with etcd): if it is still running and reachable by clients, "
            "two primaries will take writes.\n"
            f"• operator's reason: {reason}\n"
            f"• on approval: {new.vm} is promoted, audited as an attested fence\n"
            f"• needs {p.approvals_required} approval(s) from {who} (distinct); expires in "
            f"{timeout_s:.0f} s (then nothing happens)")


def ask_attestation(run: RunbookRun, rt: Runtime, g: GroupConfig, old: NodeConfig,
                    new: NodeConfig, reason: str,
                    timeout_s: float | None) -> tuple[Decision, str | None]:
    """Post the attestation request; pause until the gateway resumes the run with the
    approvers' verified decision (the failback's machinery). (decision, the attestation)."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    from drflow.approval import check_answer
    from flows.failback import ApprovalInput, approval_blocks

    p = g.policy
    timeout = timeout_s if timeout_s is not None else p.approval_timeout_s
    text = attestation_text(g, old, new, reason, timeout)
    with run.step("request the fence attestation in Slack", g.name,
                  {"approvers": p.approvers, "approvals_required": p.approvals_required,
                   "timeout_s": timeout, "reason": reason}) as s:
        resp = rt.slack.client().chat_postMessage(
            channel=rt.slack.channel, text=f"Failover of {g.name}: attestation needed",
            blocks=approval_blocks(g.name, run.run_id, rt.scrub(text),
                                   title=f"Declare {old.vm} fenced",
                                   approve_text="I attest: fail over"))
        s.result = {"message_ts": str(resp["ts"])}
        s.reason = f"asked for the attestation that {old.vm} can no longer acknowledge writes"
    with run.step("wait for the attestation", g.name, {"timeout_s": timeout},
                  as_task=False) as s:
        try:
            answer = pause_flow_run(wait_for_input=ApprovalInput,
                                    timeout=max(1, math.ceil(timeout)), poll_interval=1)
        except FlowPauseTimeout:
            end_expired_pause()
            s.outcome, s.reason = "refused", f"no decision within {timeout:.0f} s"
            return Decision(False, s.reason), None
        secret = rt.secret(rt.cfg.gateway.webhook_secret).get_secret_value().encode()
        approvers = list(answer.approvers) or [answer.approver]
        check = check_answer(run_id=run.run_id, approved=answer.approved, approvers=approvers,
                             given_proof=answer.proof, secret=secret, allowed=p.approvers,
                             required=p.approvals_required)
        s.result = {"approved": answer.approved, "approvers": approvers,
                    "comment": answer.comment}
        s.reason = check.reason
        if not check.proceed:
            s.outcome = "refused"
            return Decision(False, check.reason), None
    return Decision(True, check.reason), (
        f"{', '.join(approvers)} attested that {old.vm} can no longer acknowledge writes "
        f"(powered off, isolated, or destroyed): {reason}")


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
