"""Find running PostgreSQL instances and what they stand on, and turn them into agent resources.

Everything comes from the running system (psutil, the data directory's files, one optional SQL
query); nothing is guessed from defaults when the system can say.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agents.monitors.ip import interface_of
from agents.monitors.volume import mount_point_of
from drflow.secret_refs import SecretValue

_PG_NAMES = {"postgres", "postmaster"}
_WILDCARDS = {"0.0.0.0", "::", "*"}


@dataclass
class Upstream:
    host: str | None
    port: int | None
    user: str | None
    application_name: str | None


@dataclass
class Volume:
    mount_point: str
    device: str | None
    fstype: str | None


@dataclass
class PgInstance:
    """One running postmaster and the facts an agent config needs about it."""

    pid: int
    datadir: str
    port: int
    role: str                      # primary | standby
    role_source: str               # sql | standby.signal | postmaster.pid
    upstream: Upstream | None
    listen: list[str]              # addresses the port is bound to (from the sockets)
    bin_dir: str
    run_as: str
    version: str | None
    volume: Volume
    ip: str | None                 # the address checks connect to
    interface: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- finding postmasters ----------------------------------------------------------------------


def _net_namespace(pid: int | str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def find_postmasters() -> list[psutil.Process]:
    """Running postmasters: `postgres` processes whose parent is not a `postgres` process, in
    this machine's own network: one in another network namespace (a container) serves other
    addresses than this VM's, and is not this agent's to watch."""
    found = []
    own = _net_namespace("self")
    for p in psutil.process_iter(["name", "ppid"]):
        if p.info["name"] not in _PG_NAMES:
            continue
        if own is not None and _net_namespace(p.pid) not in (own, None):
            continue
        try:
            parent = psutil.Process(p.info["ppid"]).name() if p.info["ppid"] else ""
        except psutil.Error:
            parent = ""
        if parent not in _PG_NAMES:
            found.append(p)
    return sorted(found, key=lambda p: p.pid)


def datadir_of(p: psutil.Process) -> Path:
    """From `-D` on the command line, else the working directory (the postmaster chdirs there)."""
    args = p.cmdline()
    for i, a in enumerate(args):
        if a == "-D" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("-D") and len(a) > 2:
            return Path(a[2:])
        if a.startswith("--data-directory="):
            return Path(a.split("=", 1)[1])
    return Path(p.cwd())


def read_postmaster_pid(datadir: Path) -> dict[str, Any]:
    """The fields of postmaster.pid we need: pid, port, socket dir, first listen address, status."""
    lines = (datadir / "postmaster.pid").read_text().splitlines()

    def line(i: int) -> str:
        return lines[i].strip() if len(lines) > i else ""

    return {"pid": int(line(0) or 0), "port": int(line(3) or 0), "socket_dir": line(4),
            "listen": line(5), "status": line(7)}


def read_setting(datadir: Path, name: str) -> str | None:
    """A setting from postgresql.auto.conf, else postgresql.conf (the last one wins, as in PG)."""
    value = None
    for fname in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            text = (datadir / fname).read_text()
        except OSError:
            continue
        for raw in text.splitlines():
            m = re.match(rf"\s*{re.escape(name)}\s*=?\s*(.*)$", raw)
            if m:
                value = _conf_value(m.group(1))
    return value


def _conf_value(rest: str) -> str:
    rest = rest.strip()
    if rest.startswith("'"):
        out, i = [], 1
        while i < len(rest):
            c = rest[i]
            if c == "'" and rest[i + 1:i + 2] == "'":
                out.append("'")
                i += 2
                continue
            if c == "\\" and i + 1 < len(rest):
                out.append(rest[i + 1])
                i += 2
                continue
            if c == "'":
                break
            out.append(c)
            i += 1
        return "".join(out)
    return rest.split("#", 1)[0].strip()


def parse_conninfo(conninfo: str) -> dict[str, str]:
    """key=value pairs of a libpq connection string (values may be single-quoted, with \\ escapes)."""
    out: dict[str, str] = {}
    i, n = 0, len(conninfo)
    while i < n:
        while i < n and conninfo[i].isspace():
            i += 1
        key_start = i
        while i < n and conninfo[i] not in "= \t":
            i += 1
        key = conninfo[key_start:i]
        while i < n and conninfo[i].isspace():
            i += 1
        if i >= n or conninfo[i] != "=":
            break  # not key=value: stop rather than guess
        i += 1
        while i < n and conninfo[i].isspace():
            i += 1
        value: list[str] = []
        quoted = i < n and conninfo[i] == "'"
        i += quoted
        while i < n:
            c = conninfo[i]
            if c == "\\" and i + 1 < n:
                value.append(conninfo[i + 1])
                i += 2
                continue
            if (quoted and c == "'") or (not quoted and c.isspace()):
                i += 1
                break
            value.append(c)
            i += 1
        if key:
            out[key] = "".join(value)
    return out


def upstream_of(datadir: Path) -> Upstream | None:
    conninfo = read_setting(datadir, "primary_conninfo")
    if not conninfo:
        return None
    kv = parse_conninfo(conninfo)  # holds a password sometimes: only named keys leave here
    port = kv.get("port")
    return Upstream(host=kv.get("host") or kv.get("hostaddr"),
                    port=int(port) if port and port.isdigit() else None,
                    user=kv.get("user"), application_name=kv.get("application_name"))


def listening_addresses(p: psutil.Process, port: int) -> list[str]:
    addrs = []
    for c in p.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            addrs.append(c.laddr.ip)
    return sorted(set(addrs))


def volume_of(datadir: Path) -> Volume:
    mount = mount_point_of(datadir)
    for part in psutil.disk_partitions(all=True):
        if Path(part.mountpoint) == mount:
            return Volume(str(mount), part.device, part.fstype)
    return Volume(str(mount), None, None)


def sql_role(targets: list[tuple[str, int]], user: str, password: SecretValue | None,
             timeout_s: float = 3.0) -> str | None:
    """primary/standby from pg_is_in_recovery() at the first target that lets us in, else None."""
    import psycopg

    for host, port in targets:
        try:
            with psycopg.connect(
                host=host, port=port, user=user, dbname="postgres",
                password=password.get_secret_value() if password else None,
                connect_timeout=max(2, int(timeout_s))) as conn:
                row = conn.execute("select pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            continue  # try the next way in, then the files
        return "standby" if row and row[0] else "primary"
    return None


def inspect(p: psutil.Process, user: str = "postgres",
            password: SecretValue | None = None) -> PgInstance:
    """Everything we can learn about one postmaster."""
    datadir = datadir_of(p).resolve()
    notes: list[str] = []
    pid_info = read_postmaster_pid(datadir)
    port = pid_info["port"] or int(read_setting(datadir, "port") or 5432)
    listen = listening_addresses(p, port)
    specific = [a for a in listen if a not in _WILDCARDS]
    v4 = [a for a in specific if ipaddress.ip_address(a).version == 4]
    candidates = v4 or specific
    ip = candidates[0] if candidates else None
    if ip is None:
        notes.append("listens on all addresses: no ip resource; checks use 127.0.0.1")
    connect_host = ip or "127.0.0.1"
    targets = [(connect_host, port)]
    if pid_info["socket_dir"]:
        targets.insert(0, (pid_info["socket_dir"], port))
    role, source = sql_role(targets, user, password), "sql"
    if role is None:
        if (datadir / "standby.signal").exists():
            role, source = "standby", "standby.signal"
        elif pid_info["status"] == "standby":
            role, source = "standby", "postmaster.pid"
        else:
            role, source = "primary", "standby.signal"
    try:
        version: str | None = (datadir / "PG_VERSION").read_text().strip()
    except OSError:
        version = None
    exe = p.exe()
    return PgInstance(
        pid=p.pid, datadir=str(datadir), port=port, role=role, role_source=source,
        upstream=upstream_of(datadir) if role == "standby" else None, listen=listen,
        bin_dir=str(Path(exe).parent), run_as=p.username(), version=version,
        volume=volume_of(datadir), ip=ip, interface=interface_of(ip) if ip else None,
        notes=notes,
    )


def discover(datadirs: list[Path] | None = None, user: str = "postgres",
             password: SecretValue | None = None) -> list[PgInstance]:
    """Running PostgreSQL instances, optionally only those with the given data directories."""
    wanted = {d.resolve() for d in datadirs} if datadirs else None
    out = []
    for p in find_postmasters():
        try:
            if wanted is not None and datadir_of(p).resolve() not in wanted:
                continue
            out.append(inspect(p, user, password))
        except (psutil.Error, OSError, ValueError):
            continue  # it stopped while we looked, or is not ours to read
    return out


# -- resources --------------------------------------------------------------------------------


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return s or "root"


def resources_for(instances: list[PgInstance], user: str = "postgres",
                  password_ref: str | None = None) -> list[dict[str, Any]]:
    """Config resources, in dependency order ip → volume → postgres → tcp port (shared ones once)."""
    out: list[dict[str, Any]] = []
    names: set[str] = set()

    def add(res: dict[str, Any]) -> str:
        if res["name"] not in names:
            names.add(res["name"])
            out.append(res)
        return str(res["name"])

    for inst in instances:
        deps: list[str] = []
        if inst.ip:
            ip: dict[str, Any] = {"name": f"ip-{_slug(inst.ip)}", "type": "ip", "address": inst.ip}
            if inst.interface:
                ip["interface"] = inst.interface
            deps = [add(ip)]
        vol = add({"name": f"vol-{_slug(inst.volume.mount_point)}", "type": "volume",
                   "depends_on": deps, "path": inst.volume.mount_point,
                   "mount_point": inst.volume.mount_point, "min_free_mb": 64})
        host = inst.ip or "127.0.0.1"
        pg: dict[str, Any] = {
            "name": f"pg-{inst.port}", "type": "postgres", "depends_on": [vol], "host": host,
            "port": inst.port, "user": user, "dbname": "postgres", "datadir": inst.datadir,
            "bin_dir": inst.bin_dir,
        }
        if password_ref:
            pg["password"] = {"ref": password_ref}
        if inst.run_as != "root":
            pg["run_as"] = inst.run_as
        pg_name = add(pg)
        add({"name": f"port-{inst.port}", "type": "tcp", "depends_on": [pg_name],
             "host": host, "port": inst.port})
    return out


def config_for(instances: list[PgInstance], *, agent_id: str | None, group: str,
               gateway_url: str, secret_ref: str, outbox: str, pg_user: str = "postgres",
               pg_password_ref: str | None = None, control_listen: str | None = None,
               control_secret_ref: str | None = None,
               control_peers: list[str] | None = None) -> dict[str, Any]:
    """A complete agent.yaml document for the instances."""
    cfg: dict[str, Any] = {
        # The VM's name in vCenter; without one the table shows "(set --agent-id)".
        "agent_id": agent_id or "(set --agent-id)",
        "group": group,
        "gateway": {"url": gateway_url, "webhook_secret": {"ref": secret_ref}},
        "heartbeat_interval_s": 1,
        "outbox": outbox,
    }
    if control_listen and control_secret_ref:
        cfg["control"] = {"listen": control_listen, "secret": {"ref": control_secret_ref},
                          "peers": list(control_peers or [])}
    cfg["resources"] = resources_for(instances, pg_user, pg_password_ref)
    return cfg
