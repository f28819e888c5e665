"""Pure decision of the host watch: what vCenter said of a primary's host, against its agent's
heartbeats, and what on-call must be told.

A host `notResponding` in vCenter while the VM's agent heartbeats is, in practice, the host's
management network: the VM serves, so no failover, but vSphere can neither power-off-fence it
nor show a stun until the host is back. A silent agent on a lost host is the heartbeat and
lease paths' business (they fail over): no alert here. A vCenter that does not answer is told
apart: that is vCenter's own outage, whatever the hosts do.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST_UNREACHABLE = "host_unreachable"
VCENTER_UNREACHABLE = "vcenter_unreachable"
# vCenter's host states that mean it no longer reaches the host's management agent.
LOST_HOST_STATES = frozenset({"notResponding", "disconnected"})
LOST_VM_STATES = frozenset({"disconnected", "orphaned", "inaccessible"})


@dataclass(frozen=True)
class Observed:
    """One read of a group's primary through its site's vCenter, plus what its agent said."""

    group: str
    vm: str  # the primary's VM (= its agent id)
    vcenter: str  # how people name that vCenter, e.g. "vc-prod (http://…/sdk)"
    heartbeat_timeout_s: float
    heartbeat_age_s: float | None  # None: the agent was never heard by this gateway
    host: str | None = None  # the ESXi host's name
    host_state: str | None = None  # HostSystem runtime.connectionState
    vm_state: str | None = None  # VirtualMachine runtime.connectionState
    error: str | None = None  # vCenter did not answer (or could not find the VM): why
    vm_missing: bool = False  # vCenter answered, but has no (single) VM of that name
    db_primary_age_s: float | None = None  # since the agent last reported PostgreSQL primary


@dataclass(frozen=True)
class Verdict:
    kind: str | None  # the alert's kind, or None: nothing to tell
    reason: str
    healthy: bool  # vCenter reaches the host and the VM: an earlier alert has recovered


def _ago(seconds: float) -> str:
    return f"{seconds:.1f} s ago"


def judge(o: Observed) -> Verdict:
    """Alert or not, and why, in words on-call can act on."""
    fresh = o.heartbeat_age_s is not None and o.heartbeat_age_s < o.heartbeat_timeout_s
    if o.heartbeat_age_s is None:
        agent = f"its agent {o.vm} has not been heard by this gateway"
    elif fresh:
        agent = f"its agent heartbeats ({_ago(o.heartbeat_age_s)})"
    else:
        agent = f"its agent is silent too (last heartbeat {_ago(o.heartbeat_age_s)})"
    if o.db_primary_age_s is not None:
        agent += f" and last reported PostgreSQL serving as primary ({_ago(o.db_primary_age_s)})"
    if o.error is not None:
        consequence = ("no failover is needed for that" if fresh else
                       "failover fences by the lease only (vSphere cannot be asked)")
        return Verdict(VCENTER_UNREACHABLE, (
            f"vCenter {o.vcenter} does not answer ({o.error}) for primary {o.vm} of {o.group}; "
            f"{agent}: {consequence}. Until it answers, vSphere can neither power-off-fence "
            f"nor show stuns of this site's VMs; check vCenter and the network to it."), False)
    if o.vm_missing:
        return Verdict(None, f"vCenter {o.vcenter} has no single VM named {o.vm} (primary of "
                             f"{o.group}): nothing to watch", False)
    host = o.host or "(unknown host)"
    lost_host = o.host_state in LOST_HOST_STATES
    lost_vm = o.vm_state in LOST_VM_STATES
    if not (lost_host or lost_vm):
        return Verdict(None, f"vCenter {o.vcenter} reaches host {host} of primary {o.vm} of "
                             f"{o.group} ({o.host_state}, VM {o.vm_state})", True)
    shows = (f"host {host} of primary {o.vm} of {o.group} {o.host_state}" if lost_host else
             f"primary {o.vm} of {o.group} {o.vm_state} (host {host} {o.host_state})")
    if not fresh:
        return Verdict(None, f"vCenter {o.vcenter} reports {shows} and {agent} (timeout "
                             f"{o.heartbeat_timeout_s:g} s): the heartbeat and lease paths own "
                             "this, no alert from the host watch", False)
    return Verdict(HOST_UNREACHABLE, (
        f"vCenter {o.vcenter} reports {shows}, but {agent}: likely the host's management "
        f"network; no failover. vSphere cannot power-off-fence or show stuns for this VM until "
        f"the host is back; check the management network of host {host}."), False)
