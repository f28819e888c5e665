"""What a drill reads from production and checks on its copy: replication, the standby, the copy.

Production is only read: no row, table or setting is written there. The facts feed the drill's
pure decisions (flows/drill_decisions.py).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg.conninfo import conninfo_to_dict

from tasks.errors import DrillError
from tasks.postgres import Db, lsn_int

CHECK_TABLE = "drflow_drill_check"


@dataclass(frozen=True)
class ReplicationFacts:
    """The standby as its primary and itself see it, read just before the drill."""

    error: str | None = None  # why the facts could not be read, if so
    standby_in_recovery: bool | None = None
    sender: str | None = None  # "host:port" the standby streams from
    state: str | None = None  # pg_stat_replication.state on the primary
    sync_state: str | None = None
    lag_s: float | None = None
    lag_bytes: int | None = None
    replay_paused: bool = False


@dataclass(frozen=True)
class CopyFacts:
    """What the application checks found on the promoted copy."""

    in_recovery: bool | None
    replicating_from: str | None  # a WAL receiver or primary_conninfo on the copy: never allowed
    wrote_and_read: bool
    missing_tables: Sequence[str] = field(default_factory=tuple)
    copy_lsn: int | None = None
    known_lsn: int | None = None  # the standby's replay position observed before the copy
    witness: str | None = None  # "xid N committed" as the standby saw it before the copy
    witness_on_copy: str | None = None  # that transaction's fate on the copy
    senders_to_copy: Sequence[str] = field(default_factory=tuple)  # production → copy WAL


def _same_endpoint(a_host: str, a_port: int, b_host: str, b_port: int) -> bool:
    if a_port != b_port:
        return False
    if a_host == b_host:
        return True
    try:
        a = {i[4][0] for i in socket.getaddrinfo(a_host, a_port)}
        b = {i[4][0] for i in socket.getaddrinfo(b_host, b_port)}
    except OSError:
        return False
    return bool(a & b)


def replication_facts(primary: Db, standby: Db, settle_s: float = 1.0) -> ReplicationFacts:
    """The standby's replication as the standby and its primary report it (read-only queries)."""
    try:
        with standby.connect() as c:
            row = c.execute("select pg_is_in_recovery()").fetchone()
            if not row or not row[0]:
                return ReplicationFacts(standby_in_recovery=False)
            rcv = c.execute("select status, sender_host, sender_port, conninfo "
                            "from pg_stat_wal_receiver").fetchone()
            paused = c.execute("select pg_is_wal_replay_paused()").fetchone()
            cluster = c.execute("select current_setting('cluster_name')").fetchone()
    except psycopg.Error as exc:
        return ReplicationFacts(error=f"standby {standby}: {_short(exc)}")
    if rcv is None:
        return ReplicationFacts(standby_in_recovery=True, sender=None,
                                replay_paused=bool(paused and paused[0]))
    sender = f"{rcv[1]}:{rcv[2]}"
    if rcv[1] and rcv[2] and _same_endpoint(str(rcv[1]), int(rcv[2]), primary.host, primary.port):
        sender = f"{primary.host}:{primary.port}"
    app = _application_name(str(rcv[3] or ""), str(cluster[0] if cluster else ""))
    deadline = time.monotonic() + settle_s
    try:
        with primary.connect() as c:
            while True:
                r = c.execute(
                    "select state, sync_state, "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
                    "extract(epoch from replay_lag)::float8 from pg_stat_replication "
                    "where application_name = %s order by backend_start desc limit 1",
                    (app,)).fetchone()
                lag_s = r[3] if r else None
                lag_bytes = int(r[2]) if r and r[2] is not None else None
                # replay_lag is NULL once an idle standby has caught up: that is no lag at all.
                if r and lag_s is None and lag_bytes == 0:
                    lag_s = 0.0
                if r is None or lag_s is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # WAL in flight and no lag sample yet: ask again
    except psycopg.Error as exc:
        return ReplicationFacts(error=f"primary {primary}: {_short(exc)}")
    return ReplicationFacts(
        standby_in_recovery=True, sender=sender, state=r[0] if r else None,
        sync_state=r[1] if r else None, lag_s=None if lag_s is None else max(0.0, float(lag_s)),
        lag_bytes=None if lag_bytes is None else max(0, lag_bytes),
        replay_paused=bool(paused and paused[0]))


def _application_name(conninfo: str, cluster_name: str) -> str:
    # What the walreceiver calls itself: application_name, else cluster_name, else its default.
    with contextlib.suppress(Exception):
        name = conninfo_to_dict(conninfo).get("application_name")
        if name:
            return str(name)
    return cluster_name or "walreceiver"


@dataclass(frozen=True)
class Observation:
    """The standby at one moment, read in one snapshot: the copy must hold at least this."""

    replay_lsn: int  # WAL the standby had replayed
    witness_xid: int  # the newest transaction the standby saw completed...
    witness_status: str  # ...and its fate there ('committed' or 'aborted')
    tables: tuple[str, ...]  # production's user tables


def _newest_completed(snapshot: str) -> int:
    """The newest transaction id a `pg_current_snapshot()` text (xmin:xmax:xip,…) shows done."""
    xmin, xmax, xip = snapshot.split(":")
    running = {int(x) for x in xip.split(",") if x}
    x = int(xmax) - 1
    while x in running and x >= int(xmin):
        x -= 1
    return x


@task(name="observe the standby", retries=2, retry_delay_seconds=0.5, timeout_seconds=60,
      cache_policy=NO_CACHE)
def observe_standby(standby: Db) -> Observation:
    """Read-only: the standby's replay position, its newest completed transaction and tables.

    Production is never written for a drill (no marker row, no table): these facts, read in
    one snapshot on the standby, are what the copy taken afterwards must contain."""
    with standby.connect() as c:
        c.execute("begin isolation level repeatable read read only")
        row = c.execute("select pg_last_wal_replay_lsn()::text, pg_current_snapshot()::text"
                        ).fetchone()
        if row is None or lsn_int(row[0]) is None:
            raise DrillError(f"{standby} reports no replay position: is it a standby?")
        xid = _newest_completed(str(row[1]))
        status = c.execute("select pg_xact_status(%s::text::xid8)", (xid,)).fetchone()
        c.execute("commit")
    replay = lsn_int(row[0])
    assert replay is not None
    if status is None or status[0] not in ("committed", "aborted"):
        raise DrillError(f"transaction {xid} on {standby} is {status[0] if status else None}, "
                         "not completed: cannot use it as the drill's witness")
    return Observation(replay_lsn=replay, witness_xid=xid, witness_status=str(status[0]),
                       tables=tuple(user_tables(standby)))


def senders_to(db: Db, application_prefix: str) -> list[str]:
    """Read-only: WAL senders of `db` to a client whose application name starts with the prefix."""
    with db.connect() as c:
        rows = c.execute("select application_name || ' (' || state || ')' from "
                         "pg_stat_replication where starts_with(application_name, %s)",
                         (application_prefix,)).fetchall()
    return [str(r[0]) for r in rows]


def user_tables(db: Db) -> list[str]:
    """Every ordinary or partitioned table outside the system schemas, as schema.table."""
    with db.connect() as c:
        rows = c.execute(
            "select n.nspname || '.' || c.relname from pg_class c "
            "join pg_namespace n on n.oid = c.relnamespace "
            "where c.relkind in ('r', 'p') and c.relpersistence = 'p' "
            "and n.nspname not in ('pg_catalog', 'information_schema') "
            "and n.nspname not like 'pg_toast%%' order by 1").fetchall()
    return [str(r[0]) for r in rows]


@task(name="check the copy", timeout_seconds=300, cache_policy=NO_CACHE)
def check_copy(db: Db, seen: Observation, copy_lsn: int | None, drill_id: str,
               production: Sequence[Db], copy_name: str) -> CopyFacts:
    """Application checks on the promoted copy: write, read, the witness transaction, tables,
    detachment (the copy takes WAL from nobody; production sends it none, read-only)."""
    with db.connect(timeout=10) as c:
        rec = c.execute("select pg_is_in_recovery()").fetchone()
        rcv = c.execute("select sender_host || ':' || sender_port from pg_stat_wal_receiver"
                        ).fetchone()
        conninfo = c.execute("select current_setting('primary_conninfo')").fetchone()
        attached = (rcv[0] if rcv else None) or ((conninfo[0] if conninfo else "") and
                                                  "primary_conninfo")
        # Before the copy's own first write: its transaction ids then go on from production's.
        try:
            row = c.execute("select pg_xact_status(%s::text::xid8)", (seen.witness_xid,)
                            ).fetchone()
            fate = str(row[0]) if row else "unknown"
        except psycopg.errors.InvalidParameterValue:  # "transaction ID … is in the future"
            fate = "not yet begun (the copy is older than the observation)"
        c.execute(f"create table if not exists {CHECK_TABLE} (id text primary key, "
                  "at timestamptz default now())")
        c.execute(f"insert into {CHECK_TABLE} (id) values (%s)", (drill_id,))
        read = c.execute(f"select 1 from {CHECK_TABLE} where id = %s", (drill_id,)).fetchone()
    present = set(user_tables(db))
    missing = [t for t in seen.tables if t not in present]
    senders = [s for p in production for s in senders_to(p, f"drflow-drill-{copy_name}")]
    return CopyFacts(in_recovery=bool(rec[0]) if rec else None, replicating_from=attached or None,
                     wrote_and_read=read is not None, missing_tables=tuple(missing),
                     copy_lsn=copy_lsn, known_lsn=seen.replay_lsn,
                     witness=f"xid {seen.witness_xid} {seen.witness_status}",
                     witness_on_copy=f"xid {seen.witness_xid} {fate}",
                     senders_to_copy=tuple(senders))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
