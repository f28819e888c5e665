"""Each Slack request's ledger in this gateway's SQLite state file (own table)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from drflow.approval import Ledger
from orchestrator.gateway.sqlite_state import SqliteState


class LedgerStore(SqliteState):
    """Each request's ledger, in the gateway's state file (own table), for restarts and replicas."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "CREATE TABLE IF NOT EXISTS approvals (run_id TEXT PRIMARY KEY, "
                               "grp TEXT NOT NULL, ledger TEXT NOT NULL, updated_at REAL NOT NULL)")

    def get(self, run_id: str) -> Ledger:
        with self._lock:
            row = self._db.execute("SELECT ledger FROM approvals WHERE run_id = ?",
                                   (run_id,)).fetchone()
        return Ledger() if row is None else ledger_of(json.loads(row[0]))

    def put(self, run_id: str, group: str, before: Ledger, after: Ledger) -> bool:
        """Store `after` only if the stored ledger is still `before` (another replica may race)."""
        with self._tx() as db:
            row = db.execute("SELECT ledger FROM approvals WHERE run_id = ?",
                             (run_id,)).fetchone()
            if not is_stored(json.loads(row[0]) if row else None, before):
                return False  # nothing written: the transaction ends empty
            db.execute(
                "INSERT INTO approvals (run_id, grp, ledger, updated_at) VALUES (?,?,?,?) "
                "ON CONFLICT (run_id) DO UPDATE SET ledger = excluded.ledger, "
                "updated_at = excluded.updated_at",
                (run_id, group, json.dumps(asdict(after)), time.time()))
            return True


def ledger_of(d: dict[str, Any]) -> Ledger:
    return Ledger(approvals=tuple(d["approvals"]), decided=d["decided"],
                  decided_by=tuple(d["decided_by"]), comment=d.get("comment", ""))


def is_stored(stored: dict[str, Any] | None, ledger: Ledger) -> bool:
    """Is the stored JSON (None: nothing stored yet) this ledger? Extra stored fields aside."""
    return (ledger_of(stored) if stored is not None else Ledger()) == ledger
