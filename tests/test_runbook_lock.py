"""The runbooks' per-group lock in etcd (flows/etcd_lock.py), on a real etcd with real holder
processes: one holder at a time; a holder killed at any moment frees it within its lease (3 s),
where a Prefect slot granted to a client killed before the answer reached it stayed taken
60-70 s; a holder frozen past its lease either takes it again (nobody took it) or learns it lost
it (another runbook did), before its next step."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drflow.etcd import Client
from flows import etcd_lock
from flows.etcd_lock import LOCK_TTL_S, etcd_exclusive, lock_key
from lab import etcd, procs

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent

# A holder process: says "taking", takes the lock, says so on stdout, then every 0.1 s prints
# whether it has lost it, until told to go (stdin closed).
HOLDER = """
import sys, threading, time
sys.path.insert(0, {repo!r})
from drflow.etcd import Client
from flows import etcd_lock
import prefect.runtime  # imported by the lock: before "taking", not while it waits
print("taking", flush=True)
with etcd_lock.etcd_exclusive(Client({url!r}, 1.0), {name!r}):
    print("held", flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.wait(0.1):
        print("lost:", etcd_lock.lost_reason(), flush=True)
"""


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="drflow-locktest-", dir="/tmp"))
    member = etcd.Member("lock-test", "127.0.0.1", [], client_port=procs.free_port(),
                         peer_port=procs.free_port())
    info = etcd.start_cluster(root / "etcd", [member])
    try:
        yield str(info["members"][0]["client_url"])
    finally:
        etcd.stop_cluster(info)
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _holder(url: str, name: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), url=url,
                                                                 name=name)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "taking"
    line = proc.stdout.readline()
    assert line.strip() == "held", line
    return proc


def _take_in_thread(url: str, name: str, out: dict[str, Any]) -> threading.Thread:
    def take() -> None:
        t = time.monotonic()
        with etcd_exclusive(Client(url, 1.0), name):
            out["waited_s"] = time.monotonic() - t
    th = threading.Thread(target=take, daemon=True)
    th.start()
    return th


def test_one_holder_at_a_time_and_the_next_takes_it_on_release(url: str) -> None:
    proc = _holder(url, "roles-a")
    out: dict[str, Any] = {}
    th = _take_in_thread(url, "roles-a", out)
    time.sleep(1.5)
    assert th.is_alive() and not out, "took a lock another process holds"
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)
    th.join(5)
    assert not th.is_alive() and out["waited_s"] >= 1.5
    assert Client(url).get(lock_key("roles-a")) is None  # released, not left to lapse


@pytest.mark.parametrize("moment", [0.0, 0.05, 0.5])
def test_a_holder_killed_at_any_moment_frees_the_lock_within_its_lease(url: str,
                                                                         moment: float) -> None:
    name = f"roles-kill-{moment}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), url=url,
                                                                 name=name)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    # Killed while it starts, takes or holds the lock: whatever it had done is undone by etcd.
    deadline = time.monotonic() + 30
    while Client(url).get(lock_key(name)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(moment)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed = time.monotonic()
    out: dict[str, Any] = {}
    th = _take_in_thread(url, name, out)
    th.join(LOCK_TTL_S + 5)
    assert not th.is_alive(), "the lock of a killed holder was not freed"
    assert time.monotonic() - killed <= LOCK_TTL_S + 1.5


def _lost_lines(proc: subprocess.Popen[str], n: int) -> list[str]:
    assert proc.stdout is not None
    return [proc.stdout.readline().strip() for _ in range(n)]


def test_a_frozen_holder_nobody_replaced_takes_it_again(url: str) -> None:
    proc = _holder(url, "roles-frozen-alone")
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(LOCK_TTL_S + 2)
    assert Client(url).get(lock_key("roles-frozen-alone")) is None  # the lease lapsed
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(2)
    assert Client(url).get(lock_key("roles-frozen-alone")) is not None  # taken again
    lines = _lost_lines(proc, 60)
    assert lines[-1] == "lost: None", lines[-5:]
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def test_a_frozen_holder_replaced_meanwhile_learns_it_lost_the_lock(url: str) -> None:
    proc = _holder(url, "roles-frozen")
    os.kill(proc.pid, signal.SIGSTOP)
    out: dict[str, Any] = {}
    release = threading.Event()

    def other_runbook() -> None:
        with etcd_exclusive(Client(url, 1.0), "roles-frozen"):
            out["held"] = True
            release.wait(30)
    th = threading.Thread(target=other_runbook, daemon=True)
    th.start()
    deadline = time.monotonic() + LOCK_TTL_S + 5
    while not out and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.get("held"), "the lock of a frozen holder was not free after its lease"
    # The other runbook may even have ended: the thawed holder must still not carry on.
    release.set()
    th.join(5)
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(LOCK_TTL_S)
    lines = _lost_lines(proc, 40)
    assert any("lapsed" in ln and "held by" in ln for ln in lines), lines[-5:]
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def test_lost_reason_is_none_outside_a_lock() -> None:
    assert etcd_lock.lost_reason() is None


def test_with_no_etcd_member_answering_the_lock_says_so_instead_of_waiting() -> None:
    """No majority (here: nobody listens) is when an attested failover must still run: the
    caller is told within `unreachable_s` and takes Prefect's limit instead (flows/locks.py)."""
    t = time.monotonic()
    with pytest.raises(etcd_lock.EtcdLockUnavailable, match="no member answered"), \
            etcd_exclusive(Client("http://127.0.0.1:9", 0.3), "roles-nowhere", unreachable_s=1.0):
        pass
    assert 1.0 <= time.monotonic() - t < 3.0


def test_with_every_member_hung_the_lock_gives_up_after_one_round_not_two() -> None:
    """Members that accept connections and never answer (SIGSTOPped etcd, a hung host) cost
    their timeout per request: giving up must not send a delete and a revoke into them too."""
    hung = [socket.create_server(("127.0.0.1", 0), backlog=16) for _ in range(3)]
    try:
        client = Client([f"http://127.0.0.1:{s.getsockname()[1]}" for s in hung], 0.3)
        t = time.monotonic()
        with pytest.raises(etcd_lock.EtcdLockUnavailable, match="no member answered"), \
                etcd_exclusive(client, "roles-hung", unreachable_s=0.5):
            pass
        took = time.monotonic() - t
    finally:
        for s in hung:
            s.close()
    # One grant tried on each member (3 x 0.3 s); a release would cost as much again.
    assert 0.9 <= took < 1.5, took


def test_a_waiter_frozen_past_its_lease_still_takes_the_lock_and_keeps_it(url: str) -> None:
    name = "roles-frozen-waiter"
    first = _holder(url, name)
    waiter = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), url=url,
                                                                   name=name)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert waiter.stdout is not None and waiter.stdout.readline().strip() == "taking"
    time.sleep(1.0)  # waiting, under its lease
    os.kill(waiter.pid, signal.SIGSTOP)
    time.sleep(LOCK_TTL_S + 2)
    os.kill(waiter.pid, signal.SIGCONT)
    time.sleep(1.5)  # its keeper has found the lease lapsed
    assert first.stdin is not None
    first.stdin.close()
    first.wait(10)
    assert waiter.stdout.readline().strip() == "held"
    lines = _lost_lines(waiter, 30)
    assert set(lines) == {"lost: None"}, lines[-3:]
    assert waiter.stdin is not None
    waiter.stdin.close()
    waiter.wait(10)


def test_a_holder_etcd_stops_confirming_queues_on_prefects_limit_with_whoever_took_it_then(
        prefect_api: str, tmp_path: Path) -> None:
    """etcd loses its majority while A holds the lock; B, finding etcd silent, takes Prefect's
    limit instead (an attested failover must run). A cannot prove its key any more: its next
    step takes Prefect's limit too, so it waits for B instead of acting beside it."""
    from flows.locks import back_unproven_locks, exclusive

    member = etcd.Member("lock-outage", "127.0.0.1", [], client_port=procs.free_port(),
                         peer_port=procs.free_port())
    info = etcd.start_cluster(tmp_path / "etcd", [member])
    url = str(info["members"][0]["client_url"])
    name = f"roles-outage-{os.getpid()}-{time.monotonic_ns()}"
    at: dict[str, Any] = {}
    a_held, etcd_gone = threading.Event(), threading.Event()

    def a() -> None:
        with exclusive(name, etcd=Client(url, 1.0)):
            a_held.set()
            etcd_gone.wait(30)
            time.sleep(LOCK_TTL_S + 1.0)  # its lease unconfirmed for longer than the TTL
            at["why"] = back_unproven_locks()  # what its next step does first
            at["a_next_step"] = time.monotonic()

    def b() -> None:
        with exclusive(name, etcd=Client(url, 1.0)):  # etcd silent: Prefect's limit
            at["b_in"] = time.monotonic()
            time.sleep(LOCK_TTL_S + 4.0)  # past the moment A's next step comes
            at["b_out"] = time.monotonic()

    ta = threading.Thread(target=a, daemon=True)
    ta.start()
    try:
        assert a_held.wait(30), "A did not take the lock in etcd"
    finally:
        etcd.stop_cluster(info)
    etcd_gone.set()
    tb = threading.Thread(target=b, daemon=True)
    tb.start()
    ta.join(60)
    tb.join(60)
    assert not ta.is_alive() and not tb.is_alive()
    assert at["b_in"] < at["b_out"] <= at["a_next_step"], at
    assert len(at["why"]) == 1 and "Prefect's concurrency limit" in at["why"][0], at["why"]
