"""The gateway's durable state in SQLite: seen events and signatures, agents' roles, incidents.

Every method runs a short transaction; the claim of an incident is a compare-and-set on the
group's epoch, so even two gateway processes sharing the file cannot open two incidents at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from orchestrator.gateway.contracts import Incident, IncidentKind
from orchestrator.gateway.sqlite_state import immediate

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_events (
    event_id TEXT PRIMARY KEY, grp TEXT NOT NULL, kind TEXT NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS seen_events_at ON seen_events(seen_at);
CREATE TABLE IF NOT EXISTS seen_signatures (sig TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS seen_signatures_at ON seen_signatures(seen_at);
CREATE TABLE IF NOT EXISTS agents (
    grp TEXT NOT NULL, agent_id TEXT NOT NULL, role TEXT, PRIMARY KEY (grp, agent_id));
CREATE TABLE IF NOT EXISTS group_state (
    grp TEXT PRIMARY KEY, epoch INTEGER NOT NULL DEFAULT 0, open_key TEXT, primary_agent TEXT);
CREATE TABLE IF NOT EXISTS incidents (
    key TEXT PRIMARY KEY, grp TEXT NOT NULL, epoch INTEGER NOT NULL, kind TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT NOT NULL, evidence TEXT NOT NULL,
    first_failure_at TEXT NOT NULL, opened_at REAL NOT NULL, run_id TEXT, error TEXT,
    closed_at REAL, close_outcome TEXT, close_reason TEXT);
CREATE TABLE IF NOT EXISTS holds (
    grp TEXT NOT NULL, agent_id TEXT NOT NULL, key TEXT NOT NULL, until REAL NOT NULL,
    joined INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (grp, agent_id));
"""


@dataclass(frozen=True)
class Hold:
    """A closed incident that further failure reports of its agent still join."""

    key: str
    until: float  # wall clock
    joined: int  # reports joined so far, this one included


class Seen(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REPLAYED = "replayed"


class IncidentStatus(StrEnum):
    STARTING = "starting"  # claimed, start_incident not yet successful
    START_FAILED = "start_failed"  # last attempt failed; retried with the same key
    OPEN = "open"  # run started; waiting for the flow to close it
    CLOSED = "closed"


@dataclass(frozen=True)
class IncidentRecord:
    incident: Incident
    status: IncidentStatus
    opened_at: float
    run_id: str | None
    error: str | None


class GatewayStore:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) below.
            self._db = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash; an OS crash may lose the last commits.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise RuntimeError(
                f"cannot open the gateway state file {path}: {exc}; set state_path to a writable "
                "SQLite file"
            ) from exc

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self._db)

    # -- dedupe ---------------------------------------------------------------------------------

    def record_event(self, event_id: str, signature: str, group: str, kind: str) -> Seen:
        """Remember an accepted event; say if its signature or id was seen before."""
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM seen_signatures WHERE sig = ?", (signature,)).fetchone():
                return Seen.REPLAYED
            cur = db.execute(
                "INSERT OR IGNORE INTO seen_events (event_id, grp, kind, seen_at) VALUES (?,?,?,?)",
                (event_id, group, kind, now),
            )
            if cur.rowcount == 0:
                return Seen.DUPLICATE
            db.execute("INSERT INTO seen_signatures (sig, seen_at) VALUES (?, ?)", (signature, now))
            return Seen.NEW

    def forget_event(self, event_id: str, signature: str) -> None:
        """Undo record_event: the event was not acted on, so its retry must be taken."""
        with self._tx() as db:
            db.execute("DELETE FROM seen_events WHERE event_id = ?", (event_id,))
            db.execute("DELETE FROM seen_signatures WHERE sig = ?", (signature,))

    def prune(self, events_older_than_s: float, signatures_older_than_s: float) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM seen_events WHERE seen_at < ?", (now - events_older_than_s,))
            db.execute(
                "DELETE FROM seen_signatures WHERE seen_at < ?", (now - signatures_older_than_s,)
            )

    # -- agents ---------------------------------------------------------------------------------

    def save_agent(self, group: str, agent_id: str, role: str | None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO agents (grp, agent_id, role) VALUES (?,?,?) "
                "ON CONFLICT (grp, agent_id) DO UPDATE SET role = excluded.role",
                (group, agent_id, role),
            )

    def set_primary(self, group: str, agent_id: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO group_state (grp, primary_agent) VALUES (?, ?) "
                "ON CONFLICT (grp) DO UPDATE SET primary_agent = excluded.primary_agent",
                (group, agent_id),
            )

    def clear_primary(self, group: str, agent_id: str) -> str | None:
        """Forget `agent_id` as the group's primary unless the stored one is another agent by
        now (a writer sharing the file named it); the stored primary afterwards."""
        with self._tx() as db:
            db.execute("UPDATE group_state SET primary_agent = NULL "
                       "WHERE grp = ? AND primary_agent = ?", (group, agent_id))
            row = db.execute("SELECT primary_agent FROM group_state WHERE grp = ?",
                             (group,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def agents(self) -> list[tuple[str, str, str | None]]:
        rows = self._db.execute("SELECT grp, agent_id, role FROM agents").fetchall()
        return [(str(g), str(a), r) for g, a, r in rows]

    def primaries(self) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT grp, primary_agent FROM group_state WHERE primary_agent IS NOT NULL"
        ).fetchall()
        return {str(g): str(a) for g, a in rows}

    def primary_of(self, group: str) -> str | None:
        row = self._db.execute("SELECT primary_agent FROM group_state WHERE grp = ?",
                               (group,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def note_heard(self, group: str, agent_id: str, wall: float,
                   replication: dict[str, Any], primary: bool = False) -> None:
        """Nothing to share: this file belongs to one replica."""

    def heard(self, group: str, agent_id: str) -> tuple[float, dict[str, Any]] | None:
        return None

    # -- incidents ------------------------------------------------------------------------------

    def claim_incident(
        self,
        group: str,
        kind: IncidentKind,
        reason: str,
        evidence: dict[str, Any],
        first_failure_at: datetime,
    ) -> Incident | str:
        """Open the group's next incident; if one is already open, return its key instead."""
        with self._tx() as db:
            row = db.execute(
                "SELECT epoch, open_key FROM group_state WHERE grp = ?", (group,)
            ).fetchone()
            epoch, open_key = (0, None) if row is None else (int(row[0]), row[1])
            if open_key is not None:
                return str(open_key)
            epoch += 1
            incident = Incident(
                group=group, kind=kind, reason=reason, evidence=evidence,
                first_failure_at=first_failure_at, idempotency_key=f"failover:{group}:{epoch}",
            )
            db.execute(
                "INSERT INTO group_state (grp, epoch, open_key) VALUES (?, ?, ?) "
                "ON CONFLICT (grp) DO UPDATE SET epoch = excluded.epoch, open_key = excluded.open_key",
                (group, epoch, incident.idempotency_key),
            )
            db.execute(
                "INSERT INTO incidents (key, grp, epoch, kind, status, reason, evidence, "
                "first_failure_at, opened_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    incident.idempotency_key, group, epoch, kind.value,
                    IncidentStatus.STARTING.value, reason, json.dumps(evidence, default=str),
                    first_failure_at.isoformat(), time.time(),
                ),
            )
            return incident

    def mark_started(self, key: str, run_id: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE incidents SET status = ?, run_id = ?, error = NULL "
                "WHERE key = ? AND status != ?",
                (IncidentStatus.OPEN.value, run_id, key, IncidentStatus.CLOSED.value),
            )

    def mark_start_failed(self, key: str, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE incidents SET status = ?, error = ? WHERE key = ? AND status != ?",
                (IncidentStatus.START_FAILED.value, error, key, IncidentStatus.CLOSED.value),
            )

    def close_incident(
        self, group: str, key: str, outcome: str, reason: str, hold_down_s: float = 0.0
    ) -> bool:
        """Close the group's open incident if it is `key`; False if `key` is not the open one.

        With `hold_down_s`, the incident's agent is held in the same transaction: its further
        failure reports join this incident until then (`join`)."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE group_state SET open_key = NULL WHERE grp = ? AND open_key = ?", (group, key)
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                "UPDATE incidents SET status = ?, closed_at = ?, close_outcome = ?, "
                "close_reason = ? WHERE key = ?",
                (IncidentStatus.CLOSED.value, now, outcome, reason, key),
            )
            row = db.execute("SELECT evidence FROM incidents WHERE key = ?", (key,)).fetchone()
            agent = json.loads(row[0]).get("agent_id") if row else None
            if hold_down_s > 0 and isinstance(agent, str):
                db.execute(
                    "INSERT INTO holds (grp, agent_id, key, until) VALUES (?,?,?,?) "
                    "ON CONFLICT (grp, agent_id) DO UPDATE SET key = excluded.key, "
                    "until = excluded.until, joined = 0",
                    (group, agent, key, now + hold_down_s),
                )
            return True

    def join(self, group: str, agent_id: str) -> Hold | None:
        """Count a failure report of a held agent into its closed incident; None if not held."""
        with self._tx() as db:
            row = db.execute(
                "SELECT key, until, joined FROM holds WHERE grp = ? AND agent_id = ? AND until > ?",
                (group, agent_id, time.time()),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE holds SET joined = joined + 1 WHERE grp = ? AND agent_id = ?",
                       (group, agent_id))
            return Hold(key=str(row[0]), until=float(row[1]), joined=int(row[2]) + 1)

    def release(self, group: str, agent_id: str) -> str | None:
        """End the agent's hold (it reported a recovery: its next report is a new failure)."""
        with self._tx() as db:
            row = db.execute("SELECT key FROM holds WHERE grp = ? AND agent_id = ?",
                             (group, agent_id)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM holds WHERE grp = ? AND agent_id = ?", (group, agent_id))
            return str(row[0])

    def open_incident(self, group: str) -> IncidentRecord | None:
        row = self._db.execute(
            "SELECT i.* FROM group_state g JOIN incidents i ON i.key = g.open_key WHERE g.grp = ?",
            (group,),
        ).fetchone()
        return None if row is None else self._record(row)

    def incident(self, key: str) -> IncidentRecord | None:
        row = self._db.execute("SELECT * FROM incidents WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._record(row)

    def unstarted(self) -> list[IncidentRecord]:
        """Open incidents whose run was never confirmed started (to re-drive after a restart)."""
        rows = self._db.execute(
            "SELECT i.* FROM group_state g JOIN incidents i ON i.key = g.open_key "
            "WHERE i.status IN (?, ?)",
            (IncidentStatus.STARTING.value, IncidentStatus.START_FAILED.value),
        ).fetchall()
        return [self._record(r) for r in rows]

    def running(self) -> list[IncidentRecord]:
        """Open incidents whose run was started and not yet closed."""
        rows = self._db.execute(
            "SELECT i.* FROM group_state g JOIN incidents i ON i.key = g.open_key "
            "WHERE i.status = ?", (IncidentStatus.OPEN.value,),
        ).fetchall()
        return [self._record(r) for r in rows]

    @staticmethod
    def _record(r: sqlite3.Row) -> IncidentRecord:
        incident = Incident(
            group=r["grp"], kind=IncidentKind(r["kind"]), reason=r["reason"],
            evidence=json.loads(r["evidence"]),
            first_failure_at=datetime.fromisoformat(r["first_failure_at"]),
            idempotency_key=r["key"],
        )
        return IncidentRecord(
            incident=incident, status=IncidentStatus(r["status"]), opened_at=float(r["opened_at"]),
            run_id=r["run_id"], error=r["error"],
        )
