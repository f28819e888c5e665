"""Create a standby VM from a template, and take it away again (pyvmomi).

`create_from_template` is idempotent: a re-run finds the VM it made (same name, same
datacenter) and finishes what is left (sizing, customization, power-on), or says why the VM
that has that name is not one it can use. vCenter's customization gives the VM its host name
and fixed address on its first power-on; the VM is ready when VMware Tools reports that address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from tasks.vsphere import TaskFailed, VCenter, connect, datacenter_named, vms_by_name, wait_task


class ProvisionError(RuntimeError):
    """The VM could not be made as asked; the message says which step and what to do."""


@dataclass(frozen=True)
class VmSpec:
    name: str
    template: str
    host: str  # the ESXi host it runs on
    cpus: int
    memory_mb: int
    address: str
    prefix_len: int
    gateway: str | None = None
    domain: str = "local"


def _host(si: Any, datacenter: Any, name: str) -> Any:
    view = si.content.viewManager.CreateContainerView(datacenter.hostFolder, [vim.HostSystem], True)
    try:
        found = [h for h in view.view if h.name == name]
    finally:
        view.DestroyView()
    if len(found) != 1:
        raise ProvisionError(f"no ESXi host named {name!r} in datacenter {datacenter.name}: "
                             "name one of its hosts (`--standby-host`)")
    return found[0]


def _customization(spec: VmSpec) -> Any:
    net = ipaddress.IPv4Network(f"{spec.address}/{spec.prefix_len}", strict=False)
    ip = vim.vm.customization.IPSettings(
        ip=vim.vm.customization.FixedIp(ipAddress=spec.address), subnetMask=str(net.netmask),
        gateway=[spec.gateway] if spec.gateway else [])
    return vim.vm.customization.Specification(
        identity=vim.vm.customization.LinuxPrep(
            hostName=vim.vm.customization.FixedName(name=spec.name), domain=spec.domain),
        globalIPSettings=vim.vm.customization.GlobalIPSettings(),
        nicSettingMap=[vim.vm.customization.AdapterMapping(adapter=ip)])


def create_from_template(vc: VCenter, spec: VmSpec, timeout_s: float = 300.0) -> Any:
    """The VM `spec.name`, cloned from `spec.template` onto `spec.host`, sized, given its name
    and address, powered on, with Tools reporting the address."""
    si = connect(vc)
    dc = datacenter_named(si, vc.datacenter) if vc.datacenter else None
    found = vms_by_name(si, vc.datacenter)
    for name in (spec.template, spec.name):
        if name in found and found[name] is None:
            raise ProvisionError(f"several VMs are named {name!r} in {vc}: not picking one; "
                                 "rename the others")
    template = found.get(spec.template)
    if template is None:
        raise ProvisionError(f"no VM template {spec.template!r} in {vc}: name one that exists "
                             "(`--template`)")
    if not template.config.template:
        raise ProvisionError(f"{spec.template!r} is a VM, not a template: clone from a template, "
                             "or mark it as one in vCenter")
    vm = found.get(spec.name)
    if vm is None:
        dc = dc or _datacenter_of(template)
        host = _host(si, dc, spec.host)
        clone = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(host=host, pool=host.parent.resourcePool),
                                 powerOn=False, template=False)
        try:
            vm = wait_task(template.CloneVM_Task(folder=template.parent, name=spec.name, spec=clone),
                           timeout_s)
        except vim.fault.DuplicateName:
            vm = vms_by_name(si, vc.datacenter)[spec.name]
    elif vm.config.template:
        raise ProvisionError(f"{spec.name!r} already exists in {vc} as a template: choose another "
                             "name for the standby VM")
    if vm.runtime.powerState == "poweredOn":
        if vm.guest.ipAddress not in (None, spec.address):
            raise ProvisionError(f"VM {spec.name} already exists and runs with address "
                                 f"{vm.guest.ipAddress}, not {spec.address}: not ours to reuse; "
                                 "remove it or choose another name")
    else:
        hw = vm.config.hardware
        if (hw.numCPU, hw.memoryMB) != (spec.cpus, spec.memory_mb):
            wait_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(numCPUs=spec.cpus,
                                                           memoryMB=spec.memory_mb)), timeout_s)
        try:
            wait_task(vm.CustomizeVM_Task(_customization(spec)), timeout_s)
        except vim.fault.CustomizationPending:
            pass  # an earlier run's customization waits for the first power-on: fine
        except TaskFailed as exc:
            if not isinstance(exc.fault, vim.fault.CustomizationPending):
                raise
        with contextlib.suppress(vim.fault.InvalidPowerState):
            wait_task(vm.PowerOnVM_Task(), timeout_s)
    deadline = time.monotonic() + timeout_s
    while vm.guest.ipAddress != spec.address:
        if time.monotonic() > deadline:
            raise ProvisionError(f"VM {spec.name} is on but Tools does not report {spec.address} "
                                 f"after {timeout_s:.0f} s (reports {vm.guest.ipAddress}): check the "
                                 "template has VMware Tools and guest customization works")
        time.sleep(0.2)
    # The address comes with customization; guest operations only once the guest has booted.
    while not guest_operations_ready(vm.guest):
        if time.monotonic() > deadline:
            raise ProvisionError(f"VM {spec.name} is on with {spec.address} but takes no guest "
                                 f"operations after {timeout_s:.0f} s (Tools "
                                 f"{vm.guest.toolsRunningStatus}): check VMware Tools runs in it")
        time.sleep(0.2)
    return vm


def guest_operations_ready(guest: Any) -> bool:
    """Whether vCenter says the guest takes guest operations now."""
    ready = getattr(guest, "guestOperationsReady", None)
    if ready is None:  # a vCenter that does not say: Tools running is the best sign there is
        return getattr(guest, "toolsRunningStatus", None) == "guestToolsRunning"
    return bool(ready)


def _datacenter_of(entity: Any) -> Any:
    while entity is not None and not isinstance(entity, vim.Datacenter):
        entity = entity.parent
    if entity is None:
        raise ProvisionError("the template is in no datacenter")
    return entity


def destroy(vc: VCenter, name: str, timeout_s: float = 120.0) -> bool:
    """Power off and delete VM `name` (with its disks); False if there was none."""
    si = connect(vc)
    found = vms_by_name(si, vc.datacenter)
    if name not in found:
        return False
    vm = found[name]
    if vm is None:
        raise ProvisionError(f"several VMs are named {name!r} in {vc}: not removing any")
    if vm.config.template:
        raise ProvisionError(f"{name!r} is a template: not removing it")
    if vm.runtime.powerState != "poweredOff":
        with contextlib.suppress(vim.fault.InvalidPowerState):
            wait_task(vm.PowerOffVM_Task(), timeout_s)
    wait_task(vm.Destroy_Task(), timeout_s)
    return True
