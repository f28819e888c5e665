"""The end-to-end harness lives with the lab; here too are the lab resources tests share."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from lab import harness, postgres, vcsim
from lab.harness import DRFLOW, Env, Writer, dump, lab_secret_values, wait_for
from tests.conftest import new_lab_dir

__all__ = [
    "DRFLOW",
    "Env",
    "Writer",
    "dump",
    "lab_secret_values",
    "new_lab_dir",
    "pg_pair",
    "running_vcsim",
    "start_env",
    "stop_env",
    "vsphere_session",
    "wait_for",
]

Pair = tuple[postgres.Instance, postgres.Instance, str]


def start_env(**options: Any) -> Env:
    """lab.harness.start_env, on runbook locks no earlier lab left taken."""
    env = harness.start_env(**options)
    _isolate_locks(env, "before this test's lab ran")
    return env


def stop_env(env: Env) -> None:
    harness.stop_env(env)
    _isolate_locks(env, "after this test's lab went down")


def _isolate_locks(env: Env, when: str) -> None:
    """The labs of a session share one Prefect server and their groups' names. A slot of a
    group's runbook lock left taken by a lab (its holder killed with the lab) would make the
    next lab's runbook of that group wait out the slot's lease (60-70 s). Each lab is a world of
    its own: such a slot is reported (a test warning) and its limit removed; runbooks create it
    again when they need it."""
    api = os.environ.get("PREFECT_API_URL", "")
    try:
        httpx.get(f"{api}/health", timeout=1.0).raise_for_status()
    except httpx.HTTPError:
        return  # no Prefect server in this session: no slots either
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.locks import limit_names

    with get_client(sync_client=True) as client:
        for g in env.state.get("groups", []):
            for name in limit_names(g["name"]):
                try:
                    taken = client.read_global_concurrency_limit_by_name(name).active_slots
                except ObjectNotFound:
                    continue
                if taken:
                    warnings.warn(f"{when}: {taken} slot(s) of the concurrency limit {name} "
                                  "still taken; the limit was removed", stacklevel=3)
                    client.delete_global_concurrency_limit_by_name(name)


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
