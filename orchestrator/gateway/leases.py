"""Watches every group's leader and sync keys in etcd from the gateway's event loop.

One linearizable range read of `/drflow/groups/` every `lease_poll_s` (blocking HTTP in a
one-thread executor of its own, so a hung etcd never holds the loop or the default pool). A
leader key seen present and then absent is handed to the service (`on_vanished`), which decides
(lease_decide.py) and opens the incident through the same single-flight claim as heartbeat loss.
The first successful read only teaches the watcher what exists: a key already absent when the
gateway started is no news. A failed read changes nothing it knows (an unknown state is not an
expiry); it is counted and logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drflow.etcd import Client, EtcdError, KeyValue
from drflow.leader_keys import PREFIX, Leader, SyncState, group_of
from orchestrator.gateway.lease_decide import (
    Change,
    LeaderSeen,
    leader_change,
    sync_unprotected,
    unreadable,
)
from orchestrator.gateway.metrics import GatewayMetrics

log = logging.getLogger("drflow.gateway.leases")

OnVanished = Callable[[str, LeaderSeen, float, int], None]


@dataclass
class GroupKeys:
    """What the last successful read showed of one group's keys."""

    leader: LeaderSeen | None = None
    sync: SyncState | None = None
    sync_raw: str | None = None


@dataclass
class Snapshot:
    revision: int
    read_at: float  # wall clock
    groups: dict[str, GroupKeys] = field(default_factory=dict)


def parse(revision: int, kvs: list[KeyValue], groups: Collection[str], read_at: float) -> Snapshot:
    """The keys of the configured groups from one range read (others are not ours to judge)."""
    snap = Snapshot(revision, read_at, {g: GroupKeys() for g in groups})
    for kv in kvs:
        where = group_of(kv.key)
        if where is None or where[0] not in snap.groups:
            continue
        keys = snap.groups[where[0]]
        if where[1] == "leader":
            try:
                leader: Leader | None = Leader.decode(kv.value)
            except (ValueError, KeyError, TypeError):
                leader = None
            keys.leader = LeaderSeen(kv.value, leader, kv.mod_revision, kv.lease, revision, read_at)
        else:
            keys.sync_raw = kv.value
            try:
                keys.sync = SyncState.decode(kv.value)
            except (ValueError, KeyError, TypeError):
                keys.sync = None
    return snap


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


class LeaseWatcher:
    """Polls the keys and reports vanished leader keys; `view(group)` for GET /v1/groups."""

    def __init__(self, client: Client, groups: Collection[str], on_vanished: OnVanished,
                 metrics: GatewayMetrics, interval_s: float = 0.1) -> None:
        self.client = client
        self.groups = list(groups)
        self.on_vanished = on_vanished
        self.metrics = metrics
        self.interval_s = interval_s
        self.last: Snapshot | None = None  # the last successful read
        self.error: str | None = None  # why the last read failed; None when it succeeded
        self.failing_since: float | None = None  # wall clock of the outage's first failure
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="etcd-watch")

    def set_groups(self, groups: Collection[str]) -> None:
        """Watch these groups from the next read on (the configuration was reloaded)."""
        for gone in set(self.groups) - set(groups):
            with contextlib.suppress(KeyError):  # never read: no such label
                self.metrics.leader_key_present.remove(gone)
        self.groups = list(groups)

    def read(self) -> Snapshot:
        """One blocking read of every group's keys (runs in the watcher's thread)."""
        revision, kvs = self.client.get_prefix(PREFIX)
        return parse(revision, kvs, self.groups, time.time())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = time.monotonic()
                try:
                    snap = await loop.run_in_executor(self._pool, self.read)
                except EtcdError as exc:
                    self.failed(str(exc))
                except Exception as exc:  # a bug must not end the watch
                    log.exception("reading the leader keys failed")
                    self.failed(f"{type(exc).__name__}: {exc}")
                else:
                    try:
                        self.apply(snap)
                    except Exception:  # a bug must not end the watch either
                        log.exception("comparing the leader keys failed")
                await asyncio.sleep(max(0.0, started + self.interval_s - time.monotonic()))
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def failed(self, error: str) -> None:
        self.metrics.etcd_read_failures.inc()
        self.metrics.etcd_up.set(0)
        if self.error is None:
            self.failing_since = time.time()
            log.warning("%s", unreadable(error).reason)
        self.error = error

    def apply(self, snap: Snapshot) -> None:
        """Compare a successful read with the last one and report each vanished leader key."""
        if self.error is not None:
            log.warning("etcd answers again (unreadable since %s)", _iso(self.failing_since))
        self.error, self.failing_since = None, None
        self.metrics.etcd_up.set(1)
        before, self.last = self.last, snap
        watched = set(self.groups)
        for group, keys in snap.groups.items():
            if group not in watched:  # removed from the configuration while this read ran
                continue
            self.metrics.leader_key_present.labels(group).set(1 if keys.leader else 0)
            # A group added since the last read: this read only teaches what exists, as the
            # first read after start does.
            known = before.groups.get(group) if before is not None else None
            prev = known.leader if known is not None else None
            change = leader_change(prev, keys.leader, learned=known is not None)
            if change is Change.VANISHED:
                assert prev is not None
                try:
                    self.on_vanished(group, prev, snap.read_at, snap.revision)
                except Exception:  # one group's trouble must not hide the others' news
                    log.exception("group %s: acting on its vanished leader key failed", group)
            elif change in (Change.TAKEN_OVER, Change.REPLACED, Change.APPEARED):
                now = keys.leader.leader if keys.leader else None
                log.info("group %s: leader key %s: now %s", group, change.value,
                         f"{now.agent_id} (by {now.by})" if now else "not a leader value")

    def view(self, group: str) -> dict[str, Any]:
        """The group's keys as people read them, and whether etcd answers."""
        return keys_view(self.last, group, self.error, self.failing_since)


def keys_view(snap: Snapshot | None, group: str, error: str | None = None,
              failing_since: float | None = None) -> dict[str, Any]:
    """One group's leader holder (or absent), its sync key's standby, and what that means."""
    out: dict[str, Any] = {"etcd": "reachable" if error is None else "unreachable"}
    if error is not None:
        since = f" since {_iso(failing_since)}" if failing_since else ""
        out["etcd_error"] = f"etcd unreachable{since}: {error}" + (
            "; the keys below are as last read" if snap is not None else "")
    if snap is None:
        out.update(read_at=None, leader=None, leader_holder="unknown (etcd not read)", sync=None)
        return out
    keys = snap.groups.get(group, GroupKeys())
    seen = keys.leader
    out["read_at"] = _iso(snap.read_at)
    if seen is None:
        out["leader"], out["leader_holder"] = None, "absent"
    elif seen.leader is None:
        out["leader"], out["leader_holder"] = {"raw": seen.raw[:200]}, "unreadable value"
    else:
        ld = seen.leader
        out["leader"] = {"agent_id": ld.agent_id, "by": ld.by, "incident": ld.incident,
                         "since": _iso(ld.since) if ld.since else None,
                         "mod_revision": seen.mod_revision}
        out["leader_holder"] = ld.agent_id
    sync = keys.sync
    out["sync"] = None if sync is None else {"primary": sync.primary, "standby": sync.standby,
                                             "since": _iso(sync.since) if sync.since else None}
    if keys.sync_raw is not None and sync is None:
        out["sync"] = {"raw": keys.sync_raw[:200]}
    reason = sync_unprotected(sync)
    if reason is not None:
        out["protection"], out["protection_reason"] = "unprotected", reason
    return out
