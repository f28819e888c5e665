"""`drflow protect` on the lab: a lone database VM made a protected pair under a steady writer,
through the orchestrator's own vCenter, Tools, Route 53 and config; then failed over like any
other group. And what it refuses, and what `--rollback` leaves."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from drflow.dns import resolve_endpoint
from drflow.etcd import Client
from drflow.leader_keys import sync_key
from lab import faults, vcsim
from lab.harness import ServerWriter
from tests.harness import DRFLOW, Env, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def env(prefect_api: str) -> Iterator[Env]:
    e = start_env(groups=1, replication="sync", gateway=False, unprotected=["crm", "hr", "pay"])
    try:
        e.start_gateway("up", timeout=120)
        e.wait_all_heard()
        yield e
    finally:
        stop_env(e)


def _lone(env: Env, name: str) -> dict[str, Any]:
    return next(u for u in env.state["unprotected"] if u["name"] == name)


def _protect(env: Env, name: str, *extra: str, timeout: float = 300,
             prefect_api_url: str | None = None) -> subprocess.CompletedProcess[str]:
    u = _lone(env, name)
    argv = [*env.orchestrator_prefix, DRFLOW, "protect", u["vm"], "--config", str(env.config),
            "--state-dir", str(env.state_dir), "--address", u["host"], "--port", str(u["port"]),
            "--standby-address", u["standby"]["address"],
            "--standby-host", u["standby"]["esx_host"],
            "--guest-password-ref", f"file:{env.lab_dir / 'secrets' / 'guest_password'}",
            *extra]
    # As on an operator's shell: Prefect found through `drflow up`'s record in --state-dir, and a
    # Prefect home of its own (the session's would hold the orchestrator's database itself).
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environ["PREFECT_HOME"] = str(env.lab_dir / "operator-prefect-home")
    if prefect_api_url:
        environ["PREFECT_API_URL"] = prefect_api_url
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=environ)


def _dr_vms(env: Env) -> set[str]:
    return set(vcsim.vms_by_name(env.si("dr")))


def _record(env: Env, name: str) -> tuple[str, int] | None:
    g = env.state["groups"][0]
    with contextlib.suppress(LookupError):
        return resolve_endpoint(env.route53(), g["dns"]["zone_id"],
                                f"{name}.db.lab.drflow.internal.")
    return None


def test_a_dry_run_shows_the_plan_and_changes_nothing(env: Env) -> None:
    before = (env.config.read_bytes(), _dr_vms(env))
    r = _protect(env, "crm", "--yes", "--dry-run")
    assert r.returncode == 0, r.stderr + r.stdout
    for step in ("push the agent", "seed and cluster", "prove it"):
        assert step in r.stdout, r.stdout
    assert (env.config.read_bytes(), _dr_vms(env)) == before
    assert _record(env, "crm") is None


def test_what_cannot_be_protected_is_refused_with_what_to_change(env: Env) -> None:
    g = env.state["groups"][0]
    u = _lone(env, "crm")
    before = (env.config.read_bytes(), _dr_vms(env))
    # A group's name taken, and its standby's VM name taken by a VM protect did not make.
    r = _protect(env, "crm", "--yes", "--group", g["name"], "--standby-vm", g["standby"]["vm"])
    assert r.returncode == 2, r.stderr
    assert f"a protection group named {g['name']!r} exists already" in r.stderr
    assert f"a VM named {g['standby']['vm']} exists at dr" in r.stderr
    # A standby, not a primary: the protected pair's standby (its address and port).
    r = _protect(env, "crm", "--yes", "--address", g["standby"]["host"],
                 "--port", str(g["standby"]["port"]))
    assert r.returncode == 2 and "is a standby, not a primary" in r.stderr, r.stderr
    assert u["vm"] in r.stderr
    assert (env.config.read_bytes(), _dr_vms(env)) == before


def test_a_lone_vm_protected_under_a_steady_writer_then_fails_over(env: Env) -> None:
    u = _lone(env, "crm")
    writer = ServerWriter(env, u["host"], u["port"]).start()
    t0 = time.monotonic()
    r = _protect(env, "crm", "--yes", "--json")
    took = time.monotonic() - t0
    writer.stop(5)
    print(f"\nprotected in {took:.1f} s\n{r.stderr[-3000:]}")
    assert r.returncode == 0, r.stderr + r.stdout
    standby = u["standby"]
    # Sync, streaming, named on the primary; DNS; config; the gateway hears both agents.
    with env.connect(u["host"], u["port"]) as c:
        rows = c.execute("select application_name, sync_state from pg_stat_replication"
                         ).fetchall()
    assert (standby["vm"], "sync") in rows
    assert _record(env, "crm") == (u["host"], u["port"])
    assert "name: crm" in env.config.read_text()
    heard = env.groups_status()["crm"]
    assert {a["agent_id"] for a in heard["agents"]} == {u["vm"], standby["vm"]}
    assert env.audit_records("drill.finish", "crm")[-1].outcome == "passed"
    # The proving drill's run is in the orchestrator's Prefect, not a temporary one.
    run_id = json.loads(r.stdout.strip().splitlines()[-1])["drill"]["run_id"]
    api = json.loads((env.state_dir / "prefect-api.json").read_text())["api_url"]
    run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
    assert run.status_code == 200 and run.json()["name"].startswith("drill crm "), run.text
    assert writer.refused == []
    assert len(writer.acked) > 50
    assert writer.lost(standby["address"], u["port"]) == []
    # Like any other group: its host lost, the new standby takes over, nothing acknowledged lost.
    writer = ServerWriter(env, u["host"], u["port"]).start()
    time.sleep(1)
    faults.fail(env.lab_dir, "host-loss", u["vm"])
    rec = wait_for(lambda: env.audit_records("failover.finish", "crm"), 60,
                   "the failover of crm")[-1]
    writer.stop()
    assert rec.outcome == "ok", rec.reason
    assert _record(env, "crm") == (standby["address"], u["port"])
    assert writer.lost(standby["address"], u["port"]) == []


def _screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"],
                          capture_output=True, text=True, check=True).stdout


def test_the_wizard_asks_shows_the_plan_and_changes_nothing_unless_confirmed(env: Env) -> None:
    """In a real terminal: it asks what it cannot know, offers what it found as defaults, shows
    the plan and waits for a yes."""
    u = _lone(env, "hr")
    before = (env.config.read_bytes(), _dr_vms(env))
    session = f"drflow-wizard-{uuid.uuid4().hex[:6]}"
    argv = [*env.orchestrator_prefix, DRFLOW, "protect", u["vm"], "--config", str(env.config),
            "--state-dir", str(env.state_dir), "--address", u["host"], "--port", str(u["port"]),
            "--guest-password-ref", f"file:{env.lab_dir / 'secrets' / 'guest_password'}"]
    cmd = " ".join(argv) + "; echo EXIT=$?; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "50", cmd],
                   check=True)
    try:
        def asked(text: str) -> bool:
            return text in _screen(session)

        wait_for(lambda: asked("Standby VM name [hr-dr]:"), 20, "the standby name question")
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        wait_for(lambda: asked("Standby address at dr:"), 10, "the address question")
        subprocess.run(["tmux", "send-keys", "-t", session, u["standby"]["address"], "Enter"],
                       check=True)
        wait_for(lambda: asked("ESXi host at dr"), 10, "the host question")
        subprocess.run(["tmux", "send-keys", "-t", session, u["standby"]["esx_host"], "Enter"],
                       check=True)
        # The template, DNS record, zone and database login default to what the DR site and
        # the other groups have: accepted as offered.
        for question in ("Template at dr", "DNS record clients use", "Route 53 hosted zone id",
                         "Database drflow checks", "Its login", "Its password"):
            wait_for(lambda q=question: asked(q), 10, question)  # type: ignore[misc]
            subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        wait_for(lambda: asked("Protect it? [y/N]:"), 30, "the plan and the confirmation")
        screen = _screen(session)
        assert "Protecting hr-prod as group hr" in screen
        assert "hr.db.lab.drflow.internal." in screen and "seed and cluster" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "n", "Enter"], check=True)
        wait_for(lambda: asked("EXIT=2"), 10, "the wizard's exit")
        assert "not confirmed; nothing was changed" in _screen(session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    assert (env.config.read_bytes(), _dr_vms(env)) == before


def test_rollback_leaves_vsphere_dns_and_the_config_as_before(env: Env) -> None:
    u = _lone(env, "hr")
    before = (env.config.read_bytes(), _dr_vms(env), _record(env, "hr"))
    r = _protect(env, "hr", "--yes", "--no-drill")
    assert r.returncode == 0, r.stderr
    assert "name: hr" in env.config.read_text() and _record(env, "hr") is not None
    assert u["standby"]["vm"] in _dr_vms(env)
    r = _protect(env, "hr", "--yes", "--rollback")
    assert r.returncode == 0, r.stderr
    assert (env.config.read_bytes(), _dr_vms(env), _record(env, "hr")) == before
    with env.connect(u["host"], u["port"]) as c:  # serving, waiting for no standby
        assert c.execute("show synchronous_standby_names").fetchone() == ("",)
        c.execute("create table if not exists after_rollback (i int)")
    # The gateway lets the group go: no failover of a group that is no longer protected.
    wait_for(lambda: "hr" not in env.groups_status(), 10, "the gateway dropping hr")


def _failed_at(r: subprocess.CompletedProcess[str], step: int, name: str, *hints: str) -> None:
    assert r.returncode == 1, r.stderr + r.stdout
    assert f"step {step}/7 ({name}) failed" in r.stderr, r.stderr
    for hint in hints:
        assert hint in r.stderr, r.stderr


def test_a_failure_at_each_step_is_named_a_rerun_continues_and_rollback_undoes_it(
        env: Env) -> None:
    from drflow.dns import point_record

    u = _lone(env, "pay")
    g = env.state["groups"][0]
    zone = g["dns"]["zone_id"]
    before = (env.config.read_bytes(), _dr_vms(env), _record(env, "pay"))
    # The standby goes on the host of the protected group's standby, to lose that host below.
    host = ["--standby-host", g["standby"]["esx_host"]]
    # 1. The guest refuses the login.
    r = _protect(env, "pay", "--yes", *host, "--guest-password-ref", "file:/etc/hostname")
    _failed_at(r, 1, "push the agent", "refused the login of 'root'",
               "run the same command again")
    # 2. The database asked for is not this VM's: the agent in it finds no such server.
    r = _protect(env, "pay", "--yes", *host, "--address", g["primary"]["host"],
                 "--port", str(g["primary"]["port"]))
    _failed_at(r, 2, "discover", "is not a database of this VM", "check `--address`")
    # 3. The DR host is lost to vCenter while the standby is made on it.
    faults.fail(env.lab_dir, "mgmt-loss", g["standby"]["vm"], not_responding_after=0.5)
    time.sleep(1)
    try:
        r = _protect(env, "pay", "--yes", *host)
        _failed_at(r, 3, "create the standby VM")
    finally:
        faults.heal(env.lab_dir)
    # 4. The primary's pg_hba.conf lets no replication in from the standby's address.
    hba = Path(u["datadir"]) / "pg_hba.conf"
    kept = hba.read_text()
    hba.write_text(f"host replication all {u['standby']['address']}/32 reject\n" + kept)
    with env.connect(u["host"], u["port"]) as c:
        c.execute("select pg_reload_conf()")
    try:
        r = _protect(env, "pay", "--yes", *host)
        _failed_at(r, 4, "seed and cluster", "pg_hba.conf")
    finally:
        hba.write_text(kept)
        with env.connect(u["host"], u["port"]) as c:
            c.execute("select pg_reload_conf()")
    # 5. The record clients use points somewhere else.
    record = "pay.db.lab.drflow.internal."
    point_record(env.route53(), zone, record, "198.18.0.99", u["port"])
    r = _protect(env, "pay", "--yes", *host)
    _failed_at(r, 5, "DNS", "points at 198.18.0.99", "choose another record")
    point_record(env.route53(), zone, record, u["host"], u["port"])  # the operator fixes it
    # 6. No orchestrator runs to take the group. Found through --state-dir, that is known before
    # anything changes; with PREFECT_API_URL exported, only when the gateway is waited for.
    env.stop_gateway()
    try:
        r = _protect(env, "pay", "--yes", *host)
        assert r.returncode == 2 and "no Prefect API" in r.stderr, r.stderr
        assert "start the orchestrator with `drflow up" in r.stderr
        assert "[1/7]" not in r.stderr
        r = _protect(env, "pay", "--yes", *host, prefect_api_url=os.environ["PREFECT_API_URL"])
        _failed_at(r, 6, "config", "has not heard", "`drflow up`")
    finally:
        env.start_gateway("up", timeout=120)
    # 7. The drill cannot pass: its work directory is where PostgreSQL may not enter.
    private = env.lab_dir / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    kept_config = env.config.read_text()
    env.config.write_text(kept_config.replace(f"work_dir: {env.lab_dir / 'drill'}",
                                              f"work_dir: {private / 'drill'}"))
    assert env.config.read_text() != kept_config
    try:
        r = _protect(env, "pay", "--yes", *host)
        _failed_at(r, 7, "prove it", "did not pass", "cannot enter")
    finally:
        env.config.write_text(kept_config)
    r = _protect(env, "pay", "--yes", *host)
    assert r.returncode == 0, r.stderr
    assert env.audit_records("drill.finish", "pay")[-1].outcome == "passed"
    r = _protect(env, "pay", "--yes", *host, "--rollback")
    assert r.returncode == 0, r.stderr
    import difflib

    diff = "".join(difflib.unified_diff(before[0].decode().splitlines(True),
                                        env.config.read_text().splitlines(True)))
    assert diff == "", diff + r.stdout
    assert _dr_vms(env) == before[1]


def test_unprotect_after_a_failover_leaves_the_serving_side_serving_alone(env: Env) -> None:
    """crm failed over above: its DR side serves. Unprotected, it keeps serving and no longer
    waits for a standby; the group is out of the config and the gateway; no agent runs."""
    u = _lone(env, "crm")
    standby = u["standby"]
    assert "crm" in env.groups_status(), "crm is protected by the test above"
    etcd = Client(env.state["etcd"]["endpoints"], 2.0)
    assert etcd.get(sync_key("crm")) is not None, "crm's primary should have written its sync key"
    argv = [*env.orchestrator_prefix, DRFLOW, "unprotect", "crm", "--config", str(env.config),
            "--guest-password-ref", f"file:{env.lab_dir / 'secrets' / 'guest_password'}", "--yes"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "group crm removed" in r.stdout and f"the agent removed from {standby['vm']}" in r.stdout
    assert "name: crm" not in env.config.read_text()
    assert "crm" not in env.groups_status()
    assert "the sync key /drflow/groups/crm/sync removed from etcd" in r.stdout
    assert etcd.get(sync_key("crm")) is None
    with env.connect(standby["address"], u["port"]) as c:
        assert c.execute("show synchronous_standby_names").fetchone() == ("",)
        c.execute("create table after_unprotect (i int)")
    assert standby["vm"] in _dr_vms(env)  # kept, with its data, unless --remove-standby
    time.sleep(4)  # longer than the heartbeat timeout: nothing may follow
    assert len(env.audit_records("failover.start", "crm")) == 1
