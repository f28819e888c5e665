"""Fencing one PostgreSQL instance: SIGKILL its postmaster and every process of it, now.

Why SIGKILL and not `pg_ctl -m immediate`: a killed backend cannot send another commit
acknowledgement, and the kill is one system call per process (no fork+exec, no waiting for the
postmaster to pass SIGQUIT on). The processes are listed before the postmaster dies: once it is
gone its children are re-parented and no longer found under it. Backends left from an earlier
kill of the postmaster alone are found by their working directory (the data directory).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from agents.drivers.pg_server import is_postmaster_of


def postmaster_pid(datadir: Path) -> int | None:
    """The live postmaster of `datadir` from postmaster.pid, or None."""
    try:
        first = (datadir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        pid = int(first)
    except (OSError, ValueError):
        return None
    return pid if is_postmaster_of(pid, datadir) else None


def kill_server(datadir: Path) -> dict[str, Any]:
    """SIGKILL the server of `datadir` and all its processes; what was killed and how long."""
    datadir = Path(datadir).absolute()
    t0 = time.monotonic()
    pid = postmaster_pid(datadir)
    victims: list[int] = []
    if pid is not None:
        with contextlib.suppress(psutil.Error):
            victims = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    for v in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(v, signal.SIGKILL)
    killed_in = time.monotonic() - t0
    strays = _strays(datadir, set(victims))
    for v in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(v, signal.SIGKILL)
    return {"postmaster": pid, "killed": len(victims) + len(strays),
            "kill_s": round(killed_in, 4), "seconds": round(time.monotonic() - t0, 4)}


def _strays(datadir: Path, known: set[int]) -> list[int]:
    out = []
    for p in psutil.process_iter(["name"]):
        if p.pid in known or p.info["name"] not in ("postgres", "postmaster"):
            continue
        with contextlib.suppress(psutil.Error):
            if Path(p.cwd()) == datadir:
                out.append(p.pid)
    return out
