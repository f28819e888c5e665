"""The per-group locks that keep runbooks apart, whatever started them (gateway, CLI, worker).

With etcd in the config (the production layout, and `drflow up`, which runs one), each is a key
in etcd under its holder's 3 s lease (flows/etcd_lock.py): a holder that dies, at whatever
moment, frees it within 3 s. Without etcd, or when no etcd member answers for 1.5 s (no
majority: an attested failover must still run), each is a Prefect global concurrency limit of
size 1.
Every starter of one config makes the same choice, so all queue on the same lock. The locks:

- `roles-<group>`: failover and re-protect, the runbooks that change which node is what;
- `failback-<group>`: failback, apart, because it waits (paused) for a human: a failover must
  never queue behind an approval that nobody clicks.

The runbooks take their lock themselves (flows/failover.py, flows/reprotect.py), so `drflow
failover` on a laptop, the embedded runner of `drflow up` and a deployment run on a worker all
queue on the same lock. Taking it is re-entrant within one run: the deployment entrypoints
(orchestrator/entrypoints.py) take it before the runbook's body takes it again.

A Prefect slot's holder that dies without releasing (kill -9, OOM) keeps it until its lease
runs out (60 s, Prefect's minimum, and the server's sweep: about 70 s); so does one killed
between the server granting the slot and the lease id reaching it, whatever it records. The
wait is cut short when the next taker can tell the holder is gone:
- on one machine (the CLI, the embedded runner restarted after a crash), each holder writes its
  lease id, pid and process start time to a small file in the system's temporary directory;
- a holder with a liveness key in etcd (a warm runner: drflow/liveness.py) also writes
  `/drflow/locks/<limit>` = its lease id and liveness key; a taker that finds that liveness key
  gone releases the lease.

A holder whose release the API failed (tried four times over ~2 s) marks its file "ended": the
next taker on that machine releases that lease, though the process that wrote it still runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from uuid import UUID

from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

from drflow.etcd import Client as EtcdClient
from flows.etcd_lock import EtcdLockUnavailable, etcd_exclusive, held_locks

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
def exclusive(name: str, create: bool = True, etcd: EtcdClient | None = None) -> Iterator[None]:
    """Hold the lock `name`, waiting for it; re-entrant within one context. `etcd`: the config's
    etcd (the lock is a key there), or None (a Prefect concurrency limit).

    A missing Prefect limit is created (size 1) when `create`, else an error: never a silent
    pass. Its lease is short (60 s, Prefect's minimum) so that a runner that dies mid-run frees
    the slot for the re-run soon; a transient failure to renew it must not kill a failover
    half-way.
    """
    if held(name):
        yield
        return
    stack = _in_etcd(etcd, name) if etcd is not None else None
    if stack is None:
        stack = _prefect_slot(name, create)
    token = _held.set(_held.get() | {name})
    try:
        with stack:
            yield
    finally:
        _held.reset(token)


def back_unproven_locks() -> list[str]:
    """Before a runbook's step: each etcd lock this run holds whose lease no member has confirmed
    for longer than its TTL (etcd lost its majority) is backed by Prefect's limit of the same
    name, waiting for it: whoever found etcd silent since took that limit instead. Returns why,
    for each lock so backed (for the audit trail)."""
    why = []
    for lock in held_locks():
        if lock.backup is not None or lock.lost is not None or not lock.unproven():
            continue
        log.error("lock %s: etcd has not confirmed its lease for over %d s; taking Prefect's "
                  "concurrency limit %s as well before the next step", lock.name, lock.ttl_s,
                  lock.name)
        lock.backup = _prefect_slot(lock.name, create=True)
        why.append(f"etcd did not confirm the lock {lock.name} for over {lock.ttl_s} s (no "
                   f"majority?): Prefect's concurrency limit {lock.name} taken as well, as "
                   "any runbook taking the lock while etcd is out does")
    return why


def _in_etcd(etcd: EtcdClient, name: str) -> ExitStack | None:
    """The lock `name` taken in etcd; None when no member answers (then Prefect's limit)."""
    stack = ExitStack()
    try:
        stack.enter_context(etcd_exclusive(etcd, name))
    except EtcdLockUnavailable as exc:
        # etcd without a majority is when an attested failover (--declare-fenced) must still
        # run: Prefect's limit is the lock then.
        log.error("%s; taking Prefect's concurrency limit %s instead", exc, name)
        return None
    return stack


def _prefect_slot(name: str, create: bool) -> ExitStack:
    """A slot of the Prefect limit `name` taken (the limit made first when missing and
    `create`)."""
    stack = ExitStack()
    try:
        stack.enter_context(_slot(name))
    except ConcurrencySlotAcquisitionError as exc:
        if not create:
            raise LimitMissing(f"cannot take a slot of the concurrency limit {name!r}: {exc}. "
                               "Create the limits with `drflow deploy --config drflow.yaml`"
                               ) from exc
        ensure_limit(name)
        try:
            stack.enter_context(_slot(name))
        except ConcurrencySlotAcquisitionError as again:
            raise LimitMissing(f"cannot take a slot of the concurrency limit {name!r}: "
                               f"{again}") from again
    return stack


LEASE_S = 60.0


@contextmanager
def _slot(name: str) -> Iterator[None]:
    """prefect.concurrency.sync.concurrency, keeping the lease id (it is not exposed there)."""
    # Prefect 3.9 internals: the public context manager hides the lease id we must record.
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import (
        acquire_concurrency_slots_with_lease,
        release_concurrency_slots_with_lease,
    )

    _reclaim_from_dead_holder(name, release_concurrency_slots_with_lease)
    _reclaim_from_dead_runner(name, release_concurrency_slots_with_lease)
    lease = acquire_concurrency_slots_with_lease([name], 1, lease_duration=LEASE_S, strict=True,
                                                 suppress_warnings=True).lease_id
    record = _record_holder(name, lease)
    in_etcd = _etcd_record(name, lease)
    try:
        with maintain_concurrency_lease(lease, LEASE_S, raise_on_lease_renewal_failure=False,
                                        suppress_warnings=True):
            yield
    finally:
        # First: the next holder may write its own once released.
        _forget_holder(record, lease)
        _etcd_forget(name, in_etcd)
        _release(name, lease, release_concurrency_slots_with_lease)


RELEASE_TRIES = (0.2, 0.5, 1.0)  # pauses between attempts to give a slot back


def _release(name: str, lease: UUID, release: Callable[[UUID], None]) -> None:
    """Give the slot back, trying again on a failed request: a slot not given back keeps the
    group's next runbook waiting until its lease runs out (60-70 s). If it still fails, the
    holder record says the run ended, so the next runbook on this machine releases it."""
    for pause in (*RELEASE_TRIES, None):
        try:
            release(lease)
            return
        except Exception as exc:  # the server's answer is all there is to say
            if pause is None:
                log.error("could not give back the slot of %s (lease %s): %s: %s; the next "
                          "runbook on this machine releases it, elsewhere it is free when its "
                          "lease runs out (60-70 s)", name, lease, type(exc).__name__,
                          str(exc)[:200])
                _record_holder(name, lease, ended=True)
                return
        time.sleep(pause)


LOCKS_PREFIX = "/drflow/locks/"


def _etcd_record(name: str, lease: UUID) -> str | None:
    """Record the holder in etcd when this process has a liveness key; the value written."""
    from drflow import liveness
    from drflow.etcd import EtcdError

    me = liveness.current()
    if me is None:
        return None
    value = json.dumps({"lease": str(lease), "alive": me.key})
    try:
        me.client.put(LOCKS_PREFIX + name, value)
    except EtcdError as exc:  # the slot is held all the same; a dead holder's frees in ~70 s
        log.warning("holder of %s not recorded in etcd: %s", name, exc)
        return None
    return value


def _etcd_forget(name: str, value: str | None) -> None:
    from drflow import liveness
    from drflow.etcd import EtcdError, delete_op, value_is

    me = liveness.current()
    if me is None or value is None:
        return
    with contextlib.suppress(EtcdError):
        me.client.txn([value_is(LOCKS_PREFIX + name, value)], [delete_op(LOCKS_PREFIX + name)])


def _reclaim_from_dead_runner(name: str, release: object) -> None:
    """Release the slot of a holder on another machine whose liveness key is gone."""
    from drflow import liveness
    from drflow.etcd import EtcdError, delete_op, value_is

    me = liveness.current()
    if me is None:
        return
    try:
        value = me.client.get(LOCKS_PREFIX + name)
        if value is None:
            return
        record = json.loads(value)
        if me.alive(str(record.get("alive"))) is not False:
            return
        with contextlib.suppress(Exception):  # already expired, or released by another taker
            release(UUID(str(record["lease"])))  # type: ignore[operator]
        me.client.txn([value_is(LOCKS_PREFIX + name, value)], [delete_op(LOCKS_PREFIX + name)])
        log.warning("released %s from %s, which is gone", name, record.get("alive"))
    except (EtcdError, ValueError, AttributeError) as exc:
        log.warning("could not check the holder of %s in etcd: %s", name, exc)


def _holder_path(name: str) -> Path:
    d = Path(tempfile.gettempdir()) / "drflow-locks"
    d.mkdir(mode=0o700, exist_ok=True)
    return d / f"{name}.json"


def _me() -> dict[str, object]:
    import psutil

    return {"pid": os.getpid(), "started": psutil.Process().create_time()}


def _record_holder(name: str, lease: UUID, ended: bool = False) -> Path:
    """`ended`: the run is over but its slot could not be given back; whoever reads the record
    next releases it, even though this process still runs."""
    path = _holder_path(name)
    with contextlib.suppress(OSError):
        path.write_text(json.dumps({"lease": str(lease), **_me(),
                                    **({"ended": True} if ended else {})}))
    return path


def _forget_holder(path: Path, lease: UUID) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("lease") == str(lease):
            path.unlink()


def holder_is_gone(record: dict[str, object]) -> bool:
    """Is the process that wrote `record` (on this machine) no longer running?"""
    import psutil

    pid, started = record.get("pid"), record.get("started")
    if not isinstance(pid, int) or not isinstance(started, int | float):
        return False
    try:
        return abs(psutil.Process(pid).create_time() - started) > 1.0  # pid reused
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _reclaim_from_dead_holder(name: str, release: object) -> None:
    path = _holder_path(name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(record, dict):
        return
    ended = record.get("ended") is True
    if not ended and not holder_is_gone(record):
        return
    with contextlib.suppress(Exception):  # already expired, or released by another taker
        release(UUID(str(record["lease"])))  # type: ignore[operator]
        log.warning("released %s from process %s, which %s", name, record["pid"],
                    "ended its run without giving it back" if ended else "died holding it")
    with contextlib.suppress(OSError):
        path.unlink()


def ensure_limit(name: str) -> None:
    """Create `name` with size 1 unless it exists; another runner creating it at the same time
    is fine."""
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
