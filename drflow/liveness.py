"""A process's liveness in etcd: a key bound to a lease the process keeps alive.

Other processes read the key to learn whether this one still lives: a warm runner that dies
(kill -9, its host lost) loses its key within the lease's TTL, and another runner takes over its
runs and the concurrency slots it held (orchestrator/warm_runner.py, flows/locks.py).

`current()` is the identity the runbooks' locks record for their holder: the one a runner binds
around each run it executes (`using`).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from drflow.etcd import Client, EtcdError

log = logging.getLogger("drflow.liveness")

_bound: contextvars.ContextVar[Liveness | None] = contextvars.ContextVar("drflow_liveness",
                                                                          default=None)
Guard = Callable[[], "str | None"]  # why this code no longer owns its work, or None
_guard: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("drflow_liveness_guard",
                                                                      default=None)


def current() -> Liveness | None:
    """The liveness of the code running here, if it has one (warm runners' runs do)."""
    return _bound.get()


@contextmanager
def using(liveness: Liveness | None, guard: Guard | None = None) -> Iterator[None]:
    """Code in this context (a run) holds what it holds on behalf of `liveness`; `guard` says
    whether it still owns its work (a runner frozen past its lease may have lost its run)."""
    token, gtoken = _bound.set(liveness), _guard.set(guard)
    try:
        yield
    finally:
        _bound.reset(token)
        _guard.reset(gtoken)


def lost_reason() -> str | None:
    """Why the code running here must stop acting (its work was taken over), or None."""
    guard = _guard.get()
    return guard() if guard is not None else None


class Liveness:
    """`key` exists in etcd while this process renews its lease (every TTL / 3)."""

    def __init__(self, client: Client, key: str, ttl_s: int = 3, value: str = "") -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.value = value
        self.lease = 0
        self.on_new_lease: Callable[[int], None] | None = None  # the old lease is gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Liveness:
        self._grant()
        self._thread = threading.Thread(target=self._keep, name=f"liveness {self.key}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the lease now: the key and every key bound to the lease go at once."""
        self._stop.set()
        if self.lease:
            try:
                self.client.revoke(self.lease)
            except EtcdError as exc:
                log.warning("liveness %s: not revoked (%s); it lapses in %d s", self.key, exc,
                            self.ttl_s)

    def alive(self, key: str) -> bool | None:
        """Does the liveness key `key` exist? None when etcd cannot say."""
        try:
            return self.client.get(key) is not None
        except EtcdError:
            return None

    def _grant(self) -> None:
        self.lease, _ = self.client.grant(self.ttl_s)
        self.client.put(self.key, self.value, self.lease)

    def _keep(self) -> None:
        every = max(self.ttl_s / 3, 0.2)
        while not self._stop.wait(every):
            try:
                if self.client.keepalive(self.lease, timeout=every) > 0:
                    continue
                # The lease lapsed (etcd unreachable for longer than its TTL): others may
                # already have taken what it covered.
                log.error("liveness %s: lease %d lapsed; taking a new one", self.key, self.lease)
                self._grant()
                if self.on_new_lease is not None:
                    self.on_new_lease(self.lease)
            except EtcdError as exc:
                log.warning("liveness %s: keepalive failed: %s", self.key, exc)
