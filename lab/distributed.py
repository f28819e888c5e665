"""The distributed layout on the lab: a Prefect server on PostgreSQL, `drflow deploy`, warm
runners (or a Prefect process worker) at the DR site, and a gateway in `--mode deployment`.

Shared by tests/test_distributed.py and `benchmarks/failover.py --mode distributed`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lab import netns, postgres, procs
from lab.harness import DRFLOW, Env, start_env, stop_env, wait_for

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "drflow-dr"


@dataclass
class Dist:
    env: Env
    api: str
    child_env: dict[str, str]
    base: Path
    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    runners: list[subprocess.Popen[bytes]] = field(default_factory=list)
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

    def runner_log(self, i: int) -> Path:
        return self.base / f"runner-{i}.log"

    def start_runner(self, i: int) -> subprocess.Popen[bytes]:
        """`drflow runner` number i on the orchestrator's host; returns once it takes runs."""
        log = self.runner_log(i)
        start = log.stat().st_size if log.exists() else 0
        proc = procs.spawn([*self.env.orchestrator_prefix, DRFLOW, "runner", "--config",
                            str(self.env.config), "--pool", POOL], log,
                           env={**self.child_env, "DRFLOW_CONFIG": str(self.env.config)})

        def taking() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return "taking the runs of pool" in log.read_text()[start:]
        wait_for(taking, 90, f"warm runner {i}", 0.2)
        if i < len(self.runners):
            self.runners[i] = proc
        else:
            self.runners.append(proc)
        return proc

    def start_worker(self) -> subprocess.Popen[bytes]:
        """A plain Prefect process worker on the DR pool (a process per run)."""
        self.worker = procs.spawn(
            [*self.env.orchestrator_prefix, str(BIN / "prefect"), "worker", "start", "--pool",
             POOL, "--type", "process"],
            self.base / "worker.log", env={**self.child_env, "DRFLOW_CONFIG": str(self.env.config),
                                          "PREFECT_WORKER_QUERY_SECONDS": "0.5"})
        return self.worker


def prefect_database(base: Path) -> tuple[tuple[postgres.Instance, postgres.Instance], str]:
    """A PostgreSQL pair for Prefect's own database (replicated to DR, as it should be)."""
    primary, standby = postgres.create_pair(base / "pg", "prefect", sync=False)
    with postgres.admin_conn(primary) as c:
        c.execute("CREATE DATABASE prefect")
    user, password = postgres.client_credentials(base / "pg")
    return (primary, standby), (f"postgresql+asyncpg://{user}:{password}@{primary.host}:"
                                f"{primary.port}/prefect")


def start_server(d: Dist, db_url: str) -> None:
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


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    # A Prefect worker ignores SIGTERM; SIGINT stops it (not always promptly, with a run paused).
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(3)
    procs.kill_tree(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def stop_distributed(d: Dist) -> None:
    d.env.stop_gateway()
    for proc in [*d.runners, *([d.worker] if d.worker is not None else [])]:
        stop_worker(proc)  # a runner with a paused failback does not wait for its approval
    if d.server is not None:
        procs.stop_tree(d.server.pid, timeout=10)
    if d.db is not None:
        for inst in d.db:
            postgres.destroy(inst)
    stop_env(d.env)
    shutil.rmtree(d.base, ignore_errors=True)


def start_distributed(groups: int = 2, runners: int = 2, worker: bool = False,
                      prepare: Callable[[Env], None] | None = None) -> Dist:
    """The lab with `groups` sync groups in the distributed layout: `runners` warm runners and,
    with `worker`, a Prefect process worker. `prepare(env)` edits the lab before anything reads
    its config."""
    base = Path(tempfile.mkdtemp(prefix="drflow-dist-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL (user postgres) must traverse it
    # Prefect's server where the DR site's runners and gateway reach it (its database stays on
    # this machine's loopback).
    api = f"http://{netns.ensure_internet()}:{procs.free_port()}/api"
    child_env = {
        "PREFECT_API_URL": api, "PREFECT_HOME": str(base / "client-home"),
        "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        # The deployments start `python -m prefect.engine`: drflow's environment first on PATH.
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    with ThreadPoolExecutor(2) as pool:
        f_env = pool.submit(start_env, groups, "sync", True, False)
        f_db = pool.submit(prefect_database, base)
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
    d = Dist(env, api, child_env, base)
    d.db, db_url = f_db.result()
    try:
        if prepare is not None:
            prepare(env)
        start_server(d, db_url)
        out = d.run("deploy", "--config", str(env.config), "--prefect-yaml",
                    str(REPO / "prefect.yaml"))
        d.deploy_out = out.stdout + out.stderr
        if out.returncode != 0:
            raise RuntimeError(f"drflow deploy failed:\n{d.deploy_out}")
        with ThreadPoolExecutor(max(runners, 1)) as pool:
            list(pool.map(d.start_runner, range(runners)))
        if worker:
            d.start_worker()
        glog = env.lab_dir / "logs" / "gateway.log"
        env.gateway = procs.spawn(
            [*env.orchestrator_prefix, DRFLOW, "gateway", "--config", str(env.config),
             "--state-dir", str(env.lab_dir / "gateway"), "--mode", "deployment"], glog,
            env=child_env)
        host, port = env.gateway_url.removeprefix("http://").rsplit(":", 1)
        procs.wait_port(int(port), 60, "gateway", env.gateway, glog, host=host)
        env.wait_all_heard()
        wait_for(lambda: d.get(f"/work_pools/{POOL}").get("status") == "READY", 30,
                 "a runner polling the DR pool", 0.2)
        return d
    except BaseException:
        stop_distributed(d)
        raise
