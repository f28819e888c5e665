"""Failover fencing on the lab (docs/fencing.md rule 7): the lease, stuns, no fence, attested.

Real agents holding leader leases in the lab's etcd, the gateway, vcsim with its host-loss and
stun faults, PostgreSQL, moto, the Slack stand-in.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from drflow.dns import resolve_endpoint
from drflow.etcd import Client
from drflow.leader_keys import Leader, leader_key
from flows.etcd_lock import UNREACHABLE_S
from lab import faults
from lab.labconfig import STUN_GRACE_S
from lab.slack_standin import SlackLab
from tests.harness import Env, Writer, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture
def env(prefect_api: str) -> Iterator[Env]:
    e = start_env(groups=1, replication="sync")
    try:
        yield e
    finally:
        faults.heal(e.lab_dir)
        stop_env(e)


def _etcd(env: Env) -> Client:
    return Client(list(env.state["etcd"]["endpoints"]), timeout=2)


def _leader(env: Env, group: str) -> Leader | None:
    raw = _etcd(env).get(leader_key(group))
    return Leader.decode(raw) if raw else None


def _finished(env: Env, group: str, timeout: float = 60) -> Any:
    return wait_for(lambda: env.audit_records("failover.finish", group), timeout,
                    f"failover of {group} finished")[-1]


def _dump(env: Env) -> None:
    """The failover's closing records, for the test log."""
    for r in env.audit_records():
        if r.action.startswith("failover.") and r.outcome != "started":
            print(r.time, r.action, r.outcome, r.duration_s, r.reason[:300],
                  r.parameters.get("result"))


def _step(env: Env, name: str, target: str | None = None) -> Any:
    recs = [r for r in env.audit_records(f"failover.{name}", target)
            if r.outcome != "started"]
    assert recs, f"no closing audit record of {name}"
    return recs[-1]


def test_host_loss_fails_over_by_the_lease_without_waiting_for_vsphere(env: Env) -> None:
    g = env.group(env.state["groups"][0]["name"])
    name, primary, standby = g["name"], g["primary"], g["standby"]
    wait_for(lambda: (ld := _leader(env, name)) is not None and ld.agent_id == primary["vm"],
             20, "the primary's agent holds the leader key")
    writer = Writer(env, name).start()
    time.sleep(1.0)
    t0 = time.time()  # the fault's `at` is taken after the kill: measure from before it
    f = faults.fail(env.lab_dir, "host-loss", primary["vm"])
    rec = _finished(env, name)
    _dump(env)
    assert rec.outcome == "ok", rec.reason
    # The writer's connection to the silent old address may hang (libpq without
    # tcp_user_timeout): only what it had acknowledged counts.
    writer.stop()
    fence = _step(env, "fence old primary", primary["vm"])
    assert fence.outcome == "ok" and fence.parameters["result"]["fence"] == "lease", fence.reason
    assert "lease fence" in fence.reason
    ev = fence.parameters["result"]
    assert ev["etcd"]["lease_absent_since"] and ev["etcd"]["revision"]
    assert ev["standby_receiver"] is not None
    takeover = _step(env, "take over the leader key", name)
    assert takeover.outcome == "ok" and takeover.parameters["result"]["succeeded"]
    # The power-off after the takeover cannot complete on a lost host: audited, not waited for.
    power = _step(env, "power off the old primary (after the takeover)", primary["vm"])
    assert power.outcome == "failed"
    assert writer.lost(standby["host"], standby["port"]) == []
    verified = _step(env, "verify a write through DNS")
    rto = datetime.fromisoformat(verified.time).timestamp() - t0
    print(f"host-loss at {t0:.3f} (took effect {f.at - t0:.2f} s later), verified "
          f"{verified.time}: RTO {rto:.2f} s (the fence waited {ev['waited_s']} s)")
    assert rto < 3 + 3  # lease_s + 3: the target is lease_s + 1.5 on a quiet machine
    assert resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"]) == (
        standby["host"], standby["port"])


def test_a_partitioned_prod_is_taken_over_left_powered_on_and_reprotected_after_the_heal(
        env: Env) -> None:
    """Prod cut off (the etcd majority is DR + witness): a lease takeover; prod's vCenter is
    unreachable, so no power-off is sent (it would land at the heal); after the heal the fenced
    old primary reports in and the gateway re-protects it."""
    from lab import vcsim

    g = env.group(env.state["groups"][0]["name"])
    name, primary, standby = g["name"], g["primary"], g["standby"]
    wait_for(lambda: (ld := _leader(env, name)) is not None and ld.agent_id == primary["vm"],
             20, "the primary's agent holds the leader key")
    faults.fail(env.lab_dir, "partition", "prod")
    rec = _finished(env, name)
    _dump(env)
    assert rec.outcome == "ok", rec.reason
    assert _step(env, "fence old primary", primary["vm"]).parameters["result"]["fence"] == "lease"
    power = _step(env, "power off the old primary (after the takeover)", primary["vm"])
    assert power.outcome == "skipped" and "vCenter did not answer" in power.reason, power.reason
    assert env.writable(standby)
    healed = time.time()
    faults.heal(env.lab_dir)
    wait_for(lambda: [r for r in env.audit_records("reprotect.finish", name)
                      if r.outcome == "ok"], 120, "the old primary re-protected after the heal")
    print(f"re-protected {time.time() - healed:.1f} s after the heal")
    assert vcsim.vm_power_state(env.si(), primary["vm"]) == "poweredOn"
    assert not env.writable(primary) and env.writable(standby)


def test_a_lost_dr_site_is_reported_by_the_witness_sites_gateway_while_prod_serves(
        env: Env) -> None:
    """The DR site dies with its gateway, its etcd member and the standby: prod keeps its key
    (prod + witness are the majority), relaxes sync through the sync key and keeps acknowledging
    writes; its agent hands its events to the gateway replica at the witness site, which posts
    the alert while the site is still down."""
    g = env.group(env.state["groups"][0]["name"])
    name, primary = g["name"], g["primary"]
    env.start_gateway_replica()
    wait_for(lambda: (ld := _leader(env, name)) is not None and ld.agent_id == primary["vm"],
             20, "the primary's agent holds the leader key")
    writer = Writer(env, name).start()
    time.sleep(1.0)
    t0 = time.time()
    faults.fail(env.lab_dir, "site-loss", "dr")
    alert = wait_for(lambda: [r for r in env.audit_records("incident.alert", name)
                              if r.parameters.get("kind") == "sync_relaxed"
                              and r.outcome == "alerted"], 30, "the sync_relaxed alert")[0]
    alerted_s = datetime.fromisoformat(alert.time).timestamp() - t0
    acked = len(writer.acked)
    time.sleep(2.0)
    writer.stop()
    print(f"DR site lost: alerted after {alerted_s:.1f} s; {len(writer.acked) - acked} writes "
          "acknowledged in the 2 s after the alert")
    assert env.replica is not None and env.replica.poll() is None
    assert len(writer.acked) > acked  # prod serves, unprotected
    assert env.writable(primary)
    assert not [r for r in env.audit_records("failover.finish", name) if r.outcome == "ok"]
    msgs = json.dumps(SlackLab(env.state["slack"]["url"]).messages())
    assert "relaxed synchronous replication" in msgs, msgs[-2000:]


def test_a_stun_with_a_snapshot_task_is_waited_out_without_a_power_off(env: Env) -> None:
    g = env.group(env.state["groups"][0]["name"])
    name, primary = g["name"], g["primary"]
    wait_for(lambda: (ld := _leader(env, name)) is not None and ld.agent_id == primary["vm"],
             20, "the primary's agent holds the leader key")
    faults.fail(env.lab_dir, "stun", primary["vm"], seconds=5, task="snapshot")  # blocks 5 s
    time.sleep(STUN_GRACE_S)  # whatever started meanwhile has ended by then
    _dump(env)
    finished = env.audit_records("failover.finish", name)
    for rec in finished:
        assert rec.outcome == "reacquired", rec.reason
    assert not any(r.outcome == "ok" for r in env.audit_records("failover.promote standby"))
    assert env.writable(primary)
    assert not env.writable(g["standby"])
    fences = [r for r in env.audit_records("failover.fence old primary")
              if r.outcome != "started"]
    for r in fences:
        assert r.parameters["result"]["power_off"] is None, r.parameters
        assert r.outcome == "refused"


def _no_etcd_config(env: Env, tmp: Path) -> Path:
    """The lab's config with etcd at an address where nothing answers (the majority is lost)."""
    cfg = yaml.safe_load(env.config.read_text())
    cfg["etcd"] = {"endpoints": ["http://127.0.0.1:9"], "timeout_s": 0.3}
    path = tmp / "drflow-no-etcd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def quiet_env(prefect_api: str) -> Iterator[Env]:
    """A lab without the gateway: the runbook is run here, as `drflow failover` would."""
    e = start_env(groups=1, replication="sync", gateway=False)
    try:
        yield e
    finally:
        stop_env(e)


def _attest_request(slack: SlackLab, group: str) -> dict[str, Any] | None:
    return next((m for m in slack.messages()
                 if m.get("text") == f"Failover of {group}: attestation needed"), None)


def test_no_fence_provable_stops_naming_declare_fenced_then_attested_fails_over(
        quiet_env: Env, tmp_path: Path) -> None:
    """Site loss with the etcd majority gone: vCenter hangs, etcd does not answer. The failover
    stops `not_fenced` and names the command; with it, two approvers attest and it fails over."""
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from drflow.approval import Ledger, answer
    from flows.failover import failover

    env = quiet_env
    g = env.group(env.state["groups"][0]["name"])
    name, primary, standby = g["name"], g["primary"], g["standby"]
    cfg = yaml.safe_load(env.config.read_text())
    cfg["etcd"] = {"endpoints": ["http://127.0.0.1:9"], "timeout_s": 0.3}  # no majority
    cfg["groups"][0]["policy"]["approvals_required"] = 2
    config = tmp_path / "drflow.yaml"
    config.write_text(yaml.safe_dump(cfg))
    approvers = list(cfg["groups"][0]["policy"]["approvers"])
    vcsim_pid = env.state["processes"]["vcsim-prod"]
    faults.fail(env.lab_dir, "guest-crash", primary["vm"])
    os.kill(vcsim_pid, signal.SIGSTOP)  # prod's vCenter gone with the site
    incident = {"reason": "site loss", "primary_vm": primary["vm"],
                "evidence": {"sync_standby_streaming": True}}
    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            t0 = time.monotonic()
            result = failover(name, incident, config_path=str(config))
            stopped_in = time.monotonic() - t0
            assert result["outcome"] == "not_fenced", result
            assert f"drflow failover {name} --declare-fenced --reason TEXT" in result["reason"]
            # Its parts: the runbook lock waits out UNREACHABLE_S for an etcd member before it
            # queues on Prefect's limit instead, then the hung vCenter's and etcd's timeouts.
            assert stopped_in < 6 + UNREACHABLE_S, stopped_in
            slack = SlackLab(env.state["slack"]["url"].removesuffix("/api/"))
            assert any("--declare-fenced" in m.get("text", "") for m in slack.messages())
            assert not env.writable(standby)

            box: list[dict[str, Any]] = []
            runner = threading.Thread(target=lambda: box.append(failover(
                name, incident, config_path=str(config), declare_fenced="prod site lost: "
                "power cut confirmed by the facility", approval_timeout_s=120)), daemon=True)
            runner.start()
            req = wait_for(lambda: _attest_request(slack, name), 30, "the attestation request")
            text = json.dumps(req.get("blocks"))
            assert "can no longer acknowledge writes: powered off, isolated, or destroyed" \
                in text and primary["vm"] in text
            button = next(e for b in req["blocks"] if b["type"] == "actions"
                          for e in b["elements"])
            run_id = json.loads(button["value"])["run"]
            assert not env.writable(standby)  # nothing happens before the approvals
            # The request is posted just before the run pauses; the gateway refuses a click on
            # a run that is not paused yet (`the run is Running`), so the clicks come after.
            from prefect.client.orchestration import get_client

            def paused() -> bool:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(run_id).state
                return bool(state and state.is_paused())

            wait_for(paused, 30, "the attested run paused for its approvals")
            # What the gateway sends once both approvers clicked (drflow.approval.answer).
            secret = env.state["secrets"]["webhook"].encode()
            ledger = Ledger(approvals=tuple(approvers), decided="approved",
                            decided_by=tuple(approvers))
            resume_flow_run(run_id, run_input=answer(ledger, run_id, secret))
            runner.join(60)
    finally:
        os.kill(vcsim_pid, signal.SIGCONT)
    assert box and box[0]["outcome"] == "failed_over", box
    assert box[0]["fence"] == "attested"
    assert env.writable(standby)
    fence = [r for r in env.audit_records("failover.fence old primary")
             if r.outcome == "ok"][-1]
    assert fence.parameters["result"]["fence"] == "attested"
    assert "attested that" in fence.reason and approvers[0] in fence.reason
