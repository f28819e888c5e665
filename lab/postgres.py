"""The lab's PostgreSQL: a primary and a streaming standby per protection group on 127.0.0.1.

Layout under `base_dir` (the lab gives `<lab dir>/pg`):

    credentials.json        the client role and its generated password (root only, 0600)
    <group>/prod/           `<group>-prod`, created as the primary; owned by `postgres`
        data/               its data directory (a btrfs subvolume when base_dir is on btrfs)
        instance.conf       its identity: port, socket directory, cluster_name
        server.log          its server log; the directory is also its Unix socket directory
    <group>/dr/             `<group>-dr`, created as the standby, laid out alike

The identity lives outside the data directory, included from postgresql.conf as
`../instance.conf`, because pg_basebackup and pg_rewind copy every file of the source's data
directory, configuration included: a rewound old primary must not come back with its new
primary's port. The shared settings (postgresql.conf, pg_hba.conf) are copied, as they would be in a
real deployment.

Instances are named after their site, not their role, because roles swap on failover. The name is
also the instance's `cluster_name`, hence its walreceiver's `application_name`, which is what
`synchronous_standby_names` matches.

Access: over TCP (127.0.0.1) clients log in as the `drflow` role with its password (SCRAM); the
only other TCP access is trusted replication for `postgres`, so a standby's `primary_conninfo`
holds no secret. Lab tooling talks to the servers as `postgres` over the Unix socket (trust). It
is a throwaway loopback lab; `drflow` is a superuser so that runbooks can promote, ALTER SYSTEM
and pg_rewind with it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr

from drflow.pg_os import (
    PG_OS_USER,
    give_to_pg,
    log_tail,
    os_user,
    pg_can_traverse,
    run_pg,
)
from lab import pg_storage, procs

PG_ROOT = Path("/usr/lib/postgresql")
CLIENT_USER = "drflow"
HOST = "127.0.0.1"
TEMPLATE_PREFIX = "drflow-pg-template-"
# fsync is off, on primaries and standbys alike. Lab failures are process kills (SIGKILL of the
# tree, a vSphere power-off through the power bridge): the kernel and its page cache survive them,
# so fsync never decides whether an acknowledged write survives here; synchronous replication
# (synchronous_commit=on, kept) does, and that is what the failover tests check. fsync=on costs
# little per commit (0.85 vs 0.68 ms with pgbench, 1 client, measured here) but a lot where the lab
# spends its time: every start after a kill or a base backup first syncs the whole data directory
# (1-2.5 s here on a busy machine), which slows every pair creation and every restart in the tests
# and inflates measured RTO. Only a crash of the machine itself could lose data, and then the lab
# is rebuilt anyway.
LAB_FSYNC = False

Role = Literal["primary", "standby", "down"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")
_SOCKET_PATH_MAX = 107  # sun_path


class PostgresLabError(RuntimeError):
    """A lab PostgreSQL operation failed; the message says what happened and where to look."""


@dataclass(kw_only=True)
class Instance:
    """One lab PostgreSQL server. `role` is the role it was created with; ask `role()` for now."""

    name: str
    datadir: Path
    port: int
    log: Path
    role: str = "primary"
    host: str = HOST
    # argv prefix that runs a command in the instance's VM network (its site's namespace)
    netns_prefix: tuple[str, ...] = ()

    @property
    def socket_dir(self) -> Path:
        return self.datadir.parent

    @property
    def pidfile(self) -> Path:
        return self.datadir / "postmaster.pid"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instance:
        return cls(name=d["name"], datadir=Path(d["datadir"]), port=int(d["port"]),
                   log=Path(d["log"]), role=d.get("role", "primary"), host=d.get("host", HOST),
                   netns_prefix=tuple(d.get("netns_prefix", ())))


def describe(inst: Instance) -> dict[str, Any]:
    """JSON-ready description (what lab.json stores); `Instance.from_dict` reads it back."""
    d = asdict(inst)
    d.update(datadir=str(inst.datadir), log=str(inst.log), socket_dir=str(inst.socket_dir),
             netns_prefix=list(inst.netns_prefix))
    return d


# --- binaries and the OS user ---------------------------------------------------------------


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary from the newest /usr/lib/postgresql/*/bin."""
    return _pg_bin(name, os.environ.get("DRFLOW_PG_BINDIR"))


@cache
def _pg_bin(name: str, override: str | None) -> str:
    dirs = [Path(override)] if override else sorted(
        PG_ROOT.glob("*/bin"), key=lambda p: _version_key(p.parent.name), reverse=True)
    for d in dirs:
        if os.access(d / name, os.X_OK):
            return str(d / name)
    where = override or f"{PG_ROOT}/*/bin"
    raise PostgresLabError(
        f"PostgreSQL binary {name!r} not found in {where}: install the server with "
        "`apt-get install postgresql-15` (Debian package postgresql-15), "
        "or point DRFLOW_PG_BINDIR at a directory that has it"
    )


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)) or (0,)


def _run(argv: list[str], what: str, cwd: Path, timeout: float = 60.0,
         log: Path | None = None, outer: tuple[str, ...] = ()) -> None:
    run_pg(argv, what, cwd, timeout, error=PostgresLabError, log=log, outer=outer)


def _ensure_traversable(base_dir: Path) -> None:
    base_dir = base_dir.resolve()
    if not pg_can_traverse(base_dir) and base_dir.stat().st_uid == os.geteuid():
        base_dir.chmod(base_dir.stat().st_mode | 0o711)
    for d in [*reversed(base_dir.parents), base_dir]:
        if not pg_can_traverse(d):
            raise PostgresLabError(
                f"PostgreSQL runs as {os_user()!r} and cannot enter {d} (mode "
                f"{d.stat().st_mode & 0o777:o}): `chmod o+x {d}`, or put the lab in a directory it "
                "can reach (e.g. under /tmp, never in /root)"
            )


# --- the template cluster: initdb once per process, copied for each new primary -------------

_template_lock = threading.Lock()
_template: Path | None = None

_LAB_CONF = f"""
# --- drflow lab (throwaway; listen_addresses: the VM's own address, in instance.conf) ---
max_connections = 50
shared_buffers = '32MB'
wal_level = replica
wal_log_hints = on              # pg_rewind needs it (or data checksums)
full_page_writes = on           # pg_rewind needs it too
fsync = {"on" if LAB_FSYNC else "off"}
synchronous_commit = on
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'         # keeps WAL for a rewound old primary to catch up in tests
hot_standby = on
# Fencing timing (/work/fencing-spec.md, docs/fencing.md): a live primary is heard by its standby
# at least every ~1 s (status interval: the receiver's replies prompt the sender's), and a silent
# peer ends the stream within 2 s on either side. A takeover needs the standby to have heard
# nothing for lease_s/2, and a sync primary relaxes sync only once no standby streamed for lease_s.
wal_receiver_status_interval = '1s'
wal_retrieve_retry_interval = '500ms'   # a standby reconnects fast after its primary restarts
wal_sender_timeout = '2s'
wal_receiver_timeout = '2s'
password_encryption = 'scram-sha-256'
log_checkpoints = off
log_line_prefix = '%m [%p] %q%a '
include = '../instance.conf'   # per instance, outside the data directory (see lab/postgres.py)
"""

# Lab addresses: loopback, and the lab networks (198.18.0.0/15, reserved for network tests).
_LAB_NETS = ("127.0.0.0/8", "198.18.0.0/15")
_HBA = (f"# drflow lab: lab tooling on the Unix socket, clients as {CLIENT_USER!r}.\n"
        "local   all          all                          trust\n"
        + "".join(f"host    all          {CLIENT_USER:<12} {net:<16} scram-sha-256\n"
                  f"host    replication  {CLIENT_USER:<12} {net:<16} scram-sha-256\n"
                  f"host    replication  {PG_OS_USER:<12} {net:<16} trust\n"
                  for net in _LAB_NETS))


def template_dir() -> Path:
    """A stopped, freshly initdb'd cluster with the lab settings, made once per process."""
    global _template
    with _template_lock:
        if _template is not None and (_template / "PG_VERSION").exists():
            return _template
        _sweep_stale_templates()
        root = Path(tempfile.mkdtemp(prefix=f"{TEMPLATE_PREFIX}{os.getpid()}-", dir="/tmp"))
        atexit.register(shutil.rmtree, root, True)
        give_to_pg(root)
        data = root / "data"
        # 1 MB WAL segments: copies, base backups and WAL file creation stay small (28 MB per
        # data directory instead of 40). No sync: a template lost to a machine crash is remade.
        _run([pg_bin("initdb"), "-D", str(data), "-U", PG_OS_USER, "-E", "UTF8", "--locale=C",
              "--no-sync", "--no-instructions", "--wal-segsize=1", "--auth-local=trust",
              "--auth-host=scram-sha-256"], "initdb of the lab template", cwd=root)
        with open(data / "postgresql.conf", "a") as f:
            f.write(_LAB_CONF)
        (data / "pg_hba.conf").write_text(_HBA)
        _template = data
        return data


def _sweep_stale_templates() -> None:
    """Remove templates of processes that died without running their atexit cleanup."""
    for d in Path("/tmp").glob(f"{TEMPLATE_PREFIX}*"):
        pid = d.name[len(TEMPLATE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not procs.pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


# --- client credentials ---------------------------------------------------------------------

_cred_lock = threading.Lock()


def client_credentials(base_dir: Path) -> tuple[str, str]:
    """(user, password) of the client role of every instance under `base_dir`; made on first use."""
    path = base_dir / "credentials.json"
    with _cred_lock:
        if not path.exists():
            base_dir.mkdir(parents=True, exist_ok=True)
            body = json.dumps({"user": CLIENT_USER, "password": secrets.token_urlsafe(24)})
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(body)
        data = json.loads(path.read_text())
    return str(data["user"]), str(data["password"])


def conninfo(inst: Instance, user: str, password: str | SecretStr,
             dbname: str = "postgres") -> str:
    """A libpq connection string for `inst` over TCP (holds the password: never log it)."""
    pw = password.get_secret_value() if isinstance(password, SecretStr) else password
    return make_conninfo(host=inst.host, port=inst.port, user=user, password=pw,
                         dbname=dbname, connect_timeout=3)


@contextlib.contextmanager
def admin_conn(inst: Instance, timeout: int = 2) -> Iterator[psycopg.Connection[Any]]:
    """Superuser connection over the Unix socket (lab tooling only), autocommit."""
    with psycopg.connect(host=str(inst.socket_dir), port=inst.port, user=PG_OS_USER,
                         dbname="postgres", connect_timeout=timeout, autocommit=True) as c:
        yield c


# --- pairs ----------------------------------------------------------------------------------

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def _claim_port() -> int:
    # Pairs made in parallel threads must not be handed the same "free" port.
    with _port_lock:
        while True:
            port = procs.free_port()
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


def _standby_names(group: str, sync: bool) -> str:
    # Both sites are listed on both sides, as a real two-site deployment would: whichever is the
    # standby of the moment is the synchronous one, on the original primary and after a swap alike.
    return f'FIRST 1 ("{group}-prod", "{group}-dr")' if sync else ""


def instance_conf(inst: Instance) -> Path:
    """The instance's own settings, next to (not in) its data directory."""
    return inst.socket_dir / "instance.conf"


def write_instance_conf(inst: Instance) -> None:
    """(Re)write the identity of `inst`: port, socket directory, cluster_name.

    A copy of a data directory (a drill, a fresh base backup) gets its identity from here.
    """
    path = instance_conf(inst)
    path.write_text(
        f"# {inst.name}: written by lab/postgres.py\n"
        f"port = {inst.port}\n"
        f"listen_addresses = '{inst.host}'\n"
        f"unix_socket_directories = '{inst.socket_dir}'\n"
        f"cluster_name = '{inst.name}'   # also the application_name of its walreceiver\n"
    )
    give_to_pg(path)


def _touch_log(log: Path) -> None:
    # Created by us for postgres: if root created it later (the power bridge appends pg_ctl's
    # output to it), the server could not open it.
    log.touch(exist_ok=True)
    give_to_pg(log)


def create_pair(base_dir: Path, group: str, sync: bool, timeout: float = 60.0,
                nodes: tuple[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]]
                | None = None) -> tuple[Instance, Instance]:
    """Create and start `<group>-prod` (primary) and `<group>-dr` (its streaming standby).

    The standby is a pg_basebackup -R of the primary, so it also carries the primary's
    postgresql.conf, `synchronous_standby_names` included: as in a real deployment, a promoted
    standby with no standby of its own makes writes wait until that setting is relaxed.
    Returns once the standby streams (as the synchronous standby when `sync`).
    `nodes`: (address, netns argv prefix) of the prod and the dr VM; default loopback.
    """
    if not _NAME.match(group):
        raise PostgresLabError(f"group name {group!r}: use letters, digits, '-' and '_' (max 41)")
    base_dir.mkdir(parents=True, exist_ok=True)
    _ensure_traversable(base_dir)
    gdir = base_dir.resolve() / group
    if len(str(gdir / "prod" / ".s.PGSQL.65535")) > _SOCKET_PATH_MAX:
        raise PostgresLabError(f"{gdir} is too long for a Unix socket path: use a shorter base_dir")
    try:
        gdir.mkdir(mode=0o700)
    except FileExistsError:
        raise PostgresLabError(
            f"{gdir} already exists: destroy that pair first or use another base_dir") from None
    give_to_pg(gdir)
    client_credentials(base_dir)
    (p_host, p_ns), (s_host, s_ns) = nodes or ((HOST, ()), (HOST, ()))
    primary = _new_instance(gdir / "prod", f"{group}-prod", "primary", p_host, p_ns)
    standby = _new_instance(gdir / "dr", f"{group}-dr", "standby", s_host, s_ns)
    try:
        _build_pair(base_dir, primary, standby, _standby_names(group, sync), timeout)
    except BaseException:
        for inst in (standby, primary):
            kill_hard(inst)
        shutil.rmtree(gdir, ignore_errors=True)
        raise
    return primary, standby


def create_single(base_dir: Path, name: str, node: tuple[str, tuple[str, ...]] = (HOST, ()),
                  timeout: float = 60.0) -> Instance:
    """Create and start `<name>-prod`, a lone primary with no standby (what `drflow protect`
    starts from): no synchronous standby named, the client role set."""
    if not _NAME.match(name):
        raise PostgresLabError(f"name {name!r}: use letters, digits, '-' and '_' (max 41)")
    base_dir.mkdir(parents=True, exist_ok=True)
    _ensure_traversable(base_dir)
    gdir = base_dir.resolve() / name
    try:
        gdir.mkdir(mode=0o700)
    except FileExistsError:
        raise PostgresLabError(f"{gdir} already exists: destroy it first or use another base_dir") \
            from None
    give_to_pg(gdir)
    client_credentials(base_dir)
    inst = _new_instance(gdir / "prod", f"{name}-prod", "primary", *node)
    try:
        _copy_template(inst)
        start(inst, timeout=timeout)
        _set_client_role(inst, *client_credentials(base_dir))
    except BaseException:
        kill_hard(inst)
        shutil.rmtree(gdir, ignore_errors=True)
        raise
    return inst


def _new_instance(home: Path, name: str, role: str, host: str = HOST,
                  netns_prefix: tuple[str, ...] = ()) -> Instance:
    home.mkdir(mode=0o700)
    give_to_pg(home)
    inst = Instance(name=name, datadir=home / "data", port=_claim_port(),
                    log=home / "server.log", role=role, host=host, netns_prefix=netns_prefix)
    write_instance_conf(inst)
    _touch_log(inst.log)
    if pg_storage.is_btrfs(home):
        # Made now, as a subvolume, so that a drill can snapshot it (lab/pg_storage.py); on
        # other file systems the copy of the template or the base backup makes it.
        pg_storage.make_datadir(inst.datadir)
        give_to_pg(inst.datadir)
    return inst


def _copy_template(inst: Instance) -> None:
    # `template/.`: copies the contents (and the directory's mode and owner) into the data
    # directory whether it exists already (a subvolume) or not.
    subprocess.run(["cp", "-a", f"{template_dir()}/.", str(inst.datadir)], check=True)


def _build_pair(base_dir: Path, primary: Instance, standby: Instance, standby_names: str,
                timeout: float) -> None:
    deadline = time.monotonic() + timeout
    _copy_template(primary)
    # In the data directory on purpose, so the standby's copy has it too (see create_pair).
    with open(primary.datadir / "postgresql.conf", "a") as f:
        f.write(f"synchronous_standby_names = '{standby_names}'\n")
    start(primary, timeout=max(1.0, deadline - time.monotonic()))
    _set_client_role(primary, *client_credentials(base_dir))
    source = make_conninfo(host=primary.host, port=primary.port, user=PG_OS_USER,
                           application_name=standby.name)
    backup = [pg_bin("pg_basebackup"), "-D", str(standby.datadir), "-d", source, "-R",
              "--checkpoint=fast", "--wal-method=stream", "--no-sync", "--no-manifest"]
    _run(backup, f"pg_basebackup of {primary.name} into {standby.name}", cwd=standby.socket_dir,
         timeout=max(1.0, deadline - time.monotonic()), log=primary.log)
    start(standby, timeout=max(1.0, deadline - time.monotonic()))
    wait_streaming(primary, standby, timeout=max(1.0, deadline - time.monotonic()),
                   sync=bool(standby_names))


def _set_client_role(primary: Instance, user: str, password: str) -> None:
    with admin_conn(primary) as c:
        # Only the SCRAM verifier goes to the server, so the password cannot reach a server log.
        verifier = c.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256")
        # Local commit: with synchronous_standby_names already set and no standby yet, a normal
        # commit would wait for a standby that does not exist.
        c.execute("SET synchronous_commit = local")
        exists = c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        c.execute(sql.SQL(verb + " ROLE {} SUPERUSER LOGIN REPLICATION PASSWORD {}").format(
            sql.Identifier(user), sql.Literal(verifier.decode())))


def create_pairs(base_dir: Path, groups: list[str], sync: bool,
                 timeout: float = 60.0) -> dict[str, tuple[Instance, Instance]]:
    """`create_pair` for several groups in parallel; on any failure none is left running."""
    template_dir()  # once, before the threads
    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        futures = {g: pool.submit(create_pair, base_dir, g, sync, timeout) for g in groups}
        done: dict[str, tuple[Instance, Instance]] = {}
        errors: list[BaseException] = []
        for g, f in futures.items():
            try:
                done[g] = f.result()
            except BaseException as e:
                errors.append(e)
    if errors:
        for pair in done.values():
            for inst in pair:
                destroy(inst)
        raise errors[0]
    return done


# --- process control ------------------------------------------------------------------------


def _read_pid(inst: Instance) -> int | None:
    try:
        first = inst.pidfile.read_text().split("\n", 1)[0].strip()
        return int(first) if first else None
    except (OSError, ValueError):
        return None


def _postmaster_pid(inst: Instance) -> int | None:
    """The pid of this data directory's live postmaster, or None (no pidfile, or a stale one)."""
    pid = _read_pid(inst)
    if pid is None:
        return None
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        try:
            ours = Path(p.cwd()) == inst.datadir.resolve()
        except psutil.AccessDenied:
            ours = str(inst.datadir) in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return pid if ours else None


def _socket_lock(inst: Instance) -> Path:
    return inst.socket_dir / f".s.PGSQL.{inst.port}.lock"


def is_running(inst: Instance) -> bool:
    """A postmaster is alive for this data directory (it may still be starting up)."""
    return _postmaster_pid(inst) is not None


def start(inst: Instance, wait: bool = True, timeout: float = 30.0) -> None:
    """Start the server (no-op if it runs); a stale postmaster.pid left by a kill is removed."""
    if not is_running(inst):
        # After kill -9 both lock files stay, and their pid may still exist (a zombie init has
        # not reaped yet, or a recycled pid): the server would refuse with "lock file already
        # exists".
        inst.pidfile.unlink(missing_ok=True)
        _socket_lock(inst).unlink(missing_ok=True)
        _touch_log(inst.log)
        argv = [pg_bin("pg_ctl"), "start", "-D", str(inst.datadir), "-l", str(inst.log), "-s"]
        argv += ["-w", "-t", str(max(1, round(timeout)))] if wait else ["-W"]
        _run(argv, f"starting {inst.name}", cwd=inst.socket_dir, timeout=timeout + 5,
             log=inst.log, outer=inst.netns_prefix)
    if wait:
        wait_ready(inst, timeout)


def wait_ready(inst: Instance, timeout: float = 30.0) -> None:
    """Wait until the server accepts connections (a standby: once it is consistent)."""
    deadline = time.monotonic() + timeout
    last = "no postmaster.pid yet"
    seen: int | None = None  # a postmaster of ours seen alive while waiting
    while True:
        # The postmaster's own status line first, as pg_ctl -w does: connection attempts during
        # recovery would each leave a FATAL "the database system is starting up" in the log.
        status = _pm_status(inst)
        seen = _postmaster_pid(inst) or seen
        if status in ("ready", "standby"):
            try:
                with admin_conn(inst) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                last = str(e).strip()
        elif status is not None:
            last = f"postmaster status {status!r}"
        if seen is not None and not procs.pid_alive(seen):
            raise PostgresLabError(f"{inst.name} exited while starting{log_tail(inst.log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{inst.name} (port {inst.port}) not ready within {timeout:.0f} s: "
                               f"{last}{log_tail(inst.log)}")
        time.sleep(0.02)


def _pm_status(inst: Instance) -> str | None:
    """Line 8 of postmaster.pid: starting, stopping, ready or standby (None: no pidfile)."""
    try:
        lines = inst.pidfile.read_text().split("\n")
    except OSError:
        return None
    return lines[7].strip() if len(lines) > 7 else "starting"


_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def stop(inst: Instance, mode: str = "fast", timeout: float = 30.0) -> None:
    """Shut the server down (`smart`, `fast` or `immediate`, as pg_ctl -m); no-op if it is down."""
    if mode not in _STOP_SIGNALS:
        raise ValueError(f"stop mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
    pid = _postmaster_pid(inst)
    if pid is None:
        return
    # Signalling the postmaster is exactly what pg_ctl stop does, minus its 100 ms polling.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, _STOP_SIGNALS[mode])
    if not _wait_gone([pid], timeout):
        raise TimeoutError(f"{inst.name} did not stop ({mode}) within {timeout:.0f} s; "
                           f"kill_hard() it or see {inst.log}")


def _wait_gone(pids: list[int], timeout: float) -> bool:
    """Wait until none of `pids` runs; a zombie counts as gone.

    The postmaster is not our child (pg_ctl detaches it), so its reaping is up to init, which
    here takes seconds: psutil's wait() would wait for that too.
    """
    deadline = time.monotonic() + timeout
    left = list(pids)
    while True:
        left = [p for p in left if procs.pid_alive(p)]
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def kill_hard(inst: Instance) -> None:
    """SIGKILL the postmaster and every process of the instance, as a host losing power would.

    postmaster.pid stays behind, as it would on a real host; `start` copes with it.
    """
    victims: list[psutil.Process] = []
    pid = _postmaster_pid(inst)
    if pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            victims += [root, *root.children(recursive=True)]
    # Backends orphaned by an earlier kill of the postmaster alone still sit in the data dir.
    datadir = str(inst.datadir.resolve())
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "postgres" and p not in victims:
            with contextlib.suppress(psutil.Error):
                if p.cwd() == datadir:
                    victims.append(p)
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _wait_gone([p.pid for p in victims], timeout=5)


def destroy(inst: Instance) -> None:
    """Stop the instance (immediate, then SIGKILL what is left) and remove its data directory."""
    with contextlib.suppress(TimeoutError):
        stop(inst, "immediate", timeout=10)
    kill_hard(inst)
    shutil.rmtree(inst.datadir, ignore_errors=True)
    if inst.datadir.exists():
        # A btrfs subvolume on a kernel older than 4.18, where rmdir cannot remove one.
        pg_storage.delete_subvolume(inst.datadir)


def service_spec(inst: Instance) -> dict[str, Any]:
    """What the power bridge needs to kill the instance on power-off and start it on power-on."""
    return {
        "name": f"postgres:{inst.name}",
        "pidfile": str(inst.pidfile),
        # The bridge removes the stale postmaster.pid; the socket's lock file, also left by a
        # kill, is removed here (the bridge only starts what is not running). pg_ctl -W returns
        # once the postmaster is launched: readiness is the caller's business.
        "start": ["/bin/sh", "-c", 'rm -f "$1" && exec "$2" start -D "$3" -l "$4" -W -s',
                  "pg-start", str(_socket_lock(inst)), pg_bin("pg_ctl"), str(inst.datadir),
                  str(inst.log)],
        "run_as": os_user(),
        "cwd": str(inst.socket_dir),
        "log": str(inst.log),
    }


# --- state ----------------------------------------------------------------------------------


def role(inst: Instance) -> Role:
    """What the instance is right now: `primary`, `standby`, or `down` (not accepting)."""
    if not is_running(inst):
        return "down"
    try:
        with admin_conn(inst) as c:
            row = c.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.OperationalError:
        return "down"
    return "standby" if row and row[0] else "primary"


def health(inst: Instance) -> tuple[bool, str]:
    """(healthy, detail) for `lab status`, e.g. (True, "primary, 1 sync standby streaming")."""
    if not is_running(inst):
        return False, "down (no postmaster)"
    try:
        with admin_conn(inst) as c:
            row = c.execute("SELECT pg_is_in_recovery()").fetchone()
            if row and row[0]:
                return _standby_health(c)
            return _primary_health(c)
    except psycopg.Error as e:
        return False, f"running but not accepting connections: {str(e).strip()}"


def _primary_health(c: psycopg.Connection[Any]) -> tuple[bool, str]:
    wanted = c.execute("SELECT current_setting('synchronous_standby_names')").fetchone()
    rows = c.execute("SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
                     ).fetchall()
    n_sync = sum(1 for (s,) in rows if s in ("sync", "quorum"))
    if wanted and wanted[0] and n_sync == 0:
        return False, (f"primary, writes wait: no synchronous standby streaming "
                       f"(synchronous_standby_names = {wanted[0]})")
    if not rows:
        return True, "primary, no standby"
    kinds = ", ".join(f"{sum(1 for (s,) in rows if s == k)} {k}"
                      for k in ("sync", "quorum", "potential", "async")
                      if any(s == k for (s,) in rows))
    noun = "standby" if len(rows) == 1 else "standbys"
    return True, f"primary, {kinds} {noun} streaming"


def _standby_health(c: psycopg.Connection[Any]) -> tuple[bool, str]:
    rcv = c.execute("SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver").fetchone()
    lag = c.execute("SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())"
                    ).fetchone()
    if rcv is None or rcv[0] != "streaming":
        return False, "standby, not streaming from a primary"
    behind = int(lag[0]) if lag and lag[0] is not None else 0
    return True, f"standby, streaming from {rcv[1]}:{rcv[2]}, replay {behind} bytes behind"


def wait_streaming(primary: Instance, standby: Instance, timeout: float = 30.0,
                   sync: bool | None = None) -> None:
    """Wait until `primary` shows `standby` streaming (and as its sync standby if `sync`)."""
    deadline = time.monotonic() + timeout
    seen: tuple[Any, ...] | None = None
    while True:
        with contextlib.suppress(psycopg.OperationalError), admin_conn(primary) as c:
            seen = c.execute("SELECT state, sync_state FROM pg_stat_replication "
                             "WHERE application_name = %s", (standby.name,)).fetchone()
            if seen and seen[0] == "streaming" and (
                    sync is None or (seen[1] in ("sync", "quorum")) == sync):
                return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{standby.name} not streaming{' synchronously' if sync else ''} from "
                f"{primary.name} within {timeout:.0f} s (pg_stat_replication: {seen})"
                f"{log_tail(standby.log)}")
        time.sleep(0.05)


def wait_replay_caught_up(primary: Instance, standby: Instance, timeout: float = 30.0) -> float:
    """Wait until `standby` has replayed all WAL `primary` has written so far; returns seconds."""
    t0 = time.monotonic()
    with admin_conn(primary) as c:
        try:
            row = c.execute("SELECT pg_current_wal_lsn()").fetchone()
        except psycopg.errors.ObjectNotInPrerequisiteState as e:
            raise PostgresLabError(f"{primary.name} is not a primary (it is in recovery)") from e
    target = row[0] if row else None
    replayed = None
    while True:
        with contextlib.suppress(psycopg.OperationalError), admin_conn(standby) as c:
            r = c.execute("SELECT pg_last_wal_replay_lsn(), "
                          "pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s::pg_lsn) >= 0",
                          (target,)).fetchone()
            if r:
                replayed = r[0]
                if r[1]:
                    return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{standby.name} replayed up to {replayed}, not {target} of "
                               f"{primary.name}, within {timeout:.0f} s")
        time.sleep(0.02)
