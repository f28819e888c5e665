"""End-to-end harness: a lab with guest agents, a real gateway process, and a writer that counts
acknowledged writes. Used by the end-to-end tests, the benchmarks and the demo."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg

from drflow.audit import open_store
from drflow.dns import resolve_endpoint
from lab import manager, procs

DRFLOW = str(Path(sys.executable).parent / "drflow")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Env:
    lab_dir: Path
    state: dict[str, Any]
    gateway: subprocess.Popen[bytes] | None = None
    replica: subprocess.Popen[bytes] | None = None  # the witness site's gateway, when started

    @property
    def config(self) -> Path:
        return self.lab_dir / "drflow.yaml"

    @property
    def gateway_url(self) -> str:
        return str(self.state["gateway"]["url"])

    @property
    def audit_url(self) -> str:
        return f"sqlite:///{self.lab_dir / 'audit.db'}"

    @property
    def state_dir(self) -> Path:
        """The state directory of the lab's `drflow gateway` / `drflow up`."""
        return self.lab_dir / "gateway"

    def group(self, name: str) -> dict[str, Any]:
        return next(g for g in self.state["groups"] if g["name"] == name)

    def route53(self) -> Any:
        a = self.state["aws"]
        return boto3.client("route53", endpoint_url=a["endpoint_url"], region_name=a["region"],
                            aws_access_key_id=a["access_key_id"],
                            aws_secret_access_key=a["secret_access_key"])

    def connect(self, host: str, port: int, timeout: int = 2) -> psycopg.Connection[Any]:
        db = self.state["database"]
        # A silent host (host loss) must fail a write within seconds, as an application
        # configured to follow a failover would (lab/clients.py FOLLOW), not hang the caller.
        return psycopg.connect(host=host, port=port, user=db["user"], password=db["password"],
                               dbname=db["name"], connect_timeout=timeout, autocommit=True,
                               tcp_user_timeout=3000, keepalives=1, keepalives_idle=1,
                               keepalives_interval=1, keepalives_count=2)

    def si(self, site: str = "prod") -> Any:
        """A pyVmomi session to a site's vCenter (production's by default)."""
        from lab import vcsim

        vc = self.state["vcenters"][site]
        return vcsim.connect(vc["url"], vc["user"], vc["password"])

    def writable(self, node: dict[str, Any]) -> bool:
        """Does the PostgreSQL of `node` take writes right now?"""
        try:
            with self.connect(node["host"], node["port"], timeout=1) as c:
                row = c.execute("select not pg_is_in_recovery()").fetchone()
                return bool(row and row[0])
        except Exception:
            return False

    def audit_records(self, action: str | None = None, target: str | None = None) -> list[Any]:
        path = self.lab_dir / "audit.db"
        if not path.exists():
            return []
        store = open_store(self.audit_url, create=False)
        try:
            return [r for r in store.records()
                    if (action is None or r.action == action) and (target is None or r.target == target)]
        finally:
            store.close()

    def explain(self, group: str, agents: list[str], lines: int = 25) -> str:
        """What a test that timed out on `group` prints: its last audit records, its status,
        and the last lines of its agents' and the gateway's logs."""
        out = [f"--- the last audit records of {group}"]
        with contextlib.suppress(Exception):
            recs = [r for r in self.audit_records() if r.target in (group, *agents)]
            out += [f"{r.time} {r.action} {r.target} {r.outcome}: {str(r.reason)[:300]}"
                    for r in recs[-15:]]
        with contextlib.suppress(Exception):
            out += [f"--- status: {json.dumps(self.groups_status().get(group), default=str)[:1500]}"]
        logs = [self.lab_dir / "logs" / f"agent-{a}.log" for a in agents]
        logs += sorted((self.lab_dir / "logs").glob("gateway*.log"))
        logs += sorted((self.lab_dir / "logs").glob("up*.log"))
        for log in logs:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out += [f"--- {log.name}", *(ln[:300] for ln in tail)]
        return "\n".join(out)

    def groups_status(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.gateway_url}/v1/groups", timeout=5).json())

    def start_gateway(self, command: str = "gateway", env: dict[str, str] | None = None,
                      timeout: float = 60) -> None:
        """`drflow gateway` (needs PREFECT_API_URL) or `drflow up` (starts its own Prefect), on
        the orchestrator's host at the DR site."""
        log = self.lab_dir / "logs" / f"{command}.log"
        self.gateway = procs.spawn(
            [*self.orchestrator_prefix, DRFLOW, command, "--config", str(self.config),
             "--state-dir", str(self.state_dir)], log,
            env={"PYTHONUNBUFFERED": "1", **(env or {})})
        host, port = self.gateway_url.removeprefix("http://").rsplit(":", 1)
        procs.wait_port(int(port), timeout, f"drflow {command}", self.gateway, log, host=host)

    def start_gateway_replica(self, timeout: float = 60) -> subprocess.Popen[bytes]:
        """A second `drflow gateway` at the witness site, with its own state directory: the
        replica agents fall back to when the DR site (and its gateway) is lost. Stopped by
        `stop_env`."""
        rep = self.state["gateway_replica"]
        host, port = rep["url"].removeprefix("http://").rsplit(":", 1)
        log = self.lab_dir / "logs" / "gateway-witness.log"
        self.replica = procs.spawn(
            [*(rep.get("netns_prefix") or []), DRFLOW, "gateway", "--config", str(self.config),
             "--state-dir", str(self.lab_dir / "gateway-witness"), "--listen", f"{host}:{port}"],
            log, env={"PYTHONUNBUFFERED": "1"})
        procs.wait_port(int(port), timeout, "drflow gateway (witness)", self.replica, log,
                        host=host)
        return self.replica

    @property
    def orchestrator_prefix(self) -> list[str]:
        """argv prefix that runs a command on the orchestrator's host (the DR site's network)."""
        return list(self.state.get("orchestrator", {}).get("netns_prefix") or [])

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            procs.stop_tree(self.gateway.pid, timeout=5)
            self.gateway.wait(15)
            self.gateway = None

    def stop_gateway_replica(self) -> None:
        if self.replica is not None:
            procs.stop_tree(self.replica.pid, timeout=5)
            self.replica.wait(15)
            self.replica = None

    def wait_all_heard(self, timeout: float = 30) -> None:
        """Every group's primary agent is known to the gateway and heartbeating."""
        def ready() -> bool:
            try:
                st = self.groups_status()
            except httpx.HTTPError:
                return False
            return all(st.get(g["name"], {}).get("primary") == g["primary"]["vm"]
                       for g in self.state["groups"])
        wait_for(ready, timeout, "every primary agent heard by the gateway", 0.2)


@contextmanager
def throwaway_prefect(database: str = "sqlite", keep_log: Path | None = None) -> Iterator[str]:
    """A Prefect server (SQLite in a temporary home, or `database="postgresql"`: on a PostgreSQL
    of its own, as production runs it) for a benchmark or a script; its URL is set in this
    process's environment, so call it before anything imports Prefect. `keep_log`: where its
    log is copied before the home goes (with retryable errors logged: what slowed a start)."""
    from lab import netns
    from lab import postgres as lab_pg

    home = Path(tempfile.mkdtemp(prefix="drflow-bench-prefect-"))
    port = procs.free_port()
    host = netns.ensure_internet()  # on "the internet": every lab network reaches it
    os.environ.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://{host}:{port}/api",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
    from orchestrator.prefect_local import start_local_server

    pg_dir: Path | None = None
    pair: tuple[lab_pg.Instance, lab_pg.Instance] | None = None
    url = None
    try:
        if database == "postgresql":
            # Under /tmp, not the root-only home: PostgreSQL runs as `postgres`.
            pg_dir = Path(tempfile.mkdtemp(prefix="drflow-bench-prefect-pg-", dir="/tmp"))
            pair = lab_pg.create_pair(pg_dir, "prefect", sync=False)
            with lab_pg.admin_conn(pair[0]) as c:
                c.execute("CREATE DATABASE prefect")
            user, password = lab_pg.client_credentials(pg_dir)
            url = (f"postgresql+asyncpg://{user}:{password}@{pair[0].host}:{pair[0].port}"
                   "/prefect")
        print(f"starting a Prefect server ({database}) on {host}:{port} …", flush=True)
        if keep_log is not None:
            os.environ["PREFECT_API_LOG_RETRYABLE_ERRORS"] = "true"
        server = start_local_server(home, port, host=host, database_url=url)
        try:
            yield server.api_url
        finally:
            server.stop()
            if keep_log is not None:
                with contextlib.suppress(OSError):
                    shutil.copyfile(server.log, keep_log)
    finally:
        for inst in pair or ():
            with contextlib.suppress(Exception):
                lab_pg.stop(inst, "immediate")
        shutil.rmtree(home, ignore_errors=True)
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)


def start_env(groups: int = 1, replication: str = "sync", agents: bool = True,
              gateway: bool = True, inventory_only: list[str] | None = None,
              unprotected: list[str] | None = None) -> Env:
    lab_dir = Path(os.environ.get("DRFLOW_TEST_TMP", "/tmp")) / f"drflow-e2e-{uuid.uuid4().hex[:8]}"
    state = manager.up(lab_dir, groups=groups, replication=replication,
                       progress=lambda _m: None, agents=agents, inventory_only=inventory_only,
                       unprotected=unprotected)
    env = Env(lab_dir, state)
    try:
        if gateway:
            env.start_gateway()
            if agents:
                env.wait_all_heard()
    except BaseException:
        stop_env(env)
        raise
    return env


LOG_ARCHIVE = Path(__file__).parents[1] / "test-artifacts" / "labs"


def keep_logs(lab_dir: Path, archive: Path = LOG_ARCHIVE, max_bytes: int = 20_000_000) -> Path:
    """Copy the lab's logs (agents, PostgreSQL, vcsim, etcd, gateway) out of `lab_dir`, which
    `down` removes: what a failed test's lab did stays readable after it."""
    dest = archive / lab_dir.name
    for log in lab_dir.rglob("*.log"):
        with contextlib.suppress(OSError):
            if log.is_file() and log.stat().st_size <= max_bytes:
                target = dest / log.relative_to(lab_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, target)
    return dest


def stop_env(env: Env) -> None:
    env.stop_gateway_replica()
    env.stop_gateway()
    keep_logs(env.lab_dir)
    manager.down(env.lab_dir, progress=lambda _m: None)


@dataclass
class Writer:
    """Writes unique ids through the group's DNS name (resolved on each connect, as a client
    honouring the TTL would) and keeps what was acknowledged, failed, or unknown."""

    env: Env
    group: str
    acked: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)
    ack_servers: list[tuple[str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        g = self.env.group(self.group)
        host, port = resolve_endpoint(self.env.route53(), g["dns"]["zone_id"], g["dns"]["record"])
        with self.env.connect(host, port) as c:
            c.execute("create table if not exists drflow_writes (id text primary key, "
                      "at timestamptz default now())")
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"writer-{self.group}")
        self._thread.start()
        wait_for(lambda: len(self.acked) >= 5, 10, "writer's first acknowledged writes")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def first_ack_after(self, t: float, server: tuple[str, int] | None = None) -> float | None:
        """When the first write after `t` was acknowledged (by `server`, if given)."""
        return next((a for a, s in zip(self.ack_times, self.ack_servers, strict=True)
                     if a > t and (server is None or s == server)), None)

    def _run(self) -> None:
        g = self.env.group(self.group)
        r53 = self.env.route53()
        conn: psycopg.Connection[Any] | None = None
        server = ("", 0)
        while not self._stop.is_set():
            if conn is None:
                try:
                    host, port = resolve_endpoint(r53, g["dns"]["zone_id"], g["dns"]["record"])
                    server = (host, port)
                    conn = self.env.connect(host, port, timeout=1)
                    conn.execute("set statement_timeout = 3000")
                except Exception as exc:
                    self.errors.append((time.time(), f"connect: {type(exc).__name__}"))
                    conn = None
                    time.sleep(0.05)
                    continue
            wid = uuid.uuid4().hex
            try:
                conn.execute("insert into drflow_writes (id) values (%s)", (wid,))
                self.acked.append(wid)
                self.ack_servers.append(server)
                self.ack_times.append(time.time())
            except Exception as exc:
                # The commit may or may not have happened: a lost acknowledgement is unknown.
                self.unknown.append(wid)
                self.errors.append((time.time(), f"write: {type(exc).__name__}"))
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    def lost_details(self, host: str, port: int) -> list[tuple[str, float, tuple[str, int]]]:
        """(id, acknowledged at, by which server) of each acknowledged write missing at host:port."""
        missing = set(self.lost(host, port))
        return [(w, t, srv) for w, t, srv in zip(self.acked, self.ack_times, self.ack_servers,
                                                 strict=True) if w in missing]

    def lost(self, host: str, port: int) -> list[str]:
        """Acknowledged ids missing from the database at host:port."""
        # Snapshot first: a write acknowledged after the read began would look lost.
        acked = list(self.acked)
        with self.env.connect(host, port) as c:
            present = {r[0] for r in c.execute("select id from drflow_writes").fetchall()}
        return [w for w in acked if w not in present]


class ServerWriter:
    """One connection to one server inserting a unique id every 10 ms (no DNS, no reconnect):
    what was acknowledged, and what failed."""

    def __init__(self, env: Env, host: str, port: int) -> None:
        self.env, self.host, self.port = env, host, port
        self.acked: list[str] = []
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="server-writer")

    def start(self) -> ServerWriter:
        with self.env.connect(self.host, self.port) as c:
            c.execute("create table if not exists drflow_writes (id text primary key)")
        self._thread.start()
        wait_for(lambda: len(self.acked) >= 5, 10, "the writer's first writes")
        return self

    def _run(self) -> None:
        with contextlib.suppress(Exception), self.env.connect(self.host, self.port,
                                                              timeout=2) as c:
            c.execute("set statement_timeout = 10000")
            while not self._stop.is_set():
                wid = uuid.uuid4().hex
                try:
                    c.execute("insert into drflow_writes (id) values (%s)", (wid,))
                    self.acked.append(wid)
                except Exception:
                    self.refused.append(wid)
                    if c.closed:
                        return
                time.sleep(0.01)

    def stop(self, join_s: float = 0.0) -> None:
        """Stop writing; a connection to a silent server may hang: `join_s` bounds the wait."""
        self._stop.set()
        self._thread.join(join_s)

    def lost(self, host: str, port: int) -> list[str]:
        """Acknowledged ids missing at host:port once a standby replayed what it flushed (a
        sync commit waits for the flush, not the replay: up to 10 s for that)."""
        acked = list(self.acked)
        deadline = time.monotonic() + 10
        while True:
            with self.env.connect(host, port) as c:
                have = {r[0] for r in c.execute("select id from drflow_writes").fetchall()}
            missing = [w for w in acked if w not in have]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)


def takes_write(env: Env, node: dict[str, Any], timeout_s: float = 1.0) -> bool:
    """Does `node` answer as a writable primary? Bounded: connect, statement and commit time
    out. Once it answered as a primary that is not read-only it counts, whatever becomes of the
    test write: a commit that waits for a synchronous standby, or is cut, left the write in its
    WAL, where a client that waits long enough gets it acknowledged."""
    db = env.state["database"]
    try:
        conn = psycopg.connect(host=node["host"], port=node["port"], user=db["user"],
                               password=db["password"], dbname=db["name"], autocommit=True,
                               connect_timeout=max(1, int(timeout_s)),
                               options=f"-c statement_timeout={int(timeout_s * 1000)}")
    except psycopg.Error:
        return False
    try:
        try:
            row = conn.execute("select pg_is_in_recovery(), "
                               "current_setting('default_transaction_read_only')").fetchone()
        except psycopg.Error:
            return False
        if row is None or row[0] or row[1] == "on":
            return False
        # statement_timeout ends before the commit (PostgreSQL disables it there): a commit
        # waiting for a synchronous standby is cancelled from here instead.
        for sql in ("create table if not exists probe_writes (at timestamptz)",
                    "insert into probe_writes values (now())"):
            timer = threading.Timer(timeout_s, conn.cancel_safe)
            timer.start()
            try:
                conn.execute(sql)
            except psycopg.Error:
                break
            finally:
                timer.cancel()
        return True
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def lab_secret_values(state: dict[str, Any]) -> list[str]:
    """Every secret the lab made, to prove none leaks."""
    values = [state["vcenter"]["password"], state["slack"]["bot_token"],
              state["slack"]["signing_secret"], state["database"]["password"],
              state["secrets"]["webhook"], state["secrets"]["control"]]
    return [v for v in values if v and len(v) >= 8]


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str)
