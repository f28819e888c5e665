"""The gateway judges agents' silence on the time it could hear them: a stall of its own (its VM
frozen by a snapshot, a starved machine) is not the agents' silence."""

from __future__ import annotations

import asyncio
import time

from orchestrator.gateway.blind_time import BlindClock
from orchestrator.gateway.decide import Role
from orchestrator.gateway.heartbeats import HeartbeatTracker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def listen(clock: Clock, blind: BlindClock, seconds: float) -> None:
    """The loop runs on time for `seconds`."""
    for _ in range(round(seconds / 0.1)):
        clock.t += 0.1
        blind.tick()


def running(clock: Clock) -> BlindClock:
    blind = BlindClock(clock=clock)
    blind._running = True  # as BlindClock.run does on the loop
    return blind


def test_the_time_before_the_clock_runs_is_no_stall() -> None:
    """The gateway warms up for seconds between creating the clock and running it: agents armed
    then must not look silent earlier, nor the clock go backwards when it starts."""
    clock = Clock()
    blind = BlindClock(clock=clock)
    tracker = HeartbeatTracker(clock=clock, blind=blind.now)
    clock.t += 6.0
    assert blind.now() == 0.0
    tracker.restore([("orders", "orders-prod", "primary")], {"orders": "orders-prod"})
    [state] = tracker.agents()
    assert tracker.age(state) == 0.0


def test_a_stall_of_the_gateway_is_not_counted_as_silence() -> None:
    clock = Clock()
    blind = running(clock)
    tracker = HeartbeatTracker(clock=clock, blind=blind.now)
    tracker.heartbeat("orders", "orders-prod", Role.PRIMARY)
    listen(clock, blind, 0.5)  # the loop ticks on time: no blind time
    assert blind.now() == 0.0
    clock.t += 5.0  # the loop stalls for 5 s (no tick): in progress, it is already deducted
    [state] = tracker.agents()
    assert tracker.overdue(3.0) == []
    assert abs(tracker.age(state) - 0.5) < 0.15, tracker.age(state)
    assert abs(blind.tick() - 4.9) < 1e-6  # the stall ends: the same amount, now kept
    assert tracker.overdue(3.0) == []
    deadline = tracker.next_deadline(3.0)
    assert deadline is not None and abs(deadline - (clock.t + 2.5)) < 0.15, deadline - clock.t
    listen(clock, blind, 2.4)
    assert tracker.overdue(3.0) == []
    listen(clock, blind, 0.2)  # heard nothing for 3 s while listening: silent
    assert [s.agent_id for s in tracker.overdue(3.0)] == ["orders-prod"]


def test_short_hiccups_are_not_blind_time_and_a_heartbeat_resets_the_count() -> None:
    clock = Clock()
    blind = running(clock)
    tracker = HeartbeatTracker(clock=clock, blind=blind.now)
    clock.t += 0.25  # 0.15 s late: under the slack
    assert blind.tick() == 0.0
    clock.t += 2.1
    blind.tick()
    tracker.heartbeat("orders", "orders-dr", Role.STANDBY)  # heard after the stall
    listen(clock, blind, 2.9)
    assert tracker.overdue(3.0) == []
    listen(clock, blind, 0.2)
    assert [s.agent_id for s in tracker.overdue(3.0)] == ["orders-dr"]


def test_the_clock_ticks_on_a_running_loop() -> None:
    blind = BlindClock()

    async def main() -> float:
        task = asyncio.get_running_loop().create_task(blind.run())
        await asyncio.sleep(0.3)
        time.sleep(1.0)  # the loop is blocked, as by a long synchronous call
        during = blind.now()
        await asyncio.sleep(0.3)
        task.cancel()
        return during

    during = asyncio.run(main())
    assert 0.7 < during < 1.1, during
    assert 0.7 < blind.now() < 1.1
