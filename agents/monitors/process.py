"""Process: alive, found by its name or by the pid in a pid file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

from agents.monitors import CheckResult


def _alive(p: psutil.Process) -> bool:
    try:
        # is_running() also compares the start time, so a recycled pid does not count.
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessMonitor:
    def __init__(self, process_name: str | None, pidfile: Path | None) -> None:
        self.process_name = process_name
        self.pidfile = pidfile
        self._cached: psutil.Process | None = None

    def check(self) -> CheckResult:
        return self._by_pidfile(self.pidfile) if self.pidfile else self._by_name()

    def _by_pidfile(self, pidfile: Path) -> CheckResult:
        try:
            first = pidfile.read_text().split(maxsplit=1)
            pid = int(first[0]) if first else 0
        except FileNotFoundError:
            return CheckResult(False, f"pid file {pidfile} does not exist")
        except (OSError, ValueError) as exc:
            return CheckResult(False, f"pid file {pidfile} unreadable: {exc}")
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return CheckResult(False, f"pid {pid} from {pidfile} is not running")
        if not _alive(proc):
            return CheckResult(False, f"pid {pid} from {pidfile} is not running")
        return CheckResult(True, f"pid {pid} is running", {"pid": pid})

    def _by_name(self) -> CheckResult:
        # Scanning every process each second costs CPU: reuse the last match while it lives.
        if self._cached is not None and _alive(self._cached):
            return CheckResult(True, f"{self.process_name} running", {"pid": self._cached.pid})
        self._cached = None
        for p in psutil.process_iter(["name"]):
            if p.info["name"] == self.process_name and _alive(p):
                self._cached = p
                return CheckResult(True, f"{self.process_name} running", {"pid": p.pid})
        return CheckResult(False, f"no process named {self.process_name!r} is running")


def build(r: Any) -> ProcessMonitor:
    return ProcessMonitor(r.process_name, r.pidfile)
