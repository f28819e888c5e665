"""The lab's vCenter fails as real vCenter does: host loss (not responding after S seconds, power
operations that never succeed), host restore with a vSphere HA restart on the spare host, tasks
that stun a VM, one vCenter per site on its own address, TLS.

Against real launchers on loopback, with a short heartbeat timeout (2 s instead of vCenter's 60).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyVim.connect import SmartConnect
from pyVmomi import vim, vmodl

from lab import vcsim
from tests.harness import running_vcsim, vsphere_session

pytestmark = pytest.mark.lab

GROUPS = ["orders", "billing", "crm", "hr"]
NOT_RESPONDING_AFTER = 2.0
POWER_TASKS = ("PowerOffVM_Task", "PowerOnVM_Task", "ResetVM_Task", "SuspendVM_Task")


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_vcsim(tmp_path_factory.mktemp("vc-faults"), GROUPS) as info:
        yield info


@pytest.fixture(scope="module")
def si(vc: dict[str, Any]) -> Iterator[vim.ServiceInstance]:
    with vsphere_session(vc) as conn:
        yield conn


def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` until true; the time.time() it became true."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.time()


def _task_outcome(task: vim.Task, timeout: float) -> tuple[str, Any, float]:
    """(state, error, time.time() when it ended or the wait gave up), waiting at most `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        info = task.info
        if info.state in ("success", "error") or time.monotonic() > deadline:
            return str(info.state), info.error, time.time()
        time.sleep(0.02)


def _host(vc: dict[str, Any], vm: str) -> str:
    return str(vc["vms"][vm]["esx_host"])


def test_host_loss_follows_vcenter_timeline_and_power_operations_never_succeed(
        vc: dict[str, Any], si: vim.ServiceInstance) -> None:
    vm, host = "orders-prod", _host(vc, "orders-prod")
    neighbours = [f"{g}-prod" for g in GROUPS if g != "orders"]
    at = vcsim.host_loss(vc["url"], vm, not_responding_after=NOT_RESPONDING_AFTER)
    assert abs(time.time() - at) < 1.0
    # Before vCenter's heartbeat timeout nothing shows.
    assert vcsim.vm_power_state(si, vm) == "poweredOn"
    assert vcsim.vm_connection_state(si, vm) == "connected"
    assert vcsim.host_connection_state(si, host) == "connected"
    # A fence started now is accepted as a task that runs, then fails: it never succeeds.
    fence = vcsim.find_vm(si, vm).PowerOffVM_Task()
    assert fence.info.state in ("queued", "running")
    assert fence in list(vcsim.find_vm(si, vm).recentTask)
    # A guest shutdown is a plain call: it hangs until vCenter gives up on the host.
    t0 = time.time()
    with pytest.raises(vmodl.fault.HostCommunication):
        vcsim.find_vm(si, vm).ShutdownGuest()
    assert time.time() >= at + NOT_RESPONDING_AFTER - 0.05, "the guest call did not hang"
    assert time.time() - t0 < NOT_RESPONDING_AFTER + 1.0
    state, error, ended = _task_outcome(fence, timeout=NOT_RESPONDING_AFTER + 3)
    assert state == "error", f"PowerOff on a lost host ended {state}"
    assert isinstance(error, vmodl.fault.HostCommunication)
    assert ended >= at + NOT_RESPONDING_AFTER - 0.05
    # From the heartbeat timeout on: host notResponding, VM disconnected, power state frozen.
    seen = _until(lambda: vcsim.host_connection_state(si, host) == "notResponding", 2.0,
                  "host notResponding")
    assert seen - at < NOT_RESPONDING_AFTER + 0.5
    vm_obj: Any = vcsim.find_vm(si, vm)
    assert vm_obj.runtime.connectionState == "disconnected"
    assert vm_obj.summary.runtime.connectionState == "disconnected"
    assert vm_obj.runtime.host.summary.runtime.connectionState == "notResponding"
    assert vm_obj.runtime.powerState == "poweredOn"
    # Now every power operation fails at once.
    for method in POWER_TASKS:
        t0 = time.time()
        state, error, ended = _task_outcome(getattr(vm_obj, method)(), timeout=3.0)
        assert state == "error" and isinstance(error, vim.fault.InvalidHostConnectionState), method
        assert ended - t0 < 1.0, f"{method} did not fail at once"
    with pytest.raises(vim.fault.InvalidHostConnectionState):
        vm_obj.RebootGuest()
    assert vcsim.vm_power_state(si, vm) == "poweredOn"
    # The rest of the site is untouched: its VMs sit on hosts of their own.
    for other in neighbours:
        assert _host(vc, other) != host
        assert vcsim.vm_connection_state(si, other) == "connected"
        assert vcsim.host_connection_state(si, _host(vc, other)) == "connected"
    vcsim.power_off(si, neighbours[0])
    vcsim.power_on(si, neighbours[0])
    # The host comes back: connected again, and power operations work.
    restored = vcsim.host_restore(vc["url"], vm)
    assert restored >= at + NOT_RESPONDING_AFTER
    assert vcsim.host_connection_state(si, host) == "connected"
    assert vcsim.vm_connection_state(si, vm) == "connected"
    assert vcsim.vm_host(si, vm) == host
    vcsim.power_off(si, vm)
    assert vcsim.vm_power_state(si, vm) == "poweredOff"
    vcsim.power_on(si, vm)


def test_management_only_loss_shows_the_same_in_vcenter(vc: dict[str, Any],
                                                         si: vim.ServiceInstance) -> None:
    vm, host = "hr-dr", _host(vc, "hr-dr")
    at = vcsim.host_loss(vc["url"], vm, not_responding_after=0.3, mgmt_only=True)
    try:
        _until(lambda: vcsim.vm_connection_state(si, vm) == "disconnected", 2.0, "VM disconnected")
        assert time.time() - at >= 0.3
        assert vcsim.host_connection_state(si, host) == "notResponding"
        state, error, _ = _task_outcome(vcsim.find_vm(si, vm).PowerOffVM_Task(), timeout=3.0)
        assert state == "error" and isinstance(error, vim.fault.InvalidHostConnectionState)
    finally:
        vcsim.host_restore(vc["url"], vm)


def _watch_power(vc: dict[str, Any], vm: str, seen: list[tuple[float, str]],
                 ready: threading.Event, stop: threading.Event) -> None:
    """Record (time.time(), powerState) for every change WaitForUpdatesEx reports."""
    with vsphere_session(vc) as si:
        pc = vmodl.query.PropertyCollector
        collector = si.content.propertyCollector.CreatePropertyCollector()
        collector.CreateFilter(pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=vcsim.find_vm(si, vm), skip=False)],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["runtime.powerState"])],
        ), partialUpdates=False)
        version = ""
        while not stop.is_set():
            update = collector.WaitForUpdatesEx(version, pc.WaitOptions(maxWaitSeconds=1))
            if update is None:
                continue
            version = update.version
            for fs in update.filterSet or []:
                for obj in fs.objectSet or []:
                    for change in obj.changeSet or []:
                        seen.append((time.time(), str(change.val)))
            ready.set()


def test_host_restore_with_ha_restarts_the_vm_on_the_spare_host(vc: dict[str, Any],
                                                                 si: vim.ServiceInstance) -> None:
    vm, host = "crm-prod", _host(vc, "crm-prod")
    spare = vc["spare_hosts"]["prod"]
    assert spare == "esx-prod-spare" and spare in vc["hosts"]["prod"]
    vcsim.host_loss(vc["url"], vm, not_responding_after=0.2)
    _until(lambda: vcsim.vm_connection_state(si, vm) == "disconnected", 2.0, "VM disconnected")
    seen: list[tuple[float, str]] = []
    ready, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch_power, args=(vc, vm, seen, ready, stop), daemon=True)
    watcher.start()
    try:
        assert ready.wait(10), "the watcher got no initial update"
        at = vcsim.host_restore(vc["url"], vm, ha=True)
        assert vcsim.vm_host(si, vm) == spare
        assert vcsim.vm_connection_state(si, vm) == "connected"
        assert vcsim.host_connection_state(si, host) == "connected"
        on = _until(lambda: vcsim.vm_power_state(si, vm) == "poweredOn", 5.0, "HA power-on")
        assert 1.5 < on - at < 3.5
        _until(lambda: [s for _, s in seen][-2:] == ["poweredOff", "poweredOn"], 3.0,
               f"watcher saw poweredOff then poweredOn (saw {seen})")
    finally:
        stop.set()
        watcher.join(5)
    states = [s for _, s in seen]
    assert states[0] == "poweredOn"  # the initial state
    off_at = next(t for t, s in seen if s == "poweredOff")
    on_at = next(t for t, s in seen[1:] if s == "poweredOn")
    assert on_at - off_at > 1.0
    vcsim.power_off(si, vm)  # power operations work on the spare
    vcsim.power_on(si, vm)


def test_stun_tasks_run_for_the_asked_time_then_succeed(vc: dict[str, Any],
                                                        si: vim.ServiceInstance) -> None:
    vm = "billing-prod"
    seconds = 1.5
    answer = vcsim.stun_task(vc["url"], vm, "snapshot", seconds)
    assert abs(answer["at"] - time.time()) < 1.0
    task = vim.Task(answer["task"], si._stub)
    content: Any = si.content
    assert task in list(vcsim.find_vm(si, vm).recentTask)
    assert task in list(content.taskManager.recentTask)
    assert task.info.state == "running"
    assert task.info.descriptionId == "VirtualMachine.createSnapshot"
    last_running = time.time()
    while task.info.state == "running":
        last_running = time.time()
        assert last_running - answer["at"] < seconds + 1.0, "the stun task does not end"
        time.sleep(0.02)
    info: Any = task.info
    assert info.state == "success"
    ran = (info.completeTime - info.startTime).total_seconds()
    assert abs(ran - seconds) <= 0.2, f"the task ran {ran:.3f} s, not {seconds} s"
    assert last_running - answer["at"] >= seconds - 0.2, "not visible running for the asked time"
    snapshots = vcsim.find_vm(si, vm).snapshot
    assert snapshots is not None and snapshots.currentSnapshot == info.result
    # vMotion: a RelocateVM task, then the VM is on another host.
    vm = "billing-dr"
    before = vcsim.vm_host(si, vm)
    answer = vcsim.stun_task(vc["url"], vm, "vmotion", 0.5)
    assert answer["from_host"] == before and answer["to_host"] == vc["spare_hosts"]["dr"]
    task = vim.Task(answer["task"], si._stub)
    assert task.info.state == "running" and vcsim.vm_host(si, vm) == before
    state, error, ended = _task_outcome(task, timeout=3.0)
    assert state == "success", error
    assert abs(ended - answer["ends_at"]) < 0.3
    assert vcsim.vm_host(si, vm) == vc["spare_hosts"]["dr"]
    assert vcsim.vm_power_state(si, vm) == "poweredOn"


def test_hooks_refuse_unknown_vms_and_bad_arguments(vc: dict[str, Any]) -> None:
    with pytest.raises(LookupError, match="no VM named nope"):
        vcsim.host_loss(vc["url"], "nope")
    with pytest.raises(LookupError):
        vcsim.stun_task(vc["url"], "nope", "snapshot", 1)
    with pytest.raises(ValueError, match="not_responding_after"):
        vcsim.host_loss(vc["url"], "orders-dr", not_responding_after=-1)
    with pytest.raises(ValueError, match="task must be"):
        vcsim.stun_task(vc["url"], "orders-dr", "reboot", 1)
    with pytest.raises(ValueError, match="seconds"):
        vcsim.stun_task(vc["url"], "orders-dr", "snapshot", float("nan"))
    base = vc["url"].removesuffix("/sdk")
    assert httpx.get(f"{base}/drflow/host-loss?vm=orders-dr", timeout=5).status_code == 405
    r = httpx.post(f"{base}/drflow/host-restore?vm=orders-dr&ha=maybe", timeout=5)
    assert r.status_code == 400 and "ha must be" in r.json()["error"]


def test_one_site_on_its_own_address(tmp_path: Path) -> None:
    info = vcsim.start_vcsim(tmp_path, ["crm"], sites=("prod",), listen="127.0.0.2",
                             name="vcsim-prod")
    try:
        assert info["url"].startswith("http://127.0.0.2:")
        assert (tmp_path / "vcsim-prod.json").exists() and info["log"].endswith("vcsim-prod.log")
        assert set(info["vms"]) == {"crm-prod"} and set(info["hosts"]) == {"prod"}
        with vsphere_session(info) as si:
            dcs = {e.name for e in si.content.rootFolder.childEntity if isinstance(e, vim.Datacenter)}
            assert dcs == {"prod"}
            assert set(vcsim.vms_by_name(si)) == {"crm-prod"}
        with pytest.raises(httpx.ConnectError):  # bound to the given address only
            httpx.get(f"http://127.0.0.1:{info['port']}/about", timeout=2)
        ok, detail = vcsim.health(info)
        assert ok, detail
    finally:
        vcsim.stop_vcsim(info)


def test_faults_and_disabled_methods_over_tls(tmp_path: Path) -> None:
    info = vcsim.start_vcsim(tmp_path, ["crm", "hr"], tls=True)
    try:
        assert info["url"].startswith("https://")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        si = SmartConnect(host=info["host"], port=info["port"], user=info["user"],
                          pwd=info["password"], sslContext=context)
        vcsim.host_loss(info["url"], "crm-prod", not_responding_after=0)
        assert vcsim.vm_connection_state(si, "crm-prod") == "disconnected"
        state, error, _ = _task_outcome(vcsim.find_vm(si, "crm-prod").PowerOffVM_Task(), 3.0)
        assert state == "error" and isinstance(error, vim.fault.InvalidHostConnectionState)
        r = httpx.post(info["url"].removesuffix("/sdk") + "/drflow/disabled-methods",
                       params={"vm": "hr-prod", "method": "PowerOffVM_Task"}, verify=False, timeout=5)
        r.raise_for_status()
        with pytest.raises(vim.fault.MethodDisabled):
            vcsim.find_vm(si, "hr-prod").PowerOffVM_Task()
        vcsim.host_restore(info["url"], "crm-prod")
        vcsim.power_off(si, "crm-prod")
        assert vcsim.vm_power_state(si, "crm-prod") == "poweredOff"
    finally:
        vcsim.stop_vcsim(info)
