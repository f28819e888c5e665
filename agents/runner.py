"""The agent's loop: schedule checks, act on recovery decisions, emit health events.

One thread (the caller of `Agent.run`) owns all state and emits every event, so events leave in
the order things happened. Checks and restarts run on daemon worker threads and report back
through a queue: a hung check or a slow restart never stalls heartbeats or other checks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.config import AgentConfig, Resource
from agents.graph import Graph
from agents.monitors import CheckResult, Monitor, build_monitor, failed
from agents.recovery import Action, Policy, Situation, decide
from agents.restarters import Restarter, build_restarter
from drflow.events import EventKind, HealthEvent

log = logging.getLogger(__name__)

Emit = Callable[[HealthEvent], None]
Clock = Callable[[], float]

# The loop never sleeps past its next due time; waking this much later means the whole process
# stood still (its VM stunned by a snapshot, a starved guest, SIGSTOP), its checks with it.
FROZEN_GAP_S = 1.0


@dataclass
class _State:
    """Everything the loop tracks for one resource."""

    r: Resource
    monitor: Monitor
    restarter: Restarter | None
    policy: Policy
    next_due: float = 0.0
    inflight_since: float | None = None
    inflight_deadline: float = 0.0
    timed_out: bool = False
    consecutive: int = 0
    last_ok_at: float | None = None
    last_detail: str = "not checked yet"
    checked: bool = False
    role: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    outage_started: float | None = None
    attempts_this_outage: int = 0
    last_attempt_at: float | None = None
    attempt_times: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    exhausted_reported: bool = False
    recovering: bool = False
    restarted_at: float | None = None  # when the last restart that included it ended

    held: str | None = None  # set by the loop: why recovery leaves it alone now

    def status(self) -> str:
        if self.recovering:
            return "recovering"
        if self.consecutive and self.held:
            return "held"
        if self.exhausted_reported:
            return "exhausted"
        if self.outage_started is not None:
            return "failed"
        if not self.checked:
            return "unknown"
        return "failing" if self.consecutive else "ok"


class _Workers:
    """A fixed set of daemon threads: a check stuck in the kernel cannot keep the agent alive."""

    def __init__(self, n: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def shutdown(self, timeout_s: float) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


@dataclass(frozen=True)
class _Done:
    kind: str            # "check" or "restart"
    name: str
    result: CheckResult  # for a restart: ok = started, detail = error or "restarted"
    extra: dict[str, Any] = field(default_factory=dict)


class Agent:
    """Watches the configured resources until `stop()`; every event goes to `emit`."""

    def __init__(self, cfg: AgentConfig, emit: Emit, clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self._emit_cb = emit
        self._clock = clock
        self.graph: Graph = cfg.graph()
        self._done: queue.SimpleQueue[_Done | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._next_heartbeat = 0.0
        self.states: dict[str, _State] = {}
        self.drivers: dict[str, Any] = {}  # resource name -> application driver (control API)
        for r in cfg.resources:
            self.states[r.name] = _State(
                r=r, monitor=build_monitor(r), restarter=build_restarter(r, self.drivers),
                policy=Policy(r.restart.max_restarts, r.restart.window_s,
                              r.restart.backoff_s.initial, r.restart.backoff_s.max),
            )
        # Called (resource name) before recovery_exhausted is reported: the leader lease lets go.
        self.on_recovery_exhausted: Callable[[str], None] | None = None
        self._checks = _Workers(len(self.states), "check")
        self._restarts = _Workers(1, "restart")  # one restart at a time, in decision order

    # -- public -----------------------------------------------------------------------------

    def run(self) -> None:
        """Loop until `stop()`; returns after the last event has been emitted."""
        log.info("agent %s (group %s) watching %s", self.cfg.agent_id, self.cfg.group,
                 ", ".join(self.graph.start_order()))
        wake_at = self._clock()
        try:
            while not self._stopping.is_set():
                now = self._clock()
                if now - wake_at > FROZEN_GAP_S:
                    self._thawed(now, now - wake_at)
                self._expire_checks(now)
                self._schedule_checks(now)
                self._maybe_heartbeat(now)
                wake_at = self._next_wake()
                try:
                    item = self._done.get(timeout=max(0.005, wake_at - self._clock()))
                except queue.Empty:
                    continue
                while item is not None:
                    self._handle(item)
                    try:
                        item = self._done.get_nowait()
                    except queue.Empty:
                        item = None
        finally:
            self._checks.shutdown(timeout_s=1.0)
            self._restarts.shutdown(timeout_s=1.0)
            log.info("agent %s stopped", self.cfg.agent_id)

    def stop(self) -> None:
        """Ask `run` to return (safe from a signal handler or another thread)."""
        self._stopping.set()
        self._done.put(None)

    def status(self) -> dict[str, str]:
        return {n: s.status() for n, s in self.states.items()}

    # -- scheduling ---------------------------------------------------------------------------

    def _next_wake(self) -> float:
        times = [self._next_heartbeat]
        for s in self.states.values():
            if s.recovering:
                continue
            if s.inflight_since is not None and not s.timed_out:
                times.append(s.inflight_deadline)
            else:
                times.append(s.next_due)
        return min(times)

    def _schedule_checks(self, now: float) -> None:
        for s in self.states.values():
            if s.recovering or s.next_due > now:
                continue
            if s.inflight_since is not None and not s.timed_out:
                continue  # still within its timeout: its deadline decides
            s.next_due = max(s.next_due + s.r.interval_s, now + s.r.interval_s / 2)
            if s.inflight_since is not None:
                # The previous check is still stuck: that is another failed interval.
                stuck = now - s.inflight_since
                self._on_result(s, CheckResult(False, f"check stuck for {stuck:.1f} s "
                                               f"(timeout {s.r.timeout_s:g} s)"), now)
                continue
            s.inflight_since, s.inflight_deadline, s.timed_out = now, now + s.r.timeout_s, False
            self._checks.submit(self._check_job(s))

    def _check_job(self, s: _State) -> Callable[[], None]:
        name, monitor = s.r.name, s.monitor

        def job() -> None:
            try:
                result = monitor.check()
            except Exception as exc:  # a monitor bug must not kill its worker thread
                result = failed(exc, "check raised")
            self._done.put(_Done("check", name, result))

        return job

    def _thawed(self, now: float, gap: float) -> None:
        """A check in flight across the freeze stood still with the agent: its time-out, measured
        across the freeze, says nothing about the resource. It gets its timeout again from now."""
        for s in self.states.values():
            if s.inflight_since is not None and not s.timed_out:
                s.inflight_deadline = max(s.inflight_deadline, now + s.r.timeout_s)
        log.warning("the agent stood still for %.1f s (a frozen VM or a starved machine): "
                    "checks in flight get their timeout again", gap)

    def _expire_checks(self, now: float) -> None:
        for s in self.states.values():
            if s.inflight_since is not None and not s.timed_out and now >= s.inflight_deadline:
                s.timed_out = True
                self._on_result(s, CheckResult(
                    False, f"check did not finish within {s.r.timeout_s:g} s"), now)

    def _maybe_heartbeat(self, now: float) -> None:
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.cfg.heartbeat_interval_s
        roles = {n: s.role for n, s in self.states.items() if s.role}
        details: dict[str, Any] = {"resources": self.status()}
        if roles:
            details["roles"] = roles
        # The primary's WAL position and its standbys, every beat: once it is dead, these last
        # reports are the only evidence of how far its standby was behind.
        pg = next((st.facts for st in self.states.values() if st.facts.get("role")), None)
        if pg is not None:
            details["postgres"] = {k: pg[k] for k in _HEARTBEAT_FACTS if k in pg}
        self._emit(EventKind.HEARTBEAT, None, details)

    # -- results ------------------------------------------------------------------------------

    def _handle(self, item: _Done) -> None:
        s = self.states[item.name]
        now = self._clock()
        if item.kind == "restart":
            self._on_restarted(s, item, now)
            return
        started, late = s.inflight_since, s.timed_out
        s.inflight_since, s.timed_out = None, False
        if s.recovering or (late and not item.result.ok):
            return  # the timeout was already counted, or a restart is under way
        if started is not None and s.restarted_at is not None and started < s.restarted_at:
            # It looked at the resource before the restart that just ended (a restart may begin
            # while a check is in flight, when a dependency recovers): counted, its failure would
            # set off a second restart of a resource that is starting. A new check runs at once.
            return
        self._on_result(s, item.result, now)

    def _on_result(self, s: _State, result: CheckResult, now: float) -> None:
        s.checked = True
        s.last_detail = result.detail
        if result.ok:
            self._on_ok(s, result, now)
            return
        s.consecutive += 1
        log.debug("%s: check failed (%d in a row): %s", s.r.name, s.consecutive, result.detail)
        if s.outage_started is None and s.consecutive < s.r.failure_threshold:
            # Confirm a first failure quickly instead of a whole interval later: the failure
            # threshold still filters blips, but detection stays close to one interval.
            s.next_due = min(s.next_due, now + min(s.r.interval_s, max(0.1, s.r.interval_s / 4)))
        held = s.held = self._hold(s)
        if held is not None and s.outage_started is None:
            # The orchestrator stopped or is changing it on purpose: not an outage.
            log.debug("%s: failing while held (%s): %s", s.r.name, held, result.detail)
            return
        if s.outage_started is None and s.consecutive >= s.r.failure_threshold:
            s.outage_started = now
            s.attempts_this_outage, s.last_attempt_at, s.exhausted_reported = 0, None, False
            self._emit(EventKind.RESOURCE_FAILED, s.r.name, {
                "phase": "detected", "error": result.detail,
                "consecutive_failures": s.consecutive,
                "failure_threshold": s.r.failure_threshold,
            })
            for dep in self.graph.dependencies(s.r.name):
                # Confirm the foundation now rather than at its next interval.
                d = self.states[dep]
                if d.inflight_since is None and not d.recovering:
                    d.next_due = min(d.next_due, now)
        if s.outage_started is not None:
            self._recover(s, now)

    def _on_ok(self, s: _State, result: CheckResult, now: float) -> None:
        s.consecutive = 0
        s.held = None
        s.last_ok_at = now
        role = result.facts.get("role")
        if role is not None:
            s.facts = result.facts
        if isinstance(role, str):
            if s.role is not None and role != s.role:
                self._emit(EventKind.ROLE_CHANGED, s.r.name,
                           {"from": s.role, "to": role, **_brief(result.facts)})
            s.role = role
        if s.outage_started is not None:
            self._emit(EventKind.RESOURCE_RECOVERED, s.r.name, {
                "outage_s": round(now - s.outage_started, 3),
                "restart_attempts": s.attempts_this_outage, "detail": result.detail,
            })
            s.outage_started, s.exhausted_reported = None, False
            s.attempts_this_outage, s.last_attempt_at = 0, None
        for dep_name in self.graph.dependents(s.r.name):
            d = self.states[dep_name]
            if d.outage_started is not None and not d.recovering:
                self._recover(d, now)  # it may have been waiting for this resource

    def _last_role(self) -> str | None:
        """The application's last seen role on this VM: primary if any instance was one."""
        roles = {st.role for st in self.states.values() if st.role}
        if "primary" in roles:
            return "primary"
        return roles.pop() if len(roles) == 1 else None

    # -- recovery -----------------------------------------------------------------------------

    def _hold(self, s: _State) -> str | None:
        """Why `s` must be left alone: it, or something it stands on, is held by the operator."""
        for name in (s.r.name, *self.graph.dependencies(s.r.name)):
            restarter = self.states[name].restarter
            reason = restarter.hold() if restarter is not None else None
            if reason is not None:
                return reason if name == s.r.name else f"dependency '{name}': {reason}"
        return None

    def _blocked_by(self, s: _State) -> str | None:
        assert s.outage_started is not None
        for dep in self.graph.dependencies(s.r.name):
            d = self.states[dep]
            if d.recovering or d.consecutive or d.last_ok_at is None \
                    or d.last_ok_at < s.outage_started:
                return dep
        return None

    def _recover(self, s: _State, now: float) -> None:
        situation = Situation(
            consecutive_failures=s.consecutive, failure_threshold=s.r.failure_threshold,
            restartable=s.restarter is not None, attempts_this_outage=s.attempts_this_outage,
            last_attempt_at=s.last_attempt_at, attempt_times=tuple(s.attempt_times),
            exhausted_reported=s.exhausted_reported, blocked_by=self._blocked_by(s),
            held_by=self._hold(s),
        )
        action, reason = decide(situation, s.policy, now)
        log.debug("%s: %s (%s)", s.r.name, action, reason)
        if action is Action.EXHAUSTED:
            s.exhausted_reported = True
            details: dict[str, Any] = {
                "reason": reason, "restart_attempts": s.attempts_this_outage,
                "error": s.last_detail,
            }
            role = self._last_role()
            if role is not None:
                details["role"] = role  # what this VM was before it failed: the gateway's cue
            if self.on_recovery_exhausted is not None:
                try:
                    self.on_recovery_exhausted(s.r.name)
                except Exception:
                    log.exception("%s: the recovery_exhausted hook failed", s.r.name)
            self._emit(EventKind.RECOVERY_EXHAUSTED, s.r.name, details)
        elif action is Action.RESTART:
            s.attempts_this_outage += 1
            s.last_attempt_at = now
            s.attempt_times.append(now)
            self._start_restart(s, reason)

    def _start_restart(self, s: _State, reason: str) -> None:
        dependents = [d for d in self.graph.dependents(s.r.name)
                      if self.states[d].restarter is not None]
        for n in (s.r.name, *dependents):
            self.states[n].recovering = True
        attempt = s.attempts_this_outage
        targets = [(n, self.states[n].restarter) for n in (s.r.name, *dependents)]
        name = s.r.name
        log.warning("%s: restart attempt %d: %s", name, attempt, reason)

        def job() -> None:
            error = None
            # Stop in reverse dependency order, start in dependency order.
            for n, r in reversed(targets):
                try:
                    assert r is not None
                    r.stop()
                except Exception as exc:  # stopping something already dead may complain
                    log.debug("%s: stop before restart: %s", n, exc)
            started = []
            for n, r in targets:
                try:
                    assert r is not None
                    r.start()
                    started.append(n)
                except Exception as exc:
                    error = f"starting {n} failed: {_first_line(exc)}"
                    break
            result = CheckResult(error is None, error or "restarted")
            self._done.put(_Done("restart", name, result, {
                "attempt": attempt, "reason": reason, "restarted": started}))

        self._restarts.submit(job)

    def _on_restarted(self, s: _State, item: _Done, now: float) -> None:
        names = [s.r.name, *[d for d in self.graph.dependents(s.r.name)
                             if self.states[d].restarter is not None]]
        for n in names:
            st = self.states[n]
            st.recovering = False
            st.restarted_at = now
            if item.result.ok:
                # Failures seen before the restart say nothing about the process it started:
                # the next restart needs the failure confirmed again (a dependency turning
                # healthy meanwhile must not restart a server that is still starting). A start
                # that failed is itself the failure: the next attempt follows the backoff.
                st.consecutive = 0
            st.next_due = now  # check at once: a quick recovery is reported quickly
        details: dict[str, Any] = {
            "phase": "restart_attempt", "attempt": item.extra["attempt"],
            "max_restarts": s.policy.max_restarts, "reason": item.extra["reason"],
            "outcome": "restarted" if item.result.ok else "failed",
            "restarted": item.extra["restarted"],
        }
        if not item.result.ok:
            details["error"] = item.result.detail
        self._emit(EventKind.RESOURCE_FAILED, s.r.name, details)

    # -- events -------------------------------------------------------------------------------

    def _emit(self, kind: EventKind, resource: str | None, details: dict[str, Any]) -> None:
        event = HealthEvent(agent_id=self.cfg.agent_id, group=self.cfg.group, kind=kind,
                            resource=resource, details=details)
        if kind is not EventKind.HEARTBEAT:
            log.info("event %s %s %s", kind.value, resource, details)
        try:
            self._emit_cb(event)
        except Exception:
            # The outbox is the agent's memory; if it fails, say so loudly but keep watching.
            log.exception("could not store event %s for %s", kind.value, resource)


_HEARTBEAT_FACTS = ("role", "wal_lsn", "replicas", "upstream", "lag_bytes", "replay_delay_s",
                    "replay_lsn")


def _brief(facts: dict[str, Any]) -> dict[str, Any]:
    keep = ("upstream", "lag_bytes", "replay_delay_s", "wal_lsn", "replay_lsn")
    return {k: facts[k] for k in keep if k in facts}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
