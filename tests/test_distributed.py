"""Distributed mode for real: a Prefect server on PostgreSQL, `drflow deploy`, two warm runners at
the DR site, and a gateway in `--mode deployment` starting deployment runs on the lab's incidents.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed, Crashed, Running

from drflow.events import EventKind, HealthEvent
from drflow.signing import sign_headers
from lab import vcsim
from lab.distributed import REPO, Dist, start_distributed, stop_distributed
from orchestrator.deployed import DeploymentStarter, is_stale, outcome_of
from orchestrator.gateway.contracts import Incident, IncidentKind
from orchestrator.gateway.status import PROTECTED, UNPROTECTED
from tests.harness import Env, wait_for
from tests.test_gateway import STANDBY, RecordingAudit, make_settings, post, serve_app
from tests.test_gateway import event as gw_event

# -- pure parts ---------------------------------------------------------------------------------


def test_outcome_comes_from_the_final_state_message() -> None:
    assert outcome_of("COMPLETED", "failed_over: rto_s 3.1, rpo_s 0.0") == (
        "failed_over", "rto_s 3.1, rpo_s 0.0")
    assert outcome_of("COMPLETED", "not_confirmed: the VM is on and answers") == (
        "not_confirmed", "the VM is on and answers")
    assert outcome_of("COMPLETED", None)[0] == "completed"
    assert outcome_of("CRASHED", "Flow run infrastructure exited with non-zero status code -9.") \
        == ("crashed", "Flow run infrastructure exited with non-zero status code -9.")
    assert outcome_of("FAILED", "")[0] == "failed"


def _incident(first_failure_at: datetime, key: str = "failover:orders:1") -> Incident:
    return Incident(group="orders", kind=IncidentKind.HEARTBEAT_LOST, reason="test",
                    first_failure_at=first_failure_at, idempotency_key=key)


def test_a_final_run_older_than_the_incident_is_stale() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    old = FlowRun(flow_id=uuid.uuid4(), created=t, state=Completed())
    assert is_stale(old, _incident(t + timedelta(minutes=5)))
    # The same incident retried (after a gateway restart, or from another replica): reused.
    assert not is_stale(old, _incident(t - timedelta(seconds=3)))
    # A run still going is never stale: it is this incident's run.
    running = FlowRun(flow_id=uuid.uuid4(), created=t, state=Running())
    assert not is_stale(running, _incident(t + timedelta(minutes=5)))
    crashed = FlowRun(flow_id=uuid.uuid4(), created=t, state=Crashed())
    assert is_stale(crashed, _incident(t + timedelta(minutes=5)))


def test_the_end_of_each_reprotect_run_started_is_reported_once(prefect_api: str) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="reprotect-probe")
    def probe() -> None:
        pass

    reported: list[tuple[str, ...]] = []
    starter = DeploymentStarter()
    starter.on_reprotect_done = lambda *args: reported.append(args)

    async def scenario() -> tuple[list[str], list[str]]:
        async with get_client() as client:
            ended = await client.create_flow_run(probe, state=Completed(
                message="unprotected: the standby did not catch up"))
            going = await client.create_flow_run(probe, state=Running())
            starter._reprotects.update({str(ended.id): ("orders", "reprotect:orders:3"),
                                        str(going.id): ("payments", "reprotect:payments:1")})
            return (await starter.follow_reprotects(client),
                    await starter.follow_reprotects(client))

    first, again = asyncio.run(scenario())
    assert first == ["reprotect:orders:3"] and again == []
    assert reported == [("orders", "reprotect:orders:3", "unprotected",
                         "the standby did not catch up")]


def test_a_replica_that_did_not_start_the_run_still_closes_its_incident(
        prefect_api: str, tmp_path: Path) -> None:
    """The incident was opened and its run started by another replica (or by this gateway
    before it restarted); the run has ended. The first event this replica hears starts its
    watch, which closes the incident: nobody else would."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from orchestrator.gateway.app import create_app
    from orchestrator.gateway.store import GatewayStore

    @flow(name="failover-probe")
    def probe() -> None:
        pass

    async def ended_run() -> str:
        async with get_client() as client:
            run = await client.create_flow_run(probe, state=Completed(
                message="failed_over: failed over to pg-b (dr) in 3.1 s"))
            return str(run.id)

    settings = make_settings(tmp_path / "gw.sqlite", runs_in_process=False)
    store = GatewayStore(settings.state_path)
    opened = store.claim_incident("g1", IncidentKind.HEARTBEAT_LOST, "test", {},
                                  datetime.now(UTC))
    assert isinstance(opened, Incident)
    store.mark_started(opened.idempotency_key, asyncio.run(ended_run()))
    store.close()

    starter = DeploymentStarter(poll_s=0.2)
    app = create_app(settings, starter, RecordingAudit())
    starter.attach(app.state.gateway)
    with serve_app(app) as url:
        assert post(url, gw_event("heartbeat", agent=STANDBY, role="standby")).status_code == 202
        wait_for(lambda: opened.idempotency_key in starter.closed, 15,
                 "the incident closed by this replica's watch")
        assert starter.closed[opened.idempotency_key][0] == "failed_over"
        assert httpx.get(url + "/v1/groups", timeout=5).json()["g1"]["open_incident"] is None


# -- the distributed lab --------------------------------------------------------------------------


def _auto_failback(env: Env) -> None:
    """orders' policy asks for failback (with approval) once it is re-protected."""
    cfg = yaml.safe_load(env.config.read_text())
    next(g for g in cfg["groups"] if g["name"] == "orders")["policy"]["auto_failback"] = True
    env.config.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def dist() -> Iterator[Dist]:
    d = start_distributed(groups=2, runners=2, prepare=_auto_failback)
    try:
        yield d
    finally:
        stop_distributed(d)


def _status(d: Dist) -> dict[str, Any]:
    out = d.run("status", "--config", str(d.env.config), "--json", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout))


# -- the tests ----------------------------------------------------------------------------------

lab_test = pytest.mark.lab


@lab_test
def test_deploy_makes_pools_limits_and_deployments_and_is_idempotent(dist: Dist) -> None:
    for pool in ("drflow-prod", "drflow-dr"):
        assert dist.get(f"/work_pools/{pool}")["type"] == "process"
    for group in ("orders", "payments"):
        for name in (f"roles-{group}", f"failback-{group}"):
            assert dist.get(f"/v2/concurrency_limits/{name}")["limit"] == 1
    for name in ("failover/failover", "reprotect/reprotect", "failback/failback", "drill/drill"):
        dep = dist.get(f"/deployments/name/{name}")
        assert dep["work_pool_name"] == "drflow-dr"
        assert dep["job_variables"]["command"] == "python -m prefect.engine"
    assert "concurrency limit roles-orders = 1: created" in dist.deploy_out
    again = dist.run("deploy", "--config", str(dist.env.config), "--prefect-yaml",
                     str(REPO / "prefect.yaml"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "created" not in again.stdout
    assert "work pool drflow-dr (process): exists" in again.stdout


@lab_test
def test_status_before_a_failover_shows_every_group_protected(dist: Dist) -> None:
    st = _status(dist)
    assert st["gateway"]["reachable"] is True
    assert set(st["groups"]) == {"orders", "payments"}
    for name, g in st["groups"].items():
        assert g["serving"]["site"] == "prod", g
        assert g["protection"] == "protected", g["protection_reason"]
        assert g["replication"]["configured"] == g["replication"]["state"] == "sync"
        assert g["gateway"]["open_incident"] is None
        assert g["gateway"]["primary"] == f"{name}-prod"


def _si(env: Env) -> Any:
    vc = env.state["vcenter"]
    return vcsim.connect(vc["url"], vc["user"], vc["password"])


def _runs(dist: Dist, group: str) -> list[dict[str, Any]]:
    return [r for r in dist.runs_of("failover/failover") if r["parameters"]["group"] == group]


@lab_test
def test_host_loss_fails_over_on_a_warm_runner_at_the_dr_site(dist: Dist) -> None:
    env = dist.env
    vcsim.power_off(_si(env), env.group("orders")["primary"]["vm"])
    # Polled gently: the test shares the machine with the runners whose start latency it measures.
    finish = wait_for(lambda: env.audit_records("failover.finish", "orders"), 90,
                      "the failover run finished on a runner", 0.5)[-1]
    assert finish.outcome == "ok", finish.reason
    assert finish.parameters["rpo_s"] == 0.0

    runs = _runs(dist, "orders")
    assert len(runs) == 1, [(r["name"], r["idempotency_key"]) for r in runs]
    run = runs[0]
    assert run["idempotency_key"] == "failover:orders:1"
    # It ran in one of the warm runners, once, not in the gateway.
    assert run["work_pool_name"] == "drflow-dr"
    pids = {str(p.pid) for p in dist.runners}
    assert str(run["infrastructure_pid"]).startswith("drflow-runner@")
    assert str(run["infrastructure_pid"]).rpartition(":")[2] in pids, run["infrastructure_pid"]
    taken = [i for i in range(len(dist.runners))
             if f"{run['name']} (failover): taken by" in dist.runner_log(i).read_text()]
    assert len(taken) == 1, taken
    assert finish.actor == f"flow:failover/{run['id']}"

    # The gateway saw the run end and closed the incident with the run's outcome.
    closed = wait_for(lambda: env.audit_records("incident.close", "orders"), 15,
                      "the incident closed by the gateway")
    assert closed[-1].parameters["outcome"] == "failed_over"
    state = dist.get("/flow_runs/" + run["id"])["state"]
    assert state["type"] == "COMPLETED" and state["message"].startswith("failed_over: ")
    view = env.groups_status()["orders"]
    assert view["open_incident"] is None
    assert view["roles"]["primary_site"] == "dr" and view["roles"]["protected"] is False

    opened = datetime.fromisoformat(env.audit_records("incident.open", "orders")[0].time)
    started = datetime.fromisoformat(env.audit_records("failover.start", "orders")[0].time)
    latency = (started - opened).total_seconds()
    print(f"\nincident → first runbook step on a warm runner: {latency:.2f} s (run created "
          f"{run['created'][11:23]}, Running {run['start_time'][11:23]}, incident {opened.time()}"
          f"); RTO {finish.parameters['rto_s']} s")
    # ≤ 0.5 s on a quiet machine (benchmarks/failover.py --mode distributed); a run that only a
    # poll found would take ≥ 2 s: the push through etcd must work.
    assert latency < 2.0


@lab_test
def test_another_replica_with_the_same_incident_gets_the_same_run(dist: Dist) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    rec = dist.env.audit_records("incident.open", "orders")[0]
    key = rec.parameters["idempotency_key"]
    run_id = _runs(dist, "orders")[0]["id"]
    incident = _incident(datetime.fromisoformat(rec.time) - timedelta(seconds=3), key)
    replica = DeploymentStarter()

    async def twice() -> list[str]:
        return list(await asyncio.gather(replica.start_incident(incident),
                                         replica.start_incident(incident)))

    with temporary_settings({PREFECT_API_URL: dist.api}):
        ids = asyncio.run(twice())
    assert ids == [run_id, run_id]
    assert len(_runs(dist, "orders")) == 1


@lab_test
def test_status_after_the_failover(dist: Dist) -> None:
    st = _status(dist)
    orders, payments = st["groups"]["orders"], st["groups"]["payments"]
    assert orders["serving"]["site"] == "dr"
    assert orders["protection"] == "unprotected", orders["protection_reason"]
    assert "after failover" in orders["protection_reason"]
    assert orders["replication"]["state"] == "none"
    assert orders["last_failover"]["outcome"] == "failed_over"
    assert orders["last_failover"]["rto_s"] > 0
    assert orders["last_incident"]["key"] == "failover:orders:1"
    assert orders["gateway"]["open_incident"] is None
    assert orders["gateway"]["roles"]["primary_site"] == "dr"
    assert payments["protection"] == "protected" and payments["serving"]["site"] == "prod"
    assert payments["last_failover"] is None
    # The gateway serves the same at GET /v1/groups.

    def served() -> bool:
        view = dist.env.groups_status()
        return (view["orders"]["status"]["protection"] == "unprotected"
                and view["payments"]["status"]["protection"] == "protected")
    wait_for(served, 10, "GET /v1/groups with each group's status", 0.3)
    table = dist.run("status", "--config", str(dist.env.config), timeout=60)
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "orders: unprotected — after failover" in text and "payments │ prod" in text


@lab_test
def test_the_old_primary_back_is_reprotected_then_failback_asked_on_a_runner(dist: Dist) -> None:
    env = dist.env
    vcsim.power_on(_si(env), env.group("orders")["primary"]["vm"])  # its agent boots, is held
    finish = wait_for(lambda: env.audit_records("reprotect.finish", "orders"), 120,
                      "the re-protect run finished on a runner")[-1]
    assert finish.outcome == "ok", finish.reason
    runs = dist.runs_of("reprotect/reprotect")
    assert len(runs) == 1 and runs[0]["work_pool_name"] == "drflow-dr"
    assert runs[0]["idempotency_key"].startswith("reprotect:orders:")
    assert finish.actor == f"flow:reprotect/{runs[0]['id']}"
    orders = wait_for(lambda: (g := _status(dist)["groups"]["orders"])["protection"] == PROTECTED
                      and g, 20, "orders protected again")
    assert orders["serving"]["site"] == "dr" and "away from home" in orders["protection_reason"]
    # orders' policy has auto_failback: the re-protect run asked for the failback, which now
    # waits, paused on a runner, for an approver's click in Slack.
    failbacks = wait_for(lambda: dist.runs_of("failback/failback"), 15, "the failback run")
    assert len(failbacks) == 1
    assert failbacks[0]["idempotency_key"] == f"failback-after:{runs[0]['id']}"
    wait_for(lambda: dist.get(f"/flow_runs/{failbacks[0]['id']}")["state"]["type"] == "PAUSED",
             30, "the failback paused for approval")


@lab_test
def test_a_burst_of_duplicate_incident_events_still_gives_one_run(dist: Dist) -> None:
    env = dist.env
    agent = env.group("payments")["primary"]["vm"]
    secret = env.state["secrets"]["webhook"].encode()
    events = [HealthEvent(agent_id=agent, group="payments", kind=EventKind.RECOVERY_EXHAUSTED,
                          resource="postgres", details={"reason": "test burst"})
              for _ in range(40)]
    bodies = [e.to_json() for e in events] * 3  # 120 requests, 40 distinct

    def send(body: bytes) -> int:
        with httpx.Client(timeout=10) as c:
            return c.post(f"{env.gateway_url}/v1/events", content=body,
                          headers={**sign_headers(secret, body),
                                   "content-type": "application/json"}).status_code

    vcsim.power_off(_si(env), agent)  # the VM, its PostgreSQL and its agent go away
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, bodies))
    assert set(codes) <= {202, 409} and codes.count(202) == 40
    finish = wait_for(lambda: env.audit_records("failover.finish", "payments"), 90,
                      "the failover of payments finished on a runner")[-1]
    assert finish.outcome == "ok", finish.reason
    wait_for(lambda: env.audit_records("incident.close", "payments"), 15, "incident closed")
    time.sleep(1.5)  # a second run, if any, would have been created by now
    assert len(_runs(dist, "payments")) == 1
    assert len(env.audit_records("incident.open", "payments")) == 1
    assert len(env.audit_records("failover.start", "payments")) == 1

    def served() -> bool:
        view = env.groups_status()
        return (view["payments"]["status"]["protection"] == UNPROTECTED
                and view["orders"]["status"]["protection"] == PROTECTED)
    wait_for(served, 10, "payments unprotected, orders protected, in GET /v1/groups", 0.3)
