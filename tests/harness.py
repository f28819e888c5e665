"""The end-to-end harness lives with the lab; here too are the lab resources tests share."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lab import postgres, vcsim
from lab.harness import (
    DRFLOW,
    Env,
    Writer,
    dump,
    lab_secret_values,
    start_env,
    stop_env,
    wait_for,
)
from tests.conftest import new_lab_dir

Pair = tuple[postgres.Instance, postgres.Instance, str]


@contextmanager
def pg_pair(prefix: str, name: str, *, sync: bool) -> Iterator[Pair]:
    """A lab PostgreSQL primary/standby pair and the client password, removed afterwards."""
    base = new_lab_dir(prefix)
    primary, standby = postgres.create_pair(base, name, sync=sync)
    _user, password = postgres.client_credentials(base)
    try:
        yield primary, standby, password
    finally:
        for inst in (standby, primary):
            postgres.destroy(inst)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def running_vcsim(lab_dir: Path, groups: list[str], **options: Any) -> Iterator[dict[str, Any]]:
    """The lab's vCenter simulator for `groups`, stopped afterwards."""
    info = vcsim.start_vcsim(lab_dir, groups, **options)
    try:
        yield info
    finally:
        vcsim.stop_vcsim(info)


@contextmanager
def vsphere_session(vc: dict[str, Any]) -> Iterator[Any]:
    """A pyvmomi ServiceInstance logged in to the lab's vcsim `vc`, logged out afterwards."""
    conn = vcsim.connect(vc["url"], vc["user"], vc["password"])
    try:
        yield conn
    finally:
        vcsim.disconnect(conn)


__all__ = ["DRFLOW", "Env", "Writer", "dump", "lab_secret_values", "pg_pair", "running_vcsim", "start_env",
           "stop_env", "vsphere_session", "wait_for"]
