"""vSphere guest operations (pyvmomi): files into and out of a VM, programs started in it.

What `drflow protect` pushes an agent with. vCenter relays each call to VMware Tools in the
guest: the VM must be on with Tools running, and every call carries the guest's login. A file
moves over HTTP(S) to a URL vCenter hands out, whose host is `*` ("the host you reached me
at"). Errors say which VM, what failed and what to do; the password never appears in them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import SecretStr
from pyVmomi import vim

TRANSFER_TIMEOUT_S = 60.0


class GuestError(RuntimeError):
    """A guest operation failed; the message names the VM and what to do."""


@dataclass(frozen=True)
class GuestLogin:
    user: str
    password: SecretStr

    def auth(self) -> Any:
        return vim.vm.guest.NamePasswordAuthentication(
            username=self.user, password=self.password.get_secret_value(), interactiveSession=False)


@dataclass(frozen=True)
class GuestProcess:
    pid: int
    name: str
    cmdline: str
    started: datetime | None
    ended: datetime | None
    exit_code: int | None  # None while it runs


def _manager(si: Any) -> Any:
    return si.content.guestOperationsManager


def _explain(vm: Any, login: GuestLogin, what: str, exc: Exception) -> GuestError:
    name = getattr(vm, "name", "?")
    if isinstance(exc, vim.fault.InvalidGuestLogin):
        why = (f"the guest refused the login of {login.user!r}: check the guest credentials "
               "given for this VM")
    elif isinstance(exc, vim.fault.GuestOperationsUnavailable):
        why = ("VMware Tools is not running in it (the VM is off, its host is lost, or Tools is "
               "not installed): power it on, or install and start VMware Tools")
    elif isinstance(exc, vim.fault.GuestPermissionDenied):
        why = f"the guest user {login.user!r} may not do it ({getattr(exc, 'msg', '') or exc})"
    elif isinstance(exc, vim.fault.FileNotFound):
        why = f"no such file in the guest ({getattr(exc, 'file', '') or exc})"
    else:
        why = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return GuestError(f"{what} on VM {name}: {why}")


def _transfer_url(url: str, vcenter_url: str) -> str:
    """vCenter's transfer URL with its `*` host replaced by the address vCenter was reached at."""
    parts = urlsplit(url)
    if parts.hostname not in ("*", None):
        return url
    vc = urlsplit(vcenter_url)
    return urlunsplit((parts.scheme or vc.scheme, vc.netloc, parts.path, parts.query, ""))


def upload(si: Any, vcenter_url: str, vm: Any, login: GuestLogin, data: bytes,
           guest_path: str, mode: int = 0o644, overwrite: bool = True,
           verify_tls: bool = True) -> None:
    """Write `data` to `guest_path` in the VM (atomically: all or nothing) with `mode`."""
    files = _manager(si).fileManager
    attrs = vim.vm.guest.FileManager.PosixFileAttributes(permissions=mode)
    try:
        url = files.InitiateFileTransferToGuest(vm, login.auth(), guest_path, attrs, len(data),
                                                overwrite)
    except vim.fault.VimFault as exc:
        raise _explain(vm, login, f"copying {guest_path} into the guest", exc) from None
    target = _transfer_url(url, vcenter_url)
    try:
        r = httpx.put(target, content=data, timeout=TRANSFER_TIMEOUT_S, verify=verify_tls)
    except httpx.HTTPError as exc:
        raise GuestError(f"copying {guest_path} into the guest on VM {vm.name}: the transfer "
                         f"to {urlsplit(target).netloc} failed ({exc})") from None
    if r.status_code >= 300:
        raise GuestError(f"copying {guest_path} into the guest on VM {vm.name}: the transfer "
                         f"was refused ({r.status_code} {r.text.strip()[:200]})")


def download(si: Any, vcenter_url: str, vm: Any, login: GuestLogin, guest_path: str,
             verify_tls: bool = True) -> bytes:
    files = _manager(si).fileManager
    try:
        info = files.InitiateFileTransferFromGuest(vm, login.auth(), guest_path)
    except vim.fault.VimFault as exc:
        raise _explain(vm, login, f"reading {guest_path} from the guest", exc) from None
    r = httpx.get(_transfer_url(info.url, vcenter_url), timeout=TRANSFER_TIMEOUT_S,
                  verify=verify_tls)
    if r.status_code >= 300:
        raise GuestError(f"reading {guest_path} from the guest on VM {vm.name}: the transfer "
                         f"was refused ({r.status_code})")
    return r.content


def make_directory(si: Any, vm: Any, login: GuestLogin, guest_path: str) -> None:
    try:
        _manager(si).fileManager.MakeDirectoryInGuest(vm, login.auth(), guest_path, True)
    except vim.fault.VimFault as exc:
        raise _explain(vm, login, f"creating {guest_path} in the guest", exc) from None


def start_program(si: Any, vm: Any, login: GuestLogin, program: str, arguments: str = "",
                  env: dict[str, str] | None = None, cwd: str | None = None) -> int:
    """Start `program arguments` in the guest (through its shell); its pid there."""
    spec = vim.vm.guest.ProcessManager.ProgramSpec(
        programPath=program, arguments=arguments,
        envVariables=[f"{k}={v}" for k, v in (env or {}).items()], workingDirectory=cwd)
    try:
        return int(_manager(si).processManager.StartProgramInGuest(vm, login.auth(), spec))
    except vim.fault.VimFault as exc:
        raise _explain(vm, login, f"starting {program} in the guest", exc) from None


def processes(si: Any, vm: Any, login: GuestLogin, pids: list[int] | None = None
              ) -> list[GuestProcess]:
    try:
        found = _manager(si).processManager.ListProcessesInGuest(vm, login.auth(), pids or [])
    except vim.fault.VimFault as exc:
        raise _explain(vm, login, "listing the guest's processes", exc) from None
    # An exit code of 0 may come as no exitCode at all (an optional int left out).
    return [GuestProcess(int(p.pid), str(p.name), str(p.cmdLine), p.startTime, p.endTime,
                         None if p.endTime is None else int(p.exitCode or 0))
            for p in found or []]


def wait_exit(si: Any, vm: Any, login: GuestLogin, pid: int, timeout: float,
              poll_s: float = 0.2) -> int:
    """The exit code of program `pid` once it ended; GuestError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in processes(si, vm, login, [pid]) if p.pid == pid]
        if not found:
            raise GuestError(f"VM {vm.name}: the guest knows no program {pid}")
        if found[0].exit_code is not None:
            return found[0].exit_code
        if time.monotonic() > deadline:
            raise GuestError(f"VM {vm.name}: program {pid} ({found[0].cmdline}) still runs after "
                             f"{timeout:g} s")
        time.sleep(poll_s)


def terminate(si: Any, vm: Any, login: GuestLogin, pid: int) -> None:
    try:
        _manager(si).processManager.TerminateProcessInGuest(vm, login.auth(), pid)
    except vim.fault.VimFault as exc:
        raise _explain(vm, login, f"stopping program {pid} in the guest", exc) from None
