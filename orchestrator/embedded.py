"""The warm path: run incident flows in the gateway's own process, against the Prefect API.

Prefect's default start path (a worker polls, then spawns a process) costs seconds we do not
have during an outage. Here the flow runs in a thread of a process that has already imported
everything, resolved its secrets and logged in to vCenter; the run is still a Prefect flow run,
visible in the UI like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import prefect.context
from prefect import Flow, flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

from flows import confirm_prefetch, step_tasks
from flows.failback import failback
from flows.failover import APP_CHECK_S, VM_READ_S, failed_and_target, failover
from flows.failover import labels as failover_labels
from flows.locks import ensure_limit, roles_limit
from flows.prefect_results import RESULTS
from flows.reprotect import reprotect
from flows.run import run_name, run_tags
from flows.runtime import runtime
from orchestrator.gateway.contracts import Incident
from tasks import vsphere

log = logging.getLogger("drflow.embedded")

Closer = Callable[[str, str, str, str], Any]  # (group, idempotency key, outcome, reason)


_quiet: dict[int, tuple[Any, Any]] = {}


@contextmanager
def no_heartbeats() -> Iterator[None]:
    """Prefect's settings with flow-run heartbeats off (a runner thread per run otherwise).

    `temporary_settings` validates a whole new Settings object on every entry: 0.1-0.3 s of CPU
    under the GIL per run when five failovers start together. The copy is made once per base
    settings and re-entered after that."""
    ctx = prefect.context.get_settings_context()
    base = ctx.settings
    cached = _quiet.get(id(base))
    if cached is None or cached[0] is not base:
        cached = (base, base.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
        _quiet[id(base)] = cached
    with prefect.context.SettingsContext(profile=ctx.profile, settings=cached[1]):
        yield


WARM_STEP = "warm up"
RECORDED_WAIT_S = 5.0  # how long the warm-up waits for its step's task run to be recorded


@flow(name="warm-up", persist_result=False, result_storage=RESULTS)
def warm_up_flow() -> str:
    # One step task run, as a runbook's steps are (flows/step_tasks.py): Prefect's task engine
    # and its events client start here, not in the first failover's first step.
    with step_tasks.step_run(WARM_STEP) as step:
        step.finish("ok", "warm")
    return "warm"


def warm_prefect() -> None:
    """Run the warm-up flow, then delete its run: the engine, the client, the events client
    and the server's run paths are warm, and no `warm-up` run is left in the UI's list.

    The step's task run reaches the server as events, recorded a moment after the run ends;
    the run is deleted once its task run is recorded (deleting the run deletes it too), so
    that no task run is left pointing at a run that is gone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with no_heartbeats():
        state = warm_up_flow(return_state=True)
    run_id = state.state_details.flow_run_id
    if run_id is None:
        return
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + RECORDED_WAIT_S
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            while time.monotonic() < deadline:
                recorded = client.read_task_runs(flow_run_filter=runs)
                if any(t.state is not None and t.state.is_final() for t in recorded):
                    break
                time.sleep(0.1)
            client.delete_flow_run(run_id)
    except Exception as exc:  # a warm-up run left in the list is untidy, not a fault
        log.warning("warm-up: could not delete the warm-up run %s: %s: %s", run_id,
                    type(exc).__name__, exc)


def warm_process(config_path: str) -> None:
    """Do now what the first incident would otherwise pay for: secrets, clients, vCenter
    sessions, Prefect's engine, the runbooks' locks."""
    rt = runtime(config_path)
    _ = rt.secret_values, rt.audit, rt.route53, rt.slack
    for site in rt.cfg.sites:
        try:
            vsphere.connect(rt.vcenter(site))
        except ConnectionError as exc:  # vCenter may be the thing that is down
            log.warning("warm-up: %s", exc)
    warm_prefect()
    if rt.etcd is None:  # the runbooks' locks are Prefect limits: made before an incident
        for g in rt.cfg.groups:
            ensure_limit(roles_limit(g.name))


def run_labelled(flow: Flow[..., Any], parameters: dict[str, Any], name: str,
                 tags: list[str]) -> dict[str, Any]:
    """Run `flow` here as a flow run created with its name and tags: what calling it would do,
    less the rename Prefect sends after creating a run under a random name (`with_options(
    flow_run_name=…)`), and with tags that stay on the run (entering `prefect.tags()` would
    also tag every task run, and a tagged task run asks the API for concurrency slots)."""
    from prefect.context import SyncClientContext
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    with SyncClientContext.get_or_create() as ctx:
        run = ctx.client.create_flow_run(flow, parameters=flow.serialize_parameters(parameters),
                                         name=name, tags=tags, state=Pending())
        return cast(dict[str, Any], run_flow(flow, flow_run=run, parameters=parameters))


def prefetch_confirm(config_path: str, group: str, incident: dict[str, Any], key: str) -> None:
    """Start the confirm step's reads while Prefect creates the run (a second on a busy
    machine): the flow takes them if they are still fresh."""
    try:
        rt = runtime(config_path)
        g = rt.cfg.group(group)
        old, _ = failed_and_target(g, incident)
        confirm_prefetch.start(key, rt.vcenter(old.site), old.vm, rt.db(g, old),
                               VM_READ_S, APP_CHECK_S)
    except Exception:  # the flow looks for itself
        log.exception("could not start the confirm reads for %s", key)


class EmbeddedStarter:
    """An IncidentStarter that runs the failover flow in this process, once per incident key."""

    def __init__(self, config_path: str, close: Closer | None = None) -> None:
        self.config_path = config_path
        self.close = close
        self._runs: dict[str, threading.Thread] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def warm_up(self) -> float:
        """Do now what the first incident would otherwise pay for; returns the seconds spent."""
        t0 = time.monotonic()
        warm_process(self.config_path)
        return time.monotonic() - t0

    async def start_incident(self, incident: Incident) -> str:
        key = incident.idempotency_key
        with self._lock:
            if key not in self._runs:
                t = threading.Thread(target=self._run, args=(incident,), name=f"flow {key}",
                                     daemon=True)
                self._runs[key] = t
                t.start()
        return key

    def result(self, key: str) -> dict[str, Any] | None:
        return self._results.get(key)

    def wait(self, key: str, timeout: float | None = None) -> dict[str, Any] | None:
        t = self._runs.get(key)
        if t is not None:
            t.join(timeout)
        return self._results.get(key)

    def _run(self, incident: Incident) -> None:
        key = incident.idempotency_key
        payload = incident.model_dump(mode="json")
        try:
            prefetch_confirm(self.config_path, incident.group, payload, key)
            name, tags = failover_labels(self.config_path, incident.group, payload)
            with no_heartbeats():
                result = run_labelled(failover, {"group": incident.group, "incident": payload,
                                                 "config_path": self.config_path}, name, tags)
        except Exception as exc:
            log.exception("failover %s failed", key)
            result = {"outcome": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        self._results[key] = result
        if self.close is not None:
            try:
                self.close(incident.group, key, str(result.get("outcome")),
                           str(result.get("reason", "")))
            except Exception:
                log.exception("could not close incident %s", key)




class ReprotectStarter:
    """The gateway's ProtectStarter: runs re-protect in this process, once per key, one run per
    group at a time; then, if the group's policy says so, the failback (which waits for Slack)."""

    def __init__(self, config_path: str, on_done: Closer | None = None) -> None:
        self.config_path = config_path
        self.on_done = on_done  # told how each run ended (RolesService.reprotect_finished)
        self._runs: dict[str, threading.Thread] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._group_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    async def start_reprotect(self, group: str, key: str, fence_first: bool, reason: str) -> str:
        with self._lock:
            if key not in self._runs:
                t = threading.Thread(target=self._run, args=(group, key, fence_first, reason),
                                     name=f"flow {key}", daemon=True)
                self._runs[key] = t
                self._group_locks.setdefault(group, threading.Lock())
                t.start()
        return key

    def wait(self, key: str, timeout: float | None = None) -> dict[str, Any] | None:
        t = self._runs.get(key)
        if t is not None:
            t.join(timeout)
        return self._results.get(key)

    def _run(self, group: str, key: str, fence_first: bool, reason: str) -> None:
        with self._group_locks[group], no_heartbeats():
            try:
                trigger = {"kind": "gateway", "reason": reason, "idempotency_key": key}
                # The site is the run's to add: which side serves is read in its first step.
                result = run_labelled(reprotect, {"group": group, "trigger": trigger,
                                                  "fence_first": fence_first,
                                                  "config_path": self.config_path},
                                      run_name("reprotect", group, key),
                                      run_tags("reprotect", group, None))
            except Exception as exc:
                log.exception("re-protect %s failed", key)
                result = {"outcome": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            self._results[key] = result
        if self.on_done is not None:
            try:
                self.on_done(group, key, str(result.get("outcome")), str(result.get("reason", "")))
            except Exception:
                log.exception("could not report the end of re-protect %s", key)
        if result.get("outcome") == "protected" and \
                runtime(self.config_path).cfg.group(group).policy.auto_failback:
            with no_heartbeats():
                try:
                    failback(group, requested_by=f"auto_failback after {key}",
                             config_path=self.config_path)
                except Exception:
                    log.exception("automatic failback of %s after %s failed", group, key)
