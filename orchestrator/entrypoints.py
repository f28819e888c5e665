"""Deployment entrypoints: each runbook run under its group's Prefect concurrency limit.

The locks (flows/locks.py) are Prefect global concurrency limits, the one thing every starter
shares: `roles-<group>` for failover and re-protect, `failback-<group>` for failback (apart: a
failover must never queue behind an approval that nobody clicks). The runbooks take `roles-` in
their own body whatever started them; here each deployed run takes its limit before the runbook
starts, re-entrantly, while its secrets warm up.

The flows keep their names (`failover`, …): deployments read `failover/failover` whichever file
holds the entrypoint, and a run looks the same in the UI as one started by `drflow up`. Each run
ends with its runbook's outcome in its final state's message (`failed_over: RTO 3.1 s, …`): the
gateway reads it there to close the incident (orchestrator/deployed.py), with no result storage shared.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, cast

from prefect import State, flow
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.failback import failback as failback_flow
from flows.failover import failover as failover_flow
from flows.locks import (  # noqa: F401 - LimitMissing, limit_names: re-exported
    LimitMissing,
    exclusive,
    failback_limit,
    limit_names,
    roles_limit,
)
from flows.prefect_results import RESULTS
from flows.reprotect import reprotect as reprotect_flow
from flows.runtime import runtime

FAILBACK = "failback/failback"


def warm_secrets(config_path: str | None) -> None:
    """Resolve every secret of the config into the process cache; errors are the runbook's to
    meet and report. (One at a time: each fetch is mostly CPU, building a boto3 client.)"""
    with contextlib.suppress(Exception):
        rt = runtime(config_path)
        for ref in {ref.ref: ref for _, ref in rt.cfg.refs()}.values():
            with contextlib.suppress(Exception):
                rt.secret(ref)


def start_failback(group: str, after: str | None) -> str:
    """Start the failback deployment once per run of this re-protect (its id is the key: a retry
    of the run does not ask twice, a later re-protect asks again); returns the new run's id."""
    key = f"failback-after:{flow_run.get_id()}"
    run = cast(FlowRun, run_deployment(
        FAILBACK, parameters={"group": group, "requested_by": f"auto_failback after {after or key}"},
        idempotency_key=key, timeout=0, as_subflow=False, flow_run_name=key.replace(":", "-")))
    return str(run.id)


def reported(result: dict[str, Any]) -> State[dict[str, Any]]:
    """The run's final state: Completed, the outcome and why in its message, the result as data."""
    outcome = str(result.get("outcome") or "completed")
    reason = result.get("reason")
    if not reason:
        reason = ", ".join(f"{k} {v}" for k, v in result.items()
                           if k.endswith("_s") and isinstance(v, int | float))
    return Completed(message=f"{outcome}: {reason}"[:1000], data=result)


@flow(name="failover", log_prints=False, persist_result=False, result_storage=RESULTS)
def failover(group: str, incident: dict[str, Any] | None = None, force: bool = False,
             config_path: str | None = None) -> State[dict[str, Any]]:
    """Failover of `group` (flows/failover.py), one at a time per group across all workers."""
    # A fresh process spends ~0.4 s fetching secrets: start while the group's slot is taken.
    threading.Thread(target=warm_secrets, args=(config_path,), daemon=True).start()
    with exclusive(roles_limit(group), etcd=runtime(config_path).etcd):
        return reported(failover_flow.fn(group, incident, force, config_path))


@flow(name="reprotect", log_prints=False, persist_result=False, result_storage=RESULTS)
def reprotect(group: str, trigger: dict[str, Any] | None = None, fence_first: bool = False,
              config_path: str | None = None) -> State[dict[str, Any]]:
    """Re-protect of `group` (flows/reprotect.py), never alongside its failover; then, if the
    group's policy says so, the failback deployment (which waits for approval in Slack)."""
    with exclusive(roles_limit(group), etcd=runtime(config_path).etcd):
        result: dict[str, Any] = reprotect_flow.fn(group, trigger, fence_first, config_path)
    if result.get("outcome") == "protected" and \
            runtime(config_path).cfg.group(group).policy.auto_failback:
        result["failback_run"] = start_failback(group, (trigger or {}).get("idempotency_key"))
    return reported(result)


@flow(name="failback", log_prints=False, persist_result=False, result_storage=RESULTS)
def failback(group: str, requested_by: str = "cli", approval_timeout_s: float | None = None,
             config_path: str | None = None) -> State[dict[str, Any]]:
    """Failback of `group` (flows/failback.py), one at a time per group."""
    with exclusive(failback_limit(group), etcd=runtime(config_path).etcd):
        return reported(failback_flow.fn(group, requested_by, approval_timeout_s, config_path))
