"""`drflow protect` on the lab: a lone database VM made a protected pair under a steady writer,
through the orchestrator's own vCenter, Tools, Route 53 and config; then failed over like any
other group. And what it refuses, and what `--rollback` leaves."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from drflow.dns import resolve_endpoint
from lab import faults, vcsim
from lab.harness import ServerWriter
from tests.harness import DRFLOW, Env, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def env(prefect_api: str) -> Iterator[Env]:
    e = start_env(groups=1, replication="sync", gateway=False, unprotected=["crm", "hr"])
    try:
        e.start_gateway("up", timeout=120)
        e.wait_all_heard()
        yield e
    finally:
        stop_env(e)


def _lone(env: Env, name: str) -> dict[str, Any]:
    return next(u for u in env.state["unprotected"] if u["name"] == name)


def _protect(env: Env, name: str, *extra: str, timeout: float = 300) -> \
        subprocess.CompletedProcess[str]:
    u = _lone(env, name)
    argv = [*env.orchestrator_prefix, DRFLOW, "protect", u["vm"], "--config", str(env.config),
            "--state-dir", str(env.state_dir), "--address", u["host"], "--port", str(u["port"]),
            "--standby-address", u["standby"]["address"],
            "--standby-host", u["standby"]["esx_host"],
            "--guest-password-ref", f"file:{env.lab_dir / 'secrets' / 'guest_password'}",
            *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


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
