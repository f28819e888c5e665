"""The failover's pure decisions: each rule, and the reason it gives."""

from __future__ import annotations

from flows.decisions import (
    AppCheck,
    LagEstimate,
    confirm_failure,
    fence_result,
    lag_estimate,
    promotion,
    relax_sync,
)

DOWN = AppCheck(reachable=False, detail="connection refused")
HEALTHY = AppCheck(reachable=True, writable_primary=True, detail="select 1 ok")


def test_power_off_confirms() -> None:
    d = confirm_failure("orders-prod", "poweredOff", DOWN, "heartbeat lost")
    assert d.proceed and "powered off" in d.reason


def test_agent_path_cut_but_primary_healthy_is_not_confirmed() -> None:
    d = confirm_failure("orders-prod", "poweredOn", HEALTHY, "heartbeat lost")
    assert not d.proceed
    assert "not promoting" in d.reason


def test_application_lost_on_running_vm_confirms() -> None:
    d = confirm_failure("orders-prod", "poweredOn", DOWN, "recovery exhausted")
    assert d.proceed and "application lost" in d.reason


def test_unknown_vsphere_confirms_by_app_but_fence_decides() -> None:
    assert confirm_failure("v", None, DOWN, "x").proceed
    assert not confirm_failure("v", None, HEALTHY, "x").proceed


def test_fence_requires_seen_power_off() -> None:
    assert fence_result("v", "poweredOff", None).proceed
    assert not fence_result("v", None, "timeout").proceed
    assert "unknown" in fence_result("v", None, "timeout").reason
    assert not fence_result("v", "poweredOn", "task failed").proceed


def test_promotion_respects_rpo_budget_and_force() -> None:
    ok = LagEstimate(0.0, 0, "in sync")
    late = LagEstimate(12.0, 4096, "behind")
    assert promotion(True, ok, 5, False).proceed
    refused = promotion(True, late, 5, False)
    assert not refused.proceed and "exceeds" in refused.reason and "force" in refused.reason
    forced = promotion(True, late, 5, True)
    assert forced.proceed and forced.reason.startswith("override")
    assert not promotion(True, LagEstimate(None, None, "?"), 5, False).proceed
    assert promotion(False, late, 5, False).proceed  # already promoted: idempotent re-run
    assert not promotion(None, ok, 5, True).proceed


def test_lag_estimate_from_heartbeat_history() -> None:
    hist = [(100.0, 1000), (101.0, 2000), (102.0, 3000)]
    assert lag_estimate(3000, 3000, hist).seconds == 0.0
    est = lag_estimate(1500, 3000, hist)
    assert est.bytes == 1500 and est.seconds == 1.0
    assert lag_estimate(None, 3000, hist).seconds is None
    assert lag_estimate(1000, None, []).seconds is None


def test_relax_sync_only_when_needed() -> None:
    assert relax_sync("sync", 0, "orders_standby").proceed
    assert not relax_sync("sync", 0, "").proceed
    assert not relax_sync("async", 0, "x").proceed
    assert not relax_sync("sync", 1, "x").proceed


def test_sync_standby_means_no_acknowledged_loss() -> None:
    est = lag_estimate(1500, 3000, [(100.0, 3000)], was_sync_standby=True)
    assert est.seconds == 0.0 and "synchronous" in est.basis


def test_failover_acts_on_the_node_that_failed() -> None:
    from drflow.config import load_config
    from flows.failover import failed_and_target

    g = load_config("examples/drflow.yaml").group("orders")
    assert failed_and_target(g, {"evidence": {"agent_id": g.primary.vm}}) == (g.primary, g.standby)
    # Serving from DR after a failover: DR's loss fails over back home.
    assert failed_and_target(g, {"evidence": {"agent_id": g.standby.vm}}) == (g.standby, g.primary)
    assert failed_and_target(g, {"primary_vm": g.standby.vm}) == (g.standby, g.primary)
    assert failed_and_target(g, {}) == (g.primary, g.standby)
