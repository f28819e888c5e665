"""PostgreSQL: queries answered, role (primary/standby) and replication state and lag.

The monitor keeps one connection open between checks: a fresh connection costs the agent about
5 ms of CPU per check (SCRAM's key derivation runs in the client), a kept one a fraction of a
millisecond. A kept connection would not notice a server that stops accepting *new* sessions,
and it would hold up a smart shutdown (which waits for every session to end), so it is replaced
every `reconnect_every_s` (10 s); one that breaks (restart, crash) is replaced within the same
check, so a restart that already finished does not count as a failure.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import psycopg

from agents.monitors import CheckResult
from drflow.secret_refs import SecretValue

_ROLE_SQL = "select pg_is_in_recovery()"
_STANDBY_SQL = """
select (select status from pg_stat_wal_receiver limit 1),
       (select sender_host || ':' || sender_port from pg_stat_wal_receiver limit 1),
       coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::bigint,
       case when pg_last_wal_receive_lsn() is not distinct from pg_last_wal_replay_lsn() then 0
            else extract(epoch from now() - pg_last_xact_replay_timestamp()) end::float8,
       pg_last_wal_replay_lsn()::text
"""
_PRIMARY_SQL = """
select pg_current_wal_lsn()::text,
       coalesce(json_agg(json_build_object(
           'name', application_name, 'state', state, 'sync_state', sync_state,
           'lag_bytes', pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint)), '[]')
from pg_stat_replication
"""


class PostgresMonitor:
    def __init__(self, host: str, port: int, user: str, dbname: str, password: SecretValue | None,
                 timeout_s: float, reconnect_every_s: float = 10.0,
                 clock: Any = time.monotonic) -> None:
        self.host, self.port, self.user, self.dbname = host, port, user, dbname
        self._password = password
        self.timeout_s = timeout_s
        self.reconnect_every_s = reconnect_every_s
        self._clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._connected_at = 0.0

    def check(self) -> CheckResult:
        where = f"postgres {self.host}:{self.port}"
        try:
            facts = self._facts()
        except psycopg.Error as exc:
            self.close()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return CheckResult(False, f"{where}: {first}")
        return CheckResult(True, f"{where} accepts queries as {facts['role']}", facts)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _facts(self) -> dict[str, Any]:
        if self._conn is not None and (
                self._conn.closed or self._clock() - self._connected_at >= self.reconnect_every_s):
            self.close()
        if self._conn is not None:
            try:
                return self._query(self._conn)
            except psycopg.OperationalError:
                # The kept session broke (a restart since the last check): judge the server by
                # a fresh connection, not by the old session.
                self.close()
        self._conn = self._connect()
        self._connected_at = self._clock()
        return self._query(self._conn)

    def _connect(self) -> psycopg.Connection[Any]:
        ms = max(100, int(self.timeout_s * 1000))
        # statement_timeout bounds a slow server; tcp_user_timeout and keepalives bound a
        # silent one (a frozen host still completes the handshake from the kernel's backlog).
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=self.dbname,
            password=self._password.get_secret_value() if self._password else None,
            connect_timeout=max(2, math.ceil(self.timeout_s)), autocommit=True,
            application_name="drflow-agent", options=f"-c statement_timeout={ms}",
            tcp_user_timeout=ms, keepalives=1, keepalives_idle=max(1, math.ceil(self.timeout_s)),
            keepalives_interval=1, keepalives_count=2,
        )

    def _query(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        row = conn.execute(_ROLE_SQL).fetchone()
        standby = bool(row and row[0])
        return self._standby_facts(conn) if standby else self._primary_facts(conn)

    @staticmethod
    def _standby_facts(conn: psycopg.Connection[Any]) -> dict[str, Any]:
        row = conn.execute(_STANDBY_SQL).fetchone()
        assert row is not None
        return {"role": "standby", "wal_receiver": row[0], "upstream": row[1],
                "lag_bytes": int(row[2]), "replay_delay_s": round(float(row[3] or 0), 3),
                "replay_lsn": row[4]}

    @staticmethod
    def _primary_facts(conn: psycopg.Connection[Any]) -> dict[str, Any]:
        row = conn.execute(_PRIMARY_SQL).fetchone()
        assert row is not None
        return {"role": "primary", "wal_lsn": row[0], "replicas": row[1]}


def build(r: Any) -> PostgresMonitor:
    password = None
    if r.password is not None:
        from drflow.secret_refs import resolve

        password = resolve(r.password)
    return PostgresMonitor(r.host, r.port, r.user, r.dbname, password, r.timeout_s)
