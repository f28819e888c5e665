"""One run of a runbook: audited steps, a Slack thread updated step by step, and step timings.

What the run shows in Prefect comes from here too: its name and tags (`label`), one task run
per step named as the report names it (`flows/step_tasks.py`), one log line per step with its
outcome and why, the report as a markdown artifact, and the outcome in the final state's
message (`final_state`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import Abort
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from drflow import liveness
from drflow.audit import AuditedStep, audited
from flows import etcd_lock, locks, step_tasks
from flows.runtime import Runtime
from tasks.slack import IncidentThread

log = logging.getLogger("drflow.run")

# The one tag every runbook run carries beside its own (the gateway's starter adds it too).
DRFLOW_TAG = "drflow"


def run_name(runbook: str, group: str, key: str) -> str:
    """What a runbook run is called in Prefect: `failover orders failover:orders:3`."""
    return f"{runbook} {group} {key}"


def run_tags(runbook: str, group: str, site: str | None) -> list[str]:
    """A runbook run's tags: what the UI filters by (group, kind of runbook, where it acts)."""
    tags = [DRFLOW_TAG, f"group:{group}", f"kind:{runbook}"]
    return tags + ([f"site:{site}"] if site else [])


def minute_key(at: datetime | None = None) -> str:
    """A run's key when nothing else names it: the UTC minute it started (`2026-12-04T05:00Z`)."""
    return (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def md(mrkdwn: str) -> str:
    """Slack mrkdwn made markdown: `*bold*` → `**bold**`, `<url|text>` → `[text](url)`,
    `<@U1>` → `@U1`. The headlines are written for Slack; the artifact is markdown."""
    text = re.sub(r"<@([A-Z0-9]+)>", r"@\1", mrkdwn)
    text = re.sub(r"<([^<>|\s]+)\|([^<>]+)>", r"[\2](\1)", text)
    return re.sub(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])", r"**\1**", text)


def outcome_message(result: Mapping[str, Any]) -> str:
    """The final state's message: `outcome: why` (what orchestrator/deployed.py reads back)."""
    outcome = str(result.get("outcome") or "completed")
    reason = str(result.get("reason") or "").strip()
    return f"{outcome}: {reason}"[:1000] if reason else outcome


def final_state(flow_fn: Callable[..., Any], result: dict[str, Any],
                message: str | None = None) -> dict[str, Any]:
    """What a runbook flow returns: when `flow_fn` is the function of the run under way, its
    final state, Completed with `outcome: why` as the message and the result as data; when the
    body runs inside another flow (the deployments' entrypoints call `.fn` and report the result
    themselves) or outside Prefect, the result itself. Prefect hands a returned state's data to
    whoever called the flow, so every caller still gets the dict. `message` replaces the
    default `outcome: why`."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow is None or ctx.flow.fn is not flow_fn:
        return result
    text = (message or outcome_message(result))[:1000]
    return cast(dict[str, Any], Completed(message=text, data=result))


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
        self._labelling: threading.Thread | None = None
        if self.notify:
            self.thread = IncidentThread(self.rt.slack, self.title, scrub=self.rt.scrub)

    def label(self, key: str, site: str | None) -> None:
        """Name and tag this run in Prefect (`run_name`, `run_tags`). A starter that created or
        claimed the run gave it these already (orchestrator/embedded.py, warm_runner.py): then
        nothing is sent. Otherwise (a plain worker, the CLI) the update goes on a thread of its
        own, so that no step waits for it."""
        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return
        fr = ctx.flow_run
        name = run_name(self.runbook, self.group, key)
        tags = sorted(set(fr.tags or []) | set(run_tags(self.runbook, self.group, site)))
        if fr.name == name and set(tags) <= set(fr.tags or []):
            return
        fr.name, fr.tags = name, tags
        self.wait_labelled()
        self._labelling = threading.Thread(target=_relabel, args=(fr.id, name, tags),
                                           name=f"label {name}", daemon=True)
        self._labelling.start()

    def wait_labelled(self, timeout: float = 5.0) -> None:
        if self._labelling is not None:
            self._labelling.join(timeout)

    def start(self, headline: str, params: Mapping[str, Any]) -> None:
        self.t0 = time.monotonic()
        self.rt.audit.append(self.actor, f"{self.runbook}.start", self.group, dict(params),
                             "started", reason=headline)
        if self.thread:
            self.thread.start(headline)

    @contextmanager
    def step(self, name: str, target: str, params: Mapping[str, Any] | None = None,
             as_task: bool = True) -> Iterator[AuditedStep]:
        """Audit before and after; time it; tell the Slack thread how it went and why.

        `as_task=False` for a step that pauses the run: a pause inside a task run is not a
        pause of the flow (its timeout ends the run "completed and never resumed" instead of
        returning to the step), so such a step shows in the run's logs and report only.

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
        error = ""
        try:
            # The step is a task run of its name: the run graph reads as the report does, and
            # the tasks the step calls (with their retries) show inside it.
            with step_tasks.step_run(name, enabled=as_task) as task_run:
                with audited(self.rt.audit, self.actor, f"{self.runbook}.{name}", target,
                             params) as step:
                    yield step
                outcome = step.outcome
                task_run.finish(outcome, step.reason)
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            raise
        finally:
            seconds = time.monotonic() - t
            reason = (step.reason if step else "") or error
            self.timings.append(StepTiming(name, outcome, seconds, reason))
            _logger().log(logging.WARNING if outcome in ("failed", "refused") else logging.INFO,
                          "step %r %s in %.2f s%s", name, outcome, seconds,
                          f": {reason}" if reason else "")
            if self.thread:
                self.thread.step(outcome, f"*{name}* ({seconds:.2f} s)" + (f": {reason}" if reason else ""))

    def note(self, outcome: str, text: str) -> None:
        if self.thread:
            self.thread.step(outcome, text)

    def finish(self, outcome: str, headline: str, figures: Mapping[str, Any], markdown: str) -> None:
        """Final audit record, a Prefect markdown artifact, the thread's headline; then flush Slack.

        `headline` is Slack mrkdwn; `markdown` is the report, which says the headline itself
        (the artifact's description is only the title and outcome: the UI shows both)."""
        self.rt.audit.append(self.actor, f"{self.runbook}.finish", self.group, dict(figures),
                             outcome, reason=headline,
                             duration_s=time.monotonic() - getattr(self, "t0", time.monotonic()))
        try:
            create_markdown_artifact(
                key=f"{self.runbook}-{self.group}".lower().replace("_", "-"),
                markdown=self.rt.scrub(markdown), description=f"{self.title}: {outcome}",
            )
        except Exception as exc:  # the artifact is a view; the audit trail is the record
            self.rt.audit.append(self.actor, f"{self.runbook}.artifact", self.group, {},
                                 "failed", reason=f"{type(exc).__name__}")
        if self.thread:
            self.thread.headline(headline)
            self.thread.close()
        self.wait_labelled()

    def steps_table(self) -> str:
        """The steps as markdown: a table of short cells (a long reason in a cell runs past the
        table's edge in Prefect's UI), then each step's reason below it, where text wraps."""
        return steps_markdown(self.timings)


def steps_markdown(timings: list[StepTiming]) -> str:
    rows = ["| # | step | outcome | seconds |", "|---:|---|---|---:|"]
    rows += [f"| {i} | {t.name} | {t.outcome} | {t.seconds:.3f} |"
             for i, t in enumerate(timings, 1)]
    why = [f"{i}. **{t.name}** ({t.outcome}): {md(t.reason) if t.reason else '—'}"
           for i, t in enumerate(timings, 1)]
    return "\n".join(rows) + "\n\n### Why\n\n" + "\n".join(why)


def end_expired_pause() -> None:
    """Take the run back to Running after `pause_flow_run` timed out. The server leaves it
    Paused and then refuses any state but Failed ("paused and never resumed"), while the
    runbook goes on: it says so in Slack and finishes with its own outcome (`expired`)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(ctx.flow_run.id, Running(), force=True)
    except Exception as exc:  # the run's state is a view; the audit trail has the outcome
        log.warning("could not take flow run %s out of its expired pause: %s: %s",
                    ctx.flow_run.id, type(exc).__name__, exc)


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (its lines are the run's logs in Prefect), else this module's."""
    if FlowRunContext.get() is None:
        return log
    return get_run_logger()


def _relabel(run_id: Any, name: str, tags: list[str]) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name, tags=tags)
    except Exception as exc:  # the name is a view; the run goes on
        log.warning("could not name flow run %s %r: %s: %s", run_id, name,
                    type(exc).__name__, exc)
