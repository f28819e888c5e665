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

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from agents.drivers import NoArgs, Verb, VerbError, args_of
from agents.drivers.pg_args import (
    FenceProof,
    PrimaryArgs,
    PromoteArgs,
    SourceArgs,
    StopArgs,
    addresses,
    check_host,
    local_addresses,
)
from agents.drivers.pg_rebuild import PgRebuild, conf_literal
from agents.drivers.pg_server import default_bin_dir, first_line, one, wait_until

log = logging.getLogger(__name__)



class PostgresDriver(PgRebuild):
    """Controls one PostgreSQL instance (a data directory served on `port`)."""

    application = "postgresql"

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
            out["error"] = first_line(exc)
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
        args_of(StopArgs, {"mode": mode})
        with self._lock:
            self._held_down = True
            if self._live_postmaster() is None:
                removed = self._clear_stale_pidfile()
                return {"action": "none", "reason": "not running",
                        "removed_stale_pidfile": removed}
            self._pg_ctl_stop(mode)
            return {"action": "stopped", "mode": mode}

    def fence(self) -> dict[str, Any]:
        """SIGKILL the server now and hold it down (local recovery leaves it alone until
        `start`). Takes no lock: a fence must not wait for a verb in progress."""
        from agents.drivers.pg_fence import kill_server

        self._held_down = True
        return kill_server(self.datadir)

    def fence_if_primary(self) -> dict[str, Any] | None:
        """Fence a second primary unless a verb is changing the instance or it answers as a
        standby (a re-protect rewinding it); None when it did not fence. Anything else that
        runs, even a server that refuses the check, is fenced."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._live_postmaster() is None or self._role_or_down() == "standby":
                return None
            return self.fence()
        finally:
            self._lock.release()

    def fence_if_serving(self) -> tuple[str, dict[str, Any] | None]:
        """For a leader key this node no longer holds: ("busy", None) while a verb changes the
        server (a failback or re-protect re-attaching it: ask again later); ("standby", None)
        or ("down", None; held down from now on) when it cannot acknowledge a write;
        ("fenced", result) after killing anything else that runs."""
        if not self._lock.acquire(blocking=False):
            return "busy", None
        try:
            if self._live_postmaster() is None:
                self._held_down = True
                return "down", None
            if self._role_or_down() == "standby":
                return "standby", None
            return "fenced", self.fence()
        finally:
            self._lock.release()

    def promote(self, relax_sync: bool = False,
                fence_proof: FenceProof | None = None) -> dict[str, Any]:
        with self._lock:
            if self._live_postmaster() is None:
                raise VerbError(f"PostgreSQL on port {self.port} is not running; start it "
                                "before promoting")
            t0 = time.monotonic()
            with self._connect() as conn:
                in_recovery = one(conn, "SELECT pg_is_in_recovery()")
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
                    if not one(conn, "SELECT pg_promote(true, 30)"):
                        raise VerbError(f"pg_promote did not finish within 30 s; see "
                                        f"{self.log_path}")
                    result: dict[str, Any] = {"action": "promoted",
                                              "seconds": round(time.monotonic() - t0, 3)}
                    if fenced:
                        result.update(fenced)
                else:
                    result = {"action": "none", "reason": "already primary"}
                names = str(one(conn, "SHOW synchronous_standby_names"))
                result["sync_relaxed"] = False
                if relax_sync and names:
                    conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
                    conn.execute("SELECT pg_reload_conf()")
                    wait_until(lambda: one(conn, "SHOW synchronous_standby_names") == "", 5,
                          "synchronous_standby_names to clear after reload")
                    result["sync_relaxed"] = True
                    result["previous_synchronous_standby_names"] = names
                    names = ""
                result["synchronous_standby_names"] = names
                result["lsn"] = str(one(conn, "SELECT pg_current_wal_lsn()"))
            return result

    def rewind_to(self, source_host: str, source_port: int) -> dict[str, Any]:
        """Make this instance a streaming standby of the primary at source_host:source_port."""
        args_of(SourceArgs, {"source_host": source_host, "source_port": source_port})
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
        args_of(PrimaryArgs, {"primary_host": primary_host, "primary_port": primary_port})
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

    def _sql_status(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not one(conn, "SELECT pg_is_in_recovery()"):
            out["role"] = "primary"
            out["lsn"] = str(one(conn, "SELECT pg_current_wal_lsn()"))
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
            out["synchronous_standby_names"] = str(one(conn, "SHOW synchronous_standby_names"))
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
                return str(one(conn, "SHOW cluster_name"))
        except psycopg.Error:
            return ""

    def _role_or_down(self) -> str:
        try:
            with self._connect() as conn:
                return "standby" if one(conn, "SELECT pg_is_in_recovery()") else "primary"
        except psycopg.Error:
            return "down"

    def _streams_from(self, status: Mapping[str, Any], host: str, port: int) -> bool:
        if status.get("receiver") != "streaming" or not status.get("upstream"):
            return False
        up_host, _, up_port = str(status["upstream"]).rpartition(":")
        return up_port == str(port) and (up_host == host or bool(addresses(up_host)
                                                                  & addresses(host)))

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
        addrs = addresses(host)
        ours = addresses(self.host) | local_addresses()
        return bool(addrs & ours) or any(a.is_loopback or a.is_unspecified for a in addrs)

    def _matching_peer(self, host: str, port: int) -> tuple[str, int] | None:
        """The configured peer that host:port names (as configured), or None."""
        if self._is_self(host, port):
            return None
        for peer in self.peers:
            if peer == (host, port):
                return peer
        wanted = addresses(host)
        for peer_host, peer_port in self.peers:
            if peer_port == port and wanted & addresses(peer_host):
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
                    if one(conn, "SELECT NOT pg_is_in_recovery() AND "
                                  "current_setting('transaction_read_only') = 'off'"):
                        out.append(f"{host}:{port}")
            except psycopg.Error:
                continue  # not answering: the orchestrator's fence decides, not this check
        return out


def _refusing(run: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """Database and OS errors become VerbError: the caller gets the reason, not a 500."""
    def wrapped(args: Any) -> dict[str, Any]:
        try:
            return run(args)
        except psycopg.Error as exc:
            raise VerbError(f"PostgreSQL said: {first_line(exc)}") from exc
        except OSError as exc:
            raise VerbError(f"{type(exc).__name__}: {exc}") from exc
    return wrapped


__all__ = ["PostgresDriver", "check_host", "conf_literal", "default_bin_dir"]
