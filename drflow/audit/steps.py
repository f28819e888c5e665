"""Audit a step before and after it runs: `with audited(store, actor, action, target, params):`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from drflow.audit.records import AuditRecord
from drflow.audit.store import AuditStore


@dataclass
class AuditedStep:
    """What the step reports back: its outcome (default `ok`), reason and result fields."""

    started: AuditRecord
    outcome: str = "ok"
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    finished: AuditRecord | None = None


@contextmanager
def audited(store: AuditStore, actor: str, action: str, target: str,
            params: Mapping[str, Any] | None = None, *, reason: str = "") -> Iterator[AuditedStep]:
    """Append `started`, run the block, then append `ok` (or the outcome the block set, such as
    `refused` or `skipped`) or `failed`/`cancelled` with the error's type and message, and the
    duration. The error is re-raised; the closing record names the `started` record's seq so
    that interleaved steps can be paired."""
    base = dict(params or {})
    started = store.append(actor, action, target, base, "started", reason=reason)
    step = AuditedStep(started=started, reason=reason)
    t0 = time.monotonic()
    try:
        yield step
    except BaseException as exc:
        # Exceptions are failures; KeyboardInterrupt, cancellation and the like are not the
        # step's fault, and the trail should say so.
        outcome = "failed" if isinstance(exc, Exception) else "cancelled"
        closing = {**base, "started_seq": started.seq,
                   "error": {"type": type(exc).__name__, "message": str(exc)}}
        if step.result:
            closing["result"] = step.result
        step.finished = store.append(actor, action, target, closing, outcome,
                                     reason=step.reason, duration_s=time.monotonic() - t0)
        raise
    closing = {**base, "started_seq": started.seq}
    if step.result:
        closing["result"] = step.result
    step.finished = store.append(actor, action, target, closing, step.outcome,
                                 reason=step.reason, duration_s=time.monotonic() - t0)
