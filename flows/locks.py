"""The per-group locks that keep runbooks apart, whatever started them (gateway, CLI, worker).

Each is a Prefect global concurrency limit of size 1, the one thing every starter shares:

- `roles-<group>`: failover and re-protect, the runbooks that change which node is what;
- `failback-<group>`: failback, apart, because it waits (paused) for a human: a failover must
  never queue behind an approval that nobody clicks.

The runbooks take their lock themselves (flows/failover.py, flows/reprotect.py), so `drflow
failover` on a laptop, the embedded runner of `drflow up` and a deployment run on a worker all
queue on the same slot. Taking it is re-entrant within one run: the deployment entrypoints
(flows/entrypoints.py) take it before the runbook's body takes it again.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency

log = logging.getLogger("drflow.locks")

_held: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "drflow_locks_held", default=frozenset())


class LimitMissing(RuntimeError):
    """A group's concurrency limit cannot be taken (it does not exist, or the API refused)."""


def roles_limit(group: str) -> str:
    return f"roles-{group}"


def failback_limit(group: str) -> str:
    return f"failback-{group}"


def limit_names(group: str) -> list[str]:
    """Every global concurrency limit `drflow deploy` creates for `group`."""
    return [roles_limit(group), failback_limit(group)]


def held(name: str) -> bool:
    """Does this run (this context) hold the limit `name` already?"""
    return name in _held.get()


@contextmanager
def exclusive(name: str, create: bool = True) -> Iterator[None]:
    """Hold one slot of the limit `name`, waiting for it; re-entrant within one context.

    A missing limit is created (size 1) when `create`, else an error: never a silent pass. The
    lease is short (60 s, Prefect's minimum) so that a runner that dies mid-run frees the slot
    for the re-run soon; a transient failure to renew it must not kill a failover half-way.
    """
    if held(name):
        yield
        return
    stack = ExitStack()
    try:
        stack.enter_context(_slot(name))
    except ConcurrencySlotAcquisitionError as exc:
        if not create:
            raise LimitMissing(f"cannot take a slot of the concurrency limit {name!r}: {exc}. "
                               "Create the limits with `drflow deploy --config drflow.yaml`"
                               ) from exc
        _create_limit(name)
        try:
            stack.enter_context(_slot(name))
        except ConcurrencySlotAcquisitionError as again:
            raise LimitMissing(f"cannot take a slot of the concurrency limit {name!r}: "
                               f"{again}") from again
    token = _held.set(_held.get() | {name})
    try:
        with stack:
            yield
    finally:
        _held.reset(token)


def _slot(name: str) -> AbstractContextManager[None]:
    return concurrency(name, occupy=1, strict=True, lease_duration=60,
                       raise_on_lease_renewal_failure=False)


def _create_limit(name: str) -> None:
    """Create `name` with size 1; another runner creating it at the same time is fine."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
            log.warning("created the concurrency limit %s (size 1): runbooks of the group now "
                        "queue on it", name)
        except ObjectAlreadyExists:
            pass
