"""What `drflow protect` writes (pure: no I/O): the two agents' configs, the standby's own
PostgreSQL identity, and the group's entry in drflow.yaml."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agents.drivers.pg_rebuild import conf_literal

# Where the agent keeps what protect gives it in the guest.
SECRET_DIR = "/etc/drflow"
WEBHOOK_SECRET = f"{SECRET_DIR}/webhook_secret"
CONTROL_SECRET = f"{SECRET_DIR}/control_secret"
DB_PASSWORD = f"{SECRET_DIR}/db_password"
OUTBOX = "/var/lib/drflow/outbox.sqlite"
# A standby's data directory, as Debian lays out clusters (/var/lib/postgresql/VERSION/NAME).
STANDBY_DATA_ROOT = "/var/lib/postgresql"


@dataclass(frozen=True)
class Node:
    """One side as its agent will watch and drive it."""

    vm: str
    site: str
    address: str
    port: int
    datadir: str
    control_port: int


@dataclass(frozen=True)
class Common:
    """What both agents share: where they report, the lease, the database login."""

    group: str
    gateway_urls: tuple[str, ...]  # base URLs; the first is where events go, the rest `also`
    etcd: tuple[str, ...]  # this site's member first is the caller's choice
    lease_s: int
    replication: str
    db_user: str
    db_name: str
    bin_dir: str


def standby_datadir(version: str | None, group: str) -> str:
    major = (version or "").split(".")[0] or "main"
    return f"{STANDBY_DATA_ROOT}/{major}/{group}/data"


def agent_config(me: Node, peer: Node, c: Common) -> dict[str, Any]:
    """agent.yaml for `me`, whose peer (the only target its control API accepts) is `peer`."""
    home = posixpath.dirname(me.datadir)
    cfg: dict[str, Any] = {
        "agent_id": me.vm,
        "group": c.group,
        "gateway": {"url": c.gateway_urls[0] + "/v1/events",
                    "webhook_secret": {"ref": f"file:{WEBHOOK_SECRET}"},
                    **({"also": [u + "/v1/events" for u in c.gateway_urls[1:]]}
                       if len(c.gateway_urls) > 1 else {})},
        "heartbeat_interval_s": 1,
        "outbox": OUTBOX,
        "control": {"listen": f"{me.address}:{me.control_port}",
                    "secret": {"ref": f"file:{CONTROL_SECRET}"},
                    "peers": [f"{peer.address}:{peer.port}"]},
        "resources": [
            {"name": "loopback", "type": "ip", "address": "127.0.0.1", "interval_s": 5},
            # The data directory's parent: present while a base backup swaps the directory.
            {"name": "data-volume", "type": "volume", "path": home, "depends_on": ["loopback"],
             "interval_s": 5, "min_free_mb": 100},
            {"name": "postgres", "type": "postgres", "host": me.address, "port": me.port,
             "user": c.db_user, "dbname": c.db_name, "password": {"ref": f"file:{DB_PASSWORD}"},
             "datadir": me.datadir, "bin_dir": c.bin_dir, "depends_on": ["data-volume"],
             "interval_s": 1, "timeout_s": 1, "failure_threshold": 1,
             "restart": {"max_restarts": 3, "window_s": 60,
                         "backoff_s": {"initial": 0.2, "max": 2}}},
            {"name": "postgres-port", "type": "tcp", "host": me.address, "port": me.port,
             "depends_on": ["postgres"], "interval_s": 1, "failure_threshold": 2},
        ],
    }
    if c.etcd:
        cfg["lease"] = {"etcd": list(c.etcd), "lease_s": c.lease_s, "margin_s": 0.5,
                        "replication": c.replication}
    return cfg


@dataclass(frozen=True)
class Setting:
    """A row of the primary's pg_file_settings."""

    sourcefile: str
    name: str
    setting: str


@dataclass(frozen=True)
class IdentityFile:
    path: str  # in the standby
    text: str


def _is_within(path: str, root: str) -> bool:
    return posixpath.commonpath([path, root]) == root


def standby_identity(rows: Iterable[Setting], primary: Node, standby: Node) -> list[IdentityFile]:
    """The standby's own copy of each configuration file the primary reads from outside its data
    directory: a base backup copies only the data directory, whose postgresql.conf still
    includes these. A file beside the primary's data directory goes beside the standby's (it is
    included by a relative path); any other keeps its path. Each is rewritten for the
    standby: its port, its address, its socket directory (beside its data directory) and its
    cluster_name (its VM's name: the application_name the primary's sync setting names)."""
    by_file: dict[str, list[Setting]] = {}
    for r in rows:
        if not _is_within(posixpath.normpath(r.sourcefile), posixpath.normpath(primary.datadir)):
            by_file.setdefault(r.sourcefile, []).append(r)
    out = []
    home = posixpath.dirname(posixpath.normpath(primary.datadir))
    for source, settings in by_file.items():
        if _is_within(posixpath.normpath(source), home):
            # Beside the data directory (included as ../x.conf): beside the standby's.
            rel = posixpath.relpath(source, primary.datadir)
            path = posixpath.normpath(posixpath.join(standby.datadir, rel))
        else:
            path = source  # a system-wide file: the same path in the standby VM
        lines = [f"# {standby.vm}: written by drflow protect from {primary.vm}'s {source}"]
        for s in settings:
            lines.append(f"{s.name} = {conf_literal(_for_standby(s, primary, standby))}")
        out.append(IdentityFile(path, "\n".join(lines) + "\n"))
    return out


def _for_standby(s: Setting, primary: Node, standby: Node) -> str:
    if s.name == "port":
        return str(standby.port)
    if s.name == "cluster_name":
        return standby.vm
    if s.name == "unix_socket_directories":
        return posixpath.dirname(standby.datadir)
    if s.name == "listen_addresses":
        parts = [p.strip() for p in s.setting.split(",")]
        return ", ".join(standby.address if p == primary.address else p for p in parts)
    return s.setting


def group_entry(*, group: str, replication: str, rpo_budget_s: float, db_name: str, db_user: str,
                db_password_ref: str, primary: Node, standby: Node, zone_id: str, record: str,
                ttl: int, policy: dict[str, Any]) -> dict[str, Any]:
    """The group as drflow.yaml spells it."""

    def side(n: Node) -> dict[str, Any]:
        return {"site": n.site, "vm": n.vm, "host": n.address, "port": n.port,
                "agent_url": f"http://{n.address}:{n.control_port}"}

    return {
        "name": group, "application": "postgres", "replication": replication,
        "rpo_budget_s": rpo_budget_s,
        "database": {"name": db_name, "user": db_user, "password": {"ref": db_password_ref}},
        "primary": side(primary), "standby": side(standby),
        "dns": {"zone_id": zone_id, "record": record, "ttl": ttl},
        "policy": dict(policy),
    }
