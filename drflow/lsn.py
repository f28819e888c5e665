"""PostgreSQL WAL positions ('16/B374D848') as integers, to compare and subtract."""

from __future__ import annotations

from typing import Any


def lsn_int(lsn: Any) -> int | None:
    """The byte position of an LSN string; None for anything that is not one."""
    if not isinstance(lsn, str) or "/" not in lsn:
        return None
    hi, lo = lsn.split("/", 1)
    try:
        return (int(hi, 16) << 32) + int(lo, 16)
    except ValueError:
        return None
