"""The failover's fence and takeover decisions (flows/fencing.py): observations → what to do."""

from __future__ import annotations

from dataclasses import replace

from drflow.leader_keys import Leader
from flows.fencing import (
    FenceView,
    Receiver,
    TakeoverView,
    VmView,
    decide_fence,
    fence_wait_limit,
    receiver_gone,
    takeover_outcome,
)

ON = VmView("poweredOn", "connected")
STUN = VmView("poweredOn", "connected", stun_task="CreateSnapshot_Task (task-7)")
GONE = Receiver(True, None, detail="no WAL receiver")
STREAMING = Receiver(True, "streaming", "10.0.1.5:5432", 0.3)
OLD = Leader("orders-prod", "agent")


def view(**kw: object) -> FenceView:
    base = FenceView(group="orders", old_vm="orders-prod", new_vm="orders-dr",
                     incident="failover:orders:1", lease_s=3, stun_grace_s=10, waited_s=0.5,
                     vm=ON, etcd=True, limit_s=fence_wait_limit(3))
    return replace(base, **kw)  # type: ignore[arg-type]


def test_vsphere_powered_off_is_a_fence() -> None:
    d = decide_fence(view(vm=VmView("poweredOff", "connected"), leader=OLD))
    assert d.action == "fenced" and d.fence == "vsphere" and "powered off" in d.reason


def test_lease_expired_and_standby_not_receiving_is_a_fence() -> None:
    d = decide_fence(view(power_off_tried=True, receiver=GONE))
    assert d.action == "fenced" and d.fence == "lease"
    assert "absent" in d.reason and "no WAL receiver" in d.reason


def test_lease_expired_but_standby_still_receives_is_no_fence() -> None:
    v = view(power_off_tried=True, receiver=STREAMING)
    d = decide_fence(v)
    assert d.action == "wait" and "still receives" in d.reason
    d = decide_fence(replace(v, waited_s=v.limit_s))
    assert d.action == "stop" and d.outcome == "not_fenced"
    assert "--declare-fenced" in d.reason


def test_stale_receiver_counts_as_gone_fresh_does_not() -> None:
    assert receiver_gone(Receiver(True, "streaming", "x", 1.6), 3)[0]
    assert not receiver_gone(Receiver(True, "streaming", "x", 1.4), 3)[0]
    assert receiver_gone(Receiver(True, "waiting"), 3)[0]
    assert not receiver_gone(Receiver(False, detail="timeout"), 3)[0]  # unknown is not gone


def test_a_held_lease_is_waited_for_then_a_live_primary_stops_the_failover() -> None:
    v = view(leader=OLD, power_off_tried=True)
    assert decide_fence(v).action == "wait"
    d = decide_fence(replace(v, waited_s=v.limit_s + 0.1))
    assert d.action == "stop" and d.outcome == "primary_alive"


def test_no_power_off_while_the_old_primary_holds_its_lease() -> None:
    # Its agent renews the key: alive, whatever the heartbeats or a vCenter read said.
    for vm in (ON, VmView(None, error="timeout"), VmView("poweredOn", "notResponding")):
        d = decide_fence(view(leader=OLD, vm=vm))
        assert d.action == "wait" and "no power-off of a live primary" in d.reason, (vm, d)
    d = decide_fence(view(leader=OLD, waited_s=fence_wait_limit(3) + 0.1))
    assert d.action == "stop" and d.outcome == "primary_alive"


def test_power_off_tried_unless_a_stun_is_visible() -> None:
    assert decide_fence(view(receiver=STREAMING)).action == "power_off"
    assert decide_fence(view(leader=OLD, vm=STUN)).action == "wait"
    assert decide_fence(view(vm=STUN, receiver=GONE)).action == "wait"
    # A snapshot task on a VM whose host vCenter no longer hears is no visible stun.
    lost = replace(STUN, host_connection="notResponding")
    assert decide_fence(view(vm=lost, receiver=STREAMING)).action == "power_off"


def test_stun_waits_for_the_grace_then_the_lease_decides() -> None:
    v = view(vm=STUN, receiver=GONE, stun_seen_at=0.2, waited_s=5)
    d = decide_fence(v)
    assert d.action == "wait" and "stun" in d.reason and "10 s" in d.reason
    d = decide_fence(replace(v, waited_s=10.3))
    assert d.action == "fenced" and d.fence == "lease"


def test_a_thawed_primary_that_re_acquired_stops_the_failover() -> None:
    d = decide_fence(view(vm=ON, leader=OLD, stun_seen_at=0.1, waited_s=4))
    assert d.action == "stop" and d.outcome == "reacquired"
    assert "thawed and re-acquired" in d.reason
    d = decide_fence(view(leader=OLD, key_seen_absent=True, waited_s=4))
    assert d.action == "stop" and d.outcome == "reacquired"


def test_etcd_unreachable_tries_a_power_off_then_is_not_fenced_naming_the_command() -> None:
    v = view(etcd_error="connection refused")
    assert decide_fence(v).action == "power_off"
    d = decide_fence(replace(v, power_off_tried=True, power_off_error="did not complete"))
    assert d.action == "stop" and d.outcome == "not_fenced"
    assert "drflow failover orders --declare-fenced --reason TEXT" in d.reason


def test_without_leases_vsphere_is_the_only_proof() -> None:
    v = view(etcd=False)
    assert decide_fence(v).action == "power_off"
    assert decide_fence(replace(v, vm=STUN, stun_seen_at=0.0)).action == "wait"
    d = decide_fence(replace(v, power_off_tried=True, vm=VmView(None, error="timeout")))
    assert d.action == "stop" and d.outcome == "not_fenced"


def test_attested_is_a_fence() -> None:
    d = decide_fence(view(attested="U1, U2 attested", etcd_error="no quorum"))
    assert d.action == "fenced" and d.fence == "attested"


def test_a_re_run_accepts_its_own_takeover_and_stops_on_anothers() -> None:
    mine = Leader("orders-dr", "takeover", "failover:orders:1")
    d = decide_fence(view(leader=mine))
    assert d.action == "fenced" and d.fence == "taken_over"
    other = Leader("orders-dr", "takeover", "failover:orders:0")
    d = decide_fence(view(leader=other))
    assert d.action == "stop" and d.outcome == "superseded"
    d = decide_fence(view(leader=Leader("orders-dr", "agent")))
    assert d.action == "fenced" and d.fence == "taken_over"


def tk(**kw: object) -> TakeoverView:
    base = TakeoverView(succeeded=False, new_vm="orders-dr", old_vm="orders-prod",
                        incident="failover:orders:1", sync_required=True)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_takeover_outcomes() -> None:
    assert takeover_outcome(tk(succeeded=True), False).action == "fenced"
    d = takeover_outcome(tk(leader=OLD), False)
    assert d.action == "stop" and d.outcome == "reacquired"
    d = takeover_outcome(tk(leader=Leader("orders-dr", "takeover", "failover:orders:0")), False)
    assert d.action == "stop" and d.outcome == "superseded"
    d = takeover_outcome(tk(leader=Leader("orders-dr", "takeover", "failover:orders:1")), False)
    assert d.action == "fenced"


def test_takeover_refuses_a_standby_the_sync_key_does_not_name_unless_forced() -> None:
    d = takeover_outcome(tk(sync_present=True, sync_standby=None), False)
    assert d.action == "stop" and d.outcome == "refused" and "stale standby" in d.reason
    assert "names no standby" in d.reason
    d = takeover_outcome(tk(sync_present=True, sync_standby=None), True)
    assert d.action == "retry" and "override" in d.reason
    d = takeover_outcome(tk(sync_present=True, sync_standby="orders-dr"), False)
    assert d.action == "retry"


def test_after_a_stun_ends_the_grace_still_runs_before_the_lease_decides() -> None:
    # The task ended with the thaw; the agent has not re-acquired yet; the standby's receiver
    # timed out during the freeze: no takeover yet.
    v = view(vm=ON, receiver=GONE, stun_seen_at=0.2, waited_s=5.1)
    d = decide_fence(v)
    assert d.action == "wait" and "was seen stunned" in d.reason
    assert decide_fence(replace(v, waited_s=10.3)).fence == "lease"


def test_without_leases_a_stun_that_ended_stops_without_a_power_off() -> None:
    d = decide_fence(view(etcd=False, vm=ON, stun_seen_at=0.2, waited_s=5))
    assert d.action == "stop" and d.outcome == "thawed"
