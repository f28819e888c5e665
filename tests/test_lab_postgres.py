"""The lab's PostgreSQL pairs: real servers on 127.0.0.1, run as `postgres` when we are root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from lab import postgres as pg
from lab import procs

pytestmark = pytest.mark.lab

Pair = tuple[pg.Instance, pg.Instance]


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    """A fresh lab directory under /tmp (postgres must reach it); everything in it is torn down."""
    root = Path(tempfile.mkdtemp(prefix="drflow-pgtest-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root / "pg"
    finally:
        _kill_everything_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _kill_everything_under(root: Path) -> None:
    pg_dir = root / "pg"
    for group in pg_dir.iterdir() if pg_dir.exists() else []:
        for site in ("prod", "dr"):
            if (group / site / "data").is_dir():
                pg.kill_hard(pg.Instance(name=site, datadir=group / site / "data", port=0,
                                         log=group / site / "server.log"))


@pytest.fixture(scope="module")
def creds(base_dir: Path) -> tuple[str, str]:
    return pg.client_credentials(base_dir)


@pytest.fixture(scope="module")
def sync_pair(base_dir: Path) -> Pair:
    t0 = time.monotonic()
    pair = pg.create_pair(base_dir, "orders", sync=True)
    print(f"\nsync pair created and streaming in {time.monotonic() - t0:.2f} s")
    return pair


@pytest.fixture(scope="module")
def async_pair(base_dir: Path) -> Pair:
    return pg.create_pair(base_dir, "payments", sync=False)


def _connect(inst: pg.Instance, creds: tuple[str, str]) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.conninfo(inst, *creds), autocommit=True)


def _replication(primary: pg.Instance) -> list[tuple[Any, ...]]:
    with pg.admin_conn(primary) as c:
        return c.execute("SELECT application_name, state, sync_state FROM pg_stat_replication"
                         ).fetchall()


def _insert_marker(inst: pg.Instance, creds: tuple[str, str]) -> str:
    marker = uuid.uuid4().hex
    with _connect(inst, creds) as c:
        c.execute("CREATE TABLE IF NOT EXISTS marks (v text PRIMARY KEY)")
        c.execute("INSERT INTO marks VALUES (%s)", (marker,))
    return marker


def _has_marker(inst: pg.Instance, creds: tuple[str, str], marker: str) -> bool:
    with _connect(inst, creds) as c:
        return c.execute("SELECT 1 FROM marks WHERE v = %s", (marker,)).fetchone() is not None


def test_write_on_primary_is_read_on_standby(sync_pair: Pair, creds: tuple[str, str]) -> None:
    primary, standby = sync_pair
    marker = _insert_marker(primary, creds)
    pg.wait_replay_caught_up(primary, standby, timeout=10)
    assert _has_marker(standby, creds, marker)
    with _connect(standby, creds) as c, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        c.execute("INSERT INTO marks VALUES ('on the standby')")
    assert (pg.role(primary), pg.role(standby)) == ("primary", "standby")


def test_sync_pair_has_a_synchronous_standby(sync_pair: Pair) -> None:
    primary, standby = sync_pair
    assert _replication(primary) == [(standby.name, "streaming", "sync")]
    assert pg.health(primary) == (True, "primary, 1 sync standby streaming")
    ok, detail = pg.health(standby)
    assert ok and detail.startswith(f"standby, streaming from 127.0.0.1:{primary.port}")


def test_sync_commit_waits_for_the_standby(sync_pair: Pair, creds: tuple[str, str]) -> None:
    """Why a sync failover loses nothing: no commit is acknowledged before the standby has it."""
    primary, standby = sync_pair
    pg.stop(standby, "fast")
    assert pg.role(standby) == "down"
    assert pg.health(primary)[0] is False  # writes would hang: lab status must say so
    done = threading.Event()

    def write() -> None:
        _insert_marker(primary, creds)
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert not done.wait(1.0), "commit acknowledged with the sync standby down"
    finally:
        pg.start(standby)
    assert done.wait(15), "commit still waiting after the standby came back"
    writer.join()
    pg.wait_streaming(primary, standby, timeout=15, sync=True)


def test_async_pair_has_an_asynchronous_standby(async_pair: Pair) -> None:
    primary, standby = async_pair
    assert _replication(primary) == [(standby.name, "streaming", "async")]
    with pg.admin_conn(primary) as c:
        assert c.execute("SHOW synchronous_standby_names").fetchone() == ("",)
    assert pg.health(primary) == (True, "primary, 1 async standby streaming")


def test_clients_need_the_password(sync_pair: Pair, creds: tuple[str, str]) -> None:
    primary, _ = sync_pair
    user, password = creds
    assert user == "drflow" and len(password) >= 24
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.conninfo(primary, user, password + "x")).close()
    # The OS superuser has no TCP login (only replication): clients cannot bypass the password.
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
        psycopg.connect(pg.conninfo(primary, "postgres", "")).close()
    # The password is never written where PostgreSQL keeps its config or its log.
    for inst in sync_pair:
        for f in (inst.datadir / "postgresql.conf", inst.datadir / "postgresql.auto.conf",
                  pg.instance_conf(inst)):
            assert password not in f.read_text()
        assert password not in inst.log.read_text()


def test_kill_hard_then_start_recovers_the_primary(async_pair: Pair,
                                                   creds: tuple[str, str]) -> None:
    primary, standby = async_pair
    marker = _insert_marker(primary, creds)
    pg.kill_hard(primary)
    with pytest.raises(psycopg.OperationalError):
        _connect(primary, creds).close()
    assert not pg.is_running(primary) and pg.role(primary) == "down"
    assert pg.health(primary) == (False, "down (no postmaster)")
    assert primary.pidfile.exists(), "a host that loses power leaves its postmaster.pid"
    assert not any(p.info["name"] == "postgres" and _cwd(p) == str(primary.datadir)
                   for p in psutil.process_iter(["name"])), "kill_hard left processes behind"
    pg.start(primary)
    assert pg.role(primary) == "primary"
    assert _has_marker(primary, creds, marker)  # crash recovery kept the acknowledged write
    pg.wait_streaming(primary, standby, timeout=15)


def _cwd(p: psutil.Process) -> str | None:
    try:
        return p.cwd()
    except psutil.Error:
        return None


@pytest.fixture
def impostor() -> Iterator[int]:
    """A live process of the servers' OS user: what a stale lock's pid can turn into."""
    user = pg.os_user()
    sleeper = subprocess.Popen(["sleep", "60"], user=user) if user else subprocess.Popen(
        ["sleep", "60"])
    try:
        yield sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def _point_locks_at(inst: pg.Instance, pid: int) -> None:
    # Both lock files name the old postmaster; PostgreSQL refuses to start while that pid lives.
    for lock in (inst.pidfile, inst.socket_dir / f".s.PGSQL.{inst.port}.lock"):
        lines = lock.read_text().split("\n")
        lock.write_text("\n".join([str(pid), *lines[1:]]))


def test_service_spec_starts_over_stale_locks_like_the_power_bridge(async_pair: Pair,
                                                                    impostor: int) -> None:
    """Power-on after power-off: the old pid may still exist (unreaped, or reused)."""
    primary, standby = async_pair
    spec = pg.service_spec(primary)
    assert spec["name"] == f"postgres:{primary.name}"
    assert spec["pidfile"] == str(primary.datadir / "postmaster.pid")
    assert spec["run_as"] == ("postgres" if os.geteuid() == 0 else None)
    pg.kill_hard(primary)
    _point_locks_at(primary, impostor)
    # What the bridge does on power-on: drop the stale pidfile, run `start` detached.
    primary.pidfile.unlink()
    argv = list(spec["start"])
    if spec["run_as"]:
        argv = ["runuser", "-u", spec["run_as"], "--", *argv]
    proc = procs.spawn(argv, Path(spec["log"]), cwd=Path(spec["cwd"]))
    assert proc.wait(10) == 0, spec["log"]
    pg.wait_ready(primary, timeout=15)
    assert pg.role(primary) == "primary"
    pg.wait_streaming(primary, standby, timeout=15)


def test_start_removes_stale_locks_itself(async_pair: Pair, impostor: int) -> None:
    primary, standby = async_pair
    pg.kill_hard(standby)
    _point_locks_at(standby, impostor)
    pg.start(standby, timeout=15)
    assert pg.role(standby) == "standby"
    pg.wait_streaming(primary, standby, timeout=15)
    pg.start(standby)  # already running: a no-op


def test_pg_rewind_turns_the_old_primary_into_a_standby(base_dir: Path,
                                                        creds: tuple[str, str]) -> None:
    """The re-protect path the lab must allow: promote, let the old primary diverge, rewind it."""
    old, new = pg.create_pair(base_dir, "ledger", sync=False)
    try:
        for inst in (old, new):
            with pg.admin_conn(inst) as c:
                assert c.execute("SHOW wal_log_hints").fetchone() == ("on",)
                assert c.execute("SHOW full_page_writes").fetchone() == ("on",)
        kept = _insert_marker(old, creds)
        pg.wait_replay_caught_up(old, new, timeout=10)
        with pg.admin_conn(new) as c:
            assert c.execute("SELECT pg_promote(true, 30)").fetchone() == (True,)
        after = _insert_marker(new, creds)
        lost = _insert_marker(old, creds)  # the split brain a fence prevents; rewind undoes it
        pg.stop(old, "fast")
        with pg.admin_conn(new) as c:
            # PostgreSQL 15's pg_rewind reads the source's timeline from its control file, which
            # only the first checkpoint after promotion updates: without this it answers
            # "no rewind required" and the old primary cannot follow (fixed in 16).
            c.execute("CHECKPOINT")
        env = {**os.environ, "PGPASSWORD": creds[1]}  # not on a command line
        source = f"host={new.host} port={new.port} user={creds[0]} dbname=postgres"
        rewind = [pg.pg_bin("pg_rewind"), "-D", str(old.datadir), "--source-server", source]
        user = pg.os_user()
        out = subprocess.run(["runuser", "-u", user, "--", *rewind] if user else rewind,
                             capture_output=True, text=True, env=env, cwd=old.socket_dir,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        (old.datadir / "standby.signal").touch()
        with open(old.datadir / "postgresql.auto.conf", "a") as f:
            f.write(f"primary_conninfo = 'host={new.host} port={new.port} user=postgres'\n")
        pg.start(old)  # on its own port: its identity is not in the data directory rewind copied
        assert (pg.role(old), pg.role(new)) == ("standby", "primary")
        pg.wait_streaming(new, old, timeout=15)
        pg.wait_replay_caught_up(new, old, timeout=10)
        assert _has_marker(old, creds, kept) and _has_marker(old, creds, after)
        assert not _has_marker(old, creds, lost)
    finally:
        pg.destroy(old)
        pg.destroy(new)


def test_three_pairs_in_parallel_then_destroy(base_dir: Path) -> None:
    t0 = time.monotonic()
    pairs = pg.create_pairs(base_dir, ["g1", "g2", "g3"], sync=True)
    print(f"\n3 sync pairs created in parallel in {time.monotonic() - t0:.2f} s")
    try:
        ports = {i.port for pair in pairs.values() for i in pair}
        assert len(ports) == 6
        for primary, standby in pairs.values():
            assert _replication(primary) == [(standby.name, "streaming", "sync")]
    finally:
        for pair in pairs.values():
            for inst in pair:
                pg.destroy(inst)
    for pair in pairs.values():
        for inst in pair:
            assert not inst.datadir.exists()
            assert not procs.port_open(inst.port)
            assert pg.role(inst) == "down"


def test_unusable_places_are_refused_with_a_clear_message(base_dir: Path,
                                                          sync_pair: Pair) -> None:
    with pytest.raises(pg.PostgresLabError, match="already exists"):
        pg.create_pair(base_dir, "orders", sync=True)
    with pytest.raises(pg.PostgresLabError, match="group name"):
        pg.create_pair(base_dir, "no spaces", sync=True)
    with pytest.raises(pg.PostgresLabError, match="postgresql-15"):
        pg.pg_bin("no-such-binary")
    if os.geteuid() == 0:
        private = Path(tempfile.mkdtemp(prefix="drflow-pgtest-private-", dir="/tmp"))
        try:
            inner = private / "inner"
            inner.mkdir(mode=0o755)
            with pytest.raises(pg.PostgresLabError, match=f"cannot enter {private}"):
                pg.create_pair(inner, "x", sync=False)
        finally:
            shutil.rmtree(private)
