"""Local recovery of a real PostgreSQL primary by a real `drflow agent run` (issue 3 acceptance)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from pydantic import SecretStr

from drflow.control import ControlClient
from lab import postgres
from tests.harness import Pair, pg_pair
from tests.test_agent_core import (
    SECRET_ENV,
    AgentProcess,
    Receiver,
    free_port,
    new_secret,
    write_config,
)

pytestmark = pytest.mark.lab

PG_PASSWORD_ENV = "DRFLOW_TEST_PG_PASSWORD"


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with pg_pair("drflow-agent-rec-", "agrec", sync=False) as p:
        # Crash recovery first fsyncs every file of the data directory (~2 s on this disk), which
        # alone would eat half the 5 s budget; syncfs is one call. Production should set it too.
        with postgres.admin_conn(p[0]) as c:
            c.execute("ALTER SYSTEM SET recovery_init_sync_method = 'syncfs'")
            c.execute("SELECT pg_reload_conf()")
        yield p


def pg_resources(inst: postgres.Instance, restart: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": "lo", "type": "ip", "address": "127.0.0.1", "interface": "lo"},
        {"name": "data", "type": "volume", "path": str(inst.datadir.parent), "depends_on": ["lo"]},
        {"name": "pg", "type": "postgres", "depends_on": ["data"], "port": inst.port,
         "user": "drflow", "password": {"ref": f"env:{PG_PASSWORD_ENV}"},
         "datadir": str(inst.datadir), "interval_s": 1, "timeout_s": 2, "failure_threshold": 2,
         "restart": restart},
        {"name": "port", "type": "tcp", "port": inst.port, "depends_on": ["pg"]},
    ]


def accepts(inst: postgres.Instance, password: str) -> bool:
    try:
        with psycopg.connect(postgres.conninfo(inst, "drflow", password), connect_timeout=2) as c:
            c.execute("select 1")
        return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def agent_for(tmp_path: Path, inst: postgres.Instance, password: str,
              restart: dict[str, Any], control_port: int | None = None,
              ) -> Iterator[tuple[AgentProcess, Receiver]]:
    secret = new_secret()
    receiver = Receiver(secret)
    extra: dict[str, Any] = {}
    if control_port is not None:
        extra["control"] = {"listen": f"127.0.0.1:{control_port}",
                            "secret": {"ref": f"env:{SECRET_ENV}"}}
    cfg = write_config(tmp_path / "agent.yaml", receiver, pg_resources(inst, restart), **extra)
    agent = AgentProcess(cfg, secret, tmp_path / "agent.log", env={PG_PASSWORD_ENV: password})
    try:
        ok = receiver.wait_for(lambda: any(
            set(e["details"]["resources"].values()) == {"ok"}
            for e in receiver.of(None, ("heartbeat",))), 30)
        assert ok, agent.tail()
        yield agent, receiver
        assert agent.stop() == 0, agent.tail()
        assert receiver.bad_signatures == 0
    finally:
        agent.stop()
        receiver.close()


def postmaster_pid(inst: postgres.Instance) -> int:
    return int(inst.pidfile.read_text().split("\n", 1)[0])


def test_kill9_of_the_primary_is_repaired_within_5_s(
        tmp_path: Path, pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    primary, _standby, password = pair
    restart = {"max_restarts": 3, "window_s": 300, "backoff_s": {"initial": 0.5, "max": 2}}
    with agent_for(tmp_path, primary, password, restart) as (agent, receiver):
        old = postmaster_pid(primary)
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        time.sleep(0.1)
        assert not accepts(primary, password)
        while not accepts(primary, password):
            assert time.monotonic() - t0 < 5, f"not accepting after 5 s\n{agent.tail()}"
            time.sleep(0.05)
        back_after = time.monotonic() - t0
        print(f"kill -9 -> accepting connections again after {back_after:.2f} s")
        assert postmaster_pid(primary) != old
        assert postgres.role(primary) == "primary"
        assert receiver.wait_for(
            lambda: bool(receiver.of("pg", ("resource_recovered",))), 10), agent.tail()
        pg_events = receiver.of("pg")
        kinds = [e["kind"] for e in pg_events]
        assert kinds[0] == "resource_failed" and kinds[-1] == "resource_recovered", kinds
        assert pg_events[0]["details"]["phase"] == "detected"
        attempts = [e["details"] for e in pg_events if e["details"].get("phase") == "restart_attempt"]
        assert [a["attempt"] for a in attempts] == [1]
        assert attempts[0]["outcome"] == "restarted" and attempts[0]["reason"]
        assert not receiver.of(None, ("recovery_exhausted",))
        # The port came back with its server: it may have failed meanwhile, but was not blamed.
        assert receiver.wait_for(lambda: receiver.of(None, ("heartbeat",))[-1]["details"][
            "resources"] == {"lo": "ok", "data": "ok", "pg": "ok", "port": "ok"}, 5)


def test_unusable_datadir_reports_recovery_exhausted_once(
        tmp_path: Path, pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    primary, _standby, password = pair
    restart = {"max_restarts": 2, "window_s": 300, "backoff_s": {"initial": 0.5, "max": 1}}
    moved = primary.datadir.with_name(primary.datadir.name + ".moved")
    with agent_for(tmp_path, primary, password, restart) as (agent, receiver):
        try:
            # Renamed under the running server, then the server dies: nothing left to start.
            primary.datadir.rename(moved)
            os.kill(int((moved / "postmaster.pid").read_text().split("\n", 1)[0]), signal.SIGKILL)
            assert receiver.wait_for(
                lambda: bool(receiver.of(None, ("recovery_exhausted",))), 20), agent.tail()
            time.sleep(4)  # several more failed checks: still only one report
            exhausted = receiver.of(None, ("recovery_exhausted",))
            assert len(exhausted) == 1 and exhausted[0]["resource"] == "pg"
            assert "reached max_restarts=2" in exhausted[0]["details"]["reason"]
            assert exhausted[0]["details"]["role"] == "primary"  # the gateway's cue to fail over
            attempts = [e["details"] for e in receiver.of("pg", ("resource_failed",))
                        if e["details"].get("phase") == "restart_attempt"]
            assert [a["attempt"] for a in attempts] == [1, 2]
            assert all(a["outcome"] == "failed" for a in attempts)
            assert "not a PostgreSQL data directory" in attempts[0]["error"]
            # Put it back: the agent reports the recovery and is ready for the next outage.
            moved.rename(primary.datadir)
            moved = primary.datadir
            postgres.start(primary)
            assert receiver.wait_for(
                lambda: bool(receiver.of("pg", ("resource_recovered",))), 10), agent.tail()
            assert len(receiver.of(None, ("recovery_exhausted",))) == 1
        finally:
            if moved != primary.datadir and moved.exists():
                moved.rename(primary.datadir)
                postgres.start(primary)


def test_stopped_through_the_control_api_is_left_down(
        tmp_path: Path, pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    """An operator's `stop` is not an outage: no restart, no report, until `start`."""
    primary, _standby, password = pair
    port = free_port()
    restart = {"max_restarts": 3, "backoff_s": {"initial": 0.5}}
    with agent_for(tmp_path, primary, password, restart, control_port=port) as (agent, receiver):
        # The control API shares the webhook secret here (a fresh one per test).
        agent_id = yaml.safe_load((tmp_path / "agent.yaml").read_text())["agent_id"]
        client = ControlClient(f"http://127.0.0.1:{port}/v1/control",
                               SecretStr(receiver.secret.decode()), agent_id=agent_id)
        assert client.call("status")["role"] == "primary"
        try:
            assert client.call("stop", mode="fast")["action"] == "stopped"
            time.sleep(4)  # four check intervals
            assert not accepts(primary, password)
            assert receiver.of(None, ("heartbeat",))[-1]["details"]["resources"] == {
                "lo": "ok", "data": "ok", "pg": "held", "port": "held"}
            assert not receiver.of(None, ("resource_failed", "recovery_exhausted")), agent.tail()
        finally:
            assert client.call("start")["action"] == "started"
        assert accepts(primary, password)
        assert receiver.wait_for(lambda: receiver.of(None, ("heartbeat",))[-1]["details"][
            "resources"] == {"lo": "ok", "data": "ok", "pg": "ok", "port": "ok"}, 5)
        assert not receiver.of(None, ("resource_failed", "recovery_exhausted"))


def test_promotion_is_reported_as_role_changed(
        tmp_path: Path, pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    _primary, standby, password = pair
    restart = {"max_restarts": 1}
    with agent_for(tmp_path, standby, password, restart) as (agent, receiver):
        with postgres.admin_conn(standby) as c:
            c.execute("select pg_promote(true, 30)")
        assert receiver.wait_for(lambda: bool(receiver.of("pg", ("role_changed",))), 10), \
            agent.tail()
        change = receiver.of("pg", ("role_changed",))[0]["details"]
        assert (change["from"], change["to"]) == ("standby", "primary")
        assert not receiver.of("pg", ("resource_failed",))
