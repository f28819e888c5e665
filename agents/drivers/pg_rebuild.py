"""Making a PostgreSQL instance follow another: pg_rewind or a base backup, and its upstream."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from agents.drivers import VerbError
from agents.drivers.pg_server import PgServer, first_line, identity, one, text_tail

log = logging.getLogger("agents.drivers.postgres")

_SETTING = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.$]*)")
# Files that describe this instance, not the cluster: pg_rewind and pg_basebackup would replace
# them with the source's copies (its port, its access rules), so they are put back afterwards,
# together with whatever postgresql.conf includes from inside the data directory.
_LOCAL_CONFIG = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf")
_INCLUDE = re.compile(r"^\s*(include|include_if_exists|include_dir)\s*=?\s*'([^']+)'")


class PgRebuild(PgServer):
    """Rewinds or rebuilds this instance from a source, keeping its own configuration files."""

    def _check_source(self, host: str, port: int) -> None:
        """Refuse before touching anything unless the source is another server of our cluster,
        a primary, on our timeline or a later one (compared over SQL)."""
        try:
            with self._connect(host, port) as src:
                if one(src, "SELECT pg_is_in_recovery()"):
                    raise VerbError(f"{host}:{port} is a standby; rewind_to needs the primary; "
                                    "nothing was changed")
                # A just-promoted source's control file may still show the old timeline until
                # its next checkpoint; pg_rewind would then wrongly find "no rewind required".
                try:
                    src.execute("CHECKPOINT")
                except psycopg.errors.InsufficientPrivilege:
                    log.warning("cannot CHECKPOINT %s:%s (needs superuser or pg_checkpoint); "
                                "pg_rewind may misjudge a freshly promoted source", host, port)
                source = identity(src)
                source_tl = int(one(src, "SELECT timeline_id FROM pg_control_checkpoint()"))
        except psycopg.Error as exc:
            raise VerbError(f"cannot reach the source {host}:{port}: {first_line(exc)}; "
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
                return identity(conn)
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
        why = text_tail(output, 400)
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
                            f"{text_tail(r.stdout + r.stderr, 400)}")
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
                if setting_name(ln) not in drop]
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
                            f"written: {text_tail(r.stderr or r.stdout)}; it was put back")

    def _configured_upstream(self, conn: psycopg.Connection[Any]) -> tuple[str, int] | None:
        try:
            text = one(conn, "SELECT setting FROM pg_settings WHERE name = 'primary_conninfo'")
            params = conninfo_to_dict(text) if text else {}
        except psycopg.Error:
            return None
        host, port = params.get("host"), str(params.get("port") or 5432)
        if not host or not port.isdigit():
            return None
        return str(host), int(port)


def conf_literal(value: str) -> str:
    """`value` as a string literal of PostgreSQL's configuration files ('' for ', \\ for \\);
    control characters, which could end the line, are refused."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError("a configuration value may not hold control characters")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def setting_name(line: str) -> str | None:
    m = _SETTING.match(line)
    return m.group(1).lower() if m else None
