"""Pure decisions of the failover's fence and takeover (docs/fencing.md, rule 7).

Given what was observed (vSphere, the leader key in etcd, the standby's WAL receiver), which
fence holds, whether to wait, or why to stop; and what a takeover transaction's outcome means.
Each Decision's `reason` goes into the audit trail as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drflow.leader_keys import Leader

DECLARE_FENCED = "drflow failover {group} --declare-fenced --reason TEXT"

Fence = Literal["vsphere", "lease", "attested", "taken_over"]
Action = Literal["fenced", "wait", "power_off", "stop", "retry"]


@dataclass(frozen=True)
class Receiver:
    """The standby's WAL receiver (pg_stat_wal_receiver). `answered` False: the standby's
    PostgreSQL could not be asked; `status` None: no receiver row."""

    answered: bool
    status: str | None = None
    sender: str | None = None
    last_msg_age_s: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class VmView:
    """What vCenter says of the old primary's VM; `error` set: vCenter could not tell."""

    power_state: str | None
    host_connection: str | None = None  # connected / notResponding / disconnected
    stun_task: str | None = None  # a running snapshot / relocate / migrate task on the VM
    error: str | None = None

    @property
    def stunned(self) -> bool:
        """A stun we can see: such a task runs and vCenter still hears the VM's host."""
        return self.stun_task is not None and self.host_connection == "connected"


@dataclass(frozen=True)
class FenceView:
    """One observation of everything the fence depends on, taken at `waited_s` into the step."""

    group: str
    old_vm: str
    new_vm: str
    incident: str
    lease_s: float
    stun_grace_s: float
    waited_s: float
    vm: VmView
    etcd: bool  # the group has leader leases (config has etcd)
    etcd_error: str | None = None  # etcd could not be read now
    leader: Leader | None = None
    leader_raw: str | None = None
    receiver: Receiver | None = None
    attested: str | None = None  # the approved attestation, if any
    key_seen_absent: bool = False  # the leader key was absent at some earlier observation
    stun_seen_at: float | None = None  # waited_s when a stun was first seen
    power_off_tried: bool = False
    power_off_error: str | None = None
    limit_s: float = 0.0  # how long the fence may wait for the lease to expire


@dataclass(frozen=True)
class FenceDecision:
    action: Action
    reason: str
    fence: Fence | None = None
    outcome: str = ""  # for a stop: the failover's outcome

    @property
    def proceed(self) -> bool:
        return self.action == "fenced"


def fence_wait_limit(lease_s: float) -> float:
    """How long a takeover waits for a held lease to run out: a lease renewed just before the
    failure lasts lease_s (raised to at least 2 s by etcd), plus an etcd leader change's
    extension and the lessor's 0.5 s check; beyond that the holder is renewing: alive."""
    return 2 * max(lease_s, 2.0) + 1.0


def receiver_gone(r: Receiver | None, lease_s: float) -> tuple[bool, str]:
    """(the standby no longer hears the old primary, why)."""
    if r is None or not r.answered:
        return False, ("the standby's PostgreSQL could not be asked whether it still receives "
                       f"from the old primary ({r.detail if r else 'not asked'})")
    if r.status is None:
        return True, "the standby has no WAL receiver"
    if r.status != "streaming":
        return True, f"the standby's WAL receiver is {r.status}"
    if r.last_msg_age_s is None:
        return False, "the standby streams, last message time unknown"
    if r.last_msg_age_s > lease_s / 2:
        return True, (f"the standby's last message from {r.sender or 'the old primary'} is "
                      f"{r.last_msg_age_s:.1f} s old (> lease_s/2 = {lease_s / 2:g} s)")
    return False, (f"the standby still receives from {r.sender or 'the old primary'} (last "
                   f"message {r.last_msg_age_s:.1f} s ago)")


def _not_fenced(v: FenceView, why: str) -> FenceDecision:
    return FenceDecision("stop", f"{why}; no promotion without a fence. If {v.old_vm} can no "
                                 "longer acknowledge writes (powered off, isolated, destroyed), "
                                 f"run `{DECLARE_FENCED.format(group=v.group)}` (needs the "
                                 "group's approvers in Slack)", outcome="not_fenced")


def _stun_words(v: FenceView) -> str:
    if v.vm.stunned:
        return (f"vCenter shows {v.vm.stun_task} running on {v.old_vm} with its host connected "
                "(a stun)")
    return f"{v.old_vm} was seen stunned (its task has ended)"


def _vm_words(vm: VmView) -> str:
    if vm.error:
        return f"vSphere state unknown ({vm.error})"
    host = f", host {vm.host_connection}" if vm.host_connection else ""
    return f"vSphere shows it {vm.power_state}{host}"


def decide_fence(v: FenceView) -> FenceDecision:
    """Which fence holds now; else wait, try a power-off, or stop (and why)."""
    if v.attested:
        return FenceDecision("fenced", f"attested: {v.attested}", "attested")
    if v.vm.power_state == "poweredOff":
        return FenceDecision("fenced", f"fenced: vSphere reports {v.old_vm} powered off",
                             "vsphere")
    stun = v.vm.stunned
    # Once a stun was seen, the grace runs even after the task ended: the thawed agent needs a
    # moment to re-acquire its key, and the standby's receiver timed out during the freeze.
    in_grace = (stun and v.stun_seen_at is None) or (
        v.stun_seen_at is not None and v.waited_s - v.stun_seen_at < v.stun_grace_s)
    may_power_off = not stun and not in_grace and not v.power_off_tried
    power_note = (f"; power-off tried: {v.power_off_error}" if v.power_off_tried
                  and v.power_off_error else "")

    if not v.etcd:  # no leader leases in this config: vSphere is the only proof
        if v.stun_seen_at is not None and not stun and in_grace:
            return FenceDecision("stop", f"{_stun_words(v)}: {v.old_vm} thawed; no failover",
                                 outcome="thawed")
        if in_grace:
            return FenceDecision("wait", f"{_stun_words(v)}: no power-off, waiting up to "
                                         f"{v.stun_grace_s:g} s")
        if may_power_off:
            return FenceDecision("power_off", f"{_vm_words(v.vm)}: powering it off")
        return _not_fenced(v, f"{v.old_vm} is not seen powered off ({_vm_words(v.vm)}"
                              f"{power_note}) and the group has no leader lease")
    if v.etcd_error is not None:
        if may_power_off:
            return FenceDecision("power_off", f"etcd unreachable ({v.etcd_error}): trying a "
                                              f"power-off of {v.old_vm}")
        if in_grace:
            return FenceDecision("wait", f"etcd unreachable and {_stun_words(v)}: waiting")
        return _not_fenced(v, f"etcd unreachable ({v.etcd_error}) and {v.old_vm} not seen "
                              f"powered off ({_vm_words(v.vm)}{power_note})")

    ld = v.leader
    if ld is not None:
        if ld.agent_id == v.new_vm and ld.incident == v.incident and ld.by != "agent":
            return FenceDecision("fenced", f"the leader key already names {v.new_vm} by {ld.by} "
                                           f"for this incident ({v.incident}): a re-run, the "
                                           "takeover was made", "taken_over")
        if ld.agent_id == v.new_vm and ld.by == "agent":
            return FenceDecision("fenced", f"{v.new_vm}'s agent already holds the leader key: "
                                           "taken over earlier", "taken_over")
        if ld.agent_id != v.old_vm:
            return FenceDecision("stop", f"the leader key names {ld.agent_id} (by {ld.by}, "
                                         f"incident {ld.incident}): another takeover won; no "
                                         "second promotion", outcome="superseded")
        # The old primary holds the key.
        if v.key_seen_absent or (v.stun_seen_at is not None and not stun):
            return FenceDecision("stop", f"{v.old_vm} thawed and re-acquired its lease (the "
                                         "leader key names it again): it serves; no failover",
                                 outcome="reacquired")
        if in_grace:
            return FenceDecision("wait", f"{_stun_words(v)} and its lease still stands: "
                                         f"waiting up to {v.stun_grace_s:g} s")
        if v.waited_s >= v.limit_s:
            return FenceDecision("stop", f"{v.old_vm} still holds its leader lease after "
                                         f"{v.waited_s:.1f} s (renewing: alive); no failover",
                                 outcome="primary_alive")
        # No power-off while its agent holds the key: the lease lives only while the agent
        # renews it (and the agent fences itself before it ends when it cannot), so a held key
        # is a live agent. Silence heard by a slow or cut-off gateway, with a vCenter read that
        # timed out, once powered off a healthy primary here. A dead one's key is gone within
        # lease_s, and the lease or a power-off fences it then.
        return FenceDecision("wait", f"{v.old_vm} still holds its leader lease (its agent "
                                     "renews it: no power-off of a live primary); waiting for "
                                     "it to expire")

    # The leader key is absent.
    if in_grace:
        return FenceDecision("wait", f"the leader key is absent and {_stun_words(v)}: "
                                     f"waiting up to {v.stun_grace_s:g} s for its agent to "
                                     "re-acquire it")
    gone, why = receiver_gone(v.receiver, v.lease_s)
    if gone:
        return FenceDecision("fenced", f"lease fence: the leader key of {v.group} is absent "
                                       f"(lease expired or released) and {why}", "lease")
    if may_power_off:
        return FenceDecision("power_off", f"the leader key is absent but {why}; trying a "
                                          "power-off meanwhile")
    if v.waited_s >= v.limit_s:
        return _not_fenced(v, f"the leader key is absent but {why}{power_note}: the old "
                              "primary may be alive")
    return FenceDecision("wait", f"the leader key is absent but {why}: waiting")


# -- the takeover transaction -------------------------------------------------------------------


@dataclass(frozen=True)
class TakeoverView:
    """What the takeover txn found: its success, and the keys re-read when it failed."""

    succeeded: bool
    new_vm: str
    old_vm: str
    incident: str
    leader: Leader | None = None
    sync_standby: str | None = None  # what the sync key names after a failure
    sync_present: bool = False
    sync_required: bool = False


def takeover_outcome(t: TakeoverView, force: bool) -> FenceDecision:
    """The takeover txn's outcome, or why it failed (from the keys re-read afterwards)."""
    if t.succeeded:
        return FenceDecision("fenced", f"took over: the leader key now names {t.new_vm} for "
                                       f"incident {t.incident}")
    ld = t.leader
    if ld is not None:
        if ld.agent_id == t.new_vm and (ld.by == "agent" or ld.incident == t.incident):
            return FenceDecision("fenced", f"the leader key already names {t.new_vm} (by {ld.by}"
                                           f", incident {ld.incident}): this incident's "
                                           "takeover, accepted", "taken_over")
        if ld.agent_id == t.old_vm and ld.by == "agent":
            return FenceDecision("stop", f"{t.old_vm} re-acquired its leader key before the "
                                         "takeover: it serves; no failover",
                                 outcome="reacquired")
        return FenceDecision("stop", f"another takeover won: the leader key names "
                                     f"{ld.agent_id} (by {ld.by}, incident {ld.incident}); no "
                                     "second promotion", outcome="superseded")
    if t.sync_required and t.sync_standby != t.new_vm:
        named = (f"names {t.sync_standby}" if t.sync_present and t.sync_standby
                 else "names no standby" if t.sync_present else "is absent")
        if force:
            return FenceDecision("retry", f"override: the sync key {named}, not {t.new_vm}; "
                                         "taking over without it because force=True was given")
        return FenceDecision("stop", f"the sync key {named}, not {t.new_vm}: it may miss "
                                     "acknowledged writes (a stale standby); refusing to take "
                                     "over (re-run with --force to accept the loss)",
                             outcome="refused")
    return FenceDecision("retry", "the takeover txn failed but the keys re-read now allow it")
