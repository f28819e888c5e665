"""Running PostgreSQL's server binaries as their owner, `postgres` when drflow runs as root."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

PG_OS_USER = "postgres"  # PostgreSQL refuses to run as root


class PgCommandError(RuntimeError):
    """A PostgreSQL server binary failed or did not finish; the message says which and why."""


def os_user() -> str | None:
    """The OS user the servers run as: `postgres` when we are root, else ourselves (None)."""
    return PG_OS_USER if os.geteuid() == 0 else None


def as_pg(argv: list[str]) -> list[str]:
    user = os_user()
    return ["runuser", "-u", user, "--", *argv] if user else argv


def pg_env(**extra: str) -> dict[str, str]:
    # No PG* variables of ours leak in, and HOME is one postgres can read (pg_basebackup -R would
    # otherwise write passfile='/root/.pgpass' into primary_conninfo).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if os_user():
        env["HOME"] = pwd.getpwnam(PG_OS_USER).pw_dir
    env.update(extra)
    return env


def run_pg(argv: list[str], what: str, cwd: Path, timeout: float, *,
           error: type[Exception] = PgCommandError, log: Path | None = None,
           env: Mapping[str, str] | None = None, outer: Sequence[str] = ()) -> str:
    """Run a server binary as the servers' owner; its output, or `error` saying what failed
    (with the last lines of `log`, the server's log, when given). `outer` wraps the whole
    command (e.g. `ip netns exec NS`, which must run before dropping to the owner)."""
    try:
        out = subprocess.run([*outer, *as_pg(argv)], cwd=cwd, env=pg_env(**(env or {})), capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise error(f"{what} did not finish within {timeout:.0f} s{log_tail(log)}") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip()[-1500:]
        raise error(f"{what} failed (exit {out.returncode}): {msg}{log_tail(log)}")
    return out.stdout


def log_tail(log: Path | None, lines: int = 12) -> str:
    """The last lines of a server log, as a paragraph to append to a message ('' if none)."""
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\nlast lines of {log}:\n" + "\n".join(text)


def give_to_pg(*paths: Path) -> None:
    """Make `paths` the servers' owner's (when we run as root)."""
    if os_user():
        for p in paths:
            shutil.chown(p, PG_OS_USER, PG_OS_USER)


def pg_can_traverse(d: Path) -> bool:
    """Whether the servers' owner may enter directory `d`."""
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
