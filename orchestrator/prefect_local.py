"""Start and stop a local Prefect server (SQLite) when no PREFECT_API_URL is given."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from orchestrator.child_process import stop_child


@dataclass
class LocalPrefect:
    api_url: str
    ui_url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        stop_child(self.proc, timeout)


def server_env(home: Path) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def start_local_server(home: Path, port: int, timeout: float = 90.0,
                       host: str = "127.0.0.1", database_url: str | None = None) -> LocalPrefect:
    """Start Prefect's server on host:port with its SQLite database under `home`, or on
    `database_url` (postgresql+asyncpg://…). It runs as `prefect server start` does, except that
    requests refused with 503 (SQLite busy when several flows start at once) are retried inside
    the server at once instead of after the client's 2 s, 4 s… (orchestrator/prefect_server.py).

    A fresh database runs its migrations first (10-15 s); an existing one starts in a few seconds.
    """
    home.mkdir(parents=True, exist_ok=True)
    log = home / "prefect-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.prefect_server", "--host", host,
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **server_env(home),
                 **({"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {})},
            start_new_session=True,
        )
    api = f"http://{host}:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Prefect server exited with {proc.returncode}; see {log}:\n{tail}")
        try:
            if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                return LocalPrefect(api, f"http://{host}:{port}", proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"Prefect server did not answer on {api} within {timeout:.0f} s; see {log}")
