"""The drill's copy of a standby: a PostgreSQL instance made, started, promoted and removed.

The copy is made by the machine running the drill, under the config's `drill.work_dir`, and
listens on 127.0.0.1 only. Either a copy-on-write snapshot of the standby's data directory (a
btrfs subvolume on work_dir's file system: atomic, so crash-consistent, and nothing is read
through the standby), or a `pg_basebackup` of the standby. It is started with every setting that
could tie it to production overridden (no primary_conninfo, no synchronous standbys, no
archiving), so it can never become a standby of, or a sender to, production; and without fsync,
so that it does not compete with production for the disk where they share one. The base backup
asks the standby for a spread (not an immediate) restartpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg.conninfo import make_conninfo

from drflow import btrfs
from drflow.pg_os import give_to_pg, pg_can_traverse, run_pg
from tasks.errors import DrillError
from tasks.postgres import Db, lsn_int

COPY_HOST = "127.0.0.1"  # the copy never listens beyond the drill machine
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


def _run(argv: list[str], what: str, timeout: float, cwd: Path, **env: str) -> str:
    return run_pg(argv, what, cwd, timeout, error=DrillError, env=env)


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


def prepare_work_dir(work_dir: Path) -> None:
    """Create the drill's work directory where the PostgreSQL user can reach it, or say why not."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for d in [*reversed(work_dir.resolve().parents), work_dir.resolve()]:
        if d != work_dir.resolve() and not pg_can_traverse(d):
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


# Left in a snapshot by the running standby; meaningless, or harmful, in the copy:
# postmaster.pid names the standby's live postmaster (a copy would refuse to start, and a
# `pg_ctl stop` of the copy would signal the standby).
_SNAPSHOT_EXCLUDED = ("postmaster.pid", "postmaster.opts", "backup_label.old")


def snapshot_problem(datadir: Path | None, work_dir: Path) -> str | None:
    """Why a snapshot of `datadir` cannot be the copy here; None if it can be tried."""
    if datadir is None:
        return "the standby's datadir is not configured (groups[].standby.datadir)"
    if shutil.which("btrfs") is None:
        return "the btrfs command is not installed on this machine (btrfs-progs)"
    try:
        datadir.stat()
    except OSError as exc:
        return f"the standby's datadir {datadir} is not visible here ({exc.strerror})"
    if not btrfs.is_subvolume(datadir):
        return f"the standby's datadir {datadir} is not a btrfs subvolume"
    wal = datadir / "pg_wal"
    if wal.is_symlink():
        return (f"{wal} is a link to another place: a snapshot of the data directory would not "
                "hold its WAL")
    tablespaces = datadir / "pg_tblspc"
    if tablespaces.is_dir() and any(tablespaces.iterdir()):
        return "the standby has tablespaces outside its data directory: a snapshot would miss them"
    if not btrfs.is_btrfs(work_dir):
        return f"drill.work_dir {work_dir} is not on btrfs (a snapshot stays on its file system)"
    return None


def _system_identifier(db: Db) -> int:
    with db.connect() as c:
        row = c.execute("select system_identifier from pg_control_system()").fetchone()
    if not row:
        raise DrillError(f"{db} reports no system identifier")
    return int(row[0])


def _control_data(bindir: Path, datadir: Path, cwd: Path) -> dict[str, str]:
    out = _run([str(bindir / "pg_controldata"), "-D", str(datadir)],
               f"reading the control file of {datadir}", timeout=30, cwd=cwd, LC_ALL="C")
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in out.splitlines()) if v}


def _new_run(source: Db, work_dir: Path, port_range: tuple[int, int], name: str,
             group: str) -> tuple[DrillCopy, Path]:
    """The copy's run directory (marked with its group, for teardown after a crash), its port,
    and the server binaries matching the standby."""
    run_dir = work_dir / name
    run_dir.mkdir(mode=0o700)
    (run_dir / RUN_FILE).write_text(json.dumps({"group": group, "name": name,
                                                "created": time.time()}))
    give_to_pg(run_dir)
    port = _claim_port(work_dir, *port_range, owner=name)
    return (DrillCopy(name=name, run_dir=run_dir, port=port, group=group),
            pg_bindir(_server_major(source)))


@task(name="snapshot the standby", timeout_seconds=600, cache_policy=NO_CACHE)
def snapshot_copy(source: Db, datadir: Path, work_dir: Path, port_range: tuple[int, int],
                  name: str, group: str) -> dict[str, Any]:
    """A btrfs snapshot of the standby's data directory into `work_dir/name/data`, checked to
    be the standby's (same system identifier, in recovery) and made ready to start on its own.

    The snapshot is atomic: what a crash of the standby at that instant would leave, which
    PostgreSQL recovers from by replaying its own WAL (the copy starts as a standby)."""
    copy, bindir = _new_run(source, work_dir, port_range, name, group)
    expected = _system_identifier(source)
    t0 = time.monotonic()
    # No restartpoint is asked of the standby first: a session waiting for one holds a snapshot
    # that delays the standby's replay until recovery cancels it (max_standby_streaming_delay,
    # 30 s here), and an immediate one flushes all its buffers at once. The copy replays from
    # the standby's last restartpoint instead (docs/drills.md, "Replay length").
    _run(["btrfs", "subvolume", "snapshot", str(datadir), str(copy.datadir)],
         f"btrfs snapshot of {datadir}", timeout=300, cwd=copy.run_dir)
    seconds = time.monotonic() - t0
    for leftover in _SNAPSHOT_EXCLUDED:
        (copy.datadir / leftover).unlink(missing_ok=True)
    for slot in (copy.datadir / "pg_replslot").glob("*"):
        shutil.rmtree(slot, ignore_errors=True)  # the standby's slots are not the copy's
    control = _control_data(bindir, copy.datadir, copy.run_dir)
    found = control.get("Database system identifier", "")
    state = control.get("Database cluster state", "")
    if found != str(expected):
        raise DrillError(f"{datadir} is not the standby's data directory: its system identifier "
                         f"is {found or 'unreadable'}, the standby's {expected}; fix "
                         "groups[].standby.datadir")
    if state != "in archive recovery":
        raise DrillError(f"{datadir} is not a standby's data directory (its control file says "
                         f"{state!r}, not 'in archive recovery'); fix groups[].standby.datadir")
    _neutralise(copy)
    return {"copy": copy, "seconds": seconds, "wal_method": "snapshot",
            "bytes": _du(copy.datadir), "bindir": str(bindir)}


@task(name="copy the standby", timeout_seconds=6 * 3600, cache_policy=NO_CACHE)
def make_copy(source: Db, work_dir: Path, port_range: tuple[int, int], name: str,
              group: str, max_rate: str | None = None) -> dict[str, Any]:
    """pg_basebackup of the standby into `work_dir/name/data`, made ready to start on its own."""
    copy, bindir = _new_run(source, work_dir, port_range, name, group)
    passfile = copy.run_dir / ".pgpass"
    pw = source.password.get_secret_value() if source.password else ""
    passfile.write_text(":".join(_pgpass_field(x) for x in (
        source.host, str(source.port), "*", source.user, pw)) + "\n")
    passfile.chmod(0o600)
    give_to_pg(passfile)
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
    give_to_pg(conf, hba, auto, data / "pg_ident.conf", data / "standby.signal")


@task(name="start the copy", timeout_seconds=600, cache_policy=NO_CACHE)
def start_copy(copy: DrillCopy, bindir: str, timeout: float = 300.0) -> None:
    """Start the copy as a standby of nobody: it replays its own WAL, then waits to be promoted."""
    copy.log.touch()
    give_to_pg(copy.log)
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
    if bindir and _own_pid_file(data):
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
    if btrfs.is_subvolume(data):
        # A snapshot: deleting the subvolume is instant where removing its files is not.
        with contextlib.suppress(DrillError):
            _run(["btrfs", "subvolume", "delete", str(data)], "deleting the drill's snapshot",
                 timeout=120, cwd=run_dir.parent)
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


def _own_pid_file(data: Path) -> bool:
    """Whether data/postmaster.pid names this data directory: a snapshot's copy of the
    standby's pid file (a crash before it was removed) must never lead `pg_ctl stop` to the
    standby's postmaster."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) > 1 and Path(lines[1]).resolve() == data.resolve()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(log: Path, lines: int = 15) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
