"""The gateway's HTTP server: uvicorn (h11) with header and body read timeouts.

uvicorn times out only idle keep-alive connections: a client that sends its request line,
headers or body one byte a second holds a connection (and a task) for as long as it likes. Here a
request's headers must arrive within `header_timeout_s` of the connection being ready for them
(h11 protocol below) and its body within `body_timeout_s` of the request's start (ASGI
middleware below); past either the client gets 408 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from orchestrator.gateway.intake import BodyTimeout
from orchestrator.gateway.settings import GatewaySettings

log = logging.getLogger("drflow.gateway.http")

_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"connection: close\r\ncontent-length: 36\r\n\r\nrequest headers not received in time")
# Request line and headers together (h11's own default is 16 KiB).
MAX_HEADER_BYTES = 16 * 1024
# How long a refused connection's remaining input is read and dropped before closing.
LINGER_S = 2.0


def _refusal(status: int, phrase: str, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail, "reason": reason}).encode()
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


_431 = _refusal(431, "Request Header Fields Too Large", "oversized",
                f"request line and headers exceed {MAX_HEADER_BYTES} bytes")
_400 = _refusal(400, "Bad Request", "malformed", "not a valid HTTP/1.1 request")


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive in time."""

    header_timeout_s: float = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a refused request: read and dropped
        if self.conn.their_state is h11.IDLE:
            # The limit holds however the head arrives: h11 checks it only while the head is
            # incomplete, so a head that arrives whole (one loopback segment) would pass.
            head = self.conn.trailing_data[0] + data
            end = head.find(b"\r\n\r\n")
            if (end + 4 if end >= 0 else len(head)) > MAX_HEADER_BYTES:
                log.warning("refused the request of %s: request line and headers over %d bytes",
                            self._who(), MAX_HEADER_BYTES)
                self._refuse(_431)
                return
        super().data_received(data)

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"

    def send_400_response(self, msg: str) -> None:
        # h11 found the request malformed (uvicorn has logged it).
        self._refuse(_400)

    def _refuse(self, response: bytes) -> None:
        """Answer, then linger: a socket closed with unread input resets the connection, and a
        client still sending may lose the answer before reading it (the usual case across a
        real network, where a large request arrives in many segments)."""
        self._disarm()
        self._lingering = True
        self.transport.write(response)
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except OSError:  # the client is gone already (reset): nobody to linger for
            self.transport.close()
            return
        self.loop.call_later(LINGER_S, self.transport.close)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        # Armed first: a pipelined request started inside (handle_events) disarms it again.
        self._arm()
        super().on_response_complete()
        if self.transport.is_closing():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.transport.close()  # idle, not a byte of a request yet: nobody to answer
            return
        log.warning("closed the connection of %s: request headers not received within %g s",
                    self._who(), self.header_timeout_s)
        self._refuse(_408)


class BodyReadTimeout:
    """ASGI middleware: the whole request body must arrive within `timeout_s` of the request.

    Past it `receive()` raises BodyTimeout, which the endpoints' body reader turns into a 408
    with `Connection: close`. Messages after the body (a disconnect) are not timed."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyTimeout(f"body not received within {self.timeout_s:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def server_config(app: ASGIApp, settings: GatewaySettings, host: str, port: int,
                  log_level: str = "warning", **kwargs: Any) -> uvicorn.Config:
    """uvicorn's Config for the gateway app: h11 with the header timeout, keep-alive and header
    size limits from `settings` (the body timeout is `create_app`'s middleware)."""
    protocol = type("GatewayH11", (HeaderTimeoutH11,),
                    {"header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        http=protocol, timeout_keep_alive=max(1, round(settings.keep_alive_s)),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs,
    )


__all__ = ["MAX_HEADER_BYTES", "BodyReadTimeout", "HeaderTimeoutH11", "server_config"]
