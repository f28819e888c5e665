"""Shared fixtures: the local DR lab of real components and a Prefect server, once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _internet_address() -> str:
    from lab import netns

    # Kept while this session runs (its Prefect server may start after its last lab went down);
    # removed at exit unless a lab or a listener (another session's) still uses it.
    atexit.register(netns.release_internet, unpin=True)
    return netns.ensure_internet(pin=True)


# Prefect reads its settings when first imported, so the API URL is fixed here, before any test
# module imports it; the server behind it starts only if a test asks for `prefect_api`.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="drflow-test-prefect-"))
atexit.register(shutil.rmtree, PREFECT_HOME, ignore_errors=True)  # also when no test used it
PREFECT_PORT = _free_port()
# On the lab's "internet" address, which every lab network reaches (the gateway runs at the
# DR site, in its own network namespace).
PREFECT_HOST = _internet_address()
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ["PREFECT_API_URL"] = f"http://{PREFECT_HOST}:{PREFECT_PORT}/api"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def new_lab_dir(prefix: str = "drflow-lab-") -> Path:
    # Under /tmp, not pytest's tmp_path: PostgreSQL runs as `postgres` and must traverse it.
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.rmdir()
    return d


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server (SQLite) for the whole session; its URL is already in the env."""
    from orchestrator.prefect_local import start_local_server

    server = start_local_server(PREFECT_HOME, PREFECT_PORT, host=PREFECT_HOST)
    try:
        yield server.api_url
    finally:
        server.stop()
        shutil.rmtree(PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[dict[str, Any]]:
    """A running lab with two sync groups and no agents (they would need a gateway); tests must
    leave production roles as they found them."""
    from lab import manager

    lab_dir = new_lab_dir()
    state = manager.up(lab_dir, groups=2, replication="sync", progress=lambda _m: None,
                       agents=False)
    try:
        yield state
    finally:
        manager.down(lab_dir, progress=lambda _m: None)


# Boot gates tests start (agents.boot.BootGate): one that holds keeps asking and reporting in its
# thread, so none may outlive its test.
_BOOT_GATES: list[Any] = []


def tracked_gate(gate: Any) -> Any:
    """Register a boot gate to be stopped when the current test ends; returns it."""
    _BOOT_GATES.append(gate)
    return gate


@pytest.fixture(autouse=True)
def _stop_boot_gates() -> Iterator[None]:
    yield
    while _BOOT_GATES:
        _BOOT_GATES.pop().stop()
