"""A round-robin TCP load balancer for the lab: each new connection goes to the next backend.

Stands in front of gateway replicas as any simple TCP balancer would (no HTTP awareness, no
stickiness, no health checks: a dead backend's connections fail and the client tries again).
With `redispatch`, a connection a backend refuses goes to the next one instead, as a balancer
with health checks (HAProxy's `option redispatch`) sends nothing to a replica that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import Sequence


class RoundRobin:
    """Listens on `host`:`port` (0: any free port) in a thread of its own until stop()."""

    def __init__(self, backends: Sequence[tuple[str, int]], port: int = 0,
                 host: str = "127.0.0.1", redispatch: bool = False) -> None:
        self.backends = list(backends)
        self.host = host
        self.redispatch = redispatch
        self.connections: Counter[tuple[str, int]] = Counter()
        self._next = itertools.cycle(self.backends)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port,), name="balancer",
                                        daemon=True)
        self.port = 0

    def start(self) -> RoundRobin:
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError("the balancer did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        elif self._thread.ident is None:  # never started: _run would have closed it
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> RoundRobin:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, port))
            self.port = int(self._server.sockets[0].getsockname()[1])
            self._ready.set()
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tries = len(self.backends) if self.redispatch else 1
        for _ in range(tries):
            backend = next(self._next)
            self.connections[backend] += 1
            try:
                up_reader, up_writer = await asyncio.open_connection(*backend)
                break
            except OSError:
                continue
            except asyncio.CancelledError:  # stopped while connecting: the client is closed too
                writer.close()
                raise
        else:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            dst.close()
