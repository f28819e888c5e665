"""Local recovery decisions: restart in place, wait, or give up — a pure function with a reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    NONE = "none"            # nothing to do (healthy enough, or already given up)
    WAIT = "wait"            # try later: backoff running, or a dependency is the real problem
    RESTART = "restart"      # restart the resource (and its dependents) now
    EXHAUSTED = "exhausted"  # report recovery_exhausted: local recovery cannot help


@dataclass(frozen=True)
class Policy:
    """A resource's restart policy, as configured."""

    max_restarts: int
    window_s: float
    backoff_initial_s: float
    backoff_max_s: float


@dataclass(frozen=True)
class Situation:
    """What the runner knows about one resource when it asks what to do."""

    consecutive_failures: int
    failure_threshold: int
    restartable: bool
    attempts_this_outage: int
    last_attempt_at: float | None
    attempt_times: Sequence[float]  # every restart attempt, also of earlier outages
    exhausted_reported: bool
    blocked_by: str | None = None   # a dependency not yet seen healthy since the outage began
    held_by: str | None = None      # why the resource is left alone (e.g. a control verb runs)


def backoff_delay(attempts_made: int, policy: Policy) -> float:
    """Wait before attempt `attempts_made + 1`: exponential from `initial`, capped at `max`."""
    if attempts_made <= 0:
        return 0.0
    return float(min(policy.backoff_initial_s * 2 ** (attempts_made - 1), policy.backoff_max_s))


def decide(s: Situation, policy: Policy, now: float) -> tuple[Action, str]:
    """The next recovery step for a failing resource and why (the reason goes into the event)."""
    if s.consecutive_failures < s.failure_threshold:
        return Action.NONE, (
            f"{s.consecutive_failures} consecutive failure(s), below the threshold of "
            f"{s.failure_threshold}"
        )
    if s.exhausted_reported:
        return Action.NONE, "recovery exhausted already reported; waiting for the resource to return"
    if s.held_by is not None:
        return Action.WAIT, f"left alone: {s.held_by}"
    if s.blocked_by is not None:
        # Restarting (or giving up on) a resource whose foundation is failing would blame the
        # wrong thing: the dependency recovers or reports itself first.
        return Action.WAIT, f"waiting for dependency '{s.blocked_by}' to be healthy again"
    if not s.restartable:
        return Action.EXHAUSTED, "the resource has no restart method: it cannot be restarted in place"
    recent = [t for t in s.attempt_times if now - t < policy.window_s]
    if len(recent) >= policy.max_restarts:
        return Action.EXHAUSTED, (
            f"{len(recent)} restart(s) within {policy.window_s:g} s reached max_restarts="
            f"{policy.max_restarts} and the resource is still failing"
        )
    if s.last_attempt_at is not None:
        delay = backoff_delay(s.attempts_this_outage, policy)
        due = s.last_attempt_at + delay
        if now < due:
            return Action.WAIT, f"backoff: next restart in {due - now:.1f} s (delay {delay:g} s)"
    return Action.RESTART, (
        f"restart {len(recent) + 1} of {policy.max_restarts} within {policy.window_s:g} s after "
        f"{s.consecutive_failures} consecutive failed check(s)"
    )
