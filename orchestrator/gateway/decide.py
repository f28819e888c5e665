"""The pure decision: is this failure an incident (failover), an alert, or nothing — and why."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from drflow.events import EventKind
from orchestrator.gateway.contracts import IncidentKind


class Role(StrEnum):
    PRIMARY = "primary"
    STANDBY = "standby"

    @classmethod
    def parse(cls, value: object) -> Role | None:
        """The role an agent reported in `details.role`; None when absent or unrecognised."""
        try:
            return cls(str(value).lower()) if value is not None else None
        except ValueError:
            return None


def reported_role(details: Mapping[str, Any]) -> Role | None:
    """The agent's role as an event reports it: `role`, else `to` (role_changed), else `roles`
    (resource → role, as the guest agent's heartbeats send it: primary if any resource is)."""
    for key in ("role", "to"):
        if key in details:
            return Role.parse(details[key])
    roles = details.get("roles")
    if isinstance(roles, Mapping) and roles:
        parsed = [Role.parse(v) for v in roles.values()]
        if Role.PRIMARY in parsed:
            return Role.PRIMARY
        if all(r is Role.STANDBY for r in parsed):
            return Role.STANDBY
    return None


class Action(StrEnum):
    FAILOVER = "failover"
    ALERT = "alert"
    JOIN = "join"  # evidence of a failure whose incident closed moments ago: counted into it
    NONE = "none"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide_incident(
    *,
    group: str,
    trigger: IncidentKind,
    agent_id: str,
    role: Role | None,
    auto_failover: bool,
    open_incident: str | None,
    silent_for_s: float | None = None,
    heartbeat_timeout_s: float | None = None,
    resource: str | None = None,
    held_by: str | None = None,
) -> Decision:
    """Decide what a failure signal from one agent means for its protection group.

    `role` is the agent's role as the gateway knows it: PRIMARY only for the group's current
    primary agent. `open_incident` is the key of the group's open incident, if any. `held_by` is
    the closed incident whose hold-down still holds this agent (its reports since are the same
    failure, repeated: they join it, whatever their number or order).
    """
    if trigger is IncidentKind.RECOVERY_EXHAUSTED and held_by is not None:
        return Decision(
            Action.JOIN,
            f"group {group}: agent {agent_id} reported recovery_exhausted again; it joins "
            f"incident {held_by}, closed moments ago (hold-down), no new incident",
        )
    if trigger is IncidentKind.HEARTBEAT_LOST:
        if silent_for_s is None or heartbeat_timeout_s is None:
            raise ValueError("heartbeat_lost needs silent_for_s and heartbeat_timeout_s")
        if silent_for_s < heartbeat_timeout_s:
            return Decision(
                Action.NONE,
                f"agent {agent_id} heard from {silent_for_s:.1f} s ago "
                f"(timeout {heartbeat_timeout_s:g} s): alive",
            )
        what = (
            f"agent {agent_id} silent for {silent_for_s:.1f} s "
            f"(heartbeat timeout {heartbeat_timeout_s:g} s)"
        )
    else:
        on = f" (resource {resource})" if resource else ""
        what = f"agent {agent_id} reported recovery_exhausted{on}: local recovery gave up"

    if role is None:
        return Decision(
            Action.ALERT,
            f"group {group}: {what}; it is not the group's known current primary (no heartbeat "
            "with details.role=primary since), so no failover: alert only",
        )
    if role is Role.STANDBY:
        return Decision(
            Action.ALERT,
            f"group {group}: standby {what}; the group lost its protection, not its service: "
            "alert only, no failover",
        )
    if open_incident is not None:
        return Decision(
            Action.NONE,
            f"group {group}: primary {what}; incident {open_incident} is already open, "
            "not starting another failover",
        )
    if not auto_failover:
        return Decision(
            Action.ALERT,
            f"group {group}: primary {what}; auto_failover is off for this group: alert only, "
            "start the failover by hand if needed",
        )
    return Decision(Action.FAILOVER, f"group {group}: primary {what}")



STATE_UNAVAILABLE = "state_unavailable"
SILENT = "silent"  # what an agent did when its heartbeats stopped
_FAILURES = {EventKind.RECOVERY_EXHAUSTED.value: "reports its application failed beyond repair",
             EventKind.RESOURCE_FAILED.value: "reports a failed resource",
             SILENT: "went silent (no heartbeat within the timeout)"}


def unrecorded_failure(group: str, agent_id: str, what: str) -> tuple[str, str] | None:
    """(alert kind, why) for a failure the gateway could not act on because its shared state
    (etcd) is out of reach; None when `what` is no failure.

    With the etcd majority lost, no incident can be opened and no failover run starts. If the
    primary's site is what was lost, nobody would be told: so this goes to on-call straight from
    memory, with the one way forward that needs no etcd."""
    seen = _FAILURES.get(what)
    if seen is None:
        return None
    return STATE_UNAVAILABLE, (
        f"{agent_id} ({group}) {seen}, but this gateway cannot reach its shared state in etcd: "
        "no incident opened, no failover started. If the primary's site is lost (and etcd with "
        f"it), fail over by hand once you know the old primary is down: `drflow failover {group} "
        "--declare-fenced --reason TEXT`. If etcd comes back first, the gateway acts by itself.")
