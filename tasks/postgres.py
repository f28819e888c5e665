"""PostgreSQL steps of the runbooks, straight to the database (not through the agent)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from drflow.lsn import lsn_int
from drflow.observations import AppCheck
from tasks.retry import retry_transient

T = TypeVar("T")

CONNECT_TIMEOUT_S = 2
# Every statement is bounded, so a hung server fails the step instead of hanging the runbook.
STATEMENT_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class Db:
    host: str
    port: int
    dbname: str
    user: str
    password: SecretStr | None = None

    def __str__(self) -> str:  # what logs and reasons show: never the password
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"

    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=self.host, port=self.port, dbname=self.dbname, user=self.user,
            password=self.password.get_secret_value() if self.password else None,
            connect_timeout=max(1, int(timeout)), autocommit=True,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )


@dataclass(frozen=True)
class StandbyStatus:
    reachable: bool
    in_recovery: bool | None
    received_lsn: int | None
    replayed_lsn: int | None
    detail: str


def check_primary(db: Db) -> AppCheck:
    """Does PostgreSQL at `db` serve writes? A direct check, independent of the agent."""
    try:
        with db.connect() as conn:
            row = conn.execute(
                "select pg_is_in_recovery(), current_setting('default_transaction_read_only')"
            ).fetchone()
    except psycopg.Error as exc:
        return AppCheck(False, False, _short(exc))
    assert row is not None
    writable = not row[0] and row[1] == "off"
    return AppCheck(True, writable, "answers as a writable primary" if writable
                    else "answers, but in recovery or read-only")


def bounded(fn: Callable[[], T], seconds: float, late: T) -> T:
    """fn() in a thread, or `late` past `seconds`: libpq's connect_timeout is whole seconds and
    at least 2, and a frozen server still completes the TCP handshake, so a silent address
    would otherwise cost 2 s or more."""
    box: list[T] = []
    th = threading.Thread(target=lambda: box.append(fn()), daemon=True, name="pg-bounded")
    th.start()
    th.join(seconds)
    return box[0] if box else late


def check_primary_within(db: Db, seconds: float) -> AppCheck:
    """`check_primary`, answered within `seconds` (no answer: does not serve)."""
    return bounded(lambda: check_primary(db), seconds,
                   AppCheck(False, False, f"no answer from {db.host}:{db.port} within "
                                          f"{seconds:g} s"))


@dataclass(frozen=True)
class ReceiverState:
    """The standby's WAL receiver: `answered` False when the standby could not be asked;
    `status` None when there is no receiver."""

    answered: bool
    status: str | None = None
    sender: str | None = None
    last_msg_age_s: float | None = None
    detail: str = ""


def wal_receiver(db: Db, seconds: float = 1.0) -> ReceiverState:
    """Does the standby still receive from its primary? (pg_stat_wal_receiver, its clock)."""
    def read() -> ReceiverState:
        try:
            with db.connect() as conn:
                row = conn.execute(
                    "select status, sender_host || ':' || sender_port, "
                    "extract(epoch from clock_timestamp() - last_msg_receipt_time)::float8 "
                    "from pg_stat_wal_receiver").fetchone()
        except psycopg.Error as exc:
            return ReceiverState(False, detail=_short(exc))
        if row is None:
            return ReceiverState(True, detail="no WAL receiver")
        age = None if row[2] is None else float(row[2])
        return ReceiverState(True, str(row[0]), row[1], age,
                             f"{row[0]} from {row[1]}, last message "
                             + ("never" if age is None else f"{age:.2f} s ago"))
    return bounded(read, seconds, ReceiverState(False, detail=f"the standby did not answer "
                                                              f"within {seconds:g} s"))


def standby_status(db: Db) -> StandbyStatus:
    try:
        with db.connect() as conn:
            row = conn.execute(
                "select pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, "
                "pg_last_wal_replay_lsn()::text"
            ).fetchone()
    except psycopg.Error as exc:
        return StandbyStatus(False, None, None, None, _short(exc))
    assert row is not None
    in_recovery = bool(row[0])
    received, replayed = lsn_int(row[1]), lsn_int(row[2])
    if not in_recovery:
        return StandbyStatus(True, False, None, None, "is a primary")
    if received is None:
        received = replayed
    return StandbyStatus(True, True, received, replayed, f"in recovery, received {row[1]}")


@task(name="promote standby", retries=2, retry_delay_seconds=0.5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def promote(db: Db) -> bool:
    """Promote; True if this call promoted it, False if it already was a primary."""
    with db.connect() as conn:
        row = conn.execute("select pg_is_in_recovery()").fetchone()
        if row is None or not row[0]:
            return False
        res = conn.execute("select pg_promote(true, 30)").fetchone()
        if not res or not res[0]:
            raise RuntimeError(f"pg_promote did not finish within 30 s on {db}")
    return True


def sync_standby_count(db: Db) -> tuple[int, str]:
    """(synchronous standbys streaming now, synchronous_standby_names)."""
    with db.connect() as conn:
        n = conn.execute("select count(*) from pg_stat_replication "
                         "where sync_state in ('sync', 'quorum')").fetchone()
        s = conn.execute("show synchronous_standby_names").fetchone()
    return int(n[0] if n else 0), str(s[0] if s else "")


@task(name="relax synchronous replication", retries=2, retry_delay_seconds=0.5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def relax_synchronous(db: Db) -> None:
    with db.connect() as conn:
        conn.execute("alter system set synchronous_standby_names = ''")
        conn.execute("select pg_reload_conf()")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            row = conn.execute("show synchronous_standby_names").fetchone()
            if row and row[0] == "":
                return
            time.sleep(0.02)
    raise RuntimeError(f"synchronous_standby_names still set on {db} after reload")


@task(name="verify a write", retries=3, retry_delay_seconds=0.3,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def verify_write(db: Db, marker: str) -> float:
    """Write and read back a marker row; return the time it was acknowledged (epoch s)."""
    with db.connect() as conn:
        conn.execute("create table if not exists drflow_probe "
                     "(marker text primary key, written_at timestamptz default now())")
        conn.execute("insert into drflow_probe (marker) values (%s) on conflict do nothing", (marker,))
        acked = time.time()
        row = conn.execute("select 1 from drflow_probe where marker = %s", (marker,)).fetchone()
    if row is None:
        raise RuntimeError(f"marker {marker} not readable on {db} right after writing it")
    return acked


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
