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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from lab import netns, postgres, procs
from lab.balancer import RoundRobin
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
    _log_from: dict[int, int] = field(default_factory=dict)
    # A Prefect server in several replicas (start_server_ha)
    api_servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api_ports: list[int] = field(default_factory=list)
    services: subprocess.Popen[bytes] | None = None
    redis: subprocess.Popen[bytes] | None = None
    balancer: RoundRobin | None = None
    server_env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DRFLOW, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.child_env}, cwd=REPO)

    def _api(self, method: str, path: str, **kw: Any) -> Any:
        # Through the balancer a request may reach a Prefect API replica as it dies (the kill
        # test kills them): sent again, as Prefect's own client does.
        for attempt in range(3):
            try:
                r = httpx.request(method, f"{self.api}{path}", timeout=10, **kw)
                r.raise_for_status()
                return r.json()
            except httpx.TransportError:
                if attempt == 2:
                    raise
                time.sleep(0.5)

    def get(self, path: str) -> Any:
        return self._api("GET", path)

    def runs_of(self, deployment: str) -> list[dict[str, Any]]:
        dep = self.get(f"/deployments/name/{deployment}")
        return list(self._api("POST", "/flow_runs/filter",
                              json={"deployments": {"id": {"any_": [dep["id"]]}}}))

    def runner_log(self, i: int) -> Path:
        return self.base / f"runner-{i}.log"

    def start_runner(self, i: int) -> subprocess.Popen[bytes]:
        """`drflow runner` number i (0, 1, … in order) on the orchestrator's host; returns once
        it takes runs."""
        self._spawn_runner(i)
        self._wait_runner(i)
        return self.runners[i]

    def _spawn_runner(self, i: int) -> None:
        log = self.runner_log(i)
        self._log_from[i] = log.stat().st_size if log.exists() else 0
        proc = procs.spawn([*self.env.orchestrator_prefix, DRFLOW, "runner", "--config",
                            str(self.env.config), "--pool", POOL], log,
                           env={**self.child_env, "DRFLOW_CONFIG": str(self.env.config)})
        if i < len(self.runners):
            self.runners[i] = proc
        else:
            assert i == len(self.runners), "runners are numbered in order"
            self.runners.append(proc)

    def _wait_runner(self, i: int) -> None:
        proc, log = self.runners[i], self.runner_log(i)

        def taking() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return "taking the runs of pool" in log.read_text()[self._log_from[i]:]
        wait_for(taking, 90, f"warm runner {i}", 0.2)

    def start_gateway(self) -> subprocess.Popen[bytes]:
        """The DR site's gateway, `--mode deployment` (agents post to it first)."""
        env = self.env
        glog = env.lab_dir / "logs" / "gateway.log"
        env.gateway = procs.spawn(
            [*env.orchestrator_prefix, DRFLOW, "gateway", "--config", str(env.config),
             "--state-dir", str(env.lab_dir / "gateway"), "--mode", "deployment"], glog,
            env=self.child_env)
        host, port = env.gateway_url.removeprefix("http://").rsplit(":", 1)
        procs.wait_port(int(port), 60, "gateway", env.gateway, glog, host=host)
        return env.gateway

    def start_gateway_replica(self) -> subprocess.Popen[bytes]:
        """A second gateway, at the witness site, `--mode deployment`: the replica the agents
        fall back to (their `gateway.also`). Share the state (gateway.shared_state) first."""
        env = self.env
        rep = env.state["gateway_replica"]
        host, port = rep["url"].removeprefix("http://").rsplit(":", 1)
        log = env.lab_dir / "logs" / "gateway-witness.log"
        env.replica = procs.spawn(
            [*(rep.get("netns_prefix") or []), DRFLOW, "gateway", "--config", str(env.config),
             "--state-dir", str(env.lab_dir / "gateway-witness"), "--listen", f"{host}:{port}",
             "--mode", "deployment"], log, env=self.child_env)
        procs.wait_port(int(port), 60, "gateway replica (witness)", env.replica, log, host=host)
        return env.replica

    def start_api_replica(self, i: int) -> subprocess.Popen[bytes]:
        """Prefect API replica i (of a server started by start_server_ha); returns when it
        answers."""
        host = self.api.removeprefix("http://").split("/")[0].rsplit(":", 1)[0]
        port = self.api_ports[i]
        log = self.base / f"prefect-api-{i}.log"
        proc = procs.spawn([sys.executable, "-m", "orchestrator.prefect_server", "--host", host,
                            "--port", str(port), "--no-services"], log, env=self.server_env,
                           cwd=REPO)
        if i < len(self.api_servers):
            self.api_servers[i] = proc
        else:
            self.api_servers.append(proc)

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"http://{host}:{port}/api/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(healthy, 90, f"Prefect API replica {i}", 0.2)
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


def ha_env(db_url: str, redis: tuple[str, int]) -> dict[str, str]:
    """Settings of every process of a Prefect server in several replicas (Prefect's self-hosted
    high-availability layout): one PostgreSQL, Redis for messaging, event ordering, concurrency
    leases and the services' coordination, migrations run once apart."""
    host, port = redis
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": db_url,
        "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": host, "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_SERVER_DOCKET_URL": f"redis://{host}:{port}/1",
        "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def start_server_ha(d: Dist, db_url: str, replicas: int) -> None:
    """Redis, the migrations, `replicas` API servers (`--no-services`), one process of
    background services, and a balancer on d.api's address that skips a replica that refuses."""
    host, port = d.api.removeprefix("http://").split("/")[0].rsplit(":", 1)
    redis_port = procs.free_port()
    d.redis = procs.spawn(["redis-server", "--bind", host, "--port", str(redis_port), "--save",
                           "", "--appendonly", "no", "--protected-mode", "no"],
                          d.base / "redis.log")
    procs.wait_port(redis_port, 30, "redis", d.redis, d.base / "redis.log", host=host)
    env = {**ha_env(db_url, (host, redis_port)), "PREFECT_HOME": str(d.base / "server-home")}
    d.server_env = env
    up = subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"],
                        env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        raise RuntimeError(f"prefect server database upgrade failed:\n{up.stdout}{up.stderr}")
    d.api_ports = [procs.free_port() for _ in range(replicas)]
    for i in range(replicas):
        d.start_api_replica(i)
    d.services = procs.spawn([str(BIN / "prefect"), "server", "services", "start"],
                             d.base / "prefect-services.log", env=env)
    d.balancer = RoundRobin([(host, p) for p in d.api_ports], port=int(port), host=host,
                            redispatch=True).start()

    def healthy() -> bool:
        try:
            return httpx.get(f"{d.api}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(healthy, 60, "Prefect's API through the balancer", 0.2)


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
    for proc in [*([d.server] if d.server is not None else []), *d.api_servers,
                 *([d.services] if d.services is not None else [])]:
        procs.stop_tree(proc.pid, timeout=10)
    if d.balancer is not None:
        d.balancer.stop()
    if d.redis is not None:
        procs.stop_tree(d.redis.pid, timeout=5)
    if d.db is not None:
        for inst in d.db:
            postgres.destroy(inst)
    stop_env(d.env)
    shutil.rmtree(d.base, ignore_errors=True)


def deploy_and_start_runners(d: Dist, runners: int, timeout: float = 120) -> None:
    """`drflow deploy` of the lab's config, then `runners` warm runners, started together."""
    out = d.run("deploy", "--config", str(d.env.config), "--prefect-yaml",
                str(REPO / "prefect.yaml"), timeout=timeout)
    d.deploy_out = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"drflow deploy failed:\n{d.deploy_out}")
    for i in range(runners):
        d._spawn_runner(i)
    for i in range(runners):
        d._wait_runner(i)


def start_distributed(groups: int = 2, runners: int = 2, worker: bool = False,
                      prepare: Callable[[Env], None] | None = None,
                      replica: bool = False, prefect_replicas: int = 1) -> Dist:
    """The lab with `groups` sync groups in the distributed layout: `runners` warm runners and,
    with `worker`, a Prefect process worker; with `replica`, a second gateway at the witness site
    sharing the state in etcd; with `prefect_replicas` > 1, Prefect's server in that many API
    replicas behind a balancer (start_server_ha). `prepare(env)` edits the lab before anything
    reads its config."""
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
        if replica:
            cfg = yaml.safe_load(env.config.read_text())
            cfg["gateway"]["shared_state"] = True
            env.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if prefect_replicas > 1:
            start_server_ha(d, db_url, prefect_replicas)
        else:
            start_server(d, db_url)
        deploy_and_start_runners(d, runners)
        if worker:
            d.start_worker()
        d.start_gateway()
        if replica:
            d.start_gateway_replica()
        env.wait_all_heard()
        wait_for(lambda: d.get(f"/work_pools/{POOL}").get("status") == "READY", 30,
                 "a runner polling the DR pool", 0.2)
        return d
    except BaseException:
        stop_distributed(d)
        raise
