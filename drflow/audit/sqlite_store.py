"""The SQLite audit store: one file, WAL, appends serialised across processes by BEGIN IMMEDIATE."""

from __future__ import annotations

import dataclasses
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from drflow.audit.records import (
    FIELDS,
    GENESIS,
    AuditRecord,
    VerifyResult,
    verify_rows,
    with_problems,
)
from drflow.audit.redact import Redactor
from drflow.audit.sqlite_header import header_problem
from drflow.audit.store import COLUMNS, AuditStoreError, SqlAuditStore

# Written into the file header, so verify can tell a drflow audit file from any SQLite file.
APPLICATION_ID = 0x64726661  # "drfa"
SCHEMA_VERSION = 1
_MAGIC = b"SQLite format 3\x00"
# What reading a damaged file can raise: SQLite's errors, and Python's when a TEXT value is no
# longer valid UTF-8 or a number no longer fits.
_READ_ERRORS = (sqlite3.Error, UnicodeError, ValueError, OverflowError)
T = TypeVar("T")

_DDL = (
    """CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    parameters TEXT NOT NULL,
    outcome TEXT NOT NULL,
    duration_s REAL,
    reason TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)""",
    # The chain's tip, moved in the same transaction as each insert: appends link to it, so
    # records deleted at the end leave a gap the next append and verify both see.
    """CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
)""",
    # Append-only by construction; dropping these is itself reported by verify.
    """CREATE TRIGGER IF NOT EXISTS audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN SELECT RAISE(ABORT, 'the audit head cannot be deleted'); END""",
)

_INSERT = f"INSERT INTO audit_records ({COLUMNS}) VALUES ({', '.join(':' + f for f in FIELDS)})"
_SET_HEAD = ("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
             "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash")


@functools.cache
def _expected_schema() -> frozenset[tuple[str, str, str, str | None]]:
    """sqlite_schema rows as SQLite itself normalises our DDL (built once in memory)."""
    mem = sqlite3.connect(":memory:")
    try:
        for stmt in _DDL:
            mem.execute(stmt)
        return frozenset(mem.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema"))
    finally:
        mem.close()


@dataclasses.dataclass
class _Pending:
    """An append waiting for the commit that writes it."""

    fields: Mapping[str, Any]
    record: AuditRecord | None = None
    error: BaseException | None = None
    done: bool = False


# (pid, device, inode) → a read-only descriptor of that file, kept while the process lives.
_HEADER_FDS: dict[tuple[int, int, int], int] = {}
_HEADER_FDS_LOCK = threading.Lock()


def _header_fd(path: Path) -> int:
    """A descriptor of `path` for reading its header, opened once per file and never closed.

    Closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    own included: a verification that opened and closed the file in a process that appends
    to it (the gateway, whose console verifies the trail) would take the WAL's locks from
    under the writer, and other processes would stop seeing its records."""
    st = os.stat(path)
    key = (os.getpid(), st.st_dev, st.st_ino)
    with _HEADER_FDS_LOCK:
        fd = _HEADER_FDS.get(key)
        if fd is None:
            fd = _HEADER_FDS[key] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return fd


class SQLiteAuditStore(SqlAuditStore):
    """Audit records in one SQLite file; safe for many threads and processes appending at once."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 redactor: Redactor | None = None, busy_timeout_s: float = 60.0) -> None:
        super().__init__(redactor)
        self.path = Path(path)
        self.create = create
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    @property
    def location(self) -> str:
        return f"sqlite:///{self.path}"

    # -- connections -----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross fork(): a child process opens its own.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if not self.path.exists() and not self.create:
            raise AuditStoreError(f"no audit database at {self.path}: check the audit URL "
                                  "(--url, audit.url in the config or DRFLOW_AUDIT_URL)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone())
            # An audit record must survive a power cut once append() has returned.
            conn.execute("PRAGMA synchronous=FULL")
            self._retry_locked(lambda: self._ensure_schema(conn))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise AuditStoreError(
                f"cannot open the audit database {self.path}: {exc}. If the file is damaged, "
                "run `drflow audit verify` and restore it from an export") from exc
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _retry_locked(self, fn: Callable[[], T]) -> T:
        # Switching to WAL and creating the schema take locks for which SQLite does not
        # always wait (e.g. several processes creating the same new file at once).
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
        if app_id not in (0, APPLICATION_ID) or (names and "audit_head" not in names):
            # Never add audit tables to some other application's database.
            raise AuditStoreError(f"{self.path} is an SQLite database but not a drflow audit "
                                  "store: point the audit URL at a file of its own")
        if "audit_head" in names:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _DDL:
                conn.execute(stmt)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- writing and reading -----------------------------------------------------------------

    def _append(self, fields: Mapping[str, Any]) -> AuditRecord:
        # Group commit: appends that arrive while a commit runs wait for it, then the next
        # committer writes them all in one transaction, with one fsync. Five failovers and the
        # gateway appending together otherwise queued behind each other's fsync, seconds in
        # all on a busy machine. Every caller still returns only after its record is committed.
        mine = _Pending(fields)
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            if not mine.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if mine.error is not None:
            raise mine.error
        assert mine.record is not None
        return mine.record

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            conn = self._connection()
            # IMMEDIATE takes the write lock before reading the head: two processes can never
            # both read the same head and fork the chain.
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq, prev_hash = self._read_head(conn)
                records = []
                for p in batch:
                    rec = self._seal(p.fields, seq + 1, prev_hash)
                    conn.execute(_INSERT, rec.to_row())
                    records.append(rec)
                    seq, prev_hash = rec.seq, rec.hash
                conn.execute(_SET_HEAD, (seq, prev_hash))
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK")
                raise AuditStoreError(
                    f"cannot append to {self.path}: the stored head does not match the records "
                    f"({exc}); run `drflow audit verify`") from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException as exc:
            for p in batch:
                p.error, p.done = exc, True
            return
        for p, rec in zip(batch, records, strict=True):
            p.record, p.done = rec, True

    # -- verification --------------------------------------------------------------------------

    def verify(self, expected_head: tuple[int, str] | None = None) -> VerifyResult:
        """Check the file (header, structure, schema) and the chain, with a fresh read-only
        connection so that nothing cached hides what is on disk."""
        if not self.path.exists():
            return VerifyResult(False, 0, None, f"no audit database at {self.path}")
        header = self._header()
        if len(header) < 100 or not header.startswith(_MAGIC):
            return VerifyResult(False, 0, None, "not an SQLite database: the file header is "
                                "damaged or this is not an audit file")
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                   timeout=self.busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            return VerifyResult(False, 0, None, f"cannot open the database file: {exc}")
        try:
            return self._verify_with(conn, expected_head)
        finally:
            conn.close()

    def _header(self) -> bytes:
        """The file's first 100 bytes (see `_header_fd`)."""
        return os.pread(_header_fd(self.path), 100, 0)

    def _verify_with(self, conn: sqlite3.Connection,
                     expected_head: tuple[int, str] | None) -> VerifyResult:
        file_problems: list[str] = []

        def attempt(what: str, fn: Callable[[], T]) -> T | None:
            # Each check on its own: damage that defeats one should not hide the others, and
            # the row-by-row read below can then still name the damaged record.
            try:
                return fn()
            except _READ_ERRORS as exc:
                file_problems.append(f"database file is corrupt ({what}: {exc})")
                return None

        try:
            conn.execute("PRAGMA cell_size_check = ON")
            conn.execute("BEGIN")  # one snapshot for the head and all rows
            conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        except _READ_ERRORS as exc:
            return VerifyResult(False, 0, None, f"database file is corrupt: {exc}")
        ids = attempt("header", lambda: (
            conn.execute("PRAGMA application_id").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0]))
        if ids is not None and ids != (APPLICATION_ID, SCHEMA_VERSION):
            file_problems.append(f"file header ids altered (application_id {ids[0]:#x}, "
                                 f"user_version {ids[1]})")
        schema = attempt("schema", lambda: frozenset(
            conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema")))
        if schema is not None and schema != _expected_schema():
            names = sorted({r[1] for r in schema ^ _expected_schema()})
            file_problems.append(f"schema altered (objects differ: {', '.join(names)}; "
                                 "an append-only trigger removed or changed?)")
        integrity = attempt("integrity check", lambda: [
            r[0] for r in conn.execute("PRAGMA integrity_check(10)")])
        if integrity is not None and integrity != ["ok"]:
            file_problems.append("database structure damaged: " + "; ".join(integrity[:3]))
        head_row = attempt("head", lambda: conn.execute(
            "SELECT seq, hash FROM audit_head WHERE id = 1").fetchone())
        stored_head = (head_row[0], head_row[1]) if head_row else None
        if head_row is None and not file_problems:
            stored_head = (0, GENESIS)  # no head row: nothing was ever appended
        notes: tuple[str, ...] = ()
        try:
            problem = self._raw_header_problem()
        except OSError as exc:
            problem = f"cannot read the file's header: {exc}"
        if problem is None or problem.startswith("skipped"):
            notes = (problem,) if problem else ()
        else:
            file_problems.append(problem)

        reader = _RowReader(conn)
        result = dataclasses.replace(verify_rows(reader.rows(), expected_head, stored_head),
                                     notes=notes)
        if reader.error is not None and result.checked >= reader.count:
            # Reading stopped part-way: the rows that were read are fine, the next one is not.
            file_problems.insert(0, f"database file is corrupt after record {reader.last_seq}: "
                                    f"{reader.error}")
            return VerifyResult(False, result.checked, reader.last_seq + 1,
                                "; ".join(file_problems), result.head_seq, result.head_hash,
                                notes)
        return with_problems(result, file_problems)

    def _raw_header_problem(self) -> str | None:
        """The header's fixed fields, read straight from the file. Inside verify's read
        transaction no checkpoint can rewrite the file meanwhile."""
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            # While a writer has the store open the header's counters and page count lag
            # behind the WAL: only a quiescent file can be held to them.
            return ("skipped the check of the raw file header: a writer has the store open "
                    "(records, links, structure and schema were still checked)")
        with open(self.path, "rb") as f:
            return header_problem(f.read(100), os.fstat(f.fileno()).st_size)


class _RowReader:
    """Streams rows for verification and remembers where reading failed instead of raising."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.error: str | None = None
        self.count = 0
        self.last_seq = 0

    def rows(self) -> Iterator[dict[str, Any]]:
        try:
            cur = self.conn.execute(f"SELECT {COLUMNS} FROM audit_records ORDER BY seq")
            for r in cur:
                row = dict(zip(FIELDS, r, strict=True))
                self.count += 1
                if isinstance(row["seq"], int):
                    self.last_seq = row["seq"]
                yield row
        except _READ_ERRORS as exc:
            self.error = str(exc) or type(exc).__name__
