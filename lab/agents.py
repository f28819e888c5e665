"""A guest agent per lab VM: its agent.yaml, and the power-bridge service that runs it."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from drflow.signing import control_secret
from lab import procs
from lab.labconfig import LEASE_S


def agent_dir(lab_dir: Path, vm: str) -> Path:
    return lab_dir / "agents" / vm


def write_agent_config(lab_dir: Path, state: dict[str, Any], group: dict[str, Any], role: str,
                       control_port: int) -> Path:
    """agent.yaml for the VM holding `group[role]`, as `drflow agent discover --write` would."""
    node = group[role]
    d = agent_dir(lab_dir, node["vm"])
    d.mkdir(parents=True, exist_ok=True)
    secrets = lab_dir / "secrets"
    datadir = Path(node["datadir"])
    # The VM holds only its own control secret, derived from the master the orchestrator keeps.
    own_secret = d / "control_secret"
    fd = os.open(own_secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(control_secret(state["secrets"]["control"].encode(), node["vm"]))
    peers = [f"{group[r]['host']}:{group[r]['port']}" for r in ("primary", "standby")
             if r != role]
    cfg = {
        "agent_id": node["vm"],
        "group": group["name"],
        "gateway": {"url": state["gateway"]["url"] + "/v1/events",
                    "webhook_secret": {"ref": f"file:{secrets / 'webhook_secret'}"},
                    **({"also": [state["gateway_replica"]["url"] + "/v1/events"]}
                       if state.get("gateway_replica") else {})},
        "heartbeat_interval_s": 1,
        "outbox": str(d / "outbox.sqlite"),
        "control": {"listen": f"{node['host']}:{control_port}",
                    "secret": {"ref": f"file:{own_secret}"}, "peers": peers},
        "resources": [
            {"name": "loopback", "type": "ip", "address": "127.0.0.1", "interval_s": 5},
            {"name": "data-volume", "type": "volume", "path": str(datadir.parent),
             "depends_on": ["loopback"], "interval_s": 5, "min_free_mb": 100},
            {"name": "postgres", "type": "postgres", "host": node["host"], "port": node["port"],
             "user": state["database"]["user"], "dbname": state["database"]["name"],
             "password": {"ref": f"file:{secrets / 'db_password'}"},
             "datadir": str(datadir), "depends_on": ["data-volume"],
             "interval_s": 1, "timeout_s": 1, "failure_threshold": 1,
             "restart": {"max_restarts": 3, "window_s": 60, "backoff_s": {"initial": 0.2, "max": 2}}},
            {"name": "postgres-port", "type": "tcp", "host": node["host"], "port": node["port"],
             "depends_on": ["postgres"], "interval_s": 1, "failure_threshold": 2},
        ],
    }
    if state.get("etcd"):
        cfg["lease"] = lease_section(state, node["datacenter"])
    path = d / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def lease_section(state: dict[str, Any], site: str) -> dict[str, Any]:
    """agent.yaml's `lease`: the etcd member at the agent's own site first (its renewals do not
    cross sites while the site is whole), then the others."""
    by_site: dict[str, str] = state["etcd"]["by_site"]
    own = by_site.get(site)
    urls = [*([own] if own else []), *state["etcd"]["endpoints"]]
    return {"etcd": list(dict.fromkeys(urls)), "lease_s": LEASE_S, "margin_s": 0.5,
            "replication": state["replication"]}


def service_spec(lab_dir: Path, vm: str, config: Path) -> dict[str, Any]:
    """How the power bridge runs the agent: it writes its own pid, then becomes the agent."""
    d = agent_dir(lab_dir, vm)
    pidfile = d / "agent.pid"
    argv = [sys.executable, "-m", "orchestrator.cli", "agent", "run", "--config", str(config)]
    shell = f"echo $$ > {shlex.quote(str(pidfile))}; exec {shlex.join(argv)}"
    return {"name": f"agent:{vm}", "pidfile": str(pidfile), "start": ["sh", "-c", shell],
            "run_as": None, "cwd": str(d), "log": str(lab_dir / "logs" / f"agent-{vm}.log")}


def start_agent(spec: dict[str, Any]) -> int:
    """Start now (the bridge only acts on power changes), in the VM's network (`netns`: e.g.
    `ip netns exec NS`); returns the pid."""
    proc = procs.spawn([*spec.get("netns", []), *spec["start"]], Path(spec["log"]),
                       cwd=Path(spec["cwd"]))
    return proc.pid
