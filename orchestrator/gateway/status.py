"""Every protection group at a glance: who serves, how replication is, what happened last.

Built from what is true now — each node's own database (`pg_is_in_recovery`,
`pg_stat_replication`, `pg_stat_wal_receiver`) — and from the audit trail (last incident, last
failover, last drill). `drflow status` prints it; the gateway adds it to `GET /v1/groups`
(`with_status`). The probe role needs `pg_monitor` (or superuser) to see replication details.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import psycopg

from drflow.etcd import Client as EtcdClient
from drflow.etcd import EtcdError
from drflow.leader_keys import PREFIX
from orchestrator.gateway.leases import Snapshot, keys_view, parse

if TYPE_CHECKING:
    from fastapi import FastAPI
    from pydantic import SecretStr

    from drflow.audit.records import AuditRecord
    from drflow.audit.store import AuditStore
    from drflow.config import DrflowConfig, GroupConfig, NodeConfig

PROTECTED, UNPROTECTED, DEGRADED, UNKNOWN = "protected", "unprotected", "degraded", "unknown"


@dataclass(frozen=True)
class Replica:
    """One row of a primary's pg_stat_replication."""

    name: str
    state: str
    sync_state: str
    lag_bytes: int | None
    lag_s: float | None


@dataclass(frozen=True)
class NodeState:
    """What one node's database says about itself."""

    site: str
    vm: str
    endpoint: str
    role: str  # primary | standby | down | unknown (it answered, but not to us: credentials)
    error: str | None = None
    receiver: str | None = None  # standby: its WAL receiver's status (streaming, …), None: none
    sender: str | None = None  # standby: host:port it receives from
    replicas: tuple[Replica, ...] = ()  # primary


@dataclass(frozen=True)
class Assessment:
    protection: str
    reason: str
    replication_state: str = "none"  # sync | async | none
    primary: NodeState | None = None
    standby: NodeState | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None


# -- pure --------------------------------------------------------------------------------------


def assess(group: str, replication: str, rpo_budget_s: float, home_site: str,
           nodes: list[NodeState]) -> Assessment:
    """Protection of a group from its nodes' states.

    protected: one writable primary, the other node a standby streaming from it (synchronously
    when the group is sync) within the RPO budget. unprotected: after a failover, the group is
    served from away from home with no standby streaming. degraded: anything else. unknown: a
    node answered but refused our questions (credentials), so nothing can be said."""
    unknown = [n for n in nodes if n.role == "unknown"]
    if unknown:
        return Assessment(UNKNOWN, "cannot ask " + "; ".join(f"{n.vm} ({n.site}): {n.error}"
                                                            for n in unknown))
    primaries = [n for n in nodes if n.role == "primary"]
    if len(primaries) > 1:
        names = " and ".join(f"{n.vm} ({n.site})" for n in primaries)
        return Assessment(DEGRADED, f"two writable primaries, {names}: fence one now")
    if not primaries:
        seen = "; ".join(f"{n.vm} {_node_word(n)}" for n in nodes)
        return Assessment(DEGRADED, f"no writable primary ({seen})")
    p = primaries[0]
    other = next((n for n in nodes if n is not p), None)
    streaming = [r for r in p.replicas if r.state == "streaming"]
    sync = [r for r in streaming if r.sync_state in ("sync", "quorum")]
    mode = "sync" if sync else "async" if streaming else "none"
    lags_b = [r.lag_bytes for r in streaming if r.lag_bytes is not None]
    # replay_lag is NULL on an idle, caught-up standby: no lag, not unknown.
    lag_s = max((r.lag_s or 0.0 for r in streaming), default=None)
    lag_b = max(lags_b) if lags_b else None

    def verdict(protection: str, reason: str) -> Assessment:
        return Assessment(protection, reason, replication_state=mode, primary=p, standby=other,
                          lag_bytes=lag_b, lag_s=lag_s)

    why: str | None = None
    if other is None:
        why = "no standby configured"
    elif other.role == "down":
        why = f"{other.vm} ({other.site}) is down" + (f": {other.error}" if other.error else "")
    elif other.role == "standby" and other.receiver != "streaming":
        why = (f"{other.vm} ({other.site}) is a standby but not streaming "
               f"({other.receiver or 'no WAL receiver'})")
    elif not streaming:
        why = f"no standby streams from {p.vm}"
    elif replication == "sync" and not sync:
        why = f"{other.vm} streams asynchronously but {group} is configured sync"
    elif lag_s is not None and lag_s > rpo_budget_s:
        why = f"standby {lag_s:.1f} s behind, beyond the RPO budget of {rpo_budget_s:g} s"
    away = p.site != home_site
    if why is None:
        assert other is not None
        where = f" (serving away from home, {home_site})" if away else ""
        return verdict(PROTECTED, f"{p.vm} ({p.site}) primary, {other.vm} ({other.site}) "
                       f"{mode} standby streaming{where}")
    standby_ok = other is not None and other.role == "standby" and other.receiver == "streaming"
    if away and not standby_ok:
        return verdict(UNPROTECTED, f"after failover: {p.vm} ({p.site}) serves alone; {why}. "
                       f"Re-protect with `drflow reprotect {group}`")
    return verdict(DEGRADED, why)


def with_sync_key(a: Assessment, replication: str, keys: dict[str, Any]) -> Assessment:
    """A sync group whose sync key names no standby is unprotected, whatever the databases show:
    no standby may be promoted automatically (docs/fencing.md)."""
    sync = keys.get("sync") or {}
    if replication != "sync" or a.primary is None or "standby" not in sync or sync["standby"]:
        return a
    if a.protection == UNPROTECTED:  # the databases already say why (after a failover, …)
        return a
    why = keys.get("protection_reason") or "the sync key names no standby"
    detail = "" if a.protection == PROTECTED else f"; {a.reason}"
    return replace(a, protection=UNPROTECTED, reason=f"{why}{detail}")


def _node_word(n: NodeState) -> str:
    if n.role == "down":
        return "down"
    if n.role == "standby":
        return f"standby ({n.receiver or 'not streaming'})"
    return n.role


def roles_text(nodes: list[NodeState]) -> str:
    """`prod: primary, dr: standby (streaming)`."""
    return ", ".join(f"{n.site}: {_node_word(n) if n.role != 'standby' else 'standby'}"
                     for n in nodes)


def summarize(rec: AuditRecord | None, kind: str) -> dict[str, Any] | None:
    """The interesting part of a runbook's last `*.finish` (or `incident.open`) audit record."""
    if rec is None:
        return None
    p = rec.parameters
    out: dict[str, Any] = {"at": rec.time, "outcome": rec.outcome, "reason": rec.reason}
    if kind == "failover" and rec.outcome == "ok":
        out["outcome"] = "failed_over"
    if kind == "incident":
        out.update(outcome="opened", key=p.get("idempotency_key"), kind=p.get("kind"))
    for k in ("rto_s", "rpo_s", "rpo_bytes", "reprotect_s"):
        if p.get(k) is not None:
            out[k] = p[k]
    return out


# -- the audit trail, read incrementally ----------------------------------------------------------


class AuditDigest:
    """The last record of each interesting action per group, reading only what is new."""

    ACTIONS = ("incident.open", "failover.finish", "reprotect.finish", "failback.finish",
               "drill.finish")

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.seq = 0
        self.last: dict[tuple[str, str], AuditRecord] = {}

    def refresh(self) -> None:
        for rec in self.store.iter_records(self.seq):
            self.seq = rec.seq
            if rec.action in self.ACTIONS:
                self.last[(rec.action, rec.target)] = rec

    def latest(self, action: str, group: str) -> AuditRecord | None:
        return self.last.get((action, group))


# -- probing the databases ---------------------------------------------------------------------


def probe(site: str, vm: str, host: str, port: int, dbname: str, user: str,
          password: SecretStr, timeout_s: float = 2.0) -> NodeState:
    """Ask one node's PostgreSQL what it is; `down` with the reason when it does not answer."""
    endpoint = f"{host}:{port}"
    try:
        with psycopg.connect(host=host, port=port, dbname=dbname, user=user,
                             password=password.get_secret_value(),
                             connect_timeout=max(1, round(timeout_s)), autocommit=True,
                             options=f"-c statement_timeout={int(timeout_s * 1000)}") as c:
            row = c.execute("SELECT pg_is_in_recovery()").fetchone()
            if row and row[0]:
                rcv = c.execute("SELECT status, sender_host, sender_port "
                                "FROM pg_stat_wal_receiver").fetchone()
                return NodeState(site, vm, endpoint, "standby",
                                 receiver=str(rcv[0]) if rcv else None,
                                 sender=f"{rcv[1]}:{rcv[2]}" if rcv and rcv[1] else None)
            rows = c.execute(
                "SELECT application_name, state, coalesce(sync_state, ''), "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
                "extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication").fetchall()
            reps = tuple(Replica(str(r[0]), str(r[1]), str(r[2]),
                                 None if r[3] is None else int(r[3]),
                                 None if r[4] is None else round(float(r[4]), 3)) for r in rows)
            return NodeState(site, vm, endpoint, "primary", replicas=reps)
    except psycopg.Error as exc:
        text = str(exc).strip()
        # libpq says "connection to server at …, port … failed: <why>": the why is the news.
        detail = text.splitlines()[0].rsplit("failed: ", 1)[-1] if text else type(exc).__name__
        # A server that refuses us (password, permissions) is not down: we just cannot tell.
        role = "down" if any(m in text.lower() for m in _DOWN_MARKS) else "unknown"
        return NodeState(site, vm, endpoint, role, error=detail[:300])


_DOWN_MARKS = ("connection refused", "timeout expired", "could not connect", "no route to host",
               "network is unreachable", "server closed the connection", "starting up",
               "shutting down", "could not translate host name", "connection timed out")


class GroupStatusProvider:
    """Status of every group of a config: `collect()` now (blocking), or `snapshot()` cached."""

    def __init__(self, cfg: DrflowConfig, audit: AuditStore | None = None, ttl_s: float = 2.0,
                 timeout_s: float = 2.0) -> None:
        self.cfg = cfg
        self.digest = AuditDigest(audit) if audit is not None else None
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._passwords: dict[str, SecretStr] = {}
        self._cache: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._refresh: asyncio.Task[dict[str, dict[str, Any]]] | None = None

    def collect(self) -> dict[str, dict[str, Any]]:
        """Probe every node (in parallel) and read the audit trail; one dict per group."""
        audit_error = None
        if self.digest is not None:
            try:
                self.digest.refresh()
            except Exception as exc:  # status without history beats no status
                audit_error = f"audit trail unavailable: {type(exc).__name__}: {exc}"
        cfg = self.cfg  # one version throughout, though use_config may swap it meanwhile
        jobs = [(g, n) for g in cfg.groups for n in (g.primary, g.standby)]
        with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
            keys = pool.submit(self._read_keys, cfg)
            states = list(pool.map(lambda job: self._probe(*job), jobs))
            snap, etcd_error = keys.result()
        out: dict[str, dict[str, Any]] = {}
        for i, g in enumerate(cfg.groups):
            nodes = states[2 * i: 2 * i + 2]
            leases = None if cfg.etcd is None else keys_view(snap, g.name, etcd_error)
            out[g.name] = self._group(g, nodes, audit_error, leases)
        return out

    def use_config(self, cfg: DrflowConfig) -> None:
        """Report on the groups of a reloaded configuration from the next refresh on (until
        then, the last status: a group just added shows none yet)."""
        self.cfg = cfg
        self._passwords = {}  # a group's database password reference may have changed
        if self._cache is not None:
            self._cache = (float("-inf"), self._cache[1])

    def _read_keys(self, cfg: DrflowConfig) -> tuple[Snapshot | None, str | None]:
        """Every group's leader and sync keys in one read; (None, why) when etcd cannot answer."""
        if cfg.etcd is None:
            return None, None
        client = EtcdClient([str(u) for u in cfg.etcd.endpoints],
                            min(cfg.etcd.timeout_s, self.timeout_s))
        try:
            revision, kvs = client.get_prefix(PREFIX)
        except EtcdError as exc:
            return None, str(exc)
        return parse(revision, kvs, [g.name for g in cfg.groups], time.time()), None

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        """A recent `collect()`: fresh within ttl_s, else the last one while a new one runs
        (the first call waits), so that `GET /v1/groups` never waits on a node that is down."""
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < self.ttl_s:
            return self._cache[1]
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._collect_async())
        if self._cache is not None:
            return self._cache[1]
        return await asyncio.shield(self._refresh)

    async def _collect_async(self) -> dict[str, dict[str, Any]]:
        result = await asyncio.to_thread(self.collect)
        self._cache = (time.monotonic(), result)
        return result

    def _password(self, g: GroupConfig) -> SecretStr:
        if g.name not in self._passwords:
            self._passwords[g.name] = self.cfg.secret(g.database.password)
        return self._passwords[g.name]

    def _probe(self, g: GroupConfig, n: NodeConfig) -> NodeState:
        try:
            password = self._password(g)
        except Exception as exc:
            return NodeState(n.site, n.vm, f"{n.host}:{n.port}", "unknown",
                             error=f"database password unavailable: {type(exc).__name__}")
        return probe(n.site, n.vm, n.host, n.port, g.database.name, g.database.user, password,
                     self.timeout_s)

    def _group(self, g: GroupConfig, nodes: list[NodeState], audit_error: str | None,
               leases: dict[str, Any] | None = None) -> dict[str, Any]:
        a = assess(g.name, g.replication, g.rpo_budget_s, g.primary.site, nodes)
        notes = [audit_error] if audit_error else []
        if leases is not None:
            a = with_sync_key(a, g.replication, leases)
            if leases.get("etcd_error"):
                notes.append(f"leader keys unknown: {leases['etcd_error']}")
        last = {kind: summarize(self.digest.latest(action, g.name), kind) if self.digest else None
                for kind, action in (("incident", "incident.open"), ("failover", "failover.finish"),
                                     ("reprotect", "reprotect.finish"), ("drill", "drill.finish"))}
        return {
            "group": g.name,
            "serving": None if a.primary is None else {"site": a.primary.site, "vm": a.primary.vm,
                                                       "endpoint": a.primary.endpoint},
            "home_site": g.primary.site,
            "roles": roles_text(nodes),
            "replication": {"configured": g.replication, "state": a.replication_state,
                            "lag_bytes": a.lag_bytes, "lag_s": a.lag_s,
                            "rpo_budget_s": g.rpo_budget_s},
            "protection": a.protection,
            "protection_reason": a.reason,
            "last_incident": last["incident"],
            "last_failover": last["failover"],
            "last_reprotect": last["reprotect"],
            "last_drill": last["drill"],
            "nodes": [_node_dict(n) for n in nodes],
            "leases": leases,
            "notes": notes,
            "checked_at": time.time(),
        }


def _node_dict(n: NodeState) -> dict[str, Any]:
    d = asdict(n)
    d["replicas"] = [asdict(r) for r in n.replicas]
    return d


# -- the gateway's GET /v1/groups ----------------------------------------------------------------


async def with_status(app: FastAPI, view: dict[str, Any]) -> dict[str, Any]:
    """With a provider installed (`app.state.group_status`), add to each group of the gateway's
    groups view its status and the gateway's roles record; without one, the view as it is."""
    provider: GroupStatusProvider | None = getattr(app.state, "group_status", None)
    if provider is None:
        return view
    roles = getattr(app.state, "roles", None)
    try:
        snap = await provider.snapshot()
    except Exception as exc:
        snap = {g: {"error": f"{type(exc).__name__}: {exc}"} for g in view}
    for name, entry in view.items():
        entry["status"] = snap.get(name)
        if roles is not None:
            with contextlib.suppress(Exception):
                entry["roles"] = roles.record(name).model_dump()
    return view
