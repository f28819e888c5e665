"""Tie lab processes to vcsim VMs: a VM powered off kills its services, powered on starts them.

Run as `python -m lab.power_bridge --state FILE`. FILE (JSON, re-read whenever it changes):
    {"vcenter": {"url", "user", "password"},
     "services": {"<vm name>": [{"name", "pidfile", "start": [argv], "run_as", "cwd", "log",
                                 "env" (optional), "netns" (optional argv prefix)}]}}
The bridge acts on power *transitions* only: a service that dies while its VM stays on is left
alone (that is the guest agent's business). A VM first seen off, or gone from the inventory, has
its services killed: nothing may run on a host that has no power.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import psutil
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pyVmomi import vim, vmodl

from lab import procs, vcsim

log = logging.getLogger("lab.power_bridge")

WAIT_SECONDS = 1  # long-poll length: bounds how late a state-file change is noticed
RETRY_SECONDS = 1.0
RESOLVE_MISSING_EVERY = 5.0
GONE = "gone"  # pseudo power state of a VM that left the inventory
OFF_STATES = {"poweredOff", "suspended", GONE}


class VCenter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    user: str
    password: SecretStr


class Service(BaseModel):
    """One process bound to a VM; `pidfile`'s first line names the root of its process tree."""

    model_config = ConfigDict(extra="forbid")
    name: str
    pidfile: Path
    start: list[str]
    run_as: str | None = None
    cwd: Path | None = None
    log: Path
    env: dict[str, str] | None = None
    # argv prefix entering the VM's network namespace; runs before dropping to `run_as`
    netns: list[str] = []


class BridgeState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcenter: VCenter
    services: dict[str, list[Service]] = {}


def load_state(path: Path) -> BridgeState:
    return BridgeState.model_validate(json.loads(path.read_text()))


def read_pid(pidfile: Path) -> int | None:
    """The pid on the first line of `pidfile`, or None if there is no usable one."""
    try:
        first = pidfile.read_text().split("\n", 1)[0].strip()
        return int(first) if first else None
    except (OSError, ValueError):
        return None


def running_pid(pidfile: Path) -> int | None:
    """The pidfile's pid if that process is alive and not a later process that reused the pid."""
    pid = read_pid(pidfile)
    if pid is None or not procs.pid_alive(pid):
        return None
    try:
        started = psutil.Process(pid).create_time()
        written = pidfile.stat().st_mtime
    except (psutil.NoSuchProcess, OSError):
        return None
    # A process that began after its pidfile was written is someone else with a recycled pid.
    return pid if started <= written + 2.0 else None


def kill_service(vm: str, svc: Service) -> None:
    pid = running_pid(svc.pidfile)
    if pid is None:
        log.info("%s: %s not running (pidfile %s), nothing to kill", vm, svc.name, svc.pidfile)
        return
    procs.kill_tree(pid, signal.SIGKILL)
    log.info("%s: killed %s (pid %d and its children)", vm, svc.name, pid)


def start_service(vm: str, svc: Service) -> None:
    pid = running_pid(svc.pidfile)
    if pid is not None:
        log.info("%s: %s already running (pid %d)", vm, svc.name, pid)
        return
    if svc.pidfile.exists():
        # PostgreSQL refuses to start over a stale postmaster.pid ("lock file already exists").
        svc.pidfile.unlink(missing_ok=True)
        log.info("%s: removed stale pidfile %s", vm, svc.pidfile)
    argv = list(svc.start)
    cwd = svc.cwd
    if svc.run_as and os.geteuid() == 0:
        argv = ["runuser", "-u", svc.run_as, "--", *argv]
        # Our own cwd may be unreadable for that user, and postgres refuses to start then.
        cwd = cwd or Path("/")
    argv = [*svc.netns, *argv]
    # setsid --fork: the service is nobody's child, so stopping the bridge leaves it alone.
    try:
        proc = procs.spawn(["setsid", "--fork", *argv], log=svc.log, env=svc.env, cwd=cwd)
        code = proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("%s: cannot start %s: %s", vm, svc.name, e)
        return
    if code != 0:
        log.error("%s: cannot start %s: setsid exited %d, see %s", vm, svc.name, code, svc.log)
        return
    # Only the program's name: a command line may carry things that must not reach a log.
    who = f" as {svc.run_as}" if svc.run_as else ""
    log.info("%s: started %s (%s%s), output in %s", vm, svc.name, Path(svc.start[0]).name, who,
             svc.log)


class _Stop(BaseException):
    """Raised by the signal handler to leave a long-poll or a pause at once."""


class PowerBridge:
    """Follows power states through one property collector and applies them to services."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.state: BridgeState | None = None
        self.state_sig: tuple[int, int] | None = None
        self.si: vim.ServiceInstance | None = None
        self.collector: vmodl.query.PropertyCollector | None = None
        self.version = ""
        self.watched: dict[str, str] = {}  # VM moref id -> VM name
        self.missing: set[str] = set()
        self.last_resolve = 0.0
        self.power: dict[str, str] = {}  # VM name -> last power state seen
        self.stopping = False
        self.interruptible = False  # True only while blocked in a wait or a pause
        self.failure: str | None = None  # the current outage's message, logged once
        self.failure_logged_at = 0.0

    def run(self) -> None:
        log.info("power bridge started, state file %s", self.state_path)
        try:
            while not self.stopping:
                self.reload_state()
                if self.state is None:
                    self.pause(RETRY_SECONDS)
                    continue
                try:
                    self.step()
                except Exception as e:
                    self.drop_connection()
                    self.report_failure(f"{type(e).__name__}: {_brief(e)}")
                    self.pause(RETRY_SECONDS)
        except _Stop:
            pass
        finally:
            self.drop_connection()
        log.info("power bridge stopped")

    def stop(self) -> None:
        """Signal-handler side: stop now if only waiting, else after the current action."""
        self.stopping = True
        if self.interruptible:
            raise _Stop

    def pause(self, seconds: float) -> None:
        self.interruptible = True
        try:
            if not self.stopping:
                time.sleep(seconds)
        finally:
            self.interruptible = False

    def report_failure(self, what: str) -> None:
        """Log an outage once, then a reminder every minute, not a line per retry."""
        assert self.state is not None
        now = time.monotonic()
        if what != self.failure or now - self.failure_logged_at > 60:
            log.warning("vCenter at %s failed: %s; retrying every %.0f s", self.state.vcenter.url,
                        what, RETRY_SECONDS)
            self.failure_logged_at = now
        self.failure = what

    def step(self) -> None:
        assert self.state is not None
        if self.si is None:
            vc = self.state.vcenter
            self.si = vcsim.connect(vc.url, vc.user, vc.password.get_secret_value(),
                                    timeout=WAIT_SECONDS + 10)
            log.info("connected to vCenter at %s%s", vc.url,
                     " (recovered)" if self.failure else "")
            self.failure = None
        if self.collector is None or (
                self.missing and time.monotonic() - self.last_resolve > RESOLVE_MISSING_EVERY):
            self.watch()
        self.wait_for_updates()

    def reload_state(self) -> None:
        try:
            st = self.state_path.stat()
        except OSError as e:
            if self.state_sig != (-1, -1):
                log.warning("cannot read state file %s: %s; keeping the last one and waiting",
                            self.state_path, e.strerror)
                self.state_sig = (-1, -1)
            return
        sig = (st.st_mtime_ns, st.st_size)
        if sig == self.state_sig:
            return
        self.state_sig = sig
        try:
            new = load_state(self.state_path)
        except (OSError, ValueError, ValidationError) as e:
            log.error("state file %s is invalid, keeping the previous one: %s", self.state_path,
                      _brief(e))
            return
        old = self.state
        self.state = new
        counts = {vm: len(s) for vm, s in new.services.items()}
        log.info("state loaded: services per VM %s", counts)
        if old is None or old.vcenter != new.vcenter:
            self.drop_connection()
        elif set(old.services) != set(new.services):
            self.drop_collector()

    def watch(self) -> None:
        """(Re)create the collector with one ObjectSpec per bound VM and take a full snapshot.

        A fresh collector, not a new filter on the old one: vcsim queues every change for a
        collector and would replay changes older than the snapshot to a new filter.
        """
        assert self.si is not None and self.state is not None
        self.drop_collector()
        self.last_resolve = time.monotonic()
        found = vcsim.vms_by_name(self.si)
        wanted = sorted(self.state.services)
        vms: dict[str, vim.VirtualMachine] = {}
        missing: set[str] = set()
        for name in wanted:
            matches = found.get(name, [])
            if len(matches) == 1:
                vms[name] = matches[0]
            else:
                missing.add(name)
        for name in sorted(missing - self.missing):
            log.warning("%s: %s in vCenter; its services are not followed until it appears",
                        name, "no VM by that name" if name not in found else "several VMs")
        for name in sorted(missing):
            # A VM we followed that is no longer there: its host's processes go with it.
            if self.power.get(name, GONE) != GONE:
                self.observe(name, GONE)
        self.missing = missing
        if not vms:
            return
        pc = vmodl.query.PropertyCollector
        collector = self.si.content.propertyCollector.CreatePropertyCollector()
        collector.CreateFilter(pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=vm, skip=False) for vm in vms.values()],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["runtime.powerState"],
                                     all=False)],
        ), partialUpdates=False)
        self.collector = collector
        self.version = ""
        self.watched = {vm._moId: name for name, vm in vms.items()}

    def wait_for_updates(self) -> None:
        if self.collector is None:
            self.pause(WAIT_SECONDS)
            return
        opts = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=WAIT_SECONDS)
        self.interruptible = not self.stopping
        try:
            update = self.collector.WaitForUpdatesEx(self.version, opts)
        finally:
            self.interruptible = False
        if update is None:
            return
        initial = self.version == ""
        self.version = update.version
        for fs in update.filterSet or []:
            for obj in fs.objectSet or []:
                name = self.watched.get(obj.obj._moId)
                if name is None:
                    continue
                if obj.kind == "leave":
                    self.observe(name, GONE)
                    continue
                for change in obj.changeSet or []:
                    if change.name == "runtime.powerState":
                        self.observe(name, str(change.val))
        if initial:
            # The lab waits for this line: from here on, every power change is acted upon.
            log.info("watching %d VM(s) for power changes: %s", len(self.watched),
                     ", ".join(sorted(self.watched.values())))

    def observe(self, vm: str, state: str) -> None:
        """Apply one observed power state, in order; only changes cause actions."""
        before = self.power.get(vm)
        self.power[vm] = state
        if state == before:
            return
        services = self.state.services.get(vm, []) if self.state else []
        if state in OFF_STATES:
            if before is None or before not in OFF_STATES:
                log.info("%s: %s (was %s): killing %d service(s)", vm, state, before or "unknown",
                         len(services))
                for svc in services:
                    _guarded(kill_service, vm, svc)
        elif state == "poweredOn":
            if before is None:
                log.info("%s: poweredOn (first seen): services left as they are", vm)
                return
            log.info("%s: poweredOn (was %s): starting %d service(s)", vm, before, len(services))
            for svc in services:
                _guarded(start_service, vm, svc)
        else:
            log.warning("%s: unknown power state %r, nothing done", vm, state)

    def drop_collector(self) -> None:
        if self.collector is not None:
            with contextlib.suppress(Exception):
                self.collector.DestroyPropertyCollector()
        self.collector = None
        self.version = ""
        self.watched = {}

    def drop_connection(self) -> None:
        self.drop_collector()
        if self.si is not None:
            vcsim.disconnect(self.si)
        self.si = None
        self.missing = set()


def _guarded(action: Callable[[str, Service], None], vm: str, svc: Service) -> None:
    """One service's failure must not skip the others nor pass for a vCenter failure."""
    try:
        action(vm, svc)
    except Exception as e:
        log.error("%s: %s of %s failed: %s: %s", vm, action.__name__, svc.name,
                  type(e).__name__, _brief(e))


def _brief(e: BaseException) -> str:
    text = str(getattr(e, "msg", "") or e).strip().splitlines()
    return text[0][:300] if text else repr(e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.power_bridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, required=True, help="JSON state file (see above)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d power-bridge %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    bridge = PowerBridge(args.state.resolve())

    def stop(signum: int, frame: FrameType | None) -> None:
        bridge.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bridge.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

