"""etcd steps of the runbooks: read a group's leader and sync keys, the takeover txn, the sync
key written before a promoted primary relaxes synchronous replication (docs/fencing.md)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from drflow.etcd import Client, EtcdError, KeyValue, absent, put_op, range_op, value_is
from drflow.leader_keys import Leader, SyncState, leader_key, sync_key

TAKEOVER_LEASE_S = 30  # until the promoted node's agent adopts the key (rule 1)


@dataclass(frozen=True)
class Keys:
    """A group's keys as read at one revision."""

    revision: int
    leader_raw: str | None = None
    leader_mod_revision: int = 0
    sync_raw: str | None = None

    @property
    def leader(self) -> Leader | None:
        return _leader(self.leader_raw)

    @property
    def sync(self) -> SyncState | None:
        if self.sync_raw is None:
            return None
        try:
            return SyncState.decode(self.sync_raw)
        except (ValueError, KeyError):
            return None


def _leader(raw: str | None) -> Leader | None:
    if raw is None:
        return None
    try:
        return Leader.decode(raw)
    except (ValueError, KeyError):  # unreadable: treat as somebody else's, never as absent
        return Leader(agent_id="<unreadable leader value>", by="agent")


def read_keys(client: Client, group: str, timeout: float | None = None) -> Keys:
    """Both keys in one linearizable read (EtcdError when etcd cannot serve it)."""
    lk, sk = leader_key(group), sync_key(group)
    r = client.call("/kv/txn", {"compare": [], "success": [range_op(lk), range_op(sk)]},
                    timeout)
    return _keys_from(list(r.get("responses") or []), lk, sk)


def _keys_from(responses: list[dict[str, Any]], lk: str, sk: str) -> Keys:
    found: dict[str, KeyValue] = {}
    revision = 0
    for r in responses:
        rr = r.get("response_range") or {}
        revision = max(revision, int((rr.get("header") or {}).get("revision", 0)))
        for kv in rr.get("kvs") or []:
            parsed = KeyValue.parse(kv)
            found[parsed.key] = parsed
    ld, sy = found.get(lk), found.get(sk)
    return Keys(revision=revision, leader_raw=ld.value if ld else None,
                leader_mod_revision=ld.mod_revision if ld else 0,
                sync_raw=sy.value if sy else None)


@dataclass(frozen=True)
class Takeover:
    succeeded: bool
    leader_raw: str  # the value written (or that would have been)
    lease: int
    lease_ttl: int
    after: Keys  # on failure: the keys as the txn saw them


def take_over(client: Client, group: str, leader: Leader, expect_leader_raw: str | None,
              expect_sync_raw: str | None, ttl: int = TAKEOVER_LEASE_S,
              sync_absent: bool = False) -> Takeover:
    """ONE txn: the leader key is absent (or still holds exactly `expect_leader_raw`) and, when
    given, the sync key holds exactly `expect_sync_raw` (or, `sync_absent`, does not exist)
    → write `leader` bound to a new lease. On failure both keys are read in the same txn, so
    the caller can say why."""
    lk, sk = leader_key(group), sync_key(group)
    lease, granted = client.grant(ttl)
    compare = [absent(lk) if expect_leader_raw is None else value_is(lk, expect_leader_raw)]
    if expect_sync_raw is not None:
        compare.append(value_is(sk, expect_sync_raw))
    elif sync_absent:
        compare.append(absent(sk))
    raw = leader.encode()
    ok, resp = client.txn(compare, [put_op(lk, raw, lease)], [range_op(lk), range_op(sk)])
    if not ok:
        with contextlib.suppress(EtcdError):  # else it expires on its own
            client.revoke(lease)
        return Takeover(False, raw, lease, granted, _keys_from(resp, lk, sk))
    return Takeover(True, raw, lease, granted, Keys(revision=0, leader_raw=raw))


def write_sync_none(client: Client, group: str, primary: str,
                    guard_leader_raw: str) -> tuple[bool, str]:
    """Write the sync key `SyncState(primary, standby=None)` guarded by the leader key's exact
    value: (written or already so, why)."""
    lk, sk = leader_key(group), sync_key(group)
    value = SyncState(primary=primary, standby=None, since=time.time()).encode()
    ok, resp = client.txn([value_is(lk, guard_leader_raw)], [put_op(sk, value)],
                          [range_op(lk), range_op(sk)])
    if ok:
        return True, f"sync key written: primary {primary}, no standby"
    keys = _keys_from(resp, lk, sk)
    cur = keys.sync
    if cur is not None and cur.primary == primary and cur.standby is None:
        return True, f"sync key already says primary {primary}, no standby"
    ld = keys.leader
    if ld is not None and ld.agent_id == primary and keys.leader_raw is not None \
            and keys.leader_raw != guard_leader_raw:
        # The promoted node's agent adopted the key meanwhile: guard with its value instead.
        return write_sync_none(client, group, primary, keys.leader_raw)
    who = f"{ld.agent_id} (by {ld.by})" if ld else "nobody"
    return False, f"the leader key names {who}, not {primary}: sync key not written"


def hand_over(client: Client, group: str, to_vm: str, why: str) -> tuple[bool, str]:
    """A planned switchover's leader key: name `to_vm` (by takeover, bound to a takeover lease),
    replacing exactly what was read, so the promoted node's agent adopts it and the old
    primary's agent, finding another name, stays down. (done or already so, why)."""
    keys = read_keys(client, group)
    cur = keys.leader
    if cur is not None and cur.agent_id == to_vm:
        return True, f"the leader key already names {to_vm} (by {cur.by})"
    new = Leader(agent_id=to_vm, by="takeover", incident=why, since=time.time())
    t = take_over(client, group, new, keys.leader_raw, None)
    if t.succeeded:
        held = f"{cur.agent_id} (by {cur.by})" if cur else "nobody"
        return True, f"leader key handed from {held} to {to_vm}"
    after = t.after.leader
    if after is not None and after.agent_id == to_vm:
        return True, f"the leader key already names {to_vm} (by {after.by})"
    who = f"{after.agent_id} (by {after.by})" if after else "nobody"
    return False, f"the leader key changed under the switchover (now {who}): not handed over"
