"""Pure decisions of the runbooks: given what was observed, what to do and why.

Each returns a Decision whose `reason` goes into the audit trail and the notification as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from drflow.observations import AppCheck


@dataclass(frozen=True)
class Decision:
    proceed: bool
    reason: str


@dataclass(frozen=True)
class LagEstimate:
    """How much acknowledged history the standby may miss. None: not known."""

    seconds: float | None
    bytes: int | None
    basis: str


def confirm_failure(vm: str, power_state: str | None, app: AppCheck, reported: str) -> Decision:
    """Two independent paths (vSphere, a direct application check) must agree on the failure."""
    if power_state == "poweredOff":
        return Decision(True, f"confirmed: {reported}; vSphere reports {vm} powered off")
    if app.reachable and app.writable_primary:
        state = "powered on" if power_state == "poweredOn" else f"in power state {power_state}"
        return Decision(
            False,
            f"not confirmed: {reported}, but vSphere shows {vm} {state} and PostgreSQL answers "
            f"as a writable primary ({app.detail}): alerting, not promoting",
        )
    if power_state is None:
        return Decision(
            True,
            f"confirmed by the application path only: {reported}; PostgreSQL does not serve "
            f"({app.detail}); vSphere state unknown, so fencing decides",
        )
    return Decision(
        True,
        f"confirmed: {reported}; vSphere shows {vm} {power_state} but PostgreSQL does not serve "
        f"writes ({app.detail}): application lost",
    )


def fence_result(vm: str, power_state_after: str | None, error: str | None) -> Decision:
    """Only a VM seen powered off is fenced; an unknown state is not."""
    if power_state_after == "poweredOff":
        return Decision(True, f"fenced: {vm} is powered off")
    if power_state_after is None:
        return Decision(False, f"fence unknown: could not read {vm}'s power state ({error}); "
                               "no promotion without a fence")
    return Decision(False, f"fence failed: {vm} is {power_state_after}"
                           + (f" ({error})" if error else "") + "; no promotion without a fence")


def promotion(standby_in_recovery: bool | None, lag: LagEstimate, rpo_budget_s: float,
              force: bool) -> Decision:
    """Promote only within the RPO budget, unless an explicit, audited override."""
    if standby_in_recovery is None:
        return Decision(False, "standby does not answer: nothing to promote")
    if standby_in_recovery is False:
        return Decision(True, "standby is already a primary (promoted by an earlier run); "
                              "continuing without a second promotion")
    if lag.seconds is None:
        if force:
            return Decision(True, f"override: standby lag unknown ({lag.basis}); promoting "
                                  "because force=True was given")
        return Decision(False, f"standby lag unknown ({lag.basis}); refusing to promote "
                               "without force=True")
    within = lag.seconds <= rpo_budget_s
    figures = f"standby lag {lag.seconds:.1f} s" + (
        f" / {lag.bytes} bytes" if lag.bytes is not None else "") + f" ({lag.basis})"
    if within:
        return Decision(True, f"{figures} is within the RPO budget of {rpo_budget_s:g} s")
    if force:
        return Decision(True, f"override: {figures} exceeds the RPO budget of "
                              f"{rpo_budget_s:g} s; promoting because force=True was given")
    return Decision(False, f"{figures} exceeds the RPO budget of {rpo_budget_s:g} s; refusing "
                           "to promote (re-run with force=True to accept the loss)")


def lag_estimate(standby_received_lsn: int | None, primary_last_lsn: int | None,
                 primary_lsn_seen_at: list[tuple[float, int]],
                 was_sync_standby: bool = False) -> LagEstimate:
    """Compare what the standby received with the last LSN the primary's agent reported.

    `primary_lsn_seen_at` is the (time, lsn) history from the primary's heartbeats: the age of
    the oldest report the standby has not reached bounds the writes it may miss. When the
    primary last reported this standby as its streaming synchronous standby, no acknowledged
    commit can be missing, whatever WAL beyond it the primary had written.
    """
    if standby_received_lsn is None:
        return LagEstimate(None, None, "standby's received LSN unknown")
    if was_sync_standby:
        missing = max(0, (primary_last_lsn or 0) - standby_received_lsn)
        return LagEstimate(0.0, missing, "synchronous standby at the primary's last report: "
                                         "every acknowledged commit was flushed on it")
    if primary_last_lsn is None:
        return LagEstimate(None, None, "no LSN reported by the primary before it failed")
    missing = max(0, primary_last_lsn - standby_received_lsn)
    if missing == 0:
        return LagEstimate(0.0, 0, "standby received everything the primary last reported")
    ahead = [t for t, lsn in primary_lsn_seen_at if lsn > standby_received_lsn]
    last = max((t for t, _ in primary_lsn_seen_at), default=None)
    seconds = (last - min(ahead)) if ahead and last is not None else None
    if seconds is None:
        return LagEstimate(None, missing, f"{missing} bytes behind, age unknown")
    return LagEstimate(seconds, missing, f"{missing} bytes behind the primary's last report")


def relax_sync(replication: str, sync_standbys_left: int, setting: str) -> Decision:
    """A sync group with no standby left would hang every write: relax on purpose, and say so."""
    if replication != "sync":
        return Decision(False, "group replicates asynchronously: nothing to relax")
    if sync_standbys_left > 0:
        return Decision(False, f"{sync_standbys_left} synchronous standby still attached")
    if not setting.strip():
        return Decision(False, "synchronous replication already relaxed")
    return Decision(True, "no synchronous standby left after failover: relaxing "
                          f"synchronous_standby_names (was {setting!r}) so writes do not hang; "
                          "re-protect restores it")
