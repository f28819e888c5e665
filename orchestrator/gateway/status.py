"""Every protection group at a glance: who serves, how replication is, what happened last.

Built from what is true now — each node's own database (`pg_is_in_recovery`,
`pg_stat_replication`, `pg_stat_wal_receiver`) — and from the audit trail (last incident, last
failover, last drill). `drflow status` prints it; the gateway refreshes it in the background
every `interval_s` (`GroupStatusProvider.start`, with the app's lifespan) and adds the last
completed refresh to `GET /v1/groups` (`with_status`), which never waits for a probe. Times are
ISO 8601 UTC; ages (`age_s`, …) are computed when the answer is made. The probe role needs
`pg_monitor` (or superuser) to see replication details.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from drflow.etcd import Client as EtcdClient
from drflow.etcd import EtcdError
from drflow.leader_keys import PREFIX
from orchestrator.gateway.leases import Snapshot, keys_view, parse
from orchestrator.gateway.metrics import StatusInput, epoch

if TYPE_CHECKING:
    from fastapi import FastAPI
    from pydantic import SecretStr

    from drflow.audit.records import AuditRecord
    from drflow.audit.store import AuditStore
    from drflow.config import DrflowConfig, GroupConfig, NodeConfig
    from orchestrator.gateway.service import GatewayService

PROTECTED, UNPROTECTED, DEGRADED, UNKNOWN = "protected", "unprotected", "degraded", "unknown"
PROTECTION_STATES = (PROTECTED, UNPROTECTED, DEGRADED, UNKNOWN)
# Runbook kinds whose last run the status shows, with the audit action that ends one.
RUN_KINDS = {"failover": "failover.finish", "reprotect": "reprotect.finish",
             "failback": "failback.finish", "drill": "drill.finish"}
# Steps during which a runbook is paused for the group's approvers (a failback; a failover whose
# fence an operator attests): the audit trail's `started` record without its closing one.
APPROVAL_WAITS = {"failback.wait for approval": "failback",
                  "failover.wait for the attestation": "failover"}
REFRESH_INTERVAL_S = 2.0
# A refresh waits this long for the nodes' answers: a refresh is published at most about
# interval + this after the one before, so a status is never older than interval + 1 s, even
# when a node stops answering (libpq's own connect timeout is at least 2 s).
ANSWER_WITHIN_S = 0.75
STALE_MARGIN_S = 1.0

log = logging.getLogger("drflow.gateway.status")
T = TypeVar("T")


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
    for k in ("rto_s", "rpo_s", "rpo_bytes", "reprotect_s", "downtime_s"):
        if p.get(k) is not None:
            out[k] = p[k]
    return out


def iso(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds: `2026-12-04T05:21:03.123+00:00`."""
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def is_stale(age_s: float | None, interval_s: float) -> bool:
    """Older than one refresh interval plus a second: a refresh was missed (or none yet)."""
    return age_s is None or age_s > interval_s + STALE_MARGIN_S


def aged(status: dict[str, Any], now: float, interval_s: float) -> dict[str, Any]:
    """A copy of one group's status with its ages as of `now`: `age_s` and `stale` of the
    status, `read_age_s` of the leader and sync keys' read."""
    out = dict(status)
    at = epoch(out.get("checked_at"))
    age = None if at is None else round(max(0.0, now - at), 3)
    out["age_s"], out["stale"] = age, is_stale(age, interval_s)
    if isinstance(out.get("leases"), dict):
        out["leases"] = with_read_age(out["leases"], now)
    return out


def with_read_age(leases: dict[str, Any], now: float) -> dict[str, Any]:
    """A leases view (leases.keys_view) plus `read_age_s`: how old its read of the keys is."""
    at = epoch(leases.get("read_at"))
    return {**leases, "read_age_s": None if at is None else round(max(0.0, now - at), 3)}


def pending_approvals(waits: Iterable[AuditRecord], now: float,
                      grace_s: float = 30.0) -> list[dict[str, Any]]:
    """The runs still paused for the group's approvers: a wait step opened, not closed, and not
    past its timeout (a run that died while paused never closes its step; Prefect fails it at
    the timeout, so after it, plus a grace, the wait is not counted)."""
    out = []
    for rec in sorted(waits, key=lambda r: r.seq):
        since = epoch(rec.time)
        timeout = rec.parameters.get("timeout_s")
        expires = since + float(timeout) if since is not None and \
            isinstance(timeout, int | float) else None
        if expires is not None and now > expires + grace_s:
            continue
        out.append({"runbook": APPROVAL_WAITS.get(rec.action, rec.action.split(".")[0]),
                    "run": rec.actor, "since": rec.time, "expires_at": iso(expires)})
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
        # (group, run's actor) → the `started` record of its approval wait, until it closes
        self.waits: dict[tuple[str, str], AuditRecord] = {}

    def refresh(self) -> None:
        for rec in self.store.iter_records(self.seq):
            self.seq = rec.seq
            if rec.action in self.ACTIONS:
                self.last[(rec.action, rec.target)] = rec
            if rec.action in APPROVAL_WAITS:
                if rec.outcome == "started":
                    self.waits[(rec.target, rec.actor)] = rec
                else:
                    self.waits.pop((rec.target, rec.actor), None)
            elif rec.action.endswith((".finish", ".abandon")):
                # The run ended (or stopped) without closing its wait: a crash mid-step.
                self.waits.pop((rec.target, rec.actor), None)

    def latest(self, action: str, group: str) -> AuditRecord | None:
        return self.last.get((action, group))

    def waiting(self, group: str) -> list[AuditRecord]:
        """The group's runs paused for approval, as far as the trail tells."""
        return [r for (g, _), r in self.waits.items() if g == group]


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


@dataclass(frozen=True)
class StatusSnapshot:
    """One completed refresh: every group's status, and what the gateway said meanwhile."""

    taken_at: float  # wall clock when it completed (each group's `checked_at`)
    groups: dict[str, dict[str, Any]]
    gateway: dict[str, Any] = field(default_factory=dict)  # GET /v1/groups' own part, per group


class GroupStatusProvider:
    """Status of every group of a config: `collect()` now (blocking, `drflow status`), or, once
    `start()`ed, refreshed every `interval_s` in the background (`latest()`, the gateway)."""

    def __init__(self, cfg: DrflowConfig, audit: AuditStore | None = None,
                 interval_s: float = REFRESH_INTERVAL_S, timeout_s: float = 2.0,
                 answer_within_s: float = ANSWER_WITHIN_S) -> None:
        self.cfg = cfg
        self.digest = AuditDigest(audit) if audit is not None else None
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.answer_within_s = answer_within_s
        self._passwords: dict[str, SecretStr] = {}
        self._latest: StatusSnapshot | None = None
        self._task: asyncio.Task[None] | None = None
        # Probes outlive a refresh that stopped waiting for them (a node that does not answer
        # is held up to libpq's connect timeout, or longer when it hangs after connecting): the
        # next refresh waits for the same probe rather than piling up another.
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="drflow-status")
        self._inflight: dict[tuple[str, ...], Future[Any]] = {}

    # -- one refresh (blocking) -----------------------------------------------------------------

    def collect(self, answer_within_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Probe every node (in parallel) and read the audit trail; one dict per group.

        `answer_within_s`: a node (or etcd) that has not answered by then is reported as not
        answering, and its probe is left to finish; None waits for every probe's own timeout."""
        audit_error = None
        if self.digest is not None:
            try:
                self.digest.refresh()
            except Exception as exc:  # status without history beats no status
                audit_error = f"audit trail unavailable: {type(exc).__name__}: {exc}"
        cfg = self.cfg  # one version throughout, though use_config may swap it meanwhile
        jobs = [(g, n) for g in cfg.groups for n in (g.primary, g.standby)]
        probes = [self._start(("probe", g.name, n.vm, n.host, str(n.port)), self._probe, g, n)
                  for g, n in jobs]
        keys = self._start(("etcd",), self._read_keys, cfg)
        asked: list[Future[Any]] = [*probes, keys]
        done, _ = wait_futures(asked, timeout=answer_within_s)
        late = f"no answer within {answer_within_s:g} s" if answer_within_s is not None else ""
        states = [_answer(f, done, NodeState(n.site, n.vm, f"{n.host}:{n.port}", "down",
                                             error=late))
                  for f, (_, n) in zip(probes, jobs, strict=True)]
        snap, etcd_error = _answer(keys, done, (None, f"etcd: {late}"))
        now = time.time()
        now_ms = round(now, 3)
        out: dict[str, dict[str, Any]] = {}
        for i, g in enumerate(cfg.groups):
            nodes = states[2 * i: 2 * i + 2]
            leases = None if cfg.etcd is None else keys_view(snap, g.name, etcd_error)
            out[g.name] = self._group(g, nodes, audit_error, leases, now_ms)
        return out

    def _start(self, key: tuple[str, ...], fn: Callable[..., T], *args: Any) -> Future[T]:
        running = self._inflight.get(key)
        if running is not None and not running.done():
            return running
        fut = self._pool.submit(fn, *args)
        self._inflight[key] = fut
        return fut

    def use_config(self, cfg: DrflowConfig) -> None:
        """Report on the groups of a reloaded configuration from the next refresh on (until
        then, the last status: a group just added shows none yet)."""
        self.cfg = cfg
        self._passwords = {}  # a group's database password reference may have changed

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

    # -- in the background (the gateway) -------------------------------------------------------

    def latest(self) -> StatusSnapshot | None:
        """The last completed refresh (None before the first): never waits."""
        return self._latest

    async def start(self, gateway: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                    first_within_s: float = 5.0) -> None:
        """Refresh every `interval_s` until `stop()`; returns once the first refresh completed
        (or `first_within_s` passed), so that the first request already finds a status.
        `gateway`: the gateway's own groups view, kept with each refresh (/metrics)."""
        if self._task is not None and not self._task.done():
            return
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._run(gateway, first))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(first), first_within_s)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Probes still running finish on their own (each bounded by its timeouts); a start
        # after this one (an app served again) gets a pool of its own.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="drflow-status")
        self._inflight = {}

    async def _run(self, gateway: Callable[[], Awaitable[dict[str, Any]]] | None,
                   first: asyncio.Future[None]) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.refresh(gateway)
            except Exception:  # a bug must not end the refreshes: the status would freeze
                log.exception("refreshing the groups' status failed")
            if not first.done():
                first.set_result(None)
            # A fixed rate, not a fixed pause: a slow refresh does not push the next one back.
            await asyncio.sleep(max(0.0, started + self.interval_s - time.monotonic()))

    async def refresh(self, gateway: Callable[[], Awaitable[dict[str, Any]]] | None = None
                      ) -> StatusSnapshot:
        """One refresh off the event loop (a thread), published as `latest()`."""
        # The gateway's view (on its state thread, slow when etcd is) is asked meanwhile and
        # not waited for: one not back with the databases' answers keeps the last one.
        asked = asyncio.ensure_future(gateway()) if gateway is not None else None
        groups = await asyncio.to_thread(self.collect, self.answer_within_s)
        view = self._latest.gateway if self._latest is not None else {}
        if asked is not None and not asked.done():
            asked.cancel()
        elif asked is not None and asked.exception() is not None:
            exc = asked.exception()
            log.warning("the gateway's groups view failed: %s: %s", type(exc).__name__, exc)
        elif asked is not None:
            view = asked.result()
        at = epoch(next(iter(groups.values()), {}).get("checked_at")) or time.time()
        self._latest = StatusSnapshot(at, groups, view)
        return self._latest

    # -- one group -----------------------------------------------------------------------------

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
               leases: dict[str, Any] | None, now: float) -> dict[str, Any]:
        a = assess(g.name, g.replication, g.rpo_budget_s, g.primary.site, nodes)
        notes = [audit_error] if audit_error else []
        if leases is not None:
            a = with_sync_key(a, g.replication, leases)
            if leases.get("etcd_error"):
                notes.append(f"leader keys unknown: {leases['etcd_error']}")
        d = self.digest
        last = {kind: summarize(d.latest(action, g.name), kind) if d else None
                for kind, action in (("incident", "incident.open"), *RUN_KINDS.items())}
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
            "last_failback": last["failback"],
            "last_drill": last["drill"],
            "pending_approvals": pending_approvals(d.waiting(g.name), now) if d else [],
            "nodes": [_node_dict(n) for n in nodes],
            "leases": leases,
            "notes": notes,
            "checked_at": iso(now),
            "refresh_interval_s": self.interval_s,
        }


def _answer(fut: Future[T], done: set[Future[Any]], late: T) -> T:
    """A probe's answer, `late` when it is not back in time; a probe's own bug is no answer."""
    if fut not in done:
        return late
    try:
        return fut.result()
    except Exception as exc:
        log.exception("a status probe failed")
        if isinstance(late, NodeState):
            return replace(late, role="unknown", error=f"probe failed: {type(exc).__name__}")
        return late


def _node_dict(n: NodeState) -> dict[str, Any]:
    d = asdict(n)
    d["replicas"] = [asdict(r) for r in n.replicas]
    return d


# -- the gateway's GET /v1/groups ----------------------------------------------------------------


async def with_status(app: FastAPI, view: dict[str, Any]) -> dict[str, Any]:
    """With a provider installed (`app.state.group_status`), add to each group of the gateway's
    groups view its last refreshed status (aged now) and the gateway's roles record; without
    one, the view as it is. Never waits for a probe."""
    now = time.time()
    for entry in view.values():  # the gateway's own read of the keys, aged like the status
        if isinstance(entry.get("leases"), dict):
            entry["leases"] = with_read_age(entry["leases"], now)
    provider: GroupStatusProvider | None = getattr(app.state, "group_status", None)
    if provider is None:
        return view
    roles = getattr(app.state, "roles", None)
    snap = provider.latest()
    for name, entry in view.items():
        st = snap.groups.get(name) if snap is not None else None
        entry["status"] = None if st is None else aged(st, now, provider.interval_s)
        if roles is not None:
            with contextlib.suppress(Exception):
                entry["roles"] = roles.record(name).model_dump()
    return view


# -- started and stopped with the gateway app (app.py lifespan) -----------------------------------


async def start_status(app: FastAPI, service: GatewayService) -> GroupStatusProvider | None:
    """With a provider installed, refresh it in the background from now on and give /metrics
    its gauges; returns the provider to stop (None: nothing started)."""
    provider: GroupStatusProvider | None = getattr(app.state, "group_status", None)
    if provider is None:
        return None
    await provider.start(service.groups)
    service.metrics.status_source = lambda: gauge_input(
        provider.latest(), service.leases.last if service.leases is not None else None)
    return provider


def gauge_input(snap: StatusSnapshot | None, leases: Snapshot | None) -> StatusInput:
    """The status gauges' input: the last refresh, and the gateway's last read of the keys
    (by which each group's leader key was seen, and when)."""
    seen = {} if leases is None else {g: leases.read_at for g, k in leases.groups.items()
                                      if k.leader is not None}
    if snap is None:
        return StatusInput({}, None, {}, seen)
    return StatusInput(snap.groups, snap.taken_at, snap.gateway, seen)
