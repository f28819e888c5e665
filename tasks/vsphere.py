"""vSphere steps of the runbooks (pyvmomi): power state, fencing."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr
from pyVim.connect import SmartConnect
from pyVmomi import vim, vmodl

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
    u = urlparse(vc.url)
    kwargs: dict[str, Any] = {"host": u.hostname, "user": vc.user,
                              "pwd": vc.password.get_secret_value(),
                              "httpConnectionTimeout": VCENTER_TIMEOUT_S}
    if u.scheme == "http":
        kwargs.update(port=u.port or 80, protocol="http")
    else:
        kwargs.update(port=u.port or 443)
        if not vc.verify_tls:  # the operator's choice (vcenter.verify_tls: false), e.g. self-signed
            kwargs["sslContext"] = ssl._create_unverified_context()
    try:
        si = SmartConnect(**kwargs)
    except Exception as exc:  # never let the password ride along in a message
        raise ConnectionError(f"cannot log in to vCenter {vc}: {type(exc).__name__}") from None
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
    content = si.RetrieveContent()
    root = content.rootFolder if datacenter is None else datacenter_named(si, datacenter).vmFolder
    view = content.viewManager.CreateContainerView(root, [vim.VirtualMachine], True)
    try:
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                name="view", type=vim.view.ContainerView, path="view", skip=False)])],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["name"], all=False)],
        )
        found: dict[str, Any] = {}
        result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        while result is not None:
            for obj in result.objects:
                name = str(obj.propSet[0].val)
                found[name] = None if name in found else obj.obj
            if not result.token:
                break
            result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
        return found
    finally:
        view.DestroyView()


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
