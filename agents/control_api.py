"""The agent's signed control endpoint for the orchestrator (its client: drflow.control).

`POST /v1/control` with `{"verb": …, "args": {…}, "nonce": "<uuid>"}`. The signature binds the
request to this agent and this verb (`drflow.signing.control_signature`: HMAC-SHA256 of agent id,
verb, timestamp and body, 300 s clock window) and uses this agent's own secret, derived from the
orchestrator's master secret (`drflow.signing.control_secret`): a request captured for one agent,
or the secret of one VM, commands no other. Only the driver's fixed verbs exist; their arguments
are validated before anything runs. Refusals change nothing (but remember the nonce):

    401  unsigned, bad signature (another agent's, another verb's), timestamp outside the window,
         or a nonce already used (replay)
    400  malformed request: Content-Length not ASCII digits, body not UTF-8 JSON, nested deeper
         than 16, duplicate keys, nonce not a UUID, unknown verb, bad arguments
    404/405/411/413  other path, other method, no Content-Length, body over 64 KiB
    409  the driver refused the verb in the instance's current state (the message says why)
    500  the driver failed unexpectedly (details in the agent's log)

Answers are JSON `{"ok", "agent_id", "verb", "nonce", "result" | "error"}` and are signed the same
way (this agent, the verb echoed), echoing the nonce, so the caller knows the agent answered this
very request.
Nonces are kept for twice the window: in SQLite when `nonce_db` is given (a restarted agent still
refuses replays), else in memory. stdlib only: the agent stays small.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agents.drivers import ArgsError, Driver, VerbError, args_of
from drflow.control import CONTROL_PATH
from drflow.secret_refs import SecretValue
from drflow.signing import (
    DEFAULT_WINDOW_S,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    sign_control_headers,
    verify_control,
)

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_DEPTH = 16  # the deepest real request is 3 levels; json.loads recurses without a bound


class NonceStore:
    """Nonces seen within the replay window; `claim` is atomic across threads."""

    def __init__(self, path: Path | None = None, ttl_s: float = 2 * DEFAULT_WINDOW_S) -> None:
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None,
                                     check_same_thread=False)
        if path:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS nonces "
                           "(nonce TEXT PRIMARY KEY, expires REAL NOT NULL)")
        self._conn.execute("CREATE INDEX IF NOT EXISTS nonces_expires ON nonces(expires)")

    def claim(self, nonce: str, now: float | None = None) -> bool:
        """True the first time `nonce` is seen within the window, False for a replay."""
        now = time.time() if now is None else now
        with self._lock:
            self._conn.execute("DELETE FROM nonces WHERE expires < ?", (now,))
            cur = self._conn.execute("INSERT OR IGNORE INTO nonces VALUES (?, ?)",
                                     (nonce, now + self._ttl_s))
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Refusal(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], family: socket.AddressFamily, secret: SecretValue,
                 driver: Driver, agent_id: str, nonces: NonceStore) -> None:
        self.address_family = family
        self.secret = secret
        self.driver = driver
        self.agent_id = agent_id
        self.nonces = nonces
        super().__init__(addr, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that stalls mid-request is dropped
    server_version = "drflow-agent"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._answer(405, {"ok": False, "error": f"use POST {CONTROL_PATH}"}, None)

    do_PUT = do_DELETE = do_PATCH = do_GET

    def do_POST(self) -> None:
        try:
            self._post()
        except Exception as exc:
            # Whatever a hostile request trips over is still answered, and logged as one line.
            log.warning("control request from %s malformed (%s)", self.client_address[0],
                        type(exc).__name__)
            with contextlib.suppress(OSError):
                self._answer(400, {"ok": False, "verb": None, "error": "malformed request"},
                             None)

    def _post(self) -> None:
        nonce: str | None = None
        verb_name: str | None = None
        try:
            if self.path.split("?", 1)[0] != CONTROL_PATH:
                raise _Refusal(404, f"no such endpoint; use POST {CONTROL_PATH}")
            body = self._read_body()
            if body is None:
                return  # the client hung up mid-body: nobody to answer
            verb_name, raw_args, parsed_nonce = _parse(body)
            try:
                verify_control(self.server.secret.get_secret_value().encode(),
                               self.server.agent_id, verb_name,
                               self.headers.get(TIMESTAMP_HEADER),
                               self.headers.get(SIGNATURE_HEADER), body)
            except SignatureError as exc:
                raise _Refusal(401, f"not authenticated: {exc}") from None
            nonce = parsed_nonce
            if not self.server.nonces.claim(nonce):
                raise _Refusal(401, f"nonce {nonce} was already used: replay refused")
            verb = self.server.driver.verbs().get(verb_name)
            if verb is None:
                known = ", ".join(sorted(self.server.driver.verbs()))
                raise _Refusal(400, f"unknown verb {verb_name!r} for "
                                    f"{self.server.driver.application}; known: {known}")
            try:
                args = args_of(verb.args, raw_args)
            except ArgsError as exc:
                raise _Refusal(400, f"bad arguments for {verb_name}: {exc}") from None
            log.info("control verb %s %s from %s (nonce %s)", verb_name, raw_args,
                     self.client_address[0], nonce)
            try:
                result = verb.run(args)
            except VerbError as exc:
                raise _Refusal(409, f"{verb_name} refused: {exc}") from None
            except ArgsError as exc:
                raise _Refusal(400, f"bad arguments for {verb_name}: {exc}") from None
            except Exception as exc:
                log.exception("control verb %s failed", verb_name)
                raise _Refusal(500, f"{verb_name} failed: {type(exc).__name__}; see the agent "
                                    "log") from None
            log.info("control verb %s done: %s", verb_name, result)
            self._answer(200, {"ok": True, "verb": verb_name, "result": result}, nonce)
        except _Refusal as r:
            log.warning("control request from %s refused (%s): %s", self.client_address[0],
                        r.status, r.error)
            self._answer(r.status, {"ok": False, "verb": verb_name, "error": r.error}, nonce)

    def _read_body(self) -> bytes | None:
        """The body, or None when the client hung up before sending all of it."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _Refusal(411, "Content-Length required (no Transfer-Encoding)")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise _Refusal(411, "Content-Length required")
        length = lengths[0].strip()
        # `str.isdigit` and `int` accept "²", "٣" and "1_0": only ASCII digits are a length.
        if len(lengths) > 1 or not (length.isascii() and length.isdigit()) or len(length) > 9:
            raise _Refusal(400, "Content-Length must be one number in ASCII digits")
        if int(length) > MAX_BODY:
            raise _Refusal(413, f"body over {MAX_BODY} bytes")
        body = self.rfile.read(int(length))
        return body if len(body) == int(length) else None

    def _answer(self, status: int, payload: dict[str, Any], nonce: str | None) -> None:
        payload = {**payload, "agent_id": self.server.agent_id, "nonce": nonce}
        body = json.dumps(payload, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        headers = sign_control_headers(self.server.secret.get_secret_value().encode(),
                                       self.server.agent_id, str(payload.get("verb") or ""), body)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


def _parse(body: bytes) -> tuple[str, dict[str, Any], str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refusal(400, "body is not UTF-8") from None
    if _depth(text) > MAX_DEPTH:
        raise _Refusal(400, f"body is nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _Refusal(400, "body is not JSON (or has duplicate keys, NaN or Infinity)") from None
    if not isinstance(data, dict) or set(data) - {"verb", "args", "nonce"}:
        raise _Refusal(400, 'body must be {"verb": str, "args": {...}, "nonce": uuid}')
    verb, args, nonce = data.get("verb"), data.get("args", {}), data.get("nonce")
    if not isinstance(verb, str) or not isinstance(args, dict):
        raise _Refusal(400, '"verb" must be a string and "args" an object')
    if not (verb.isascii() and verb.replace("_", "").isalpha() and len(verb) <= 32):
        raise _Refusal(400, '"verb" must be a verb name (letters and _, at most 32)')
    try:
        nonce = str(uuid.UUID(str(nonce)))
    except ValueError:
        raise _Refusal(400, '"nonce" must be a UUID, new for every request') from None
    return verb, args, nonce


def _depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON `text` (brackets inside strings ignored)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class ControlServer:
    """A running control endpoint; `stop()` ends it."""

    def __init__(self, server: _Server, nonces: NonceStore) -> None:
        self._server = server
        self._nonces = nonces
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control-api", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # Not serve_forever(poll_interval): it wakes every interval only to look for a shutdown
        # request (twice a second, for an API idle nearly all the time). This thread sleeps
        # until a connection comes; stop() wakes it by shutting the listening socket down.
        while not self._stopping.is_set():
            self._server.handle_request()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{CONTROL_PATH}"

    def stop(self) -> None:
        self._stopping.set()
        # On Linux, shutting a listening socket down wakes the thread blocked on it at once.
        with contextlib.suppress(OSError):
            self._server.socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._server.server_close()
        self._nonces.close()


def serve(listen: str, secret: SecretValue, driver: Driver, *, agent_id: str,
          nonce_db: Path | None = None) -> ControlServer:
    """Serve the control API on `listen` ("host:port"; port 0 picks a free one)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"listen must be host:port (e.g. 127.0.0.1:8471), got {listen!r}")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    nonces = NonceStore(nonce_db)
    try:
        server = _Server((host, int(port_text)), family, secret, driver, agent_id, nonces)
    except OSError as exc:
        nonces.close()
        raise OSError(f"cannot listen on {listen} for the control API: {exc}") from exc
    handle = ControlServer(server, nonces)
    log.info("control API for %s listening on %s", driver.application, handle.url)
    return handle


__all__ = ["CONTROL_PATH", "ControlServer", "NonceStore", "serve"]
