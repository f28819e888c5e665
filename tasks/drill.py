"""DR drill bubble: a clone of the DR VM on the isolated port group, and a promoted copy of the
standby's data on its own port; the facts the drill's decisions need; and the teardown.

The copy is a `pg_basebackup` of the standby made by the machine running the drill, under the
config's `drill.work_dir`, listening on 127.0.0.1 only. It is started with every setting that
could tie it to production overridden (no primary_conninfo, no synchronous standbys, no
archiving), so it can never become a standby of, or a sender to, production; and without fsync,
so that it does not compete with production for the disk where they share one.

Production is only read: no row, table or setting is written there, and the base backup asks
the standby for a spread (not an immediate) restartpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pyVmomi import vim, vmodl

from tasks import vsphere
from tasks.postgres import Db, lsn_int
from tasks.vsphere import VCenter, connect, find_vm

PG_OS_USER = "postgres"  # PostgreSQL refuses to run as root
COPY_HOST = "127.0.0.1"  # the copy never listens beyond the drill machine
CHECK_TABLE = "drflow_drill_check"
RUN_FILE = "drill.json"
# The copy and its base backup yield the CPU to production wherever they share a machine.
NICE = ["nice", "-n", "10"]
# Settings that could tie a copy to production (or make its writes wait for a standby): dropped
# from the copy's postgresql.auto.conf and overridden there.
_NEUTRALISED = ("primary_conninfo", "primary_slot_name", "restore_command", "archive_command",
                "archive_mode", "synchronous_standby_names", "recovery_target", "port",
                "listen_addresses", "unix_socket_directories", "cluster_name", "ssl",
                "hba_file", "ident_file", "fsync", "synchronous_commit", "full_page_writes",
                "shared_buffers", "huge_pages", "logging_collector", "log_destination")
_INCLUDE = re.compile(r"^\s*(include|include_if_exists|include_dir)\s*=?\s*'([^']*)'", re.I)


class DrillError(RuntimeError):
    """A drill step could not be done; the message says what happened and where to look."""


# --- running PostgreSQL binaries as their owner ------------------------------------------------


def os_user() -> str | None:
    """The OS user the copy runs as: `postgres` when we are root, else ourselves (None)."""
    return PG_OS_USER if os.geteuid() == 0 else None


def pg_bindir(major: int | None = None) -> Path:
    """The server binaries matching the standby's major version (`$DRFLOW_PG_BINDIR` wins)."""
    override = os.environ.get("DRFLOW_PG_BINDIR")
    if override:
        return Path(override)
    root = Path("/usr/lib/postgresql")
    if major is not None and (root / str(major) / "bin" / "pg_ctl").exists():
        return root / str(major) / "bin"
    found = sorted((p for p in root.glob("*/bin") if (p / "pg_ctl").exists()),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0])
    if not found:
        raise DrillError("PostgreSQL server binaries not found under /usr/lib/postgresql: install "
                         "the server package matching the standby, or set DRFLOW_PG_BINDIR")
    return found[-1]


def _as_pg(argv: list[str]) -> list[str]:
    user = os_user()
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _pg_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if os_user():
        env["HOME"] = pwd.getpwnam(PG_OS_USER).pw_dir
    env.update(extra)
    return env


def _run(argv: list[str], what: str, timeout: float, cwd: Path, **env: str) -> str:
    try:
        out = subprocess.run(_as_pg(argv), cwd=cwd, env=_pg_env(**env), capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DrillError(f"{what} did not finish within {timeout:.0f} s") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip()[-1500:]
        raise DrillError(f"{what} failed (exit {out.returncode}): {msg}")
    return out.stdout


def _give_to_pg(*paths: Path) -> None:
    if os_user():
        for p in paths:
            shutil.chown(p, PG_OS_USER, PG_OS_USER)


def _pg_can_traverse(d: Path) -> bool:
    user = os_user()
    if user is None:
        return os.access(d, os.X_OK)
    st, pw = d.stat(), pwd.getpwnam(user)
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & 0o100)
    groups = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    if st.st_gid in groups:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def prepare_work_dir(work_dir: Path) -> None:
    """Create the drill's work directory where the PostgreSQL user can reach it, or say why not."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for d in [*reversed(work_dir.resolve().parents), work_dir.resolve()]:
        if d != work_dir.resolve() and not _pg_can_traverse(d):
            raise DrillError(f"drill.work_dir {work_dir}: the PostgreSQL user cannot enter {d} "
                             f"(mode {d.stat().st_mode & 0o777:o}); choose a directory it can "
                             "reach, e.g. under /var/tmp")
    work_dir.chmod(0o755)


@contextlib.contextmanager
def group_lock(work_dir: Path, group: str) -> Iterator[bool]:
    """One drill per group at a time on this machine: yields False if another one holds it."""
    locks = work_dir / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{group}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- facts for the drill's decisions (flows/drill_decisions.py) ----------------------------------


@dataclass(frozen=True)
class ReplicationFacts:
    """The standby as its primary and itself see it, read just before the drill."""

    error: str | None = None  # why the facts could not be read, if so
    standby_in_recovery: bool | None = None
    sender: str | None = None  # "host:port" the standby streams from
    state: str | None = None  # pg_stat_replication.state on the primary
    sync_state: str | None = None
    lag_s: float | None = None
    lag_bytes: int | None = None
    replay_paused: bool = False


@dataclass(frozen=True)
class IsolationFacts:
    """What vCenter says about the isolated port group on the standby VM's host."""

    error: str | None = None
    host: str | None = None
    portgroup_found: bool = False
    distributed: bool = False
    vswitch: str | None = None
    pnics: tuple[str, ...] = ()
    bridged: bool = False
    other_portgroups: tuple[str, ...] = ()  # other port groups sharing the vSwitch
    standby_networks: tuple[str, ...] = ()  # networks the standby VM's NICs are on
    attached_vms: tuple[str, ...] = ()  # VMs with a NIC on the isolated port group
    bridging_vms: tuple[str, ...] = ()  # ...of which also on another network


@dataclass(frozen=True)
class CopyFacts:
    """What the application checks found on the promoted copy."""

    in_recovery: bool | None
    replicating_from: str | None  # a WAL receiver or primary_conninfo on the copy: never allowed
    wrote_and_read: bool
    missing_tables: Sequence[str] = field(default_factory=tuple)
    copy_lsn: int | None = None
    known_lsn: int | None = None  # the standby's replay position observed before the copy
    witness: str | None = None  # "xid N committed" as the standby saw it before the copy
    witness_on_copy: str | None = None  # that transaction's fate on the copy
    senders_to_copy: Sequence[str] = field(default_factory=tuple)  # production → copy WAL


def _same_endpoint(a_host: str, a_port: int, b_host: str, b_port: int) -> bool:
    if a_port != b_port:
        return False
    if a_host == b_host:
        return True
    try:
        a = {i[4][0] for i in socket.getaddrinfo(a_host, a_port)}
        b = {i[4][0] for i in socket.getaddrinfo(b_host, b_port)}
    except OSError:
        return False
    return bool(a & b)


def replication_facts(primary: Db, standby: Db, settle_s: float = 1.0) -> ReplicationFacts:
    """The standby's replication as the standby and its primary report it (read-only queries)."""
    try:
        with standby.connect() as c:
            row = c.execute("select pg_is_in_recovery()").fetchone()
            if not row or not row[0]:
                return ReplicationFacts(standby_in_recovery=False)
            rcv = c.execute("select status, sender_host, sender_port, conninfo "
                            "from pg_stat_wal_receiver").fetchone()
            paused = c.execute("select pg_is_wal_replay_paused()").fetchone()
            cluster = c.execute("select current_setting('cluster_name')").fetchone()
    except psycopg.Error as exc:
        return ReplicationFacts(error=f"standby {standby}: {_short(exc)}")
    if rcv is None:
        return ReplicationFacts(standby_in_recovery=True, sender=None,
                                replay_paused=bool(paused and paused[0]))
    sender = f"{rcv[1]}:{rcv[2]}"
    if rcv[1] and rcv[2] and _same_endpoint(str(rcv[1]), int(rcv[2]), primary.host, primary.port):
        sender = f"{primary.host}:{primary.port}"
    app = _application_name(str(rcv[3] or ""), str(cluster[0] if cluster else ""))
    deadline = time.monotonic() + settle_s
    try:
        with primary.connect() as c:
            while True:
                r = c.execute(
                    "select state, sync_state, "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
                    "extract(epoch from replay_lag)::float8 from pg_stat_replication "
                    "where application_name = %s order by backend_start desc limit 1",
                    (app,)).fetchone()
                lag_s = r[3] if r else None
                lag_bytes = int(r[2]) if r and r[2] is not None else None
                # replay_lag is NULL once an idle standby has caught up: that is no lag at all.
                if r and lag_s is None and lag_bytes == 0:
                    lag_s = 0.0
                if r is None or lag_s is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # WAL in flight and no lag sample yet: ask again
    except psycopg.Error as exc:
        return ReplicationFacts(error=f"primary {primary}: {_short(exc)}")
    return ReplicationFacts(
        standby_in_recovery=True, sender=sender, state=r[0] if r else None,
        sync_state=r[1] if r else None, lag_s=None if lag_s is None else max(0.0, float(lag_s)),
        lag_bytes=None if lag_bytes is None else max(0, lag_bytes),
        replay_paused=bool(paused and paused[0]))


def _application_name(conninfo: str, cluster_name: str) -> str:
    # What the walreceiver calls itself: application_name, else cluster_name, else its default.
    with contextlib.suppress(Exception):
        name = conninfo_to_dict(conninfo).get("application_name")
        if name:
            return str(name)
    return cluster_name or "walreceiver"


def isolation_facts(vc: VCenter, standby_vm: str, portgroup: str) -> IsolationFacts:
    """Read the isolated port group's vSwitch on the standby VM's host (read-only)."""
    try:
        si = connect(vc)
        vm = find_vm(si, standby_vm, vc.datacenter)
        host = vm.runtime.host
        standby_networks = tuple(str(n.name) for n in vm.network)
        info = host.configManager.networkSystem.networkInfo
        pgs = {p.spec.name: p for p in info.portgroup or []}
        net = next((n for n in host.network if n.name == portgroup), None)
        if portgroup not in pgs:
            dist = isinstance(net, vim.dvs.DistributedVirtualPortgroup)
            return IsolationFacts(host=str(host.name), portgroup_found=dist, distributed=dist,
                                  standby_networks=standby_networks)
        pg = pgs[portgroup]
        sw = next((s for s in info.vswitch or [] if s.name == pg.spec.vswitchName), None)
        if sw is None:
            return IsolationFacts(error=f"port group {portgroup!r} names vSwitch "
                                        f"{pg.spec.vswitchName!r}, which the host does not have")
        # Read from the VMs' side: vcsim does not keep Network.vm up to date for clones.
        net_names = {n._moId: str(n.name) for n in host.network}
        on_host = _vm_networks(si, list(host.vm), net_names)
        attached = [name for name, nets in on_host.items() if portgroup in nets]
        return IsolationFacts(
            host=str(host.name), portgroup_found=True, vswitch=str(sw.name),
            pnics=tuple(str(p).removeprefix("key-vim.host.PhysicalNic-") for p in sw.pnic or []),
            bridged=sw.spec is not None and sw.spec.bridge is not None,
            other_portgroups=tuple(str(p.spec.name) for p in info.portgroup
                                   if p.spec.vswitchName == sw.name and p.spec.name != portgroup),
            standby_networks=standby_networks,
            attached_vms=tuple(sorted(attached)),
            bridging_vms=tuple(sorted(n for n in attached if on_host[n] - {portgroup})),
        )
    except Exception as exc:
        return IsolationFacts(error=f"vCenter {vc.url}: {type(exc).__name__}: {str(exc)[:200]}")


def vcenter_facts(vc: VCenter, standby_vm: str) -> tuple[bool, str]:
    """(reachable, detail): log in and find the standby VM."""
    try:
        vm = find_vm(connect(vc), standby_vm, vc.datacenter)
        return True, f"{vc.url} answers; {standby_vm} is {vm.runtime.powerState}"
    except Exception as exc:
        return False, f"{vc.url}: {type(exc).__name__}: {str(exc)[:200]}"


# --- the VM clone on the isolated port group ---------------------------------------------------


def _wait_task(t: Any, timeout: float = 120.0) -> Any:
    try:
        return vsphere.wait_task(t, timeout)
    except vsphere.TaskFailed as exc:
        raise DrillError(str(exc)) from None


def _nics(vm: Any) -> list[Any]:
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def _vm_networks(si: Any, vms: list[Any], net_names: dict[str, str]) -> dict[str, set[str]]:
    """{VM name: names of its networks} for `vms`, in one property-collector round trip
    (`net_names` maps network ids to names; an unknown network counts by its id)."""
    if not vms:
        return {}
    pc = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=vm, skip=False) for vm in vms],
        propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["name", "network"])])
    content = si.RetrieveContent()
    found: dict[str, set[str]] = {}
    result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
    while result is not None:
        for obj in result.objects:
            props = {p.name: p.val for p in obj.propSet}
            found[str(props.get("name"))] = {net_names.get(n._moId, n._moId)
                                             for n in props.get("network") or []}
        if not result.token:
            break
        result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
    return found


def drill_vms(vc: VCenter, prefix: str) -> list[str]:
    """Names of the VMs a drill of this group may have made (leftovers included)."""
    return sorted(n for n in vsphere.vms_by_name(connect(vc), vc.datacenter)
                  if n.startswith(prefix))


# No task timeout: it runs beside the copy in a worker thread, where Prefect cannot enforce one;
# each vCenter task it waits for is bounded (`_wait_task`).
@task(name="clone the DR VM into the bubble", cache_policy=NO_CACHE)
def clone_into_bubble(vc: VCenter, standby_vm: str, clone_name: str,
                      portgroup: str) -> dict[str, Any]:
    """Clone the standby VM with every NIC moved to the isolated port group, check, power on."""
    si = connect(vc)
    src = find_vm(si, standby_vm, vc.datacenter)
    host = src.runtime.host
    net = next((n for n in host.network if n.name == portgroup), None)
    if net is None:
        raise DrillError(f"host {host.name} has no network {portgroup!r}")
    changes = []
    for nic in _nics(src):
        nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=portgroup, network=net)
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=nic))
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=src.resourcePool, host=host),
        powerOn=False, template=False, config=vim.vm.ConfigSpec(deviceChange=changes))
    clone = _wait_task(src.CloneVM_Task(folder=src.parent, name=clone_name, spec=spec))
    networks = sorted({str(n.backing.deviceName) for n in _nics(clone)})
    if set(networks) - {portgroup}:
        _destroy(clone)
        raise DrillError(f"clone {clone_name} came out on {networks}, not only on {portgroup!r}: "
                         "destroyed it before powering on")
    # vcsim (and a CloneSpec on some vCenter versions) does not power on: do it ourselves.
    with contextlib.suppress(vim.fault.InvalidPowerState):
        _wait_task(clone.PowerOnVM_Task())
    return {"clone": clone_name, "host": str(host.name), "networks": networks,
            "power_state": str(clone.runtime.powerState)}


def _destroy(vm: Any) -> None:
    if vm.runtime.powerState != "poweredOff":
        with contextlib.suppress(vim.fault.InvalidPowerState):
            _wait_task(vm.PowerOffVM_Task())
    _wait_task(vm.Destroy_Task())


@task(name="destroy drill clones", retries=2, retry_delay_seconds=1, timeout_seconds=300,
      cache_policy=NO_CACHE)
def destroy_clones(vc: VCenter, prefix: str, portgroup: str) -> tuple[list[str], list[str]]:
    """Destroy VMs named `prefix…` whose NICs are all on the isolated port group.

    Returns (destroyed, refused): a VM with the prefix but a NIC elsewhere is not a drill clone
    this code made, so it is left alone and reported.
    """
    si = connect(vc)
    destroyed, refused = [], []
    for name, vm in sorted(vsphere.vms_by_name(si, vc.datacenter).items()):
        if not name.startswith(prefix):
            continue
        if vm is None:
            refused.append(f"{name} (several VMs by that name: not sure which is ours)")
            continue
        if any(str(n.backing.deviceName) != portgroup for n in _nics(vm)):
            refused.append(f"{name} (has a NIC outside {portgroup!r}: not a drill clone)")
            continue
        _destroy(vm)
        destroyed.append(name)
    return destroyed, refused


# --- production, read only: what the copy must hold -----------------------------------------------


@dataclass(frozen=True)
class Observation:
    """The standby at one moment, read in one snapshot: the copy must hold at least this."""

    replay_lsn: int  # WAL the standby had replayed
    witness_xid: int  # the newest transaction the standby saw completed...
    witness_status: str  # ...and its fate there ('committed' or 'aborted')
    tables: tuple[str, ...]  # production's user tables


def _newest_completed(snapshot: str) -> int:
    """The newest transaction id a `pg_current_snapshot()` text (xmin:xmax:xip,…) shows done."""
    xmin, xmax, xip = snapshot.split(":")
    running = {int(x) for x in xip.split(",") if x}
    x = int(xmax) - 1
    while x in running and x >= int(xmin):
        x -= 1
    return x


@task(name="observe the standby", retries=2, retry_delay_seconds=0.5, timeout_seconds=60,
      cache_policy=NO_CACHE)
def observe_standby(standby: Db) -> Observation:
    """Read-only: the standby's replay position, its newest completed transaction and tables.

    Production is never written for a drill (no marker row, no table): these facts, read in
    one snapshot on the standby, are what the copy taken afterwards must contain."""
    with standby.connect() as c:
        c.execute("begin isolation level repeatable read read only")
        row = c.execute("select pg_last_wal_replay_lsn()::text, pg_current_snapshot()::text"
                        ).fetchone()
        if row is None or lsn_int(row[0]) is None:
            raise DrillError(f"{standby} reports no replay position: is it a standby?")
        xid = _newest_completed(str(row[1]))
        status = c.execute("select pg_xact_status(%s::text::xid8)", (xid,)).fetchone()
        c.execute("commit")
    replay = lsn_int(row[0])
    assert replay is not None
    if status is None or status[0] not in ("committed", "aborted"):
        raise DrillError(f"transaction {xid} on {standby} is {status[0] if status else None}, "
                         "not completed: cannot use it as the drill's witness")
    return Observation(replay_lsn=replay, witness_xid=xid, witness_status=str(status[0]),
                       tables=tuple(user_tables(standby)))


def senders_to(db: Db, application_prefix: str) -> list[str]:
    """Read-only: WAL senders of `db` to a client whose application name starts with the prefix."""
    with db.connect() as c:
        rows = c.execute("select application_name || ' (' || state || ')' from "
                         "pg_stat_replication where starts_with(application_name, %s)",
                         (application_prefix,)).fetchall()
    return [str(r[0]) for r in rows]


def user_tables(db: Db) -> list[str]:
    """Every ordinary or partitioned table outside the system schemas, as schema.table."""
    with db.connect() as c:
        rows = c.execute(
            "select n.nspname || '.' || c.relname from pg_class c "
            "join pg_namespace n on n.oid = c.relnamespace "
            "where c.relkind in ('r', 'p') and c.relpersistence = 'p' "
            "and n.nspname not in ('pg_catalog', 'information_schema') "
            "and n.nspname not like 'pg_toast%%' order by 1").fetchall()
    return [str(r[0]) for r in rows]


# --- the copy of the standby --------------------------------------------------------------------


@dataclass(frozen=True)
class DrillCopy:
    """A drill's copy of the standby: its directory, data directory and port."""

    name: str
    run_dir: Path
    port: int
    group: str

    @property
    def datadir(self) -> Path:
        return self.run_dir / "data"

    @property
    def log(self) -> Path:
        return self.run_dir / "copy.log"


def _claim_port(work_dir: Path, lo: int, hi: int, owner: str) -> int:
    """A port of [lo, hi] free on 127.0.0.1 and not claimed by another drill's copy."""
    claims = work_dir / "ports"
    claims.mkdir(exist_ok=True)
    ports = list(range(lo, hi + 1))
    random.shuffle(ports)
    for port in ports:
        claim = claims / str(port)
        if claim.exists() and not (work_dir / claim.read_text().strip()).exists():
            claim.unlink(missing_ok=True)  # its drill is gone: a stale claim
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        if _port_free(port):
            return port
        claim.unlink(missing_ok=True)
    raise DrillError(f"no free port in drill.port_range [{lo}, {hi}]: widen it or stop what "
                     "listens there")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((COPY_HOST, port))
        except OSError:
            return False
    return True


def _pgpass_field(v: str) -> str:
    return v.replace("\\", "\\\\").replace(":", "\\:")


def _server_major(db: Db) -> int:
    with db.connect() as c:
        row = c.execute("select current_setting('server_version_num')::int").fetchone()
    return int(row[0]) // 10000 if row else 0


@task(name="copy the standby", timeout_seconds=6 * 3600, cache_policy=NO_CACHE)
def make_copy(source: Db, work_dir: Path, port_range: tuple[int, int], name: str,
              group: str, max_rate: str | None = None) -> dict[str, Any]:
    """pg_basebackup of the standby into `work_dir/name/data`, made ready to start on its own."""
    run_dir = work_dir / name
    run_dir.mkdir(mode=0o700)
    (run_dir / RUN_FILE).write_text(json.dumps({"group": group, "name": name,
                                                "created": time.time()}))
    _give_to_pg(run_dir)
    port = _claim_port(work_dir, *port_range, owner=name)
    copy = DrillCopy(name=name, run_dir=run_dir, port=port, group=group)
    bindir = pg_bindir(_server_major(source))
    passfile = run_dir / ".pgpass"
    pw = source.password.get_secret_value() if source.password else ""
    passfile.write_text(":".join(_pgpass_field(x) for x in (
        source.host, str(source.port), "*", source.user, pw)) + "\n")
    passfile.chmod(0o600)
    _give_to_pg(passfile)
    conninfo = make_conninfo(host=source.host, port=source.port, user=source.user,
                             dbname=source.dbname, application_name=f"drflow-drill-{name}")
    t0 = time.monotonic()
    try:
        method = _base_backup(bindir, conninfo, copy, passfile, max_rate)
    finally:
        passfile.unlink(missing_ok=True)
    seconds = time.monotonic() - t0
    _neutralise(copy)
    return {"copy": copy, "seconds": seconds, "wal_method": method,
            "bytes": _du(copy.datadir), "bindir": str(bindir)}


def _base_backup(bindir: Path, conninfo: str, copy: DrillCopy, passfile: Path,
                 max_rate: str | None) -> str:
    # `fetch` takes the WAL at the end of the copy (4x faster here than `stream`, which pads
    # whole segments); if the standby recycled that WAL meanwhile, `stream` with its temporary
    # slot cannot miss any. Never a permanent slot: a crashed drill must not pin the standby's WAL.
    # A spread checkpoint: the standby's restartpoint paces its writes as its own would, where
    # `fast` makes production's standby flush everything at once for a drill.
    for method in ("fetch", "stream"):
        try:
            _run([*NICE, str(bindir / "pg_basebackup"), "-D", str(copy.datadir), "-d", conninfo,
                  "--checkpoint=spread", f"--wal-method={method}", "--no-sync", "--no-manifest",
                  *([f"--max-rate={max_rate}"] if max_rate else [])],
                 f"pg_basebackup of the standby ({method})", timeout=6 * 3600,
                 cwd=copy.run_dir, PGPASSFILE=str(passfile))
            return method
        except DrillError as exc:
            if method == "stream" or "has already been removed" not in str(exc):
                raise
            shutil.rmtree(copy.datadir, ignore_errors=True)
    raise AssertionError("unreachable")


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _neutralise(copy: DrillCopy) -> None:
    """Cut every tie to production out of the copy's configuration; keep it a standby for now."""
    data = copy.datadir
    conf = data / "postgresql.conf"
    if conf.exists():
        lines = []
        for line in conf.read_text().splitlines():
            m = _INCLUDE.match(line)
            # An include that does not exist next to the copy (e.g. an instance file outside the
            # source's data directory) would stop it from starting: the overrides below replace it.
            if m and m.group(1).lower() == "include" and not (data / m.group(2)).exists():
                line = f"# drflow drill: target missing in the copy: {line}"
            lines.append(line)
        conf.write_text("\n".join(lines) + "\n")
    else:  # the source keeps its configuration outside the data directory (e.g. /etc)
        conf.write_text("# drflow drill copy: minimal configuration\nhot_standby = on\n")
    hba = data / "pg_hba.conf"
    if not hba.exists():
        hba.write_text(f"local all all peer\nhost all all {COPY_HOST}/32 scram-sha-256\n")
    auto = data / "postgresql.auto.conf"
    kept = [line for line in (auto.read_text().splitlines() if auto.exists() else [])
            if line.split("=", 1)[0].strip().lower() not in _NEUTRALISED]
    overrides = {
        "port": str(copy.port), "listen_addresses": COPY_HOST,
        "unix_socket_directories": str(copy.run_dir), "cluster_name": f"drflow-drill-{copy.name}",
        "primary_conninfo": "", "primary_slot_name": "", "restore_command": "",
        "archive_mode": "off", "archive_command": "", "synchronous_standby_names": "",
        "ssl": "off", "hba_file": str(hba), "ident_file": str(data / "pg_ident.conf"),
        # A throwaway copy needs no durability: without fsync its end-of-recovery checkpoint
        # does not compete with production for the disk. Modest memory, logs to its own file.
        "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
        "shared_buffers": "128MB", "huge_pages": "try", "logging_collector": "off",
        "log_destination": "stderr",
    }
    if not (data / "pg_ident.conf").exists():
        (data / "pg_ident.conf").write_text("")
    kept.append("# drflow drill copy: isolated, on its own port, never tied to production")
    kept += [f"{k} = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in overrides.items()]
    auto.write_text("\n".join(kept) + "\n")
    (data / "recovery.signal").unlink(missing_ok=True)
    (data / "standby.signal").touch()
    # Written by us (as root, maybe): the server must own them.
    _give_to_pg(conf, hba, auto, data / "pg_ident.conf", data / "standby.signal")


@task(name="start the copy", timeout_seconds=600, cache_policy=NO_CACHE)
def start_copy(copy: DrillCopy, bindir: str, timeout: float = 300.0) -> None:
    """Start the copy as a standby of nobody: it replays its own WAL, then waits to be promoted."""
    copy.log.touch()
    _give_to_pg(copy.log)
    try:
        _run([*NICE, str(Path(bindir) / "pg_ctl"), "start", "-D", str(copy.datadir), "-l",
              str(copy.log), "-w", "-t", str(round(timeout)), "-s"],
             f"starting the drill copy on port {copy.port}", timeout=timeout + 10,
             cwd=copy.run_dir)
    except DrillError as exc:
        raise DrillError(f"{exc}\nlast lines of {copy.log}:\n{_tail(copy.log)}") from None


@task(name="promote the copy", timeout_seconds=120, cache_policy=NO_CACHE)
def promote_copy(db: Db) -> int:
    """Promote the copy; return its LSN: the last WAL record it replayed from production."""
    with db.connect(timeout=10) as c:
        row = c.execute("select pg_is_in_recovery()").fetchone()
        if row and row[0]:
            done = c.execute("select pg_promote(true, 60)").fetchone()
            if not done or not done[0]:
                raise DrillError(f"the copy at {db} did not finish promotion within 60 s")
        lsn = c.execute("select coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text"
                        ).fetchone()
    copy_lsn = lsn_int(lsn[0] if lsn else None)
    if copy_lsn is None:
        raise DrillError(f"the copy at {db} reports no WAL position")
    return copy_lsn


@task(name="check the copy", timeout_seconds=300, cache_policy=NO_CACHE)
def check_copy(db: Db, seen: Observation, copy_lsn: int | None, drill_id: str,
               production: Sequence[Db], copy_name: str) -> CopyFacts:
    """Application checks on the promoted copy: write, read, the witness transaction, tables,
    detachment (the copy takes WAL from nobody; production sends it none, read-only)."""
    with db.connect(timeout=10) as c:
        rec = c.execute("select pg_is_in_recovery()").fetchone()
        rcv = c.execute("select sender_host || ':' || sender_port from pg_stat_wal_receiver"
                        ).fetchone()
        conninfo = c.execute("select current_setting('primary_conninfo')").fetchone()
        attached = (rcv[0] if rcv else None) or ((conninfo[0] if conninfo else "") and
                                                  "primary_conninfo")
        # Before the copy's own first write: its transaction ids then go on from production's.
        try:
            row = c.execute("select pg_xact_status(%s::text::xid8)", (seen.witness_xid,)
                            ).fetchone()
            fate = str(row[0]) if row else "unknown"
        except psycopg.errors.InvalidParameterValue:  # "transaction ID … is in the future"
            fate = "not yet begun (the copy is older than the observation)"
        c.execute(f"create table if not exists {CHECK_TABLE} (id text primary key, "
                  "at timestamptz default now())")
        c.execute(f"insert into {CHECK_TABLE} (id) values (%s)", (drill_id,))
        read = c.execute(f"select 1 from {CHECK_TABLE} where id = %s", (drill_id,)).fetchone()
    present = set(user_tables(db))
    missing = [t for t in seen.tables if t not in present]
    senders = [s for p in production for s in senders_to(p, f"drflow-drill-{copy_name}")]
    return CopyFacts(in_recovery=bool(rec[0]) if rec else None, replicating_from=attached or None,
                     wrote_and_read=read is not None, missing_tables=tuple(missing),
                     copy_lsn=copy_lsn, known_lsn=seen.replay_lsn,
                     witness=f"xid {seen.witness_xid} {seen.witness_status}",
                     witness_on_copy=f"xid {seen.witness_xid} {fate}",
                     senders_to_copy=tuple(senders))


# --- teardown -----------------------------------------------------------------------------------


def processes_under(path: Path) -> list[int]:
    """Pids of processes running in, or from, `path` (a copy's server and its children)."""
    root = str(path.resolve()) if path.exists() else str(path)
    found = []
    for p in psutil.process_iter(["pid", "cwd", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cwd = p.info["cwd"] or ""
            cmd = " ".join(p.info["cmdline"] or [])
            if cwd == root or cwd.startswith(root + "/") or f"{root}/" in cmd + "/":
                found.append(p.pid)
    return found


def leftover_copies(work_dir: Path, group: str) -> list[Path]:
    """Run directories of earlier drills of `group` that were never removed (a crash)."""
    found = []
    for run_file in work_dir.glob(f"*/{RUN_FILE}"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(run_file.read_text()).get("group") == group:
                found.append(run_file.parent)
    return sorted(found)


@task(name="remove the copy", retries=2, retry_delay_seconds=1, timeout_seconds=120,
      cache_policy=NO_CACHE)
def remove_copy(run_dir: Path, bindir: str | None = None) -> list[str]:
    """Stop the copy's server and remove its directory and port claim; return what is left."""
    data = run_dir / "data"
    if bindir and (data / "postmaster.pid").exists():
        with contextlib.suppress(DrillError):
            _run([str(Path(bindir) / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate",
                  "-w", "-t", "20", "-s"], "stopping the drill copy", timeout=30, cwd=run_dir.parent)
    pids = processes_under(run_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (pids := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    shutil.rmtree(run_dir, ignore_errors=True)
    claims = run_dir.parent / "ports"
    for claim in claims.glob("*") if claims.exists() else []:
        with contextlib.suppress(OSError):
            if claim.read_text().strip() == run_dir.name:
                claim.unlink()
    left = [f"process {p}" for p in processes_under(run_dir)]
    if run_dir.exists():
        left.append(f"directory {run_dir}")
    return left


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(log: Path, lines: int = 15) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
