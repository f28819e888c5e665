"""vSphere steps of the runbooks (pyvmomi): power state, fencing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr
from pyVmomi import vim, vmodl

from drflow.vsphere import login, vm_names
from tasks.errors import DrillError

# A hung vCenter must fail a step, not hang it: every call is bounded by this socket timeout.
VCENTER_TIMEOUT_S = 5
READ_DEADLINE_S = 6.0
FENCE_DEADLINE_S = 30.0
_lock = threading.Lock()
_sessions: dict[tuple[str, str], Any] = {}


@dataclass(frozen=True)
class VCenter:
    url: str
    user: str
    password: SecretStr
    datacenter: str | None = None
    verify_tls: bool = True

    def __str__(self) -> str:
        return f"{self.user}@{self.url}"


def connect(vc: VCenter, fresh: bool = False) -> Any:
    """A ServiceInstance, reused across calls (login costs round trips we can't afford mid-failover).

    The lock guards only the session table, never network I/O: a hung vCenter must not block
    the deadline in `bounded` from giving up on it.
    """
    key = (vc.url, vc.user)
    with _lock:
        si = None if fresh else _sessions.get(key)
    if si is not None:
        try:
            si.CurrentTime()
            return si
        except Exception:  # a dead session: log in again
            with _lock:
                _sessions.pop(key, None)
    si = login(vc.url, vc.user, vc.password, vc.verify_tls, VCENTER_TIMEOUT_S)
    with _lock:
        _sessions[key] = si
    return si


def datacenter_named(si: Any, name: str) -> Any:
    """The datacenter called `name` (in any folder); LookupError naming the ones there are."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datacenter], True)
    try:
        dcs = list(view.view)
    finally:
        view.DestroyView()
    for dc in dcs:
        if dc.name == name:
            return dc
    raise LookupError(f"no datacenter {name!r} in vCenter; there: {sorted(d.name for d in dcs)}")


def vms_by_name(si: Any, datacenter: str | None = None) -> dict[str, Any]:
    """Every VM by name, in one PropertyCollector round trip (not one per VM).

    With `datacenter`, only that datacenter's VMs: one vCenter (or linked mode) often holds
    both sites, and a DR VM is often named like the VM it protects. A name that two VMs
    share within the scope maps to None: acting on either could be acting on the wrong one.
    """
    root = (si.RetrieveContent().rootFolder if datacenter is None
            else datacenter_named(si, datacenter).vmFolder)
    found: dict[str, Any] = {}
    for name, vm in vm_names(si, root):
        found[name] = None if name in found else vm
    return found


def find_vm(si: Any, name: str, datacenter: str | None = None) -> Any:
    """The one VM called `name` in `datacenter` (the whole vCenter if None)."""
    where = f" in datacenter {datacenter!r}" if datacenter else " in vCenter"
    found = vms_by_name(si, datacenter)
    if name not in found:
        raise LookupError(f"VM {name!r} not found{where}")
    vm = found[name]
    if vm is None:
        raise LookupError(f"several VMs named {name!r}{where}: refusing to pick one")
    return vm


def bounded(fn: Callable[[], tuple[str | None, str | None]], seconds: float,
            what: str) -> tuple[str | None, str | None]:
    """Run a vSphere exchange with a deadline on the whole of it: a login alone is several
    requests, each with its own socket timeout. Past the deadline the state is unknown."""
    box: list[tuple[str | None, str | None]] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True, name=what)
    t.start()
    t.join(seconds)
    if not box:
        with _lock:  # the session may be wedged: the next call logs in again
            _sessions.clear()
        return None, f"vCenter did not answer {what} within {seconds:.0f} s"
    return box[0]


def read_power_state(vc: VCenter, vm_name: str) -> tuple[str | None, str | None]:
    """(power state, error). None when vCenter cannot tell us: an unknown state."""
    def read() -> tuple[str | None, str | None]:
        try:
            vm = find_vm(connect(vc), vm_name, vc.datacenter)
            return str(vm.runtime.powerState), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return bounded(read, READ_DEADLINE_S, f"the power state of {vm_name}")


@task(name="read power state", cache_policy=NO_CACHE)
def power_state(vc: VCenter, vm_name: str) -> tuple[str | None, str | None]:
    return read_power_state(vc, vm_name)


@task(name="fence old primary", cache_policy=NO_CACHE)
def fence(vc: VCenter, vm_name: str) -> tuple[str | None, str | None]:
    """Power the VM off; an already-off VM is fenced. Returns the power state seen afterwards."""
    return bounded(lambda: _power_off(vc, vm_name), FENCE_DEADLINE_S, f"powering off {vm_name}")


def _power_off(vc: VCenter, vm_name: str) -> tuple[str | None, str | None]:
    try:
        vm = find_vm(connect(vc), vm_name, vc.datacenter)
        if vm.runtime.powerState != "poweredOff":
            wait_task(vm.PowerOffVM_Task(), timeout=FENCE_DEADLINE_S - 5)
    except vim.fault.InvalidPowerState:
        pass  # already off between our read and the call
    except TaskFailed as exc:
        if not isinstance(exc.fault, vim.fault.InvalidPowerState):
            state, _ = read_power_state(vc, vm_name)
            return state, str(exc)[:200]
    except Exception as exc:
        state, _ = read_power_state(vc, vm_name)
        return state, f"{type(exc).__name__}: {str(exc)[:200]}"
    return read_power_state(vc, vm_name)


class TaskFailed(RuntimeError):
    """A vSphere task ended in error; `fault` is vCenter's fault object."""

    def __init__(self, message: str, fault: Any) -> None:
        super().__init__(message)
        self.fault = fault


def wait_task(t: Any, timeout: float = 120.0) -> Any:
    """Wait for a vSphere task; its result, or TaskFailed / TimeoutError."""
    deadline = time.monotonic() + timeout
    while t.info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
        if time.monotonic() > deadline:
            raise TimeoutError(f"vSphere task {t.info.key} still running after {timeout:.0f} s")
        time.sleep(0.05)
    if t.info.state == vim.TaskInfo.State.error:
        err = t.info.error
        raise TaskFailed(f"vSphere task {t.info.descriptionId} failed: "
                         f"{getattr(err, 'msg', None) or type(err).__name__}", err)
    return t.info.result


# --- the drill's clone of the DR VM on the isolated port group ----------------------------------


@dataclass(frozen=True)
class IsolationFacts:
    """What vCenter says about the isolated port group on the standby VM's host."""

    error: str | None = None
    host: str | None = None
    portgroup_found: bool = False
    distributed: bool = False
    vswitch: str | None = None
    pnics: tuple[str, ...] = ()
    bridged: bool = False
    other_portgroups: tuple[str, ...] = ()  # other port groups sharing the vSwitch
    standby_networks: tuple[str, ...] = ()  # networks the standby VM's NICs are on
    attached_vms: tuple[str, ...] = ()  # VMs with a NIC on the isolated port group
    bridging_vms: tuple[str, ...] = ()  # ...of which also on another network


def isolation_facts(vc: VCenter, standby_vm: str, portgroup: str) -> IsolationFacts:
    """Read the isolated port group's vSwitch on the standby VM's host (read-only)."""
    try:
        si = connect(vc)
        vm = find_vm(si, standby_vm, vc.datacenter)
        host = vm.runtime.host
        standby_networks = tuple(str(n.name) for n in vm.network)
        info = host.configManager.networkSystem.networkInfo
        pgs = {p.spec.name: p for p in info.portgroup or []}
        net = next((n for n in host.network if n.name == portgroup), None)
        if portgroup not in pgs:
            dist = isinstance(net, vim.dvs.DistributedVirtualPortgroup)
            return IsolationFacts(host=str(host.name), portgroup_found=dist, distributed=dist,
                                  standby_networks=standby_networks)
        pg = pgs[portgroup]
        sw = next((s for s in info.vswitch or [] if s.name == pg.spec.vswitchName), None)
        if sw is None:
            return IsolationFacts(error=f"port group {portgroup!r} names vSwitch "
                                        f"{pg.spec.vswitchName!r}, which the host does not have")
        # Read from the VMs' side: vcsim does not keep Network.vm up to date for clones.
        net_names = {n._moId: str(n.name) for n in host.network}
        on_host = _vm_networks(si, list(host.vm), net_names)
        attached = [name for name, nets in on_host.items() if portgroup in nets]
        return IsolationFacts(
            host=str(host.name), portgroup_found=True, vswitch=str(sw.name),
            pnics=tuple(str(p).removeprefix("key-vim.host.PhysicalNic-") for p in sw.pnic or []),
            bridged=sw.spec is not None and sw.spec.bridge is not None,
            other_portgroups=tuple(str(p.spec.name) for p in info.portgroup
                                   if p.spec.vswitchName == sw.name and p.spec.name != portgroup),
            standby_networks=standby_networks,
            attached_vms=tuple(sorted(attached)),
            bridging_vms=tuple(sorted(n for n in attached if on_host[n] - {portgroup})),
        )
    except Exception as exc:
        return IsolationFacts(error=f"vCenter {vc.url}: {type(exc).__name__}: {str(exc)[:200]}")


def vcenter_facts(vc: VCenter, standby_vm: str) -> tuple[bool, str]:
    """(reachable, detail): log in and find the standby VM."""
    try:
        vm = find_vm(connect(vc), standby_vm, vc.datacenter)
        return True, f"{vc.url} answers; {standby_vm} is {vm.runtime.powerState}"
    except Exception as exc:
        return False, f"{vc.url}: {type(exc).__name__}: {str(exc)[:200]}"


def _wait_task(t: Any, timeout: float = 120.0) -> Any:
    try:
        return wait_task(t, timeout)
    except TaskFailed as exc:
        raise DrillError(str(exc)) from None


def _nics(vm: Any) -> list[Any]:
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def _vm_networks(si: Any, vms: list[Any], net_names: dict[str, str]) -> dict[str, set[str]]:
    """{VM name: names of its networks} for `vms`, in one property-collector round trip
    (`net_names` maps network ids to names; an unknown network counts by its id)."""
    if not vms:
        return {}
    pc = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=vm, skip=False) for vm in vms],
        propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["name", "network"])])
    content = si.RetrieveContent()
    found: dict[str, set[str]] = {}
    result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
    while result is not None:
        for obj in result.objects:
            props = {p.name: p.val for p in obj.propSet}
            found[str(props.get("name"))] = {net_names.get(n._moId, n._moId)
                                             for n in props.get("network") or []}
        if not result.token:
            break
        result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
    return found


def drill_vms(vc: VCenter, prefix: str) -> list[str]:
    """Names of the VMs a drill of this group may have made (leftovers included)."""
    return sorted(n for n in vms_by_name(connect(vc), vc.datacenter)
                  if n.startswith(prefix))


# No task timeout: it runs beside the copy in a worker thread, where Prefect cannot enforce one;
# each vCenter task it waits for is bounded (`_wait_task`).
@task(name="clone the DR VM into the bubble", cache_policy=NO_CACHE)
def clone_into_bubble(vc: VCenter, standby_vm: str, clone_name: str,
                      portgroup: str) -> dict[str, Any]:
    """Clone the standby VM with every NIC moved to the isolated port group, check, power on."""
    si = connect(vc)
    src = find_vm(si, standby_vm, vc.datacenter)
    host = src.runtime.host
    net = next((n for n in host.network if n.name == portgroup), None)
    if net is None:
        raise DrillError(f"host {host.name} has no network {portgroup!r}")
    changes = []
    for nic in _nics(src):
        nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=portgroup, network=net)
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=nic))
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=src.resourcePool, host=host),
        powerOn=False, template=False, config=vim.vm.ConfigSpec(deviceChange=changes))
    clone = _wait_task(src.CloneVM_Task(folder=src.parent, name=clone_name, spec=spec))
    networks = sorted({str(n.backing.deviceName) for n in _nics(clone)})
    if set(networks) - {portgroup}:
        _destroy(clone)
        raise DrillError(f"clone {clone_name} came out on {networks}, not only on {portgroup!r}: "
                         "destroyed it before powering on")
    # vcsim (and a CloneSpec on some vCenter versions) does not power on: do it ourselves.
    with contextlib.suppress(vim.fault.InvalidPowerState):
        _wait_task(clone.PowerOnVM_Task())
    return {"clone": clone_name, "host": str(host.name), "networks": networks,
            "power_state": str(clone.runtime.powerState)}


def _destroy(vm: Any) -> None:
    if vm.runtime.powerState != "poweredOff":
        with contextlib.suppress(vim.fault.InvalidPowerState):
            _wait_task(vm.PowerOffVM_Task())
    _wait_task(vm.Destroy_Task())


@task(name="destroy drill clones", retries=2, retry_delay_seconds=1, timeout_seconds=300,
      cache_policy=NO_CACHE)
def destroy_clones(vc: VCenter, prefix: str, portgroup: str) -> tuple[list[str], list[str]]:
    """Destroy VMs named `prefix…` whose NICs are all on the isolated port group.

    Returns (destroyed, refused): a VM with the prefix but a NIC elsewhere is not a drill clone
    this code made, so it is left alone and reported.
    """
    si = connect(vc)
    destroyed, refused = [], []
    for name, vm in sorted(vms_by_name(si, vc.datacenter).items()):
        if not name.startswith(prefix):
            continue
        if vm is None:
            refused.append(f"{name} (several VMs by that name: not sure which is ours)")
            continue
        if any(str(n.backing.deviceName) != portgroup for n in _nics(vm)):
            refused.append(f"{name} (has a NIC outside {portgroup!r}: not a drill clone)")
            continue
        _destroy(vm)
        destroyed.append(name)
    return destroyed, refused


# --- the failover's fence: what vCenter shows of the old primary, a bounded power-off ----------

# Tasks that stun a VM (quiesce for a snapshot, switch-over of a migration): a VM frozen by one
# is alive, and its agent re-acquires its lease when it thaws.
STUN_TASKS = ("CreateSnapshot_Task", "RelocateVM_Task", "MigrateVM_Task")
_STUN_IDS = ("createSnapshot", "relocate", "migrate")


@dataclass(frozen=True)
class VmState:
    """Power state, host connection state and a running stun task (None each when unknown)."""

    power_state: str | None
    host_connection: str | None = None
    stun_task: str | None = None
    error: str | None = None


def _task_name(info: Any) -> str:
    """The task's method name: pyVmomi turns `info.name` into a method object."""
    name = getattr(info, "name", None)
    method_info = getattr(name, "info", None)
    return str(getattr(method_info, "wsdlName", None) or name or info.descriptionId or "")


def _is_stun(info: Any) -> bool:
    desc = str(getattr(info, "descriptionId", "") or "")
    return _task_name(info) in STUN_TASKS or desc.rsplit(".", 1)[-1] in _STUN_IDS


def read_vm_state(vc: VCenter, vm_name: str, seconds: float) -> VmState:
    """One bounded look at the VM: its power state, its host's connection state, and whether a
    snapshot / relocate / migrate task runs on it now (vm.recentTask)."""
    box: list[VmState] = []

    def read() -> None:
        try:
            vm = find_vm(connect(vc), vm_name, vc.datacenter)
            rt = vm.runtime
            host = rt.host
            conn = str(host.runtime.connectionState) if host is not None else None
            stun = None
            for t in vm.recentTask or []:
                info = t.info
                if str(info.state) in ("running", "queued") and _is_stun(info):
                    stun = f"{_task_name(info)} ({t._moId})"
                    break
            box.append(VmState(str(rt.powerState), conn, stun))
        except Exception as exc:
            box.append(VmState(None, error=f"{type(exc).__name__}: {str(exc)[:200]}"))

    th = threading.Thread(target=read, daemon=True, name=f"vm-state-{vm_name}")
    th.start()
    th.join(seconds)
    if not box:
        with _lock:  # the session may be wedged: the next call logs in again
            _sessions.clear()
        return VmState(None, error=f"vCenter did not answer within {seconds:g} s")
    return box[0]


class PowerOff:
    """A power-off of a VM running in a thread: the fence looks at it without waiting for it."""

    def __init__(self, vc: VCenter, vm_name: str) -> None:
        self.vm_name = vm_name
        self.started = time.monotonic()
        self._box: list[tuple[str | None, str | None]] = []
        self._thread = threading.Thread(target=lambda: self._box.append(_power_off(vc, vm_name)),
                                        daemon=True, name=f"power-off-{vm_name}")
        self._thread.start()

    def result(self, wait_s: float = 0.0) -> tuple[str | None, str | None] | None:
        """(power state after, error) once done; None while it still runs."""
        self._thread.join(max(0.0, wait_s))
        return self._box[0] if self._box else None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started
