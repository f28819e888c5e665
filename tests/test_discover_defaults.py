"""`drflow agent discover` defaults: the gateway's real port, and no guessed agent id."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from drflow.config import GatewayConfig

DRFLOW = Path(sys.executable).parent / "drflow"


def _discover(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DRFLOW), "agent", "discover", *args], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def test_default_gateway_url_is_the_port_the_gateway_listens_on() -> None:
    port = GatewayConfig.model_fields["listen"].default.rpartition(":")[2]
    out = _discover("--help")
    assert out.returncode == 0, out.stderr
    assert f"http://127.0.0.1:{port}/v1/events" in out.stdout
    assert "8080" not in out.stdout


def test_writing_a_config_needs_the_vm_name_as_agent_id(tmp_path: Path) -> None:
    target = tmp_path / "agent.yaml"
    out = _discover("--write", str(target), "--datadir", "/nonexistent/data")
    assert out.returncode == 2
    assert "--agent-id is required with --write" in out.stderr
    assert "this VM's name in vCenter" in out.stderr
    assert not target.exists()
