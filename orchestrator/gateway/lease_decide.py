"""Pure decisions on the leader and sync keys: what a change seen in etcd means, and why.

The watcher (leases.py) reads the keys; these functions say what to do about what it read:
a vanished leader key of the group's primary is an incident, a replaced one is not, an etcd
that cannot be read is not an expiry. Agents' lease reports become alerts here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from drflow.leader_keys import Leader, SyncState
from orchestrator.gateway.decide import Action, Decision


class Change(StrEnum):
    UNCHANGED = "unchanged"
    LEARNED = "learned"  # first read since start: nothing to compare with
    APPEARED = "appeared"
    VANISHED = "vanished"  # present -> absent
    TAKEN_OVER = "taken_over"  # replaced by a takeover's (or an attestation's) value
    REPLACED = "replaced"  # replaced by another value (an agent re-acquired, adopted…)


@dataclass(frozen=True)
class LeaderSeen:
    """The leader key as one read showed it."""

    raw: str
    leader: Leader | None  # None: the value is not a leader value
    mod_revision: int
    lease: int
    revision: int  # the store's revision of the read that showed it
    seen_at: float  # wall clock of that read


def leader_change(before: LeaderSeen | None, after: LeaderSeen | None, learned: bool) -> Change:
    """What happened to a group's leader key between two successful reads."""
    if not learned:
        return Change.LEARNED
    if before is None:
        return Change.UNCHANGED if after is None else Change.APPEARED
    if after is None:
        return Change.VANISHED
    if after.raw == before.raw and after.mod_revision == before.mod_revision:
        return Change.UNCHANGED
    if after.leader is not None and after.leader.by in ("takeover", "attested"):
        return Change.TAKEN_OVER
    return Change.REPLACED


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def decide_lease_expired(
    *,
    group: str,
    vanished: LeaderSeen,
    absent_at: float,
    known_primary: str | None,
    auto_failover: bool,
    open_incident: str | None,
) -> Decision:
    """A group's leader key went from present to absent: failover, alert, or nothing — and why.

    Only the key of the group's known primary agent counts: its absence is that agent's lease
    gone (expired, or released after local recovery gave up)."""
    holder = vanished.leader
    if holder is None:
        return Decision(Action.NONE, f"group {group}: a leader key that was not a leader value "
                        f"({vanished.raw[:80]!r}) disappeared: no holder to fail over from")
    what = (f"leader key of {holder.agent_id} (by {holder.by}, revision {vanished.mod_revision}, "
            f"last seen {_when(vanished.seen_at)} at store revision {vanished.revision}) is gone "
            f"from etcd at {_when(absent_at)}: its lease expired or was released")
    if known_primary != holder.agent_id:
        known = known_primary or "none known"
        return Decision(Action.ALERT, f"group {group}: {what}; {holder.agent_id} is not the "
                        f"group's known primary ({known}), so no failover: alert only")
    if open_incident is not None:
        return Decision(Action.NONE, f"group {group}: primary {what}; incident {open_incident} "
                        "is already open, not starting another failover")
    if not auto_failover:
        return Decision(Action.ALERT, f"group {group}: primary {what}; auto_failover is off for "
                        "this group: alert only, start the failover by hand if needed")
    return Decision(Action.FAILOVER, f"group {group}: primary {what}")


def unreadable(error: str) -> Decision:
    """etcd could not be read: an unknown state is no expiry."""
    return Decision(Action.NONE, f"etcd could not be read ({error}): leader keys unknown, "
                    "no incident from them until it answers")


# -- what agents report about their lease --------------------------------------------------------

_LEASE_WHY = {
    "failsafe": "could not renew its leader lease (etcd unreachable) and keeps serving because "
                "its synchronous standby streams from it (failsafe)",
    "fenced": "could not renew its leader lease and fenced itself: its PostgreSQL was stopped "
              "so that it acknowledges no write a takeover could lose",
}


def agent_lease_alert(group: str, agent_id: str,
                      details: Mapping[str, Any]) -> tuple[str, str] | None:
    """(alert kind, why) for an agent event reporting a lease failsafe, a fence or relaxed sync."""
    lease = details.get("drflow_lease")
    if isinstance(lease, str) and lease in _LEASE_WHY:
        return f"lease_{lease}", f"group {group}: agent {agent_id} {_LEASE_WHY[lease]}"
    if details.get("drflow_sync") == "relaxed":
        return "sync_relaxed", (
            f"group {group}: primary {agent_id} relaxed synchronous replication (no standby "
            "streamed within its lease) after recording it in the sync key: writes go on, but "
            "no standby holds every write, so none may be promoted automatically")
    return None


# -- what the keys say, for people ---------------------------------------------------------------


def sync_unprotected(sync: SyncState | None) -> str | None:
    """Why a sync group is unprotected according to its sync key; None when it is not."""
    if sync is None or sync.standby is not None:
        return None
    at = _when(sync.since) if sync.since else "an unknown time"
    return f"sync relaxed by {sync.primary} at {at}: no standby holds every write"
