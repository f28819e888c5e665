"""The primary's leader lease in etcd: hold it, renew it, fence PostgreSQL before it can expire.

Three threads, so that nothing the fence depends on waits on the network:
- *renewal* (etcd): acquire or adopt the key while PostgreSQL is a primary, keepalive every
  lease_s/3, check the key still holds this agent's value, keep the sync key (rule 5), and after
  a fence re-acquire only by create-if-absent (after a failed keepalive it retries every 0.2 s);
- *observer* (local SQL): the primary's view of its standbys, every lease_s/3, every 200 ms once a
  renewal failed;
- *watchdog*: acts at `renewal_deadline(...)` (failsafe or SIGKILL of PostgreSQL), using only
  the clock, the observer's last view and a kill; it never makes a network call, except one
  bounded create-if-absent (0.3 s) when it wakes long after the deadline (the VM was frozen).

Reports go through the outbox (`emit`): `details.drflow_lease` = acquired | failsafe | fenced |
reacquired, `details.drflow_sync` = relaxed | restored, `details.drflow_boot` =
held_for_reprotect when the key names another agent after a fence.
The standby's walreceiver `application_name` is taken as its agent id (the lab's cluster_name
is the VM name); `lease.standby_agents` maps it otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from agents.lease_decide import PgView, Standby, after_fence, failsafe, on_leader_key, sync_step
from drflow.etcd import Client, EtcdError, absent, put_op, value_is
from drflow.events import EventKind, HealthEvent
from drflow.leader_keys import Leader, SyncState, leader_key, renewal_deadline, sync_key

log = logging.getLogger(__name__)

FROZEN_GAP_S = 1.0      # a watchdog tick this late means the process did not run (frozen)
# The watchdog wakes at the deadline and at least this often between, to see a freeze by the
# gap between two wake-ups. A gap is never shorter than the freeze inside it, so any tick well
# under FROZEN_GAP_S sees every freeze of FROZEN_GAP_S; each wake-up costs the VM CPU (20 a
# second cost the agent 0.2 % of a core, 4 cost 0.05 %).
WATCH_TICK_S = 0.25
FAILSAFE_RECHECK_S = 0.2
RETRY_S = 0.2           # renewal retry period after a failed keepalive

_PRIMARY_SQL = """
select current_setting('synchronous_standby_names'),
       coalesce(json_agg(json_build_object(
           'name', application_name, 'state', state, 'sync_state', sync_state,
           'reply_age', extract(epoch from now() - reply_time),
           'caught_up', flush_lsn is not distinct from sent_lsn)), '[]')
from pg_stat_replication
"""


class LeaseHolder:
    """Holds `leader_key(group)` while the local PostgreSQL serves as primary (rules 1-6)."""

    def __init__(self, *, agent_id: str, group: str, resource: str, lease: Any, driver: Any,
                 emit: Callable[[HealthEvent], None], state_dir: Path,
                 pg_connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self.me, self.group, self.resource = agent_id, group, resource
        self.lease_s = float(lease.lease_s)
        self.margin_s = float(lease.margin_s)
        self.replication = lease.replication
        self.names: dict[str, str] = dict(getattr(lease, "standby_agents", None) or {})
        self.driver, self.emit = driver, emit
        self.relaxed_path = Path(state_dir) / "relaxed_sync.json"
        self._pg_connect = pg_connect
        self.etcd = Client(lease.etcd, timeout=self.lease_s / 4)
        self.key, self.skey = leader_key(group), sync_key(group)
        self._lock = threading.Lock()       # state below; never held across a network call
        self._lease_ops = threading.Lock()  # grant/create/keepalive: one holder at a time
        self.state = "idle"  # idle | held | failsafe | fenced | held_for_reprotect | released
        self.lease_id = 0
        self.ttl = 0
        self.value = ""                     # the exact leader value this agent wrote
        self.last_ok_sent: float | None = None
        self.keepalive_failed = False
        self.view: PgView | None = None
        self.view_at = 0.0
        # Since when this primary has waited with synchronous_standby_names set and no standby
        # streaming (None: not waiting). Counted from that observation, never from the last
        # stream seen: a node promoted long after its last standby streamed (a failback, a
        # takeover) must not relax the moment a flow restores synchronous replication.
        self.unstreamed_since: float | None = None
        self.sync_changed_at = 0.0  # when this agent last relaxed or restored synchronous names
        self.history: list[tuple[float, str, str]] = []  # (monotonic, what, why): for tests/logs
        self.fences: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conn: psycopg.Connection[Any] | None = None

    @classmethod
    def from_config(cls, cfg: Any, driver: Any, emit: Callable[[HealthEvent], None]
                    ) -> LeaseHolder:
        from agents.config import PostgresResource
        from drflow.secret_refs import resolve

        r = cfg.control_resource() if cfg.control is not None else next(
            x for x in cfg.resources if isinstance(x, PostgresResource))
        password = resolve(r.password) if r.password else None

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(
                host=r.host, port=r.port, dbname=r.dbname, user=r.user, connect_timeout=1,
                password=password.get_secret_value() if password else None, autocommit=True,
                application_name="drflow-agent-lease", options="-c statement_timeout=1000")

        return cls(agent_id=cfg.agent_id, group=cfg.group, resource=r.name, lease=cfg.lease,
                   driver=driver, emit=emit, state_dir=cfg.outbox.parent, pg_connect=connect)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for name, fn in (("lease-watchdog", self._watchdog), ("lease-observer", self._observer),
                         ("lease-renewal", self._renewal)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """A clean agent stop: the lease is NOT revoked (PostgreSQL keeps serving, rule 6)."""
        self._stop.set()
        for t in self._threads:
            t.join(2)

    def on_recovery_exhausted(self, resource: str) -> None:
        """Rule 6: stop PostgreSQL, then revoke the lease so the key goes at once."""
        with self._lock:
            lease_id, state = self.lease_id, self.state
            if state not in ("held", "failsafe"):
                return
            self.state = "released"
        result = self.driver.fence()
        self._note("released", f"local recovery of {resource} exhausted: PostgreSQL stopped "
                               f"({result}), revoking the lease")
        try:
            self.etcd.revoke(lease_id)
        except EtcdError as exc:
            log.warning("could not revoke lease %x (%s): it expires within %g s", lease_id, exc,
                        self.lease_s)

    def _release(self, why: str) -> None:
        with self._lock:
            lease_id, self.state, self.last_ok_sent = self.lease_id, "idle", None
        self._note("released", why)
        with contextlib.suppress(EtcdError):
            self.etcd.revoke(lease_id)

    # -- the watchdog: clock, last view, kill -----------------------------------------------------

    def deadline(self) -> float | None:
        with self._lock:
            if self.state not in ("held", "failsafe") or self.last_ok_sent is None:
                return None
            return renewal_deadline(self.last_ok_sent, self.ttl, self.margin_s)

    def _watchdog(self) -> None:
        last_tick = time.monotonic()
        next_failsafe_check = 0.0
        while not self._stop.is_set():
            dl = self.deadline()
            now = time.monotonic()
            wait = WATCH_TICK_S if dl is None else max(0.0, min(WATCH_TICK_S, dl - now))
            if dl is not None and now >= dl and next_failsafe_check > now:
                # Past the deadline in failsafe: the next look is due at the recheck, not at
                # once (a wait of 0 here spun a core for as long as etcd stayed away).
                wait = min(WATCH_TICK_S, next_failsafe_check - now)
            if self._stop.wait(wait):
                return
            now = time.monotonic()
            frozen = now - last_tick > FROZEN_GAP_S
            last_tick = now
            dl = self.deadline()
            if dl is None or now < dl:
                continue
            if frozen and self._thawed_reacquire(now):
                continue
            # The renewal thread, thawed too, may have renewed or re-created the key while this
            # one waited for it: the deadline moved, and fencing now would kill a primary that
            # holds a fresh lease.
            dl = self.deadline()
            if dl is None or time.monotonic() < dl:
                continue
            with self._lock:
                state = self.state
            if state == "failsafe" and now < next_failsafe_check:
                continue
            d = failsafe(self.view, now - self.view_at, self.replication, self.lease_s)
            if d.action == "failsafe":
                next_failsafe_check = now + FAILSAFE_RECHECK_S
                if state != "failsafe":
                    with self._lock:
                        if self.state != "held":
                            continue
                        self.state = "failsafe"
                    self._note("failsafe", d.why)
                    self._report(EventKind.RESOURCE_FAILED, {"drflow_lease": "failsafe",
                                                             "error": d.why})
                continue
            self._fence(d.why)

    def _thawed_reacquire(self, now: float) -> bool:
        """Woken long after the deadline: one bounded create-if-absent decides (rule 3)."""
        if not self._lease_ops.acquire(timeout=0.4):
            return False
        try:
            dl = self.deadline()
            if dl is not None and time.monotonic() < dl:
                return True  # the renewal thread renewed or re-acquired meanwhile
            ok = self._create(timeout=0.3)
        finally:
            self._lease_ops.release()
        if ok:
            self._note("reacquired", f"thawed {now - (dl or now):.1f} s after the deadline; the "
                                     "key was absent: nobody took over, carrying on")
        return ok

    def _fence(self, why: str,
               kill: Callable[[], dict[str, Any] | None] | None = None) -> None:
        with self._lock:
            if self.state in ("fenced", "held_for_reprotect"):
                return
            before, self.state = self.state, "fenced"
            last = self.last_ok_sent
        t0 = time.monotonic()
        result = (kill or self.driver.fence)()
        if result is None:
            with self._lock:
                if self.state == "fenced":
                    self.state = before
            log.info("not fencing (%s): PostgreSQL is being changed by a verb or is no longer "
                     "a primary", why)
            return
        after_ok = None if last is None else round(t0 - last, 3)
        fence = {**result, "after_last_renewal_sent_s": after_ok, "at": t0}
        self.fences.append(fence)
        self._note("fenced", f"{why}; killed in {result['kill_s']:.4f} s")
        self._report(EventKind.RESOURCE_FAILED, {
            "drflow_lease": "fenced", "error": why, "kill_s": result["kill_s"],
            "after_last_renewal_sent_s": after_ok})

    # -- the observer: local SQL ----------------------------------------------------------------

    def _observer(self) -> None:
        while not self._stop.is_set():
            view = self._observe()
            now = time.monotonic()
            with self._lock:
                self.view, self.view_at = view, now
                fast = self.keepalive_failed or self.state == "failsafe"
            if view is None:
                pass
            elif view.role != "primary" or not view.synchronous_standby_names \
                    or view.streaming():
                self.unstreamed_since = None
            elif self.unstreamed_since is None:
                self.unstreamed_since = now
            self._stop.wait(FAILSAFE_RECHECK_S if fast else self.lease_s / 3)

    def _observe(self) -> PgView | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._pg_connect()
            conn = self._conn
            row = conn.execute("select pg_is_in_recovery()").fetchone()
            if row is None or row[0]:
                return PgView("standby")
            r = conn.execute(_PRIMARY_SQL).fetchone()
        except psycopg.Error:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            self._conn = None
            return PgView("down") if not self.driver.status().get("running") else None
        assert r is not None
        rows = r[1] if isinstance(r[1], list) else json.loads(r[1])
        return PgView("primary", str(r[0]), tuple(
            Standby(str(x["name"]), str(x["state"]), str(x["sync_state"]),
                    None if x["reply_age"] is None else float(x["reply_age"]),
                    bool(x["caught_up"])) for x in rows))

    # -- the renewal thread: etcd -----------------------------------------------------------------

    def _renewal(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._renew_once()
            except Exception:  # a bug here must not end renewals; the watchdog still guards
                log.exception("lease renewal step failed")
            # A fixed cadence from the start of each step; after a failed keepalive, retry at
            # once (a timed-out call already waited lease_s/4): one lost answer must not use
            # up the time left before the deadline.
            period = RETRY_S if self.keepalive_failed else self.lease_s / 3
            self._stop.wait(max(0.0, began + period - time.monotonic()))

    def _renew_once(self) -> None:
        with self._lock:
            state, view, view_at = self.state, self.view, self.view_at
        if state in ("fenced", "held_for_reprotect") and view is not None \
                and view.role == "standby":
            # Re-protect rewound it into a standby: it cannot acknowledge a write, and a later
            # promotion (a failback) must find it ready to adopt the key naming it.
            with self._lock:
                self.state = "idle"
            self._note("standby", "PostgreSQL here runs as a standby now (re-protected): the "
                                  "fence is over; the key is taken again only as a primary")
        elif state in ("fenced", "held_for_reprotect"):
            self._after_fence()
        elif state in ("held", "failsafe") and view is not None and view.role == "standby":
            self._release("PostgreSQL here is a standby now: the leader key is not this "
                          "node's to hold")
        elif state in ("held", "failsafe"):
            if self._keepalive() and self.replication == "sync" and view is not None:
                self._sync(view, view_at)
        elif state == "idle" and view is not None and view.role == "primary":
            self._acquire()

    def _acquire(self) -> None:
        """Rule 1: create-if-absent, adopt a key naming this agent, fence if it names another."""
        try:
            kv = self.etcd.get_kv(self.key)
        except EtcdError as exc:
            log.debug("leader key not readable: %s", exc)
            return
        d = on_leader_key(kv.value if kv else None, self.me, primary_running=True)
        if d.action == "fence":
            # The view may be a second old: checked again under the driver's lock, so a
            # re-protect that is rewinding this node into a standby is not killed mid-way.
            self._fence(d.why, kill=self.driver.fence_if_primary)
            return
        if d.action not in ("create", "adopt"):
            log.warning("leader lease: %s", d.why)
            return
        with self._lease_ops:
            ok = self._create() if kv is None else self._replace(kv.value)
        if ok:
            self._note("acquired", d.why)
            self._report(EventKind.ROLE_CHANGED, {"drflow_lease": "acquired", "reason": d.why,
                                                  "lease_s": self.ttl})

    def _grant(self, timeout: float | None) -> tuple[int, int, str, float]:
        sent = time.monotonic()
        lease_id, ttl = self.etcd.grant(int(self.lease_s)) if timeout is None else \
            Client(self.etcd.endpoints, timeout).grant(int(self.lease_s))
        value = Leader(agent_id=self.me, by="agent", since=time.time()).encode()
        return lease_id, ttl, value, sent

    def _create(self, timeout: float | None = None) -> bool:
        """Create-if-absent with a new lease; True when this agent holds the key now."""
        client = self.etcd if timeout is None else Client(self.etcd.endpoints, timeout)
        try:
            lease_id, ttl, value, sent = self._grant(timeout)
            ok, _ = client.txn([absent(self.key)], [put_op(self.key, value, lease_id)])
        except EtcdError as exc:
            log.debug("create-if-absent failed: %s", exc)
            return False
        if not ok:
            with contextlib.suppress(EtcdError):
                client.revoke(lease_id)
            return False
        self._holding(lease_id, ttl, value, sent)
        return True

    def _replace(self, seen: str) -> bool:
        try:
            lease_id, ttl, value, sent = self._grant(None)
            ok, _ = self.etcd.txn([value_is(self.key, seen)], [put_op(self.key, value, lease_id)])
        except EtcdError as exc:
            log.debug("adopting the leader key failed: %s", exc)
            return False
        if ok:
            self._holding(lease_id, ttl, value, sent)
        return ok

    def _holding(self, lease_id: int, ttl: int, value: str, sent: float) -> None:
        with self._lock:
            self.lease_id, self.ttl, self.value, self.last_ok_sent = lease_id, ttl, value, sent
            self.keepalive_failed = False
            if self.state in ("idle", "failsafe", "held"):
                self.state = "held"

    def _keepalive(self) -> bool:
        """Rule 2; True while this agent still holds the key."""
        with self._lease_ops:
            with self._lock:
                lease_id = self.lease_id
            sent = time.monotonic()
            try:
                ttl = self.etcd.keepalive(lease_id)
            except EtcdError as exc:
                with self._lock:
                    self.keepalive_failed = True
                log.debug("keepalive failed: %s", exc)
                return False
            if ttl == 0:
                if self._create():
                    self._note("reacquired", "the lease was gone in etcd; the key was absent: "
                                             "re-created it")
                    return True
                self._fence("the lease was gone in etcd and the key could not be re-created "
                            "(someone else holds it)")
                return False
        try:
            kv = self.etcd.get_kv(self.key)
        except EtcdError:
            kv = None
            current = self.value
        else:
            current = kv.value if kv else ""
        with self._lock:
            if self.state in ("held", "failsafe") and self.lease_id == lease_id:
                self.last_ok_sent, self.ttl, self.keepalive_failed = sent, ttl, False
                if self.state == "failsafe":
                    self.state = "held"
                    log.warning("leader lease renewed again: failsafe over")
        if not current:
            # Deleted behind our back while the lease lives: put it back if still absent.
            with contextlib.suppress(EtcdError):
                ok, _ = self.etcd.txn([absent(self.key)],
                                      [put_op(self.key, self.value, lease_id)])
                if ok:
                    self._note("reacquired", "the leader key was deleted while the lease "
                                             "lived: re-created it")
                    return True
        if current != self.value:
            self._lost_key(f"the leader key no longer holds this agent's value (it holds "
                           f"{current or 'nobody'}): someone else wrote it")
            return False
        return True

    def _lost_key(self, why: str) -> None:
        """Someone else holds the key. A server that may take writes is fenced. A standby or a
        stopped server cannot acknowledge one: the agent only lets go of its lease. That is a
        failback's handover: it stopped this primary, handed the key home and re-attaches this
        node as a standby, which a fence here would kill just after it started."""
        seen: list[str] = []

        def kill() -> dict[str, Any] | None:
            state, result = self.driver.fence_if_serving()
            seen.append(state)
            return result

        self._fence(why, kill=kill)
        if seen and seen[0] in ("standby", "down"):
            self._release(f"{why}; PostgreSQL here is "
                          + ("a standby" if seen[0] == "standby" else "stopped (held down)")
                          + ": it acknowledges no write, nothing to fence")

    def _after_fence(self) -> None:
        """Rule 4: re-acquire only by create-if-absent; held for re-protect if another holds it."""
        try:
            raw = self.etcd.get(self.key)
        except EtcdError:
            return
        d = after_fence(raw, self.me)
        if d.action == "reacquire":
            with self._lease_ops:
                if not self._create():
                    return
            with self._lock:
                self.state = "held"
            result = self.driver.start()
            self._note("reacquired", f"{d.why} ({result.get('action')})")
            self._report(EventKind.RESOURCE_RECOVERED, {"drflow_lease": "reacquired",
                                                        "reason": d.why})
        elif d.action == "hold":
            with self._lock:
                first = self.state != "held_for_reprotect"
                self.state = "held_for_reprotect"
            if first:
                self._note("held_for_reprotect", d.why)
                details: dict[str, Any] = {"drflow_boot": "held_for_reprotect",
                                           "reason": d.why, "to": "hold"}
                with contextlib.suppress(KeyError, ValueError):
                    details["leader_elsewhere"] = Leader.decode(raw or "").agent_id
                self._report(EventKind.ROLE_CHANGED, details)

    # -- rule 5: the sync key -------------------------------------------------------------------

    def _sync(self, view: PgView, view_at: float) -> None:
        try:
            raw = self.etcd.get(self.skey)
        except EtcdError:
            return
        key = SyncState.decode(raw) if raw else None
        d = sync_step(view, key, self.me, self.names, self.relaxed_path.exists(),
                      0.0 if self.unstreamed_since is None
                      else time.monotonic() - self.unstreamed_since, self.lease_s)
        if d.action == "write_standby":
            if self._write_sync(d.standby):
                self._note("sync_key", d.why)
        elif d.action == "relax":
            if view_at <= self.sync_changed_at:
                return  # a view from before this agent's last change: wait for a fresh one
            if self.relaxed_path.exists() and \
                    time.monotonic() - self.sync_changed_at < self.lease_s:
                # Relaxed just now: pg_reload_conf() reaches the observer's session only at its
                # next reload, so a view taken since may still show the old setting.
                return
            if key is not None and key.standby is None and key.primary == self.me:
                written = True
            else:
                written = self._write_sync(None)
            if not written:
                log.warning("not relaxing synchronous replication: the sync key could not be "
                            "written (writes wait, so no stale standby can be promoted)")
                return
            self._note("sync_key", "sync key written with no standby")
            self._relax(view.synchronous_standby_names, d.why)
        elif d.action == "restore":
            self._restore(d.why)

    def _write_sync(self, standby: str | None) -> bool:
        value = SyncState(primary=self.me, standby=standby, since=time.time()).encode()
        try:
            ok, _ = self.etcd.txn([value_is(self.key, self.value)], [put_op(self.skey, value)])
        except EtcdError as exc:
            log.debug("sync key not written: %s", exc)
            return False
        return ok

    def _sql(self, *statements: str) -> None:
        with self._pg_connect() as conn:
            for s in statements:
                conn.execute(s)

    def _relax(self, old: str, why: str) -> None:
        self.relaxed_path.write_text(json.dumps({"synchronous_standby_names": old,
                                                 "at": time.time()}))
        try:
            self._sql("ALTER SYSTEM SET synchronous_standby_names = ''",
                      "SELECT pg_reload_conf()")
        except psycopg.Error as exc:
            log.warning("could not relax synchronous_standby_names: %s", exc)
            return
        self.sync_changed_at = time.monotonic()
        self._note("relaxed", why)
        self._report(EventKind.RESOURCE_FAILED, {"drflow_sync": "relaxed", "error": why,
                                                 "previous": old})

    def _restore(self, why: str) -> None:
        try:
            old = str(json.loads(self.relaxed_path.read_text())["synchronous_standby_names"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot read %s (%s): synchronous replication not restored",
                        self.relaxed_path, exc)
            return
        try:
            with self._pg_connect() as conn:
                conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}")
                             .format(sql.Literal(old)))
                conn.execute("SELECT pg_reload_conf()")
        except psycopg.Error as exc:
            log.warning("could not restore synchronous_standby_names: %s", exc)
            return
        self.relaxed_path.unlink(missing_ok=True)
        self.sync_changed_at = time.monotonic()
        self._note("restored", why)
        self._report(EventKind.RESOURCE_RECOVERED, {"drflow_sync": "restored", "reason": why,
                                                    "synchronous_standby_names": old})

    # -- reports ------------------------------------------------------------------------------

    def _note(self, what: str, why: str) -> None:
        self.history.append((time.monotonic(), what, why))
        log.warning("leader lease %s: %s", what, why)

    def _report(self, kind: EventKind, details: dict[str, Any]) -> None:
        try:
            self.emit(HealthEvent(agent_id=self.me, group=self.group, kind=kind,
                                  resource=self.resource, details=details))
        except Exception:
            log.exception("could not store the lease report %s", details)
