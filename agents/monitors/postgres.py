"""PostgreSQL: connect, `select 1`, role (primary/standby) and replication state and lag."""

from __future__ import annotations

import math
from typing import Any

import psycopg
from pydantic import SecretStr

from agents.monitors import CheckResult

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
    def __init__(self, host: str, port: int, user: str, dbname: str, password: SecretStr | None,
                 timeout_s: float) -> None:
        self.host, self.port, self.user, self.dbname = host, port, user, dbname
        self._password = password
        self.timeout_s = timeout_s

    def check(self) -> CheckResult:
        where = f"postgres {self.host}:{self.port}"
        ms = max(100, int(self.timeout_s * 1000))
        try:
            with psycopg.connect(
                host=self.host, port=self.port, user=self.user, dbname=self.dbname,
                password=self._password.get_secret_value() if self._password else None,
                connect_timeout=max(2, math.ceil(self.timeout_s)), autocommit=True,
                application_name="drflow-agent", options=f"-c statement_timeout={ms}",
            ) as conn:
                conn.execute("select 1").fetchone()
                row = conn.execute("select pg_is_in_recovery()").fetchone()
                standby = bool(row and row[0])
                facts = self._standby_facts(conn) if standby else self._primary_facts(conn)
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return CheckResult(False, f"{where}: {first}")
        role = facts["role"]
        return CheckResult(True, f"{where} accepts queries as {role}", facts)

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
        from drflow.secrets import resolve

        password = resolve(r.password)
    return PostgresMonitor(r.host, r.port, r.user, r.dbname, password, r.timeout_s)
