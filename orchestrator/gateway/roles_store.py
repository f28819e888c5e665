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

    def put(self, rec: RolesRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO group_roles (grp, record) VALUES (?, ?) ON CONFLICT (grp) "
                       "DO UPDATE SET record = excluded.record", (rec.group, rec.model_dump_json()))

    def claim_reprotect(self, group: str, expected: RolesRecord, key: str) -> bool:
        """Mark `key` started unless the record changed since `expected` was read."""
        with self._tx() as db:
            row = db.execute("SELECT record FROM group_roles WHERE grp = ?", (group,)).fetchone()
            current = RolesRecord.model_validate_json(row[0]) if row else None
            if current is not None and current.reprotect_key == key:
                return False
            base = current or expected
            claimed = base.model_copy(update={"reprotect_key": key})
            db.execute("INSERT INTO group_roles (grp, record) VALUES (?, ?) ON CONFLICT (grp) "
                       "DO UPDATE SET record = excluded.record", (group, claimed.model_dump_json()))
            return True

    def modify(self, group: str, change: Callable[[RolesRecord], RolesRecord | None]
               ) -> RolesRecord | None:
        """Apply `change` to the stored record in one transaction; the new record, or None when
        there is none or `change` returned None (nothing written)."""
        with self._tx() as db:
            row = db.execute("SELECT record FROM group_roles WHERE grp = ?", (group,)).fetchone()
            if row is None:
                return None
            new = change(RolesRecord.model_validate_json(row[0]))
            if new is not None:
                db.execute("UPDATE group_roles SET record = ? WHERE grp = ?",
                           (new.model_dump_json(), group))
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

