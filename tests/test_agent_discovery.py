"""`drflow agent discover` on a real primary/standby pair, and the config it writes, running."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.config import load_config
from agents.discovery import _conf_value, parse_conninfo
from agents.monitors.volume import mount_point_of
from lab import postgres
from tests.harness import Pair, pg_pair
from tests.test_agent_core import DRFLOW, ROOT, SECRET_ENV, AgentProcess, Receiver, new_secret

pytestmark = pytest.mark.lab

PG_PASSWORD_ENV = "DRFLOW_TEST_PG_PASSWORD"


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with pg_pair("drflow-agent-disc-", "agdisc", sync=True) as p:
        yield p


def discover(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if password is not None:
        env[PG_PASSWORD_ENV] = password
    return subprocess.run([str(DRFLOW), "agent", "discover", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def by_datadir(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["datadir"]: i for i in doc["instances"]}


def test_conninfo_and_setting_parsing() -> None:
    kv = parse_conninfo("host=10.0.0.5 port=5433 user=rep password='s3 cr\\'t' "
                        "application_name=orders-dr")
    assert kv == {"host": "10.0.0.5", "port": "5433", "user": "rep", "password": "s3 cr't",
                  "application_name": "orders-dr"}
    assert _conf_value("'host=a port=1 application_name=''x'''  # note") == \
        "host=a port=1 application_name='x'"
    assert _conf_value("5433 # port") == "5433"


def test_discover_reports_port_datadir_role_and_upstream(
        pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    primary, standby, password = pair
    out = discover("--json", "--datadir", str(primary.datadir), "--datadir", str(standby.datadir),
                   "--pg-user", "drflow", "--pg-password-ref", f"env:{PG_PASSWORD_ENV}",
                   password=password)
    assert out.returncode == 0, out.stderr
    assert password not in out.stdout + out.stderr
    found = by_datadir(json.loads(out.stdout))
    assert set(found) == {str(primary.datadir), str(standby.datadir)}
    p, s = found[str(primary.datadir)], found[str(standby.datadir)]
    assert (p["port"], p["role"], p["role_source"], p["upstream"]) == (
        primary.port, "primary", "sql", None)
    assert (s["port"], s["role"], s["role_source"]) == (standby.port, "standby", "sql")
    assert (s["upstream"]["host"], s["upstream"]["port"]) == ("127.0.0.1", primary.port)
    assert s["upstream"]["application_name"] == standby.name
    for inst in (p, s):
        assert inst["listen"] == ["127.0.0.1"] and inst["ip"] == "127.0.0.1"
        assert inst["interface"] == "lo"
        assert inst["volume"]["mount_point"] == str(mount_point_of(primary.datadir))
        assert inst["run_as"] == "postgres" and Path(inst["bin_dir"], "pg_ctl").exists()
        assert inst["version"] == "15"


def test_discover_without_sql_access_reads_the_role_from_files(
        pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    primary, standby, _password = pair
    out = discover("--json", "--datadir", str(primary.datadir), "--datadir", str(standby.datadir),
                   "--pg-user", "nobody_here")
    assert out.returncode == 0, out.stderr
    found = by_datadir(json.loads(out.stdout))
    for inst, role in ((primary, "primary"), (standby, "standby")):
        assert found[str(inst.datadir)]["role"] == role
        assert found[str(inst.datadir)]["role_source"] == "standby.signal"
    assert found[str(standby.datadir)]["upstream"]["port"] == primary.port


def test_discover_table_and_nothing_found(
        pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    primary, standby, _ = pair
    out = discover("--datadir", str(primary.datadir), "--datadir", str(standby.datadir))
    assert out.returncode == 0, out.stderr
    assert "Resource graph" in out.stdout and f"pg-{primary.port}" in out.stdout
    assert "standby" in out.stdout and str(standby.port) in out.stdout
    out = discover("--datadir", "/nonexistent/data")
    assert out.returncode == 1
    assert "no running PostgreSQL instance found with data directory /nonexistent/data" in out.stderr


def test_written_config_runs(tmp_path: Path,
                             pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    primary, _standby, password = pair
    secret = new_secret()
    receiver = Receiver(secret)
    path = tmp_path / "agent.yaml"
    out = discover("--write", str(path), "--datadir", str(primary.datadir), "--gateway-url",
                   receiver.url, "--secret-ref", f"env:{SECRET_ENV}", "--group", "agdisc",
                   "--agent-id", "vm-agdisc-prod", "--pg-user", "drflow",
                   "--pg-password-ref", f"env:{PG_PASSWORD_ENV}", password=password)
    assert out.returncode == 0, out.stderr
    assert password not in path.read_text()
    cfg = load_config(path)
    names = cfg.graph().start_order()
    mount = mount_point_of(primary.datadir)
    vol = "vol-" + (str(mount).strip("/").replace("/", "-") or "root")
    assert names == ["ip-127.0.0.1", vol, f"pg-{primary.port}", f"port-{primary.port}"]
    assert yaml.safe_load(path.read_text())["resources"][2]["datadir"] == str(primary.datadir)
    agent = AgentProcess(path, secret, tmp_path / "agent.log", env={PG_PASSWORD_ENV: password})
    try:
        assert receiver.wait_for(lambda: any(
            e["details"]["resources"] == dict.fromkeys(names, "ok")
            and e["details"].get("roles") == {f"pg-{primary.port}": "primary"}
            for e in receiver.of(None, ("heartbeat",))), 30), agent.tail()
        beat = receiver.of(None, ("heartbeat",))[-1]
        assert (beat["agent_id"], beat["group"]) == ("vm-agdisc-prod", "agdisc")
        assert not receiver.of(None, ("resource_failed", "recovery_exhausted"))
        assert agent.stop() == 0, agent.tail()
        assert receiver.bad_signatures == 0
    finally:
        agent.stop()
        receiver.close()
