"""Every command that starts flow runs uses the orchestrator's Prefect, never a temporary one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab import procs
from orchestrator.prefect_api import RECORD, NoPrefectAPI, forget, record, resolve
from tests.harness import Env, start_env, stop_env

DRFLOW = str(Path(sys.executable).parent / "drflow")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "drflow.yaml"


def bare_env(home: Path) -> dict[str, str]:
    """A user's shell: no Prefect settings, a HOME that never ran Prefect."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "DRFLOW_STATE_DIR"}
    env["HOME"] = str(home)
    return env


def test_resolve_prefers_prefect_api_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    record(tmp_path, "http://127.0.0.1:1/api")
    assert resolve(tmp_path) == "http://prefect.example:4200/api"


def test_resolve_refuses_without_api_or_record(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL")
    with pytest.raises(NoPrefectAPI, match=r"drflow up --config .* --state-dir"):
        resolve(tmp_path)


def test_resolve_refuses_a_record_nobody_answers(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL")
    record(tmp_path, f"http://127.0.0.1:{procs.free_port()}/api")
    with pytest.raises(NoPrefectAPI, match="does not answer"):
        resolve(tmp_path, timeout=0.5)
    (tmp_path / RECORD).write_text("{not json")
    with pytest.raises(NoPrefectAPI, match="unreadable"):
        resolve(tmp_path)


def test_forget_keeps_a_record_another_process_wrote(tmp_path: Path) -> None:
    (tmp_path / RECORD).write_text(json.dumps({"api_url": "http://x/api", "pid": os.getpid() + 1}))
    forget(tmp_path)
    assert (tmp_path / RECORD).exists()
    record(tmp_path, "http://y/api")
    forget(tmp_path)
    assert not (tmp_path / RECORD).exists()


@pytest.mark.parametrize("argv", [
    ["drill", "run", "orders"], ["failover", "orders"], ["reprotect", "orders"],
    ["failback", "orders"], ["deploy", "--prefect-yaml", str(EXAMPLE.parent.parent / "prefect.yaml")],
])
def test_without_an_orchestrator_a_command_stops_and_creates_no_prefect_database(
        tmp_path: Path, argv: list[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    out = subprocess.run([DRFLOW, *argv, "--config", str(EXAMPLE), "--state-dir",
                          str(tmp_path / "state")], capture_output=True, text=True, timeout=120,
                         env=bare_env(home), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no Prefect API" in out.stderr and "drflow up" in out.stderr, out.stderr
    assert not list(home.rglob("*.db")), list(home.rglob("*"))
    if argv[0] != "deploy":  # deploy reads Prefect's profiles (a server named there is fine)
        assert not (home / ".prefect").exists()


@pytest.fixture(scope="module")
def up_env() -> Iterator[tuple[Env, str]]:
    """A one-group lab run by `drflow up` with its own local Prefect (no PREFECT_API_URL)."""
    env = start_env(groups=1, replication="sync", gateway=False)
    try:
        port = procs.free_port()
        env.start_gateway("up", env={"PREFECT_API_URL": "", "PREFECT_HOME": "",
                                     "DRFLOW_PREFECT_PORT": str(port)}, timeout=180)
        # drflow up starts its Prefect where its gateway listens: the orchestrator's address.
        yield env, f"http://{env.state['orchestrator']['address']}:{port}/api"
    finally:
        stop_env(env)


@pytest.mark.lab
def test_drill_run_from_another_process_lands_in_drflow_ups_prefect(
        up_env: tuple[Env, str], tmp_path: Path) -> None:
    env, api = up_env
    assert json.loads((env.state_dir / RECORD).read_text())["api_url"] == api
    home = tmp_path / "home"
    home.mkdir()
    group = env.state["groups"][0]["name"]
    out = subprocess.run([DRFLOW, "drill", "run", group, "--config", str(env.config), "--json"],
                         capture_output=True, text=True, timeout=300,
                         env={**bare_env(home), "DRFLOW_STATE_DIR": str(env.state_dir)},
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    runs = httpx.post(f"{api}/flow_runs/filter", timeout=10,
                      json={"flows": {"name": {"any_": ["drill"]}}}).json()
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"], runs
    assert not (home / ".prefect" / "prefect.db").exists()
