"""Every runbook flow names its result storage, so that Prefect's engine does not ask the server
for its default one at each run's start (a round trip that, with twenty failovers starting
together on a loaded server, cost seconds)."""

from __future__ import annotations

import time
from typing import Any

import prefect.results
import pytest


def _asked() -> Any:
    raise AssertionError("the flow's run would ask the Prefect server for its default storage")


@pytest.mark.parametrize("where", ["flows.failover:failover", "flows.reprotect:reprotect",
                                   "flows.failback:failback", "flows.drill:drill",
                                   "orchestrator.entrypoints:failover",
                                   "orchestrator.entrypoints:reprotect",
                                   "orchestrator.entrypoints:failback",
                                   "orchestrator.embedded:warm_up_flow"])
def test_a_runbook_run_resolves_its_result_storage_without_the_server(
        where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module, name = where.split(":")
    flow = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(prefect.results, "_get_default_result_storage", _asked)
    store = prefect.results.ResultStore().update_for_flow(flow)
    assert store.result_storage is not None
    assert flow.persist_result is False  # named, never written


# -- what a runbook run shows in Prefect: name, tags, steps as task runs, report, final state ----

def test_the_report_is_markdown_with_wrapping_reasons() -> None:
    from flows.run import StepTiming, md, steps_markdown

    assert md("✅ *orders* failed over; ask <@U1>, see <http://x/y|the run>") == \
        "✅ **orders** failed over; ask @U1, see [the run](http://x/y)"
    assert md("RTO **4.2 s** and 2 * 3 = 6") == "RTO **4.2 s** and 2 * 3 = 6"  # markdown kept
    long = "the standby's lag " * 20 + "| with a pipe"
    table = steps_markdown([StepTiming("confirm failure", "ok", 0.5, "*orders-prod* is down"),
                            StepTiming("check standby lag", "refused", 0.1, long)])
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows[2] == "| 1 | confirm failure | ok | 0.500 |"
    assert all(len(r) < 80 for r in rows)  # no reason in a cell: the table fits, reasons wrap
    assert "1. **confirm failure** (ok): **orders-prod** is down" in table
    assert f"2. **check standby lag** (refused): {long}" in table


@pytest.fixture
def audit_rt(tmp_path: Any) -> Any:
    """What RunbookRun needs of a Runtime when it tells no Slack thread: an audit store."""
    from types import SimpleNamespace

    from drflow.audit import open_store

    return SimpleNamespace(audit=open_store(f"sqlite:///{tmp_path}/audit.db"),
                           scrub=lambda text: text)


def test_a_runbook_run_is_named_tagged_and_ends_with_its_outcome(
        prefect_api: str, audit_rt: Any) -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from flows import step_tasks
    from flows.run import RunbookRun, final_state, md

    @task(name="promote standby", persist_result=False)
    def promote() -> bool:
        return True

    @flow(name="failover", persist_result=False)
    def fake_failover(group: str) -> dict[str, Any]:
        run = RunbookRun(audit_rt, "failover", group, title=f"Failover of {group}",
                         notify=False)
        run.label(f"failover:{group}:3", "dr")
        run.start(f"🔴 *{group}*: lost", {})
        with run.step("confirm failure", f"{group}-prod") as s:
            s.reason = f"*{group}-prod* is poweredOff"
        with run.step("promote standby", f"{group}-dr") as s:
            s.reason = "promoted" if promote() else "already"
        with run.step("relax synchronous replication", f"{group}-dr") as s:
            s.outcome, s.reason = "skipped", "already relaxed"
        headline = f"✅ *{group}* failed over to {group}-dr: RTO 4.2 s"
        run.finish("ok", headline, {}, f"# Failover of {group}\n\n{md(headline)}\n\n"
                   + run.steps_table())
        return final_state(fake_failover.fn, {
            "outcome": "failed_over", "group": group,
            "reason": f"failed over to {group}-dr in 4.2 s, RPO 0.0 s"})

    state = fake_failover("orders", return_state=True)
    assert state.result() == {"outcome": "failed_over", "group": "orders",  # type: ignore[union-attr]
                              "reason": "failed over to orders-dr in 4.2 s, RPO 0.0 s"}
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(run_id)
        assert fr.name == "failover orders failover:orders:3"
        assert {"group:orders", "kind:failover", "site:dr"} <= set(fr.tags)
        assert fr.state is not None and fr.state.is_completed()
        assert fr.state.message == "failed_over: failed over to orders-dr in 4.2 s, RPO 0.0 s"

        runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        deadline = time.monotonic() + 10
        while True:  # task runs reach the server as events, a moment after
            task_runs = client.read_task_runs(flow_run_filter=runs)
            if len(task_runs) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        steps = step_tasks.names(task_runs)
        assert steps == ["confirm failure", "promote standby", "relax synchronous replication"]
        by_name = {t.name: t for t in task_runs if t.task_key.startswith("drflow-step-")}
        assert by_name["relax synchronous replication"].state.name == "Skipped"  # type: ignore[union-attr]
        assert by_name["confirm failure"].state.message == "*orders-prod* is poweredOff"  # type: ignore[union-attr]
        # The task the step called runs inside it, its child.
        inner = [t for t in task_runs if not t.task_key.startswith("drflow-step-")]
        assert [t.name.rsplit("-", 1)[0] for t in inner] == ["promote standby"]
        parents = {str(i.id) for i in inner[0].task_inputs.get("__parents__", [])}
        assert parents == {str(by_name["promote standby"].id)}

        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert len(arts) == 1
    report = str(arts[0].data)
    assert "**orders** failed over" in report
    assert "*orders*" not in report.replace("**orders**", "")  # no Slack mrkdwn left
    assert report.count("failed over to orders-dr") == 1  # the summary once
    assert arts[0].description == "Failover of orders: ok"
