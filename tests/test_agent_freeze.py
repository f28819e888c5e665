"""An agent frozen whole (its VM stunned by a snapshot, a starved guest, SIGSTOP) wakes with its
clock far ahead. A check that was in flight across the freeze says nothing about the resource: it
gets its timeout again from the thaw, not a failure (which would restart a healthy PostgreSQL,
or use up its restarts). A check that hangs while the agent runs still times out on time.

The freeze of the whole process cannot be made inside the test's own process: the agent's clock
is given a jump instead, the way the loop sees a freeze."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agents.config import AgentConfig, config_from_dict
from agents.monitors import CheckResult
from agents.runner import Agent
from drflow.events import HealthEvent
from tests.harness import wait_for


def _cfg(timeout_s: float) -> AgentConfig:
    return config_from_dict({
        "agent_id": "a1", "group": "g1", "heartbeat_interval_s": 0.1,
        "gateway": {"url": "http://127.0.0.1:1/", "webhook_secret": {"ref": "env:X"}},
        "resources": [{"name": "db", "type": "tcp", "port": 1, "interval_s": 0.2,
                       "timeout_s": timeout_s, "failure_threshold": 1}]})


class _Clock:
    """time.monotonic, plus the time the process spent frozen."""

    def __init__(self) -> None:
        self.frozen_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.frozen_s


class _HeldCheck:
    """A check that answers only when released; counts its calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def check(self) -> CheckResult:
        self.calls += 1
        self.release.wait(10)
        return CheckResult(True, "answers")


@pytest.fixture()
def agent_of() -> Iterator[Callable[..., tuple[Agent, list[HealthEvent], _HeldCheck]]]:
    started: list[tuple[Agent, threading.Thread, _HeldCheck]] = []

    def make(timeout_s: float, clock: Any = time.monotonic
             ) -> tuple[Agent, list[HealthEvent], _HeldCheck]:
        events: list[HealthEvent] = []
        agent = Agent(_cfg(timeout_s), emit=events.append, clock=clock)
        held = _HeldCheck()
        agent.states["db"].monitor = held
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        started.append((agent, t, held))
        return agent, events, held

    yield make
    for agent, t, held in started:
        held.release.set()
        agent.stop()
        t.join(5)
        assert not t.is_alive()


def _failures(events: list[HealthEvent]) -> list[dict[str, Any]]:
    return [e.details for e in list(events) if e.kind.value == "resource_failed"]


def test_a_check_in_flight_across_a_freeze_is_given_its_timeout_again(
        agent_of: Callable[..., tuple[Agent, list[HealthEvent], _HeldCheck]]) -> None:
    clock = _Clock()
    agent, events, held = agent_of(timeout_s=1.0, clock=clock)
    wait_for(lambda: held.calls == 1, 5, "the first check started")
    clock.frozen_s += 5.0  # the process stood still for 5 s with the check in flight
    time.sleep(0.3)  # the loop wakes (late by 5 s) and looks at its checks
    held.release.set()  # the thawed check answers at once
    wait_for(lambda: agent.status() == {"db": "ok"}, 3, "the check answered ok")
    time.sleep(0.5)
    assert _failures(events) == [], _failures(events)


def test_a_check_that_hangs_while_the_agent_runs_still_times_out(
        agent_of: Callable[..., tuple[Agent, list[HealthEvent], _HeldCheck]]) -> None:
    _agent, events, _held = agent_of(timeout_s=0.5)
    t0 = time.monotonic()
    wait_for(lambda: _failures(events), 3, "the hung check reported")
    assert time.monotonic() - t0 < 1.5
    assert "did not finish within 0.5 s" in _failures(events)[0]["error"]
