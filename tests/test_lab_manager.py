"""The lab as a whole, through the CLI a user would run and the clients a user would use."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from agents.config import load_config as load_agent_config
from drflow.config.loader import load_config
from lab import agents as lab_agents
from lab import etcd, manager, netns, vcsim
from tests.conftest import new_lab_dir

DRFLOW = str(Path(sys.executable).parent / "drflow")


def _conn(state: dict[str, Any], side: dict[str, Any]) -> psycopg.Connection[Any]:
    db = state["database"]
    return psycopg.connect(host=side["host"], port=side["port"], user=db["user"],
                           password=db["password"], dbname=db["name"], connect_timeout=2,
                           autocommit=True)


def test_status_reports_every_part_healthy(lab: dict[str, Any]) -> None:
    out = subprocess.run([DRFLOW, "lab", "status", "--dir", lab["dir"], "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(out.stdout)
    parts = {r["part"] for r in rows}
    assert {"vCenter prod (vcsim)", "vCenter dr (vcsim)", "power bridge-prod",
            "power bridge-dr", "Slack stand-in", "networks"} <= parts
    assert all(r["healthy"] for r in rows), rows
    assert len([p for p in parts if " primary " in p + " "]) == 2


def test_lab_files_describe_the_lab(lab: dict[str, Any]) -> None:
    lab_dir = Path(lab["dir"])
    data = json.loads((lab_dir / "lab.json").read_text())
    for key in ("vcenter", "aws", "slack", "groups"):
        assert key in data
    assert {"url", "user", "password"} <= set(data["vcenter"])
    assert {"endpoint_url", "region"} <= set(data["aws"])
    assert {"url", "signing_secret"} <= set(data["slack"])
    g = data["groups"][0]
    assert {"zone_id", "record"} <= set(g["dns"])
    for role in ("primary", "standby"):
        assert {"vm", "datacenter", "host", "port"} <= set(g[role])
    out = subprocess.run([DRFLOW, "config", "check", str(lab_dir / "drflow.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # The config refers to secrets; it never holds them.
    text = (lab_dir / "drflow.yaml").read_text()
    for secret in (data["vcenter"]["password"], data["slack"]["signing_secret"],
                   data["database"]["password"], data["secrets"]["webhook"]):
        assert secret not in text


def test_etcd_runs_a_member_per_location_with_the_leader_at_the_witness(
        lab: dict[str, Any]) -> None:
    info = lab["etcd"]
    ok, detail = etcd.health(info)
    assert ok, detail
    topo = manager.topology(lab)
    assert topo is not None
    if not topo.enabled:  # loopback: the one-machine variant
        assert [m["name"] for m in info["members"]] == ["etcd-dr"]
        assert set(info["by_site"].values()) == set(info["endpoints"])
        return
    assert [m["name"] for m in info["members"]] == ["etcd-prod", "etcd-dr", "etcd-witness"]
    assert "3/3 members up" in detail and "leader etcd-witness" in detail, detail
    for site, url in info["by_site"].items():
        host = url.removeprefix("http://").rsplit(":", 1)[0]
        assert topo.location_of(host) == site
        # Each member in a host of its own: in its site's namespace, the etcd port of that address.
        assert netns.host_prefix(topo, f"etcd-{site}")
    # Every member agrees the witness's member leads.
    witness_id = int(etcd.Client(info["by_site"]["witness"]).status()["header"]["member_id"])
    assert {int(etcd.Client(u).status()["leader"]) for u in info["endpoints"]} == {witness_id}


def test_lab_configs_carry_etcd_and_the_lease(lab: dict[str, Any]) -> None:
    lab_dir = Path(lab["dir"])
    cfg = load_config(lab_dir / "drflow.yaml")
    assert cfg.etcd is not None
    assert [str(u).rstrip("/") for u in cfg.etcd.endpoints] == lab["etcd"]["endpoints"]
    for g in cfg.groups:
        assert (g.policy.lease_s, g.policy.stun_grace_s) == (3, 10)
    g = lab["groups"][0]
    for role in ("primary", "standby"):
        path = lab_agents.write_agent_config(lab_dir, lab, g, role, 40123)
        lease = load_agent_config(path).lease
        assert lease is not None
        own = lab["etcd"]["by_site"][g[role]["datacenter"]]
        # The member of its own site first, then every other one.
        assert lease.etcd[0] == own
        assert sorted(lease.etcd) == sorted(lab["etcd"]["endpoints"])
        assert (lease.lease_s, lease.margin_s, lease.replication) == (3, 0.5, "sync")


def test_second_lab_up_refuses_and_changes_nothing(lab: dict[str, Any]) -> None:
    before = (Path(lab["dir"]) / "lab.json").read_text()
    out = subprocess.run([DRFLOW, "lab", "up", "--dir", lab["dir"]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "already running" in out.stdout + out.stderr
    assert (Path(lab["dir"]) / "lab.json").read_text() == before


def test_power_off_stops_the_primary_and_power_on_brings_it_back(lab: dict[str, Any]) -> None:
    g = lab["groups"][1]
    prod = g["primary"]
    with _conn(lab, prod) as c:
        assert c.execute("select not pg_is_in_recovery()").fetchone() == (True,)
    si = vcsim.connect(lab["vcenter"]["url"], lab["vcenter"]["user"], lab["vcenter"]["password"])
    t0 = time.monotonic()
    vcsim.power_off(si, prod["vm"])
    refused_after = None
    while time.monotonic() - t0 < 3.0:
        try:
            _conn(lab, prod).close()
        except psycopg.OperationalError:
            refused_after = time.monotonic() - t0
            break
        time.sleep(0.05)
    assert refused_after is not None, "primary still accepts connections 3 s after power-off"
    vcsim.power_on(si, prod["vm"])
    deadline = time.monotonic() + 20
    while True:
        try:
            with _conn(lab, prod) as c:
                assert c.execute("select 1").fetchone() == (1,)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.timeout(240)
def test_up_and_down_leave_nothing_behind() -> None:
    lab_dir = new_lab_dir()
    out = subprocess.run([DRFLOW, "lab", "up", "--dir", str(lab_dir), "--groups", "1",
                          "--replication", "async"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    state = manager.load(lab_dir)
    pids = [int(p) for p in state["processes"].values()]
    members = [int(m["pid"]) for m in state["etcd"]["members"]]
    assert len(members) == (3 if manager.topology(state).enabled else 1)  # type: ignore[union-attr]
    pids += members
    assert pids and all(psutil.pid_exists(p) for p in pids)
    out = subprocess.run([DRFLOW, "lab", "down", "--dir", str(lab_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not lab_dir.exists()
    assert not Path(f"/dev/shm/drflow-etcd-{state['network']['lab_id']}").exists()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if str(lab_dir) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
