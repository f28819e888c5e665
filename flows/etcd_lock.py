"""A runbook lock in etcd: one key, created only if absent, bound to a short lease its holder
keeps alive.

Why not only Prefect's concurrency limit: a slot is granted by the server before its lease id
reaches the client. A runner killed in between (its host lost while the request was in flight)
leaves a slot that nobody can name, held until Prefect's lease lapses: 60 s at least, ~70 s
with the server's sweep, the failover's re-run waiting all that time. Here the holder's key
goes with its lease, `LOCK_TTL_S` after the holder's last renewal, whatever moment it died at.

A holder frozen longer than the TTL (a VM stunned by a snapshot, a process stopped) finds its
lease lapsed when it thaws: it takes the key again if nobody took it meanwhile (even briefly);
otherwise it has lost the lock, and `lost_reason()` says so to the runbook's next step, which
stops before acting.

A holder that cannot renew because no member answers (etcd without a majority) cannot prove it
still holds the key once its TTL has passed; meanwhile another runbook, finding etcd silent, takes
Prefect's limit of the same name instead (flows/locks.py). So `unproven()` tells the runbook's
next step to take that limit too before acting: while etcd is out, both queue on Prefect's.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

from drflow.etcd import Client, EtcdError, absent, delete_op, put_op, value_is

log = logging.getLogger("drflow.locks")

LOCK_PREFIX = "/drflow/runbook-locks/"
TAKEN_PREFIX = "/drflow/runbook-locks-taken/"  # who took each lock last (no lease: it stays)
LOCK_TTL_S = 3  # a dead holder's lock is free this long after its last renewal
RETRY_S = 0.1  # between two attempts to take a held lock
WAITING_LOG_S = 30.0  # how often a waiter says what it waits for
UNREACHABLE_S = 1.5  # etcd answering nothing this long: the lock cannot be taken there


class EtcdLockUnavailable(EtcdError):
    """No etcd member answered the lock's requests for `UNREACHABLE_S` (no majority, cut off)."""


_held: contextvars.ContextVar[tuple[HeldLock, ...]] = contextvars.ContextVar(
    "drflow_etcd_locks_held", default=())


def lock_key(name: str) -> str:
    return LOCK_PREFIX + name


def held_locks() -> tuple[HeldLock, ...]:
    """The etcd locks the code running here holds."""
    return _held.get()


def lost_reason() -> str | None:
    """Why the code running here no longer holds one of its locks, or None."""
    for lock in _held.get():
        if lock.lost is not None:
            return lock.lost
    return None


class HeldLock:
    """The key `lock_key(name)` = `value`, under a lease this object keeps alive."""

    def __init__(self, client: Client, name: str, value: str, ttl_s: int) -> None:
        self.client, self.name, self.key, self.value = client, name, lock_key(name), value
        self.ttl_s = ttl_s
        self.lease = 0
        self.held = False  # taken once (a waiter's lapsed lease is only replaced)
        self.lost: str | None = None
        self.renewed_at = time.monotonic()  # the last answer proving the lease alive
        self.backup: ExitStack | None = None  # Prefect's limit, taken while etcd was out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"lock {name}", daemon=True)

    def grant(self) -> None:
        self.lease, _ = self.client.grant(self.ttl_s)
        self._thread.start()

    def try_take(self, again: bool = False) -> str | None:
        """Create the key if absent (`again`: and if nobody else took it since this holder
        did); None when taken, else the holder's value."""
        taken = TAKEN_PREFIX + self.name
        ok, _ = self.client.txn(
            [absent(self.key), *([value_is(taken, self.value)] if again else [])],
            [put_op(self.key, self.value, self.lease), put_op(taken, self.value)])
        if ok:
            self.held = True
            self.renewed_at = time.monotonic()
            return None
        return self.client.get(self.key) or ("" if not again else "a runbook that has ended")

    def unproven(self) -> bool:
        """Held, but no member has confirmed the lease for longer than its TTL: etcd is out of
        reach, and another runbook may have taken Prefect's limit in its place."""
        return self.held and time.monotonic() - self.renewed_at > self.ttl_s

    def release(self) -> None:
        self._stop.set()
        with suppress(EtcdError):
            self.client.txn([value_is(self.key, self.value)], [delete_op(self.key)])
        if self.lease:
            with suppress(EtcdError):  # it lapses within the TTL anyway
                self.client.revoke(self.lease)
        if self.backup is not None:
            self.backup.close()

    def abandon(self) -> None:
        """Stop keeping the lease, asking etcd nothing: after etcd answered nothing for
        `UNREACHABLE_S`, a delete and a revoke would only wait out the same timeouts again (a
        hung member costs its timeout per request), and a key this holder may have created
        lapses with its lease within the TTL anyway."""
        self._stop.set()

    def _keep(self) -> None:
        every = max(self.ttl_s / 3, 0.2)
        while not self._stop.wait(every):
            try:
                if self.client.keepalive(self.lease, timeout=every) > 0:
                    self.renewed_at = time.monotonic()
                    continue
                if self._stop.is_set():
                    return
                self._lapsed()
            except EtcdError as exc:  # etcd out of reach: keep trying within the TTL
                log.warning("lock %s: keepalive failed: %s", self.name, exc)

    def _lapsed(self) -> None:
        """The lease ran out (this process frozen, or cut off from etcd, for longer than the
        TTL): take the key again under a new lease, unless another holder has it now."""
        self.lease, _ = self.client.grant(self.ttl_s)
        if not self.held:  # still waiting: the wait goes on under the new lease
            return
        holder = self.try_take(again=True)
        if holder is None:
            log.warning("lock %s: its lease lapsed; taken again (nobody took it meanwhile)",
                        self.name)
            return
        self.lost = (f"the lock {self.name} lapsed (this process was frozen or cut off from etcd "
                     f"for longer than {self.ttl_s} s) and is held by {_who(holder)} now")
        log.error("%s", self.lost)
        self._stop.set()


def _who(value: str) -> str:
    try:
        return str(json.loads(value).get("holder") or value)
    except (ValueError, AttributeError):
        return value or "another holder"


def _holder() -> str:
    from drflow import liveness

    me = liveness.current()
    where = f"{socket.gethostname()} pid {os.getpid()}"
    return f"{me.key.rsplit('/', 1)[-1]} ({where})" if me is not None else where


@contextmanager
def etcd_exclusive(client: Client, name: str, ttl_s: int = LOCK_TTL_S,
                   unreachable_s: float = UNREACHABLE_S) -> Iterator[HeldLock]:
    """Hold the lock `name`, waiting for it as long as another holder has it. EtcdLockUnavailable
    when etcd answers nothing for `unreachable_s` (longer than an election): the caller decides
    what then (flows/locks.py takes Prefect's limit instead)."""
    from prefect.runtime import flow_run

    value = json.dumps({"holder": _holder(), "run": str(flow_run.get_id() or ""),
                        "nonce": uuid.uuid4().hex})
    lock = HeldLock(client, name, value, ttl_s)
    waited_since = time.monotonic()
    said_at = 0.0
    silent_since: float | None = None
    try:
        while True:
            attempt_at = time.monotonic()
            try:
                if not lock.lease:
                    lock.grant()
                holder = lock.try_take()
                silent_since = None
            except EtcdError as exc:
                holder = f"etcd out of reach ({exc})"
                silent_since = silent_since or attempt_at
                if time.monotonic() - silent_since >= unreachable_s:
                    lock.abandon()
                    raise EtcdLockUnavailable(
                        f"the lock {name} cannot be taken in etcd: no member answered for "
                        f"{unreachable_s:g} s ({exc})") from None
            if holder is None:
                break
            now = time.monotonic()
            if now - said_at >= WAITING_LOG_S:
                said_at = now
                log.warning("waiting for the lock %s (for %.0f s): held by %s", name,
                            now - waited_since, _who(holder))
            time.sleep(RETRY_S)
    except EtcdLockUnavailable:
        raise
    except BaseException:
        lock.release()
        raise
    token = _held.set((*_held.get(), lock))
    try:
        yield lock
    finally:
        _held.reset(token)
        lock.release()
