"""The guest agent's leader lease on a real etcd and a real PostgreSQL pair (docs/fencing.md
rules 1-6): acquire, renew, failsafe, self-fence in time, foreign key, re-acquire, release, the
sync key before relaxing, and a frozen agent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from pydantic import SecretStr

from agents.config import LeaseConfig, parse_config
from agents.drivers.postgres import PostgresDriver
from agents.lease import LeaseHolder
from agents.runner import Agent
from drflow.events import HealthEvent
from drflow.leader_keys import Leader, SyncState, leader_key, sync_key
from lab import etcd, procs
from lab import postgres as pg

pytestmark = pytest.mark.lab

LEASE_S, MARGIN_S = 3, 0.5


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="drflow-leasetest-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for group in (d / "pg").iterdir() if (d / "pg").exists() else []:
            for site in ("prod", "dr"):
                if (group / site / "data").is_dir():
                    pg.kill_hard(pg.Instance(name=site, datadir=group / site / "data", port=0,
                                             log=group / site / "server.log"))
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(root: Path) -> Iterator[dict[str, Any]]:
    member = etcd.Member("lease-test", "127.0.0.1", [], client_port=procs.free_port(),
                         peer_port=procs.free_port())
    info = etcd.start_cluster(root / "etcd-lab", [member])
    try:
        yield info
    finally:
        pid = int(info["members"][0]["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        etcd.stop_cluster(info)


@pytest.fixture()
def pair(root: Path) -> tuple[pg.Instance, pg.Instance]:
    group = f"g{uuid.uuid4().hex[:8]}"
    primary, standby = pg.create_pair(root / "pg", group, sync=True)
    for inst in (primary, standby):
        with pg.admin_conn(inst) as c:
            # What lab/postgres.py will set: a dead stream is noticed within 2 s.
            c.execute("ALTER SYSTEM SET wal_sender_timeout = '2s'")
            c.execute("ALTER SYSTEM SET wal_receiver_timeout = '2s'")
            c.execute("SELECT pg_reload_conf()")
    return primary, standby


def client(cluster: dict[str, Any]) -> etcd.Client:
    return etcd.Client(cluster["endpoints"], 2.0)


def group_of(inst: pg.Instance) -> str:
    return inst.name.rsplit("-", 1)[0]


class Holder:
    """A LeaseHolder for the pair's primary, in this process, with its reports kept."""

    def __init__(self, cluster: dict[str, Any], primary: pg.Instance, root: Path,
                 replication: str = "sync") -> None:
        user, password = pg.client_credentials(root / "pg")
        self.driver = PostgresDriver(datadir=primary.datadir, port=primary.port,
                                     host=primary.host, user=user, password=SecretStr(password))
        self.events: list[HealthEvent] = []
        self.state_dir = Path(tempfile.mkdtemp(dir=root))
        lease = LeaseConfig(etcd=cluster["endpoints"], lease_s=LEASE_S, margin_s=MARGIN_S,
                            replication=replication)  # type: ignore[arg-type]

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(pg.conninfo(primary, user, password), autocommit=True,
                                   connect_timeout=1)

        self.h = LeaseHolder(agent_id=primary.name, group=group_of(primary), resource="postgres",
                             lease=lease, driver=self.driver, emit=self.events.append,
                             state_dir=self.state_dir, pg_connect=connect)

    def reports(self, key: str) -> list[str]:
        return [str(e.details[key]) for e in self.events if key in e.details]


@pytest.fixture()
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.h.stop()


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def leader(cluster: dict[str, Any], group: str) -> Leader | None:
    raw = client(cluster).get(leader_key(group))
    return Leader.decode(raw) if raw else None


def sync_state(cluster: dict[str, Any], group: str) -> SyncState | None:
    raw = client(cluster).get(sync_key(group))
    return SyncState.decode(raw) if raw else None


def write(primary: pg.Instance, root: Path, timeout_s: float = 2.0) -> None:
    user, password = pg.client_credentials(root / "pg")
    with psycopg.connect(pg.conninfo(primary, user, password), autocommit=True,
                         options=f"-c statement_timeout={int(timeout_s * 1000)}") as c:
        c.execute("CREATE TABLE IF NOT EXISTS t (v text)")
        c.execute("INSERT INTO t VALUES (%s)", (uuid.uuid4().hex,))


@contextlib.contextmanager
def etcd_frozen(cluster: dict[str, Any]) -> Iterator[None]:
    pid = int(cluster["members"][0]["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: etcd.member_health(cluster["endpoints"][0], 0.5)[0], 10, "etcd back")


def _thread_cpu_s(name: str) -> float:
    """CPU seconds used so far by this process's thread called `name` (from /proc)."""
    thread = next(t for t in threading.enumerate() if t.name == name)
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def started(holders: list[Holder], cluster: dict[str, Any], primary: pg.Instance, root: Path,
            replication: str = "sync") -> Holder:
    h = Holder(cluster, primary, root, replication)
    holders.append(h)
    h.h.start()
    wait_for(lambda: h.h.state == "held", 5, "the lease to be acquired")
    return h


def test_acquires_renews_and_names_the_sync_standby(cluster: dict[str, Any], pair: Any,
                                                    root: Path, holders: list[Holder]) -> None:
    primary, standby = pair
    g = group_of(primary)
    h = started(holders, cluster, primary, root)
    got = leader(cluster, g)
    assert got is not None and got.agent_id == primary.name and got.by == "agent"
    kv = client(cluster).get_kv(leader_key(g))
    assert kv is not None and kv.lease == h.h.lease_id
    # Renewed: the key outlives its TTL twice over, on the same lease.
    time.sleep(2 * LEASE_S + 0.5)
    kv2 = client(cluster).get_kv(leader_key(g))
    assert kv2 is not None and kv2.lease == kv.lease and kv2.value == kv.value
    st = wait_for(lambda: sync_state(cluster, g), 3, "the sync key")
    assert st.primary == primary.name and st.standby == standby.name
    assert h.reports("drflow_lease") == ["acquired"]
    assert h.h.state == "held" and pg.is_running(primary)


def test_adopts_a_takeover_key_naming_this_agent(cluster: dict[str, Any], pair: Any,
                                                 root: Path, holders: list[Holder]) -> None:
    """After a promotion the takeover's key names this agent: it is replaced by this agent's."""
    primary, _ = pair
    g = group_of(primary)
    c = client(cluster)
    takeover_lease, _ttl = c.grant(30)
    written = Leader(primary.name, by="takeover", incident="failover:test").encode()
    c.put(leader_key(g), written, takeover_lease)
    h = started(holders, cluster, primary, root)
    kv = c.get_kv(leader_key(g))
    assert kv is not None and kv.lease == h.h.lease_id != takeover_lease
    got = Leader.decode(kv.value)
    assert got.agent_id == primary.name and got.by == "agent"
    assert not h.h.fences and pg.is_running(primary)


def test_etcd_gone_standby_streaming_keeps_serving(cluster: dict[str, Any], pair: Any,
                                                   root: Path, holders: list[Holder]) -> None:
    primary, _ = pair
    h = started(holders, cluster, primary, root)
    with etcd_frozen(cluster):
        wait_for(lambda: h.h.state == "failsafe", LEASE_S + 1, "failsafe")
        cpu_before = _thread_cpu_s("lease-watchdog")
        time.sleep(LEASE_S)  # well past the lease: still serving
        # ... and the watchdog rechecks the failsafe now and then, not in a busy loop.
        assert _thread_cpu_s("lease-watchdog") - cpu_before < 0.05 * LEASE_S
        write(primary, root)
        assert pg.is_running(primary) and h.h.state == "failsafe" and not h.h.fences
    wait_for(lambda: h.h.state == "held", LEASE_S + 2, "renewals again")
    # A thawed etcd may fail one more renewal on a loaded machine: failsafe again, never a fence.
    reports = h.reports("drflow_lease")
    assert reports[:2] == ["acquired", "failsafe"] and set(reports[2:]) <= {"failsafe"}, reports
    assert not h.h.fences
    write(primary, root)


def test_etcd_and_standby_gone_fences_before_the_lease_ends(
        cluster: dict[str, Any], pair: Any, root: Path, holders: list[Holder]) -> None:
    primary, standby = pair
    g = group_of(primary)
    h = started(holders, cluster, primary, root)
    wait_for(lambda: sync_state(cluster, g), 3, "the sync key")
    pg.kill_hard(standby)
    time.sleep(2.0)  # the renewal before this succeeded; relaxing would be due within lease_s
    with etcd_frozen(cluster):
        wait_for(lambda: h.h.fences, LEASE_S + 1, "the fence")
        fence = h.h.fences[0]
        print(f"\nfence {fence['after_last_renewal_sent_s']:.3f} s after the last successful "
              f"keepalive was sent; SIGKILL of {fence['killed']} processes took "
              f"{fence['kill_s'] * 1000:.1f} ms")
        assert fence["after_last_renewal_sent_s"] < LEASE_S - MARGIN_S + 0.2
        wait_for(lambda: not pg.is_running(primary), 2, "PostgreSQL gone")
        assert h.driver.held_down
    # With etcd gone, synchronous replication was never relaxed (writes waited instead).
    auto = (primary.datadir / "postgresql.auto.conf").read_text()
    assert "synchronous_standby_names" not in auto
    assert not (h.state_dir / "relaxed_sync.json").exists()
    assert "relaxed" not in h.reports("drflow_sync")
    assert h.reports("drflow_lease")[:2] == ["acquired", "fenced"]


def test_standby_lost_sync_key_before_relaxing_then_restored(
        cluster: dict[str, Any], pair: Any, root: Path, holders: list[Holder]) -> None:
    primary, standby = pair
    g = group_of(primary)
    h = started(holders, cluster, primary, root)
    wait_for(lambda: sync_state(cluster, g), 3, "the sync key")
    with pg.admin_conn(primary) as c:
        before = c.execute("SHOW synchronous_standby_names").fetchone()[0]  # type: ignore[index]
    pg.kill_hard(standby)

    def relaxed() -> bool:
        with pg.admin_conn(primary) as c:
            row = c.execute("SHOW synchronous_standby_names").fetchone()
        return row is not None and row[0] == ""

    wait_for(relaxed, LEASE_S + 4, "synchronous replication relaxed", 0.05)
    st = sync_state(cluster, g)
    assert st is not None and st.standby is None and st.primary == primary.name
    # The key was written (its `since` is taken just before the txn) before the server reloaded
    # the emptied setting (its own log line, millisecond timestamps).
    reloaded_at = reload_time(primary.log, 'parameter "synchronous_standby_names" changed to ""')
    assert st.since < reloaded_at, (st.since, reloaded_at)
    steps = [what for _, what, _ in h.h.history if what in ("sync_key", "relaxed")]
    assert steps[-2:] == ["sync_key", "relaxed"], steps
    write(primary, root)  # writes go on
    assert h.reports("drflow_sync") == ["relaxed"]
    pg.start(standby)
    # Not a timing claim: the restarted standby must connect, stream and catch up first.
    wait_for(lambda: h.reports("drflow_sync") == ["relaxed", "restored"], 30, "restored")
    with pg.admin_conn(primary) as c:
        assert c.execute("SHOW synchronous_standby_names").fetchone()[0] == before  # type: ignore[index]
    wait_for(lambda: (sync_state(cluster, g) or SyncState("", None)).standby == standby.name, 5,
             "the sync key naming the standby again")
    assert not h.h.fences


def test_foreign_key_fences_at_once_then_absent_key_reacquires(
        cluster: dict[str, Any], pair: Any, root: Path, holders: list[Holder]) -> None:
    primary, _ = pair
    g = group_of(primary)
    h = started(holders, cluster, primary, root)
    pid = pg._postmaster_pid(primary)
    client(cluster).put(leader_key(g), Leader("someone-else", by="takeover",
                                              incident="x").encode())
    t0 = time.monotonic()
    wait_for(lambda: h.h.fences, LEASE_S / 3 + 1.5, "the fence")
    print(f"\nforeign key → fence in {time.monotonic() - t0:.2f} s")
    wait_for(lambda: not pg.is_running(primary), 2, "PostgreSQL gone")
    wait_for(lambda: "held_for_reprotect" in h.reports("drflow_boot"), 3, "held_for_reprotect")
    time.sleep(LEASE_S / 3 + 0.2)
    assert not pg.is_running(primary)  # held: local recovery or the lease did not restart it
    client(cluster).delete(leader_key(g))
    wait_for(lambda: "reacquired" in h.reports("drflow_lease"), LEASE_S, "re-acquired")
    got = leader(cluster, g)
    assert got is not None and got.agent_id == primary.name
    wait_for(lambda: pg.role(primary) == "primary", 10, "PostgreSQL back as primary")
    assert pg._postmaster_pid(primary) != pid
    write(primary, root)


def test_a_key_handed_over_while_stopped_is_let_go_without_a_fence(
        cluster: dict[str, Any], pair: Any, root: Path, holders: list[Holder]) -> None:
    """A failback stops this primary, hands the key home, then re-attaches this node as a
    standby: the agent must let go of its lease, not fence (a kill there would hit the standby
    the failback is starting, and alert about a fence that never was)."""
    primary, _ = pair
    g = group_of(primary)
    h = started(holders, cluster, primary, root)
    h.driver.stop("fast")
    client(cluster).put(leader_key(g), Leader("home-node", by="agent").encode())
    wait_for(lambda: h.h.state == "idle", LEASE_S / 3 + 1.5, "the lease let go")
    time.sleep(LEASE_S + 0.5)  # past the old lease's deadline: the watchdog does not fence
    assert not h.h.fences and "fenced" not in h.reports("drflow_lease")
    assert "held_for_reprotect" not in h.reports("drflow_boot")
    assert not pg.is_running(primary) and h.driver.held_down  # nobody restarted it
    got = leader(cluster, g)
    assert got is not None and got.agent_id == "home-node"


def test_recovery_exhausted_revokes_the_lease(cluster: dict[str, Any], pair: Any, root: Path,
                                              holders: list[Holder]) -> None:
    primary, _ = pair
    g = group_of(primary)
    user, password = pg.client_credentials(root / "pg")
    pw = Path(tempfile.mkdtemp(dir=root)) / "pw"
    pw.write_text(password)
    os.environ["LEASE_TEST_SECRET"] = "x" * 32
    cfg = parse_config(yaml.safe_dump({
        "agent_id": primary.name, "group": g,
        "gateway": {"url": "http://127.0.0.1:9/v1/events",
                    "webhook_secret": {"ref": "env:LEASE_TEST_SECRET"}},
        "resources": [
            {"name": "postgres", "type": "postgres", "host": primary.host, "port": primary.port,
             "user": user, "password": {"ref": f"file:{pw}"},
             "datadir": str(primary.datadir), "interval_s": 0.5},
            # Nothing listens here and nothing can restart it: recovery is exhausted at once.
            {"name": "app-port", "type": "tcp", "port": procs.free_port(), "interval_s": 0.5,
             "failure_threshold": 1, "depends_on": ["postgres"]},
        ]}), base_dir=root)
    events: list[HealthEvent] = []
    agent = Agent(cfg, emit=events.append)
    h = started(holders, cluster, primary, root)
    agent.on_recovery_exhausted = h.h.on_recovery_exhausted
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: any(e.kind == "recovery_exhausted" for e in events), 10, "exhausted")
        assert not any(e.kind == "resource_failed" and e.resource == "postgres" for e in events)
        t_ex = time.monotonic()
        wait_for(lambda: leader(cluster, g) is None, 1.0, "the key gone at once")
        print(f"\nkey gone {time.monotonic() - t_ex:.3f} s after recovery_exhausted")
        assert not pg.is_running(primary)
    finally:
        agent.stop()
        t.join(5)


def test_frozen_agent_reacquires_on_thaw_without_fencing(
        cluster: dict[str, Any], pair: Any, root: Path) -> None:
    primary, _ = pair
    g = group_of(primary)
    user, password = pg.client_credentials(root / "pg")
    d = Path(tempfile.mkdtemp(dir=root))
    (d / "pw").write_text(password)
    (d / "secret").write_text("s" * 32)
    cfg = {
        "agent_id": primary.name, "group": g,
        "gateway": {"url": f"http://127.0.0.1:{procs.free_port()}/v1/events",
                    "webhook_secret": {"ref": f"file:{d / 'secret'}"}},
        "outbox": str(d / "outbox.sqlite"),
        # async: no failsafe, so only the thawed watchdog's create-if-absent avoids a fence.
        "lease": {"etcd": cluster["endpoints"], "lease_s": LEASE_S, "margin_s": MARGIN_S,
                  "replication": "async"},
        "resources": [{"name": "postgres", "type": "postgres", "host": primary.host,
                       "port": primary.port, "user": user,
                       "password": {"ref": f"file:{d / 'pw'}"}, "datadir": str(primary.datadir)}],
    }
    (d / "agent.yaml").write_text(yaml.safe_dump(cfg))
    log = d / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "run", "-c",
                                 str(d / "agent.yaml")], stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(Path(__file__).parent.parent))
    try:
        wait_for(lambda: leader(cluster, g) is not None, 15, "the agent's key")
        pid = pg._postmaster_pid(primary)
        cpu0, t0 = sum(psutil_times(proc.pid)), time.monotonic()
        time.sleep(3)
        cpu = (sum(psutil_times(proc.pid)) - cpu0) / (time.monotonic() - t0)
        print(f"\nagent CPU while holding the lease: {cpu * 100:.1f} % of one core")
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: leader(cluster, g) is None, LEASE_S + 2, "the key to expire")
        time.sleep(0.5)
        proc.send_signal(signal.SIGCONT)
        wait_for(lambda: leader(cluster, g) is not None, 3, "the key re-acquired")
        time.sleep(LEASE_S)
        got = leader(cluster, g)
        assert got is not None and got.agent_id == primary.name
        assert pg._postmaster_pid(primary) == pid, "PostgreSQL was fenced (or restarted)"
        text = log.read_text()
        assert "leader lease fenced" not in text, text[-3000:]
        assert "reacquired" in text
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def reload_time(log: Path, needle: str) -> float:
    """Epoch seconds of the last server log line containing `needle` (prefix '%m [%p] ')."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if needle in ln]
    assert lines, f"no {needle!r} in {log}"
    day, clock, tz = lines[-1].split(" ", 3)[:3]
    return datetime.strptime(f"{day} {clock} {tz}", "%Y-%m-%d %H:%M:%S.%f %Z").replace(
        tzinfo=UTC).timestamp()


def psutil_times(pid: int) -> tuple[float, float]:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user, t.system



def test_pure_decisions_at_their_edges() -> None:
    from agents.lease_decide import PgView, Standby, after_fence, failsafe, sync_step

    fresh = Standby("b", "streaming", "sync", 0.2, True)
    view = PgView("primary", "FIRST 1 (b)", (fresh,))
    assert failsafe(view, 0.1, "sync", 3).action == "failsafe"
    assert failsafe(view, 0.1, "async", 3).action == "fence"  # no failsafe for async groups
    assert failsafe(view, 1.4, "sync", 3).action == "fence"   # view too old to vouch for it
    stale = PgView("primary", "x", (Standby("b", "streaming", "sync", 1.6, True),))
    assert failsafe(stale, 0.0, "sync", 3).action == "fence"
    potential = PgView("primary", "x", (Standby("b", "streaming", "potential", 0.1, True),))
    assert failsafe(potential, 0.0, "sync", 3).action == "fence"
    assert failsafe(None, 0.0, "sync", 3).action == "fence"

    key = SyncState("a", "b")
    assert sync_step(view, key, "a", {}, False, 0, 3).action == "none"
    assert sync_step(view, SyncState("a", None), "a", {}, False, 0, 3).standby == "b"
    assert sync_step(view, key, "a", {"b": "vm-b"}, False, 0, 3).standby == "vm-b"
    gone = PgView("primary", "FIRST 1 (b)", ())
    assert sync_step(gone, key, "a", {}, False, 2.9, 3).action == "none"
    assert sync_step(gone, key, "a", {}, False, 3.0, 3).action == "relax"
    behind = PgView("primary", "", (Standby("b", "streaming", "async", 0.1, False),))
    assert sync_step(behind, key, "a", {}, True, 0, 3).action == "none"
    caught_up = PgView("primary", "", (Standby("b", "streaming", "async", 0.1, True),))
    assert sync_step(caught_up, key, "a", {}, True, 0, 3).action == "restore"
    assert sync_step(caught_up, key, "a", {}, False, 0, 3).action == "none"

    assert after_fence(None, "a").action == "reacquire"
    assert after_fence(Leader("a").encode(), "a").action == "wait"
    assert after_fence(Leader("b", "takeover").encode(), "a").action == "hold"
