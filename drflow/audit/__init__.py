"""Tamper-evident audit trail: append-only, hash-chained records with secrets redacted.

Names are imported on first use, so that `drflow --help` does not pay for pydantic here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drflow.audit.export import (
        export_to_file,
        export_to_s3,
        read_export_head,
        verify_export,
    )
    from drflow.audit.open import open_store
    from drflow.audit.records import GENESIS, AuditRecord, VerifyResult
    from drflow.audit.redact import REDACTED, Redactor
    from drflow.audit.steps import AuditedStep, audited
    from drflow.audit.store import DEFAULT_URL, AuditStore, AuditStoreError

_WHERE = {
    "export_to_file": "export", "export_to_s3": "export", "read_export_head": "export",
    "verify_export": "export", "GENESIS": "records", "AuditRecord": "records",
    "VerifyResult": "records", "REDACTED": "redact", "Redactor": "redact",
    "AuditedStep": "steps", "audited": "steps", "DEFAULT_URL": "store", "AuditStore": "store",
    "AuditStoreError": "store", "open_store": "open",
}

__all__ = [
    "DEFAULT_URL",
    "GENESIS",
    "REDACTED",
    "AuditRecord",
    "AuditStore",
    "AuditStoreError",
    "AuditedStep",
    "Redactor",
    "VerifyResult",
    "audited",
    "export_to_file",
    "export_to_s3",
    "open_store",
    "read_export_head",
    "verify_export",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"drflow.audit.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'drflow.audit' has no attribute {name!r}")
