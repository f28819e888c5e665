"""The distributed path: the gateway starts deployment runs that the DR site's warm runners (or
workers) execute; with etcd configured it pushes each new run to the runners at once.

`DeploymentStarter` is the gateway's IncidentStarter (and ProtectStarter) when it runs with
`--mode deployment`. A failover is `failover/failover` started with the incident's idempotency
key: every retry, every gateway replica that saw the same incident, gets back the same flow run.

The incident is closed from here, not by the flow: a watcher on the gateway's event loop polls
the open incidents' runs and closes each incident once its run is final, with the outcome the
run reported in its final state's message (orchestrator/entrypoints.py). Why here:

- every gateway replica holds its own incident state; a flow calling `…/incident/close` through
  a load balancer would reach one replica and leave the others' incidents open forever, while
  each replica's watcher closes its own;
- the watcher reads the open incidents from the gateway's durable state, so a gateway restarted
  mid-run still closes the incident when the run ends;
- a run that crashes, or never starts (no worker up), cannot call anyone: here the crash closes
  the incident as `crashed`, and a run left waiting for a worker is reported in the log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from drflow.etcd import Client as EtcdClient
from drflow.etcd import EtcdError
from orchestrator.gateway.contracts import Incident
from orchestrator.warm_runner import dispatch

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from orchestrator.gateway.service import GatewayService

log = logging.getLogger("drflow.deployed")

Closer = Callable[[str, str, str, str], Any]  # (group, idempotency key, outcome, reason)

FAILOVER = "failover/failover"
REPROTECT = "reprotect/reprotect"
# A finished flow run created this long before the incident's first failure belongs to an older
# incident under the same key: another gateway replica numbers incidents differently, or this
# gateway's state was reset. Re-protect has no failure time: a finished run older than
# STALE_REPROTECT is taken for an older generation's (a fresh run is harmless: idempotent).
STALE_RUN_MARGIN = timedelta(seconds=5)
STALE_REPROTECT = timedelta(seconds=60)
_OUTCOME = re.compile(r"^([a-z][a-z0-9_]*): ?(.*)$", re.S)


class GatewayStopped(Exception):
    """The gateway's service is stopped: nothing left to watch."""


def outcome_of(state_type: str, message: str | None) -> tuple[str, str]:
    """(outcome, reason) of a final flow run state: the runbook's own outcome when it reported
    one in the message (`failed_over: RTO 3.1 s …`), else the state (`crashed`, `failed`, …)."""
    text = (message or "").strip()
    if state_type == "COMPLETED":
        m = _OUTCOME.match(text)
        if m:
            return m.group(1), m.group(2)
        return "completed", text or "the run completed without reporting an outcome"
    return state_type.lower(), text or f"the run ended {state_type.lower()}"


def run_name(key: str) -> str:
    return key.replace(":", "-")


class DeploymentStarter:
    """Starts runbook deployments on the Prefect server, once per key; closes incidents when
    their runs end. Call `attach(service)` with the gateway's service before serving."""

    def __init__(self, failover: str = FAILOVER, reprotect: str = REPROTECT,
                 poll_s: float = 1.0, unclaimed_warn_s: float = 15.0,
                 etcd: EtcdClient | None = None) -> None:
        self.failover = failover
        self.etcd = etcd  # to push each new run to the warm runners (orchestrator/warm_runner.py)
        self.reprotect = reprotect
        self.poll_s = poll_s
        self.unclaimed_warn_s = unclaimed_warn_s
        self._service: GatewayService | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._bad_ids: set[str] = set()
        self.closed: dict[str, tuple[str, str]] = {}  # key → (outcome, reason), for tests/logs
        # Re-protect runs started here, followed until they end: run id → (group, key).
        self._reprotects: dict[str, tuple[str, str]] = {}
        # Told how each re-protect run ended (RolesService.reprotect_finished): one that did not
        # protect the group is tried again later, as in embedded mode.
        self.on_reprotect_done: Closer | None = None

    # -- wiring --------------------------------------------------------------------------------

    def attach(self, service: GatewayService) -> None:
        """Watch `service`'s open incidents, from its first event on. A replica that did not
        start a run (another replica did, then died; or this one restarted meanwhile) must
        close its incident all the same: every replica watches."""
        self._service = service
        service.event_hooks.append(lambda _event: self._watch_from_any_thread(service))

    def _watch_from_any_thread(self, service: GatewayService) -> None:
        # Event hooks run on the gateway's state thread, where no event loop runs.
        if self._watcher is None or self._watcher.done():
            service.call_soon(self._ensure_watching)

    def warm_up(self) -> float:
        """Check that the deployments exist (a clear error now beats one during an outage)."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        async def check() -> None:
            async with get_client() as client:
                for name in (self.failover, self.reprotect):
                    try:
                        await client.read_deployment_by_name(name)
                    except ObjectNotFound:
                        raise RuntimeError(
                            f"deployment {name} not found on the Prefect server: run "
                            "`drflow deploy --config drflow.yaml` first") from None

        t0 = time.monotonic()
        try:
            asyncio.run(check())
        except RuntimeError:
            raise
        except Exception as exc:
            from prefect.settings import PREFECT_API_URL

            raise RuntimeError(f"cannot reach the Prefect API at {PREFECT_API_URL.value()}: "
                               f"{type(exc).__name__}: {exc}; set PREFECT_API_URL to the "
                               "shared Prefect server") from None
        return time.monotonic() - t0

    # -- IncidentStarter / ProtectStarter --------------------------------------------------------

    async def start_incident(self, incident: Incident) -> str:
        """Create (or find) the failover run of this incident; returns its flow run id."""
        params = {"group": incident.group, "incident": incident.model_dump(mode="json")}
        run = await self._run(self.failover, params, incident.idempotency_key,
                              ["drflow", "incident", incident.group])
        if is_stale(run, incident):
            # The key was used by an older incident elsewhere: this incident gets its own run.
            key = f"{incident.idempotency_key}@{int(incident.first_failure_at.timestamp())}"
            log.warning("flow run %s under key %s belongs to an older incident; starting %s",
                        run.id, incident.idempotency_key, key)
            run = await self._run(self.failover, params, key, ["drflow", "incident", incident.group])
        self._ensure_watching()
        return str(run.id)

    async def start_reprotect(self, group: str, key: str, fence_first: bool, reason: str) -> str:
        """Create (or find) the re-protect run of this protection generation."""
        params = {"group": group, "fence_first": fence_first,
                  "trigger": {"kind": "gateway", "reason": reason, "idempotency_key": key}}
        tags = ["drflow", "reprotect", group]
        run = await self._run(self.reprotect, params, key, tags)
        now = datetime.now(UTC)
        if finished_before(run, now - STALE_REPROTECT):
            fresh = f"{key}@{int(now.timestamp())}"
            log.warning("re-protect run %s under key %s ended long ago; starting %s", run.id, key,
                        fresh)
            run = await self._run(self.reprotect, params, fresh, tags)
        self._reprotects[str(run.id)] = (group, key)
        self._ensure_watching()
        return str(run.id)

    async def _run(self, deployment: str, params: dict[str, Any], key: str,
                   tags: list[str]) -> FlowRun:
        from prefect.client.orchestration import get_client
        from prefect.deployments import arun_deployment

        async with get_client() as client:
            run: FlowRun = await arun_deployment(
                deployment, client=client, parameters=params, idempotency_key=key, timeout=0,
                flow_run_name=run_name(key), tags=tags, as_subflow=False)
        state = run.state
        if self.etcd is not None and run.work_pool_name and state is not None \
                and state.is_scheduled():
            try:
                await asyncio.to_thread(dispatch, self.etcd, run.work_pool_name, str(run.id),
                                        deployment, key)
            except EtcdError as exc:  # the runners' poll of Prefect finds it, a little later
                log.warning("run %s: not pushed to the warm runners: %s", run.id, exc)
        return run

    # -- closing incidents -----------------------------------------------------------------------

    def _ensure_watching(self) -> None:
        if self._service is None or (self._watcher is not None and not self._watcher.done()):
            return
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            while self._service is not None:
                try:
                    await self.close_finished(client)
                    await self.follow_reprotects(client)
                except GatewayStopped:
                    return
                except Exception:
                    log.exception("checking the incident runs failed; retrying")
                await asyncio.sleep(self.poll_s)

    async def close_finished(self, client: Any) -> list[str]:
        """Close every open incident whose run is final; returns the keys closed."""
        service = self._service
        if service is None:
            return []
        try:
            views = await service.groups()
        except RuntimeError as exc:  # shutting down: its state is closed
            raise GatewayStopped(str(exc)) from exc
        closed = []
        for group, view in views.items():
            inc = view.get("open_incident")
            if not inc or inc.get("status") != "open" or not inc.get("run_id"):
                continue
            key, run_id = str(inc["idempotency_key"]), str(inc["run_id"])
            try:
                uid = UUID(run_id)
            except ValueError:
                if run_id not in self._bad_ids:
                    self._bad_ids.add(run_id)
                    log.warning("incident %s was started in embedded mode (run %s): close it "
                                "from that gateway, or restart it with --mode embedded", key, run_id)
                continue
            run = await client.read_flow_run(uid)
            state = run.state
            if state is None or not state.is_final():
                self._warn_unclaimed(key, run, state)
                continue
            outcome, reason = outcome_of(state.type.value, state.message)
            try:
                await service.close_incident(group, key, outcome, reason)
            except Exception as exc:  # closed meanwhile (409): nothing left to do
                log.info("incident %s: not closed (%s)", key, exc)
                continue
            self.closed[key] = (outcome, reason)
            closed.append(key)
        return closed

    async def follow_reprotects(self, client: Any) -> list[str]:
        """Report every followed re-protect run that has ended; returns their keys."""
        done = []
        for run_id, (group, key) in list(self._reprotects.items()):
            run = await client.read_flow_run(UUID(run_id))
            if run.state is None or not run.state.is_final():
                continue
            del self._reprotects[run_id]
            outcome, reason = outcome_of(run.state.type.value, run.state.message)
            done.append(key)
            if self.on_reprotect_done is not None:
                try:  # a store write (etcd with shared state): not on the event loop
                    await asyncio.to_thread(self.on_reprotect_done, group, key, outcome, reason)
                except Exception:
                    log.exception("could not report the end of re-protect %s", key)
        return done

    def _warn_unclaimed(self, key: str, run: FlowRun, state: Any) -> None:
        waiting = state is None or state.type.value in ("SCHEDULED", "PENDING")
        if not waiting or key in self._warned or run.created is None:
            return
        age = time.time() - run.created.timestamp()
        if age > self.unclaimed_warn_s:
            self._warned.add(key)
            log.error("incident %s: flow run %s has waited %.0f s for a worker: start one at the "
                      "DR site (prefect worker start --pool %s --type process)", key, run.id, age,
                      run.work_pool_name or "<its pool>")


def finished_before(run: FlowRun, when: datetime) -> bool:
    """The run is over and was created before `when`."""
    state = run.state
    return (state is not None and state.is_final() and run.created is not None
            and run.created < when)


def is_stale(run: FlowRun, incident: Incident) -> bool:
    """The run found under the incident's key belongs to an older incident."""
    return finished_before(run, incident.first_failure_at - STALE_RUN_MARGIN)

