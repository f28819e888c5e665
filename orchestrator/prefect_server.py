"""The Prefect server drflow starts: Prefect's own app, run as `prefect server start` runs it in
the foreground, with one difference: a request the server answers 503 is retried inside the
server, at once, for a few seconds, before the 503 reaches the client.

Prefect's server answers 503 only for errors it declares retryable (on SQLite, "database is
locked": a deferred transaction that lost the race to write, rolled back). Its client retries such
a request after 2 s, then 4 s, 8 s… When five failovers start together on SQLite, two or three of
them lose that race and start 6 s late. The writer that won holds the lock for milliseconds, so the
same request sent again 20-100 ms later goes through. Retrying here is what the client would do,
sooner: the request is the same one (body buffered, sent again), and the failed attempt changed
nothing. A request still refused after `BUDGET_S` gets its 503 as before, and the client's own
back-off takes over.

`python -m orchestrator.prefect_server --host H --port P` (settings from the environment, as for
`prefect server start`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BUDGET_S = 5.0  # retried inside the server this long; then the client's back-off (2 s, 4 s…)
PAUSE_S = (0.02, 0.1)  # between attempts, random: writers that collided do not collide again

log = logging.getLogger("drflow.prefect_server")


class RetryUnavailable:
    """ASGI middleware: send a request answered 503 to the app again, for up to `budget_s`."""

    def __init__(self, app: ASGIApp, budget_s: float = BUDGET_S,
                 pause_s: tuple[float, float] = PAUSE_S) -> None:
        self.app = app
        self.budget_s = budget_s
        self.pause_s = pause_s
        self.retries = 0  # requests sent again (for tests and the log)
        self.passed_on = 0  # 503s that reached the client after the budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive)
        if more is not None:  # the client went away while sending: nothing to retry
            await self.app(scope, _replay(body, receive, more), send)
            return
        pristine = dict(scope)  # routing rewrites the scope it is given (a mount's path, the route)
        deadline = time.monotonic() + self.budget_s
        while True:
            retry = False

            async def send_or_drop(message: Message) -> None:
                nonlocal retry
                if message["type"] == "http.response.start":
                    retry = message["status"] == 503 and time.monotonic() < deadline
                    if message["status"] == 503 and not retry:
                        self.passed_on += 1
                        log.warning("%s %s still unavailable after %.1f s of retries; the "
                                    "client backs off", scope["method"], scope["path"],
                                    self.budget_s)
                if not retry:
                    await send(message)

            try:
                await self.app(dict(pristine), _replay(body, receive), send_or_drop)
            except Exception:
                # Starlette sends the error response, then re-raises for the server to log. A
                # dropped 503 is retried, not logged as a crash.
                if not retry:
                    raise
            if not retry:
                return
            self.retries += 1
            await asyncio.sleep(random.uniform(*self.pause_s))


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole request body; or what came so far and the message that ended it early."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive: Receive, end: Message | None = None) -> Receive:
    """A `receive` that hands the buffered body over once, then the client's own messages (a
    disconnect, when it comes)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if end is not None:
            return end
        return await receive()

    return again


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m orchestrator.prefect_server",
        description="Run Prefect's server (API, UI, services) as `prefect server start` does, "
                    "retrying inside the server the requests it answers 503 (SQLite busy). "
                    "Database and other settings come from the environment "
                    "(PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME…).")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    ap.add_argument("--port", type=int, default=4200, help="port to listen on (4200)")
    ap.add_argument("--no-services", action="store_true",
                    help="only the API (and UI), as `prefect server start --no-services`: one "
                         "of several API replicas, the background services running apart "
                         "(`prefect server services start`)")
    args = ap.parse_args(argv)
    if args.no_services:
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
        PREFECT_SERVER_LOGGING_LEVEL,
    )

    uvicorn.run(
        RetryUnavailable(create_app(final=True, webserver_only=args.no_services)),
        host=args.host, port=args.port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=str(PREFECT_SERVER_LOGGING_LEVEL.value()).lower(),
    )


if __name__ == "__main__":
    main()
