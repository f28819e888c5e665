"""The audit store interface that the SQLite and PostgreSQL backends implement."""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from pydantic import SecretStr

from drflow.audit.records import (
    FIELDS,
    GENESIS,
    AuditRecord,
    VerifyResult,
    canonical_json,
    record_hash,
)
from drflow.audit.redact import Redactor

DEFAULT_URL = "sqlite:///./drflow-audit.db"
BATCH = 500
COLUMNS = ", ".join(FIELDS)


class AuditStoreError(RuntimeError):
    """The audit store cannot be used as asked; the message says what to do."""


def mask_url(url: str) -> str:
    """The URL with any password replaced, fit for messages."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class AuditStore(ABC):
    """An append-only, hash-chained audit trail.

    Every record carries the hash of the one before it, and its own hash covers all its fields,
    so altering, inserting or removing a record anywhere but the very end breaks `verify()`.
    Removing records at the end is caught by the head the store keeps beside the records, and
    against a deliberate attacker only by comparing with a head kept elsewhere
    (`verify(expected_head=...)`, e.g. the last line of an export).
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        self.redactor = redactor or Redactor()

    def add_secret_values(self, values: Iterable[str | SecretStr]) -> None:
        """Known secret values to scrub from any string before it is stored."""
        self.redactor.add_secret_values(values)

    def append(self, actor: str, action: str, target: str,
               parameters: Mapping[str, Any] | None = None, outcome: str = "ok",
               reason: str = "", *, duration_s: float | None = None) -> AuditRecord:
        """Redact, chain and store one record; returns it as stored."""
        params = self.redactor.value(dict(parameters or {}))
        fields: dict[str, Any] = {
            "actor": self.redactor.text(actor),
            "action": self.redactor.text(action),
            "target": self.redactor.text(target),
            "parameters": params,
            "outcome": self.redactor.text(outcome),
            "duration_s": None if duration_s is None else round(float(duration_s), 6),
            "reason": self.redactor.text(reason or ""),
        }
        canonical_json(params)  # fails here, not half-way through a transaction
        return self._append(fields)

    @staticmethod
    def _seal(fields: Mapping[str, Any], seq: int, prev_hash: str) -> AuditRecord:
        """The complete record that follows (seq - 1, prev_hash); called under the append lock."""
        body = {**fields, "seq": seq, "prev_hash": prev_hash, "time": utc_now_iso()}
        body["hash"] = record_hash(body)
        return AuditRecord.model_validate(body)

    def records(self, since_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        """Records with seq > since_seq, oldest first, at most `limit` of them."""
        out: list[AuditRecord] = []
        for rec in self.iter_records(since_seq):
            if limit is not None and len(out) >= limit:
                break
            out.append(rec)
        return out

    def iter_records(self, since_seq: int = 0) -> Iterator[AuditRecord]:
        """All records with seq > since_seq, oldest first, read in batches."""
        after = since_seq
        while True:
            rows = self._fetch_rows(after, BATCH)
            for row in rows:
                yield AuditRecord.from_row(row)
            if len(rows) < BATCH:
                return
            after = int(rows[-1]["seq"])

    @abstractmethod
    def _append(self, fields: Mapping[str, Any]) -> AuditRecord:
        """Under a lock that serialises all appenders: read the head, seal, insert, move head."""

    @abstractmethod
    def _fetch_rows(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Raw stored rows with seq > after_seq, ordered by seq."""

    @abstractmethod
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record; (0, GENESIS) when empty."""

    @abstractmethod
    def verify(self, expected_head: tuple[int, str] | None = None) -> VerifyResult:
        """Recompute every hash and link from the stored bytes; never raises on a damaged store."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the records live, for messages (passwords masked)."""

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class SqlAuditStore(AuditStore):
    """What the SQL backends share: one connection behind a lock, and reads of rows and head."""

    _PARAM = "?"  # the driver's query placeholder
    _lock: threading.RLock
    _conn: Any  # opened by `_connection()` in process `_pid`, None until then
    _pid: int

    @abstractmethod
    def _connection(self) -> Any:
        """The open connection (opened on first use); call it under `_lock`."""

    def _fetch_rows(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        p = self._PARAM
        with self._lock:
            cur = self._connection().execute(
                f"SELECT {COLUMNS} FROM audit_records WHERE seq > {p} ORDER BY seq LIMIT {p}",
                (after_seq, limit))
            return [dict(zip(FIELDS, r, strict=True)) for r in cur]

    def head(self) -> tuple[int, str]:
        with self._lock:
            return self._read_head(self._connection())

    @staticmethod
    def _read_head(conn: Any) -> tuple[int, str]:
        row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def close(self) -> None:
        with self._lock:
            # A forked child must not close its parent's connection.
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
