"""The PostgreSQL audit store (psycopg 3): appends serialised by an EXCLUSIVE table lock."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from pydantic import SecretStr

from drflow.audit.records import (
    FIELDS,
    AuditRecord,
    VerifyResult,
    verify_rows,
    with_problems,
)
from drflow.audit.redact import Redactor
from drflow.audit.store import COLUMNS, AuditStoreError, SqlAuditStore, mask_url

# Any constant shared by all drflow processes: serialises concurrent schema creation.
_SCHEMA_LOCK_KEY = 0x6472666C6F77  # "drflow"
_TRIGGERS = ("audit_records_append_only", "audit_records_no_truncate", "audit_head_no_delete")

_DDL = """
CREATE TABLE IF NOT EXISTS audit_records (
    seq bigint PRIMARY KEY,
    time text NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    parameters text NOT NULL,  -- canonical JSON text, not jsonb: jsonb would reformat it
    outcome text NOT NULL,
    duration_s double precision,
    reason text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id int PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL,
    hash text NOT NULL
);
CREATE OR REPLACE FUNCTION drflow_audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'drflow audit records are append-only (% on %)', TG_OP, TG_TABLE_NAME;
END $$;
CREATE OR REPLACE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION drflow_audit_refuse();
CREATE OR REPLACE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION drflow_audit_refuse();
CREATE OR REPLACE TRIGGER audit_head_no_delete BEFORE DELETE OR TRUNCATE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION drflow_audit_refuse();
"""

_INSERT = (f"INSERT INTO audit_records ({COLUMNS}) "
           f"VALUES ({', '.join('%(' + f + ')s' for f in FIELDS)})")
_SET_HEAD = ("INSERT INTO audit_head (id, seq, hash) VALUES (1, %s, %s) "
             "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash")


class PostgresAuditStore(SqlAuditStore):
    """Audit records in two tables of a PostgreSQL database, created on first use."""

    _PARAM = "%s"

    def __init__(self, url: str, *, create: bool = True, redactor: Redactor | None = None,
                 password: SecretStr | None = None, connect_timeout_s: int = 10) -> None:
        super().__init__(redactor)
        self.url = url
        self._password = password
        self.create = create
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = 0

    @property
    def location(self) -> str:
        return mask_url(self.url)

    def _connect_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"connect_timeout": self.connect_timeout_s}
        if self._password is not None:
            kw["password"] = self._password.get_secret_value()
        return kw

    def _connection(self) -> psycopg.Connection[Any]:
        if (self._conn is not None and self._pid == os.getpid() and not self._conn.closed
                and not self._conn.broken):
            return self._conn
        try:
            conn = psycopg.connect(self.url, autocommit=True, application_name="drflow-audit",
                                   **self._connect_kwargs())
        except psycopg.Error as exc:
            raise AuditStoreError(f"cannot connect to the audit database {self.location}: "
                                  f"{exc}".strip()) from exc
        try:
            self._ensure_schema(conn)
        except AuditStoreError:
            conn.close()
            raise
        except psycopg.Error as exc:
            conn.close()
            raise AuditStoreError(f"cannot prepare the audit tables in {self.location}: {exc}"
                                  ) from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        exists = conn.execute("SELECT to_regclass('audit_head') IS NOT NULL").fetchone()
        if exists and exists[0]:
            return
        if not self.create:
            raise AuditStoreError(f"no audit tables in {self.location}: check the audit URL")
        with conn.transaction():
            # CREATE ... IF NOT EXISTS still races in PostgreSQL: serialise it.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            conn.execute(_DDL)

    def _append(self, fields: Mapping[str, Any]) -> AuditRecord:
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    # EXCLUSIVE still lets readers in but admits one appender at a time, so no
                    # two processes can read the same head and fork the chain.
                    conn.execute("LOCK TABLE audit_records IN EXCLUSIVE MODE")
                    seq, prev_hash = self._read_head(conn)
                    rec = self._seal(fields, seq + 1, prev_hash)
                    conn.execute(_INSERT, rec.to_row())
                    conn.execute(_SET_HEAD, (rec.seq, rec.hash))
            except psycopg.errors.UniqueViolation as exc:
                raise AuditStoreError(
                    f"cannot append to {self.location}: the stored head does not match the "
                    "records; run `drflow audit verify`") from exc
            return rec

    def verify(self, expected_head: tuple[int, str] | None = None) -> VerifyResult:
        try:
            conn = psycopg.connect(self.url, application_name="drflow-audit-verify",
                                   **self._connect_kwargs())
        except psycopg.Error as exc:
            return VerifyResult(False, 0, None, f"cannot connect to {self.location}: {exc}")
        try:
            # One snapshot for the head and every row, however long verification takes.
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.transaction():
                if conn.execute("SELECT to_regclass('audit_head')").fetchone() == (None,):
                    return VerifyResult(False, 0, None,
                                        f"no audit tables in {self.location}")
                problems = self._schema_problems(conn)
                result = verify_rows(_stream(conn), expected_head, self._read_head(conn))
            return with_problems(result, problems)
        except psycopg.Error as exc:
            return VerifyResult(False, 0, None, f"cannot read {self.location}: {exc}")
        finally:
            conn.close()

    @staticmethod
    def _schema_problems(conn: psycopg.Connection[Any]) -> list[str]:
        rows = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgname = ANY(%s) AND tgenabled <> 'D'",
            (list(_TRIGGERS),)).fetchall()
        missing = sorted(set(_TRIGGERS) - {r[0] for r in rows})
        if missing:
            return [f"append-only triggers removed or disabled: {', '.join(missing)}"]
        return []


def _stream(conn: psycopg.Connection[Any]) -> Iterator[dict[str, Any]]:
    # A server-side cursor: memory stays flat however many records there are.
    with conn.cursor(name="drflow_audit_verify") as cur:
        cur.itersize = 1000
        cur.execute(f"SELECT {COLUMNS} FROM audit_records ORDER BY seq")
        for r in cur:
            yield dict(zip(FIELDS, r, strict=True))
