"""Scheduled drills under `drflow up` (embedded mode): each group's `policy.drill_schedule`
(cron, UTC, as the deployments of `drflow deploy` use it) runs the drill flow in this process.

At most one drill per group at a time: a drill still running at its next cron time skips that
time (and says so in the log) rather than queueing behind it. A reloaded config's schedules
(groups added, removed, rescheduled) apply from the next minute (`DrillScheduler.use`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from drflow.config import DrflowConfig, cron_matches

log = logging.getLogger("drflow.drills")

TICK_S = 1.0  # the longest the scheduler sleeps without looking at the clock
Runner = Callable[[str], Any]  # runs the drill of one group


def schedules(cfg: DrflowConfig) -> dict[str, str]:
    """{group: cron} for every group with a drill schedule."""
    return {g.name: g.policy.drill_schedule for g in cfg.groups if g.policy.drill_schedule}


def describe(crons: dict[str, str], deployment_mode: bool) -> list[str]:
    """What `drflow up` says at start about scheduled drills."""
    if deployment_mode:
        return ["drills: run by the deployments' schedules (drflow deploy)"]
    if not crons:
        return ["drills: no group has a drill_schedule"]
    return [f"drill of {g}: cron '{c}' (UTC), run here" for g, c in sorted(crons.items())]


def due(crons: dict[str, str], minute: datetime) -> list[str]:
    """The groups whose schedule fires in `minute` (UTC)."""
    return sorted(g for g, cron in crons.items() if cron_matches(cron, minute))


def schedule_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What a reload changed in the drill schedules, one line per group."""
    out = []
    for g in sorted(before.keys() | after.keys()):
        old, new = before.get(g), after.get(g)
        if old == new:
            continue
        if old is None:
            out.append(f"drill of {g}: cron '{new}' (UTC), run here from now on")
        elif new is None:
            out.append(f"drill of {g}: no longer scheduled")
        else:
            out.append(f"drill of {g}: cron '{old}' -> '{new}' (UTC)")
    return out


class DrillScheduler:
    """A thread that wakes at each minute and starts the drills that are due."""

    def __init__(self, crons: dict[str, str], run: Runner,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.crons = dict(crons)
        self.run = run
        self.now = now
        self.started: list[tuple[str, datetime]] = []  # (group, cron minute), for the record
        self._running: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.crons and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="drill-scheduler",
                                            daemon=True)
            self._thread.start()

    def use(self, crons: dict[str, str]) -> None:
        """Take the schedules of a reloaded config from the next minute on (groups added,
        removed, rescheduled), saying what changed; a drill under way finishes."""
        for line in schedule_changes(self.crons, crons):
            log.warning("drill schedules: %s", line)
        self.crons = dict(crons)  # one assignment: the loop reads either the old or the new
        self.start()

    def stop(self, timeout: float = 60.0) -> None:
        """No new drills; a drill under way gets `timeout` s to finish and tear its bubble down
        (what a killed one leaves, the next drill of its group removes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.wait_drills(timeout)
        for group, t in self._running.items():
            if t.is_alive():
                log.warning("the drill of %s is still running at stop", group)

    def wait_drills(self, timeout: float) -> None:
        """Wait for the drills started so far to finish (a clean stop lets them tear down)."""
        for t in list(self._running.values()):
            t.join(timeout)

    def _loop(self) -> None:
        minute = self.now().replace(second=0, microsecond=0) + timedelta(minutes=1)
        while not self._stop.is_set():
            wait = (minute - self.now()).total_seconds()
            if wait > 0:
                # In steps of at most a second, reading the clock again: a wall clock set
                # forward or back meanwhile (NTP, a resumed VM) is followed, not slept through.
                if self._stop.wait(min(wait, TICK_S)):
                    return
                continue
            crons = self.crons
            for group in due(crons, minute):
                self._start(group, crons[group], minute)
            minute += timedelta(minutes=1)
            # A clock that jumped (suspend, NTP) skips the missed minutes instead of replaying them.
            late = self.now().replace(second=0, microsecond=0)
            minute = max(minute, late)

    def _start(self, group: str, cron: str, minute: datetime) -> None:
        prev = self._running.get(group)
        if prev is not None and prev.is_alive():
            log.warning("drill of %s due at %s skipped: the previous one is still running",
                        group, minute.strftime("%Y-%m-%d %H:%M UTC"))
            return
        log.info("starting the scheduled drill of %s (%s)", group, cron)
        self.started.append((group, minute))
        t = threading.Thread(target=self._drill, args=(group,), name=f"drill {group}",
                             daemon=True)
        self._running[group] = t
        t.start()

    def _drill(self, group: str) -> None:
        try:
            self.run(group)
        except Exception:  # one failed drill must not stop the schedule
            log.exception("scheduled drill of %s failed", group)


def run_drill(config_path: str) -> Runner:
    """The runner `drflow up` uses: the drill flow, in this process, its report as usual."""
    def run(group: str) -> Any:
        from flows.drill import drill

        return drill(group, config_path=config_path, raise_on_failure=False)
    return run
