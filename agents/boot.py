"""The agent's boot check: ask the gateway who serves the group before PostgreSQL may start.

A VM that comes back after a failover must not bring its old primary up as a primary: the group
serves from the other side now. So on boot (the lab's power bridge starts the agent, not
PostgreSQL) the agent asks `GET {gateway}/v1/groups/{group}/roles?nonce=…`, checks the answer's
signature (webhook secret) and nonce, finds which side it is (its PostgreSQL port on one of its
own addresses), and then:

- this side serves, or this node is a standby (standby.signal): start PostgreSQL;
- the group serves from the other side and this node would come up as a primary: keep it
  stopped (held down, local recovery leaves it alone) until re-protect rewinds it, and report;
- it already runs as a primary while the group serves elsewhere: a second primary — stop it at
  once (immediate), hold it, and report it (`resource_failed`, `details.drflow_boot =
  second_primary`): the gateway fences it, then re-protects;
- the gateway cannot be reached, this side is unknown, or roles are moving (an open failover
  incident, a failback): touch nothing that runs, start nothing that would be a primary, and ask
  again every few seconds;
- whatever the gateway says (its record may be stale: a manual failover it never heard of, a
  state directory lost and fallen back to "home serves"), a node that would come up as a primary
  first asks the other node's PostgreSQL itself: if that answers as a writable primary, this one
  is held down (reported `held_for_reprotect`, with `peer_writable`) instead of started.

With a leader lease (`lease` in agent.yaml) the agent asks etcd first (docs/fencing.md rule 8):
the leader key names this agent → start; names another → hold (or fence a running primary);
absent and the sync key's `primary` is this agent → start (the lease is then acquired); anything
else, or etcd unreachable → the gateway's answer as above.

Every report from the gateway's answer carries `details.site`, so the gateway learns which side
an agent is on (a decision taken from etcd's keys has no site to tell).
stdlib + drflow models only (no Prefect): the agent stays small.

Wiring (agents/cli.py `_run`): after `_start_control(...)` and before `agent.run()`:

    gate = boot.BootGate.from_config(cfg, agent.drivers[cfg.control_resource().name],
                                     outbox.enqueue)
    gate.start()          # first decision now (bounded), then retries in a thread if needed
    ...
    finally: gate.stop()
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from drflow.etcd import Client, EtcdError
from drflow.events import EventKind, HealthEvent
from drflow.leader_keys import Leader, SyncState, leader_key, sync_key
from drflow.secret_refs import SecretValue
from drflow.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify

log = logging.getLogger(__name__)

# The gateway reads these in details.drflow_boot (orchestrator/gateway/roles.py).
BOOT_HELD = "held_for_reprotect"
BOOT_SECOND_PRIMARY = "second_primary"
BOOT_STARTED = "started"
BOOT_RUNNING = "running"

Action = Literal["start", "hold", "fence", "leave", "wait"]


@dataclass(frozen=True)
class LocalState:
    """What this node's PostgreSQL is right now (from the driver's status)."""

    running: bool
    role: str  # primary, standby, down
    standby_signal: bool

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> LocalState:
        return cls(bool(status.get("running")), str(status.get("role") or "down"),
                   bool(status.get("standby_signal")))


@dataclass(frozen=True)
class PeerCheck:
    """What the other node's PostgreSQL answered (asked directly, not through the gateway)."""

    where: str
    answered: bool
    writable_primary: bool = False
    detail: str = ""


@dataclass(frozen=True)
class BootDecision:
    action: Action
    reason: str
    report: str | None = None  # details.drflow_boot of the event to send, if any

    @property
    def final(self) -> bool:
        """No need to ask the gateway again."""
        return self.action != "wait"


def my_site(roles: dict[str, Any], port: int, local_addresses: set[str]) -> str | None:
    """The side of the group whose endpoint is this node: its port, on one of our addresses."""
    for site, node in (roles.get("nodes") or {}).items():
        if not isinstance(node, dict) or node.get("port") != port:
            continue
        host = str(node.get("host"))
        if host in local_addresses or _resolves_to(host, local_addresses):
            return str(site)
    return None


def decide_boot(roles: dict[str, Any] | None, site: str | None, local: LocalState,
                problem: str = "") -> BootDecision:
    """What to do with this node's PostgreSQL on boot, and why."""
    if roles is None or site is None:
        why = problem or ("this node's PostgreSQL is not one of the group's sides in the "
                          "gateway's answer")
        return _unsure(local, why)
    group, serving = roles.get("group"), roles.get("primary_site")
    if roles.get("in_transition"):
        what = ("a failover incident is open" if roles.get("incident_open")
                else f"{roles.get('transition')} in progress")
        return _unsure(local, f"{group}: {what}")
    if site == serving:
        if local.running:
            return BootDecision("leave", f"{group} is served from this side ({site}); "
                                         f"PostgreSQL already runs as {local.role}", BOOT_RUNNING)
        return BootDecision("start", f"{group} is served from this side ({site}): starting "
                                     "PostgreSQL", BOOT_STARTED)
    return served_elsewhere(f"{group} is served from {serving}, not from this side ({site})",
                            local)


def served_elsewhere(elsewhere: str, local: LocalState) -> BootDecision:
    """The group serves from the other node (`elsewhere` says who says so): what to do here."""
    if local.running and local.role == "primary":
        return BootDecision("fence", f"{elsewhere}, yet PostgreSQL here runs as a primary: a "
                                     "second primary; stopped it and holding it down",
                            BOOT_SECOND_PRIMARY)
    if local.running:
        return BootDecision("leave", f"{elsewhere}; PostgreSQL here runs as {local.role}",
                            BOOT_RUNNING)
    if local.standby_signal:
        return BootDecision("start", f"{elsewhere}; this node is a standby (standby.signal): "
                                     "starting it, it cannot take writes", BOOT_STARTED)
    return BootDecision("hold", f"{elsewhere}; PostgreSQL here would come up as a primary: "
                                "held down until re-protect rewinds it", BOOT_HELD)


def starts_a_primary(d: BootDecision, local: LocalState) -> bool:
    """Would acting on `d` bring up a PostgreSQL that takes writes?"""
    return d.action == "start" and not local.standby_signal


def guard_peer(d: BootDecision, local: LocalState, peer: PeerCheck | None) -> BootDecision:
    """Never start a primary while the other node answers as a writable primary, whatever the
    gateway said. A peer that does not answer is no evidence either way: the gateway's word
    stands (a home VM rebooting while DR is down must come back)."""
    if not starts_a_primary(d, local) or peer is None or not peer.writable_primary:
        return d
    return BootDecision("hold", f"{d.reason.split(':', 1)[0]}, but the other node {peer.where} "
                                f"answers as a writable primary ({peer.detail}): not starting "
                                "a second primary; held down until re-protect rewinds it",
                        BOOT_HELD)


def decide_boot_keys(leader_raw: str | None, sync_raw: str | None, me: str,
                     local: LocalState) -> BootDecision | None:
    """Rule 8 (docs/fencing.md): what the leader and sync keys in etcd say, or None when they
    do not settle it (then the gateway's answer decides, as without etcd)."""
    try:
        holder = Leader.decode(leader_raw) if leader_raw else None
        sync = SyncState.decode(sync_raw) if sync_raw else None
    except (KeyError, ValueError) as exc:
        log.warning("boot check: unreadable key in etcd (%s): asking the gateway", exc)
        return None
    if holder is not None and holder.agent_id == me:
        why = f"etcd: the leader key names this agent (by {holder.by})"
    elif holder is None and sync is not None and sync.primary == me:
        why = "etcd: no leader key, and the sync key names this agent as the primary"
    elif holder is None:
        return None
    else:
        return served_elsewhere(f"etcd: the leader key names {holder.agent_id} (by {holder.by})",
                                local)
    if local.running:
        return BootDecision("leave", f"{why}; PostgreSQL already runs as {local.role}",
                            BOOT_RUNNING)
    return BootDecision("start", f"{why}: starting PostgreSQL", BOOT_STARTED)


def _holder(leader_raw: str | None) -> str | None:
    try:
        return Leader.decode(leader_raw).agent_id if leader_raw else None
    except (KeyError, ValueError):
        return None


def peer_node(roles: dict[str, Any] | None, site: str | None) -> tuple[str, int] | None:
    """The other side's PostgreSQL endpoint, from the gateway's answer."""
    for other, node in ((roles or {}).get("nodes") or {}).items():
        if other != site and isinstance(node, dict) and node.get("host") and node.get("port"):
            return str(node["host"]), int(node["port"])
    return None


def probe_peer(host: str, port: int, *, dbname: str, user: str, password: SecretValue | None,
               timeout_s: float = 2.0) -> PeerCheck:
    """Ask PostgreSQL at host:port whether it takes writes; bounded (connect and statement)."""
    import psycopg

    where = f"{host}:{port}"
    try:
        with psycopg.connect(host=host, port=port, dbname=dbname, user=user,
                             password=password.get_secret_value() if password else None,
                             connect_timeout=max(1, int(timeout_s)), autocommit=True,
                             application_name="drflow-agent-boot",
                             options=f"-c statement_timeout={int(timeout_s * 1000)}") as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), "
                               "current_setting('default_transaction_read_only')").fetchone()
    except psycopg.Error as exc:
        return PeerCheck(where, False, False, str(exc).strip().splitlines()[0][:200]
                         if str(exc).strip() else type(exc).__name__)
    writable = bool(row) and not row[0] and row[1] == "off"  # type: ignore[index]
    return PeerCheck(where, True, writable, "writable primary" if writable
                     else "in recovery or read-only")


def _unsure(local: LocalState, why: str) -> BootDecision:
    if local.running:
        return BootDecision("wait", f"{why}: leaving the running PostgreSQL ({local.role}) as it "
                                    "is, asking again")
    if local.standby_signal:
        return BootDecision("start", f"{why}; this node is a standby (standby.signal): starting "
                                     "it, it cannot take writes", BOOT_STARTED)
    return BootDecision("wait", f"{why}: keeping PostgreSQL stopped (it would come up as a "
                                "primary), asking again")


# -- asking the gateway ---------------------------------------------------------------------------


class RolesUnavailable(Exception):
    """The gateway did not give a trustworthy answer; the message says why."""


def roles_url(events_url: str, group: str) -> str:
    """The gateway's roles endpoint next to its events endpoint."""
    parts = urlsplit(events_url)
    return f"{parts.scheme}://{parts.netloc}/v1/groups/{group}/roles"


def fetch_roles(url: str, secret: SecretValue, timeout_s: float = 3.0) -> dict[str, Any]:
    """GET the roles with a fresh nonce; the answer must be signed and echo it."""
    nonce = str(uuid.uuid4())
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        conn.request("GET", f"{parts.path}?{urlencode({'nonce': nonce})}")
        resp = conn.getresponse()
        body = resp.read()
        status = resp.status
        headers = {k.lower(): v for k, v in resp.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        raise RolesUnavailable(f"gateway {url} unreachable: {exc}") from None
    finally:
        conn.close()
    if status != 200:
        raise RolesUnavailable(f"gateway {url} answered {status}: {body[:200]!r}")
    try:
        verify(secret.get_secret_value().encode(), headers.get(TIMESTAMP_HEADER.lower()),
               headers.get(SIGNATURE_HEADER.lower()), body)
        data = json.loads(body)
    except (SignatureError, ValueError) as exc:
        raise RolesUnavailable(f"answer from {url} is not the gateway's ({exc})") from None
    if not isinstance(data, dict) or data.get("nonce") != nonce:
        raise RolesUnavailable(f"answer from {url} is not for this request (nonce)")
    return data


def local_addresses(extra: str | None = None) -> set[str]:
    out = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    if extra:
        out.add(extra)
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            out.update(a.address.split("%", 1)[0] for a in addrs
                       if a.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:  # psutil missing or no permission: loopback and names still match
        pass
    return out


def _resolves_to(host: str, addresses: set[str]) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return any(str(i[4][0]) in addresses for i in infos)


# -- the gate -----------------------------------------------------------------------------------


class BootGate:
    """Applies `decide_boot` once on boot, and again every `retry_s` until a final decision."""

    def __init__(self, *, agent_id: str, group: str, resource: str, port: int,
                 host: str | None, url: str, secret: SecretValue, driver: Any,
                 emit: Callable[[HealthEvent], None], retry_s: float = 2.0,
                 fetch: Callable[[str, SecretValue], dict[str, Any]] = fetch_roles,
                 probe: Callable[[str, int], PeerCheck] | None = None,
                 etcd: Client | None = None) -> None:
        self.agent_id, self.group, self.resource = agent_id, group, resource
        self.port, self.url, self.secret = port, url, secret
        self.addresses = local_addresses(host)
        self.driver, self.emit, self.retry_s, self.fetch = driver, emit, retry_s, fetch
        self.probe = probe
        self.etcd = etcd  # asked first when set (rule 8); unreachable: the gateway decides
        self.peer: PeerCheck | None = None
        self.leader_seen: str | None = None  # who the leader key named at the last etcd check
        self.decisions: list[BootDecision] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: Any, driver: Any, emit: Callable[[HealthEvent], None],
                    **kw: Any) -> BootGate:
        """For an AgentConfig with a control section (the PostgreSQL resource it drives)."""
        from drflow.secret_refs import resolve

        r = cfg.control_resource()
        password = resolve(r.password) if r.password else None

        def probe(host: str, port: int) -> PeerCheck:
            return probe_peer(host, port, dbname=r.dbname, user=r.user, password=password)

        kw.setdefault("probe", probe)
        if cfg.lease is not None:
            kw.setdefault("etcd", Client(cfg.lease.etcd, timeout=1.0))
        return cls(agent_id=cfg.agent_id, group=cfg.group, resource=r.name, port=r.port,
                   host=r.host, url=roles_url(cfg.gateway.url, cfg.group),
                   secret=resolve(cfg.gateway.webhook_secret), driver=driver, emit=emit, **kw)

    def start(self) -> BootDecision:
        """Decide and act now; if not final, keep asking in a daemon thread."""
        d = self.step()
        if not d.final:
            self._thread = threading.Thread(target=self._loop, name="boot-gate", daemon=True)
            self._thread.start()
        return d

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.retry_s):
            try:
                if self.step().final:
                    return
            except Exception:
                log.exception("boot check failed; asking again")

    def step(self) -> BootDecision:
        if self.etcd is not None:
            local = LocalState.from_status(self.driver.status())
            try:
                leader_raw = self.etcd.get(leader_key(self.group))
                d = decide_boot_keys(leader_raw, self.etcd.get(sync_key(self.group)),
                                     self.agent_id, local)
                self.leader_seen = _holder(leader_raw)
            except EtcdError as exc:
                log.info("boot check: etcd unreachable (%s): asking the gateway", exc)
                d = None
            if d is not None:
                self.peer = None
                self._act(d, None, local, via_etcd=True)
                return d
        problem = ""
        roles: dict[str, Any] | None = None
        try:
            roles = self.fetch(self.url, self.secret)
        except RolesUnavailable as exc:
            problem = str(exc)
        site = my_site(roles, self.port, self.addresses) if roles else None
        local = LocalState.from_status(self.driver.status())
        d = decide_boot(roles, site, local, problem)
        self.peer = None
        if starts_a_primary(d, local) and self.probe is not None:
            peer = peer_node(roles, site)
            if peer is not None:
                self.peer = self.probe(*peer)
                d = guard_peer(d, local, self.peer)
        self._act(d, site, local)
        return d

    def _act(self, d: BootDecision, site: str | None, local: LocalState,
             via_etcd: bool = False) -> None:
        first = not self.decisions
        changed = first or self.decisions[-1].action != d.action
        self.decisions.append(d)
        if changed:
            log.warning("boot check: %s", d.reason)
        if d.action == "start":
            self.driver.start()
        elif d.action == "fence":
            self.driver.stop("immediate")
        elif (d.action == "hold" or (d.action == "wait" and not local.running)) and \
                not getattr(self.driver, "held_down", False):
            # Not running: only marks it held down. Once: re-marking on every retry would race
            # a re-protect that starts the rewound standby meanwhile, and stop it again.
            self.driver.stop("fast")
        if d.report is None or (site is None and not via_etcd):
            return
        details: dict[str, Any] = {"drflow_boot": d.report, "action": d.action,
                                   "reason": d.reason}
        if site is not None:
            details["site"] = site
        if self.peer is not None and self.peer.writable_primary:
            details["peer_writable"] = self.peer.where
        if via_etcd and self.leader_seen not in (None, self.agent_id):
            # The gateway corrects a stale roles record from this as from peer_writable.
            details["leader_elsewhere"] = self.leader_seen
        if d.report == BOOT_SECOND_PRIMARY:
            kind = EventKind.RESOURCE_FAILED
            details["error"] = d.reason
        else:
            kind = EventKind.ROLE_CHANGED
            # `to` names no role the gateway would take as a primary claim (gateway/decide.py).
            details.update({"from": local.role, "to": "standby" if local.standby_signal
                            or local.role == "standby" else d.action})
        self.emit(HealthEvent(agent_id=self.agent_id, group=self.group, kind=kind,
                              resource=self.resource, details=details))
