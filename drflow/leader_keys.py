"""The per-group keys in etcd that decide who may take writes (docs/fencing.md has the rules).

- `/drflow/groups/<group>/leader`: who is the primary. Bound to the primary agent's lease while
  it holds it; written by a takeover (bound to the takeover's own short lease) until the promoted
  node's agent adopts it. Its absence after an expiry is the lease fence.
- `/drflow/groups/<group>/sync`: the standby that holds every acknowledged write (`standby`
  null: nobody; a sync group then has no standby that may be promoted automatically). Written
  only by the leader, guarded by the leader key's value, before the primary relaxes
  `synchronous_standby_names`; never bound to a lease.

Values are small JSON objects; `Leader.encode()` is exact so txns can compare a value as written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

PREFIX = "/drflow/groups/"

LeaderBy = Literal["agent", "takeover", "attested"]


def leader_key(group: str) -> str:
    return f"{PREFIX}{group}/leader"


def sync_key(group: str) -> str:
    return f"{PREFIX}{group}/sync"


def group_of(key: str) -> tuple[str, str] | None:
    """(group, "leader" | "sync") for one of our keys, else None."""
    if not key.startswith(PREFIX):
        return None
    group, _, kind = key[len(PREFIX):].rpartition("/")
    return (group, kind) if group and kind in ("leader", "sync") else None


@dataclass(frozen=True)
class Leader:
    """The leader key's value. `by`: the agent holding it, a takeover (promotion in progress,
    `incident` names it), or an operator's attested fence."""

    agent_id: str
    by: LeaderBy = "agent"
    incident: str | None = None
    since: float = 0.0  # epoch seconds, for people; never compared as a clock

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> Leader:
        d = _obj(raw, "leader")
        by = d.get("by", "agent")
        if by not in ("agent", "takeover", "attested"):
            raise ValueError(f"leader key: unknown 'by' {by!r}")
        return cls(agent_id=str(d["agent_id"]), by=by, incident=d.get("incident"),
                   since=float(d.get("since", 0.0)))


@dataclass(frozen=True)
class SyncState:
    """The sync key's value: `standby` holds every write `primary` acknowledged (None: nobody)."""

    primary: str
    standby: str | None
    since: float = 0.0

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> SyncState:
        d = _obj(raw, "sync")
        sb = d.get("standby")
        return cls(primary=str(d["primary"]), standby=None if sb is None else str(sb),
                   since=float(d.get("since", 0.0)))


def _obj(raw: str, what: str) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except ValueError:
        raise ValueError(f"{what} key does not hold JSON") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what} key does not hold a JSON object")
    return d


def renewal_deadline(sent_at: float, ttl_s: float, margin_s: float) -> float:
    """When a holder must have renewed again or fenced itself, on its own monotonic clock.

    Counted from when the last successful renewal was *sent*: etcd restarted the TTL no earlier
    than it received it, so the lease cannot expire in etcd before `sent_at + ttl_s` (less the
    clock-rate drift the margin also covers)."""
    return sent_at + ttl_s - margin_s
