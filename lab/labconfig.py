"""Write the drflow configuration that describes the lab, as a user would write theirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

LAB_APPROVERS = ["U0ONCALL1", "U0ONCALL2"]
# The leader lease's TTL and how long a takeover waits out a stun (docs/fencing.md).
LEASE_S = 3
STUN_GRACE_S = 10


def lab_config(lab_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """A drflow config dict for the lab: credentials only by reference (file or Secrets Manager)."""
    secrets_dir = lab_dir / "secrets"
    vcenters = state.get("vcenters") or {"prod": state["vcenter"], "dr": state["vcenter"]}

    def site(dc: str) -> dict[str, Any]:
        vc = vcenters[dc]  # a vCenter per site, as in production
        return {"vcenter": {"url": vc["url"], "datacenter": dc, "username": vc["user"],
                            "password": {"ref": "aws-sm:drflow-lab/vcenter#password"}}}

    def side(g: dict[str, Any], role: str) -> dict[str, Any]:
        s = g[role]
        # datadir: the drill runs on this machine, which holds every lab data directory; on
        # btrfs it snapshots the standby's instead of copying it (drill.copy_method auto).
        return {"site": s["datacenter"], "vm": s["vm"], "host": s["host"], "port": s["port"],
                "agent_url": s.get("agent_url"), "datadir": s.get("datadir")}

    groups = []
    for g in state["groups"]:
        groups.append({
            "name": g["name"],
            "application": "postgres",
            "replication": state["replication"],
            "rpo_budget_s": 5,
            "database": {"name": state["database"]["name"], "user": state["database"]["user"],
                         "password": {"ref": "aws-sm:drflow-lab/postgres#password"}},
            "primary": side(g, "primary"),
            "standby": side(g, "standby"),
            "dns": {"zone_id": g["dns"]["zone_id"], "record": g["dns"]["record"], "ttl": 30},
            "policy": {"auto_failover": True, "approvers": LAB_APPROVERS, "approvals_required": 1,
                       "approval_timeout_s": 3600, "drill_schedule": "0 3 * * 0",
                       "lease_s": LEASE_S, "stun_grace_s": STUN_GRACE_S},
        })
    for g in groups:
        for role in ("primary", "standby"):
            for key in ("agent_url", "datadir"):
                if g[role][key] is None:
                    del g[role][key]
    cfg: dict[str, Any] = {
        "sites": {"prod": site("prod"), "dr": site("dr")},
        "aws": {"region": state["aws"]["region"], "endpoint_url": state["aws"]["endpoint_url"],
                "access_key_id": {"ref": f"file:{secrets_dir / 'aws_access_key_id'}"},
                "secret_access_key": {"ref": f"file:{secrets_dir / 'aws_secret_access_key'}"}},
        "slack": {"api_url": state["slack"]["url"], "channel": state["slack"]["channel"],
                  "bot_token": {"ref": "aws-sm:drflow-lab/slack#bot_token"},
                  "signing_secret": {"ref": "aws-sm:drflow-lab/slack#signing_secret"}},
        "audit": {"url": f"sqlite:///{lab_dir / 'audit.db'}",
                  "s3_bucket": state["aws"]["audit_bucket"], "retention_days": 1},
        "gateway": {"listen": state["gateway"]["url"].removeprefix("http://"),
                    "webhook_secret": {"ref": "aws-sm:drflow-lab/gateway#webhook_secret"},
                    "control_secret": {"ref": "aws-sm:drflow-lab/gateway#control_secret"},
                    "heartbeat_timeout_s": 3},
        "groups": groups,
        # Drill copies live inside the lab directory, so `lab down` sweeps them too; with the
        # data directories on btrfs, on that same file system, where a snapshot can be made.
        "drill": {"work_dir": str(lab_dir / "pg" / "drill" if state.get("pg_storage") == "btrfs"
                                  else lab_dir / "drill")},
    }
    if state.get("etcd"):  # every member: the client moves on when one does not answer
        cfg["etcd"] = {"endpoints": list(state["etcd"]["endpoints"])}
    return cfg


def write_drflow_yaml(lab_dir: Path, state: dict[str, Any]) -> Path:
    path = lab_dir / "drflow.yaml"
    text = "# drflow configuration for the local DR lab (written by `drflow lab up`).\n"
    text += yaml.safe_dump(lab_config(lab_dir, state), sort_keys=False)
    path.write_text(text)
    return path
