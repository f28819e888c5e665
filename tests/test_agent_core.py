"""The guest agent's core: config, dependency graph, recovery decisions, monitors and the loop.

Also holds the helpers the other agent tests share: a real webhook receiver that checks every
signature, and `AgentProcess`, a real `drflow agent run` process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.config import AgentConfig, ConfigError, config_from_dict, load_config, parse_config
from agents.graph import Graph, GraphError
from agents.monitors import CheckResult, build_monitor
from agents.recovery import Action, Policy, Situation, backoff_delay, decide
from agents.runner import Agent
from drflow.events import HealthEvent
from drflow.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify

ROOT = Path(__file__).resolve().parent.parent
DRFLOW = ROOT / ".venv" / "bin" / "drflow"
SECRET_ENV = "DRFLOW_TEST_AGENT_SECRET"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- shared helpers ------------------------------------------------------------------------------


class Receiver:
    """A gateway stand-in: verifies each signature for real, keeps each event_id once, in order."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.port = free_port()
        self.cond = threading.Condition()
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver._take(body, self.headers.get(TIMESTAMP_HEADER),
                                        self.headers.get(SIGNATURE_HEADER))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/events"

    def _take(self, body: bytes, ts: str | None, sig: str | None) -> int:
        try:
            verify(self.secret, ts, sig, body)
        except SignatureError:
            with self.cond:
                self.bad_signatures += 1
            return 401
        event = json.loads(HealthEvent.from_json(body).to_json())
        with self.cond:
            if any(e["event_id"] == event["event_id"] for e in self.events):
                return 409
            self.events.append(event)
            self.cond.notify_all()
        return 202

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def of(self, resource: str | None = None, kinds: tuple[str, ...] | None = None
           ) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events
                    if (resource is None or e["resource"] == resource)
                    and (kinds is None or e["kind"] in kinds)]

    def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return True


class AgentProcess:
    """`drflow agent run --config …` as a real process (stopped with SIGTERM)."""

    def __init__(self, config: Path, secret: str, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.log = log
        full_env = {**os.environ, SECRET_ENV: secret, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(DRFLOW), "agent", "run", "--config", str(config)], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, cwd=ROOT)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return int(self.proc.returncode)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def write_config(path: Path, receiver: Receiver, resources: list[dict[str, Any]],
                 **extra: Any) -> Path:
    doc = {
        "agent_id": f"agent-{uuid.uuid4().hex[:8]}", "group": "g1",
        "gateway": {"url": receiver.url, "webhook_secret": {"ref": f"env:{SECRET_ENV}"}},
        "heartbeat_interval_s": 1, "outbox": str(path.parent / "outbox.sqlite"),
        "resources": resources, **extra,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def new_secret() -> str:
    return "agent-test-" + uuid.uuid4().hex


# -- graph ---------------------------------------------------------------------------------------


def test_graph_orders_and_dependents() -> None:
    g = Graph({"pg": ["vol"], "port": ["pg"], "ip": [], "vol": ["ip"], "sql": ["port", "pg"]})
    assert g.start_order() == ["ip", "vol", "pg", "port", "sql"]
    assert g.stop_order() == ["sql", "port", "pg", "vol", "ip"]
    assert g.dependents("vol") == ["pg", "port", "sql"]
    assert g.dependents("sql") == []
    assert g.dependencies("sql") == ["ip", "vol", "pg", "port"]
    assert g.start_order(["sql", "ip"]) == ["ip", "sql"]


def test_graph_errors_name_the_resources() -> None:
    with pytest.raises(GraphError, match=r"'pg' depends on unknown resource 'disk'"):
        Graph({"pg": ["disk"], "vol": []})
    with pytest.raises(GraphError, match=r"cycle between resources: (a -> b -> c -> a)"):
        Graph({"a": ["b"], "b": ["c"], "c": ["a"], "d": []})
    with pytest.raises(GraphError, match=r"a -> a"):
        Graph({"a": ["a"]})


# -- config --------------------------------------------------------------------------------------

GOOD = """\
agent_id: vm-pg-1
group: orders
gateway:
  url: http://127.0.0.1:8080/v1/events
  webhook_secret: {ref: "env:WEBHOOK"}
outbox: state/outbox.sqlite
control: {listen: "127.0.0.1:9101", secret: {ref: "file:/etc/drflow/control"}}
resources:
  - {name: lo, type: ip, address: 127.0.0.1, interface: lo}
  - {name: data, type: volume, path: data, depends_on: [lo], min_free_pct: 1}
  - name: pg
    type: postgres
    depends_on: [data]
    port: 5433
    datadir: data/pg
    password: {ref: "env:PGPASS"}
    run_as: postgres
    restart: {max_restarts: 2, window_s: 60, backoff_s: {initial: 0.5, max: 4}}
  - {name: port, type: tcp, port: 5433, depends_on: [pg]}
  - {name: api, type: http, url: "http://127.0.0.1:8000/healthz", expect_status: 204}
  - {name: worker, type: process, process_name: worker, start: [/usr/bin/worker, --daemon]}
"""


def test_config_loads_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.heartbeat_interval_s == 1
    assert cfg.outbox == tmp_path / "state" / "outbox.sqlite"
    pg = cfg.resource("pg")
    assert pg.type == "postgres" and pg.datadir == tmp_path / "data" / "pg"
    assert pg.restart.max_restarts == 2 and pg.restart.backoff_s.initial == 0.5
    assert pg.restartable and cfg.resource("worker").restartable
    assert not cfg.resource("port").restartable and not cfg.resource("api").restartable
    assert cfg.resource("port").interval_s == 1 and cfg.resource("port").failure_threshold == 2
    assert cfg.control is not None and cfg.control.port == 9101
    assert cfg.graph().start_order() == ["lo", "data", "pg", "port", "api", "worker"]


@pytest.mark.parametrize(("change", "expected"), [
    (("port: 5433\n    datadir", "portt: 5433\n    datadir"),
     r"resources\[2\]\(pg\)\.portt \(line 14\): unknown field"),
    (("depends_on: [pg]", "depends_on: [pgx]"), r"'port' depends on unknown resource 'pgx'"),
    (("depends_on: [lo]", "depends_on: [port]"),
     r"cycle between resources: data -> port -> pg -> data"),
    (("{ref: \"env:WEBHOOK\"}", "hunter2"), r"inline secrets are not allowed"),
    (("process_name: worker, ", ""), r"give exactly one of process_name or pidfile"),
    (("name: api", "name: lo"), r"duplicate resource name\(s\): lo"),
    (("type: tcp, port: 5433", "type: tcp, port: 70000"),
     r"resources\[3\]\(port\)\.port \(line 19\): Input should be less than or equal to 65535"),
    (("type: http", "type: smtp"), r"resources\[4\]\(api\) \(line 20\).*'process', 'tcp'"),
])
def test_config_errors_point_at_the_problem(change: tuple[str, str], expected: str) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(ConfigError, match=expected) as info:
        parse_config(text, base_dir=Path("/"))
    assert "hunter2" not in str(info.value)


def test_config_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agent config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("resources: [", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config("- 1\n", base_dir=tmp_path)


# -- recovery decisions --------------------------------------------------------------------------

POLICY = Policy(max_restarts=3, window_s=60, backoff_initial_s=1, backoff_max_s=3)


def situation(**kw: Any) -> Situation:
    base: dict[str, Any] = dict(
        consecutive_failures=2, failure_threshold=2, restartable=True, attempts_this_outage=0,
        last_attempt_at=None, attempt_times=(), exhausted_reported=False)
    return Situation(**{**base, **kw})


def test_decide_restarts_with_backoff_then_gives_up() -> None:
    action, reason = decide(situation(consecutive_failures=1), POLICY, now=100)
    assert action is Action.NONE and "below the threshold of 2" in reason
    action, reason = decide(situation(), POLICY, now=100)
    assert action is Action.RESTART and reason.startswith("restart 1 of 3 within 60 s")
    action, reason = decide(situation(attempts_this_outage=1, last_attempt_at=100,
                                      attempt_times=(100,)), POLICY, now=100.5)
    assert action is Action.WAIT and "next restart in 0.5 s" in reason
    action, _ = decide(situation(attempts_this_outage=1, last_attempt_at=100,
                                 attempt_times=(100,)), POLICY, now=101)
    assert action is Action.RESTART
    # Third attempt waits 2 s (exponential), the cap holds later.
    action, _ = decide(situation(attempts_this_outage=2, last_attempt_at=101,
                                 attempt_times=(100, 101)), POLICY, now=102.9)
    assert action is Action.WAIT
    assert [backoff_delay(n, POLICY) for n in range(5)] == [0, 1, 2, 3, 3]
    action, reason = decide(situation(attempts_this_outage=3, last_attempt_at=103,
                                      attempt_times=(100, 101, 103)), POLICY, now=110)
    assert action is Action.EXHAUSTED and "3 restart(s) within 60 s reached max_restarts=3" in reason
    action, _ = decide(situation(attempts_this_outage=3, attempt_times=(100, 101, 103),
                                 exhausted_reported=True), POLICY, now=111)
    assert action is Action.NONE


def test_decide_counts_restarts_of_earlier_outages_within_the_window() -> None:
    earlier = (10.0, 20.0, 30.0)
    action, _ = decide(situation(attempt_times=earlier), POLICY, now=50)
    assert action is Action.EXHAUSTED
    action, _ = decide(situation(attempt_times=earlier), POLICY, now=71)
    assert action is Action.RESTART  # the first one left the window


def test_decide_blames_the_dependency_and_the_unrestartable() -> None:
    action, reason = decide(situation(blocked_by="vol"), POLICY, now=1)
    assert action is Action.WAIT and "dependency 'vol'" in reason
    action, reason = decide(situation(restartable=False), POLICY, now=1)
    assert action is Action.EXHAUSTED and "cannot be restarted in place" in reason
    zero = Policy(max_restarts=0, window_s=60, backoff_initial_s=1, backoff_max_s=1)
    assert decide(situation(), zero, now=1)[0] is Action.EXHAUSTED


# -- monitors against real things ----------------------------------------------------------------


def _resource(spec: dict[str, Any]) -> Any:
    doc = {"agent_id": "a", "group": "g",
           "gateway": {"url": "http://x/", "webhook_secret": {"ref": "env:X"}},
           "resources": [{"name": "r", **spec}]}
    return config_from_dict(doc).resources[0]


def check(spec: dict[str, Any]) -> CheckResult:
    return build_monitor(_resource(spec)).check()


def test_tcp_and_http_monitors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert check({"type": "tcp", "port": port}).ok
    result = check({"type": "tcp", "port": port})
    assert not result.ok and "refuses connections" in result.detail

    status = {"code": 200}

    class H(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(status["code"])
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/healthz"
    try:
        assert check({"type": "http", "url": url}).ok
        status["code"] = 503
        result = check({"type": "http", "url": url})
        assert not result.ok and "answered 503, expected 200" in result.detail
        assert check({"type": "http", "url": url, "expect_status": 503}).ok
    finally:
        srv.shutdown()
        srv.server_close()
    assert not check({"type": "http", "url": url, "timeout_s": 0.5}).ok


def test_volume_monitor(tmp_path: Path) -> None:
    result = check({"type": "volume", "path": str(tmp_path)})
    assert result.ok, result.detail
    assert result.facts["free_mb"] > 0 and not list(tmp_path.iterdir())  # probe cleaned up
    mount = Path(result.facts["mount_point"])
    assert check({"type": "volume", "path": str(tmp_path), "mount_point": str(mount)}).ok
    result = check({"type": "volume", "path": str(tmp_path), "mount_point": str(tmp_path)})
    assert not result.ok and "not on the expected mount" in result.detail
    result = check({"type": "volume", "path": str(tmp_path), "min_free_mb": 1e12})
    assert not result.ok and "low on space" in result.detail
    result = check({"type": "volume", "path": str(tmp_path / "gone")})
    assert not result.ok and "not a directory" in result.detail
    # A directory the agent cannot write to. Root ignores mode bits, so as root (on CI) the
    # directory is made immutable instead, which stops root too.
    blocked = tmp_path / "ro"
    blocked.mkdir()
    with _unwritable(blocked):
        result = check({"type": "volume", "path": str(blocked)})
        assert not result.ok and "not writable" in result.detail, result.detail


@contextlib.contextmanager
def _unwritable(d: Path) -> Iterator[None]:
    if os.geteuid() != 0:
        d.chmod(0o500)
        try:
            yield
        finally:
            d.chmod(0o700)
        return
    subprocess.run(["chattr", "+i", str(d)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True, capture_output=True)


@contextlib.contextmanager
def _small_tmpfs(d: Path) -> Iterator[Path]:
    """A 256 KB tmpfs at `d` (root only: mounting needs it), unmounted afterwards."""
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(d)],
                   check=True, capture_output=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")
def test_volume_monitor_sees_a_full_and_a_read_only_filesystem(tmp_path: Path) -> None:
    with _small_tmpfs(tmp_path / "vol") as vol:
        monitor = {"type": "volume", "path": str(vol), "min_free_pct": 0, "min_free_mb": 0}
        assert check(monitor).ok
        # Fill it: statvfs may still round to a few free blocks, the probe's write must fail.
        fd = os.open(vol / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b"x" * 4096):
                    pass
        finally:
            os.close(fd)
        result = check(monitor)
        assert not result.ok and "not writable" in result.detail, result.detail
        assert "No space left" in result.detail
        assert not check({**monitor, "min_free_mb": 1}).ok  # the space check sees it too
        (vol / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(vol)], check=True, capture_output=True)
        result = check(monitor)
        assert not result.ok and "mounted read-only" in result.detail, result.detail


def test_ip_monitor() -> None:
    result = check({"type": "ip", "address": "127.0.0.1"})
    assert result.ok and result.facts["interface"] == "lo"
    assert check({"type": "ip", "address": "127.0.0.1", "interface": "lo"}).ok
    result = check({"type": "ip", "address": "127.0.0.1", "interface": "eth9"})
    assert not result.ok and "expected on eth9" in result.detail
    result = check({"type": "ip", "address": "192.0.2.77"})
    assert not result.ok and "on no interface" in result.detail


def test_process_monitor(tmp_path: Path) -> None:
    name = f"drflowtest{uuid.uuid4().hex[:5]}"  # comm is at most 15 characters
    exe = tmp_path / name
    os.symlink("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "300"])
    pidfile = tmp_path / "p.pid"
    pidfile.write_text(f"{proc.pid}\n")
    try:
        assert check({"type": "process", "pidfile": str(pidfile)}).facts["pid"] == proc.pid
        assert check({"type": "process", "process_name": name}).facts["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    result = check({"type": "process", "pidfile": str(pidfile)})
    assert not result.ok and "is not running" in result.detail
    assert not check({"type": "process", "process_name": name}).ok
    result = check({"type": "process", "pidfile": str(tmp_path / "nope.pid")})
    assert not result.ok and "does not exist" in result.detail


# -- the loop, in process ------------------------------------------------------------------------


def _cfg(resources: list[dict[str, Any]], heartbeat: float = 0.2) -> AgentConfig:
    return config_from_dict({
        "agent_id": "a1", "group": "g1", "heartbeat_interval_s": heartbeat,
        "gateway": {"url": "http://127.0.0.1:1/", "webhook_secret": {"ref": "env:X"}},
        "resources": resources})


class Collector:
    def __init__(self) -> None:
        self.events: list[HealthEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: HealthEvent) -> None:
        with self.lock:
            self.events.append(event)

    def kinds(self, resource: str | None = None) -> list[str]:
        with self.lock:
            return [e.kind.value for e in self.events
                    if e.kind.value != "heartbeat" and (resource is None or e.resource == resource)]

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.02)
        return pred()


@pytest.fixture()
def running() -> Iterator[Callable[[Agent], Agent]]:
    started: list[tuple[Agent, threading.Thread]] = []

    def start(agent: Agent) -> Agent:
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        started.append((agent, t))
        return agent

    yield start
    for agent, t in started:
        agent.stop()
        t.join(5)
        assert not t.is_alive()


def test_loop_restarts_a_process_and_reports_every_step(
        tmp_path: Path, running: Callable[[Agent], Agent]) -> None:
    pidfile = tmp_path / "svc.pid"
    start = ["/bin/sh", "-c", f'echo $$ > {pidfile}; exec sleep 300']
    cfg = _cfg([
        {"name": "svc", "type": "process", "pidfile": str(pidfile), "start": start,
         "interval_s": 0.2, "failure_threshold": 2,
         "restart": {"max_restarts": 3, "window_s": 60, "backoff_s": {"initial": 0.2}}},
    ])
    events = Collector()
    agent = running(Agent(cfg, emit=events))
    try:
        # Not running at first: the agent starts it (that is an outage, then a recovery).
        assert events.wait(lambda: events.kinds("svc")[-1:] == ["resource_recovered"], 10), \
            events.kinds()
        first_pid = int(pidfile.read_text())
        os.kill(first_pid, signal.SIGKILL)
        assert events.wait(lambda: events.kinds("svc").count("resource_recovered") == 2, 10)
        assert int(pidfile.read_text()) != first_pid
        assert events.kinds("svc") == ["resource_failed", "resource_failed", "resource_recovered"] * 2
        attempts = [e.details for e in events.events if e.details.get("phase") == "restart_attempt"]
        assert [a["attempt"] for a in attempts] == [1, 1]
        assert all(a["outcome"] == "restarted" and "restart" in a["reason"] for a in attempts)
        assert agent.status() == {"svc": "ok"}
        n = len(events.events)
        assert events.wait(lambda: any(
            e.kind.value == "heartbeat" and e.details["resources"] == {"svc": "ok"}
            for e in events.events[n:]), 2)
    finally:
        agent.stop()
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_unrestartable_dependent_waits_for_its_dependency(
        tmp_path: Path, running: Callable[[Agent], Agent]) -> None:
    """The port of a dead service is not blamed: only the service is restarted."""
    port = free_port()
    pidfile = tmp_path / "srv.pid"
    start = [sys.executable, "-c", textwrap.dedent(f"""
        import os, socket, time
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", {port})); s.listen(); time.sleep(300)
    """)]
    cfg = _cfg([
        {"name": "srv", "type": "process", "pidfile": str(pidfile), "start": start,
         "interval_s": 0.2, "failure_threshold": 1,
         "restart": {"backoff_s": {"initial": 0.2}}},
        {"name": "port", "type": "tcp", "port": port, "depends_on": ["srv"], "interval_s": 0.1,
         "failure_threshold": 1},
    ])
    events = Collector()
    agent = running(Agent(cfg, emit=events))
    try:
        assert events.wait(lambda: agent.status() == {"srv": "ok", "port": "ok"}, 15)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert events.wait(lambda: "resource_recovered" in events.kinds("srv")[-1:]
                           and agent.status() == {"srv": "ok", "port": "ok"}, 15), events.kinds()
        assert "recovery_exhausted" not in events.kinds()
    finally:
        agent.stop()
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_check_begun_before_a_restart_does_not_set_off_another(
        running: Callable[[Agent], Agent]) -> None:
    """A restart may begin while the resource's own check is in flight: its dependency's check
    came back healthy meanwhile. That check looked at the process before the restart; its late
    failure must not count, or a second restart would stop a server that is starting (crash
    recovery). The order of the two checks cannot be forced on real ones: they are scripted."""
    cfg = _cfg([
        {"name": "dep", "type": "ip", "address": "127.0.0.1", "interval_s": 0.2},
        {"name": "svc", "type": "process", "process_name": "drflow-none", "start": ["/bin/true"],
         "depends_on": ["dep"], "interval_s": 0.1, "timeout_s": 10, "failure_threshold": 2,
         "restart": {"max_restarts": 3, "window_s": 60, "backoff_s": {"initial": 0.01}}},
    ], heartbeat=0.2)
    events = Collector()
    agent = Agent(cfg, emit=events)
    down, in_flight, release = threading.Event(), threading.Event(), threading.Event()
    calls = {"svc": 0}

    class Svc:
        def check(self) -> CheckResult:
            if not down.is_set():
                return CheckResult(True, "up")
            calls["svc"] += 1
            if calls["svc"] == 3:  # the check the restart will overtake
                in_flight.set()
                release.wait(10)
            return CheckResult(False, "down")

    class Dep:
        def check(self) -> CheckResult:
            if down.is_set():
                in_flight.wait(10)  # healthy again only once svc's third check has begun
            return CheckResult(True, "ok")

    class Restarter:
        def stop(self) -> None:
            pass

        def start(self) -> None:
            down.clear()

        def hold(self) -> str | None:
            return None

    agent.states["svc"].monitor = Svc()
    agent.states["dep"].monitor = Dep()
    agent.states["svc"].restarter = Restarter()
    running(agent)
    try:
        assert events.wait(lambda: agent.status() == {"dep": "ok", "svc": "ok"}, 10)
        down.set()
        assert events.wait(lambda: any(e.details.get("phase") == "restart_attempt"
                                       for e in events.events), 10), events.kinds()
        time.sleep(0.1)  # past the backoff: a counted failure would restart at once
        release.set()
        assert events.wait(lambda: events.kinds("svc")[-1:] == ["resource_recovered"], 10), \
            events.kinds()
        time.sleep(0.3)
        attempts = [e.details["attempt"] for e in events.events
                    if e.details.get("phase") == "restart_attempt"]
        assert attempts == [1], attempts
    finally:
        release.set()
        agent.stop()


def test_hung_check_does_not_stall_the_loop(running: Callable[[Agent], Agent]) -> None:
    """A check stuck in the kernel (an NFS stat, say) cannot be made for real here: inject one."""
    cfg = _cfg([
        {"name": "stuck", "type": "tcp", "port": 1, "interval_s": 0.2, "timeout_s": 0.3,
         "failure_threshold": 2},
        {"name": "lo", "type": "ip", "address": "127.0.0.1", "interval_s": 0.2},
    ], heartbeat=0.1)
    events = Collector()
    agent = Agent(cfg, emit=events)
    release = threading.Event()

    class Stuck:
        def check(self) -> CheckResult:
            release.wait(30)
            return CheckResult(True, "late")

    agent.states["stuck"].monitor = Stuck()
    running(agent)
    try:
        assert events.wait(lambda: "recovery_exhausted" in events.kinds("stuck"), 5)
        failed = next(e for e in events.events if e.resource == "stuck")
        assert re.search(r"did not finish within 0.3 s|stuck for [\d.]+ s \(timeout 0.3 s\)",
                         failed.details["error"]), failed.details
        t0 = time.monotonic()
        n0 = len([e for e in events.events if e.kind.value == "heartbeat"])
        time.sleep(1.0)
        n1 = len([e for e in events.events if e.kind.value == "heartbeat"])
        assert n1 - n0 >= 8, (n0, n1, time.monotonic() - t0)  # heartbeats keep their pace
        assert agent.status()["lo"] == "ok"
        assert events.kinds("stuck").count("recovery_exhausted") == 1
    finally:
        release.set()
    assert events.wait(lambda: events.kinds("stuck")[-1:] == ["resource_recovered"], 5)


# -- the real process ----------------------------------------------------------------------------


def test_agent_run_delivers_signed_events_and_stops_on_sigterm(tmp_path: Path) -> None:
    secret = new_secret()
    receiver = Receiver(secret)
    pidfile = tmp_path / "svc.pid"
    cfg = write_config(tmp_path / "agent.yaml", receiver, [
        {"name": "lo", "type": "ip", "address": "127.0.0.1"},
        {"name": "svc", "type": "process", "pidfile": str(pidfile), "depends_on": ["lo"],
         "start": ["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 300"],
         "interval_s": 0.5, "failure_threshold": 1},
    ])
    agent = AgentProcess(cfg, secret, tmp_path / "agent.log")
    try:
        assert receiver.wait_for(lambda: bool(receiver.of("svc", ("resource_recovered",)))
                                 and len(receiver.of(None, ("heartbeat",))) >= 2, 20), agent.tail()
        t0 = time.monotonic()
        assert agent.stop() == 0, agent.tail()
        assert time.monotonic() - t0 < 5
        assert receiver.bad_signatures == 0
        beat = receiver.of(None, ("heartbeat",))[-1]
        assert beat["agent_id"] == yaml.safe_load(cfg.read_text())["agent_id"]
        assert beat["details"]["resources"]["lo"] == "ok"
        assert "stopped" in agent.tail()
    finally:
        agent.stop()
        receiver.close()
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_agent_run_refuses_a_bad_config_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text(GOOD.replace("depends_on: [pg]", "depends_on: [pgx]"))
    out = subprocess.run([str(DRFLOW), "agent", "run", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "'port' depends on unknown resource 'pgx'" in out.stderr
    assert "Traceback" not in out.stderr


def test_agent_without_postgres_does_not_load_psycopg(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from agents.config import load_config
        from agents.runner import Agent
        Agent(load_config(Path({str(tmp_path / 'agent.yaml')!r})), emit=lambda e: None)
        assert "psycopg" not in sys.modules, "psycopg loaded"
    """)
    without_pg = GOOD.split("  - name: pg\n")[0].replace(
        'control: {listen: "127.0.0.1:9101", secret: {ref: "file:/etc/drflow/control"}}\n', "")
    (tmp_path / "agent.yaml").write_text(
        without_pg + "  - {name: port, type: tcp, port: 5433, depends_on: [data]}\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr


def test_agent_run_setup_failures_are_clear(tmp_path: Path) -> None:
    secret = new_secret()
    receiver = Receiver(secret)
    env = {**os.environ, SECRET_ENV: secret}
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            cfg = write_config(tmp_path / "agent.yaml", receiver, [
                {"name": "pg", "type": "postgres", "port": free_port(),
                 "datadir": str(tmp_path / "nodata")},
            ], control={"listen": f"127.0.0.1:{port}", "secret": {"ref": f"env:{SECRET_ENV}"}})
            out = subprocess.run([str(DRFLOW), "agent", "run", "--config", str(cfg)],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 2, out.stderr
        assert f"cannot listen on 127.0.0.1:{port} for the control API" in out.stderr
        assert "Traceback" not in out.stderr

        # Two agents on one outbox would break the order of its events: the second refuses.
        cfg = write_config(tmp_path / "agent.yaml", receiver, [
            {"name": "lo", "type": "ip", "address": "127.0.0.1"}])
        first = AgentProcess(cfg, secret, tmp_path / "first.log")
        try:
            assert receiver.wait_for(lambda: bool(receiver.of(None, ("heartbeat",))), 20), \
                first.tail()
            out = subprocess.run([str(DRFLOW), "agent", "run", "--config", str(cfg)],
                                 capture_output=True, text=True, timeout=60, env=env)
            assert out.returncode == 2, out.stderr
            assert "another sender is delivering" in out.stderr
            assert first.proc.poll() is None
        finally:
            assert first.stop() == 0, first.tail()
    finally:
        receiver.close()
