"""One PostgreSQL data directory and its server: binaries run as the owner, pid files, start, stop."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import psycopg

from agents.drivers import VerbError
from agents.drivers.pg_args import check_host
from drflow.secret_refs import SecretValue

log = logging.getLogger("agents.drivers.postgres")

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}", re.ASCII)
SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+-]*", re.ASCII)
STATE_TIMEOUT_S = 60


class PgServer:
    """The server process of one PostgreSQL instance and the files it owns."""

    def __init__(
        self,
        *,
        datadir: Path,
        port: int = 5432,
        host: str = "127.0.0.1",
        bin_dir: Path | None = None,
        run_as: str | None = None,
        dbname: str = "postgres",
        user: str = "postgres",
        password: SecretValue | None = None,
        log_path: Path | None = None,
        socket_dir: Path | None = None,
        application_name: str | None = None,
        replication_user: str | None = None,
        replication_password: SecretValue | None = None,
        connect_timeout_s: int = 3,
        peers: Iterable[tuple[str, int]] = (),
    ) -> None:
        check_host(host)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
        self.datadir = Path(datadir).absolute()
        self.port = port
        self.host = host
        self.bin_dir = Path(bin_dir) if bin_dir else default_bin_dir()
        if not (self.bin_dir / "pg_ctl").exists():
            raise FileNotFoundError(f"{self.bin_dir}/pg_ctl not found; pass the server bin_dir")
        if run_as is None and os.geteuid() == 0:
            run_as = "postgres"
        self.run_as = run_as
        self._runuser = shutil.which("runuser") if run_as and os.geteuid() == 0 else None
        if run_as and os.geteuid() == 0 and not self._runuser:
            raise FileNotFoundError("runuser not found: needed to run PostgreSQL as " + run_as)
        if run_as and os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != run_as:
            raise ValueError(f"run_as={run_as!r} needs the agent to run as root or as {run_as}")
        self.dbname = dbname
        self.user = user
        self._password = password
        self.log_path = Path(log_path) if log_path else self.datadir.with_name(
            self.datadir.name + ".log")
        self.socket_dir = Path(socket_dir) if socket_dir else None
        # None: the walreceiver then uses cluster_name, which synchronous_standby_names matches.
        self.application_name = application_name
        self.replication_user = replication_user or user
        self._replication_password = replication_password or (
            password if self.replication_user == user else None)
        for what, value in (("user", self.user), ("replication_user", self.replication_user),
                            ("application_name", self.application_name)):
            if value is not None and not NAME.fullmatch(value):
                raise ValueError(f"{what} {value!r} may only hold letters, digits, _ . -")
        for what, path in (("log_path", self.log_path), ("socket_dir", self.socket_dir),
                           ("datadir", self.datadir)):
            # pg_ctl hands -o and -l to a shell: keep these paths plain.
            if path is not None and not SAFE_PATH.fullmatch(str(path)):
                raise ValueError(f"{what} {str(path)!r} may only hold letters, digits, _ . / + -")
        self.connect_timeout_s = connect_timeout_s
        # The group's other nodes: the only targets of rewind_to / attach_to, the only hosts
        # that ever see the database password, the nodes a promote must not run beside.
        self.peers: tuple[tuple[str, int], ...] = tuple((check_host(h), int(p)) for h, p in peers)
        self._lock = threading.RLock()
        self._held_down = False

    def _connect(self, host: str | None = None, port: int | None = None,
                 timeout_s: int | None = None) -> psycopg.Connection[Any]:
        password = self._password.get_secret_value() if self._password else None
        return psycopg.connect(
            host=host or self.host, port=port or self.port, dbname=self.dbname, user=self.user,
            password=password, connect_timeout=timeout_s or self.connect_timeout_s,
            autocommit=True, application_name="drflow-agent")

    def _run(self, argv: list[str], *, timeout: float,
             password: SecretValue | None = None) -> subprocess.CompletedProcess[str]:
        """Run one of the fixed server binaries as the data directory's owner."""
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self._runuser and self.run_as:
            cmd = [self._runuser, "-u", self.run_as, "--", *cmd]
        # A small, known environment: nothing of the agent's leaks into the server.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}
        if password is not None:
            env["PGPASSWORD"] = password.get_secret_value()
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  cwd="/", env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise VerbError(f"{argv[0]} did not finish within {timeout:.0f} s") from exc

    def _live_postmaster(self) -> int | None:
        pid = self._pidfile_pid()
        if pid is None:
            return None
        return pid if is_postmaster_of(pid, self.datadir) else None

    def _pidfile_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return int(first.strip())
        except ValueError:
            return 0  # an empty or torn pid file: stale

    def _clear_stale_pidfile(self) -> bool:
        """After kill -9 the pid file stays and a later start can refuse: remove it if dead."""
        pid = self._pidfile_pid()
        if pid is None or is_postmaster_of(pid, self.datadir):
            return False
        with contextlib.suppress(FileNotFoundError):
            (self.datadir / "postmaster.pid").unlink()
        log.info("removed stale %s/postmaster.pid (pid %s is gone)", self.datadir, pid)
        return True

    def _pg_ctl_start(self) -> None:
        if not (self.datadir / "PG_VERSION").exists():
            raise VerbError(f"{self.datadir} is not a PostgreSQL data directory (no PG_VERSION)")
        opts = f"-p {self.port}" + (f" -k {self.socket_dir}" if self.socket_dir else "")
        deadline = time.monotonic() + 15
        while True:
            r = self._run(["pg_ctl", "-D", str(self.datadir), "-l", str(self.log_path), "-w",
                           "-t", str(STATE_TIMEOUT_S), "-o", opts, "start"],
                          timeout=STATE_TIMEOUT_S + 15)
            if r.returncode == 0:
                return
            if self._live_postmaster() is not None:
                raise VerbError(f"PostgreSQL on port {self.port} started but was not ready "
                                f"within {STATE_TIMEOUT_S} s; see {self.log_path}")
            tail = text_tail(self._log_tail() + "\n" + r.stdout + r.stderr)
            # Backends of a killed postmaster hold the old shared memory for a moment.
            if ("shared memory block" in tail or "lock file" in tail) and (
                    time.monotonic() < deadline):
                self._clear_stale_pidfile()
                time.sleep(0.1)
                continue
            raise VerbError(f"pg_ctl start failed for {self.datadir}: {tail}")

    def _pg_ctl_stop(self, mode: str) -> None:
        r = self._run(["pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t",
                       str(STATE_TIMEOUT_S), "stop"], timeout=STATE_TIMEOUT_S + 15)
        if r.returncode != 0 and self._live_postmaster() is not None:
            raise VerbError(f"pg_ctl stop -m {mode} failed: {text_tail(r.stdout + r.stderr)}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 1500))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _write_passfile(self) -> Path:
        """The replication password for primary_conninfo, outside the data directory, 0600."""
        assert self._replication_password is not None
        path = self.datadir.with_name(f".{self.datadir.name}.pgpass")
        secret = self._replication_password.get_secret_value()
        secret = secret.replace("\\", "\\\\").replace(":", "\\:")
        self._write_file(path, f"*:*:*:{self.replication_user}:{secret}\n".encode())
        return path

    def _write_file(self, path: Path, data: bytes) -> None:
        """Atomic write, owned by the server's user, mode 0600."""
        uid, gid = self._owner()
        tmp = path.with_name(path.name + ".drflow-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.geteuid() == 0:
            os.chown(tmp, uid, gid)
        os.replace(tmp, path)

    def _owner(self) -> tuple[int, int]:
        """Who owns the data directory: its present owner, else the user the server runs as
        (a first base backup's parent may well be root's), else the parent's owner."""
        with contextlib.suppress(FileNotFoundError):
            st = self.datadir.stat()
            return st.st_uid, st.st_gid
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            return pw.pw_uid, pw.pw_gid
        with contextlib.suppress(FileNotFoundError):
            st = self.datadir.parent.stat()
            return st.st_uid, st.st_gid
        pw = pwd.getpwuid(os.geteuid())
        return pw.pw_uid, pw.pw_gid


def default_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")]
    if not found:
        raise FileNotFoundError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; "
                                "install postgresql or pass bin_dir")

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    return max(found, key=version)


def is_postmaster_of(pid: int, datadir: Path) -> bool:
    """`pid` is a live PostgreSQL process working in `datadir` (not a recycled pid)."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.name() not in ("postgres", "postmaster"):
            return False
        with contextlib.suppress(psutil.AccessDenied):
            return Path(proc.cwd()) == datadir
        return True
    except psutil.NoSuchProcess:
        return False


def identity(conn: psycopg.Connection[Any]) -> tuple[str, int, str]:
    """(system identifier, port, postmaster start time): what tells one server from another."""
    row = conn.execute("SELECT system_identifier::text, current_setting('port')::int, "
                       "pg_postmaster_start_time()::text FROM pg_control_system()").fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), str(row[2])


def one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def wait_until(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise VerbError(f"timed out waiting for {what}")
        time.sleep(0.05)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def text_tail(text: str, limit: int = 600) -> str:
    """The last lines of `text` that fit in `limit` characters, joined by " | "."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    kept: list[str] = []
    while lines and sum(len(x) + 3 for x in kept) + len(lines[-1]) <= limit:
        kept.insert(0, lines.pop())
    if not kept and lines:
        kept = [lines[-1][-limit:]]
    return " | ".join(kept) or "(no output)"
