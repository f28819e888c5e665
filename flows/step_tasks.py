"""A runbook's step as a Prefect task run of the step's name.

A step is a block of a runbook (`with run.step(name, …)`), not a function, so it cannot be a
`@task`. Prefect's own task engine (the one behind every `@task` call) is driven here around the
block: the task run is created, Running, then Completed or Failed with the step's reason as the
state's message, all through events, as for any task (no API round trip on the step's path).
The tasks a step calls run inside it, as nested task runs with their own retries.

No tags reach these task runs: a tagged task run asks the API for its tag's concurrency slots
at every start, a round trip per step.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import Completed, Failed, State
from prefect.task_engine import SyncTaskRunEngine


def _step() -> None:
    """The body Prefect never calls: the step's block runs in its place."""


# Making a Task costs milliseconds (its function is inspected and hashed): that is done once,
# at import, and each step's Task is a copy of this one under the step's name.
_BASE: Task[[], None] = Task(fn=_step, name="step", cache_policy=NO_CACHE, persist_result=False,
                             log_prints=False)
_tasks: dict[str, Task[[], None]] = {}
_tasks_lock = threading.Lock()


def task_of(name: str) -> Task[[], None]:
    """One Task per step name, made once per process."""
    with _tasks_lock:
        t = _tasks.get(name)
        if t is None:
            t = copy.copy(_BASE)
            t.name = t.task_run_name = name
            t.task_key = f"drflow-step-{name}"  # one key per step, not one for them all
            _tasks[name] = t
        return t


def final_state(outcome: str, reason: str) -> State[None]:
    """A step's outcome as its task run's final state: `failed` is Failed; `refused` and
    `skipped` are Completed under their own name (the runbook decided, nothing broke)."""
    message = reason[:500] or outcome
    if outcome == "failed":
        return Failed(message=message)
    if outcome in ("ok", "completed"):
        return Completed(message=message)
    return Completed(name=outcome.capitalize(), message=message)


@dataclass
class StepRun:
    """The task run of one step, if any; `finish` gives it the step's outcome."""

    engine: SyncTaskRunEngine[[], None] | None = None
    finished: bool = False

    def finish(self, outcome: str, reason: str) -> None:
        if self.engine is not None and not self.finished:
            self.engine.set_state(final_state(outcome, reason))
            self.finished = True


@contextmanager
def step_run(name: str, enabled: bool = True) -> Iterator[StepRun]:
    """The block as a task run named `name`, when enabled and it runs in a flow run and not
    inside a task already (then it is only the block)."""
    if not enabled or FlowRunContext.get() is None or TaskRunContext.get() is not None:
        yield StepRun()
        return
    engine: SyncTaskRunEngine[[], None] = SyncTaskRunEngine(task=task_of(name), parameters={})
    handle = StepRun(engine)
    with engine.start(), engine.setup_run_context():
        try:
            yield handle
        except Exception as exc:
            handle.finish("failed", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            # A block left by a return or break inside it, before its outcome was given.
            handle.finish("ok", "")


def names(task_runs: list[Any]) -> list[str]:
    """The step task runs' names among `task_runs`, by start time (tests, reports)."""
    return [t.name for t in sorted(task_runs, key=lambda t: t.start_time or t.expected_start_time)
            if str(getattr(t, "task_key", "")).startswith("drflow-step-")]
