"""Pure decisions of the DR drill: is the group ready, is the bubble isolated, did the copy pass.

Each returns a `Decision` whose `reason` goes into the audit trail, the report and Slack as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flows.decisions import Decision

if TYPE_CHECKING:  # the facts are gathered by tasks; decisions only read them
    from tasks.drill_checks import CopyFacts, ReplicationFacts
    from tasks.vsphere import IsolationFacts


def replication_ready(f: ReplicationFacts, primary: str, replication: str,
                      rpo_budget_s: float) -> Decision:
    """Streaming from the configured primary, synchronous if the group says so, within budget."""
    if f.error:
        return Decision(False, f"replication state unknown: {f.error}")
    if f.standby_in_recovery is False:
        return Decision(False, "the standby is not in recovery (it is a primary): a drill needs "
                               "a healthy pair; check whether a failover happened")
    if f.sender != primary:
        return Decision(False, f"the standby streams from {f.sender or 'nowhere'}, not from the "
                               f"configured primary {primary}")
    if f.state != "streaming":
        return Decision(False, f"the primary sees the standby in state {f.state or 'absent'}, "
                               "not streaming")
    if replication == "sync" and f.sync_state not in ("sync", "quorum"):
        return Decision(False, f"the group replicates synchronously but the standby is "
                               f"{f.sync_state!r}, not a synchronous standby")
    paused = "; WAL replay is paused on the standby" if f.replay_paused else ""
    if f.lag_s is None:
        return Decision(False, f"standby lag unknown ({f.lag_bytes} bytes behind){paused}")
    figures = f"standby lag {f.lag_s:.2f} s / {f.lag_bytes} bytes"
    if f.lag_s > rpo_budget_s:
        return Decision(False, f"{figures} exceeds the RPO budget of {rpo_budget_s:g} s{paused}")
    return Decision(True, f"streaming ({f.sync_state}) from {primary}; {figures}, within the "
                          f"RPO budget of {rpo_budget_s:g} s")


def isolation_proven(f: IsolationFacts, portgroup: str) -> Decision:
    """The bubble's network must provably reach nothing: no uplink, no VM bridging it elsewhere.

    VMs that sit only on the isolated port group (another group's drill clone) cannot reach
    production through it, so they do not break isolation.
    """
    if f.error:
        return Decision(False, f"cannot prove isolation: {f.error}")
    if not f.portgroup_found:
        return Decision(False, f"cannot prove isolation: no port group {portgroup!r} on host "
                               f"{f.host}; create it on a vSwitch without physical NICs")
    if f.distributed:
        return Decision(False, f"cannot prove isolation: {portgroup!r} is a distributed port "
                               "group; drills need a standard vSwitch port group without uplinks")
    if f.pnics or f.bridged:
        nics = ", ".join(f.pnics) or "a bridge"
        return Decision(False, f"not isolated: vSwitch {f.vswitch} of {portgroup!r} has an "
                               f"uplink ({nics}); remove it or use another port group")
    if f.other_portgroups:
        return Decision(False, f"not isolated: vSwitch {f.vswitch} also carries port group(s) "
                               f"{', '.join(f.other_portgroups)}")
    if portgroup in f.standby_networks:
        return Decision(False, f"not isolated: the standby VM itself is on {portgroup!r}")
    if f.bridging_vms:
        return Decision(False, f"not isolated: VM(s) {', '.join(f.bridging_vms)} are on "
                               f"{portgroup!r} and on other networks, bridging it")
    return Decision(True, f"{portgroup!r} on host {f.host} sits on vSwitch {f.vswitch} with no "
                          "physical NIC and no other port group")


def dns_sane(resolved: tuple[str, int] | None, error: str | None, record: str,
             primary_host: str, primary_port: int) -> Decision:
    """Clients must be pointed at the primary: a drill next to a half-done failover is refused."""
    if resolved is None:
        return Decision(False, f"cannot read {record}: {error or 'no such record'}")
    host, port = resolved
    if (host, port) != (primary_host, primary_port):
        return Decision(False, f"{record} points at {host}:{port}, not at the primary "
                               f"{primary_host}:{primary_port}")
    return Decision(True, f"{record} points at the primary {host}:{port}")


@dataclass(frozen=True)
class CopyPlan:
    """How the drill copies the standby: `method` None when it cannot copy as configured."""

    method: str | None
    reason: str

    @property
    def decision(self) -> Decision:
        return Decision(self.method is not None, self.reason)


def copy_plan(configured: str, snapshot_problem: str | None) -> CopyPlan:
    """Snapshot when configured or possible (nothing read through production); a configured
    snapshot that cannot be made refuses the drill rather than copying the database instead."""
    if configured == "basebackup":
        return CopyPlan("basebackup", "pg_basebackup through the standby (drill.copy_method)")
    if snapshot_problem is None:
        return CopyPlan("snapshot", "copy-on-write snapshot of the standby's data directory")
    if configured == "snapshot":
        return CopyPlan(None, f"drill.copy_method is snapshot, but {snapshot_problem}")
    return CopyPlan("basebackup", f"pg_basebackup through the standby: no snapshot, as "
                                  f"{snapshot_problem}")


def readiness(checks: Mapping[str, Decision]) -> Decision:
    """All checks must pass; the reason lists every one that did not."""
    failed = [f"{name}: {d.reason}" for name, d in checks.items() if not d.proceed]
    if failed:
        return Decision(False, "not ready — " + "; ".join(failed))
    return Decision(True, "ready: " + ", ".join(checks))


def copy_verified(f: CopyFacts) -> Decision:
    """Writable, detached from production, and holding production's history up to the moment
    the drill observed the standby (its replay position and newest completed transaction)."""
    problems = []
    if f.in_recovery is not False:
        problems.append("the copy is still in recovery (promotion did not finish)")
    if f.replicating_from:
        problems.append(f"the copy is attached to {f.replicating_from}: not isolated")
    if f.senders_to_copy:
        problems.append(f"production sends WAL to the copy ({', '.join(f.senders_to_copy)}): "
                        "not isolated")
    if not f.wrote_and_read:
        problems.append("a write on the copy could not be read back")
    if f.witness is None or f.witness != f.witness_on_copy:
        problems.append(f"the standby saw {f.witness or 'no transaction'} before the copy, the "
                        f"copy has {f.witness_on_copy or 'nothing'}")
    if f.missing_tables:
        problems.append(f"table(s) of production missing on the copy: "
                        f"{', '.join(f.missing_tables[:10])}")
    if f.known_lsn is None or f.copy_lsn is None or f.copy_lsn < f.known_lsn:
        problems.append(f"the copy ends at {_lsn(f.copy_lsn)}, before the standby's replay "
                        f"position {_lsn(f.known_lsn)} observed before the copy")
    if problems:
        return Decision(False, "; ".join(problems))
    return Decision(True, f"writable; holds production's history up to the standby's replay "
                          f"position {_lsn(f.known_lsn)} observed before the copy ({f.witness} "
                          f"there and on the copy; copy at {_lsn(f.copy_lsn)}); every table "
                          "of production is there; detached from production")


def _lsn(v: int | None) -> str:
    return "unknown" if v is None else f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def teardown_clean(leftovers: Sequence[str]) -> Decision:
    """Nothing of the bubble may survive the drill."""
    if leftovers:
        return Decision(False, "teardown left: " + "; ".join(leftovers))
    return Decision(True, "nothing left: clone destroyed, copy stopped and removed")


def drill_outcome(refused: str | None, failed: str | None, teardown: Decision) -> tuple[str, str]:
    """(outcome, reason): refused before building, failed while building/checking, or passed."""
    if refused:
        return "refused", refused
    if failed:
        extra = "" if teardown.proceed else f"; {teardown.reason}"
        return "failed", failed + extra
    if not teardown.proceed:
        return "failed", teardown.reason
    return "passed", "the copy was promoted, verified and torn down"
