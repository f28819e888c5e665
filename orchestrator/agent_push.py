"""Put the guest agent into a running VM through vSphere guest operations, and run it there.

Every step is idempotent: the bundle is unpacked again over itself, files are overwritten, a
command run twice does the same. A command's output comes back through a file in the guest
(Tools returns only the exit code).
"""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from orchestrator.agent_bundle import ENTRY, INSTALL_DIR, TAG_PROBE, python_tag
from tasks.vsphere_guest import (
    GuestError,
    GuestLogin,
    download,
    start_program,
    upload,
    wait_exit,
)

SHELL = "/bin/sh"
WORK_DIR = "/var/lib/drflow"
_n = itertools.count(1)

# Prints what the guest's python3 is, as agent_bundle.python_tag() says it for this machine,
# then where its libpq is (empty: none), found as psycopg looks for it (the bundle has none).
_PY_TAG = TAG_PROBE + "; import ctypes.util; print(ctypes.util.find_library('pq') or '')"


@dataclass(frozen=True)
class Guest:
    """One VM as guest operations reach it."""

    si: Any
    vcenter_url: str
    vm: Any
    login: GuestLogin
    verify_tls: bool = True

    @property
    def name(self) -> str:
        return str(self.vm.name)


@dataclass(frozen=True)
class Ran:
    code: int
    output: str


def run(guest: Guest, command: str, timeout: float = 60.0) -> Ran:
    """Run a shell command line in the guest; its exit code and output (stdout and stderr)."""
    out = f"{WORK_DIR}/.drflow-run-{next(_n)}.out"
    pid = start_program(guest.si, guest.vm, guest.login, SHELL,
                        f"-c {shlex.quote(f'mkdir -p {WORK_DIR} && ({command}) > {out} 2>&1')}")
    code = wait_exit(guest.si, guest.vm, guest.login, pid, timeout)
    try:
        output = download(guest.si, guest.vcenter_url, guest.vm, guest.login, out,
                          guest.verify_tls).decode(errors="replace")
    except GuestError:
        output = ""  # the shell could not even create it: the exit code says why
    return Ran(code, output)


def check(guest: Guest, command: str, what: str, timeout: float = 60.0) -> str:
    """run(), raising GuestError naming `what` and the output when it fails."""
    ran = run(guest, command, timeout)
    if ran.code != 0:
        raise GuestError(f"{what} on VM {guest.name} failed (exit {ran.code}): "
                         f"{ran.output.strip()[-800:] or 'no output'}")
    return ran.output


def install(guest: Guest, bundle: Path, progress: Callable[[str], None] = lambda _m: None) -> None:
    """Unpack the agent bundle at INSTALL_DIR, after checking the guest can run it."""
    found = check(guest, f"python3 -c {shlex.quote(_PY_TAG)}", "checking the guest's python3")
    tag, libpq = ([*found.strip().splitlines(), "", ""])[:2]
    if tag.strip() != python_tag():
        raise GuestError(f"VM {guest.name} has python3 {tag.strip() or 'missing'}; the agent "
                         f"bundle is for {python_tag()}: install that Python in the guest, or "
                         "build the bundle on a machine of the guest's kind")
    if not libpq.strip():
        raise GuestError(f"VM {guest.name} has no libpq.so.5, PostgreSQL's client library, which "
                         "the agent uses: install it in the guest (Debian, Ubuntu: apt-get "
                         "install libpq5; RHEL and the like: dnf install libpq)")
    progress(f"copying the agent ({bundle.stat().st_size / 1e6:.1f} MB) into {guest.name}")
    target = f"{INSTALL_DIR}/{bundle.name}"
    upload(guest.si, guest.vcenter_url, guest.vm, guest.login, bundle.read_bytes(), target,
           mode=0o600, verify_tls=guest.verify_tls)
    check(guest, f"tar -xzf {shlex.quote(target)} -C {INSTALL_DIR} && rm -f {shlex.quote(target)}",
          "unpacking the agent")


def agent(guest: Guest, args: str, timeout: float = 60.0) -> str:
    """Run the installed agent CLI in the guest (`drflow-agent ARGS`); its output."""
    return check(guest, f"{INSTALL_DIR}/{ENTRY} {args}", f"drflow-agent {args.split()[0]}",
                 timeout)


CONFIG = "/etc/drflow/agent.yaml"
UNIT = "/etc/systemd/system/drflow-agent.service"
PIDFILE = f"{WORK_DIR}/agent.pid"
_WANTS = "/etc/systemd/system/multi-user.target.wants"
_RUN = f"{INSTALL_DIR}/{ENTRY} run --config {CONFIG} --pidfile {PIDFILE}"


def unit_file() -> str:
    """The agent's systemd unit: started at boot, restarted when it dies."""
    return (
        "[Unit]\nDescription=drflow guest agent\nAfter=network-online.target\n"
        "Wants=network-online.target\n\n"
        f"[Service]\nExecStart={_RUN}\nPIDFile={PIDFILE}\nRestart=always\nRestartSec=1\n\n"
        "[Install]\nWantedBy=multi-user.target\n")


def write_file(guest: Guest, path: str, data: bytes, mode: int = 0o644) -> None:
    upload(guest.si, guest.vcenter_url, guest.vm, guest.login, data, path, mode=mode,
           verify_tls=guest.verify_tls)


# Stops the agent its pidfile names, and waits (up to 10 s) for it to be gone.
_STOP = (f"if [ -s {PIDFILE} ]; then p=$(cat {PIDFILE}); kill $p 2>/dev/null; i=0; "
         f"while kill -0 $p 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; fi")


def read_file(guest: Guest, path: str) -> bytes | None:
    """A file's content in the guest; None when there is no such file."""
    try:
        return download(guest.si, guest.vcenter_url, guest.vm, guest.login, path,
                        guest.verify_tls)
    except GuestError as exc:
        if "no such file" in str(exc):
            return None
        raise


def write_secrets(guest: Guest, secrets: dict[str, SecretStr]) -> None:
    """The agent's secret files (guest path → value), mode 0600."""
    for path, value in secrets.items():
        write_file(guest, path, value.get_secret_value().encode(), 0o600)


def enable_service(guest: Guest, config: str | None = None) -> None:
    """Write the agent's config (None: written in the guest already, by `discover --write`),
    install and enable its unit, and (re)start it: under systemd when the guest runs it, else
    directly (at the next boot, the enabled unit starts it)."""
    if config is not None:
        write_file(guest, CONFIG, config.encode(), 0o600)
    write_file(guest, UNIT, unit_file().encode())
    check(guest, f"mkdir -p {_WANTS} && ln -sf {UNIT} {_WANTS}/ && "
                 "if [ -d /run/systemd/system ]; then "
                 "systemctl daemon-reload && systemctl restart drflow-agent; "
                 f"else {_STOP}; nohup {_RUN} >> {WORK_DIR}/agent.log 2>&1 & fi",
          "starting the agent")


def agent_running(guest: Guest) -> bool:
    """The agent's pidfile names a live process."""
    return run(guest, f"[ -s {PIDFILE} ] && kill -0 $(cat {PIDFILE})").code == 0


# Stops the agent and takes away everything the push put in the guest (its data included).
REMOVE = (f"if [ -d /run/systemd/system ]; then systemctl disable --now drflow-agent || true; "
          f"else {_STOP}; fi; rm -f {_WANTS}/drflow-agent.service {UNIT} {CONFIG} && "
          f"rm -rf {INSTALL_DIR}/* /etc/drflow/* {WORK_DIR}/*")
