"""Failover safety rules that need their own lab: fencing, the RPO budget, crash and re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from drflow.dns import resolve_endpoint
from lab import faults, vcsim
from tests.harness import Env, Writer, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab

STEPS = ["confirm failure", "tell the gateway roles are moving", "fence old primary",
         "check standby lag", "take over the leader key", "promote standby",
         "record the new primary in the sync key", "relax synchronous replication",
         "record the new roles", "point DNS at the new primary", "verify a write through DNS"]






def _break_primary(env: Env, g: dict[str, Any]) -> None:
    """Application loss beyond local repair: the data directory is gone and the server dead."""
    datadir = Path(g["primary"]["datadir"])
    pid = int((datadir / "postmaster.pid").read_text().split()[0])
    datadir.rename(datadir.with_name(datadir.name + ".gone"))
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sync_env(prefect_api: str) -> Iterator[Env]:
    e = start_env(groups=1, replication="sync")
    try:
        yield e
    finally:
        stop_env(e)


def test_no_promotion_when_the_fence_result_is_unknown(sync_env: Env) -> None:
    env, g = sync_env, sync_env.state["groups"][0]
    vcsim_pid = env.state["processes"]["vcsim-prod"]
    # No proof at all: vCenter hangs (power state unknown, a power-off never completes) and etcd
    # does not answer (no lease can be read). With etcd up, the agent's released lease would be
    # the fence (docs/fencing.md rule 7).
    faults.fail(env.lab_dir, "etcd-down", "all", hang=True)
    os.kill(vcsim_pid, signal.SIGSTOP)
    try:
        _break_primary(env, g)
        try:
            rec = wait_for(lambda: env.audit_records("failover.finish", g["name"]), 90,
                           "failover stopped")[-1]
        except TimeoutError as exc:
            agents = [g["primary"]["vm"], g["standby"]["vm"]]
            raise AssertionError(f"{exc}\n{env.explain(g['name'], agents, lines=40)}") from None
    finally:
        os.kill(vcsim_pid, signal.SIGCONT)
        faults.heal(env.lab_dir)
    assert rec.outcome == "not_fenced", rec.reason
    assert "no promotion without a fence" in rec.reason
    assert f"drflow failover {g['name']} --declare-fenced --reason TEXT" in rec.reason
    assert not env.writable(g["standby"])
    assert env.audit_records("failover.promote standby") == []
    assert resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"]) == (
        g["primary"]["host"], g["primary"]["port"])


def _disable_method(env: Env, vm: str, method: str, enable: bool = False) -> None:
    """Make the lab's vCenter refuse `method` on `vm` with MethodDisabled (launcher hook)."""
    base = env.state["vcenter"]["url"].rsplit("/sdk", 1)[0]
    r = httpx.post(f"{base}/drflow/disabled-methods", timeout=5,
                   params={"vm": vm, "method": method, **({"enable": "1"} if enable else {})})
    r.raise_for_status()


def test_no_promotion_when_the_fence_fails(sync_env: Env) -> None:
    """vCenter refuses the power-off (the method is disabled on that VM, as a backup product or
    an administrator can do on a real vCenter): the VM stays on, nothing is promoted."""
    from flows import failover as failover_flow

    env, g = sync_env, sync_env.state["groups"][0]
    env.stop_gateway()  # this run is started by hand
    _disable_method(env, g["primary"]["vm"], "PowerOffVM_Task")
    # And no lease to prove it either (docs/fencing.md rule 7): etcd does not answer.
    faults.fail(env.lab_dir, "etcd-down", "all", hang=True)
    try:
        _break_primary(env, g)
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            result = failover_flow.failover(g["name"], {"reason": "test"},
                                            config_path=str(env.config))
    finally:
        faults.heal(env.lab_dir)
    assert result["outcome"] == "not_fenced"
    assert "no promotion without a fence" in result["reason"]
    assert "MethodDisabled" in result["reason"]
    assert vcsim.vm_power_state(env.si(), g["primary"]["vm"]) == "poweredOn"
    assert not env.writable(g["standby"])
    assert env.audit_records("failover.promote standby") == []


def test_rpo_budget_refuses_without_force_and_force_is_audited(prefect_api: str) -> None:
    env = start_env(groups=1, replication="async")
    try:
        g = env.state["groups"][0]
        # Cut the standby off its primary for real, while writes go on.
        with env.connect(g["standby"]["host"], g["standby"]["port"]) as c:
            c.execute("alter system set primary_conninfo = ''")
            c.execute("select pg_reload_conf()")
        writer = Writer(env, g["name"]).start()
        time.sleep(8)  # beyond the 5 s RPO budget
        vcsim.power_off(env.si(), g["primary"]["vm"])
        rec = wait_for(lambda: env.audit_records("failover.finish", g["name"]), 60,
                       "failover stopped")[-1]
        writer.stop()
        assert rec.outcome == "refused", rec.reason
        assert "exceeds the RPO budget" in rec.reason and "force" in rec.reason
        assert not env.writable(g["standby"])

        out = subprocess.run(
            [str(Path(sys.executable).parent / "drflow"), "failover", g["name"], "--config",
             str(env.config), "--force", "--reason", "accepting the loss: test"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert env.writable(g["standby"])
        lag = env.audit_records("failover.check standby lag", g["standby"]["vm"])
        assert lag[-1].reason.startswith("override")
    finally:
        stop_env(env)


CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from flows import run as run_mod
    from flows.failover import failover

    crash_after = sys.argv[3]
    original = run_mod.RunbookRun.step

    def step(self, name, target, params=None):
        cm = original(self, name, target, params)
        class Crashing:
            def __enter__(self):
                return cm.__enter__()
            def __exit__(self, *exc):
                out = cm.__exit__(*exc)
                if name == crash_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # the process dies at the boundary
                return out
        return Crashing()

    run_mod.RunbookRun.step = step
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        print(failover(sys.argv[1], {"reason": "crash test", "evidence":
              {"sync_standby_streaming": True}}, config_path=sys.argv[2]))
""")


def test_rerun_after_a_crash_at_every_step_boundary_promotes_once(prefect_api: str) -> None:
    env = start_env(groups=1, replication="sync", agents=False, gateway=False)
    try:
        g = env.state["groups"][0]
        vcsim.power_off(env.si(), g["primary"]["vm"])
        script = env.lab_dir / "crashing_run.py"
        script.write_text(CRASHING_RUN)
        for step in [*STEPS, "none"]:
            out = subprocess.run([sys.executable, str(script), g["name"], str(env.config), step],
                                 capture_output=True, text=True, timeout=120,
                                 cwd=Path(__file__).resolve().parent.parent)
            if step == "none":
                assert out.returncode == 0, out.stdout + out.stderr
                assert "failed_over" in out.stdout
            else:
                assert out.returncode == -signal.SIGKILL, (step, out.stdout + out.stderr)
            # Never two writable primaries, at any boundary.
            assert not (env.writable(g["primary"]) and env.writable(g["standby"]))
        promotions = [r for r in env.audit_records("failover.promote standby")
                      if r.outcome == "ok"]
        assert [r.reason for r in promotions].count("promoted") == 1
        assert len(promotions) >= 2  # later runs saw "already a primary"
        with env.connect(g["standby"]["host"], g["standby"]["port"]) as c:
            row = c.execute("select count(*) from pg_ls_waldir() where name like '%.history'"
                            ).fetchone()
        assert row == (1,)  # one new timeline: one promotion
        assert resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"]) == (
            g["standby"]["host"], g["standby"]["port"])
    finally:
        stop_env(env)


def test_a_failover_interrupted_by_ctrl_c_resumes_at_the_next_start(prefect_api: str) -> None:
    env = start_env(groups=1, replication="sync")
    try:
        g = env.state["groups"][0]
        vcsim.power_off(env.si(), g["primary"]["vm"])
        time.sleep(1.0)  # the power bridge has killed the host's processes
        vcsim_pid = env.state["processes"]["vcsim-prod"]
        os.kill(vcsim_pid, signal.SIGSTOP)  # holds the run inside its first step
        try:
            wait_for(lambda: env.audit_records("failover.confirm failure"), 30, "the run to start")
            assert env.gateway is not None
            env.gateway.send_signal(signal.SIGINT)  # Ctrl-C
            # Its run and its host watch are held in the frozen vCenter: every call there is
            # bounded and their threads do not hold the exit (a login once hung it for ever).
            env.gateway.wait(60)
            env.gateway = None
        finally:
            os.kill(vcsim_pid, signal.SIGCONT)
        assert env.audit_records("failover.finish") == []
        env.start_gateway()
        rec = wait_for(lambda: env.audit_records("failover.finish", g["name"]), 60,
                       "the resumed failover")[-1]
        assert rec.outcome == "ok", rec.reason
        keys = {r.parameters.get("idempotency_key") for r in env.audit_records("incident.start")}
        assert keys == {f"failover:{g['name']}:1"}  # the same incident, not a new one
        assert env.writable(g["standby"])
        promoted = [r for r in env.audit_records("failover.promote standby") if r.outcome == "ok"]
        assert [r.reason for r in promoted] == ["promoted"]
    finally:
        stop_env(env)


def test_an_async_failover_within_its_budget_needs_no_force(prefect_api: str) -> None:
    """Asynchronous replication, streaming, under write load: the primary's host is lost and the
    gateway's failover (never forced) promotes, because the heartbeats' LSN history puts the
    standby's lag within the RPO budget."""
    env = start_env(groups=1, replication="async")
    try:
        g = env.state["groups"][0]
        writer = Writer(env, g["name"]).start()
        time.sleep(3)  # a few heartbeats carrying the primary's LSN while writes go on
        vcsim.power_off(env.si(), g["primary"]["vm"])
        rec = wait_for(lambda: env.audit_records("failover.finish", g["name"]), 60,
                       "failover finished")[-1]
        writer.stop()
        assert rec.outcome == "ok", rec.reason
        start = env.audit_records("failover.start", g["name"])[-1]
        assert start.parameters["force"] is False
        lag = [r for r in env.audit_records("failover.check standby lag", g["standby"]["vm"])
               if r.outcome != "started"][-1]
        assert lag.outcome == "ok" and "within the RPO budget" in lag.reason, lag.reason
        assert "override" not in lag.reason
        assert env.writable(g["standby"])
        lost = writer.lost(g["standby"]["host"], g["standby"]["port"])
        print(f"async failover: lag {lag.reason!r}; {len(lost)} of {len(writer.acked)} "
              "acknowledged writes lost")
    finally:
        stop_env(env)
