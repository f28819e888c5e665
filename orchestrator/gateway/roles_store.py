"""The gateway's roles records and agents' sides, kept in its SQLite state file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator.gateway.roles_decide import RolesRecord
from orchestrator.gateway.sqlite_state import SqliteState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS group_roles (
    grp TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agent_sites (
    grp TEXT NOT NULL, agent_id TEXT NOT NULL, site TEXT NOT NULL, PRIMARY KEY (grp, agent_id));
"""


class RolesStore(SqliteState):
    """Roles records and agents' sides, in the gateway's SQLite state file (own tables)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    def get(self, group: str) -> RolesRecord | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM group_roles WHERE grp = ?",
                                   (group,)).fetchone()
        return None if row is None else RolesRecord.model_validate_json(row[0])

    def change(self, group: str, fn: Callable[[RolesRecord | None], RolesRecord | None]
               ) -> RolesRecord | None:
        """Store what `fn` makes of the stored record (None: there is none yet), in one write
        transaction: no other writer of the file can change the record between the read and
        the write. The record written, or None when `fn` returned None or what it was given
        (nothing written)."""
        with self._tx() as db:
            row = db.execute("SELECT record FROM group_roles WHERE grp = ?", (group,)).fetchone()
            current = RolesRecord.model_validate_json(row[0]) if row else None
            new = fn(current)
            if new is None or new is current:
                return None
            db.execute("INSERT INTO group_roles (grp, record) VALUES (?, ?) ON CONFLICT (grp) "
                       "DO UPDATE SET record = excluded.record", (group, new.model_dump_json()))
            return new

    def agent_site(self, group: str, agent_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT site FROM agent_sites WHERE grp = ? AND agent_id = ?",
                                   (group, agent_id)).fetchone()
        return None if row is None else str(row[0])

    def set_agent_site(self, group: str, agent_id: str, site: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO agent_sites (grp, agent_id, site) VALUES (?,?,?) "
                       "ON CONFLICT (grp, agent_id) DO UPDATE SET site = excluded.site",
                       (group, agent_id, site))

