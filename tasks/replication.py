"""Streaming-replication facts and settings, straight over SQL (not through the agent).

A standby's walreceiver connects with `application_name` = its `cluster_name` unless its
primary_conninfo names another; that name is what `pg_stat_replication` shows and what
`synchronous_standby_names` must list.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from tasks.postgres import Db, lsn_int
from tasks.retry import retry_transient


@dataclass(frozen=True)
class Replica:
    name: str
    state: str
    sync_state: str
    flush_lsn: int | None
    replay_lsn: int | None


@dataclass(frozen=True)
class PrimaryView:
    """A primary's current WAL position and the standbys streaming from it."""

    lsn: int
    replicas: list[Replica]
    sync_names: str

    def replica(self, name: str) -> Replica | None:
        return next((r for r in self.replicas if r.name == name), None)


def primary_view(db: Db) -> PrimaryView:
    with db.connect() as conn:
        row = conn.execute("select pg_current_wal_lsn()::text, "
                           "current_setting('synchronous_standby_names')").fetchone()
        rows = conn.execute("select application_name, state, sync_state, flush_lsn::text, "
                            "replay_lsn::text from pg_stat_replication "
                            "order by application_name").fetchall()
    assert row is not None
    return PrimaryView(lsn_int(row[0]) or 0,
                       [Replica(r[0], r[1], r[2], lsn_int(r[3]), lsn_int(r[4])) for r in rows],
                       str(row[1]))


def standby_name(db: Db) -> str:
    """The name the standby at `db` streams under: primary_conninfo's application_name, else
    its cluster_name, else PostgreSQL's default."""
    with db.connect() as conn:
        conninfo = conn.execute("select current_setting('primary_conninfo', true)").fetchone()
        cluster = conn.execute("show cluster_name").fetchone()
    if conninfo and conninfo[0]:
        for part in str(conninfo[0]).split():
            key, _, value = part.partition("=")
            if key == "application_name" and value:
                return value.strip("'")
    return str(cluster[0]) if cluster and cluster[0] else "walreceiver"


def received_replayed(db: Db) -> tuple[int | None, int | None]:
    """(last WAL received and flushed, last WAL replayed) on a standby."""
    with db.connect() as conn:
        row = conn.execute("select pg_last_wal_receive_lsn()::text, "
                           "pg_last_wal_replay_lsn()::text").fetchone()
    assert row is not None
    return lsn_int(row[0]), lsn_int(row[1])


def current_lsn(db: Db) -> int:
    with db.connect() as conn:
        row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return lsn_int(row[0]) or 0


def sync_setting(names: list[str]) -> str:
    """`FIRST 1 ("a", "b")`: the first of `names` streaming is the synchronous standby."""
    quoted = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
    return f"FIRST 1 ({quoted})"


@task(name="set synchronous_standby_names", retries=2, retry_delay_seconds=0.5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def set_sync_names(db: Db, setting: str) -> str:
    """ALTER SYSTEM + reload, and wait until the server uses it; returns the previous value."""
    with db.connect() as conn:
        before = conn.execute("show synchronous_standby_names").fetchone()
        conn.execute(sql.SQL("alter system set synchronous_standby_names = {}").format(
            sql.Literal(setting)))
        conn.execute("select pg_reload_conf()")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            row = conn.execute("show synchronous_standby_names").fetchone()
            if row and row[0] == setting:
                return str(before[0]) if before else ""
            time.sleep(0.02)
    raise RuntimeError(f"synchronous_standby_names on {db} is not {setting!r} after reload")


def wait_streaming(db: Db, name: str, timeout_s: float, *, caught_up: bool = True,
                   sync: bool = False) -> tuple[Replica, PrimaryView, float]:
    """Wait until `name` streams from the primary at `db` (replayed everything written when the
    wait began if `caught_up`; as its synchronous standby if `sync`). Returns what was seen."""
    t0 = time.monotonic()
    target: int | None = None
    last: PrimaryView | None = None
    while True:
        try:
            last = primary_view(db)
            target = last.lsn if target is None else target
            r = last.replica(name)
            if r is not None and r.state == "streaming" and \
                    (not caught_up or (r.replay_lsn or 0) >= target) and \
                    (not sync or r.sync_state in ("sync", "quorum")):
                return r, last, time.monotonic() - t0
        except psycopg.OperationalError:
            pass
        if time.monotonic() - t0 > timeout_s:
            seen = last.replica(name) if last else None
            raise TimeoutError(f"{name} not streaming{' in sync' if sync else ''}"
                               f"{' and caught up' if caught_up else ''} from {db} within "
                               f"{timeout_s:.0f} s (last seen: {seen})")
        time.sleep(0.05)


def wait_replayed(db: Db, lsn: int, timeout_s: float) -> tuple[int, int, float]:
    """Wait until the standby at `db` received at least `lsn` and replayed all it received."""
    t0 = time.monotonic()
    received = replayed = None
    while True:
        try:
            received, replayed = received_replayed(db)
            if received is not None and replayed is not None and received >= lsn and \
                    replayed >= received:
                return received, replayed, time.monotonic() - t0
        except psycopg.OperationalError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{db} received {received}, replayed {replayed}, not {lsn}, "
                               f"within {timeout_s:.0f} s")
        time.sleep(0.01)


def wait_marker(db: Db, marker: str, timeout_s: float) -> float:
    """Wait until the standby at `db` shows the probe row `marker` (replication verified)."""
    t0 = time.monotonic()
    while True:
        try:
            with db.connect() as conn:
                if conn.execute("select 1 from drflow_probe where marker = %s",
                                (marker,)).fetchone():
                    return time.monotonic() - t0
        except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"probe {marker} not replayed on {db} within {timeout_s:.0f} s")
        time.sleep(0.05)


def checkpoint(db: Db) -> None:
    with db.connect() as conn:
        conn.execute("checkpoint")
