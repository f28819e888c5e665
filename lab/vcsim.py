"""Build, start and talk to the lab's vCenter simulator (govmomi's vcsim behind a small Go launcher)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode, urlsplit
from urllib.request import Request, urlopen

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from drflow.vsphere import vm_names
from lab import procs

GOPATH = Path("/usr/share/gocode")
GOVMOMI_SIMULATOR = GOPATH / "src/github.com/vmware/govmomi/simulator"
LAUNCHER_SOURCE = Path(__file__).resolve().parent / "vcsim" / "main.go"
ISOLATED_PORTGROUP = "drflow-isolated"
SITES = ("prod", "dr")
# vcsim accepts any login: these are throwaway lab credentials, not secrets of anything real.
LAB_USER = "drflow-lab@vsphere.local"
LAB_PASSWORD = "lab-only-any-password-works"
# Popen objects of the simulators started here, so stop_vcsim can reap them (no zombies, no
# "subprocess still running" warnings when the objects are collected).
_started: dict[int, subprocess.Popen[bytes]] = {}


def cache_dir() -> Path:
    """Where built launchers live: `$DRFLOW_CACHE_DIR/vcsim` or `<repo>/.cache/vcsim`."""
    base = os.environ.get("DRFLOW_CACHE_DIR")
    root = Path(base) if base else Path(__file__).resolve().parent.parent / ".cache"
    return root / "vcsim"


def build_launcher() -> Path:
    """Build the vcsim launcher once per version of its sources and return the cached binary."""
    sha = hashlib.sha256()
    for source in sorted(LAUNCHER_SOURCE.parent.glob("*.go")):
        sha.update(source.name.encode() + b"\0" + source.read_bytes())
    digest = sha.hexdigest()[:16]
    out_dir = cache_dir()
    binary = out_dir / f"vcsim-lab-{digest}"
    if os.access(binary, os.X_OK):
        return binary
    go = _check_toolchain()
    out_dir.mkdir(parents=True, exist_ok=True)
    # The lock only saves a second 16 s build; the rename below is what keeps the cache sound.
    with _locked(out_dir / ".build.lock"):
        if os.access(binary, os.X_OK):
            return binary
        fd, tmp_name = tempfile.mkstemp(prefix=".vcsim-lab-build-", dir=out_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off"}
        if "GOCACHE" not in env and "HOME" not in env and "XDG_CACHE_HOME" not in env:
            env["GOCACHE"] = str(out_dir / "go-build")
        try:
            done = subprocess.run(
                [go, "build", "-o", str(tmp), *sorted(p.name for p in
                                                      LAUNCHER_SOURCE.parent.glob("*.go"))],
                cwd=LAUNCHER_SOURCE.parent,
                env=env, capture_output=True, text=True, timeout=600, check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"building the vcsim launcher failed (go build exited {done.returncode}):\n"
                    f"{(done.stdout + done.stderr).strip()}"
                )
            tmp.chmod(0o755)
            os.replace(tmp, binary)
        finally:
            tmp.unlink(missing_ok=True)
        for old in out_dir.glob("vcsim-lab-*"):
            if old != binary:
                old.unlink(missing_ok=True)
    return binary


def _check_toolchain() -> str:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the Go toolchain is missing: install it with `apt-get install golang-go`")
    if not GOVMOMI_SIMULATOR.is_dir():
        raise RuntimeError(
            f"govmomi's simulator source is missing ({GOVMOMI_SIMULATOR}): install it with "
            "`apt-get install golang-github-vmware-govmomi-dev`"
        )
    return go


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_vcsim(lab_dir: Path, groups: list[str], port: int = 0, timeout: float = 30.0,
                twins: list[str] | None = None, tls: bool = False,
                sites: Sequence[str] = SITES, listen: str = "127.0.0.1",
                prefix: Sequence[str] = (), name: str = "vcsim",
                guests: Path | None = None, lone: Sequence[str] = (),
                template: str | None = None) -> dict[str, Any]:
    """Start vcsim detached with the lab inventory and return how to reach it.

    `port=0` lets the launcher pick a free port itself (no race with other tests). `twins`:
    VM names created in every served datacenter alike; `tls`: HTTPS with a self-signed
    certificate. `sites`: the datacenters served (production has a vCenter per site); `listen`:
    the address served on; `prefix`: an argv prefix to run the launcher with (e.g.
    `["ip", "netns", "exec", NS]`); `name` names its info and log files, so that two vcsims can
    share one lab directory. `guests`: the JSON file of the VMs that take guest operations
    (their namespace, directories and login; lab/vcsim/guest.go), read at every call.
    `lone`: names whose VM `NAME-prod` exists in prod only (a database not protected yet; its
    host exists at every site); `template`: a VM template created in dr.
    """
    if not groups:
        raise ValueError("start_vcsim needs at least one protection group name")
    bad = [g for g in groups if not g or "," in g or g != g.strip()]
    if bad:
        raise ValueError(f"invalid protection group names for vcsim VMs: {bad!r}")
    sites = list(sites)
    if not sites or set(sites) - set(SITES) or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be distinct names among {SITES}, got {sites!r}")
    ipaddress.ip_address(listen)  # ValueError for anything else
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid vcsim name {name!r}: it names files in the lab directory")
    binary = build_launcher()
    lab_dir = Path(lab_dir).resolve()
    info_path = lab_dir / f"{name}.json"
    info_path.unlink(missing_ok=True)
    log = lab_dir / "logs" / f"{name}.log"
    # The simulated datastores are directories under TMPDIR: keep them inside the lab.
    tmp = lab_dir / f"{name}-datastores"
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [*prefix, str(binary), "-port", str(port), "-groups", ",".join(groups),
            "-info", str(info_path), "-sites", ",".join(sites), "-listen", listen]
    if twins:
        argv += ["-twins", ",".join(twins)]
    if tls:
        argv.append("-tls")
    if guests is not None:
        argv += ["-guests", str(Path(guests).resolve())]
    if lone:
        argv += ["-lone", ",".join(lone)]
    if template:
        argv += ["-template", template]
    proc = procs.spawn(argv, log=log, env={"TMPDIR": str(tmp)})
    deadline = time.monotonic() + timeout
    while not info_path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"vcsim exited with code {proc.returncode} while starting; "
                               f"see {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            procs.kill_tree(proc.pid)
            raise TimeoutError(f"vcsim did not come up within {timeout:.0f} s; see {log}:\n{_tail(log)}")
        time.sleep(0.02)
    _started[proc.pid] = proc
    served = json.loads(info_path.read_text())
    return {
        "pid": proc.pid,
        "url": served["url"],
        "host": served["host"],
        "port": served["port"],
        "user": LAB_USER,
        "password": LAB_PASSWORD,
        "sites": served.get("sites") or sites,
        "vms": served["vms"],
        "hosts": served.get("hosts") or {},
        "spare_hosts": served.get("spare_hosts") or {},
        "isolated_portgroup": served["isolated_portgroup"],
        "isolated_vswitch": served["isolated_vswitch"],
        "twins": served.get("twins") or [],
        "template": served.get("template"),
        "log": str(log),
        "info_path": str(info_path),
    }


def stop_vcsim(info: dict[str, Any]) -> None:
    """Stop a vcsim started by `start_vcsim` (it removes its datastore directories on SIGTERM)."""
    pid = int(info["pid"])
    procs.stop_tree(pid)
    proc = _started.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _tail(log: Path, lines: int = 15) -> str:
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def connect(url: str, user: str, password: str, timeout: float = 30.0) -> vim.ServiceInstance:
    """Log in to vcsim over plain HTTP; `timeout` bounds each request."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"expected a vcsim URL like http://127.0.0.1:PORT/sdk, got {url!r}")
    si: vim.ServiceInstance = SmartConnect(
        host=parts.hostname, port=parts.port, user=user, pwd=password, protocol="http",
        path=parts.path or "/sdk", httpConnectionTimeout=timeout,
    )
    return si


def disconnect(si: vim.ServiceInstance) -> None:
    """Log out, ignoring a vCenter that has already gone away."""
    with contextlib.suppress(Exception):
        Disconnect(si)


def _root(si: vim.ServiceInstance, datacenter: str | None) -> Any:
    content = si.RetrieveContent()
    if datacenter is None:
        return content.rootFolder
    assert content.viewManager is not None, "vCenter without a ViewManager"
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datacenter], True)
    try:
        dcs = {dc.name: dc for dc in view.view}
    finally:
        view.DestroyView()
    if datacenter not in dcs:
        raise LookupError(f"no datacenter {datacenter!r} in vCenter; there: {sorted(dcs)}")
    return dcs[datacenter].vmFolder


def vms_by_name(si: vim.ServiceInstance,
                datacenter: str | None = None) -> dict[str, list[vim.VirtualMachine]]:
    """All VMs in the inventory (or in one datacenter), by name, in one property-collector
    round trip."""
    found: dict[str, list[vim.VirtualMachine]] = {}
    for name, vm in vm_names(si, _root(si, datacenter)):
        found.setdefault(name, []).append(vm)
    return found


def find_vm(si: vim.ServiceInstance, name: str,
            datacenter: str | None = None) -> vim.VirtualMachine:
    """The one VM called `name` (in `datacenter`, if given); LookupError if there is none or
    more than one."""
    found = vms_by_name(si, datacenter)
    vms = found.get(name, [])
    if len(vms) != 1:
        what = "no VM" if not vms else f"{len(vms)} VMs"
        where = f"datacenter {datacenter!r}" if datacenter else "vCenter"
        raise LookupError(f"{what} named {name!r} in {where}; VMs there: {sorted(found)}")
    return vms[0]


def vm_power_state(si: vim.ServiceInstance, name: str, datacenter: str | None = None) -> str:
    """'poweredOn', 'poweredOff' or 'suspended'."""
    return str(find_vm(si, name, datacenter).runtime.powerState)


def power_off(si: vim.ServiceInstance, name: str, datacenter: str | None = None) -> None:
    """Power a VM off; a VM that is already off counts as done."""
    _power(find_vm(si, name, datacenter).PowerOffVM_Task)


def power_on(si: vim.ServiceInstance, name: str, datacenter: str | None = None) -> None:
    """Power a VM on; a VM that is already on counts as done."""
    _power(find_vm(si, name, datacenter).PowerOnVM_Task)


def _power(start_task: Any) -> None:
    with contextlib.suppress(vim.fault.InvalidPowerState):
        wait_task(start_task())


def wait_task(task: vim.Task, timeout: float = 60.0) -> Any:
    """Wait for a vSphere task; return its result or raise its fault."""
    deadline = time.monotonic() + timeout
    while True:
        info = task.info
        if info.state == vim.TaskInfo.State.success:
            return info.result
        if info.state == vim.TaskInfo.State.error:
            err = info.error
            if isinstance(err, BaseException):
                raise err
            raise RuntimeError(f"vSphere task {info.descriptionId} failed: {err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"vSphere task {info.descriptionId} still {info.state} "
                               f"after {timeout:.0f} s")
        time.sleep(0.02)


def vm_connection_state(si: vim.ServiceInstance, name: str, datacenter: str | None = None) -> str:
    """'connected', 'disconnected', 'orphaned', 'inaccessible' or 'invalid'."""
    return str(find_vm(si, name, datacenter).runtime.connectionState)


def vm_host(si: vim.ServiceInstance, name: str, datacenter: str | None = None) -> str:
    """The name of the ESXi host the VM runs on now."""
    host = find_vm(si, name, datacenter).runtime.host
    if host is None:
        raise LookupError(f"VM {name!r} is on no ESXi host")
    return str(host.name)


def host_connection_state(si: vim.ServiceInstance, host_name: str) -> str:
    """'connected', 'notResponding' or 'disconnected' for the ESXi host called `host_name`."""
    content = si.RetrieveContent()
    assert content.viewManager is not None, "vCenter without a ViewManager"
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
    try:
        hosts = {str(h.name): h for h in view.view}
    finally:
        view.DestroyView()
    if host_name not in hosts:
        raise LookupError(f"no ESXi host {host_name!r} in vCenter; there: {sorted(hosts)}")
    return str(hosts[host_name].runtime.connectionState)


# --- faults (the launcher's /drflow/... hooks; each answers the instant it took effect) ---------


def host_loss(url: str, vm: str, not_responding_after: float = 60.0, mgmt_only: bool = False,
              *, datacenter: str | None = None) -> float:
    """The ESXi host of `vm` stops heartbeating (or, `mgmt_only`, only its management network
    goes): vCenter shows nothing for `not_responding_after` seconds, then the host
    `notResponding` and its VMs `disconnected`; power operations on them never succeed.
    Returns the instant (time.time()) the fault took effect."""
    params = {"vm": vm, "not_responding_after": repr(float(not_responding_after)),
              "mgmt_only": "1" if mgmt_only else "0"}
    return float(_hook(url, "/drflow/host-loss", params, datacenter)["at"])


def host_restore(url: str, vm: str, ha: bool = False, *, datacenter: str | None = None) -> float:
    """The host of `vm` is back. `ha`: vSphere HA restarted `vm` on the datacenter's spare host
    (poweredOff at once, poweredOn 2 s later). Returns the instant it took effect."""
    params = {"vm": vm, "ha": "1" if ha else "0"}
    return float(_hook(url, "/drflow/host-restore", params, datacenter)["at"])


def stun_task(url: str, vm: str, task: str, seconds: float, *,
              datacenter: str | None = None) -> dict[str, Any]:
    """Run a real task on `vm` for `seconds` ('snapshot': CreateSnapshot_Task, which leaves a
    snapshot; 'vmotion': RelocateVM_Task to the spare host, or back from it). The answer holds
    `task` (its moref), `at` (the instant it started running), `ends_at`, and for vMotion
    `from_host` / `to_host`."""
    params = {"vm": vm, "task": task, "seconds": repr(float(seconds))}
    return _hook(url, "/drflow/stun-task", params, datacenter)


def _hook(url: str, path: str, params: dict[str, str], datacenter: str | None,
          timeout: float = 10.0) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected a vcsim URL like http://127.0.0.1:PORT/sdk, got {url!r}")
    if datacenter is not None:
        params = {**params, "datacenter": datacenter}
    context = None
    if parts.scheme == "https":  # the launcher's own self-signed certificate
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    request = Request(f"{parts.scheme}://{parts.netloc}{path}?{urlencode(params)}", data=b"",
                      method="POST")
    try:
        with urlopen(request, timeout=timeout, context=context) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
    except HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail)["error"]
        if e.code == 404:
            raise LookupError(f"vcsim at {parts.netloc}: {detail}") from None
        if e.code == 400:
            raise ValueError(f"vcsim at {parts.netloc} refused {path}: {detail}") from None
        raise RuntimeError(f"vcsim at {parts.netloc} refused {path} (HTTP {e.code}): {detail}") from None
    except URLError as e:
        raise ConnectionError(f"vcsim at {parts.netloc} did not answer {path}: {e.reason}") from None


def health(info: dict[str, Any]) -> tuple[bool, str]:
    """Quick check for `lab status`: process alive, login works, the lab's VMs are there."""
    if not procs.pid_alive(int(info["pid"])):
        return False, f"vcsim (pid {info['pid']}) is not running"
    try:
        si = connect(info["url"], info["user"], info["password"], timeout=3.0)
    except Exception as e:
        return False, f"vcsim at {info['url']} refuses logins: {type(e).__name__}: {e}"
    try:
        found = vms_by_name(si)
        missing = sorted(set(info.get("vms", {})) - set(found))
        if missing:
            return False, f"vcsim at {info['url']} lacks VMs {missing}"
        return True, f"vcsim at {info['url']}: {len(found)} VMs"
    except Exception as e:
        return False, f"vcsim at {info['url']} failed an inventory query: {type(e).__name__}: {e}"
    finally:
        disconnect(si)
