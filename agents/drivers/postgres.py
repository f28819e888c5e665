"""PostgreSQL driver: status, start, stop, promote, rewind_to and attach_to for one instance.

Every action runs a fixed server binary from `bin_dir` with validated arguments (never a shell),
as the data directory's owner when the agent runs as root. Passwords travel in PGPASSWORD or a
0600 passfile, never on a command line, and only to the group's configured peers: `rewind_to` and
`attach_to` accept no other target, and refuse this instance itself however its address is spelt.
A running server's settings are written by PostgreSQL itself (`ALTER SYSTEM` with the value as a
literal); a stopped one's `primary_conninfo` (it must stream from the right primary to become
consistent at all) is written with PostgreSQL's quoting and read back with `postgres -C` before it
starts. Every precondition is checked before anything is stopped. Verbs are
idempotent: asking for the state the instance is already in returns `{"action": "none", …}`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
)

from agents.drivers import NoArgs, Verb, VerbError

log = logging.getLogger(__name__)

# Full matches only (`re.fullmatch`): `$` would let a trailing newline through.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9][A-Za-z0-9-]{0,62}(?:\.[A-Za-z0-9-]{1,63})*",
                       re.ASCII)
_IP_TEXT = re.compile(r"[0-9A-Fa-f:.]{2,45}", re.ASCII)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}", re.ASCII)
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+-]*", re.ASCII)
_SETTING = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.$]*)")
# Files that describe this instance, not the cluster: pg_rewind and pg_basebackup would replace
# them with the source's copies (its port, its access rules), so they are put back afterwards,
# together with whatever postgresql.conf includes from inside the data directory.
_LOCAL_CONFIG = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf")
_INCLUDE = re.compile(r"^\s*(include|include_if_exists|include_dir)\s*=?\s*'([^']+)'")
_STATE_TIMEOUT_S = 60


def check_host(value: str) -> str:
    """An IP address (no IPv6 scope id) or a DNS name; nothing that could smuggle conninfo keys,
    options or configuration lines."""
    if _IP_TEXT.fullmatch(value):
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(value)
            return value
    if _HOSTNAME.fullmatch(value):
        return value
    raise ValueError(f"{value[:80]!r} is not an IP address or a host name")


def parse_peer(value: str) -> tuple[str, int]:
    """"host:port" (IPv6 in brackets) of a peer node → (host, port); ValueError says why."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"peer {value[:80]!r} must be host:port")
    return check_host(host), int(port)


Host = Annotated[str, AfterValidator(check_host)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


class StopArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["smart", "fast", "immediate"] = "fast"


class FenceProof(BaseModel):
    """The orchestrator's proof that the other node is fenced (the leader-lease work fills it)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["lease_expired", "powered_off", "operator_attested"]
    evidence: Annotated[StrictStr, Field(min_length=1, max_length=500)]


class PromoteArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A promoted standby with no standby of its own hangs every write while
    # synchronous_standby_names is set; the caller decides (and audits) relaxing it.
    relax_sync: StrictBool = False
    # Without it a promote is refused while a peer answers as a writable primary.
    fence_proof: FenceProof | None = None


class SourceArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_host: Host
    source_port: Port


class PrimaryArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    primary_host: Host
    primary_port: Port


def default_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")]
    if not found:
        raise FileNotFoundError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; "
                                "install postgresql or pass bin_dir")

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    return max(found, key=version)


class PostgresDriver:
    """Controls one PostgreSQL instance (a data directory served on `port`)."""

    application = "postgresql"

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
        password: SecretStr | None = None,
        log_path: Path | None = None,
        socket_dir: Path | None = None,
        application_name: str | None = None,
        replication_user: str | None = None,
        replication_password: SecretStr | None = None,
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
            if value is not None and not _NAME.fullmatch(value):
                raise ValueError(f"{what} {value!r} may only hold letters, digits, _ . -")
        for what, path in (("log_path", self.log_path), ("socket_dir", self.socket_dir),
                           ("datadir", self.datadir)):
            # pg_ctl hands -o and -l to a shell: keep these paths plain.
            if path is not None and not _SAFE_PATH.fullmatch(str(path)):
                raise ValueError(f"{what} {str(path)!r} may only hold letters, digits, _ . / + -")
        self.connect_timeout_s = connect_timeout_s
        # The group's other nodes: the only targets of rewind_to / attach_to, the only hosts
        # that ever see the database password, the nodes a promote must not run beside.
        self.peers: tuple[tuple[str, int], ...] = tuple((check_host(h), int(p)) for h, p in peers)
        self._lock = threading.RLock()
        self._held_down = False

    # ---- what the agent core asks -------------------------------------------------------

    def verbs(self) -> Mapping[str, Verb]:
        return {
            "status": Verb(NoArgs, _refusing(lambda _a: self.status()),
                           "role, LSN, lag, upstream"),
            "start": Verb(NoArgs, _refusing(lambda _a: self.start()),
                          "start (clears a stale pid file)"),
            "stop": Verb(StopArgs, _refusing(lambda a: self.stop(a.mode)),
                         "stop; stays down until start"),
            "promote": Verb(PromoteArgs,
                            _refusing(lambda a: self.promote(relax_sync=a.relax_sync,
                                                             fence_proof=a.fence_proof)),
                            "promote a standby (no-op on a primary; refused beside a writable "
                            "peer unless fence_proof)"),
            "rewind_to": Verb(SourceArgs,
                              _refusing(lambda a: self.rewind_to(a.source_host, a.source_port)),
                              "make this a standby of source (pg_rewind or base backup)"),
            "attach_to": Verb(PrimaryArgs,
                              _refusing(lambda a: self.attach_to(a.primary_host, a.primary_port)),
                              "point this standby at another primary"),
        }

    def busy(self) -> bool:
        """True while a verb changes the instance: local recovery must leave it alone."""
        if self._lock.acquire(blocking=False):
            self._lock.release()
            return False
        return True

    @property
    def held_down(self) -> bool:
        """Stopped on purpose by the `stop` verb: local recovery must not restart it."""
        return self._held_down

    # ---- verbs ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        pid = self._live_postmaster()
        out: dict[str, Any] = {
            "running": pid is not None, "pid": pid, "role": "down", "port": self.port,
            "datadir": str(self.datadir), "lsn": None, "replay_lag_s": None,
            "replay_lag_bytes": None, "upstream": None, "receiver": None, "sync_state": None,
            "replicas": [], "held_down": self._held_down,
            "standby_signal": (self.datadir / "standby.signal").exists(),
        }
        if pid is None:
            return out
        try:
            with self._connect() as conn:
                out.update(self._sql_status(conn))
        except psycopg.Error as exc:
            out["error"] = _first_line(exc)
        return out

    def start(self) -> dict[str, Any]:
        with self._lock:
            self._held_down = False
            pid = self._live_postmaster()
            if pid is not None:
                return {"action": "none", "reason": f"already running (pid {pid})"}
            removed = self._clear_stale_pidfile()
            self._pg_ctl_start()
            return {"action": "started", "removed_stale_pidfile": removed,
                    "role": self._role_or_down()}

    def stop(self, mode: str = "fast") -> dict[str, Any]:
        StopArgs(mode=mode)  # type: ignore[arg-type]
        with self._lock:
            self._held_down = True
            if self._live_postmaster() is None:
                removed = self._clear_stale_pidfile()
                return {"action": "none", "reason": "not running",
                        "removed_stale_pidfile": removed}
            self._pg_ctl_stop(mode)
            return {"action": "stopped", "mode": mode}

    def promote(self, relax_sync: bool = False,
                fence_proof: FenceProof | None = None) -> dict[str, Any]:
        with self._lock:
            if self._live_postmaster() is None:
                raise VerbError(f"PostgreSQL on port {self.port} is not running; start it "
                                "before promoting")
            t0 = time.monotonic()
            with self._connect() as conn:
                in_recovery = _one(conn, "SELECT pg_is_in_recovery()")
                fenced: dict[str, Any] | None = None
                if in_recovery:
                    writable = self._writable_peers()
                    if writable and fence_proof is None:
                        log.warning("promote refused: %s answers as a writable primary and the "
                                    "request carries no fence_proof", ", ".join(writable))
                        raise VerbError(
                            f"{', '.join(writable)} answers as a writable primary: promoting "
                            "now would make two primaries; fence it first, or send the "
                            "orchestrator's fence_proof; nothing was changed")
                    if writable and fence_proof is not None:
                        log.warning("promoting beside writable %s on fence proof %s: %s",
                                    ", ".join(writable), fence_proof.kind, fence_proof.evidence)
                        fenced = {"writable_peers": writable, "fence_proof": fence_proof.kind}
                    if not _one(conn, "SELECT pg_promote(true, 30)"):
                        raise VerbError(f"pg_promote did not finish within 30 s; see "
                                        f"{self.log_path}")
                    result: dict[str, Any] = {"action": "promoted",
                                              "seconds": round(time.monotonic() - t0, 3)}
                    if fenced:
                        result.update(fenced)
                else:
                    result = {"action": "none", "reason": "already primary"}
                names = str(_one(conn, "SHOW synchronous_standby_names"))
                result["sync_relaxed"] = False
                if relax_sync and names:
                    conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
                    conn.execute("SELECT pg_reload_conf()")
                    _wait(lambda: _one(conn, "SHOW synchronous_standby_names") == "", 5,
                          "synchronous_standby_names to clear after reload")
                    result["sync_relaxed"] = True
                    result["previous_synchronous_standby_names"] = names
                    names = ""
                result["synchronous_standby_names"] = names
                result["lsn"] = str(_one(conn, "SELECT pg_current_wal_lsn()"))
            return result

    def rewind_to(self, source_host: str, source_port: int) -> dict[str, Any]:
        """Make this instance a streaming standby of the primary at source_host:source_port."""
        SourceArgs(source_host=source_host, source_port=source_port)
        with self._lock:
            t0 = time.monotonic()
            # Every check comes before the stop: a refused request leaves a primary serving.
            source_host, source_port = self._peer_target(source_host, source_port)
            self._check_source(source_host, source_port)
            current = self.status()
            if current["role"] == "standby" and self._streams_from(current, source_host,
                                                                   source_port):
                self._held_down = False
                return {"action": "none", "method": None,
                        "reason": f"already streaming from {source_host}:{source_port}"}
            phases: dict[str, float] = {}
            lap = time.monotonic()

            def done(phase: str) -> None:
                nonlocal lap
                now = time.monotonic()
                phases[phase] = round(now - lap, 3)
                lap = now

            if current["running"]:
                self._pg_ctl_stop("fast")
                done("stop")
            self._clear_stale_pidfile()
            saved = self._save_local_config()
            method, reason = self._pg_rewind(source_host, source_port)
            done("pg_rewind")
            if method == "pg_basebackup":
                self._base_backup(source_host, source_port, reason)
                done("pg_basebackup")
            self._restore_local_config(saved)
            # postgresql.auto.conf is the source's now: its port (if set there) is not ours, and
            # its primary_conninfo (if any) points at us.
            self._write_upstream_offline(source_host, source_port, drop_port=True,
                                         pin_port=not saved)
            self._held_down = False
            self._pg_ctl_start()
            done("start")
            streaming = self._wait_streaming(source_host, source_port, 30)
            done("streaming")
            return {"action": "rewound" if method == "pg_rewind" else "rebuilt",
                    "method": method, "reason": reason, "streaming": streaming,
                    "upstream": f"{source_host}:{source_port}",
                    "seconds": round(time.monotonic() - t0, 2), "phases": phases}

    def attach_to(self, primary_host: str, primary_port: int) -> dict[str, Any]:
        """Point this standby (running or stopped) at another primary."""
        PrimaryArgs(primary_host=primary_host, primary_port=primary_port)
        with self._lock:
            primary_host, primary_port = self._peer_target(primary_host, primary_port)
            current = self.status()
            if current["running"]:
                if current["role"] == "primary":
                    raise VerbError(f"port {self.port} is a primary: use rewind_to to make it a "
                                    "standby (it may hold writes the new primary lacks)")
                if current["role"] != "standby":
                    raise VerbError(f"cannot read the role of port {self.port}: "
                                    f"{current.get('error', 'not accepting connections')}")
                if self._streams_from(current, primary_host, primary_port):
                    return {"action": "none",
                            "reason": f"already streaming from {primary_host}:{primary_port}"}
                self._set_upstream(primary_host, primary_port)
            else:
                if not (self.datadir / "standby.signal").exists():
                    raise VerbError(f"port {self.port} is a stopped primary (no standby.signal); "
                                    "use rewind_to, it may hold writes the new primary lacks")
                self._write_upstream_offline(primary_host, primary_port)
                self._clear_stale_pidfile()
                self._held_down = False
                self._pg_ctl_start()
            streaming = self._wait_streaming(primary_host, primary_port, 30)
            return {"action": "attached", "upstream": f"{primary_host}:{primary_port}",
                    "streaming": streaming}

    # ---- status helpers -------------------------------------------------------------------

    def _connect(self, host: str | None = None, port: int | None = None,
                 timeout_s: int | None = None) -> psycopg.Connection[Any]:
        password = self._password.get_secret_value() if self._password else None
        return psycopg.connect(
            host=host or self.host, port=port or self.port, dbname=self.dbname, user=self.user,
            password=password, connect_timeout=timeout_s or self.connect_timeout_s,
            autocommit=True, application_name="drflow-agent")

    def _sql_status(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not _one(conn, "SELECT pg_is_in_recovery()"):
            out["role"] = "primary"
            out["lsn"] = str(_one(conn, "SELECT pg_current_wal_lsn()"))
            out["replicas"] = [
                {"application_name": r[0], "client_addr": r[1], "state": r[2],
                 "sync_state": r[3], "replay_lag_bytes": r[4],
                 "replay_lag_s": None if r[5] is None else float(r[5])}
                for r in conn.execute(
                    "SELECT application_name, host(client_addr), state, sync_state, "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
                    "extract(epoch FROM replay_lag) FROM pg_stat_replication "
                    "ORDER BY application_name").fetchall()
            ]
            out["synchronous_standby_names"] = str(_one(conn, "SHOW synchronous_standby_names"))
            return out
        out.update(role="standby", upstream=None, receiver=None)
        row = conn.execute(
            "SELECT pg_last_wal_replay_lsn(), "
            # Right after a start the receiver restarts at a segment boundary, behind replay.
            "greatest(0, pg_wal_lsn_diff(pg_last_wal_receive_lsn(), "
            "pg_last_wal_replay_lsn()))::bigint, "
            "CASE WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0 "
            "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END").fetchone()
        assert row is not None
        out["lsn"] = None if row[0] is None else str(row[0])
        out["replay_lag_bytes"] = row[1]
        out["replay_lag_s"] = None if row[2] is None else float(row[2])
        recv = conn.execute(
            "SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver").fetchone()
        if recv is not None:
            out["receiver"] = recv[0]
            if recv[1] is not None:
                out["upstream"] = f"{recv[1]}:{recv[2]}"
        if out["upstream"] is None:
            # pg_stat_wal_receiver hides the sender from non-superusers: read our own config.
            configured = self._configured_upstream(conn)
            out["upstream"] = f"{configured[0]}:{configured[1]}" if configured else None
        out.update(self._view_from_upstream(out["upstream"], out["lsn"]))
        return out

    def _view_from_upstream(self, upstream: str | None, replay_lsn: str | None) -> dict[str, Any]:
        """Sync state and true lag as the upstream sees them (best effort, 1 s)."""
        if not upstream or replay_lsn is None:
            return {}
        host, _, port = upstream.rpartition(":")
        if not port.isdigit() or self._matching_peer(host, int(port)) is None:
            return {}  # our password goes to configured peers only
        name = self.application_name or self._cluster_name()
        try:
            with self._connect(host, int(port), timeout_s=1) as up:
                row = up.execute(
                    "SELECT (SELECT sync_state FROM pg_stat_replication "
                    "WHERE application_name = %s LIMIT 1), "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::bigint",
                    (name, replay_lsn)).fetchone()
        except (psycopg.Error, ValueError):
            return {}
        assert row is not None
        return {"sync_state": row[0], "upstream_lag_bytes": row[1]}

    def _cluster_name(self) -> str:
        try:
            with self._connect() as conn:
                return str(_one(conn, "SHOW cluster_name"))
        except psycopg.Error:
            return ""

    def _role_or_down(self) -> str:
        try:
            with self._connect() as conn:
                return "standby" if _one(conn, "SELECT pg_is_in_recovery()") else "primary"
        except psycopg.Error:
            return "down"

    def _streams_from(self, status: Mapping[str, Any], host: str, port: int) -> bool:
        if status.get("receiver") != "streaming" or not status.get("upstream"):
            return False
        up_host, _, up_port = str(status["upstream"]).rpartition(":")
        return up_port == str(port) and (up_host == host or bool(_addresses(up_host)
                                                                  & _addresses(host)))

    def _wait_streaming(self, host: str, port: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._streams_from(self.status(), host, port):
                return True
            time.sleep(0.2)
        log.warning("port %s is not streaming from %s:%s after %.0f s; see %s", self.port, host,
                    port, timeout_s, self.log_path)
        return False

    def _is_self(self, host: str, port: int) -> bool:
        """host:port reaches this instance, however the address is spelt (127.1, 0x7f000001…)."""
        if port != self.port:
            return False
        addrs = _addresses(host)
        ours = _addresses(self.host) | _local_addresses()
        return bool(addrs & ours) or any(a.is_loopback or a.is_unspecified for a in addrs)

    def _matching_peer(self, host: str, port: int) -> tuple[str, int] | None:
        """The configured peer that host:port names (as configured), or None."""
        if self._is_self(host, port):
            return None
        for peer in self.peers:
            if peer == (host, port):
                return peer
        wanted = _addresses(host)
        for peer_host, peer_port in self.peers:
            if peer_port == port and wanted & _addresses(peer_host):
                return peer_host, peer_port
        return None

    def _peer_target(self, host: str, port: int) -> tuple[str, int]:
        """The configured peer host:port names, or VerbError: never this instance, never a
        host outside the group (it would receive our password)."""
        if self._is_self(host, port):
            raise VerbError(f"{host}:{port} is this instance ({self.host}:{self.port}); name the "
                            "new primary; nothing was changed")
        peer = self._matching_peer(host, port)
        if peer is None:
            known = ", ".join(f"{h}:{p}" for h, p in self.peers) or "none configured"
            raise VerbError(f"{host}:{port} is not a node of this group (peers: {known}; set "
                            "control.peers in agent.yaml); nothing was changed")
        return peer

    def _writable_peers(self) -> list[str]:
        """Peers that answer, right now, as a primary accepting writes."""
        out = []
        for host, port in self.peers:
            if self._is_self(host, port):
                continue
            try:
                with self._connect(host, port, timeout_s=2) as conn:
                    if _one(conn, "SELECT NOT pg_is_in_recovery() AND "
                                  "current_setting('transaction_read_only') = 'off'"):
                        out.append(f"{host}:{port}")
            except psycopg.Error:
                continue  # not answering: the orchestrator's fence decides, not this check
        return out

    # ---- process control ------------------------------------------------------------------

    def _run(self, argv: list[str], *, timeout: float,
             password: SecretStr | None = None) -> subprocess.CompletedProcess[str]:
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
        return pid if _is_postmaster_of(pid, self.datadir) else None

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
        if pid is None or _is_postmaster_of(pid, self.datadir):
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
                           "-t", str(_STATE_TIMEOUT_S), "-o", opts, "start"],
                          timeout=_STATE_TIMEOUT_S + 15)
            if r.returncode == 0:
                return
            if self._live_postmaster() is not None:
                raise VerbError(f"PostgreSQL on port {self.port} started but was not ready "
                                f"within {_STATE_TIMEOUT_S} s; see {self.log_path}")
            tail = _tail(self._log_tail() + "\n" + r.stdout + r.stderr)
            # Backends of a killed postmaster hold the old shared memory for a moment.
            if ("shared memory block" in tail or "lock file" in tail) and (
                    time.monotonic() < deadline):
                self._clear_stale_pidfile()
                time.sleep(0.1)
                continue
            raise VerbError(f"pg_ctl start failed for {self.datadir}: {tail}")

    def _pg_ctl_stop(self, mode: str) -> None:
        r = self._run(["pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t",
                       str(_STATE_TIMEOUT_S), "stop"], timeout=_STATE_TIMEOUT_S + 15)
        if r.returncode != 0 and self._live_postmaster() is not None:
            raise VerbError(f"pg_ctl stop -m {mode} failed: {_tail(r.stdout + r.stderr)}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 1500))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    # ---- rewind / base backup -------------------------------------------------------------

    def _check_source(self, host: str, port: int) -> None:
        """Refuse before touching anything unless the source is another server of our cluster,
        a primary, on our timeline or a later one (compared over SQL)."""
        try:
            with self._connect(host, port) as src:
                if _one(src, "SELECT pg_is_in_recovery()"):
                    raise VerbError(f"{host}:{port} is a standby; rewind_to needs the primary; "
                                    "nothing was changed")
                # A just-promoted source's control file may still show the old timeline until
                # its next checkpoint; pg_rewind would then wrongly find "no rewind required".
                try:
                    src.execute("CHECKPOINT")
                except psycopg.errors.InsufficientPrivilege:
                    log.warning("cannot CHECKPOINT %s:%s (needs superuser or pg_checkpoint); "
                                "pg_rewind may misjudge a freshly promoted source", host, port)
                source = _identity(src)
                source_tl = int(_one(src, "SELECT timeline_id FROM pg_control_checkpoint()"))
        except psycopg.Error as exc:
            raise VerbError(f"cannot reach the source {host}:{port}: {_first_line(exc)}; "
                            "nothing was changed") from exc
        if self._own_identity() == source:
            raise VerbError(f"{host}:{port} is this instance (same system identifier, port and "
                            "start time); name the new primary; nothing was changed")
        ours, our_tl = self._control_data()
        if ours is not None and ours != source[0]:
            raise VerbError(f"{host}:{port} belongs to another cluster (system identifier "
                            f"{source[0]}, ours {ours}); refusing to overwrite {self.datadir}; "
                            "nothing was changed")
        if our_tl is not None and source_tl < our_tl:
            raise VerbError(f"{host}:{port} is on timeline {source_tl}, behind ours ({our_tl}): "
                            "it cannot be the new primary; nothing was changed")

    def _own_identity(self) -> tuple[str, int, str] | None:
        if self._live_postmaster() is None:
            return None
        try:
            with self._connect() as conn:
                return _identity(conn)
        except psycopg.Error:
            return None

    def _control_data(self) -> tuple[str | None, int | None]:
        """(system identifier, latest checkpoint's timeline) from our pg_control, if any."""
        if not (self.datadir / "global" / "pg_control").exists():
            return None, None
        r = self._run(["pg_controldata", "-D", str(self.datadir)], timeout=30)
        sysid = re.search(r"Database system identifier:\s*(\d+)", r.stdout)
        tl = re.search(r"Latest checkpoint's TimeLineID:\s*(\d+)", r.stdout)
        return (sysid.group(1) if sysid else None), (int(tl.group(1)) if tl else None)

    def _pg_rewind(self, host: str, port: int) -> tuple[str, str]:
        """("pg_rewind", note) when it worked, else ("pg_basebackup", why rewind was impossible)."""
        if not (self.datadir / "global" / "pg_control").exists():
            return "pg_basebackup", f"{self.datadir} holds no cluster to rewind"
        source = make_conninfo(host=host, port=port, user=self.user, dbname=self.dbname,
                               connect_timeout=self.connect_timeout_s)
        r = self._run(["pg_rewind", f"--target-pgdata={self.datadir}",
                       f"--source-server={source}"], timeout=1800, password=self._password)
        output = r.stdout + r.stderr
        if r.returncode == 0:
            note = "no rewind required" if "no rewind required" in output else "rewound"
            log.info("pg_rewind of %s from %s:%s: %s", self.datadir, host, port, note)
            return "pg_rewind", note
        why = _tail(output, 400)
        log.warning("pg_rewind of %s from %s:%s impossible, taking a base backup: %s",
                    self.datadir, host, port, why)
        return "pg_basebackup", f"pg_rewind failed: {why}"

    def _base_backup(self, host: str, port: int, reason: str) -> None:
        """Copy the source into a sibling directory, then swap it in (never a half-empty datadir)."""
        uid, gid = self._owner()
        new = self.datadir.with_name(self.datadir.name + ".drflow-new")
        old = self.datadir.with_name(self.datadir.name + ".drflow-old")
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(mode=0o700)
        os.chown(new, uid, gid)
        r = self._run(["pg_basebackup", "-h", host, "-p", str(port), "-U", self.replication_user,
                       "-D", str(new), "-X", "stream", "-c", "fast", "-w"],
                      timeout=3600, password=self._replication_password)
        if r.returncode != 0:
            shutil.rmtree(new, ignore_errors=True)
            raise VerbError(f"{reason}; pg_basebackup from {host}:{port} failed too: "
                            f"{_tail(r.stdout + r.stderr, 400)}")
        shutil.rmtree(old, ignore_errors=True)
        if self.datadir.exists():
            self.datadir.rename(old)
        new.rename(self.datadir)
        shutil.rmtree(old, ignore_errors=True)

    def _save_local_config(self) -> dict[str, bytes]:
        """This instance's config files (relative path -> content), includes followed."""
        saved: dict[str, bytes] = {}
        todo = [self.datadir / name for name in _LOCAL_CONFIG]
        while todo:
            path = todo.pop(0)
            try:
                rel = str(path.resolve().relative_to(self.datadir.resolve()))
            except (ValueError, OSError):
                continue  # outside the data directory: rewind does not touch it
            if rel in saved or not path.is_file():
                continue
            saved[rel] = path.read_bytes()
            if path.suffix != ".conf" or path.name in ("pg_hba.conf", "pg_ident.conf"):
                continue
            for line in saved[rel].decode(errors="replace").splitlines():
                m = _INCLUDE.match(line)
                if not m:
                    continue
                target = path.parent / m.group(2)
                todo += sorted(target.glob("*.conf")) if m.group(1) == "include_dir" else [target]
        return saved

    def _restore_local_config(self, saved: Mapping[str, bytes]) -> None:
        for rel, data in saved.items():
            dest = self.datadir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._write_file(dest, data)

    def _upstream_conninfo(self, host: str, port: int) -> str:
        params: dict[str, Any] = {"host": host, "port": port, "user": self.replication_user}
        if self.application_name:
            params["application_name"] = self.application_name
        if self._replication_password is not None:
            params["passfile"] = str(self._write_passfile())
        return make_conninfo(**params)

    def _set_upstream(self, host: str, port: int) -> None:
        """Point the running standby at host:port: PostgreSQL writes the setting itself
        (ALTER SYSTEM with a literal), so no value can add a line to postgresql.auto.conf."""
        conninfo = self._upstream_conninfo(host, port)
        with self._connect() as conn:
            conn.execute(sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(
                sql.Literal(conninfo)))
            conn.execute("ALTER SYSTEM RESET primary_slot_name")
            conn.execute("SELECT pg_reload_conf()")

    def _write_upstream_offline(self, host: str, port: int, *, drop_port: bool = False,
                                pin_port: bool = False) -> None:
        """Point the stopped standby at host:port before it starts (it cannot become consistent,
        hence take a connection for ALTER SYSTEM, without WAL from there): the settings go into
        postgresql.auto.conf as PostgreSQL quotes them, and `postgres -C` must read back exactly
        that conninfo, or the old file is put back and nothing starts."""
        conninfo = self._upstream_conninfo(host, port)
        auto = self.datadir / "postgresql.auto.conf"
        try:
            old = auto.read_bytes()
        except FileNotFoundError:
            old = (b"# Do not edit this file manually!\n"
                   b"# It will be overwritten by the ALTER SYSTEM command.\n")
        drop = {"primary_conninfo", "primary_slot_name"} | ({"port"} if drop_port else set())
        kept = [ln for ln in old.decode(errors="replace").splitlines()
                if _setting_name(ln) not in drop]
        kept.append(f"primary_conninfo = {conf_literal(conninfo)}")
        if pin_port:
            # The source's postgresql.conf came along and carries its port, not ours.
            kept.append(f"port = {int(self.port)}")
        self._write_file(auto, ("\n".join(kept) + "\n").encode())
        self._write_file(self.datadir / "standby.signal", b"")
        r = self._run(["postgres", "-D", str(self.datadir), "-C", "primary_conninfo"],
                      timeout=30)
        if r.returncode != 0 or r.stdout.rstrip("\n") != conninfo:
            self._write_file(auto, old)
            raise VerbError(f"postgresql.auto.conf in {self.datadir} did not read back as "
                            f"written: {_tail(r.stderr or r.stdout)}; it was put back")

    def _configured_upstream(self, conn: psycopg.Connection[Any]) -> tuple[str, int] | None:
        try:
            text = _one(conn, "SELECT setting FROM pg_settings WHERE name = 'primary_conninfo'")
            params = conninfo_to_dict(text) if text else {}
        except psycopg.Error:
            return None
        host, port = params.get("host"), str(params.get("port") or 5432)
        if not host or not port.isdigit():
            return None
        return str(host), int(port)

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
        for p in (self.datadir, self.datadir.parent):
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                return st.st_uid, st.st_gid
        pw = pwd.getpwnam(self.run_as) if self.run_as else pwd.getpwuid(os.geteuid())
        return pw.pw_uid, pw.pw_gid


def _refusing(run: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """Database and OS errors become VerbError: the caller gets the reason, not a 500."""
    def wrapped(args: Any) -> dict[str, Any]:
        try:
            return run(args)
        except psycopg.Error as exc:
            raise VerbError(f"PostgreSQL said: {_first_line(exc)}") from exc
        except OSError as exc:
            raise VerbError(f"{type(exc).__name__}: {exc}") from exc
    return wrapped


def _is_postmaster_of(pid: int, datadir: Path) -> bool:
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


def conf_literal(value: str) -> str:
    """`value` as a string literal of PostgreSQL's configuration files ('' for ', \\ for \\);
    control characters, which could end the line, are refused."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError("a configuration value may not hold control characters")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _setting_name(line: str) -> str | None:
    m = _SETTING.match(line)
    return m.group(1).lower() if m else None


def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address `host` stands for (as libpq would resolve it); empty when it resolves not."""
    with contextlib.suppress(ValueError):
        return {_plain(ipaddress.ip_address(host))}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {_plain(ipaddress.ip_address(str(i[4][0]).split("%", 1)[0])) for i in infos}


def _local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    out.add(_plain(ipaddress.ip_address(a.address.split("%", 1)[0])))
    return out


def _plain(a: ipaddress.IPv4Address | ipaddress.IPv6Address
           ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """::ffff:127.0.0.1 is 127.0.0.1."""
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _identity(conn: psycopg.Connection[Any]) -> tuple[str, int, str]:
    """(system identifier, port, postmaster start time): what tells one server from another."""
    row = conn.execute("SELECT system_identifier::text, current_setting('port')::int, "
                       "pg_postmaster_start_time()::text FROM pg_control_system()").fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), str(row[2])


def _one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def _wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise VerbError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _tail(text: str, limit: int = 600) -> str:
    """The last lines of `text` that fit in `limit` characters, joined by " | "."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    kept: list[str] = []
    while lines and sum(len(x) + 3 for x in kept) + len(lines[-1]) <= limit:
        kept.insert(0, lines.pop())
    if not kept and lines:
        kept = [lines[-1][-limit:]]
    return " | ".join(kept) or "(no output)"


__all__ = ["PostgresDriver", "check_host", "default_bin_dir"]
