"""The embedded drill scheduler takes a reloaded config's schedules without a restart."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.drill_scheduler import DrillScheduler, schedule_changes


def test_schedule_changes_say_what_a_reload_changed() -> None:
    assert schedule_changes({"a": "0 3 * * 0", "b": "0 4 * * *"},
                            {"a": "0 3 * * 0", "b": "0 5 * * *", "c": "* * * * *"}) == [
        "drill of b: cron '0 4 * * *' -> '0 5 * * *' (UTC)",
        "drill of c: cron '* * * * *' (UTC), run here from now on"]
    assert schedule_changes({"a": "0 3 * * 0"}, {}) == ["drill of a: no longer scheduled"]
    assert schedule_changes({"a": "0 3 * * 0"}, {"a": "0 3 * * 0"}) == []


def test_a_group_added_live_is_drilled_at_its_next_cron_minute_and_a_removed_one_no_more(
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []
    real = datetime.now(UTC)
    # The scheduler's clock sits at hh:mm:58.5: its next minute comes 1.5 s from now.
    clock = [real.replace(second=58, microsecond=500_000) - real]
    drills = DrillScheduler({}, ran.append, now=lambda: datetime.now(UTC) + clock[0])
    drills.start()  # nothing scheduled at start: no thread
    caplog.set_level(logging.WARNING, logger="drflow.drills")
    try:
        drills.use({"added": "* * * * *"})  # what the reload hook of `drflow up` calls
        assert "drill of added: cron '* * * * *' (UTC), run here from now on" in caplog.text
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ran == ["added"], "the group added live was not drilled at its cron minute"
        drills.use({})
        assert "drill of added: no longer scheduled" in caplog.text
        clock[0] += timedelta(minutes=1)  # the scheduler's next minute is here
        time.sleep(1.5)
        assert ran == ["added"], "a group removed from the schedules was drilled again"
    finally:
        drills.stop(5)
