"""The agent's durable outbox against a real HTTP receiver that checks every signature.

Also runnable as `python -m tests.test_agent_outbox child …`: the sending agent process that the
outage test starts, kills with SIGKILL and starts again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from agents.outbox import Outbox, Sender, SenderAlreadyRunning
from drflow.events import EventKind, HealthEvent
from drflow.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify

SECRET = "outbox-test-secret-" + uuid.uuid4().hex
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], receiver: Receiver) -> None:
        self.receiver = receiver
        self.open_socks: set[socket.socket] = set()
        super().__init__(addr, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # Like uvicorn: no Nagle delay on the two writes of a response.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.open_socks.add(sock)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real gateway
    server: _Server

    def setup(self) -> None:
        super().setup()
        # With a timeout, an idle keep-alive connection is closed, as uvicorn does.
        self.connection.settimeout(self.server.receiver.idle_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.server.receiver.handle(
            body, self.headers.get(TIMESTAMP_HEADER), self.headers.get(SIGNATURE_HEADER))
        if status is None:  # fault: the event was taken, the answer is lost
            self.close_connection = True
            return
        reply = json.dumps({"status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


class Receiver:
    """A webhook receiver like the gateway's: verifies, drops duplicate event_ids (409)."""

    def __init__(self, port: int, secret: str = SECRET) -> None:
        self.port = port
        self.secret = secret.encode()
        self.cond = threading.Condition()
        self.events: list[dict[str, Any]] = []  # first receipt of each event_id, in order
        self.arrival: dict[str, float] = {}
        self.seen: set[str] = set()
        self.redeliveries = 0
        self.bad_signatures = 0
        self.lose_answer_every = 0  # record every n-th new event, then drop the connection
        self.forced: dict[str, list[int]] = {}  # event_id -> statuses to answer first
        self.idle_timeout: float | None = None
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/events"

    def start(self) -> None:
        self._server = _Server(("127.0.0.1", self.port), self)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        """Go down hard: refuse new connections and cut the open keep-alive ones."""
        srv, self._server = self._server, None
        if srv is None:
            return
        srv.shutdown()
        srv.server_close()
        for sock in list(srv.open_socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle(self, body: bytes, ts: str | None, sig: str | None) -> int | None:
        try:
            verify(self.secret, ts, sig, body)
        except SignatureError:
            with self.cond:
                self.bad_signatures += 1
            return 401
        event = HealthEvent.from_json(body)
        eid = str(event.event_id)
        with self.cond:
            if self.forced.get(eid):
                return self.forced[eid].pop(0)
            if eid in self.seen:
                self.redeliveries += 1
                return 409
            self.seen.add(eid)
            self.events.append(json.loads(body))
            self.arrival[eid] = time.perf_counter()
            self.cond.notify_all()
            if self.lose_answer_every and len(self.events) % self.lose_answer_every == 0:
                return None
        return 202

    def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def seqs(self) -> list[int]:
        with self.cond:
            return [int(e["details"]["seq"]) for e in self.events]


def event(seq: int, agent_id: str = "agent-test") -> HealthEvent:
    kind = EventKind.HEARTBEAT if seq % 5 else EventKind.RESOURCE_FAILED
    return HealthEvent(agent_id=agent_id, group="g1", kind=kind, resource="pg",
                       details={"seq": seq})


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    r.start()
    try:
        yield r
    finally:
        r.stop()


def test_events_arrive_in_order_within_milliseconds(tmp_path: Path, receiver: Receiver) -> None:
    receiver.idle_timeout = 0.2  # like uvicorn's keep-alive timeout, only shorter
    outbox = Outbox(tmp_path / "outbox.db")
    sender = Sender(outbox, receiver.url, SecretStr(SECRET))
    sender.start()
    try:
        latencies = []
        after_idle = []
        for seq in range(60):
            ev = event(seq)
            if seq % 10 == 9:
                time.sleep(0.3)  # the receiver has dropped the idle connection by now
                after_idle.append(seq)
            t0 = time.perf_counter()
            outbox.enqueue(ev)
            eid = str(ev.event_id)
            assert receiver.wait_for(lambda: eid in receiver.arrival, 5)  # noqa: B023
            latencies.append((receiver.arrival[eid] - t0) * 1000)
        p50 = statistics.median(latencies)
        p95 = sorted(latencies)[int(len(latencies) * 0.95)]
        idle_max = max(latencies[i] for i in after_idle)
        print(f"enqueue->delivery on loopback: p50 {p50:.2f} ms, p95 {p95:.2f} ms, "
              f"max after an idle connection was closed {idle_max:.2f} ms")
        assert p50 < 20, latencies
        assert sender.failed_attempts == 0  # a closed idle connection is no failure, no backoff
        assert receiver.seqs() == list(range(60))
        assert receiver.bad_signatures == 0
        # Removal follows the acknowledgement closely.
        deadline = time.monotonic() + 2
        while outbox.pending_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outbox.pending_count() == 0
    finally:
        sender.stop()
        outbox.close()


def test_refusals_follow_the_policy(tmp_path: Path, receiver: Receiver) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    events = [event(i) for i in range(6)]
    ids = [str(e.event_id) for e in events]
    receiver.forced = {
        ids[1]: [400],            # refused for good -> dead letter, queue moves on
        ids[2]: [503, 503],  # server trouble -> retried
        ids[3]: [429],            # slow down -> retried
    }
    with receiver.cond:  # the receiver already has event 4: it answers 409, which counts as sent
        receiver.seen.add(ids[4])
    for e in events:
        outbox.enqueue(e)
    sender = Sender(outbox, receiver.url, SecretStr(SECRET), backoff_initial_s=0.05)
    sender.start()
    try:
        assert receiver.wait_for(lambda: len(receiver.events) == 4, 10), receiver.seqs()
        deadline = time.monotonic() + 2
        while outbox.pending_count() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sender.stop()
    assert receiver.seqs() == [0, 2, 3, 5]
    assert outbox.pending_count() == 0
    dead = outbox.dead_letters()
    assert [(d.event_id, d.status) for d in dead] == [(ids[1], 400)]
    assert json.loads(dead[0].body)["details"]["seq"] == 1
    # An operator can send dead letters again once the receiver is fixed.
    assert outbox.requeue_dead_letters() == 1
    assert outbox.dead_letters() == []
    sender = Sender(outbox, receiver.url, SecretStr(SECRET))
    sender.start()
    try:
        assert receiver.wait_for(lambda: len(receiver.events) == 5, 5)
    finally:
        sender.stop()
    assert receiver.seqs()[-1] == 1
    outbox.close()


def test_wrong_secret_keeps_events_queued(tmp_path: Path, receiver: Receiver) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    for i in range(3):
        outbox.enqueue(event(i))
    sender = Sender(outbox, receiver.url, SecretStr("not-the-secret"), backoff_initial_s=0.05,
                    backoff_max_s=0.2)
    sender.start()
    try:
        assert receiver.wait_for(lambda: receiver.bad_signatures >= 3, 5)
    finally:
        sender.stop(flush_timeout_s=0)
    # 401 is about the request, not the event: nothing is dead-lettered or lost.
    assert outbox.pending_count() == 3
    assert outbox.dead_letters() == []
    assert receiver.events == []
    sender = Sender(outbox, receiver.url, SecretStr(SECRET))
    sender.start()
    try:
        assert receiver.wait_for(lambda: len(receiver.events) == 3, 5)
    finally:
        sender.stop()
    assert receiver.seqs() == [0, 1, 2]
    outbox.close()


def test_one_sender_per_outbox(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    first = Sender(outbox, "http://127.0.0.1:9/", SecretStr(SECRET))
    first.start()
    try:
        with pytest.raises(SenderAlreadyRunning):
            Sender(outbox, "http://127.0.0.1:9/", SecretStr(SECRET)).start()
    finally:
        first.stop(flush_timeout_s=0)
    second = Sender(outbox, "http://127.0.0.1:9/", SecretStr(SECRET))
    second.start()
    second.stop(flush_timeout_s=0)
    outbox.close()


def test_stop_flushes_pending_events(tmp_path: Path, receiver: Receiver) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    sender = Sender(outbox, receiver.url, SecretStr(SECRET))
    sender.start()
    for i in range(20):
        outbox.enqueue(event(i))
    sender.stop(flush_timeout_s=5)
    assert outbox.pending_count() == 0
    assert receiver.seqs() == list(range(20))
    outbox.close()


class _Child:
    """The sending agent process; its stdout says which events it has committed."""

    def __init__(self, outbox: Path, url: str, start: int, count: int, log: Path) -> None:
        self.committed: list[int] = []
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_agent_outbox", "child", "--outbox", str(outbox),
             "--url", url, "--start", str(start), "--count", str(count)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, "DRFLOW_TEST_SECRET": SECRET},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.committed.append(int(line))

    def wait_committed(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.committed) < n:
            assert self.proc.poll() is None, "sending agent died early (see its log)"
            assert time.monotonic() < deadline, f"only {len(self.committed)} of {n} enqueued"
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


def test_outage_of_60s_with_agent_restart_loses_nothing(tmp_path: Path) -> None:
    receiver = Receiver(free_port())
    receiver.lose_answer_every = 7  # forces redeliveries the receiver must drop
    receiver.start()
    db = tmp_path / "outbox.db"
    children: list[_Child] = []
    try:
        a = _Child(db, receiver.url, 0, 100_000, tmp_path / "agent-a.log")
        children.append(a)
        assert receiver.wait_for(lambda: len(receiver.events) >= 20, 15), "nothing delivered"
        receiver.stop()
        down_at = time.monotonic()
        before_outage = len(receiver.events)

        # Kill -9 the agent while it is enqueueing, well into the outage.
        a.wait_committed(before_outage + 90, 30)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        a_printed = len(a.committed)

        b = _Child(db, receiver.url, 100_000, 60, tmp_path / "agent-b.log")
        children.append(b)
        b.wait_committed(60, 30)

        time.sleep(max(0.0, down_at + 60 - time.monotonic()))
        receiver.start()
        up_at = time.monotonic()
        assert receiver.wait_for(lambda: 100_059 in set(receiver.seqs()), 30), (
            f"not all delivered; got {len(receiver.events)}")
        drain_s = time.monotonic() - up_at

        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(15) == 0
    finally:
        for c in children:
            c.close()
        receiver.stop()

    seqs = receiver.seqs()
    a_seqs = [s for s in seqs if s < 100_000]
    # Everything A committed (at most one more than it lived to print) arrives, in order, once.
    assert a_seqs == list(range(len(a_seqs)))
    assert a_printed <= len(a_seqs) <= a_printed + 1
    assert seqs == a_seqs + list(range(100_000, 100_060))
    assert len(seqs) - before_outage >= 100
    assert receiver.redeliveries > 0
    assert receiver.bad_signatures == 0
    leftover = Outbox(db)
    assert leftover.pending_count() == 0
    assert leftover.dead_letters() == []
    leftover.close()
    print(f"queued during the outage: {len(seqs) - before_outage}; drained {drain_s:.1f} s after "
          f"the receiver returned; redeliveries dropped: {receiver.redeliveries}")


def _child(argv: list[str]) -> None:
    """Enqueue `count` events (10/s) from `start`, deliver, exit cleanly on SIGTERM."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("--outbox", type=Path, required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    outbox = Outbox(args.outbox)
    sender = Sender(outbox, args.url, SecretStr(os.environ["DRFLOW_TEST_SECRET"]),
                    backoff_max_s=5.0)
    sender.start()
    for seq in range(args.start, args.start + args.count):
        if stop.is_set():
            break
        outbox.enqueue(event(seq))
        print(seq, flush=True)
        stop.wait(0.1)
    stop.wait()
    sender.stop(flush_timeout_s=2)
    outbox.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        _child(sys.argv[2:])


def test_a_silent_gateway_hands_delivery_to_the_next_replica(tmp_path: Path,
                                                              receiver: Receiver) -> None:
    """The first gateway takes the connection and never answers (its site is gone): the events
    go to the replica named in `also`, in order, and stay with it."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes handshakes; nothing ever reads or answers
    first = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/events"
    outbox = Outbox(tmp_path / "outbox.db")
    for i in range(1, 6):
        outbox.enqueue(event(i))
    sender = Sender(outbox, first, SecretStr(SECRET), timeout_s=0.5, backoff_initial_s=0.05,
                    also=[receiver.url])
    t0 = time.monotonic()
    sender.start()
    try:
        assert receiver.wait_for(lambda: len(receiver.events) == 5, 10), receiver.seqs()
        took = time.monotonic() - t0
        outbox.enqueue(event(6))
        assert receiver.wait_for(lambda: len(receiver.events) == 6, 2), receiver.seqs()
    finally:
        sender.stop()
        silent.close()
    assert receiver.seqs() == [1, 2, 3, 4, 5, 6]
    assert sender.url == receiver.url
    assert took < 2.0, took  # one timeout on the silent gateway, then the replica
    outbox.close()
