"""`drflow runner`: a long-lived, warm process at the DR site that executes deployment runs.

A Prefect process worker polls, then starts a Python process per run that imports Prefect and
drflow, fetches the secrets and logs in to vCenter: 2.6-3.4 s before a failover's first step.
A warm runner has done all of that before the outage. It executes the runs of its work pool's
drflow deployments in its own process, each in a thread, through Prefect's flow engine: the
same flow runs, states, logs and UI as a worker's.

How a run reaches it:
- **pushed**: the gateway, after creating a run, writes `/drflow/dispatch/<pool>/<run id>` to
  etcd (with a short lease); every runner of the pool watches that prefix and has the run
  milliseconds later;
- **polled**: every `poll_s` it also asks Prefect for the pool's scheduled runs, which covers
  runs started from the UI or the CLI, drill schedules, and a dispatch lost with etcd.

Several runners (and ordinary process workers) may serve one pool: the run goes to whoever moves
it to PENDING first. Prefect's orchestration refuses a second PENDING (as it does between two
workers), so a run executes once however many runners saw it.

A runner that dies mid-run (kill -9, its host lost) must not leave a failover half done:
- each runner keeps a liveness key, `/drflow/runners/<name>`, under a lease of `LIVENESS_TTL_S`,
  and marks each run it executes with `/drflow/running/<pool>/<run id>` under the same lease;
- when such a mark disappears while its run is not final, the runner is gone: the surviving
  runners race to re-create the mark under their own lease (one etcd transaction: one wins), and
  the winner sets the run back to SCHEDULED and executes it again from the start. The runbooks'
  steps are idempotent (a promotion done is not done twice), and the group's lock the dead
  runner held lapses with its 3 s lease in etcd (flows/etcd_lock.py);
- every poll also looks for runs of the pool that are PENDING or RUNNING with no mark (a runner
  that died between its claim and its mark), and adopts them the same way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from drflow import liveness
from drflow.etcd import Client, EtcdError, absent, delete_op, put_op, value_is
from drflow.liveness import Liveness

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.flows import Flow

log = logging.getLogger("drflow.runner")

DISPATCH_PREFIX = "/drflow/dispatch/"
RUNNING_PREFIX = "/drflow/running/"
RUNNERS_PREFIX = "/drflow/runners/"
DISPATCH_TTL_S = 60  # a dispatch nobody took is left to the pollers after this
HEARTBEAT_S = 10.0  # as a worker, to the Prefect server
LIVENESS_TTL_S = 3  # a dead runner's runs are taken over this long after its last renewal
PID_PREFIX = "drflow-runner@"  # a run's infrastructure_pid: which runner executes it
UNMARKED_GRACE_S = 5.0  # a claimed run gets its mark within ms; this long without one: orphan


def dispatch_prefix(pool: str) -> str:
    return f"{DISPATCH_PREFIX}{pool}/"


def dispatch_key(pool: str, run_id: str) -> str:
    return f"{dispatch_prefix(pool)}{run_id}"


def running_key(pool: str, run_id: UUID | str) -> str:
    return f"{RUNNING_PREFIX}{pool}/{run_id}"


def run_id_of(key: str) -> UUID | None:
    """The flow run id a dispatch key names, or None for a key that is not one."""
    try:
        return UUID(key.rsplit("/", 1)[-1])
    except ValueError:
        return None


def dispatch(client: Client, pool: str, run_id: str, deployment: str, key: str) -> None:
    """Tell the pool's runners that run `run_id` waits (they still claim it through Prefect)."""
    lease, _ = client.grant(DISPATCH_TTL_S)
    client.put(dispatch_key(pool, run_id),
               json.dumps({"deployment": deployment, "key": key, "at": time.time()}), lease)


def drflow_flows() -> dict[str, Flow[..., Any]]:
    """The flows a runner executes, by flow name: the deployments' entrypoints, imported now."""
    from flows.drill import drill
    from orchestrator.entrypoints import failback, failover, reprotect

    return {f.name: f for f in (failover, reprotect, failback, drill)}


class WarmRunner:
    """Executes the scheduled runs of `pool` whose flow it knows, in this process."""

    def __init__(self, config_path: str, pool: str, etcd: Client | None,
                 poll_s: float = 2.0, name: str | None = None) -> None:
        self.config_path = config_path
        self.pool = pool
        self.etcd = etcd
        self.poll_s = poll_s
        self.name = name or f"runner-{os.uname().nodename}-{os.getpid()}"
        self._mark_value = json.dumps({"runner": self.name})
        self.pid = f"{PID_PREFIX}{os.uname().nodename}:{os.getpid()}"
        self.flows = drflow_flows()
        self._flow_names: dict[UUID, str] = {}
        self._seen: dict[UUID, float] = {}  # run id → when claimed or refused (not tried again)
        self._runs: dict[UUID, threading.Thread] = {}
        self._taking: set[UUID] = set()  # being claimed by a take() under way
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.liveness: Liveness | None = None
        self.on_claimed: Callable[[UUID], None] | None = None  # tests, progress lines

    # -- warm-up -------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Secrets, vCenter sessions, a Prefect client, the runbooks' locks: before any outage."""
        from orchestrator.embedded import warm_process

        os.environ["DRFLOW_CONFIG"] = self.config_path  # the deployments pass no config_path
        t0 = time.monotonic()
        warm_process(self.config_path)
        with self._client() as client:
            client.read_work_pool(self.pool)  # a clear error now: the pool must exist
        return time.monotonic() - t0

    def _client(self) -> SyncPrefectClient:
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    # -- the loops -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Watch and poll until stop(); runs keep going in their threads until they end."""
        threads = [threading.Thread(target=self._poll_loop, name="runner poll", daemon=True)]
        if self.etcd is not None:
            self.liveness = Liveness(self.etcd, RUNNERS_PREFIX + self.name, LIVENESS_TTL_S,
                                     self.pool).start()
            self.liveness.on_new_lease = self._remark
            threads += [
                threading.Thread(target=self._watch_loop, name="runner dispatch watch",
                                 args=(dispatch_prefix(self.pool), self._on_dispatch),
                                 daemon=True),
                threading.Thread(target=self._watch_loop, name="runner marks watch",
                                 args=(f"{RUNNING_PREFIX}{self.pool}/", self._on_mark),
                                 daemon=True)]
        for t in threads:
            t.start()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """After the runs under way ended: the liveness key goes now, not in LIVENESS_TTL_S."""
        if self.liveness is not None:
            self.liveness.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the runs under way (a failover interrupted here is re-run by nobody)."""
        for rid in self.running():
            self._runs[rid].join(timeout)

    def running(self) -> list[UUID]:
        with self._lock:
            return self._running_unlocked()

    def _running_unlocked(self) -> list[UUID]:
        return [rid for rid, t in self._runs.items() if t.is_alive()]

    def _busy(self) -> set[UUID]:
        """Runs this runner executes, claims or adopts now."""
        with self._lock:
            return {*self._running_unlocked(), *self._taking}

    def _watch_loop(self, prefix: str, on_event: Callable[[str, str], None]) -> None:
        assert self.etcd is not None
        revision = 0
        while not self._stop.is_set():
            try:
                if revision == 0:  # (re)start: what is already there, then what comes
                    revision, kvs = self.etcd.get_prefix(prefix)
                    revision += 1
                    for kv in kvs:
                        on_event("PUT", kv.key)
                for seen, events in self.etcd.watch(prefix, revision):
                    revision = max(revision, seen + 1)
                    for kind, kv in events:
                        on_event(kind, kv.key)
                    if self._stop.is_set():
                        return
            except EtcdError as exc:
                log.warning("watching %s: %s; polling Prefect meanwhile", prefix, exc)
                revision = 0
                self._stop.wait(1.0)

    def _on_dispatch(self, kind: str, key: str) -> None:
        run_id = run_id_of(key)
        if kind == "PUT" and run_id is not None and run_id not in self._seen:
            threading.Thread(target=self.take, args=(run_id,), name=f"take {run_id}",
                             daemon=True).start()

    def _on_mark(self, kind: str, key: str) -> None:
        run_id = run_id_of(key)
        if kind == "DELETE" and run_id is not None and run_id not in self.running():
            threading.Thread(target=self._adopt_logged, args=(run_id,), name=f"adopt {run_id}",
                             daemon=True).start()

    def _adopt_logged(self, run_id: UUID) -> None:
        """adopt() on a thread of its own: a failure is a log line, and the poll tries again."""
        try:
            self.adopt(run_id)
        except Exception as exc:
            log.warning("adopting run %s failed (%s: %s); the next poll tries again", run_id,
                        type(exc).__name__, exc)

    def _poll_loop(self) -> None:
        beat_at = 0.0
        while not self._stop.is_set():
            try:
                with self._client() as client:
                    if time.monotonic() >= beat_at:
                        # Shown as a worker of the pool (the pool is READY while one beats).
                        client.send_worker_heartbeat(self.pool, self.name, HEARTBEAT_S)
                        beat_at = time.monotonic() + HEARTBEAT_S
                    runs = client.get_scheduled_flow_runs_for_work_pool(
                        self.pool, scheduled_before=datetime.now(UTC))
                    orphans = self._unmarked(client)
                for resp in runs:
                    if resp.flow_run.id not in self._seen:
                        self.take(resp.flow_run.id)
                for run_id in orphans:
                    self.adopt(run_id)
            except Exception as exc:  # the API may be restarting: keep polling
                log.warning("polling pool %s: %s: %s", self.pool, type(exc).__name__, exc)
            self._stop.wait(self.poll_s)

    # -- one run -------------------------------------------------------------------------------

    def take(self, run_id: UUID, marked: bool = False) -> bool:
        """Claim the run and execute it in a thread; False when it is not ours to run.

        Prefect accepts PENDING on a run that has already COMPLETED (checked on 3.9.1), so a
        runner that read the run as SCHEDULED just before another ran it to the end would run
        it again. The claim is therefore first this runner's mark, created only if absent (one
        etcd transaction); the run is read again under the mark and claimed (PENDING) only if
        still SCHEDULED. `marked`: the caller holds the mark already (adopt)."""
        with self._lock:
            if run_id in self._seen and not marked:
                return False
            self._seen[run_id] = time.time()
            added = run_id not in self._taking  # not when adopt() holds it for this call
            self._taking.add(run_id)
        try:
            if not marked and not self._mark(run_id):
                with self._lock:  # another runner holds it: seen again if it comes back
                    self._seen.pop(run_id, None)
                return False
            try:
                claimed = self._claim(run_id)
            except BaseException:
                self._unmark(run_id)
                raise
            if claimed is None:
                self._unmark(run_id)
                return False
            flow, run = claimed
            log.info("run %s (%s): taken by %s", run.name, flow.name, self.name)
            t = threading.Thread(target=self._execute, args=(flow, run), name=f"flow {run.name}",
                                 daemon=True)
            with self._lock:
                self._runs[run_id] = t
            t.start()
        finally:
            if added:
                with self._lock:
                    self._taking.discard(run_id)
        if self.on_claimed is not None:
            self.on_claimed(run_id)
        return True

    def _claim(self, run_id: UUID) -> tuple[Flow[..., Any], FlowRun] | None:
        """Move the run from SCHEDULED to PENDING (Prefect's claim, which also settles a race
        with a plain Prefect worker); (its flow, the run) when this runner now has it."""
        from prefect.exceptions import Abort
        from prefect.states import Pending
        from prefect.utilities.engine import propose_state_sync

        with self._client() as client:
            run = client.read_flow_run(run_id)
            flow = self._flow_of(client, run)
            if flow is None or run.state is None or not run.state.is_scheduled():
                return None
            self._prefetch(flow.name, run)
            try:
                state = propose_state_sync(client, Pending(), flow_run_id=run_id)
            except Abort as exc:  # a worker has it
                log.info("run %s (%s): taken elsewhere (%s)", run.name, flow.name, exc)
                return None
            if not state.is_pending():
                log.info("run %s (%s): not ours (%s)", run.name, flow.name, state.type.value)
                return None
            # Named and tagged as the runbook names itself, in the claim's own update: the
            # run then sends nothing more for it (flows/run.py, RunbookRun.label).
            name, tags = self._labels(flow.name, run)
            client.update_flow_run(run_id, infrastructure_pid=self.pid, name=name, tags=tags)
            run.name, run.tags = name or run.name, tags if tags is not None else run.tags
        return flow, run

    def _labels(self, flow_name: str, run: FlowRun) -> tuple[str | None, list[str] | None]:
        """(name, tags) a failover run gives itself, or (None, None): known before it starts
        only for a failover (the others learn theirs in their first steps, off the RTO)."""
        params = run.parameters or {}
        incident = params.get("incident")
        if flow_name != "failover" or not isinstance(incident, dict):
            return None, None
        from flows.failover import labels

        try:
            name, tags = labels(self.config_path, str(params.get("group")), incident)
        except Exception as exc:  # the run names itself, a moment later
            log.warning("run %s: cannot name it before it starts: %s: %s", run.name,
                        type(exc).__name__, exc)
            return None, None
        return name, sorted(set(run.tags or []) | set(tags))

    def _flow_of(self, client: SyncPrefectClient, run: FlowRun) -> Flow[..., Any] | None:
        name = self._flow_names.get(run.flow_id)
        if name is None:
            name = self._flow_names[run.flow_id] = client.read_flow(run.flow_id).name
        flow = self.flows.get(name)
        if flow is None:
            log.info("run %s: flow %s is not a drflow runbook; left to the pool's workers",
                     run.name, name)
        return flow

    def _prefetch(self, flow_name: str, run: FlowRun) -> None:
        if flow_name != "failover":
            return
        from orchestrator.embedded import prefetch_confirm

        params = run.parameters or {}
        incident = params.get("incident")
        if isinstance(incident, dict) and incident.get("idempotency_key"):
            prefetch_confirm(self.config_path, str(params.get("group")), incident,
                             str(incident["idempotency_key"]))

    def _execute(self, flow: Flow[..., Any], run: FlowRun) -> None:
        from prefect.exceptions import Abort
        from prefect.flow_engine import run_flow

        from orchestrator.embedded import no_heartbeats

        try:
            with no_heartbeats(), liveness.using(self.liveness, lambda: self._lost(run.id)):
                state = run_flow(flow, flow_run=run, return_type="state")
            log.info("run %s (%s): %s %s", run.name, flow.name,
                     getattr(state, "type", "?"), getattr(state, "message", "") or "")
        except Abort as exc:  # taken over by another runner: its state is theirs now
            log.error("run %s (%s): stopped: %s", run.name, flow.name, exc)
        except Exception:  # a run's end never ends the runner
            log.exception("run %s (%s) raised", run.name, flow.name)
        finally:
            self._unmark(run.id)

    def _lost(self, run_id: UUID) -> str | None:
        """Why this runner no longer owns the run (another re-created its mark), or None. When
        etcd cannot say, the run goes on: a runner cut off from etcd with the others still
        reaching it is the one case of two executions, and every step is idempotent."""
        if self.etcd is None:
            return None
        try:
            kv = self.etcd.get_kv(running_key(self.pool, run_id))
        except EtcdError as exc:
            log.warning("run %s: cannot check its mark (%s); going on", run_id, exc)
            return None
        if kv is not None and kv.value == self._mark_value:
            return None
        return (f"runner {self.name} lost run {run_id} (its liveness lease lapsed: frozen or cut "
                "off for longer than it); another runner has taken it over")

    # -- runs of a runner that is gone -------------------------------------------------------

    def _mark(self, run_id: UUID, strict: bool = False) -> bool:
        """Mark the run as ours under our liveness lease, only if nobody has marked it; False
        when another runner has. With etcd out of reach: True (a failover must still start on
        the poll of Prefect), unless `strict` (adopting, which only etcd can make exclusive)."""
        if self.etcd is None or self.liveness is None:
            return True
        key = running_key(self.pool, run_id)
        try:
            ok, _ = self.etcd.txn([absent(key)],
                                  [put_op(key, self._mark_value, self.liveness.lease)])
            return ok
        except EtcdError as exc:
            log.warning("run %s: not marked as %s's: %s", run_id, self.name, exc)
            return not strict

    def _unmark(self, run_id: UUID) -> None:
        """Remove our mark of the run (not another runner's that took it since)."""
        if self.etcd is not None:
            key = running_key(self.pool, run_id)
            try:
                self.etcd.txn([value_is(key, self._mark_value)], [delete_op(key)])
            except EtcdError as exc:  # it lapses with the lease, or is taken as an orphan
                log.warning("run %s: mark not removed: %s", run_id, exc)

    def _remark(self, lease: int) -> None:
        """A new liveness lease: mark our runs again, unless another runner took them."""
        for run_id in self.running():
            if not self._mark(run_id, strict=True):
                log.error("run %s was taken over by another runner while this one was cut off "
                          "from etcd: both may be running it", run_id)

    def _unmarked(self, client: SyncPrefectClient) -> list[UUID]:
        """Runs of the pool PENDING or RUNNING for a while with no runner's mark (or only this
        runner's, on a run it does not execute)."""
        if self.etcd is None:
            return []
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterName,
        )
        from prefect.client.schemas.objects import StateType

        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.PENDING, StateType.RUNNING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self.pool])))
        if not runs:
            return []
        _, kvs = self.etcd.get_prefix(f"{RUNNING_PREFIX}{self.pool}/")
        # A mark of this runner's on a run none of its threads executes marks nothing.
        marked = {run_id_of(kv.key) for kv in kvs if kv.value != self._mark_value}
        now = time.time()
        busy = self._busy()
        return [r.id for r in runs
                if r.id not in marked and r.id not in busy
                and str(r.infrastructure_pid or "").startswith(PID_PREFIX)  # not a worker's
                and r.state is not None and r.state.timestamp is not None
                and now - r.state.timestamp.timestamp() > UNMARKED_GRACE_S]

    def adopt(self, run_id: UUID) -> bool:
        """Run again, from the start, a run whose runner is gone; False if it is not ours to."""
        with self._lock:
            if run_id in self._taking or run_id in self._running_unlocked():
                return False  # this runner has it already (an adoption under way, or its run)
            self._taking.add(run_id)
        try:
            return self._adopt(run_id)
        finally:
            with self._lock:
                self._taking.discard(run_id)

    def _adopt(self, run_id: UUID) -> bool:
        from prefect.states import Scheduled

        with self._client() as client:
            run = client.read_flow_run(run_id)
            if run.state is None or run.state.is_final() or run.state.is_scheduled() \
                    or run.state.is_paused():
                return False
            flow = self._flow_of(client, run)
            if flow is None or not (self._mark(run_id, strict=True) or self._ours_idle(run_id)):
                return False  # another runner adopted it (or it is no runbook of ours)
            gone = str(run.infrastructure_pid or "another runner")
            log.warning("run %s (%s): its runner (%s) is gone; running it again here", run.name,
                        flow.name, gone)
            try:
                client.set_flow_run_state(run_id, Scheduled(
                    message=f"its runner {gone} was lost; re-run by {self.name}"), force=True)
            except BaseException:
                # Our mark on a run we do not execute would keep every runner from adopting it.
                self._unmark(run_id)
                raise
        # Under our mark: another runner cannot claim it; a plain worker may (then it is theirs).
        return self.take(run_id, marked=True)

    def _ours_idle(self, run_id: UUID) -> bool:
        """The run carries this runner's mark but no thread of it executes the run (an adoption
        that failed half way, an API error after the mark): ours to adopt again. Called by
        adopt, which holds the run in `_taking` itself: only a thread executing it counts."""
        if self.etcd is None or run_id in self.running():
            return False
        try:
            return self.etcd.get(running_key(self.pool, run_id)) == self._mark_value
        except EtcdError:
            return False
