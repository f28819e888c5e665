"""One daemon thread running submitted calls in order.

For calls that may block on a peer that never answers (a frozen vCenter): a
ThreadPoolExecutor's threads are joined when the interpreter exits, so one such call would
hold the process's exit (Ctrl-C, SIGTERM) until the peer answered. A daemon thread is not.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonWorker:
    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]
                                       | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Ends the thread after what was submitted before; never waits for it."""
        self._queue.put(None)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever awaits the future
                future.set_exception(exc)
