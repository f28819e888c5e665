"""A manual failover (`drflow failover`, `auto_failover: false`) on the lab: real agents, a real
gateway process, vcsim, PostgreSQL, moto and Prefect.

- it needs no --force for a synchronous standby that was streaming (the gateway's evidence);
- it moves the gateway's roles record like an automatic one;
- the old primary's VM powered on again never answers as a writable primary, also when the
  gateway's state was lost and its record fell back to "home serves";
- it and the gateway's re-protect runs queue on the group's `roles-<group>` lock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from drflow.config import ConfigError, load_config
from lab import procs, vcsim
from lab.harness import takes_write
from tests.harness import DRFLOW, Env, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab

POLL_S = 30.0


@pytest.fixture
def env(prefect_api: str) -> Iterator[Env]:
    """One sync group, agents heartbeating, `drflow gateway` with auto_failover off."""
    e = start_env(groups=1, replication="sync", gateway=False)
    try:
        cfg = yaml.safe_load(e.config.read_text())
        for g in cfg["groups"]:
            g["policy"]["auto_failover"] = False
        e.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        e.start_gateway()
        e.wait_all_heard()
        yield e
    finally:
        stop_env(e)


def _roles(env: Env) -> dict[str, Any]:
    return dict(httpx.get(f"{env.gateway_url}/v1/groups/orders/roles", timeout=5).json())


def _failover_cli(env: Env, config: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DRFLOW, "failover", "orders", "--config", str(config or env.config), "--state-dir",
         str(env.state_dir), "--reason", "test: prod VM powered off"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _poll_no_second_writer(env: Env, old: dict[str, Any], new: dict[str, Any]) -> tuple[int, int]:
    """Probe both nodes for POLL_S seconds (each probe bounded); (polls, polls where the old
    primary took a write while the promoted one did too)."""
    polls, both = 0, 0
    deadline = time.monotonic() + POLL_S
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        old_w = takes_write(env, old)
        new_w = takes_write(env, new)
        assert time.monotonic() - t0 < 10, "a probe was not bounded"
        polls += 1
        both += old_w and new_w
        time.sleep(0.2)
    return polls, both


def _reprotected(env: Env, after: int) -> bool:
    done = [r for r in env.audit_records("reprotect.finish", "orders") if r.outcome == "ok"]
    return len(done) > after


def test_manual_failover_moves_the_roles_and_the_old_primary_never_takes_writes(
        env: Env) -> None:
    from flows.locks import exclusive, roles_limit
    from flows.runtime import runtime

    g = env.group("orders")
    prod, dr = g["primary"], g["standby"]
    seq = _roles(env)["seq"]
    vcsim.power_off(env.si(), prod["vm"])
    time.sleep(4)  # past heartbeat_timeout_s: with auto_failover off the gateway only alerts
    assert env.audit_records("failover.start", "orders") == []

    # The runbook runs where `gateway.listen` is only a bind address (0.0.0.0: nothing of the
    # gateway's there): it reaches the gateway at `gateway.url`.
    cfg = yaml.safe_load(env.config.read_text())
    cfg["gateway"]["listen"] = f"0.0.0.0:{procs.free_port()}"
    cfg["gateway"]["url"] = env.gateway_url
    worker_config = env.lab_dir / "worker.yaml"
    worker_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # No --force: the standby was the synchronous standby, and the gateway says so.
    proc = _failover_cli(env, worker_config)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    lag = env.audit_records("failover.check standby lag", dr["vm"])[-1]
    assert lag.outcome == "ok" and "synchronous standby" in lag.reason, lag.reason
    assert lag.parameters["result"]["evidence_source"].startswith("gateway"), lag.parameters

    # The roles record moved exactly like an automatic failover's.
    roles = _roles(env)
    assert (roles["primary_site"], roles["protected"], roles["transition"]) == ("dr", False, None)
    assert roles["seq"] == seq + 1 and not roles["in_transition"]
    assert [r.outcome for r in env.audit_records("failover.record the new roles", "orders")
            if r.outcome != "started"] == ["ok"]

    # The old VM comes back while the test holds the group's lock: the gateway's re-protect run
    # (in the gateway's own process) waits for it, and the old primary stays held down.
    done = len([r for r in env.audit_records("reprotect.finish", "orders") if r.outcome == "ok"])
    with exclusive(roles_limit("orders"), etcd=runtime(str(env.config)).etcd):
        vcsim.power_on(env.si(), prod["vm"])
        polls, both = _poll_no_second_writer(env, prod, dr)
        assert env.audit_records("reprotect.start", "orders") == [], \
            "re-protect started while another run held roles-orders"
    assert polls > 20 and both == 0, f"{both} of {polls} polls saw two writable primaries"
    wait_for(lambda: _reprotected(env, done), 120, "old primary re-protected by the gateway")
    roles = _roles(env)
    assert (roles["primary_site"], roles["protected"]) == ("dr", True)
    assert not takes_write(env, prod) and takes_write(env, dr)


def test_after_the_gateway_lost_its_state_the_old_primary_still_never_takes_writes(
        env: Env) -> None:
    from flows.locks import exclusive, roles_limit
    from flows.runtime import runtime

    g = env.group("orders")
    prod, dr = g["primary"], g["standby"]
    _in_process_failover_waits_for_the_lock(env)
    vcsim.power_off(env.si(), prod["vm"])
    time.sleep(4)

    # Another run holds the group's lock: `drflow failover` waits for it, touching nothing.
    starts = len(env.audit_records("failover.start", "orders"))
    with exclusive(roles_limit("orders"), etcd=runtime(str(env.config)).etcd):
        proc = _failover_cli(env)
        time.sleep(8)
        assert proc.poll() is None, "drflow failover did not wait for roles-orders"
        assert len(env.audit_records("failover.start", "orders")) == starts
        released = time.time()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    start = env.audit_records("failover.start", "orders")[-1]
    assert datetime.fromisoformat(start.time).timestamp() >= released - 0.5

    # The gateway loses its state directory: its record falls back to "home serves".
    env.stop_gateway()
    shutil.rmtree(env.state_dir / "gateway.db", ignore_errors=True)
    for p in env.state_dir.glob("gateway.db*"):
        p.unlink()
    env.start_gateway()
    assert _roles(env)["primary_site"] == "prod"

    done = len([r for r in env.audit_records("reprotect.finish", "orders") if r.outcome == "ok"])
    vcsim.power_on(env.si(), prod["vm"])
    polls, both = _poll_no_second_writer(env, prod, dr)
    assert polls > 20 and both == 0, f"{both} of {polls} polls saw two writable primaries"
    # The held agent's report corrects the record; the gateway re-protects the old primary.
    wait_for(lambda: _reprotected(env, done), 120, "old primary re-protected by the gateway")
    roles = _roles(env)
    assert (roles["primary_site"], roles["protected"]) == ("dr", True)
    assert not takes_write(env, prod) and takes_write(env, dr)


def _in_process_failover_waits_for_the_lock(env: Env) -> None:
    """The embedded runner's path: the flow called in a thread of a process (the gateway's, in
    `drflow up`) queues on the group's lock too."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.failover import failover
    from flows.locks import exclusive, roles_limit
    from flows.runtime import runtime

    result: dict[str, Any] = {}

    def run() -> None:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            result.update(failover("orders", {"reason": "test: healthy primary"},
                                   config_path=str(env.config)))

    with exclusive(roles_limit("orders"), etcd=runtime(str(env.config)).etcd):
        t = threading.Thread(target=run, daemon=True)
        t.start()
        time.sleep(6)
        assert t.is_alive() and env.audit_records("failover.start", "orders") == [], \
            "the in-process failover did not wait for roles-orders"
    t.join(60)
    assert not t.is_alive()
    # The primary is healthy: once it had the lock, the run refused to fail it over.
    assert result.get("outcome") == "not_confirmed", result


def test_config_check_refuses_a_wildcard_listen_without_a_url(tmp_path: Path) -> None:
    example = (Path(__file__).parents[1] / "examples" / "drflow.yaml").read_text()
    os.environ.setdefault("DRFLOW_WEBHOOK_SECRET", "x")
    wildcard = tmp_path / "wildcard.yaml"
    wildcard.write_text(example.replace('listen: "127.0.0.1:8088"', 'listen: "0.0.0.0:8088"', 1))
    with pytest.raises(ConfigError, match=r"set gateway\.url"):
        load_config(wildcard)
    with_url = tmp_path / "with_url.yaml"
    with_url.write_text(example.replace(
        'listen: "127.0.0.1:8088"',
        'listen: "0.0.0.0:8088"\n  url: "https://gateway.dr.example.com:8443/"', 1))
    assert load_config(with_url).gateway.client_url == "https://gateway.dr.example.com:8443"
    assert load_config(Path(__file__).parents[1] / "examples" / "drflow.yaml"
                       ).gateway.client_url == "http://127.0.0.1:8088"


def test_the_gateway_hands_its_replication_evidence_only_signed(tmp_path: Path) -> None:
    """What a manual failover reads instead of `--force`: the failed primary's last heartbeats,
    over a signed request, in a signed answer that echoes the caller's nonce."""
    from pydantic import SecretStr

    from tasks.gateway import EvidenceUnavailable, fetch_evidence
    from tests.test_gateway import PRIMARY, SECRET, event, make_settings, post, running_gateway

    with running_gateway(make_settings(tmp_path / "gw.sqlite")) as gw:
        hb = event("heartbeat", details={"postgres": {
            "role": "primary", "wal_lsn": "0/3000060",
            "replicas": [{"application_name": "b", "state": "streaming", "sync_state": "sync"}]}})
        assert post(gw.url, hb).status_code == 202
        ev = fetch_evidence(gw.url, SecretStr(SECRET), "g1", PRIMARY)
        assert ev["sync_standby_streaming"] is True and ev["primary_last_lsn"] == 0x3000060
        assert ev["agent_id"] == PRIMARY and time.time() - ev["last_heard_at"] < 30
        assert fetch_evidence(gw.url, SecretStr(SECRET), "g1", "pg-b").get(
            "sync_standby_streaming") is None  # nothing heard from it: no evidence
        with pytest.raises(EvidenceUnavailable, match="401"):
            fetch_evidence(gw.url, SecretStr("not-the-secret"), "g1", PRIMARY)
        assert httpx.get(f"{gw.url}/v1/groups/g1/evidence",
                         params={"agent_id": PRIMARY}, timeout=5).status_code == 401
        with pytest.raises(EvidenceUnavailable, match="404"):
            fetch_evidence(gw.url, SecretStr(SECRET), "nope", PRIMARY)
