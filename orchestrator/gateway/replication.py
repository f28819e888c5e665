"""What the primary's heartbeats said about replication, kept as evidence for the failover.

A dead primary cannot be asked how far its standby was behind; its last heartbeats can. The
failover compares the standby's received LSN with these reports (`flows.decisions.lag_estimate`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from drflow.lsn import lsn_int

HISTORY_S = 120.0


def parse_heartbeat(details: dict[str, Any]) -> tuple[int | None, bool | None]:
    """(the primary's current WAL LSN, whether a synchronous standby was streaming) from
    `details.postgres` of an agent heartbeat; None where the heartbeat does not say."""
    pg = details.get("postgres")
    if not isinstance(pg, dict) or pg.get("role") != "primary":
        return None, None
    replicas = pg.get("replicas")
    sync = None
    if isinstance(replicas, list):
        sync = any(isinstance(r, dict) and r.get("sync_state") in ("sync", "quorum")
                   and r.get("state") == "streaming" for r in replicas)
    return lsn_int(pg.get("wal_lsn")), sync


class ReplicationEvidence:
    """Per agent: recent (wall time, LSN) reports and the last synchronous-standby flag."""

    def __init__(self) -> None:
        self._lsns: dict[tuple[str, str], deque[tuple[float, int]]] = {}
        self._sync: dict[tuple[str, str], bool] = {}

    def record(self, group: str, agent_id: str, details: dict[str, Any],
               now: float | None = None) -> None:
        lsn, sync = parse_heartbeat(details)
        key = (group, agent_id)
        t = time.time() if now is None else now
        if lsn is not None:
            hist = self._lsns.setdefault(key, deque())
            hist.append((t, lsn))
            _prune(hist, t)
        if sync is not None:
            self._sync[key] = sync

    def retain(self, keep: Callable[[str, str], bool]) -> None:
        """Forget the reports of agents for which `keep(group, agent_id)` is False."""
        self._lsns = {k: v for k, v in self._lsns.items() if keep(*k)}
        self._sync = {k: v for k, v in self._sync.items() if keep(*k)}

    def evidence(self, group: str, agent_id: str) -> dict[str, Any]:
        key = (group, agent_id)
        hist = list(self._lsns.get(key, ()))
        out: dict[str, Any] = {"primary_lsn_history": [[round(t, 3), lsn] for t, lsn in hist]}
        if hist:
            out["primary_last_lsn"] = hist[-1][1]
        if key in self._sync:
            out["sync_standby_streaming"] = self._sync[key]
        return out

    def shared(self, group: str, agent_id: str, points: int = 20) -> dict[str, Any]:
        """The recent evidence, small enough to hand to the other replicas at every heartbeat."""
        out = self.evidence(group, agent_id)
        out["primary_lsn_history"] = out["primary_lsn_history"][-points:]
        return out

    def merge(self, group: str, agent_id: str, other: dict[str, Any], other_at: float) -> None:
        """Add what another replica heard (`shared()`, sent at `other_at`) to this one's."""
        key = (group, agent_id)
        hist = self._lsns.setdefault(key, deque())
        points = {t: lsn for t, lsn in hist}
        for t, lsn in other.get("primary_lsn_history") or []:
            points.setdefault(float(t), int(lsn))
        hist.clear()
        hist.extend(sorted(points.items()))
        # Pruned here too: an agent only other replicas hear has no record() to do it.
        _prune(hist, time.time())
        mine = hist[-1][0] if hist else 0.0
        if "sync_standby_streaming" in other and (key not in self._sync or other_at >= mine):
            self._sync[key] = bool(other["sync_standby_streaming"])


def _prune(hist: deque[tuple[float, int]], now: float) -> None:
    """Drop the reports older than HISTORY_S (oldest first in `hist`)."""
    while hist and hist[0][0] < now - HISTORY_S:
        hist.popleft()
