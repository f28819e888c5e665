"""Distributed mode for real: a Prefect server on PostgreSQL, `drflow deploy`, a process worker at
the DR site, and a gateway in `--mode deployment` starting deployment runs on the lab's incidents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from lab import netns, postgres, procs, vcsim
from orchestrator.deployed import DeploymentStarter, is_stale, outcome_of
from orchestrator.gateway.contracts import Incident, IncidentKind
from orchestrator.gateway.status import PROTECTED, UNPROTECTED
from tests.harness import DRFLOW, Env, start_env, stop_env, wait_for

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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


# -- the distributed lab --------------------------------------------------------------------------


@dataclass
class Dist:
    env: Env
    api: str
    child_env: dict[str, str]
    base: Path
    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    db: tuple[postgres.Instance, postgres.Instance] | None = None
    deploy_out: str = ""

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DRFLOW, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.child_env}, cwd=REPO)

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.api}{path}", timeout=10)
        r.raise_for_status()
        return r.json()

    def runs_of(self, deployment: str) -> list[dict[str, Any]]:
        dep = self.get(f"/deployments/name/{deployment}")
        r = httpx.post(f"{self.api}/flow_runs/filter", timeout=10,
                       json={"deployments": {"id": {"any_": [dep["id"]]}}})
        r.raise_for_status()
        return list(r.json())


def _prefect_database(base: Path) -> tuple[tuple[postgres.Instance, postgres.Instance], str]:
    """A PostgreSQL pair for Prefect's own database (replicated to DR, as it should be)."""
    primary, standby = postgres.create_pair(base / "pg", "prefect", sync=False)
    with postgres.admin_conn(primary) as c:
        c.execute("CREATE DATABASE prefect")
    user, password = postgres.client_credentials(base / "pg")
    return (primary, standby), (f"postgresql+asyncpg://{user}:{password}@{primary.host}:"
                                f"{primary.port}/prefect")


def _start_server(d: Dist, db_url: str) -> None:
    host, port = d.api.removeprefix("http://").split("/")[0].rsplit(":", 1)
    log = d.base / "prefect-server.log"
    d.server = procs.spawn(
        [str(BIN / "prefect"), "server", "start", "--host", host, "--port", port], log,
        env={"PREFECT_HOME": str(d.base / "server-home"), "PREFECT_API_DATABASE_CONNECTION_URL":
             db_url, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             "PREFECT_LOGGING_LEVEL": "WARNING"})

    def healthy() -> bool:
        assert d.server is not None and d.server.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{d.api}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(healthy, 90, "Prefect server on PostgreSQL", 0.2)


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    # A Prefect worker ignores SIGTERM; SIGINT stops it (not always promptly, with a run paused).
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(3)
    procs.kill_tree(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _teardown(d: Dist) -> None:
    d.env.stop_gateway()
    if d.worker is not None:
        _stop_worker(d.worker)
    if d.server is not None:
        procs.stop_tree(d.server.pid, timeout=10)
    if d.db is not None:
        for inst in d.db:
            postgres.destroy(inst)
    stop_env(d.env)
    shutil.rmtree(d.base, ignore_errors=True)


def _auto_failback(config: Path, group: str) -> None:
    """The group's policy asks for failback (with approval) once it is re-protected."""
    cfg = yaml.safe_load(config.read_text())
    next(g for g in cfg["groups"] if g["name"] == group)["policy"]["auto_failback"] = True
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def dist() -> Iterator[Dist]:
    base = Path(tempfile.mkdtemp(prefix="drflow-dist-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL (user postgres) must traverse it
    # Prefect's server where the DR site's workers and gateway reach it (its database stays on
    # this machine's loopback).
    api = f"http://{netns.ensure_internet()}:{procs.free_port()}/api"
    child_env = {
        "PREFECT_API_URL": api, "PREFECT_HOME": str(base / "client-home"),
        "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        # The deployments start `python -m prefect.engine`: drflow's environment first on PATH.
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    with ThreadPoolExecutor(2) as pool:
        f_env = pool.submit(start_env, 2, "sync", True, False)
        f_db = pool.submit(_prefect_database, base)
    failed = f_env.exception() or f_db.exception()
    if failed is not None:
        if f_env.exception() is None:
            stop_env(f_env.result())
        if f_db.exception() is None:
            for inst in f_db.result()[0]:
                postgres.destroy(inst)
        shutil.rmtree(base, ignore_errors=True)
        raise failed
    env = f_env.result()
    _auto_failback(env.config, "orders")
    d = Dist(env, api, child_env, base)
    d.db, db_url = f_db.result()
    try:
        _start_server(d, db_url)
        out = d.run("deploy", "--config", str(env.config), "--prefect-yaml",
                    str(REPO / "prefect.yaml"))
        d.deploy_out = out.stdout + out.stderr
        assert out.returncode == 0, d.deploy_out
        d.worker = procs.spawn(
            [*env.orchestrator_prefix, str(BIN / "prefect"), "worker", "start", "--pool",
             "drflow-dr", "--type", "process"],
            base / "worker.log", env={**child_env, "DRFLOW_CONFIG": str(env.config),
                                      "PREFECT_WORKER_QUERY_SECONDS": "0.5"})
        glog = env.lab_dir / "logs" / "gateway.log"
        env.gateway = procs.spawn(
            [*env.orchestrator_prefix, DRFLOW, "gateway", "--config", str(env.config),
             "--state-dir", str(env.lab_dir / "gateway"), "--mode", "deployment"], glog,
            env=child_env)
        host, port = env.gateway_url.removeprefix("http://").rsplit(":", 1)
        procs.wait_port(int(port), 60, "gateway", env.gateway, glog, host=host)
        env.wait_all_heard()
        wait_for(lambda: d.get("/work_pools/drflow-dr").get("status") == "READY", 30,
                 "a worker polling the DR pool", 0.2)
        yield d
    finally:
        _teardown(d)


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
def test_host_loss_fails_over_on_a_worker_at_the_dr_site(dist: Dist) -> None:
    env = dist.env
    vcsim.power_off(_si(env), env.group("orders")["primary"]["vm"])
    # Polled gently: the test shares the machine with the worker whose start latency it measures.
    finish = wait_for(lambda: env.audit_records("failover.finish", "orders"), 90,
                      "the failover run finished on the worker", 0.5)[-1]
    assert finish.outcome == "ok", finish.reason
    assert finish.parameters["rpo_s"] == 0.0

    runs = _runs(dist, "orders")
    assert len(runs) == 1, [(r["name"], r["idempotency_key"]) for r in runs]
    run = runs[0]
    assert run["idempotency_key"] == "failover:orders:1"
    # It ran in a process the worker started, not in the gateway.
    assert run["infrastructure_pid"] and run["work_pool_name"] == "drflow-dr"
    assert env.gateway is not None and str(run["infrastructure_pid"]) != str(env.gateway.pid)
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
    print(f"\nincident → first runbook step on the worker: {latency:.2f} s (run created "
          f"{run['created'][11:23]}, Running {run['start_time'][11:23]}, incident {opened.time()}"
          f"); RTO {finish.parameters['rto_s']} s")
    assert latency < 15  # ≤ 3 s on a quiet machine; the bound only catches a broken path


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
def test_the_old_primary_back_is_reprotected_then_failback_asked_on_the_worker(dist: Dist) -> None:
    env = dist.env
    vcsim.power_on(_si(env), env.group("orders")["primary"]["vm"])  # its agent boots, is held
    finish = wait_for(lambda: env.audit_records("reprotect.finish", "orders"), 120,
                      "the re-protect run finished on the worker")[-1]
    assert finish.outcome == "ok", finish.reason
    runs = dist.runs_of("reprotect/reprotect")
    assert len(runs) == 1 and runs[0]["work_pool_name"] == "drflow-dr"
    assert runs[0]["idempotency_key"].startswith("reprotect:orders:")
    assert finish.actor == f"flow:reprotect/{runs[0]['id']}"
    orders = wait_for(lambda: (g := _status(dist)["groups"]["orders"])["protection"] == PROTECTED
                      and g, 20, "orders protected again")
    assert orders["serving"]["site"] == "dr" and "away from home" in orders["protection_reason"]
    # orders' policy has auto_failback: the re-protect run asked for the failback, which now
    # waits, paused on the worker, for an approver's click in Slack.
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
    bodies = [e.model_dump_json().encode() for e in events] * 3  # 120 requests, 40 distinct

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
                      "the failover of payments finished on the worker")[-1]
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
