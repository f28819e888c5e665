"""The gateway's engine: verified events in, heartbeats watched, one failover run per incident.

It accepts verified events, watches heartbeats (and, with etcd configured, the leader keys:
leases.py), opens incidents and starts exactly one failover run per incident.

Two threads: the asyncio event loop serves HTTP and waits on runs; every read and change of the
gateway's state (the store, heartbeats, replication reports, decisions) happens on one "state"
thread, in the order submitted (`in_state`). So decisions stay serial as on a single thread,
and a slow store (etcd electing a leader, with shared state) holds up decisions, never the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from drflow.etcd import Client as EtcdClient
from drflow.etcd import EtcdError
from drflow.events import EventKind, HealthEvent
from orchestrator.gateway.blind_time import BlindClock
from orchestrator.gateway.contracts import (
    Alert,
    Alerter,
    AuditSink,
    Incident,
    IncidentKind,
    IncidentStarter,
    append_or_log,
)
from orchestrator.gateway.decide import (
    SILENT,
    Action,
    Decision,
    Role,
    decide_incident,
    reported_role,
    unrecorded_failure,
)
from orchestrator.gateway.etcd_state import EtcdGatewayStore
from orchestrator.gateway.heartbeats import AgentState, HeartbeatTracker
from orchestrator.gateway.intake import Rejection, check_member, clip
from orchestrator.gateway.lease_decide import LeaderSeen, agent_lease_alert, decide_lease_expired
from orchestrator.gateway.leases import LeaseWatcher
from orchestrator.gateway.metrics import GatewayMetrics
from orchestrator.gateway.replication import ReplicationEvidence
from orchestrator.gateway.settings import GatewaySettings, GroupPolicy, GroupRoster
from orchestrator.gateway.state import IncidentState, open_incident_state
from orchestrator.gateway.store import IncidentRecord, IncidentStatus, Seen

if TYPE_CHECKING:  # its pyVmomi is loaded only where hosts are watched
    from orchestrator.gateway.host_watch import HostWatcher
    from orchestrator.gateway.reload import ConfigReloader

P = ParamSpec("P")
T = TypeVar("T")

_PRUNE_EVERY_S = 60.0
# A replica silent in etcd this long (shared state) is gone: its incidents are adopted.
REPLICA_TTL_S = 5
_WATCH_MAX_SLEEP_S = 1.0
log = logging.getLogger("drflow.gateway")


@dataclass(frozen=True)
class Accepted:
    event_id: str
    decision: Decision
    incident_key: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "status": "accepted", "event_id": self.event_id, "action": self.decision.action.value,
            "reason": self.decision.reason, "incident": self.incident_key,
        }


def _log_failure(task: asyncio.Task[None]) -> None:
    # Nothing awaits these tasks: an error left in one would otherwise go unseen.
    if not task.cancelled() and (exc := task.exception()) is not None:
        name = getattr(task.get_coro(), "__qualname__", task.get_name())
        log.error("background task %s failed", name, exc_info=exc)


def _utc(value: datetime) -> datetime:
    # Agents may send naive timestamps; they are UTC by contract.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class GatewayService:
    def __init__(
        self,
        settings: GatewaySettings,
        starter: IncidentStarter,
        audit: AuditSink | None = None,
        alerter: Alerter | None = None,
    ) -> None:
        self.settings = settings
        self.blind = BlindClock()
        self.tracker = HeartbeatTracker(blind=self.blind.now)
        self.replication = ReplicationEvidence()
        self.metrics = GatewayMetrics(self.tracker)
        self._starter = starter
        self._audit = audit
        self._alerter = alerter
        self._store: IncidentState | None = None
        self._state_pool = ThreadPoolExecutor(1, thread_name_prefix="gateway-state")
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        # The leader-key watch, when etcd is configured (leases.py).
        self.leases: LeaseWatcher | None = None
        self._lease_task: asyncio.Task[None] | None = None
        # The vSphere host-state watch (host_watch.py): set before start() by whoever knows the
        # vCenters (`drflow gateway`); None: hosts are not watched.
        self.host_watch: HostWatcher | None = None
        self._host_task: asyncio.Task[None] | None = None
        # Applies groups added to or removed from drflow.yaml while running (reload.py): set
        # before start() by whoever knows the file (`drflow gateway`); None: read once.
        self.config_watch: ConfigReloader | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._blind_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Earliest unrecovered failure per (group, agent) and resource: RTO starts there.
        self._failures: dict[tuple[str, str], dict[str, datetime]] = {}
        # When each (group, agent, alert kind) last alerted (monotonic), to repeat it only rarely.
        self._alerted: dict[tuple[str, str, str], float] = {}
        self._alert_lock = threading.Lock()
        # When this replica last told the others it heard each agent (shared state only).
        self._noted: dict[tuple[str, str], float] = {}
        self._next_adopt = 0.0
        # Called on the state thread with every new verified event, and after an incident
        # closes (group, key, outcome, reason); failures are logged, never raised (roles.py).
        self.event_hooks: list[Callable[[HealthEvent], None]] = []
        self.close_hooks: list[Callable[[str, str, str, str], None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state, re-arm known agents, re-drive unstarted incidents, start watching."""
        self._loop = asyncio.get_running_loop()
        await self.in_state(self._open)
        self._blind_task = asyncio.get_running_loop().create_task(self.blind.run())
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        if self.settings.etcd_endpoints:
            client = EtcdClient(self.settings.etcd_endpoints, self.settings.etcd_timeout_s)
            self.leases = LeaseWatcher(client, list(self.settings.groups),
                                       self._lease_vanished_soon, self.metrics,
                                       self.settings.lease_poll_s)
            self._lease_task = asyncio.get_running_loop().create_task(self.leases.run())
        if self.host_watch is not None:
            self._host_task = asyncio.get_running_loop().create_task(self.host_watch.run(self))
        if self.config_watch is not None:
            self._reload_task = asyncio.get_running_loop().create_task(self.config_watch.run(self))

    def _open(self) -> None:
        self._store = open_incident_state(self.settings)
        self.tracker.restore(self.store.agents(), self.store.primaries())
        if isinstance(self._store, EtcdGatewayStore):
            # Shared: other replicas may be driving their incidents right now; this one takes
            # over only those whose replica is gone (_adopt_orphans, from the watch).
            self._store.join_as_replica(REPLICA_TTL_S)
            return
        for rec in self.store.unstarted():
            log.warning("re-driving the start of incident %s after a restart", rec.incident.idempotency_key)
            self.spawn(self._drive_start(rec.incident, None))
        if self.settings.runs_in_process:
            # Their runs lived in the process that stopped: run them again, same key. The
            # runbooks are idempotent, so a re-run completes what the interrupted one began.
            for rec in self.store.running():
                log.warning("resuming incident %s, interrupted by a restart",
                            rec.incident.idempotency_key)
                self.store.mark_start_failed(rec.incident.idempotency_key,
                                             "its run was interrupted by a restart")
                self.spawn(self._drive_start(rec.incident, None))

    async def stop(self) -> None:
        tasks = [*self._tasks, *(t for t in (self._watcher, self._lease_task, self._host_task,
                                             self._blind_task, self._reload_task)
                                 if t is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.in_state(self._close_store)
        self._state_pool.shutdown(wait=False)

    def _close_store(self) -> None:
        # With shared state, closing also ends this replica's liveness lease: the others adopt
        # the incidents it was driving at once rather than after REPLICA_TTL_S.
        store, self._store = self._store, None
        if store is not None:
            store.close()

    async def in_state(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the state thread (after everything submitted before it); await it on
        the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._state_pool, lambda: fn(*args, **kwargs))

    @property
    def store(self) -> IncidentState:
        if self._store is None:
            raise RuntimeError("the gateway is not started (use it inside the app's lifespan)")
        return self._store

    def _lock(self, group: str) -> asyncio.Lock:
        return self._locks.setdefault(group, asyncio.Lock())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task on the event loop, from the loop or from any other thread."""
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if not on_loop:
            assert self._loop is not None, "the gateway is not started"
            self._loop.call_soon_threadsafe(self.spawn, coro)
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # -- events ---------------------------------------------------------------------------------

    async def accept_event(self, event: HealthEvent, signature: str) -> Accepted:
        """accept() on the state thread."""
        try:
            return await self.in_state(self.accept, event, signature)
        except EtcdError:
            self._unrecorded(event.group, event.agent_id, event.kind.value)
            raise

    def _unrecorded(self, group: str, agent_id: str, what: str) -> None:
        """A failure not acted on because the shared state is out of reach: tell on-call (from
        memory: nothing here needs etcd), once per agent per hold-down."""
        if not self.settings.state_in_etcd:
            return
        told = unrecorded_failure(group, agent_id, what)
        if told is not None:
            self._raise_alert(Alert(group=group, kind=told[0], agent_id=agent_id, reason=told[1],
                                    evidence={"what": what}))

    def accept(self, event: HealthEvent, signature: str) -> Accepted:
        """Record a verified event of a known group and act on it (on the state thread).

        Synchronous on purpose: between the dedupe check and the incident claim nothing else runs
        on the state thread, so concurrent requests cannot interleave there."""
        # Checked again here: a reload (applied on this thread) may have removed the group since
        # the request was let in.
        check_member(self.settings, event.group, event.agent_id)
        event_id = str(event.event_id)
        seen = self.store.record_event(event_id, signature, event.group, event.kind.value)
        self.metrics.events.labels(event.kind.value, seen.value if seen is not Seen.NEW else "accepted").inc()
        if seen is Seen.REPLAYED:
            raise Rejection(409, "replayed", "replayed request: this signature was already accepted")
        if seen is Seen.DUPLICATE:
            raise Rejection(409, "duplicate", f"duplicate: event {event.event_id} was already received")
        try:
            return self._act_on_event(event)
        except Exception:
            # The request fails (503 when etcd is out of reach) and the agent sends the event
            # again: were it still remembered as seen, that retry would be refused as a
            # duplicate and dropped from the agent's outbox, never acted on.
            try:
                self.store.forget_event(event_id, signature)
            except Exception:
                log.exception("could not forget event %s after it failed: a retry of it will be "
                              "refused as a duplicate", event_id)
            raise

    def _act_on_event(self, event: HealthEvent) -> Accepted:
        """What accept() does with a new event (on the state thread)."""
        for hook in self.event_hooks:
            try:
                hook(event)
            except Exception:
                log.exception("event hook failed for %s from %s", event.kind.value, event.agent_id)
        lease_alert = agent_lease_alert(event.group, event.agent_id, event.details)
        if lease_alert is not None:
            kind, why = lease_alert
            self._raise_alert(Alert(group=event.group, kind=kind, agent_id=event.agent_id,
                                    reason=why, evidence={"event_id": str(event.event_id),
                                                          "event_kind": event.kind.value,
                                                          "resource": event.resource}))

        key = (event.group, event.agent_id)
        role = reported_role(event.details)
        if event.kind in (EventKind.HEARTBEAT, EventKind.ROLE_CHANGED):
            self.replication.record(event.group, event.agent_id, event.details)
            self._heartbeat(event.group, event.agent_id, role)
            return Accepted(str(event.event_id), Decision(Action.NONE, f"{event.kind.value} recorded"))
        if event.kind is EventKind.RESOURCE_FAILED:
            self._failures.setdefault(key, {}).setdefault(
                event.resource or "", _utc(event.observed_at)
            )
            noted = Decision(Action.NONE, "failure recorded; the agent is repairing")
            return Accepted(str(event.event_id), noted)
        if event.kind is EventKind.RESOURCE_RECOVERED:
            self._failures.get(key, {}).pop(event.resource or "", None)
            released = self.store.release(event.group, event.agent_id)
            if released is not None:
                log.info("agent %s recovered: the hold-down of %s ends", event.agent_id, released)
            return Accepted(str(event.event_id), Decision(Action.NONE, "recovery recorded"))

        # recovery_exhausted
        self._adopt_shared_primary(event.group)
        open_rec = self.store.open_incident(event.group)
        hold = self.store.join(event.group, event.agent_id) if open_rec is None else None
        if hold is None and role is not None and self.tracker.set_role_claim(
                event.group, event.agent_id, role):
            self._store_primary(event.group, event.agent_id)
        decision = decide_incident(
            group=event.group, trigger=IncidentKind.RECOVERY_EXHAUSTED, agent_id=event.agent_id,
            role=self.tracker.effective_role(event.group, event.agent_id),
            auto_failover=self.settings.groups[event.group].auto_failover,
            open_incident=open_rec.incident.idempotency_key if open_rec else None,
            resource=event.resource, held_by=hold.key if hold else None,
        )
        if decision.action is Action.JOIN and hold is not None:
            self.metrics.joined.labels(event.group).inc()
            if hold.joined == 1:  # one audit record per hold-down, however many reports follow
                self._record("incident.join", event.group,
                             {"idempotency_key": hold.key, "agent_id": event.agent_id,
                              "hold_down_until": datetime.fromtimestamp(hold.until, UTC).isoformat()},
                             "joined", decision.reason)
            return Accepted(str(event.event_id), decision, hold.key)
        first = [_utc(event.observed_at), *self._failures.get(key, {}).values()]
        reported = event.details.get("first_failure_at")
        if isinstance(reported, str):
            with contextlib.suppress(ValueError):
                first.append(_utc(datetime.fromisoformat(reported)))
        evidence = {
            "agent_id": event.agent_id, "event_id": str(event.event_id), "resource": event.resource,
            "observed_at": _utc(event.observed_at).isoformat(),
            "details": {k: v for k, v in event.details.items() if k != "role"},
        }
        acted = self._act(
            decision, event.group, IncidentKind.RECOVERY_EXHAUSTED, event.agent_id, evidence, min(first)
        )
        if isinstance(acted, str):  # it may be closed already: the key still says which
            return Accepted(str(event.event_id), Decision(
                Action.NONE, f"group {event.group}: incident {acted} was claimed elsewhere "
                "meanwhile (by another gateway replica), not starting another failover"), acted)
        if acted is not None:
            self._failures.pop(key, None)
            return Accepted(str(event.event_id), decision, acted.idempotency_key)
        return Accepted(str(event.event_id), decision,
                        open_rec.incident.idempotency_key if open_rec else None)

    def _heartbeat(self, group: str, agent_id: str, role: Role | None) -> None:
        changed, primary_changed = self.tracker.heartbeat(group, agent_id, role)
        if self.settings.state_in_etcd:
            # Other replicas count this agent's silence from here, and take its replication
            # reports as evidence: an agent whose connection moved to another replica is not
            # silent, and a failover claimed there knows what this replica heard.
            now = time.monotonic()
            if now - self._noted.get((group, agent_id), -1e9) >= min(
                    0.5, self.settings.heartbeat_timeout_s / 3):
                self._noted[(group, agent_id)] = now
                # A primary's beats say so to the shared state too, as this replica's tracker
                # believes it: another replica may have forgotten it there (a standby report,
                # an incident closed) while this one's tracker, unchanged, would never store
                # it again, and every replica decides a silence by the stored primary.
                self.store.note_heard(group, agent_id, time.time(),
                                      self.replication.shared(group, agent_id),
                                      primary=role is Role.PRIMARY and not primary_changed
                                      and self.tracker.primary(group) == agent_id
                                      and not self._leader_is_another(group, agent_id))
        if changed:
            state = self.tracker.get(group, agent_id)
            self.store.save_agent(group, agent_id, state.role.value if state and state.role else None)
        if primary_changed:
            self._store_primary(group, agent_id)
            log.info("group %s: current primary agent is now %s", group, self.tracker.primary(group))

    # -- decisions into actions -----------------------------------------------------------------

    def _act(
        self,
        decision: Decision,
        group: str,
        kind: IncidentKind,
        agent_id: str,
        evidence: dict[str, Any],
        first_failure_at: datetime,
    ) -> Incident | str | None:
        """Carry out a decision: the incident it opened, the key of the one claimed elsewhere
        since the decision read the state, or None (no incident to open)."""
        if decision.action is Action.ALERT:
            self._raise_alert(Alert(group=group, kind=kind.value, agent_id=agent_id,
                                    reason=decision.reason, evidence=evidence))
            return None
        if decision.action is Action.NONE:
            log.info("%s", decision.reason)
            return None
        decided_at = time.monotonic()
        evidence = {**evidence, **self.replication_evidence(group, agent_id)[0]}
        incident = self.store.claim_incident(group, kind, decision.reason, evidence, first_failure_at)
        if isinstance(incident, str):
            # Another replica sharing the state (etcd, or the SQLite file) claimed one first.
            log.info("group %s: incident %s was claimed elsewhere", group, incident)
            return incident
        log.warning("incident %s opened: %s", incident.idempotency_key, decision.reason)
        self._record("incident.open", group, {"idempotency_key": incident.idempotency_key,
                                               "kind": kind.value, "agent_id": agent_id},
                     "opened", decision.reason)
        self.spawn(self._drive_start(incident, decided_at))
        return incident

    def replication_evidence(self, group: str, agent_id: str) -> tuple[dict[str, Any], float | None]:
        """(what the agent's heartbeats said about replication, when it was last heard), from
        every replica when the state is shared."""
        state = self.tracker.get(group, agent_id)
        heard = state.last_seen_wall if state is not None and state.heard else None
        if self.settings.state_in_etcd:
            shared = self.store.heard(group, agent_id)
            if shared is not None:
                self.replication.merge(group, agent_id, shared[1], shared[0])
                heard = max(heard or 0.0, shared[0])
        return self.replication.evidence(group, agent_id), heard

    def _store_primary(self, group: str, agent_id: str) -> None:
        """Store the group's primary after `agent_id`'s role report changed it in the tracker."""
        primary = self.tracker.primary(group)
        if primary is not None:
            # The agent says it is the primary: what it says now, not what this replica
            # believed before, so it replaces any stored primary (the latest claim wins, as in
            # the tracker).
            self.store.set_primary(group, primary)
            return
        # The agent says it is no primary. This replica's tracker may be behind the shared
        # state (another replica may have stored the new primary meanwhile): forget the agent
        # only if it is the one stored still, and take whichever is.
        self.tracker.adopt_primary(group, self.store.clear_primary(group, agent_id))

    def _leader_is_another(self, group: str, agent_id: str) -> bool:
        """The group's leader key, as last read, names another agent: `agent_id`'s claim to be
        the primary is stale (a fenced old primary still reporting its last role)."""
        snap = self.leases.last if self.leases is not None else None
        keys = snap.groups.get(group) if snap is not None else None
        leader = keys.leader.leader if keys is not None and keys.leader is not None else None
        return leader is not None and leader.agent_id != agent_id

    def _adopt_shared_primary(self, group: str) -> None:
        """Before deciding on shared state, take the primary every replica agrees on."""
        if self.settings.state_in_etcd:
            self.tracker.adopt_primary(group, self.store.primary_of(group))

    def _raise_alert(self, alert: Alert) -> None:
        # One alert per agent and kind per hold-down period: a storm of reports is one page.
        # (Raised from the state thread, and from the loop when the state is out of reach.)
        key = (alert.group, alert.agent_id, alert.kind)
        now = time.monotonic()
        with self._alert_lock:
            last = self._alerted.get(key)
            if last is not None and now - last < self.settings.incident_hold_down_s:
                self.metrics.alerts_suppressed.labels(alert.group, alert.kind).inc()
                return
            self._alerted[key] = now
        log.warning("alert: %s", alert.reason)
        self.metrics.alerts.labels(alert.group, alert.kind).inc()
        self._record("incident.alert", alert.group, {"kind": alert.kind, "agent_id": alert.agent_id},
                     "alerted", alert.reason)
        if self._alerter is not None:
            self.spawn(self._send_alert(self._alerter, alert))

    async def _send_alert(self, alerter: Alerter, alert: Alert) -> None:
        try:
            await asyncio.wait_for(alerter.alert(alert), self.settings.start_timeout_s)
        except Exception:
            log.exception("could not deliver the alert for group %s", alert.group)

    async def _drive_start(self, incident: Incident, decided_at: float | None) -> None:
        """Call start_incident until it succeeds or the incident is closed; same key every time."""
        key, group = incident.idempotency_key, incident.group
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            async with self._lock(group):
                rec = await self.in_state(self.store.incident, key)
                if rec is None or rec.status not in (IncidentStatus.STARTING, IncidentStatus.START_FAILED):
                    return
                if decided_at is not None and attempt == 1:
                    self.metrics.start_latency.observe(time.monotonic() - decided_at)
                try:
                    run_id = await asyncio.wait_for(
                        self._starter.start_incident(incident), self.settings.start_timeout_s
                    )
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    await self.in_state(self.store.mark_start_failed, key, error)
                    self.metrics.start_errors.labels(group).inc()
                    log.error("starting the failover run of %s failed (attempt %d, retry in %.1f s): %s",
                              key, attempt, delay, error)
                    self._record("incident.start", group, {"idempotency_key": key, "attempt": attempt},
                                 "failed", error)
                else:
                    await self.in_state(self.store.mark_started, key, run_id)
                    self.metrics.incidents.labels(group, incident.kind.value).inc()
                    log.warning("incident %s: failover run %s started", key, run_id)
                    self._record("incident.start", group, {"idempotency_key": key, "run_id": run_id,
                                                           "attempt": attempt}, "started", incident.reason)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.start_retry_max_s)

    async def close_incident(
        self, group: str, key: str, outcome: str = "closed", reason: str = ""
    ) -> IncidentRecord:
        """Close the group's open incident `key` (called by the failover flow when it is done).

        Raises Rejection (404 unknown group, 409 when `key` is not the open incident)."""
        if group not in self.settings.groups:
            raise Rejection(404, "unknown_group", f"unknown protection group {clip(group)}")
        async with self._lock(group):
            return await self.in_state(self._close, group, key, outcome, reason)

    def _close(self, group: str, key: str, outcome: str, reason: str) -> IncidentRecord:
        rec = self.store.incident(key)
        closable = rec is not None and rec.incident.group == group
        if rec is None or not closable or not self.store.close_incident(
                group, key, outcome, reason, self.settings.incident_hold_down_s):
            current = self.store.open_incident(group)
            raise Rejection(
                409, "not_open",
                f"incident {key} is not the open incident of group {group} "
                f"(open: {current.incident.idempotency_key if current else 'none'})",
            )
        agent = rec.incident.evidence.get("agent_id")
        # After a failover the failed agent is no longer the primary; the next role=primary
        # heartbeat names the new one. With shared state, another replica may have heard it
        # already, and this one's tracker may not know who is stored: the stored primary is
        # forgotten only if it is the failed agent still, and the tracker takes whichever is
        # stored. Any other outcome (reacquired, thawed, not fenced, refused, a crashed run)
        # promoted nobody: the agent stays the primary, and its next death is failed over.
        if isinstance(agent, str) and outcome == "failed_over":
            self.tracker.adopt_primary(group, self.store.clear_primary(group, agent))
        log.warning("incident %s closed (%s): %s", key, outcome, reason)
        self._record("incident.close", group, {"idempotency_key": key, "outcome": outcome},
                     "closed", reason or outcome)
        for close_hook in self.close_hooks:
            try:
                close_hook(group, key, outcome, reason)
            except Exception:
                log.exception("close hook failed for incident %s", key)
        closed = self.store.incident(key)
        assert closed is not None
        return closed

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the gateway's event loop, from any thread (a no-op before start)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def close_incident_threadsafe(
        self, group: str, key: str, outcome: str = "closed", reason: str = "", timeout: float = 10.0
    ) -> IncidentRecord:
        """close_incident() from any other thread (e.g. a flow run in the same process)."""
        if self._loop is None or self._store is None:
            raise RuntimeError("the gateway is not running")
        future = asyncio.run_coroutine_threadsafe(
            self.close_incident(group, key, outcome, reason), self._loop
        )
        return future.result(timeout)

    # -- heartbeat watch ------------------------------------------------------------------------

    async def _watch(self) -> None:
        next_prune = [time.monotonic()]
        while True:
            await asyncio.sleep(await self.in_state(self._watch_once, next_prune))

    def _watch_once(self, next_prune: list[float]) -> float:
        """Handle overdue agents (and prune now and then); how long to sleep till the next look."""
        timeout = self.settings.heartbeat_timeout_s
        try:
            self._adopt_orphans()
        except Exception:
            log.exception("looking for incidents left by a stopped replica failed; continuing")
        failed = False
        for state in self.tracker.overdue(timeout):
            # One agent's failure (etcd out of reach, most likely) leaves the others handled.
            try:
                self._on_silence(state)
            except Exception as exc:
                failed = True
                log.exception("deciding on the silence of agent %s of group %s failed; "
                              "trying again shortly", state.agent_id, state.group)
                if isinstance(exc, EtcdError) and state.role is Role.PRIMARY:
                    self._unrecorded(state.group, state.agent_id, SILENT)
        try:
            if time.monotonic() >= next_prune[0]:
                next_prune[0] = time.monotonic() + _PRUNE_EVERY_S
                self.store.prune(self.settings.dedupe_retention_s, self.settings.signature_window_s + 60)
        except Exception:
            log.exception("pruning the seen events failed; continuing")
        # Sleep to the next deadline; capped at the timeout so that agents first heard
        # during the sleep (deadline = now + timeout) are never overslept.
        deadline = self.tracker.next_deadline(timeout)
        cap = min(_WATCH_MAX_SLEEP_S, timeout)
        if failed:
            # The failed agent's deadline has passed: without this, a busy loop of retries.
            return cap
        return cap if deadline is None else min(cap, max(0.0, deadline - time.monotonic()))

    def _adopt_orphans(self) -> None:
        """Shared state: stay a live replica, and drive the incidents of replicas that are gone
        (their runs, in embedded mode, went with them: run again under the same key)."""
        store = self._store
        if not isinstance(store, EtcdGatewayStore) or time.monotonic() < self._next_adopt:
            return
        self._next_adopt = time.monotonic() + 1.0
        if not store.keep_replica_alive(REPLICA_TTL_S):
            log.error("this replica's liveness lease had expired (the gateway or etcd stalled "
                      "for %d s): incidents it drove may have been adopted by another", REPLICA_TTL_S)
        for rec in store.orphans(include_running=self.settings.runs_in_process):
            key = rec.incident.idempotency_key
            if store.adopt(key, "its gateway replica stopped"):
                log.warning("incident %s: its gateway replica stopped; this one drives it now", key)
                self._record("incident.adopt", rec.incident.group, {"idempotency_key": key,
                                                                    "was": rec.status.value},
                             "adopted", "the replica that drove it stopped (its lease expired)")
                self.spawn(self._drive_start(rec.incident, None))

    def _on_silence(self, state: AgentState) -> None:
        """Decide on an agent silent past the timeout; it is marked handled (`fired`) only once
        decided, so that a failure here is tried again at the next look."""
        # Rows of agents the configuration no longer names (or older gateways let in) stay silent.
        if state.agent_id not in self.settings.known_agents(state.group):
            state.fired = True
            return
        if self.settings.state_in_etcd:
            heard = self.store.heard(state.group, state.agent_id)
            if heard is not None and self.tracker.heard_elsewhere(state, heard[0]) and (
                    self.tracker.age(state) < self.settings.heartbeat_timeout_s):
                return  # heard by another replica lately: not silent yet
            self._adopt_shared_primary(state.group)
        open_rec = self.store.open_incident(state.group)
        silent_for = self.tracker.age(state)
        role = self.tracker.effective_role(state.group, state.agent_id)
        decision = decide_incident(
            group=state.group, trigger=IncidentKind.HEARTBEAT_LOST, agent_id=state.agent_id,
            role=role, auto_failover=self.settings.groups[state.group].auto_failover,
            open_incident=open_rec.incident.idempotency_key if open_rec else None,
            silent_for_s=silent_for, heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
        )
        last = datetime.fromtimestamp(state.last_seen_wall, UTC)
        evidence = {
            "agent_id": state.agent_id, "role": role.value if role else None,
            "silent_for_s": round(silent_for, 3), "heartbeat_timeout_s": self.settings.heartbeat_timeout_s,
            # When the gateway restarted since, silence is counted from its start.
            ("last_heartbeat_at" if state.heard else "watching_since"): last.isoformat(),
        }
        self._act(decision, state.group, IncidentKind.HEARTBEAT_LOST, state.agent_id, evidence, last)
        state.fired = True

    # -- leader keys --------------------------------------------------------------------------

    def _lease_vanished_soon(self, group: str, seen: LeaderSeen, absent_at: float,
                             revision: int) -> None:
        """The watcher's callback (on the loop): decide on the state thread."""
        self.spawn(self.in_state(self._on_lease_vanished, group, seen, absent_at, revision))

    def _on_lease_vanished(self, group: str, seen: LeaderSeen, absent_at: float,
                           revision: int) -> None:
        """A leader key read present, then absent (on the state thread)."""
        if group not in self.settings.groups:  # removed by a reload since the read
            return
        self._adopt_shared_primary(group)
        open_rec = self.store.open_incident(group)
        decision = decide_lease_expired(
            group=group, vanished=seen, absent_at=absent_at,
            known_primary=self.tracker.primary(group),
            auto_failover=self.settings.groups[group].auto_failover,
            open_incident=open_rec.incident.idempotency_key if open_rec else None)
        holder = seen.leader.agent_id if seen.leader is not None else ""
        evidence = {
            "agent_id": holder, "by": seen.leader.by if seen.leader else None,
            "leader_value": seen.raw[:500], "key_mod_revision": seen.mod_revision,
            "lease_id": seen.lease, "last_seen_revision": seen.revision,
            "last_seen_at": datetime.fromtimestamp(seen.seen_at, UTC).isoformat(),
            "absent_at": datetime.fromtimestamp(absent_at, UTC).isoformat(),
            "absent_revision": revision,
        }
        # RTO counts from the earliest sign: the holder's last heartbeat if it was heard before.
        first = seen.seen_at
        state = self.tracker.get(group, holder) if holder else None
        if state is not None and state.heard:
            first = min(first, state.last_seen_wall)
        if not holder:
            log.warning("%s", decision.reason)
            return
        self._act(decision, group, IncidentKind.LEASE_EXPIRED, holder, evidence,
                  datetime.fromtimestamp(first, UTC))

    # -- configuration reload -----------------------------------------------------------------

    def apply_groups(self, groups: dict[str, GroupPolicy], rosters: dict[str, GroupRoster]) -> None:
        """Serve these groups from now on (a reloaded configuration; on the state thread).

        The settings object is shared with the HTTP handlers, the roles and Slack services: its
        groups and rosters are replaced, never changed in place, so a reader sees one version or
        the other. What this replica remembers of agents no group names any more is forgotten
        (they leave /v1/groups and /metrics); the shared store keeps its records, which other
        replicas may still use."""
        added = [g for g in groups if g not in self.settings.groups]
        # Rosters first: a group is never listed without its nodes, so an event of a group just
        # added is never refused as coming from an unknown agent.
        self.settings.rosters = rosters
        self.settings.groups = groups

        def keep(group: str, agent_id: str) -> bool:
            return group in self.settings.groups and agent_id in self.settings.known_agents(group)

        self.tracker.retain(keep)
        self.replication.retain(keep)
        self._failures = {k: v for k, v in self._failures.items() if keep(*k)}
        self._noted = {k: v for k, v in self._noted.items() if keep(*k)}
        with self._alert_lock:
            self._alerted = {k: v for k, v in self._alerted.items() if keep(k[0], k[1])}
        if self.leases is not None:
            self.leases.set_groups(list(groups))
        if self.host_watch is not None:
            self.host_watch.retain(keep)
        if added:
            try:
                self._rearm(added, keep)
            except Exception:  # the groups are served already; their silence counts from a beat
                log.exception("re-arming the stored agents of groups %s failed", ", ".join(added))

    def _rearm(self, added: list[str], keep: Callable[[str, str], bool]) -> None:
        """Arm the agents the state remembers of groups just added, as a start does: a group
        removed and added again is watched from its stored primary on, not from scratch."""
        agents = [a for a in self.store.agents() if a[0] in added and keep(a[0], a[1])]
        primaries = {g: a for g, a in self.store.primaries().items()
                     if g in added and keep(g, a)}
        self.tracker.restore(agents, primaries)

    # -- views and audit ------------------------------------------------------------------------

    async def groups(self) -> dict[str, Any]:
        """groups_view() on the state thread."""
        return await self.in_state(self.groups_view)

    def groups_view(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        agents = self.tracker.agents()
        for name, policy in self.settings.groups.items():
            primary = self.tracker.primary(name)
            pstate = self.tracker.get(name, primary) if primary else None
            rec = self.store.open_incident(name)
            out[name] = {
                "auto_failover": policy.auto_failover,
                "primary": primary,
                "primary_heartbeat_age_s": round(self.tracker.age(pstate), 3) if pstate else None,
                "agents": [
                    {"agent_id": s.agent_id,
                     "role": (self.tracker.effective_role(name, s.agent_id) or "unknown"),
                     "heartbeat_age_s": round(self.tracker.age(s), 3), "heard": s.heard}
                    for s in agents if s.group == name
                ],
                "open_incident": None if rec is None else {
                    "idempotency_key": rec.incident.idempotency_key, "kind": rec.incident.kind.value,
                    "status": rec.status.value, "run_id": rec.run_id, "reason": rec.incident.reason,
                    "first_failure_at": rec.incident.first_failure_at.isoformat(), "error": rec.error,
                },
            }
            if self.leases is not None:
                out[name]["leases"] = self.leases.view(name)
        return out

    def refuse(self, rejection: Rejection, target: str, client: str | None) -> None:
        """Count, log and audit a refused request (never its body)."""
        self.metrics.rejections.labels(rejection.reason).inc()
        log.warning("refused %s from %s: %s %s", target, client, rejection.status, rejection.detail)
        self._record("request.refuse", target,
                     {"client": client, "status": rejection.status, "reason": rejection.reason},
                     "refused", rejection.detail)

    def _record(
        self, action: str, target: str, parameters: dict[str, Any], outcome: str, reason: str
    ) -> None:
        append_or_log(self._audit, action, target, parameters, outcome, reason)
