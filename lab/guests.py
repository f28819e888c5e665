"""What a site's vCenter knows of each lab VM for guest operations (lab/vcsim/guest.go reads it
at every call): its network namespace, its own directories, the guest login."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

GUEST_USER = "root"
# The directories that are each VM's own (the rest of a guest's file system is the machine's).
# /run/systemd too: empty, so that a guest sees no systemd running (the lab's boot starts the
# enabled units, lab/vcsim/guest.go), never the machine's own. /var/lib/postgresql: where a
# standby made by `drflow protect` keeps its data.
GUEST_DIRS = ("/opt/drflow", "/etc/drflow", "/var/lib/drflow", "/etc/systemd/system",
              "/run/systemd", "/var/lib/postgresql")


def path(lab_dir: Path, site: str) -> Path:
    return lab_dir / f"guests-{site}.json"


def entry(lab_dir: Path, vm: str, prefix: list[str], password: str) -> dict[str, Any]:
    return {"prefix": prefix, "root": str(lab_dir / "vms" / vm), "dirs": list(GUEST_DIRS),
            "user": GUEST_USER, "password": password}


@contextmanager
def _editing(lab_dir: Path, site: str) -> Iterator[dict[str, Any]]:
    """The site's entries, written back atomically (0600: it holds the guest password)."""
    target = path(lab_dir, site)
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = json.loads(target.read_text()) if target.exists() else {}
        yield entries
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1)
        tmp.replace(target)


def write(lab_dir: Path, site: str, vms: dict[str, list[str]], password: str) -> None:
    """Every VM of the site: name → argv prefix entering its network namespace."""
    with _editing(lab_dir, site) as entries:
        entries.clear()
        entries.update({vm: entry(lab_dir, vm, argv, password) for vm, argv in vms.items()})


def add(lab_dir: Path, site: str, vm: str, prefix: list[str], password: str) -> None:
    with _editing(lab_dir, site) as entries:
        entries[vm] = entry(lab_dir, vm, prefix, password)


def remove(lab_dir: Path, site: str, vm: str) -> None:
    with _editing(lab_dir, site) as entries:
        entries.pop(vm, None)
