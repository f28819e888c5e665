"""Durable, ordered outbox of health events and the thread that delivers them to the gateway.

Delivery policy (one event per request, in enqueue order):
- 2xx, or 409 (the receiver already has this event_id): delivered, removed from the outbox.
- 408, 429, 5xx, 3xx, network errors: kept; retried with exponential backoff and full jitter.
- 401, 403, 404, 405: kept and retried with backoff, logged as errors. These say the agent is
  misconfigured (secret, clock, URL, group) and every event would be refused alike: moving them
  aside would only empty the queue into a table nobody reads; they go once the config is fixed.
- Any other 4xx (400, 413, 422, ...): the receiver refuses this body for good. The event moves to
  the `dead_letter` table (logged at ERROR) so it cannot block the events behind it.
A new event wakes the sender at once, also in the middle of a backoff, so an incident is tried
immediately. A receiver may see an event more than once (acknowledged but not yet removed when
the agent died); it deduplicates by `event_id`.
"""

from __future__ import annotations

import fcntl
import http.client
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from drflow.events import HealthEvent
from drflow.secret_refs import SecretValue
from drflow.signing import sign_headers

log = logging.getLogger(__name__)

_MISCONFIGURED = (401, 403, 404, 405)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class PendingEvent:
    seq: int
    event_id: str
    body: bytes
    attempts: int


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    event_id: str
    body: bytes
    status: int
    reason: str


class Outbox:
    """SQLite outbox: `enqueue` commits (fsynced) before returning; events keep their order."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        # WAL + FULL: a committed event survives a killed process and a lost VM alike.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        self._listeners: list[threading.Event] = []

    def enqueue(self, event: HealthEvent) -> None:
        """Store `event`; its body is fixed now so every redelivery is byte-identical."""
        body = event.to_json()
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO outbox(event_id, body, enqueued_at) VALUES (?, ?, ?)",
                (str(event.event_id), body, time.time()),
            )
            listeners = list(self._listeners)
        for wake in listeners:
            wake.set()

    def peek(self) -> PendingEvent | None:
        """The oldest undelivered event."""
        with self._lock:
            row = self._conn.execute(
                "SELECT seq, event_id, body, attempts FROM outbox ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else PendingEvent(row[0], row[1], bytes(row[2]), row[3])

    def pending(self, limit: int = 1000) -> list[PendingEvent]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, event_id, body, attempts FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [PendingEvent(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def pending_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def delivered(self, seq: int) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def failed_attempt(self, seq: int, error: str) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error[:500], seq),
            )

    def dead_letter(self, seq: int, status: int, reason: str) -> None:
        """Move one event out of the queue for good (kept for an operator to inspect/requeue)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO dead_letter(seq, event_id, body, enqueued_at, "
                    "failed_at, status, reason) SELECT seq, event_id, body, enqueued_at, ?, ?, ? "
                    "FROM outbox WHERE seq = ?",
                    (time.time(), status, reason[:500], seq),
                )
                self._conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, event_id, body, status, reason FROM dead_letter ORDER BY seq"
            ).fetchall()
        return [DeadLetter(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def requeue_dead_letters(self) -> int:
        """Put every dead letter back at the end of the queue (after the receiver was fixed)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "INSERT OR IGNORE INTO outbox(event_id, body, enqueued_at) "
                    "SELECT event_id, body, enqueued_at FROM dead_letter ORDER BY seq"
                )
                self._conn.execute("DELETE FROM dead_letter")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            listeners = list(self._listeners)
        for wake in listeners:
            wake.set()
        return cur.rowcount

    def subscribe(self, wake: threading.Event) -> None:
        """`wake` is set whenever an event is enqueued (the sender waits on it)."""
        with self._lock:
            self._listeners.append(wake)

    def unsubscribe(self, wake: threading.Event) -> None:
        with self._lock:
            if wake in self._listeners:
                self._listeners.remove(wake)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class KeepAliveHttp:
    """One keep-alive connection to the receiver (stdlib: keeps the agent small)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL must be http(s)://host[:port]/path, got {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        reused = self._conn is not None
        try:
            return self._post(body, headers)
        except (ConnectionError, http.client.RemoteDisconnected):
            if not reused:
                raise
        # The receiver closed the idle keep-alive connection (uvicorn does after 5 s): that
        # says nothing about the receiver, so try once more on a fresh connection at once.
        return self._post(body, headers)

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout_s)
        try:
            self._conn.request("POST", self._path, body=body, headers={
                "Content-Type": "application/json", **headers})
            resp = self._conn.getresponse()
            text = resp.read().decode(errors="replace")[:2000]
            if resp.will_close:
                self.close()
            return resp.status, text
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SenderAlreadyRunning(RuntimeError):
    pass


class Sender:
    """Background thread delivering the outbox in order, one event per signed POST."""

    def __init__(self, outbox: Outbox, url: str, secret: SecretValue, *, timeout_s: float = 2.0,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 10.0,
                 also: Sequence[str] = ()) -> None:
        """`also`: the same receiver's other replicas (gateways at other sites). A receiver that
        cannot be reached (or answers 5xx) hands delivery to the next one, which keeps it until
        it fails in turn: a gateway lost with its site does not silence the agent."""
        self.outbox = outbox
        self._secret = secret
        self._urls = [url, *also]
        self._https = [KeepAliveHttp(u, timeout_s) for u in self._urls]
        self._current = 0
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._lockfile: IO[bytes] | None = None
        self._failures = 0
        self.delivered_count = 0
        self.dead_lettered_count = 0
        self.failed_attempts = 0

    def start(self) -> None:
        """Start delivering; refuses if another sender (any process) owns this outbox."""
        if self._thread is not None:
            return
        # One sender per outbox, or two would race and break the order.
        lock_path = self.outbox.path.with_name(self.outbox.path.name + ".sender.lock")
        fh = open(lock_path, "ab")  # noqa: SIM115 - held for the sender's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.close()
            raise SenderAlreadyRunning(
                f"another sender is delivering {self.outbox.path}; stop it first") from exc
        self._lockfile = fh
        self._stopping.clear()
        self.outbox.subscribe(self._wake)
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The receiver events go to now."""
        return self._urls[self._current]

    @property
    def _http(self) -> KeepAliveHttp:
        return self._https[self._current]

    def _next_receiver(self, why: str) -> None:
        if len(self._urls) < 2:
            return
        old = self.url
        self._current = (self._current + 1) % len(self._urls)
        log.warning("receiver %s failed (%s); delivering to %s from now on", old, why, self.url)

    def wake(self) -> None:
        """Try now (new events do this by themselves)."""
        self._wake.set()

    def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Deliver what is pending for up to `flush_timeout_s`, then stop the thread."""
        if self._thread is None:
            return
        self._flush_deadline = time.monotonic() + max(0.0, flush_timeout_s)
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=max(0.0, flush_timeout_s) + 5.0)
        self.outbox.unsubscribe(self._wake)
        for h in self._https:
            h.close()
        self._thread = None
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def _run(self) -> None:
        while True:
            if self._stopping.is_set() and (
                self._flush_deadline is None or time.monotonic() >= self._flush_deadline
            ):
                return
            self._wake.clear()
            try:
                item = self.outbox.peek()
            except sqlite3.Error as exc:
                log.error("outbox %s unreadable: %s", self.outbox.path, exc)
                self._sleep(self._backoff())
                continue
            if item is None:
                if self._stopping.is_set():
                    return
                self._wake.wait()
                continue
            try:
                delivered = self._deliver(item)
            except Exception:
                # Whatever it was, the thread must live on: without it nothing is ever sent.
                log.exception("unexpected error delivering event %s", item.event_id)
                delivered = False
            if delivered:
                self._failures = 0
            else:
                self._failures += 1
                self._sleep(self._backoff())

    def _deliver(self, item: PendingEvent) -> bool:
        """One attempt; True when the event left the queue (delivered or dead-lettered)."""
        headers = sign_headers(self._secret.get_secret_value().encode(), item.body)
        try:
            status, text = self._http.post(item.body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self._note_failure(item, f"{type(exc).__name__}: {exc}", level=logging.WARNING)
            self._next_receiver(f"{type(exc).__name__}: {exc}")
            return False
        if 200 <= status < 300 or status == 409:
            self.outbox.delivered(item.seq)
            self.delivered_count += 1
            return True
        if status in _MISCONFIGURED:
            self._note_failure(item, f"HTTP {status} (check the webhook URL, the shared secret "
                               f"and the clock): {text[:200]}", level=logging.ERROR)
            return False
        if 400 <= status < 500 and status not in (408, 429):
            log.error("receiver %s refused event %s for good (HTTP %s: %s); moved to the "
                      "dead-letter table of %s", self.url, item.event_id, status, text[:200],
                      self.outbox.path)
            self.outbox.dead_letter(item.seq, status, text)
            self.dead_lettered_count += 1
            return True
        self._note_failure(item, f"HTTP {status}: {text[:200]}", level=logging.WARNING)
        if status >= 500:
            self._next_receiver(f"HTTP {status}")
        return False

    def _note_failure(self, item: PendingEvent, error: str, level: int) -> None:
        self.failed_attempts += 1
        # Say it once per outage (and every 20th attempt), not on every retry.
        if self._failures == 0 or self._failures % 20 == 0:
            log.log(level, "delivering event %s to %s failed (attempt %d, %d pending): %s",
                    item.event_id, self.url, item.attempts + 1, self.outbox.pending_count(), error)
        try:
            self.outbox.failed_attempt(item.seq, error)
        except sqlite3.Error as exc:
            log.error("outbox %s not writable: %s", self.outbox.path, exc)

    def _backoff(self) -> float:
        cap = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(self._failures, 30))
        return random.uniform(0, cap)

    def _sleep(self, seconds: float) -> None:
        if self._stopping.is_set() and self._flush_deadline is not None:
            seconds = min(seconds, max(0.0, self._flush_deadline - time.monotonic()))
        # An enqueue ends the wait early: a fresh incident is tried at once.
        self._wake.wait(seconds)


__all__ = ["DeadLetter", "Outbox", "PendingEvent", "Sender", "SenderAlreadyRunning"]
