"""Find the orchestrator's Prefect API: PREFECT_API_URL, or the one `drflow up` recorded.

Prefect, left to itself, falls back to a temporary server on `~/.prefect/prefect.db` when no API
is configured: runs would land in a database nobody looks at (and on a machine that never ran
Prefect, one created and migrated under load). drflow's commands never allow that fallback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

RECORD = "prefect-api.json"
STATE_DIR_ENV = "DRFLOW_STATE_DIR"


class NoPrefectAPI(RuntimeError):
    """No Prefect API is configured or running: the message says how to get one."""


def record(state_dir: Path, api_url: str) -> Path:
    """Write where `drflow up`'s Prefect answers, for the other commands to find."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"api_url": api_url, "pid": os.getpid()}) + "\n")
    tmp.replace(path)
    return path


def forget(state_dir: Path) -> None:
    """Remove the record if it is still ours (a second `up` may have replaced it)."""
    path = state_dir / RECORD
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _how_to_start(state_dir: Path) -> str:
    return (f"start the orchestrator with `drflow up --config drflow.yaml --state-dir {state_dir}` "
            f"(in another terminal or as a service) and give this command the same --state-dir "
            f"(or env {STATE_DIR_ENV}), or set PREFECT_API_URL to your Prefect server "
            "(e.g. export PREFECT_API_URL=http://prefect.dr.example.com:4200/api)")


def resolve(state_dir: Path, timeout: float = 3.0) -> str:
    """The Prefect API URL to use, exported as PREFECT_API_URL before Prefect is imported.

    PREFECT_API_URL wins when set; otherwise the record `drflow up` left in `state_dir`, if its
    server answers. Raises NoPrefectAPI with what to do otherwise."""
    env = os.environ.get("PREFECT_API_URL", "").strip()
    if env:
        return env
    path = state_dir / RECORD
    try:
        api = str(json.loads(path.read_text())["api_url"])
    except FileNotFoundError:
        raise NoPrefectAPI(f"no Prefect API: PREFECT_API_URL is not set and no `drflow up` is "
                           f"recorded in {path}; {_how_to_start(state_dir)}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NoPrefectAPI(f"no Prefect API: {path} is unreadable ({type(exc).__name__}); "
                           f"{_how_to_start(state_dir)}") from None
    try:
        ok = httpx.get(f"{api}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        ok = False
    if not ok:
        raise NoPrefectAPI(f"no Prefect API: `drflow up` recorded {api} in {path}, but it does not "
                           f"answer (is `drflow up` still running?); {_how_to_start(state_dir)}")
    os.environ["PREFECT_API_URL"] = api
    return api
