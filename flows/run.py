"""One run of a runbook: audited steps, a Slack thread updated step by step, and step timings."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import Abort
from prefect.runtime import flow_run

from drflow import liveness
from drflow.audit import AuditedStep, audited
from flows import etcd_lock, locks
from flows.runtime import Runtime
from tasks.slack import IncidentThread


@dataclass
class StepTiming:
    name: str
    outcome: str
    seconds: float
    reason: str


@dataclass
class RunbookRun:
    rt: Runtime
    runbook: str
    group: str
    title: str
    notify: bool = True
    timings: list[StepTiming] = field(default_factory=list)
    thread: IncidentThread | None = None

    def __post_init__(self) -> None:
        run_id = flow_run.get_id()
        self.run_id = str(run_id) if run_id else "local"
        self.actor = f"flow:{self.runbook}/{self.run_id}"
        if self.notify:
            self.thread = IncidentThread(self.rt.slack, self.title, scrub=self.rt.scrub)

    def start(self, headline: str, params: Mapping[str, Any]) -> None:
        self.t0 = time.monotonic()
        self.rt.audit.append(self.actor, f"{self.runbook}.start", self.group, dict(params),
                             "started", reason=headline)
        if self.thread:
            self.thread.start(headline)

    @contextmanager
    def step(self, name: str, target: str,
             params: Mapping[str, Any] | None = None) -> Iterator[AuditedStep]:
        """Audit before and after; time it; tell the Slack thread how it went and why.

        First, on a warm runner: is the run still this runner's? One frozen longer than its
        liveness lease (a VM stunned by a snapshot) may find that another runner took the run
        over meanwhile, and any holder so frozen may find its group's lock taken by another
        runbook: it stops here, before acting, and leaves the run's state to the other
        (Prefect's Abort ends the engine without proposing a state). A lock etcd has stopped
        confirming (no majority) is backed by Prefect's limit here, as a runbook that took it
        while etcd was out holds that instead (flows/locks.py)."""
        lost = liveness.lost_reason() or etcd_lock.lost_reason()
        if lost is not None:
            self.rt.audit.append(self.actor, f"{self.runbook}.abandon", self.group,
                                 {"before_step": name}, "stopped", reason=lost)
            raise Abort(lost)
        for why in locks.back_unproven_locks():
            self.rt.audit.append(self.actor, f"{self.runbook}.lock", self.group,
                                 {"before_step": name}, "ok", reason=why)
        t = time.monotonic()
        outcome = "failed"
        step: AuditedStep | None = None
        try:
            with audited(self.rt.audit, self.actor, f"{self.runbook}.{name}", target,
                         params) as step:
                yield step
            outcome = step.outcome
        finally:
            seconds = time.monotonic() - t
            reason = step.reason if step else ""
            self.timings.append(StepTiming(name, outcome, seconds, reason))
            if self.thread:
                self.thread.step(outcome, f"*{name}* ({seconds:.2f} s)" + (f": {reason}" if reason else ""))

    def note(self, outcome: str, text: str) -> None:
        if self.thread:
            self.thread.step(outcome, text)

    def finish(self, outcome: str, headline: str, figures: Mapping[str, Any], markdown: str) -> None:
        """Final audit record, a Prefect markdown artifact, the thread's headline; then flush Slack."""
        self.rt.audit.append(self.actor, f"{self.runbook}.finish", self.group, dict(figures),
                             outcome, reason=headline,
                             duration_s=time.monotonic() - getattr(self, "t0", time.monotonic()))
        try:
            create_markdown_artifact(
                key=f"{self.runbook}-{self.group}".lower().replace("_", "-"),
                markdown=self.rt.scrub(markdown), description=self.rt.scrub(headline)[:500],
            )
        except Exception as exc:  # the artifact is a view; the audit trail is the record
            self.rt.audit.append(self.actor, f"{self.runbook}.artifact", self.group, {},
                                 "failed", reason=f"{type(exc).__name__}")
        if self.thread:
            self.thread.headline(headline)
            self.thread.close()

    def steps_table(self) -> str:
        rows = ["| step | outcome | seconds | why |", "|---|---|---:|---|"]
        rows += [f"| {t.name} | {t.outcome} | {t.seconds:.3f} | {t.reason.replace('|', '/')} |"
                 for t in self.timings]
        return "\n".join(rows)
