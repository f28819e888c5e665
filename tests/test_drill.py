"""DR drills: pure decisions, then real drills on the shared lab, then a scheduled drill run by a
Prefect process worker from prefect.yaml.

The scheduled drill (group `payments`, every minute) is deployed when the module starts and
checked by the last test, so the wait for the next minute overlaps the other tests, which drill
`orders` only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from typer.testing import CliRunner

from flows.decisions import Decision
from flows.drill_decisions import (
    copy_plan,
    copy_verified,
    dns_sane,
    drill_outcome,
    isolation_proven,
    readiness,
    replication_ready,
    teardown_clean,
)
from orchestrator.drill_cli import app as drill_app
from orchestrator.drill_cli import drill_rows, summary, with_schedules
from tasks.drill_checks import CopyFacts, ReplicationFacts
from tasks.vsphere import IsolationFacts

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
GROUP = "orders"  # drilled by the tests here
SCHEDULED = "payments"  # drilled by the scheduled deployment meanwhile

# --- pure decisions -------------------------------------------------------------------------------

PRIMARY = "10.0.0.1:5432"
HEALTHY = ReplicationFacts(standby_in_recovery=True, sender=PRIMARY, state="streaming",
                           sync_state="sync", lag_s=0.2, lag_bytes=120)


@pytest.mark.parametrize(("facts", "proceed", "words"), [
    (HEALTHY, True, "within the RPO budget of 5 s"),
    (ReplicationFacts(error="primary x: connection refused"), False, "connection refused"),
    (ReplicationFacts(standby_in_recovery=False), False, "not in recovery"),
    (ReplicationFacts(standby_in_recovery=True, sender="10.9.9.9:5432", state="streaming"),
     False, "not from the configured primary 10.0.0.1:5432"),
    (ReplicationFacts(standby_in_recovery=True, sender=PRIMARY, state="catchup"), False,
     "state catchup, not streaming"),
    (ReplicationFacts(standby_in_recovery=True, sender=PRIMARY, state="streaming",
                      sync_state="async", lag_s=0.0, lag_bytes=0), False, "not a synchronous"),
    (ReplicationFacts(standby_in_recovery=True, sender=PRIMARY, state="streaming",
                      sync_state="sync", lag_s=7.5, lag_bytes=9000, replay_paused=True), False,
     "7.50 s / 9000 bytes exceeds the RPO budget of 5 s; WAL replay is paused"),
    (ReplicationFacts(standby_in_recovery=True, sender=PRIMARY, state="streaming",
                      sync_state="sync", lag_s=None, lag_bytes=300), False, "lag unknown"),
])
def test_replication_readiness(facts: ReplicationFacts, proceed: bool, words: str) -> None:
    d = replication_ready(facts, PRIMARY, "sync", 5)
    assert d.proceed is proceed and words in d.reason


def test_async_group_accepts_an_async_standby() -> None:
    f = ReplicationFacts(standby_in_recovery=True, sender=PRIMARY, state="streaming",
                         sync_state="async", lag_s=0.0, lag_bytes=0)
    assert replication_ready(f, PRIMARY, "async", 5).proceed


ISOLATED = IsolationFacts(host="esx-dr-01", portgroup_found=True, vswitch="vSwitch9",
                          standby_networks=("VM Network",), attached_vms=("orders-dr-drill-1",))


@pytest.mark.parametrize(("facts", "proceed", "words"), [
    (ISOLATED, True, "no physical NIC"),
    (IsolationFacts(error="vCenter down"), False, "cannot prove isolation: vCenter down"),
    (IsolationFacts(host="h1"), False, "no port group 'iso' on host h1"),
    (IsolationFacts(portgroup_found=True, distributed=True), False, "distributed"),
    (IsolationFacts(portgroup_found=True, vswitch="vSwitch0", pnics=("vmnic0",)), False,
     "has an uplink (vmnic0)"),
    (IsolationFacts(portgroup_found=True, vswitch="vSwitch0", bridged=True), False, "uplink"),
    (IsolationFacts(portgroup_found=True, vswitch="v", other_portgroups=("Prod",)), False,
     "also carries port group(s) Prod"),
    (IsolationFacts(portgroup_found=True, vswitch="v", standby_networks=("iso",)), False,
     "the standby VM itself"),
    (IsolationFacts(portgroup_found=True, vswitch="v", attached_vms=("erp-prod", "x-drill-1"),
                    bridging_vms=("erp-prod",)), False,
     "erp-prod are on 'iso' and on other networks"),
])
def test_isolation_must_be_proven(facts: IsolationFacts, proceed: bool, words: str) -> None:
    d = isolation_proven(facts, "iso")
    assert d.proceed is proceed and words in d.reason


def test_dns_readiness_and_the_combined_verdict() -> None:
    assert dns_sane(("10.0.0.1", 5432), None, "o.example.", "10.0.0.1", 5432).proceed
    moved = dns_sane(("10.1.0.1", 5432), None, "o.example.", "10.0.0.1", 5432)
    assert not moved.proceed and "not at the primary 10.0.0.1:5432" in moved.reason
    assert "AccessDenied" in dns_sane(None, "AccessDenied", "o.", "h", 1).reason
    both = readiness({"DNS": moved, "vCenter": Decision(True, "ok"),
                      "isolation": Decision(False, "no port group")})
    assert not both.proceed and "DNS:" in both.reason and "isolation: no port group" in both.reason
    assert "vCenter" not in both.reason
    assert readiness({"DNS": Decision(True, "x")}).proceed


def test_copy_verdict_and_outcome() -> None:
    good = CopyFacts(in_recovery=False, replicating_from=None, wrote_and_read=True,
                     copy_lsn=200, known_lsn=100, witness="xid 7 committed",
                     witness_on_copy="xid 7 committed")
    assert copy_verified(good).proceed
    assert "up to the standby's replay position 0/64" in copy_verified(good).reason
    bad = CopyFacts(in_recovery=True, replicating_from="10.0.0.1:5432", wrote_and_read=False,
                    missing_tables=("public.t",), copy_lsn=99, known_lsn=100,
                    witness="xid 7 committed", witness_on_copy="xid 7 in progress",
                    senders_to_copy=("drflow-drill-x (streaming)",))
    reason = copy_verified(bad).reason
    for words in ("still in recovery", "attached to 10.0.0.1:5432", "could not be read back",
                  "the standby saw xid 7 committed before the copy, the copy has xid 7 in "
                  "progress", "public.t", "ends at 0/63, before the standby's replay position "
                  "0/64", "production sends WAL to the copy (drflow-drill-x (streaming))"):
        assert words in reason
    clean, dirty = teardown_clean([]), teardown_clean(["VM x-drill-1"])
    assert drill_outcome(None, None, clean)[0] == "passed"
    assert drill_outcome("lag", None, clean) == ("refused", "lag")
    assert drill_outcome(None, "step x failed", dirty) == (
        "failed", "step x failed; teardown left: VM x-drill-1")
    assert drill_outcome(None, None, dirty)[0] == "failed"


def test_copy_plan_snapshots_when_it_can_and_never_silently_when_told_to() -> None:
    assert copy_plan("auto", None).method == "snapshot"
    assert copy_plan("snapshot", None).method == "snapshot"
    fallback = copy_plan("auto", "the standby's datadir /d is not a btrfs subvolume")
    assert fallback.method == "basebackup" and fallback.decision.proceed
    assert fallback.reason == ("pg_basebackup through the standby: no snapshot, as the "
                               "standby's datadir /d is not a btrfs subvolume")
    # Told to snapshot and cannot: the drill is refused, the database is not copied instead.
    refused = copy_plan("snapshot", "drill.work_dir /w is not on btrfs")
    assert refused.method is None and not refused.decision.proceed
    assert refused.reason == "drill.copy_method is snapshot, but drill.work_dir /w is not on btrfs"
    assert copy_plan("basebackup", None).method == "basebackup"


def test_snapshot_problem_names_what_is_missing(tmp_path: Path) -> None:
    from tasks.pg_copy import snapshot_problem

    assert "not configured" in (snapshot_problem(None, tmp_path) or "")
    gone = snapshot_problem(tmp_path / "nope", tmp_path)
    assert gone is not None and "is not visible here" in gone
    if shutil.which("btrfs"):  # the bootstrap installs it; without it that is the reason
        assert snapshot_problem(tmp_path, tmp_path) == (
            f"the standby's datadir {tmp_path} is not a btrfs subvolume")


def test_removing_a_copy_never_follows_a_pid_file_that_is_not_its_own() -> None:
    """A snapshot holds the standby's postmaster.pid until the drill removes it: a teardown
    after a crash in between must not `pg_ctl stop` the process that file names."""
    from drflow.pg_os import give_to_pg
    from tasks import pg_copy

    root = Path(tempfile.mkdtemp(prefix="drflow-pidfile-", dir="/tmp"))
    root.chmod(0o755)  # pg_ctl runs as `postgres`: it must be able to read the pid file
    # Owned by the user pg_ctl runs as, so that a signal from it would land.
    victim = subprocess.Popen(["sleep", "60"], user="postgres" if os.geteuid() == 0 else None)
    try:
        run_dir, data = root / "orders-abc", root / "orders-abc" / "data"
        data.mkdir(parents=True)
        (data / "PG_VERSION").write_text("16\n")
        (data / "postmaster.pid").write_text(f"{victim.pid}\n{root / 'standby-data'}\n")
        give_to_pg(run_dir, data, data / "PG_VERSION", data / "postmaster.pid")
        data.chmod(0o700)
        assert not pg_copy._own_pid_file(data)
        left = pg_copy.remove_copy.fn(run_dir, str(pg_copy.pg_bindir()))
        assert left == [] and not run_dir.exists()
        assert victim.poll() is None  # not signalled
        data.mkdir(parents=True)
        (data / "postmaster.pid").write_text(f"{victim.pid}\n{data}\n")
        assert pg_copy._own_pid_file(data)
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_history_trends_and_summary_from_the_audit_trail(tmp_path: Path) -> None:
    from drflow.audit import open_store

    with open_store(f"sqlite:///{tmp_path / 'a.db'}") as store:
        for outcome, rto in [("passed", 3.0), ("refused", None), ("passed", 2.5),
                             ("failed", None), ("passed", 4.0)]:
            store.append("flow:drill/x", "drill.finish", "orders",
                         {"rto_s": rto, "rpo_s": 0.1 if rto else None, "reason": outcome},
                         outcome, reason="headline")
        store.append("flow:drill/x", "drill.finish", "payments", {"rto_s": 9.0}, "passed")
        store.append("flow:drill/x", "drill.start", "orders", {}, "started")
        rows = drill_rows(store, "orders")
    assert [r["outcome"] for r in rows] == ["passed", "refused", "passed", "failed", "passed"]
    assert [r["rto_delta_s"] for r in rows] == [None, None, -0.5, None, 1.5]
    s = summary(rows)
    assert (s["drills"], s["passed"], s["failed"], s["refused"]) == (5, 3, 1, 1)
    assert s["rto_s"] == {"min": 2.5, "median": 3.0, "max": 4.0} and s["pass_rate"] == 0.6


def test_schedules_come_from_the_config() -> None:
    from drflow.config import load_config

    text = (REPO / "prefect.yaml").read_text()
    example = load_config(REPO / "examples" / "drflow.yaml")
    assert with_schedules(text, example) == text  # the committed file matches the example
    cfg = example.model_copy(deep=True)
    second = cfg.groups[0].model_copy(update={"name": "billing"}, deep=True)
    second.policy.drill_schedule = "30 2 * * 1-5"
    cfg.groups.append(second)
    cfg.groups[0].policy.drill_schedule = None
    deployment = next(d for d in yaml.safe_load(with_schedules(text, cfg))["deployments"]
                      if d["name"] == "drill")
    assert deployment["schedules"] == [{"cron": "30 2 * * 1-5", "timezone": "UTC",
                                        "slug": "drill-billing",
                                        "parameters": {"group": "billing"}}]
    assert deployment["entrypoint"] == "flows/drill.py:drill"
    with pytest.raises(ValueError, match="BEGIN drill schedules"):
        with_schedules("deployments: []\n", cfg)


# --- drills on the lab ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drill_env(lab: dict[str, Any], prefect_api: str) -> Iterator[dict[str, Any]]:
    """The lab's config plus a drill section (a work dir of our own), a 1 s RPO budget, and a
    drill of `payments` every minute."""
    root = Path(tempfile.mkdtemp(prefix="drflow-drill-test-", dir="/tmp"))
    root.chmod(0o755)  # PostgreSQL (the copies) runs as `postgres` and must traverse it
    cfg = yaml.safe_load(Path(lab["dir"], "drflow.yaml").read_text())
    cfg["drill"] = {"work_dir": str(root / "work"), "port_range": [42000, 42999]}
    for g in cfg["groups"]:
        g["rpo_budget_s"] = 1
        if g["name"] == SCHEDULED:
            g["policy"]["drill_schedule"] = "* * * * *"
    path = root / "drflow.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    broken = dict(cfg, drill={**cfg["drill"], "isolated_portgroup": "VM Network"})
    broken_path = root / "drflow-uplinked.yaml"
    broken_path.write_text(yaml.safe_dump(broken, sort_keys=False))
    try:
        yield {"config": str(path), "uplinked_config": str(broken_path), "root": root,
               "work_dir": root / "work", "lab": lab}
    finally:
        _sweep(lab, path, root / "work")
        shutil.rmtree(root, ignore_errors=True)


def _sweep(lab: dict[str, Any], config: Path, work_dir: Path) -> None:
    """Whatever a broken test left behind (copies, clones), so that the shared lab stays clean."""
    from flows.runtime import runtime
    from tasks import pg_copy, vsphere

    if not config.exists():
        return
    rt = runtime(str(config))
    for g in rt.cfg.groups:
        for d in pg_copy.leftover_copies(work_dir, g.name) if work_dir.exists() else []:
            pg_copy.remove_copy.fn(d, str(pg_copy.pg_bindir()))
        vsphere.destroy_clones.fn(rt.vcenter(g.standby.site), f"{g.standby.vm}-drill-",
                                 "drflow-isolated")


@pytest.fixture(autouse=True)
def _no_flow_heartbeats() -> Iterator[None]:
    # ~1 s per flow call otherwise (see NOTES.md); env vars cannot turn them off.
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _instances(lab: dict[str, Any], group: str) -> tuple[Any, Any]:
    from lab import postgres as lpg

    pair = lab["postgres"][group]
    return lpg.Instance.from_dict(pair["primary"]), lpg.Instance.from_dict(pair["standby"])


def production(env: dict[str, Any], group: str = GROUP) -> dict[str, Any]:
    """Roles, replication state and settings, DNS, VM inventory and power states."""
    from drflow.dns import resolve_endpoint
    from flows.runtime import runtime
    from lab import postgres as lpg
    from lab import vcsim

    lab = env["lab"]
    primary, standby = _instances(lab, group)
    state: dict[str, Any] = {"roles": (lpg.role(primary), lpg.role(standby))}
    with lpg.admin_conn(primary) as c:
        state["replication"] = c.execute(
            "select application_name, state, sync_state from pg_stat_replication order by 1"
        ).fetchall()
        state["primary_settings"] = c.execute(
            "select name, setting from pg_settings where name in ('synchronous_standby_names', "
            "'synchronous_commit', 'primary_conninfo') order by 1").fetchall()
    with lpg.admin_conn(standby) as c:
        state["standby"] = c.execute(
            "select pg_is_in_recovery(), pg_is_wal_replay_paused(), "
            "current_setting('primary_conninfo'), current_setting('synchronous_standby_names'), "
            "(select status || ' ' || sender_port from pg_stat_wal_receiver)").fetchone()
    rt = runtime(env["config"])
    g = rt.cfg.group(group)
    state["dns"] = resolve_endpoint(rt.route53, g.dns.zone_id, g.dns.record)
    state["vms"] = {}
    for vc in lab["vcenters"].values():
        si = vcsim.connect(vc["url"], vc["user"], vc["password"])
        try:
            # Other groups' drill clones come and go (the scheduled drill): not this group's.
            state["vms"].update({name: str(vms[0].runtime.powerState)
                                 for name, vms in vcsim.vms_by_name(si).items()
                                 if "-drill-" not in name or name.startswith(f"{group}-")})
        finally:
            vcsim.disconnect(si)
    return state


class Writer:
    """Inserts rows with unique ids on the primary, throughout; records what was acknowledged."""

    def __init__(self, lab: dict[str, Any], group: str = GROUP) -> None:
        primary, _ = _instances(lab, group)
        db = lab["database"]
        self.conninfo = dict(host=primary.host, port=primary.port, user=db["user"],
                             password=db["password"], dbname=db["name"], autocommit=True)
        self.table = f"drill_writer_{uuid.uuid4().hex[:8]}"
        self.acked: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        with psycopg.connect(**self.conninfo) as c:
            c.execute(f"create table {self.table} (id bigint primary key, at timestamptz "
                      "default clock_timestamp())")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        with psycopg.connect(**self.conninfo) as c:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    c.execute(f"insert into {self.table} (id) values (%s)", (n,))
                    self.acked.append(n)
                except psycopg.Error as exc:
                    self.errors.append(f"{n}: {exc}")
                time.sleep(0.003)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def stored(self) -> list[int]:
        with psycopg.connect(**self.conninfo) as c:
            rows = c.execute(f"select id from {self.table} order by id").fetchall()
            c.execute(f"drop table {self.table}")
        return [int(r[0]) for r in rows]


def run_drill(config: str, group: str = GROUP) -> dict[str, Any]:
    from flows.drill import drill

    result: dict[str, Any] = drill(group, config_path=config, raise_on_failure=False)
    return result


def finish_record(env: dict[str, Any], drill_id: str) -> Any:
    from flows.runtime import runtime

    recs = [r for r in runtime(env["config"]).audit.iter_records()
            if r.action == "drill.finish" and r.parameters.get("drill_id") == drill_id]
    assert len(recs) == 1, f"one drill.finish record for drill {drill_id}, found {len(recs)}"
    return recs[0]


def nothing_left(env: dict[str, Any]) -> None:
    from tasks import pg_copy

    work = env["work_dir"]
    assert pg_copy.leftover_copies(work, GROUP) == []
    assert pg_copy.processes_under(work) == [] or all(  # only the scheduled group's copy may run
        SCHEDULED in " ".join(_cmdline(p)) for p in pg_copy.processes_under(work))
    assert not [n for n in production(env)["vms"] if n.startswith(f"{GROUP}-dr-drill-")]


def _cmdline(pid: int) -> list[str]:
    import psutil

    try:
        return [*psutil.Process(pid).cmdline(), psutil.Process(pid).cwd()]
    except psutil.Error:
        return []


# The scheduled deployment is set up before the lab drills so that its wait overlaps them.


@pytest.fixture(scope="module")
def scheduled(drill_env: dict[str, Any], prefect_api: str) -> Iterator[dict[str, Any]]:
    """Deploy the drill from prefect.yaml (schedules from the config) onto a process work pool
    and run a worker; at the end pause it, let a running drill finish, stop the worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    from drflow.config import load_config
    from lab import procs

    root: Path = drill_env["root"]
    pool = f"drflow-drill-test-{uuid.uuid4().hex[:6]}"
    prefect_file = root / "prefect.yaml"
    prefect_file.write_text(with_schedules((REPO / "prefect.yaml").read_text(),
                                           load_config(drill_env["config"])))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    for argv in ([PREFECT, "work-pool", "create", pool, "--type", "process"],
                 [PREFECT, "--no-prompt", "deploy", "--prefect-file", str(prefect_file),
                  "--name", "drill", "--pool", pool]):
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    log = root / "worker.log"
    worker = procs.spawn([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], log,
                         env={"PREFECT_WORKER_QUERY_SECONDS": "1",
                              "DRFLOW_CONFIG": drill_env["config"],
                              # Runs start `python -m prefect.engine`: drflow's Python first.
                              "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
                         cwd=REPO)
    client = get_client(sync_client=True)
    deployment = client.read_deployment_by_name("drill/drill")
    try:
        yield {"deployment": deployment, "client": client, "log": log, "pool": pool}
    finally:
        from prefect.states import Cancelled

        client.delete_deployment(deployment.id)  # its future scheduled runs go with it
        # A run the worker already took (it prefetches 10 s early) but that has not started is
        # cancelled; one that runs is let finish, so that it tears its bubble down itself.
        for r in _active_runs(client, deployment.id):
            if r.state_type == StateType.PENDING:
                client.set_flow_run_state(r.id, Cancelled(), force=True)
        deadline = time.monotonic() + 60
        while _active_runs(client, deployment.id) and time.monotonic() < deadline:
            time.sleep(0.5)
        worker.send_signal(signal.SIGINT)  # the worker ignores SIGTERM
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            procs.kill_tree(worker.pid)
            worker.wait(5)
        client.delete_work_pool(pool)


def _active_runs(client: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs: list[Any] = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.PENDING, StateType.RUNNING]))))
    return runs


def test_drill_deployment_has_a_cron_schedule_per_group(scheduled: dict[str, Any]) -> None:
    schedules = {s.schedule.cron: s.parameters for s in scheduled["deployment"].schedules}
    assert schedules == {"* * * * *": {"group": SCHEDULED}, "0 3 * * 0": {"group": GROUP}}
    assert scheduled["deployment"].entrypoint == "flows/drill.py:drill"


def test_healthy_drill_passes_and_production_is_untouched(drill_env: dict[str, Any],
                                                          scheduled: dict[str, Any]) -> None:
    from drflow.config import load_config
    from lab.slack_standin import SlackLab

    before = production(drill_env)
    assert before["roles"] == ("primary", "standby")
    with Writer(drill_env["lab"]) as writer:
        time.sleep(0.3)
        result = run_drill(drill_env["config"])
        during = len(writer.acked)
        time.sleep(0.3)
    assert result["outcome"] == "passed", result["reason"]
    assert writer.errors == []
    assert len(writer.acked) > during > 50  # it kept writing through the drill
    assert writer.stored() == writer.acked  # nothing acknowledged was lost
    assert production(drill_env) == before
    nothing_left(drill_env)

    assert 0 < result["rto_s"] < result["drill_s"] < 30
    # RTO counts from the end of the copy; ready_s from the drill's start.
    assert result["rto_s"] + result["copy_s"] < result["ready_s"] < result["drill_s"]
    assert result["rpo_s"] is not None and 0 <= result["rpo_s"] <= 1
    assert result["rpo_bytes"] is not None and result["copy_bytes"] > 1_000_000
    steps = {s["name"]: s for s in result["steps"]}
    assert all(s["outcome"] == "ok" for s in steps.values()), steps
    assert "there and on the copy" in steps["check the copy"]["reason"]
    # The lab's data directories are not btrfs subvolumes: the standby is copied, and says why.
    assert result["copy_method"] == "basebackup"
    assert "no snapshot, as the standby's datadir" in steps["copy the standby"]["reason"]
    assert steps["clone the DR VM into the bubble"]["reason"].startswith(
        f"{GROUP}-dr-drill-{result['drill_id']} on drflow-isolated (poweredOn)")

    rec = finish_record(drill_env, result["drill_id"])
    assert rec.outcome == "passed" and rec.parameters["rto_s"] == result["rto_s"]
    cfg = load_config(drill_env["config"])
    texts = [m.get("text", "") for m in SlackLab(cfg.slack.api_url).messages()]
    assert any(f"*{GROUP}*: DR drill passed — RTO {result['rto_s']:.2f} s" in t for t in texts)
    artifact = _artifact(result["run_id"])
    assert f"# DR drill of {GROUP}: PASSED" in artifact and "| check the copy | ok |" in artifact
    assert f"*{GROUP}*" not in artifact  # markdown, not Slack's mrkdwn
    assert artifact.count(result["reason"]) == 1  # the summary once

    # What the run shows in Prefect: its name and tags, its outcome with RTO and RPO, and a
    # task run per step of the report, readiness checks included, named as the report does.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows import step_tasks

    run_id = uuid.UUID(result["run_id"])
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(run_id)
        deadline = time.monotonic() + 10
        while True:  # task runs reach the server as events, a moment after
            names = step_tasks.names(client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))))
            if len(names) >= len(result["steps"]) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert fr.name == f"drill {GROUP} {result['started_at'][:16]}Z"  # its start's UTC minute
    assert {f"group:{GROUP}", "kind:drill", "site:dr"} <= set(fr.tags), fr.tags
    assert fr.state is not None and fr.state.is_completed()
    assert fr.state.message == (f"passed: RTO {result['rto_s']:.2f} s, RPO "
                                f"{result['rpo_s']:.2f} s / {result['rpo_bytes']} bytes; "
                                f"{result['reason']}")
    assert names == [st["name"] for st in result["steps"]]
    assert names[:4] == ["check replication", "check vCenter", "check isolation", "check DNS"]


def _app_conn(inst: Any, dbname: str) -> Any:
    from lab import postgres as lpg

    return psycopg.connect(host=str(inst.socket_dir), port=inst.port, user=lpg.PG_OS_USER,
                           dbname=dbname, autocommit=True)


def production_data(lab: dict[str, Any], skip: str) -> dict[str, Any]:
    """The primary's catalog, settings, every user table's rows and write counters (all but
    the tables whose name starts with `skip`) and its requested checkpoints."""
    primary, _ = _instances(lab, GROUP)
    out: dict[str, Any] = {}
    with _app_conn(primary, lab["database"]["name"]) as c:
        out["catalog"] = c.execute(
            "select c.oid::bigint, n.nspname, c.relname, c.relkind from pg_class c "
            "join pg_namespace n on n.oid = c.relnamespace where not starts_with(c.relname, %s) "
            "order by 1", (skip,)).fetchall()
        out["settings"] = c.execute("select name, setting from pg_settings order by 1").fetchall()
        tables = [r[0] for r in c.execute(
            "select format('%%I.%%I', schemaname, relname) from pg_stat_user_tables "
            "where not starts_with(relname, %s) order by 1", (skip,)).fetchall()]
        out["rows"] = {t: c.execute(f"select count(*), md5(coalesce(string_agg(x::text, '|' "
                                    f"order by x::text), '')) from {t} x").fetchone()
                       for t in tables}
        out["writes"] = c.execute(
            "select relid::bigint, n_tup_ins, n_tup_upd, n_tup_del from pg_stat_user_tables "
            "where not starts_with(relname, %s) order by 1", (skip,)).fetchall()
        out["checkpoints_req"] = c.execute("select checkpoints_req from pg_stat_bgwriter"
                                           ).fetchone()
    return out


@pytest.fixture
def checkpoints_logged(drill_env: dict[str, Any]) -> Iterator[list[Path]]:
    """log_checkpoints on for both production nodes while the test runs (the lab has it off)."""
    from lab import postgres as lpg

    nodes = _instances(drill_env["lab"], GROUP)
    for n in nodes:
        with lpg.admin_conn(n) as c:
            c.execute("alter system set log_checkpoints = on")
            c.execute("select pg_reload_conf()")
    time.sleep(0.5)
    try:
        yield [n.log for n in nodes]
    finally:
        for n in nodes:
            with lpg.admin_conn(n) as c:
                c.execute("alter system reset log_checkpoints")
                c.execute("select pg_reload_conf()")


def test_drill_under_a_writer_writes_nothing_and_forces_no_checkpoint_on_production(
        drill_env: dict[str, Any], checkpoints_logged: list[Path]) -> None:
    """Issue 11 item 3: no row, table, setting or immediate checkpoint on production."""
    from lab import postgres as lpg

    lab = drill_env["lab"]
    primary, standby = _instances(lab, GROUP)
    with Writer(lab) as writer:
        time.sleep(0.3)
        # The test's own checkpoint, replayed by the standby: the base backup's restartpoint
        # then has work to do and is logged, with "immediate" if it was asked for one.
        with lpg.admin_conn(primary) as c:
            c.execute("checkpoint")
        lpg.wait_replay_caught_up(primary, standby, timeout=30)
        before = production_data(lab, writer.table)
        offsets = [p.stat().st_size for p in checkpoints_logged]
        result = run_drill(drill_env["config"])
        time.sleep(1.2)  # table counters reach pg_stat at most a second after a commit
        after = production_data(lab, writer.table)
        during = len(writer.acked)
    assert result["outcome"] == "passed", result["reason"]
    assert writer.errors == [] and during > 50
    assert writer.stored() == writer.acked
    assert after == before
    logged = [p.read_bytes()[o:].decode(errors="replace")
              for p, o in zip(checkpoints_logged, offsets, strict=True)]
    starts = [line for text in logged for line in text.splitlines() if "point starting:" in line]
    assert any("restartpoint starting:" in line for line in starts), logged
    assert [line for line in starts if "immediate" in line] == []
    steps = {s["name"]: s for s in result["steps"]}
    assert "read-only" in steps["observe the standby"]["reason"]
    assert "there and on the copy" in steps["check the copy"]["reason"]
    print(f"\ndrill under a writer: {result['drill_s']:.2f} s, copy {result['copy_s']:.2f} s; "
          f"checkpoints logged: {starts}")
    nothing_left(drill_env)


def _artifact(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = get_client(sync_client=True).read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    assert len(arts) == 1
    return str(arts[0].data)


def test_lagging_standby_fails_readiness_and_builds_nothing(drill_env: dict[str, Any]) -> None:
    from lab import postgres as lpg

    primary, standby = _instances(drill_env["lab"], GROUP)
    before = production(drill_env)
    with lpg.admin_conn(standby) as c:
        c.execute("select pg_wal_replay_pause()")
    try:
        with Writer(drill_env["lab"]) as writer:
            time.sleep(1.5)  # writes keep committing (synchronous_commit=on), replay lag grows
            result = run_drill(drill_env["config"])
    finally:
        with lpg.admin_conn(standby) as c:
            c.execute("select pg_wal_replay_resume()")
        lpg.wait_replay_caught_up(primary, standby, timeout=30)
    assert writer.errors == [] and writer.stored() == writer.acked
    assert result["outcome"] == "refused"
    assert "exceeds the RPO budget of 1 s; WAL replay is paused on the standby" in result["reason"]
    assert [s["name"] for s in result["steps"]] == [
        "check replication", "check vCenter", "check isolation", "check DNS",
        "check the copy method"]
    assert result["rto_s"] is None and result["clone"] is None
    assert production(drill_env) == before
    nothing_left(drill_env)
    assert finish_record(drill_env, result["drill_id"]).outcome == "refused"


def test_drill_that_cannot_prove_isolation_refuses(drill_env: dict[str, Any]) -> None:
    result = run_drill(drill_env["uplinked_config"])
    assert result["outcome"] == "refused"
    assert ("isolation: not isolated: vSwitch vSwitch0 of 'VM Network' has an uplink (vmnic0)"
            in result["reason"]), result["reason"]
    assert not [s for s in result["steps"] if not s["name"].startswith("check ")]
    nothing_left(drill_env)


def test_step_failing_midway_still_tears_down_and_reports(drill_env: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.runtime import runtime
    from tasks import drill_checks, pg_copy, vsphere

    rt = runtime(drill_env["config"])
    vc = rt.vcenter(rt.cfg.group(GROUP).standby.site)
    seen: dict[str, Any] = {}

    def crash(*_a: Any, **_k: Any) -> None:  # fault injection: the application check crashes
        seen["clones"] = vsphere.drill_vms(vc, f"{GROUP}-dr-drill-")
        seen["copies"] = pg_copy.leftover_copies(drill_env["work_dir"], GROUP)
        seen["processes"] = [p for d in seen["copies"] for p in pg_copy.processes_under(d)]
        seen["isolation"] = vsphere.isolation_facts(vc, f"{GROUP}-dr", "drflow-isolated")
        raise RuntimeError("injected fault: the application check crashed")

    monkeypatch.setattr(drill_checks, "check_copy", crash)
    before = production(drill_env)
    result = run_drill(drill_env["config"])
    assert seen["clones"] and seen["copies"] and seen["processes"]  # there was a bubble to remove
    # The clone sits on the isolated port group only: attached, not bridging it anywhere.
    assert seen["clones"][0] in seen["isolation"].attached_vms
    assert seen["clones"][0] not in seen["isolation"].bridging_vms
    assert result["outcome"] == "failed"
    assert result["reason"] == ("step 'check the copy' failed: RuntimeError: injected fault: the "
                                "application check crashed")
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["check the copy"]["outcome"] == "failed"
    assert steps["tear down the bubble"]["outcome"] == "ok"
    assert result["rto_s"] is None  # never verified, so no RTO
    assert production(drill_env) == before
    nothing_left(drill_env)
    for pid in seen["processes"]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status"
                                                                     ).read_text()
    assert finish_record(drill_env, result["drill_id"]).outcome == "failed"


def test_copy_failing_while_the_clone_is_made_tears_the_clone_down(
        drill_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: the VM clone is made beside the copy; a copy that fails before the clone is
    done still leaves nothing behind (teardown waits for the clone, then destroys it)."""
    from tasks import errors, pg_copy, vsphere

    real_find = vsphere.find_vm

    def slow_vcenter(*a: Any, **k: Any) -> Any:  # vcsim cannot be made slow
        if threading.current_thread() is not threading.main_thread():  # the clone, beside
            time.sleep(1.5)
        return real_find(*a, **k)

    def broken_copy(*_a: Any, **_k: Any) -> None:  # fault injection: the base backup fails
        raise errors.DrillError("injected fault: pg_basebackup failed")

    monkeypatch.setattr(vsphere, "find_vm", slow_vcenter)
    monkeypatch.setattr(pg_copy, "make_copy", broken_copy)
    result = run_drill(drill_env["config"])
    assert result["outcome"] == "failed"
    assert result["reason"].startswith("step 'copy the standby' failed: DrillError: injected")
    assert {s["name"]: s for s in result["steps"]}["tear down the bubble"]["outcome"] == "ok"
    assert result["rto_s"] is None and result["ready_s"] is None
    time.sleep(2)  # a clone made after the teardown would be there by now
    nothing_left(drill_env)


def test_drflow_up_runs_the_drill_schedule_itself(drill_env: dict[str, Any]) -> None:
    """Issue 11 item 6: under `drflow up` (embedded), drill_schedule fires the real drill flow."""
    from datetime import UTC, datetime

    from drflow.config import load_config
    from orchestrator.drill_scheduler import DrillScheduler, describe, run_drill, schedules

    cfg = load_config(drill_env["config"])
    crons = {GROUP: "* * * * *"}  # every minute; the clock below makes the next one 1.5 s away
    assert schedules(cfg) == {GROUP: "0 3 * * 0", SCHEDULED: "* * * * *"}
    assert describe(crons, False) == [f"drill of {GROUP}: cron '* * * * *' (UTC), run here"]
    from flows.runtime import runtime

    def finished() -> list[Any]:
        return [r for r in runtime(drill_env["config"]).audit.iter_records()
                if r.action == "drill.finish" and r.target == GROUP]

    earlier = len(finished())
    real = datetime.now(UTC)
    offset = real.replace(second=58, microsecond=500_000) - real
    clock = [offset]
    drills = DrillScheduler(crons, run_drill(drill_env["config"]),
                            now=lambda: datetime.now(UTC) + clock[0])
    t0 = time.monotonic()
    drills.start()
    try:
        deadline = time.monotonic() + 10
        while not drills.started and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [g for g, _ in drills.started] == [GROUP], "the schedule did not fire"
        fired = time.monotonic() - t0
        drills.wait_drills(120)
    finally:
        drills.stop()
    assert fired < 5
    recs = finished()[earlier:]
    assert [r.outcome for r in recs] == ["passed"], [(r.outcome, r.reason) for r in recs]
    nothing_left(drill_env)


def test_drflow_up_fires_a_drill_at_its_cron_time(drill_env: dict[str, Any],
                                                  prefect_api: str) -> None:
    """The real `drflow up` process: schedule listed at start, the drill run at the next minute."""
    from flows.runtime import runtime
    from lab import procs

    root: Path = drill_env["root"]
    cfg = yaml.safe_load(Path(drill_env["config"]).read_text())
    for g in cfg["groups"]:
        g["policy"]["drill_schedule"] = "* * * * *" if g["name"] == GROUP else None
    path = root / "drflow-up.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def finished() -> list[Any]:
        return [r for r in runtime(drill_env["config"]).audit.iter_records()
                if r.action == "drill.finish" and r.target == GROUP]

    earlier = len(finished())
    log = root / "drflow-up.log"
    # At the DR site: drflow up listens on the orchestrator's address.
    at_dr = drill_env["lab"]["orchestrator"]["netns_prefix"]
    up = procs.spawn([*at_dr, str(Path(sys.executable).parent / "drflow"), "up", "--config",
                      str(path), "--state-dir", str(root / "up-state")], log,
                     env={"PREFECT_API_URL": prefect_api}, cwd=REPO)
    try:
        deadline = time.monotonic() + 150  # the next minute, then the drill itself
        while len(finished()) == earlier and time.monotonic() < deadline:
            assert up.poll() is None, log.read_text()
            time.sleep(1)
        text = log.read_text()
        assert f"drill of {GROUP}: cron '* * * * *' (UTC), run here" in text
        recs = finished()[earlier:]
        assert [r.outcome for r in recs][:1] == ["passed"], text[-3000:]
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)  # a drill that has started finishes and tears down first
        except subprocess.TimeoutExpired:
            procs.kill_tree(up.pid)
            up.wait(5)
    nothing_left(drill_env)


def test_cli_run_history_and_report(drill_env: dict[str, Any]) -> None:
    runner = CliRunner()
    cfg = ["--config", drill_env["config"]]
    ran = runner.invoke(drill_app, ["run", GROUP, "--json", *cfg])
    assert ran.exit_code == 0, ran.output
    passed = json.loads(ran.output.strip().splitlines()[-1])
    assert passed["outcome"] == "passed"
    refused = runner.invoke(drill_app, ["run", GROUP, "--config", drill_env["uplinked_config"]])
    assert refused.exit_code == 2 and f"{GROUP}: drill refused — not ready" in refused.output

    out = runner.invoke(drill_app, ["history", GROUP, *cfg])
    assert out.exit_code == 0, out.output
    for word in ("passed", "refused", f"{GROUP}:", "RTO median"):
        assert word in out.output
    rows = [json.loads(x) for x in
            runner.invoke(drill_app, ["history", GROUP, "--json", *cfg]).output.splitlines()]
    assert passed["drill_id"] in {r["drill_id"] for r in rows}
    assert {r["outcome"] for r in rows} >= {"passed", "refused"}
    assert all(r["group"] == GROUP for r in rows)

    rep = runner.invoke(drill_app, ["report", GROUP, "--format", "json", *cfg])
    assert rep.exit_code == 0, rep.output
    data = json.loads(rep.output)
    assert data["audit"]["verified"] is True
    assert data["summary"]["drills"] == len(rows) and data["summary"]["passed"] >= 1
    assert data["drills"][-1]["drill_id"] == rows[-1]["drill_id"]
    md = runner.invoke(drill_app, ["report", GROUP, "--format", "md", *cfg]).output
    assert md.startswith(f"# DR drill report: {GROUP}") and "## Latest drill" in md
    assert "Audit trail verification: **ok**" in md

    bad = runner.invoke(drill_app, ["run", "nosuch", *cfg])
    assert bad.exit_code == 2 and "no protection group 'nosuch'" in bad.output
    assert runner.invoke(drill_app, ["report", GROUP, "--format", "pdf", *cfg]).exit_code == 2


def test_scheduled_drill_runs_through_the_work_pool_and_appears_in_history(
        drill_env: dict[str, Any], scheduled: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    client, deployment = scheduled["client"], scheduled["deployment"]
    deadline = time.monotonic() + 150  # the next minute, the worker's start, the drill
    runs: list[Any] = []
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))))
        if runs:
            break
        time.sleep(1)
    log = scheduled["log"].read_text() if scheduled["log"].exists() else ""
    assert runs, f"no scheduled drill finished in time; worker log:\n{log[-3000:]}"
    run = runs[0]
    assert run.state_type == StateType.COMPLETED, log[-3000:]
    assert run.parameters == {"group": SCHEDULED}
    out = CliRunner().invoke(drill_app, ["history", SCHEDULED, "--json", "--config",
                                         drill_env["config"]])
    rows = [json.loads(x) for x in out.output.splitlines()]
    mine = [r for r in rows if r["run_id"] == str(run.id)]
    assert len(mine) == 1 and mine[0]["outcome"] == "passed" and mine[0]["rto_s"] > 0
