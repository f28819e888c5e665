"""The lab's etcd: one member per host (prod, DR, witness in the lab; one member on one machine),
started and watched for the lab; the client is drflow.etcd's.

etcd 3.4.23 (Debian `etcd-server`) facts this module relies on, checked here:
- The gateway answers under `/v3/…` and also `/v3beta/…` (3.4 keeps the 3.3 path; 3.5 drops it),
  not `/v3alpha/…`. Keys and values are base64; int64 fields (IDs, TTLs, revisions) come back as
  JSON strings and are accepted as strings or numbers; false and zero fields are left out
  (a failed txn has no "succeeded").
- `/v3/lease/keepalive` is a stream: one JSON request body gives one `{"result": …}` line. A lease
  that no longer exists is not an error there: the answer simply has no TTL.
- A lease's TTL is raised to at least 1.5 x election timeout, rounded up to whole seconds: with
  the 1000 ms used here a grant of 1 s gives 2 s; 2 s and more are kept as asked.
- A member that becomes leader extends every lease by the election timeout past its full TTL
  (the lessor's Promote): a lease whose holder is cut off together with the old leader outlives
  its TTL by the election plus one election timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from drflow.etcd import Client, EtcdError, _reason
from lab import procs

__all__ = [
    "Client",
    "EtcdError",
    "Member",
    "health",
    "member_health",
    "move_leader",
    "restart_member",
    "start_cluster",
    "stop_cluster",
]

CLIENT_PORT = 2379
PEER_PORT = 2380
# A LAN lab: round trips well under 1 ms. etcd's guidance is a heartbeat near the round trip and an
# election timeout of about 10 heartbeats; these are also 3.4's defaults, written out because the
# next issue's lease timing (lease_s 3 s) is argued from them: a lost leader is replaced within
# 1-2 s (randomised timeout in [1 s, 2 s)) and the minimum lease TTL is 2 s.
HEARTBEAT_MS = 100
ELECTION_MS = 1000

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # lab addresses: never a proxy


@dataclass(frozen=True)
class Member:
    """One etcd member: its name, its host's address, and the argv prefix that runs a program in
    the host's network namespace ([] on loopback)."""

    name: str
    address: str
    prefix: list[str] = field(default_factory=list)
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"


def etcd_path() -> str:
    path = shutil.which("etcd", path=f"{os.environ.get('PATH', '')}:/usr/bin:/usr/local/bin")
    if path is None:
        raise EtcdError("`etcd` is not installed: run scripts/bootstrap.sh as root "
                        "(or apt-get install etcd-server)")
    return path


def start_cluster(lab_dir: Path, members: list[Member], timeout: float = 30.0) -> dict[str, Any]:
    """Start one etcd per member in its host and wait until every member answers /health with a
    leader. Data in lab_dir/etcd/<name>, logs in lab_dir/logs/etcd-<name>.log. One member is the
    one-machine variant. Returns {"members": [...], "endpoints": [...]} for lab.json."""
    if not members:
        raise EtcdError("start_cluster needs at least one member")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise EtcdError(f"etcd member names must differ: {names}")
    binary = etcd_path()
    token = f"drflow-{secrets.token_hex(8)}"  # a fresh cluster: members of another lab never join it
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    started: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for m in members:
            data_dir = lab_dir / "etcd" / m.name
            if data_dir.exists() and any(data_dir.iterdir()):
                raise EtcdError(f"{data_dir} already holds etcd data; a new cluster needs it empty: "
                                "remove it or use a new lab directory")
            data_dir.mkdir(parents=True, exist_ok=True)
            data_dir.chmod(0o700)  # etcd warns (3.4) or refuses (3.5) otherwise
            log = lab_dir / "logs" / f"etcd-{m.name}.log"
            argv = [
                *m.prefix, binary, "--name", m.name, "--data-dir", str(data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
                # A member cut off for a while comes back with a higher term; without pre-vote its
                # first message would depose a healthy leader and cost the cluster an election.
                "--pre-vote",
                "--logger", "zap", "--log-outputs", "stderr",
            ]
            proc = procs.spawn(argv, log)
            started.append({"name": m.name, "client_url": m.client_url, "peer_url": m.peer_url,
                            "pid": proc.pid, "log": str(log), "data_dir": str(data_dir),
                            "argv": argv, "proc": proc})
        _wait_healthy(started, t0 + timeout, timeout)
    except BaseException:
        stop_cluster({"members": started})
        raise
    out = [{k: v for k, v in s.items() if k != "proc"} for s in started]
    return {"members": out, "endpoints": [m.client_url for m in members], "token": token,
            "started_in_s": round(time.monotonic() - t0, 2)}


def _wait_healthy(started: list[dict[str, Any]], deadline: float, timeout: float) -> None:
    waiting = {s["name"]: s for s in started}
    last: dict[str, str] = {}
    while waiting:
        for name, s in list(waiting.items()):
            if s["proc"].poll() is not None:
                raise EtcdError(f"etcd member {name} exited with code {s['proc'].returncode}"
                                f"{_tail(Path(s['log']))}")
            ok, why = member_health(s["client_url"], 0.5)
            if ok:
                del waiting[name]
            last[name] = why
        if not waiting:
            return
        if time.monotonic() > deadline:
            detail = "; ".join(f"{n}: {last.get(n, 'no answer')}" for n in waiting)
            first = next(iter(waiting.values()))
            raise EtcdError(f"etcd did not elect a leader within {timeout:.0f} s ({detail})"
                            f"{_tail(Path(first['log']))}")
        time.sleep(0.05)


def _tail(log: Path, lines: int = 10) -> str:
    if not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n" + "\n".join(text)


def member_health(client_url: str, timeout: float = 1.0) -> tuple[bool, str]:
    """Does this member answer /health as healthy (it knows a leader, no alarm)?"""
    try:
        with _OPENER.open(f"{client_url}/health", timeout=timeout) as resp:
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:  # 503 with a body when unhealthy
        with contextlib.suppress(ValueError, OSError):
            body = json.loads(e.read() or b"{}")
            return False, f"unhealthy ({body.get('reason') or body})"
        return False, f"answered {e.code}"
    except (OSError, ValueError) as e:
        return False, f"no answer ({_reason(e)})"
    if str(body.get("health")) == "true":
        return True, "healthy"
    return False, f"unhealthy ({body.get('reason') or body})"


def health(info: dict[str, Any], timeout: float = 1.0) -> tuple[bool, str]:
    """(healthy, detail) for `lab status`: every member answers /health and they agree on a leader."""
    members = info.get("members") or []
    if not members:
        return False, "not started"

    def probe(m: dict[str, Any]) -> tuple[str, bool, str, dict[str, Any] | None]:
        pid = m.get("pid")
        if pid and not procs.pid_alive(int(pid)):
            return m["name"], False, f"pid {pid} is not running", None
        ok, why = member_health(m["client_url"], timeout)
        try:
            st: dict[str, Any] | None = Client(m["client_url"], timeout).status()
        except EtcdError:
            st = None
        return m["name"], ok, why, st

    with ThreadPoolExecutor(max_workers=len(members)) as pool:
        results = list(pool.map(probe, members))
    ids = {str(st["header"]["member_id"]): name for name, _, _, st in results if st}
    leaders = {str(st.get("leader", "0")) for _, _, _, st in results if st}
    up = [name for name, ok, _, _ in results if ok]
    down = [f"{name}: {why}" for name, ok, why, _ in results if not ok]
    leader = ", ".join(sorted(ids.get(lid, f"member {int(lid):x}") for lid in leaders if lid != "0"))
    detail = f"leader {leader or 'none'}, {len(up)}/{len(members)} members up"
    if down:
        detail += f" ({'; '.join(down)})"
    return len(up) == len(members) and len(leaders) == 1 and bool(leader), detail


def restart_member(member: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Start a stopped member again with its data (the same data dir, `--initial-cluster-state
    existing`), as a rebooted etcd host does; returns its entry with the new pid once it
    listens (it may still be looking for a leader when the others are down too: not waited
    for)."""
    if procs.pid_alive(int(member.get("pid") or 0)):
        with contextlib.suppress(psutil.Error):
            if psutil.Process(int(member["pid"])).name() == "etcd":
                return member
    argv = list(member["argv"])
    argv[argv.index("--initial-cluster-state") + 1] = "existing"
    proc = procs.spawn(argv, Path(member["log"]))
    url = urlsplit(member["client_url"])
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise EtcdError(f"etcd member {member['name']} exited with code {proc.returncode} "
                            f"on restart{_tail(Path(member['log']))}")
        # Listening is enough: with the other members still down its /health (a quorum read)
        # cannot answer, and the heal restarts them after this one.
        try:
            socket.create_connection((url.hostname or "", url.port or CLIENT_PORT), 0.3).close()
            break
        except OSError as exc:
            why = str(exc)
        if time.monotonic() > deadline:
            raise EtcdError(f"etcd member {member['name']} did not listen within {timeout:.0f} s "
                            f"of its restart ({why}){_tail(Path(member['log']))}")
        time.sleep(0.05)
    return {**member, "pid": proc.pid, "argv": argv}


def move_leader(info: dict[str, Any], name: str, timeout: float = 5.0) -> float:
    """Make member `name` the leader (move_leader sent to the current leader); returns the seconds
    it took. Already leader: nothing to do."""
    t0 = time.monotonic()
    urls = {m["name"]: m["client_url"] for m in info["members"]}
    ids = {int(Client(u, timeout).status()["header"]["member_id"]): u for u in urls.values()}
    target = next(i for i, u in ids.items() if u == urls[name])
    while True:
        leader = int(Client(urls[name], timeout).status().get("leader", 0))
        if leader == target:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise EtcdError(f"etcd leadership did not move to {name} within {timeout:.0f} s")
        if leader in ids:
            with contextlib.suppress(EtcdError):  # a leader change meanwhile: read it again
                Client(ids[leader], timeout).move_leader(target)
        time.sleep(0.05)


def stop_cluster(info: dict[str, Any]) -> None:
    """Stop every member (SIGTERM, then SIGKILL); a pid that is no longer an etcd is left alone."""
    for m in info.get("members") or []:
        pid = int(m.get("pid") or 0)
        if not pid:
            continue
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).name() != "etcd":
                continue
            procs.stop_tree(pid, timeout=5)
        proc = m.get("proc")
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
