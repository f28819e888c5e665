"""The gateway's state in etcd, shared by every replica: any replica can answer any agent or click.

Same methods as the SQLite stores (store.py, roles_store.py, ledger_store.py). Every
change is one etcd transaction guarded by the revision it read, so two replicas racing for the
same incident, event or ledger cannot both win: the loser reads again and sees the winner's
write. What only needs to be remembered for a while (seen events and signatures, hold-downs,
closed incidents) is bound to leases and expires in etcd; nothing needs pruning.

Keys, under `/drflow/gateway/` (values JSON):
- `event/<id>`, `sig/<sha256 of the signature>`: the replay cache.
- `group/<group>`: `{epoch, open_key}`, the single-flight of incidents.
- `incident/<key>`: one incident, its status and its run.
- `hold/<group>/<agent>`, `agent/<group>/<agent>`, `primary/<group>`, `heard/<group>/<agent>`.
- `replica/<lease>`: a live replica, bound to its own short lease. Each incident names the
  replica that drives it (`owner`); a replica whose lease expired leaves its incidents to be
  adopted and driven by another (`orphans`, `adopt`).
- `roles/<group>`, `site/<group>/<agent>`: roles records and agents' sides (roles.py).
- `approval/<run id>`: a Slack request's ledger (slack_actions.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Any, TypeVar

from drflow.approval import Ledger
from drflow.etcd import (
    Client,
    EtcdError,
    EtcdLeaseNotFound,
    KeyValue,
    absent,
    b64,
    delete_op,
    mod_revision_is,
    put_op,
)
from orchestrator.gateway.contracts import Incident, IncidentKind
from orchestrator.gateway.ledger_store import is_stored, ledger_of
from orchestrator.gateway.roles_decide import RolesRecord
from orchestrator.gateway.store import Hold, IncidentRecord, IncidentStatus, Seen

T = TypeVar("T")
log = logging.getLogger("drflow.gateway")

PREFIX = "/drflow/gateway/"
# A compare-and-set that lost to another replica reads again; this many losses in a row is
# contention no real deployment has: an error rather than a loop.
_CAS_TRIES = 20
# Closed incidents and approval ledgers stay this long (history lives in the audit store).
_KEEP_CLOSED_S = 7 * 24 * 3600.0


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True, separators=(",", ":"))


def _sig_hash(signature: str) -> str:
    return hashlib.sha256(signature.encode()).hexdigest()


def _guard(key: str, kv: KeyValue | None) -> dict[str, Any]:
    """Compare: the key is still as read (absent, or not written since)."""
    return absent(key) if kv is None else mod_revision_is(key, kv.mod_revision)


class ExpiryLeases:
    """Leases for keys that must live at least `ttl_s`: one lease per slice of time, shared by
    every key written in it, so expiring keys cost no grant per write."""

    def __init__(self, client: Client, ttl_s: float) -> None:
        self._client = client
        self._slice = max(1.0, min(ttl_s / 4, 300.0))
        self._ttl = math.ceil(ttl_s + self._slice)
        self._lease = 0
        self._granted_at = -math.inf
        self._lock = threading.Lock()

    def current(self) -> int:
        with self._lock:
            if time.monotonic() - self._granted_at >= self._slice:
                self._lease, _ = self._client.grant(self._ttl)
                self._granted_at = time.monotonic()
            return self._lease

    def forget(self) -> None:
        """The lease was refused (revoked, or etcd lost it): the next call grants a new one."""
        with self._lock:
            self._granted_at = -math.inf


class _EtcdState:
    def __init__(self, client: Client) -> None:
        self._etcd = client

    def close(self) -> None:
        pass

    def _get(self, key: str) -> KeyValue | None:
        return self._etcd.get_kv(PREFIX + key)

    def _load(self, key: str) -> tuple[KeyValue | None, Any]:
        kv = self._get(key)
        return kv, (json.loads(kv.value) if kv is not None else None)

    def _prefix(self, prefix: str) -> list[Any]:
        _, kvs = self._etcd.get_prefix(PREFIX + prefix)
        return [json.loads(kv.value) for kv in kvs]

    def _put(self, key: str, value: Any, lease: int = 0) -> None:
        self._etcd.put(PREFIX + key, _json(value), lease)

    def _txn(self, guards: list[tuple[str, KeyValue | None]],
             puts: list[tuple[str, Any, int]]) -> bool:
        """Write every put if every guarded key is still as read; False when another won."""
        ok, _ = self._etcd.txn([_guard(PREFIX + k, kv) for k, kv in guards],
                               [put_op(PREFIX + k, _json(v), lease) for k, v, lease in puts])
        return ok

    @staticmethod
    def _with_leases(write: Callable[[], T], *pools: ExpiryLeases) -> T:
        """`write` (which takes its leases from `pools`); once more with new leases when etcd
        no longer has one it used (revoked, or lost with a member's state)."""
        try:
            return write()
        except EtcdLeaseNotFound:
            for pool in pools:
                pool.forget()
            return write()


def _contended(what: str) -> EtcdError:
    return EtcdError(f"{what}: {_CAS_TRIES} writes in a row lost to other gateway replicas")


class EtcdGatewayStore(_EtcdState):
    """Seen events, agents, incidents and hold-downs (store.GatewayStore's methods) in etcd."""

    def __init__(self, client: Client, event_retention_s: float, signature_retention_s: float,
                 hold_down_s: float) -> None:
        super().__init__(client)
        self._events = ExpiryLeases(client, event_retention_s)
        self._signatures = ExpiryLeases(client, signature_retention_s)
        self._holds = ExpiryLeases(client, max(hold_down_s, 1.0))
        self._closed = ExpiryLeases(client, _KEEP_CLOSED_S)
        self.owner = 0  # this replica's lease (join_as_replica)

    # -- replicas -------------------------------------------------------------------------------

    def join_as_replica(self, ttl_s: int) -> int:
        """Say this replica is alive, for `ttl_s` unless kept alive; returns its lease."""
        lease, _ = self._etcd.grant(ttl_s)
        self._put(f"replica/{lease}", {"since": time.time()}, lease)
        self.owner = lease
        return lease

    def close(self) -> None:
        """Leave as a replica at once (best effort): the others adopt this one's incidents now,
        not when its lease runs out."""
        lease, self.owner = self.owner, 0
        if not lease:
            return
        try:
            self._etcd.revoke(lease)
        except EtcdLeaseNotFound:
            pass  # already ran out
        except EtcdError as exc:  # it runs out on its own within its TTL
            log.warning("could not end this replica's liveness lease %d: %s", lease, exc)

    def keep_replica_alive(self, ttl_s: int) -> bool:
        """Renew this replica's lease; False when it had expired (a new one is taken: what it
        owned may have been adopted meanwhile)."""
        if self.owner and self._etcd.keepalive(self.owner) > 0:
            return True
        self.join_as_replica(ttl_s)
        return False

    def orphans(self, include_running: bool) -> list[IncidentRecord]:
        """Open incidents whose replica is gone: not yet started, or (`include_running`) started
        in a process that went with it."""
        wanted = (IncidentStatus.STARTING, IncidentStatus.START_FAILED) + (
            (IncidentStatus.OPEN,) if include_running else ())
        _, replicas = self._etcd.get_prefix(PREFIX + "replica/")
        alive = {kv.lease for kv in replicas}
        out = []
        for state in self._prefix("group/"):
            key = state.get("open_key")
            row = self._load(f"incident/{key}")[1] if key else None
            if row is not None and row.get("owner") not in alive and row["status"] in wanted:
                out.append(_record(row))
        return out

    def adopt(self, key: str, reason: str) -> bool:
        """Make this replica the driver of an orphaned incident (one adopter wins)."""
        _, replicas = self._etcd.get_prefix(PREFIX + "replica/")
        alive = {kv.lease for kv in replicas}
        kv, row = self._load(f"incident/{key}")
        if row is None or row["status"] == IncidentStatus.CLOSED.value or row.get("owner") in alive:
            return False
        return self._txn([(f"incident/{key}", kv)], [(f"incident/{key}", {
            **row, "owner": self.owner, "status": IncidentStatus.START_FAILED.value,
            "error": reason}, 0)])

    # -- dedupe ---------------------------------------------------------------------------------

    def record_event(self, event_id: str, signature: str, group: str, kind: str) -> Seen:
        sig_key = PREFIX + "sig/" + _sig_hash(signature)
        event_key = PREFIX + "event/" + event_id
        now = time.time()

        def write() -> tuple[bool, list[dict[str, Any]]]:
            return self._etcd.txn(
                [absent(sig_key), absent(event_key)],
                [put_op(sig_key, _json({"event_id": event_id, "at": now}),
                        self._signatures.current()),
                 put_op(event_key, _json({"group": group, "kind": kind, "at": now}),
                        self._events.current())],
                [{"request_range": {"key": b64(sig_key), "count_only": True}}])

        ok, responses = self._with_leases(write, self._signatures, self._events)
        if ok:
            return Seen.NEW
        seen_sig = int(responses[0].get("response_range", {}).get("count", 0)) if responses else 0
        return Seen.REPLAYED if seen_sig else Seen.DUPLICATE

    def forget_event(self, event_id: str, signature: str) -> None:
        """Undo record_event: the event was not acted on, so its retry must be taken."""
        self._etcd.txn([], [delete_op(PREFIX + "sig/" + _sig_hash(signature)),
                            delete_op(PREFIX + "event/" + event_id)])

    def prune(self, events_older_than_s: float, signatures_older_than_s: float) -> None:
        """Nothing to do: seen events and signatures expire with their leases."""

    # -- agents ---------------------------------------------------------------------------------

    def save_agent(self, group: str, agent_id: str, role: str | None) -> None:
        self._put(f"agent/{group}/{agent_id}", {"group": group, "agent_id": agent_id, "role": role})

    def set_primary(self, group: str, agent_id: str) -> None:
        self._put(f"primary/{group}", {"group": group, "agent_id": agent_id})

    def clear_primary(self, group: str, agent_id: str) -> str | None:
        """Forget `agent_id` as the group's primary unless the shared one is another agent by
        now (another replica heard that one claim it); the shared primary afterwards."""
        key = PREFIX + f"primary/{group}"
        for _ in range(_CAS_TRIES):
            kv = self._etcd.get_kv(key)
            current = str(json.loads(kv.value)["agent_id"]) if kv else None
            if current != agent_id:
                return current
            ok, _ = self._etcd.txn([_guard(key, kv)], [delete_op(key)])
            if ok:
                return None
        raise _contended(f"forgetting the primary of group {group}")

    def agents(self) -> list[tuple[str, str, str | None]]:
        return [(str(v["group"]), str(v["agent_id"]), v.get("role")) for v in self._prefix("agent/")]

    def primaries(self) -> dict[str, str]:
        return {str(v["group"]): str(v["agent_id"]) for v in self._prefix("primary/")}

    def primary_of(self, group: str) -> str | None:
        _, v = self._load(f"primary/{group}")
        return str(v["agent_id"]) if v else None

    def note_heard(self, group: str, agent_id: str, wall: float,
                   replication: dict[str, Any], primary: bool = False) -> None:
        """Tell the other replicas when the agent was heard and what it said of replication;
        with `primary`, that it is the group's primary too (in the same write)."""
        def write() -> None:
            puts: list[tuple[str, Any, int]] = [(f"heard/{group}/{agent_id}", {
                "at": wall, "replication": replication}, self._events.current())]
            if primary:
                puts.append((f"primary/{group}", {"group": group, "agent_id": agent_id}, 0))
            self._txn([], puts)
        self._with_leases(write, self._events)

    def heard(self, group: str, agent_id: str) -> tuple[float, dict[str, Any]] | None:
        """(when any replica last heard the agent, its replication reports), if one said so."""
        _, v = self._load(f"heard/{group}/{agent_id}")
        return (float(v["at"]), dict(v.get("replication") or {})) if v else None

    # -- incidents ------------------------------------------------------------------------------

    def claim_incident(self, group: str, kind: IncidentKind, reason: str,
                       evidence: dict[str, Any], first_failure_at: datetime) -> Incident | str:
        for _ in range(_CAS_TRIES):
            gkv, state = self._load(f"group/{group}")
            state = state or {"epoch": 0, "open_key": None}
            if state.get("open_key"):
                return str(state["open_key"])
            epoch = int(state["epoch"]) + 1
            incident = Incident(group=group, kind=kind, reason=reason, evidence=evidence,
                                first_failure_at=first_failure_at,
                                idempotency_key=f"failover:{group}:{epoch}")
            row = {"key": incident.idempotency_key, "grp": group, "epoch": epoch,
                   "kind": kind.value, "status": IncidentStatus.STARTING.value, "reason": reason,
                   "evidence": evidence, "first_failure_at": first_failure_at.isoformat(),
                   "opened_at": time.time(), "run_id": None, "error": None,
                   "owner": self.owner}
            if self._txn([(f"group/{group}", gkv)],
                         [(f"group/{group}", {"epoch": epoch,
                                              "open_key": incident.idempotency_key}, 0),
                          (f"incident/{incident.idempotency_key}", row, 0)]):
                return incident
        raise _contended(f"claiming an incident of group {group}")

    def _update_incident(self, key: str, change: dict[str, Any]) -> None:
        for _ in range(_CAS_TRIES):
            kv, row = self._load(f"incident/{key}")
            if row is None or row["status"] == IncidentStatus.CLOSED.value:
                return
            if self._txn([(f"incident/{key}", kv)], [(f"incident/{key}", {**row, **change}, 0)]):
                return
        raise _contended(f"updating incident {key}")

    def mark_started(self, key: str, run_id: str) -> None:
        self._update_incident(key, {"status": IncidentStatus.OPEN.value, "run_id": run_id,
                                    "error": None})

    def mark_start_failed(self, key: str, error: str) -> None:
        self._update_incident(key, {"status": IncidentStatus.START_FAILED.value, "error": error})

    def close_incident(self, group: str, key: str, outcome: str, reason: str,
                       hold_down_s: float = 0.0) -> bool:
        for _ in range(_CAS_TRIES):
            done = self._close_once(group, key, outcome, reason, hold_down_s)
            if done is not None:
                return done
        raise _contended(f"closing incident {key}")

    def _close_once(self, group: str, key: str, outcome: str, reason: str,
                    hold_down_s: float) -> bool | None:
        """One attempt: True closed, False not open (any more), None another replica wrote
        first (read again)."""
        gkv, state = self._load(f"group/{group}")
        if not state or state.get("open_key") != key:
            return False
        ikv, row = self._load(f"incident/{key}")
        now = time.time()

        def write() -> bool:
            puts: list[tuple[str, Any, int]] = [(f"group/{group}", {**state, "open_key": None}, 0)]
            if row is not None:
                closed = {**row, "status": IncidentStatus.CLOSED.value, "closed_at": now,
                          "close_outcome": outcome, "close_reason": reason}
                puts.append((f"incident/{key}", closed, self._closed.current()))
                agent = row["evidence"].get("agent_id")
                if hold_down_s > 0 and isinstance(agent, str):
                    puts.append((f"hold/{group}/{agent}",
                                 {"key": key, "until": now + hold_down_s, "joined": 0},
                                 self._holds.current()))
            return self._txn([(f"group/{group}", gkv), (f"incident/{key}", ikv)], puts)

        # Leases etcd no longer has (lost with a member's state) are replaced, not waited out.
        return True if self._with_leases(write, self._closed, self._holds) else None

    def join(self, group: str, agent_id: str) -> Hold | None:
        for _ in range(_CAS_TRIES):
            kv, hold = self._load(f"hold/{group}/{agent_id}")
            if hold is None or float(hold["until"]) <= time.time():
                return None
            assert kv is not None
            joined = int(hold["joined"]) + 1
            if self._txn([(f"hold/{group}/{agent_id}", kv)],
                         [(f"hold/{group}/{agent_id}", {**hold, "joined": joined}, kv.lease)]):
                return Hold(key=str(hold["key"]), until=float(hold["until"]), joined=joined)
        raise _contended(f"joining agent {agent_id} to its hold-down")

    def release(self, group: str, agent_id: str) -> str | None:
        r = self._etcd.call("/kv/deleterange",
                            {"key": b64(PREFIX + f"hold/{group}/{agent_id}"), "prev_kv": True})
        prev = [KeyValue.parse(kv) for kv in r.get("prev_kvs") or []]
        return str(json.loads(prev[0].value)["key"]) if prev else None

    def open_incident(self, group: str) -> IncidentRecord | None:
        _, state = self._load(f"group/{group}")
        key = state.get("open_key") if state else None
        return self.incident(key) if key else None

    def incident(self, key: str) -> IncidentRecord | None:
        _, row = self._load(f"incident/{key}")
        return None if row is None else _record(row)

    def _open(self, statuses: tuple[IncidentStatus, ...]) -> list[IncidentRecord]:
        out = []
        for state in self._prefix("group/"):
            rec = self.incident(state["open_key"]) if state.get("open_key") else None
            if rec is not None and rec.status in statuses:
                out.append(rec)
        return out

    def unstarted(self) -> list[IncidentRecord]:
        return self._open((IncidentStatus.STARTING, IncidentStatus.START_FAILED))

    def running(self) -> list[IncidentRecord]:
        return self._open((IncidentStatus.OPEN,))


def _record(r: dict[str, Any]) -> IncidentRecord:
    incident = Incident(group=r["grp"], kind=IncidentKind(r["kind"]), reason=r["reason"],
                        evidence=r["evidence"],
                        first_failure_at=datetime.fromisoformat(r["first_failure_at"]),
                        idempotency_key=r["key"])
    return IncidentRecord(incident=incident, status=IncidentStatus(r["status"]),
                          opened_at=float(r["opened_at"]), run_id=r.get("run_id"),
                          error=r.get("error"))


class EtcdRolesStore(_EtcdState):
    """Roles records and agents' sides (roles_store.RolesStore's methods) in etcd."""

    def get(self, group: str) -> RolesRecord | None:
        kv = self._get(f"roles/{group}")
        return None if kv is None else RolesRecord.model_validate_json(kv.value)

    def change(self, group: str, fn: Callable[[RolesRecord | None], RolesRecord | None]
               ) -> RolesRecord | None:
        """Store what `fn` makes of the stored record (None: there is none yet), only if no
        other replica wrote it since it was read; otherwise read it again and call `fn` again.
        The record written, or None when `fn` returned None or what it was given (nothing
        written)."""
        key = PREFIX + f"roles/{group}"
        for _ in range(_CAS_TRIES):
            kv = self._etcd.get_kv(key)
            current = RolesRecord.model_validate_json(kv.value) if kv else None
            new = fn(current)
            if new is None or new is current:
                return None
            ok, _ = self._etcd.txn([_guard(key, kv)], [put_op(key, new.model_dump_json())])
            if ok:
                return new
        raise _contended(f"changing the roles record of group {group}")

    def agent_site(self, group: str, agent_id: str) -> str | None:
        _, v = self._load(f"site/{group}/{agent_id}")
        return str(v["site"]) if v else None

    def set_agent_site(self, group: str, agent_id: str, site: str) -> None:
        self._put(f"site/{group}/{agent_id}", {"site": site})


class EtcdLedgerStore(_EtcdState):
    """Each Slack request's ledger (ledger_store.LedgerStore's methods) in etcd."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self._keep = ExpiryLeases(client, _KEEP_CLOSED_S)

    def get(self, run_id: str) -> Ledger:
        _, d = self._load(f"approval/{run_id}")
        return Ledger() if d is None else ledger_of(d)

    def put(self, run_id: str, group: str, before: Ledger, after: Ledger) -> bool:
        """Store `after` only if the stored ledger is still `before` (another replica may race)."""
        kv, current = self._load(f"approval/{run_id}")
        if not is_stored(current, before):
            return False
        return self._with_leases(lambda: self._txn(
            [(f"approval/{run_id}", kv)],
            [(f"approval/{run_id}", {**asdict(after), "group": group}, self._keep.current())]),
            self._keep)
