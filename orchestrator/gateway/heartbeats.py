"""Who is alive and who is primary: last heartbeat per agent on the monotonic clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.gateway.decide import Role


@dataclass
class AgentState:
    group: str
    agent_id: str
    role: Role | None
    last_seen: float  # monotonic
    last_seen_wall: float  # wall clock of the same moment, for evidence and RTO
    heard: bool  # False when armed from persisted state at gateway start, not by a heartbeat
    fired: bool = False  # silence already handled; cleared by the next heartbeat
    blind_at_seen: float = 0.0  # the gateway's blind time (blind_time.py) at last_seen


class HeartbeatTracker:
    """Tracks heartbeats per (group, agent); the group's primary is the agent that most recently
    said `role=primary`. Not thread-safe: used from the gateway's state thread only."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        blind: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._clock = clock
        self._wall = wall
        # Seconds the gateway could not hear so far (BlindClock.now): not counted as silence.
        self._blind = blind
        self._agents: dict[tuple[str, str], AgentState] = {}
        self._primary: dict[str, str] = {}

    def restore(self, agents: list[tuple[str, str, str | None]], primaries: dict[str, str]) -> None:
        """Arm every known agent as if heard now: after a restart, silence counts from here."""
        now, wall, blind = self._clock(), self._wall(), self._blind()
        for group, agent_id, role in agents:
            self._agents[(group, agent_id)] = AgentState(
                group, agent_id, Role.parse(role), now, wall, heard=False, blind_at_seen=blind
            )
        self._primary.update(primaries)

    def heartbeat(self, group: str, agent_id: str, role: Role | None) -> tuple[bool, bool]:
        """Record a heartbeat; return (agent is new or changed role, group's primary changed)."""
        now, wall = self._clock(), self._wall()
        state = self._agents.get((group, agent_id))
        changed = state is None or (role is not None and state.role is not role)
        if state is None:
            state = AgentState(group, agent_id, role, now, wall, heard=True)
            self._agents[(group, agent_id)] = state
        state.last_seen, state.last_seen_wall, state.heard, state.fired = now, wall, True, False
        state.blind_at_seen = self._blind()
        if role is not None:
            state.role = role
        return changed, self.set_role_claim(group, agent_id, role)

    def set_role_claim(self, group: str, agent_id: str, role: Role | None) -> bool:
        """Apply a role report to the group's primary; True if the primary changed."""
        state = self._agents.get((group, agent_id))
        if state is not None and role is not None:
            state.role = role
        current = self._primary.get(group)
        if role is Role.PRIMARY and current != agent_id:
            self._primary[group] = agent_id
            return True
        if role is Role.STANDBY and current == agent_id:
            del self._primary[group]
            return True
        return False

    def adopt_primary(self, group: str, agent_id: str | None) -> None:
        """Take the group's primary as the shared state knows it (another replica may have
        heard what this one did not)."""
        if agent_id is None:
            self._primary.pop(group, None)
        else:
            self._primary[group] = agent_id

    def heard_elsewhere(self, state: AgentState, wall: float) -> bool:
        """Another replica heard the agent at `wall`: count its silence from then. True when
        that is later than this replica's own last hearing."""
        if wall <= state.last_seen_wall:
            return False
        state.last_seen = self._clock() - max(0.0, self._wall() - wall)
        state.last_seen_wall, state.fired = wall, False
        return True

    def retain(self, keep: Callable[[str, str], bool]) -> None:
        """Forget the agents (and primaries) for which `keep(group, agent_id)` is False: those of
        groups the configuration no longer names."""
        self._agents = {k: s for k, s in self._agents.items() if keep(*k)}
        self._primary = {g: a for g, a in self._primary.items() if keep(g, a)}

    def primary(self, group: str) -> str | None:
        return self._primary.get(group)

    def effective_role(self, group: str, agent_id: str) -> Role | None:
        """PRIMARY only for the group's current primary; a stale primary claim counts as unknown."""
        if self._primary.get(group) == agent_id:
            return Role.PRIMARY
        state = self._agents.get((group, agent_id))
        return Role.STANDBY if state is not None and state.role is Role.STANDBY else None

    def get(self, group: str, agent_id: str) -> AgentState | None:
        return self._agents.get((group, agent_id))

    def agents(self) -> list[AgentState]:
        return list(self._agents.values())

    def age(self, state: AgentState) -> float:
        """Seconds since its last heartbeat that the gateway could hear (its stalls deducted)."""
        return self._clock() - state.last_seen - (self._blind() - state.blind_at_seen)

    def overdue(self, timeout_s: float) -> list[AgentState]:
        """Agents silent for at least `timeout_s` whose silence has not been handled yet."""
        return [s for s in self._agents.values() if not s.fired and self.age(s) >= timeout_s]

    def next_deadline(self, timeout_s: float) -> float | None:
        blind = self._blind()
        pending = [s.last_seen + timeout_s + (blind - s.blind_at_seen)
                   for s in self._agents.values() if not s.fired]
        return min(pending, default=None)
