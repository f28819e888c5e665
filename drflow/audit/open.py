"""`open_store`: the audit store a URL names, SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import SecretStr

from drflow.audit.redact import Redactor
from drflow.audit.store import DEFAULT_URL, AuditStore, AuditStoreError, mask_url


def open_store(url: str = DEFAULT_URL, *, create: bool = True,
               password: SecretStr | None = None,
               secret_values: Iterable[str | SecretStr] = ()) -> AuditStore:
    """Open the store a URL names: `sqlite:///relative/path`, `sqlite:////abs/path` or
    `postgresql://user@host:port/db` (`password` kept apart from the URL). With
    `create=False` a missing SQLite file or missing tables are an error, not a new store."""
    redactor = Redactor(secret_values)
    if password is not None:
        redactor.add_secret_values([password])
    if url.startswith("sqlite:"):
        from drflow.audit.sqlite_store import SQLiteAuditStore

        if not url.startswith("sqlite:///") or url == "sqlite:///" or ":memory:" in url:
            raise AuditStoreError(
                f"bad SQLite audit URL {url!r}: use sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (a file; in-memory stores are not supported)")
        return SQLiteAuditStore(url[len("sqlite:///"):], create=create, redactor=redactor)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        from drflow.audit.pg_store import PostgresAuditStore

        dsn = "postgresql" + url[len(scheme):]
        return PostgresAuditStore(dsn, create=create, redactor=redactor, password=password)
    raise AuditStoreError(
        f"unsupported audit store URL {mask_url(url)!r}: use sqlite:///path/to/audit.db or "
        "postgresql://user:password@host:port/dbname")
