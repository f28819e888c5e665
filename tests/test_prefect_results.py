"""Every runbook flow names its result storage, so that Prefect's engine does not ask the server
for its default one at each run's start (a round trip that, with twenty failovers starting
together on a loaded server, cost seconds)."""

from __future__ import annotations

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
