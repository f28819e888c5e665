"""Application-like PostgreSQL writers for the lab, and what their records show.

A writer inserts unique ids, one at a time, and records which node (host, port) acknowledged each
one and when, and every error. Its connection settings are a parameter:

- `FOLLOW`: what makes an application follow a failover within the RTO. A connect to a silent
  address gives up after 2 s (`connect_timeout`), an established connection whose peer went
  silent after 3 s of unacknowledged data (`tcp_user_timeout`) or ~3 s of unanswered keepalives
  (`keepalives_idle=1`, `_interval=1`, `_count=2`), a node that is not (or no longer) a primary is
  refused at connect (`target_session_attrs=read-write`), and the name is resolved again on every
  reconnect.
- `LIBPQ_DEFAULTS`: nothing set, what most applications run with: a write on a connection to a
  silent host waits for the kernel's retransmissions (~15 min with `tcp_retries2=15`); a connect
  waits for psycopg's default 130 s.

It runs in this process (a thread, through the group's DNS name) or inside a lab site, as a
separate process started with that site's argv prefix (`python -m lab.clients write …`), writing
straight to one node and appending its records as JSON lines to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

Node = tuple[str, int]
TABLE = "drflow_client_writes"


@dataclass(frozen=True)
class ClientSettings:
    """libpq connection keywords, and how long a resolved name is reused (0: every reconnect)."""

    name: str
    params: Mapping[str, str | int]
    dns_cache_s: float = 0.0


FOLLOW = ClientSettings("follow", {
    "connect_timeout": 2, "tcp_user_timeout": 3000, "keepalives": 1, "keepalives_idle": 1,
    "keepalives_interval": 1, "keepalives_count": 2, "target_session_attrs": "read-write"})
LIBPQ_DEFAULTS = ClientSettings("libpq_defaults", {})
SETTINGS = {s.name: s for s in (FOLLOW, LIBPQ_DEFAULTS)}


@dataclass(frozen=True)
class Ack:
    id: str
    node: Node
    at: float  # time.time() when the commit returned
    writer: str = ""


@dataclass(frozen=True)
class ClientError:
    at: float
    node: Node
    what: str
    writer: str = ""


def connect(node: Node, db: Mapping[str, str], settings: ClientSettings) -> psycopg.Connection[Any]:
    """A connection to `node` with exactly the settings' keywords (a missing password comes from
    PGPASSWORD, as for any libpq client)."""
    kw: dict[str, Any] = {"host": node[0], "port": node[1], "user": db["user"],
                          "dbname": db["name"], "autocommit": True, **settings.params}
    if db.get("password"):
        kw["password"] = db["password"]
    return psycopg.connect(**kw)


def ensure_table(node: Node, db: Mapping[str, str]) -> None:
    with connect(node, db, FOLLOW) as c:
        c.execute(f"create table if not exists {TABLE} (id text primary key, writer text, "
                  "at timestamptz default now())")


def present_ids(node: Node, db: Mapping[str, str], timeout_s: int = 5) -> set[str]:
    """Every id the database at `node` holds (primary or standby)."""
    settings = ClientSettings("read", {**FOLLOW.params, "connect_timeout": timeout_s,
                                       "target_session_attrs": "any"})
    with connect(node, db, settings) as c:
        return {r[0] for r in c.execute(f"select id from {TABLE}").fetchall()}


class CachedResolver:
    """Answers from `resolve` reused for `cache_s` seconds, as a caching stub resolver would."""

    def __init__(self, resolve: Callable[[], Node], cache_s: float) -> None:
        self.resolve, self.cache_s = resolve, cache_s
        self._answer: tuple[float, Node] | None = None

    def __call__(self) -> Node:
        now = time.monotonic()
        if self._answer is None or now - self._answer[0] >= self.cache_s:
            self._answer = (now, self.resolve())
        return self._answer[1]


@dataclass
class ClientWriter:
    """Writes ids to whatever `resolve` names on each (re)connect, one at a time."""

    name: str
    resolve: Callable[[], Node]
    db: Mapping[str, str]
    settings: ClientSettings = FOLLOW
    pause_s: float = 0.005
    on_ack: Callable[[Ack], None] | None = None
    on_error: Callable[[ClientError], None] | None = None
    acks: list[Ack] = field(default_factory=list)
    errors: list[ClientError] = field(default_factory=list)
    busy_since: float | None = None  # time.time() the call in progress began, None when idle
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, first_acks: int = 3, timeout: float = 15) -> ClientWriter:
        """Run in a daemon thread; return once `first_acks` writes are acknowledged."""
        self._thread = threading.Thread(target=self.run, daemon=True, name=f"client-{self.name}")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while len(self.acks) < first_acks:
            if time.monotonic() > deadline:
                last = self.errors[-1].what if self.errors else "no error"
                raise TimeoutError(f"writer {self.name}: no {first_acks} acknowledged writes "
                                   f"within {timeout:.0f} s (last: {last})")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 5) -> None:
        """Stop writing. A call hung on a silent host stays hung in its daemon thread: what it
        might acknowledge later is not recorded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def hung_s(self, now: float | None = None) -> float:
        """How long the call in progress has been waiting (0 when idle)."""
        return 0.0 if self.busy_since is None else (now or time.time()) - self.busy_since

    def _error(self, node: Node, what: str) -> None:
        err = ClientError(time.time(), node, what, self.name)
        if not self.stopped:
            self.errors.append(err)
            if self.on_error:
                self.on_error(err)

    def run(self) -> None:
        resolve = (CachedResolver(self.resolve, self.settings.dns_cache_s)
                   if self.settings.dns_cache_s > 0 else self.resolve)
        conn: psycopg.Connection[Any] | None = None
        node: Node = ("", 0)
        while not self.stopped:
            if conn is None:
                self.busy_since = time.time()
                try:
                    node = resolve()
                    conn = connect(node, self.db, self.settings)
                except Exception as exc:
                    self._error(node, f"connect: {type(exc).__name__}: {str(exc)[:160]}")
                    conn = None
                    time.sleep(0.1)
                    continue
                finally:
                    self.busy_since = None
            wid = uuid.uuid4().hex
            self.busy_since = time.time()
            try:
                conn.execute(f"insert into {TABLE} (id, writer) values (%s, %s)", (wid, self.name))
            except Exception as exc:
                # The commit may or may not have happened: not an acknowledgement.
                self._error(node, f"write: {type(exc).__name__}: {str(exc)[:160]}")
                with contextlib.suppress(Exception):  # a broken connection may fail to close
                    conn.close()
                conn = None
                continue
            finally:
                self.busy_since = None
            ack = Ack(wid, node, time.time(), self.name)
            if not self.stopped:
                self.acks.append(ack)
                if self.on_ack:
                    self.on_ack(ack)
            time.sleep(self.pause_s)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


@dataclass
class Prober:
    """A new client every `every_s`: resolve, connect (FOLLOW), write one id, disconnect, each in a
    thread of its own. Its first write acknowledged by the new primary is when the service takes
    writes again for a client that connects now, whatever a long-lived client's stuck
    connection and its timeouts cost that client (ClientWriter shows that)."""

    name: str
    resolve: Callable[[], Node]
    db: Mapping[str, str]
    every_s: float = 0.1
    max_inflight: int = 40
    acks: list[Ack] = field(default_factory=list)
    errors: list[ClientError] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _inflight: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(40))

    def start(self) -> Prober:
        self._inflight = threading.Semaphore(self.max_inflight)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"probe-{self.name}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self._inflight.acquire(blocking=False):  # else: probes pile up on a silent host
                threading.Thread(target=self._probe, daemon=True).start()

    def _probe(self) -> None:
        node: Node = ("", 0)
        try:
            node = self.resolve()
            wid = uuid.uuid4().hex
            with connect(node, self.db, FOLLOW) as c:
                c.execute(f"insert into {TABLE} (id, writer) values (%s, %s)", (wid, self.name))
            if not self._stop.is_set():
                self.acks.append(Ack(wid, node, time.time(), self.name))
        except Exception as exc:
            if not self._stop.is_set():
                self.errors.append(ClientError(time.time(), node,
                                               f"{type(exc).__name__}: {str(exc)[:120]}",
                                               self.name))
        finally:
            self._inflight.release()


def dns_resolver(route53: Any, zone_id: str, record: str,
                 share_s: float = 0.2) -> Callable[[], Node]:
    """Resolve a group's name through Route 53 (moto in the lab); calls within `share_s` of an
    answer share it, as clients behind one resolver would. Without that, a prober's ten
    connects a second per group load the lab's single moto server (and the machine) far
    beyond what Route 53 feels, and slow the failover's own DNS change."""
    from drflow.dns import resolve_endpoint

    lock = threading.Lock()
    last: list[tuple[float, Node]] = []

    def resolve() -> Node:
        with lock:
            if last and time.monotonic() - last[0][0] < share_s:
                return last[0][1]
            node = resolve_endpoint(route53, zone_id, record)
            last[:] = [(time.monotonic(), node)]
            return node
    return resolve


# --- a writer inside a site -------------------------------------------------------------------

def site_writer_argv(prefix: Sequence[str], name: str, node: Node, db: Mapping[str, str],
                     out: Path, settings: ClientSettings = FOLLOW) -> list[str]:
    """argv for a writer run inside a site (prefix: the site's netns argv prefix). The password
    is not in it: pass PGPASSWORD in the environment."""
    return [*prefix, sys.executable, "-m", "lab.clients", "write", "--name", name,
            "--host", node[0], "--port", str(node[1]), "--user", db["user"], "--dbname", db["name"],
            "--settings", settings.name, "--out", str(out)]


def read_records(path: Path) -> tuple[list[Ack], list[ClientError]]:
    """The acks and errors a site writer appended to `path` (a torn last line is skipped)."""
    acks: list[Ack] = []
    errors: list[ClientError] = []
    if not path.exists():
        return acks, errors
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        node = (str(r["node"][0]), int(r["node"][1]))
        if r.get("type") == "ack":
            acks.append(Ack(r["id"], node, float(r["at"]), r.get("writer", "")))
        else:
            errors.append(ClientError(float(r["at"]), node, r.get("what", ""), r.get("writer", "")))
    return acks, errors


def _append(out: Any, kind: str, record: Ack | ClientError) -> None:
    out.write(json.dumps({"type": kind, **asdict(record)}) + "\n")
    out.flush()


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab.clients")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write ids straight to one node until killed; password "
                                     "from PGPASSWORD")
    w.add_argument("--name", default="site-writer")
    w.add_argument("--host", required=True)
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--user", required=True)
    w.add_argument("--dbname", required=True)
    w.add_argument("--settings", choices=sorted(SETTINGS), default=FOLLOW.name)
    w.add_argument("--out", type=Path, required=True, help="JSON lines: one per ack or error")
    w.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    args = ap.parse_args(argv)
    node = (args.host, args.port)
    db = {"user": args.user, "name": args.dbname, "password": os.environ.get("PGPASSWORD", "")}
    with open(args.out, "a") as out:
        writer = ClientWriter(args.name, lambda: node, db, SETTINGS[args.settings],
                              on_ack=lambda a: _append(out, "ack", a),
                              on_error=lambda e: _append(out, "error", e))
        if args.seconds > 0:
            threading.Timer(args.seconds, writer.stop).start()
        print(f"writing to {node[0]}:{node[1]} with {args.settings} settings", flush=True)
        writer.run()


# --- what the records show (pure) ----------------------------------------------------------

def rto_s(fault_at: float, acks: Iterable[Ack], new_primary: Node | None) -> float | None:
    """Fault instant → the first write acknowledged by `new_primary` after it; None if none."""
    if new_primary is None:
        return None
    after = [a.at for a in acks if a.node == new_primary and a.at > fault_at]
    return min(after) - fault_at if after else None


def acked_lost(acks: Iterable[Ack], present: Iterable[str]) -> list[Ack]:
    """The acknowledged writes whose ids are not in `present` (the ids a node holds)."""
    have = set(present)
    return [a for a in acks if a.id not in have]


def spans(acks: Iterable[Ack]) -> dict[Node, tuple[float, float]]:
    """Each node's (first, last) acknowledgement instant."""
    out: dict[Node, tuple[float, float]] = {}
    for a in acks:
        lo, hi = out.get(a.node, (a.at, a.at))
        out[a.node] = (min(lo, a.at), max(hi, a.at))
    return out


def two_writers(acks: Iterable[Ack]) -> bool:
    """Did two nodes acknowledge writes in overlapping periods?

    Precisely: there is an ack by some node A at instant t and another node B ≠ A with
    first(B) < t < last(B), where first/last are B's earliest and latest acknowledgement over all
    the records (every writer's, merged). A clean failover (A…A then B…B, even with a gap or with
    equal instants at the switch) is False; A…A B A B (the old primary acknowledged after the new
    one started) or A and B interleaved is True. Meant for one period without a planned
    switchover back: a failback (A…A B…B A…A) is True by this definition too."""
    acks = list(acks)
    sp = spans(acks)
    return any(first < a.at < last
               for a in acks for node, (first, last) in sp.items() if node != a.node)


def longest_gap_s(acks: Iterable[Ack], since: float, until: float) -> float:
    """The longest time in [since, until] without any acknowledged write."""
    times = sorted(a.at for a in acks if since <= a.at <= until)
    edges = [since, *times, until]
    return max(b - a for a, b in itertools.pairwise(edges))


if __name__ == "__main__":
    _main()
