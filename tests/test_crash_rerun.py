"""Crash and re-run inside a step, for failover, re-protect and failback, on one lab.

The runbook runs in a child process; a crash hook in that process (never in product code) wraps
one task so that, right after the task's effect happened and before its step's audit record is
written, the process SIGKILLs itself. The test then runs the same runbook again and checks that
it completes without doing the effect a second time, and that the audit trail still verifies.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drflow.dns import resolve_endpoint
from lab import vcsim
from lab.slack_standin import SlackLab
from tests.harness import Env, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent

RUNNER = textwrap.dedent("""
    import functools, importlib, json, os, signal, sys
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    runbook, group, config, crash_after = sys.argv[1:5]
    if crash_after != "none":
        # Kill this process right after the task's effect, before its step is recorded.
        module, name = crash_after.split(":")
        mod = importlib.import_module(module)
        task = getattr(mod, name)
        original = getattr(task, "fn", task)  # a Prefect task, or a plain function

        @functools.wraps(original)
        def then_die(*args, **kwargs):
            out = original(*args, **kwargs)
            print("crashing after", crash_after, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            return out

        if hasattr(task, "fn"):
            task.fn = then_die
        else:  # flows call it through its module: replace it there
            setattr(mod, name, then_die)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        if runbook == "failover":
            from flows.failover import failover
            # No gateway in this lab: the evidence it would hold comes with the incident.
            result = failover(group, {"reason": "crash test", "primary_vm": f"{group}-prod",
                                      "evidence": {"sync_standby_streaming": True}},
                              config_path=config)
        elif runbook == "reprotect":
            from flows.reprotect import reprotect
            result = reprotect(group, {"reason": "crash test"}, config_path=config)
        else:
            from flows.failback import failback
            result = failback(group, requested_by="crash test", config_path=config)
    print("RESULT " + json.dumps(result, default=str), flush=True)
""")


class Child:
    """One runbook run in its own process, possibly set to crash after one task."""

    def __init__(self, env: Env, runbook: str, crash_after: str = "none") -> None:
        script = env.lab_dir / "crash_runner.py"
        script.write_text(RUNNER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), runbook, "orders", str(env.config), crash_after],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.out = ""

    def wait(self, timeout: float = 180) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.out = out + err
        return self.proc.returncode

    def result(self) -> dict[str, Any]:
        line = next((ln for ln in self.out.splitlines() if ln.startswith("RESULT ")), None)
        assert line is not None, self.out[-3000:]
        return dict(json.loads(line[len("RESULT "):]))


@pytest.fixture(scope="module")
def env(prefect_api: str) -> Iterator[Env]:
    # No gateway: each run here is started by hand, and the returning old primary's agent, with
    # no gateway to ask, keeps its PostgreSQL down for re-protect.
    e = start_env(groups=1, replication="sync", gateway=False)
    try:
        yield e
    finally:
        stop_env(e)


def _node(env: Env, role: str) -> dict[str, Any]:
    return dict(env.group("orders")[role])


def _timelines(env: Env, node: dict[str, Any]) -> int:
    """How many timeline switches (promotions) this node's WAL history holds."""
    with env.connect(node["host"], node["port"]) as c:
        row = c.execute("select count(*) from pg_ls_waldir() where name like '%.history'"
                        ).fetchone()
    return int(row[0]) if row else 0


def _replica(env: Env, primary: dict[str, Any], name: str) -> Any:
    with env.connect(primary["host"], primary["port"]) as c:
        return c.execute("select state, sync_state from pg_stat_replication "
                         "where application_name = %s", (name,)).fetchone()


def _dns(env: Env) -> tuple[str, int]:
    g = env.group("orders")
    return resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"])


def _step(env: Env, action: str) -> list[str]:
    """Outcomes of the records of one step, in order ("started", "ok", …)."""
    return [r.outcome for r in env.audit_records(action)]


def _trail(env: Env, last: int = 25) -> str:
    """The end of the audit trail, for a failure message."""
    logs = "".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                   for p in sorted((env.lab_dir / "logs").glob("agent-*.log")))
    return logs + "\n".join(f"{r.action} {r.target} {r.outcome}: {r.reason[:300]}"
                            for r in env.audit_records()[-last:]) + "\n"


def _audit_verifies(env: Env) -> None:
    from drflow.audit import open_store

    store = open_store(env.audit_url, create=False)
    try:
        assert store.verify().ok
    finally:
        store.close()


def test_failover_killed_between_promote_and_its_record_promotes_once(env: Env) -> None:
    prod, dr = _node(env, "primary"), _node(env, "standby")
    timelines = _timelines(env, dr)
    vcsim.power_off(env.si(), prod["vm"])
    crashed = Child(env, "failover", "tasks.postgres:promote")
    assert crashed.wait() == -signal.SIGKILL, crashed.out[-3000:]
    # PostgreSQL promoted, the step's closing record never written.
    assert env.writable(dr)
    assert _step(env, "failover.promote standby") == ["started"]
    assert env.audit_records("failover.finish") == []
    rerun = Child(env, "failover")
    assert rerun.wait() == 0, rerun.out[-3000:]
    result = rerun.result()
    assert result["outcome"] == "failed_over" and result["promoted_now"] is False, result
    closing = [r for r in env.audit_records("failover.promote standby") if r.outcome != "started"]
    assert [r.reason for r in closing] == ["already a primary: not promoted a second time"]
    assert _timelines(env, dr) == timelines + 1  # exactly one promotion
    assert _dns(env) == (dr["host"], dr["port"])
    _audit_verifies(env)


def test_reprotect_killed_inside_its_steps_completes_on_rerun(env: Env) -> None:
    prod, dr = _node(env, "primary"), _node(env, "standby")
    vcsim.power_on(env.si(), prod["vm"])
    # The bridge starts the agent; with no gateway to ask, it holds PostgreSQL down.
    wait_for(lambda: _agent_answers(env, prod), 60, "the old primary's agent")
    # Killed after the agent rewound the node (it streams), before the step's record.
    first = Child(env, "reprotect", "tasks.agent:rewind_to")
    assert first.wait() == -signal.SIGKILL, first.out[-3000:]
    assert _step(env, "reprotect.rewind into a standby") == ["started"]
    wait_for(lambda: _replica(env, dr, prod["vm"]) is not None, 30, "the rewound node streams")
    # Killed again once the standby streams and caught up, before that step's record. (The
    # primary's agent restores synchronous_standby_names itself once the standby caught up, so
    # the restore step may find nothing to do: its task is no reliable place to crash.)
    second = Child(env, "reprotect", "tasks.replication:wait_streaming")
    assert second.wait() == -signal.SIGKILL, second.out[-3000:]
    assert _step(env, "reprotect.wait until streaming and caught up")[-1] == "started"
    third = Child(env, "reprotect")
    assert third.wait() == 0, third.out[-3000:]
    result = third.result()
    assert result["outcome"] == "protected", result
    # Whether the restore step finds synchronous replication restored depends on who relaxed it
    # (the failover's step, or the primary's agent); rewinding again is what must not happen.
    assert "rewind_method" not in result, result
    assert [r for r in env.audit_records("reprotect.rewind into a standby")
            if r.outcome != "started"] == []  # rewound once, by the first run
    assert _replica(env, dr, prod["vm"]) == ("streaming", "sync")
    assert not env.writable(prod) and env.writable(dr)
    _audit_verifies(env)


def _agent_answers(env: Env, node: dict[str, Any]) -> bool:
    from pydantic import SecretStr

    from drflow.control import ControlClient

    try:
        ControlClient.for_agent(node["agent_url"], SecretStr(env.state["secrets"]["control"]),
                                node["vm"]).call("status")
        return True
    except Exception:
        return False


def _approve(env: Env, since: float) -> str:
    """Wait for the approval request, then resume the paused run with a decision proven as the
    gateway proves it (this lab has no gateway). Returns the run id."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from drflow.approval import proof

    slack = SlackLab(env.state["slack"]["url"])
    request = slack.wait_for_message(
        lambda m: m.get("text") == "Failback of orders: approval needed"
        and float(m["ts"]) >= since - 1
        and any(b.get("type") == "actions" for b in m.get("blocks", [])), 60)
    run_id = json.loads(request["blocks"][-1]["elements"][0]["value"])["run"]
    with get_client(sync_client=True) as c:
        wait_for(lambda: (s := c.read_flow_run(uuid.UUID(run_id)).state) is not None
                 and s.is_paused(), 60, "failback paused for approval", 0.2)
    secret = env.state["secrets"]["webhook"].encode()
    resume_flow_run(uuid.UUID(run_id), run_input={
        "approved": True, "approver": "U0ONCALL1", "approvers": ["U0ONCALL1"],
        "proof": proof(secret, run_id, True, ["U0ONCALL1"])})
    return str(run_id)


def test_failback_killed_between_promote_and_its_record_completes_on_rerun(env: Env) -> None:
    prod, dr = _node(env, "primary"), _node(env, "standby")
    timelines = _timelines(env, prod)
    t0 = time.time()
    crashed = Child(env, "failback", "tasks.postgres:promote")
    approver = threading.Thread(target=_approve, args=(env, t0), daemon=True)
    approver.start()
    assert crashed.wait() == -signal.SIGKILL, crashed.out[-3000:]
    approver.join(5)
    # Home promoted, DR stopped by the switchover, the promote step's record never closed.
    assert env.writable(prod) and not env.writable(dr)
    assert _step(env, "failback.promote home") == ["started"]
    rerun = Child(env, "failback")  # home serves: no new approval, it finishes the job
    assert rerun.wait() == 0, _trail(env) + rerun.out[-3000:]
    result = rerun.result()
    assert result["outcome"] == "failed_back" and result["promoted_now"] is False, result
    assert _timelines(env, prod) == timelines + 1  # exactly one promotion of home
    assert _dns(env) == (prod["host"], prod["port"])
    assert env.writable(prod) and not env.writable(dr)
    assert _replica(env, prod, dr["vm"]) == ("streaming", "sync")
    _audit_verifies(env)
