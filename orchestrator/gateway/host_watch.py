"""Watches, through each site's vCenter, the ESXi host of every group's current primary.

Every `interval_s` it reads, per site in one PropertyCollector call each for VMs and hosts,
the primaries' `runtime.connectionState` and their hosts' `runtime.connectionState`, and hands
what it saw with the agent's heartbeat age to `host_watch_decide.judge`. An alert goes through
the gateway's `_raise_alert` (audited, de-duplicated per hold-down, sent to Slack); a recovery
is logged and audited. The reads run in one thread per site with a warm session each, bounded
by socket timeouts and a deadline: a slow or hung vCenter never holds the event loop, nor the
state thread where failover detection runs, nor another site's reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

from pyVim.connect import Disconnect
from pyVmomi import vim, vmodl

from drflow.daemon_worker import DaemonWorker
from drflow.vsphere import login
from orchestrator.gateway.contracts import Alert
from orchestrator.gateway.heartbeats import HeartbeatTracker
from orchestrator.gateway.host_watch_decide import Observed, Verdict, judge
from orchestrator.gateway.replication import ReplicationEvidence
from orchestrator.gateway.settings import GatewaySettings
from tasks.vsphere import VCenter, vms_by_name

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("drflow.gateway.host_watch")


class WatchedGateway(Protocol):
    """What the watcher uses of GatewayService (its state on the state thread only)."""

    settings: GatewaySettings
    tracker: HeartbeatTracker
    replication: ReplicationEvidence

    async def in_state(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...

    def _raise_alert(self, alert: Alert) -> None: ...

    def _record(self, action: str, target: str, parameters: dict[str, Any], outcome: str,
                reason: str) -> None: ...


@dataclass(frozen=True)
class VmRead:
    host: str | None = None
    host_state: str | None = None
    vm_state: str | None = None
    missing: bool = False


class SiteReader:
    """One site's vCenter: a session kept warm, the VMs' references cached. Blocking; used from
    its own single thread only."""

    def __init__(self, site: str, vc: VCenter, call_timeout_s: float) -> None:
        self.site = site
        self.vc = vc
        self.call_timeout_s = call_timeout_s
        self._si: Any = None
        self._content: Any = None
        self._vms: dict[str, Any] = {}  # name -> VM reference (None: several of that name)

    @property
    def label(self) -> str:
        return f"of site {self.site} ({self.vc.url})"

    def _login(self) -> None:
        self._si = login(self.vc.url, self.vc.user, self.vc.password, self.vc.verify_tls,
                         self.call_timeout_s)
        self._content = self._si.RetrieveContent()
        self._vms = {}

    def drop(self) -> None:
        si, self._si, self._content, self._vms = self._si, None, None, {}
        if si is not None:
            try:
                Disconnect(si)
            except Exception:  # the session is being dropped because it misbehaves
                log.debug("logging out of vCenter %s failed", self.label)

    def read(self, names: list[str]) -> dict[str, VmRead]:
        """The connection states of these VMs and of their hosts; ConnectionError when vCenter
        cannot be read (after one fresh login for a session that had gone stale)."""
        for attempt in (1, 2):
            fresh = self._si is None
            try:
                if fresh:
                    self._login()
                return self._read(names)
            except vmodl.fault.ManagedObjectNotFound:
                self._vms = {}  # a VM was re-registered: look the names up again
                if attempt == 2:
                    raise ConnectionError("its VMs changed while being read") from None
            except ConnectionError:
                self.drop()
                raise
            except Exception as exc:
                self.drop()
                if fresh or attempt == 2:
                    raise ConnectionError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        raise AssertionError("unreachable")

    def _read(self, names: list[str]) -> dict[str, VmRead]:
        if any(n not in self._vms for n in names):
            self._vms = vms_by_name(self._si, self.vc.datacenter)
        refs = {n: self._vms.get(n) for n in names}
        out = {n: VmRead(missing=True) for n, ref in refs.items() if ref is None}
        vm_props = self._props([r for r in refs.values() if r is not None], vim.VirtualMachine,
                               ["runtime.connectionState", "runtime.host"])
        hosts = {p["runtime.host"] for p in vm_props.values() if p.get("runtime.host") is not None}
        host_props = self._props(list(hosts), vim.HostSystem, ["name", "runtime.connectionState"])
        for n, ref in refs.items():
            if ref is None:
                continue
            p = vm_props.get(ref._moId, {})
            h = p.get("runtime.host")
            hp = host_props.get(h._moId, {}) if h is not None else {}
            out[n] = VmRead(host=_str(hp.get("name")), host_state=_str(hp.get("runtime.connectionState")),
                            vm_state=_str(p.get("runtime.connectionState")))
        return out

    def _props(self, objs: list[Any], kind: Any, paths: list[str]) -> dict[str, dict[str, Any]]:
        if not objs:
            return {}
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=o, skip=False) for o in objs],
                             propSet=[pc.PropertySpec(type=kind, pathSet=paths, all=False)])
        collector = self._content.propertyCollector
        out: dict[str, dict[str, Any]] = {}
        result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        while result is not None:
            for obj in result.objects:
                out[obj.obj._moId] = {p.name: p.val for p in obj.propSet or []}
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return out


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


class HostWatcher:
    """Reads the primaries' hosts every `interval_s` and alerts through the gateway."""

    def __init__(self, vcenters: Mapping[str, VCenter], interval_s: float = 5.0,
                 read_timeout_s: float = 8.0, call_timeout_s: float = 4.0) -> None:
        self.interval_s = interval_s
        self.read_timeout_s = read_timeout_s
        self.readers = {site: SiteReader(site, vc, call_timeout_s) for site, vc in vcenters.items()}
        # Daemon threads: a read hung in a frozen vCenter must not hold the gateway's exit.
        self._workers = {site: DaemonWorker(f"host-watch-{site}") for site in self.readers}
        self._pending: dict[str, tuple[asyncio.Future[dict[str, VmRead]], float]] = {}
        self._alerting: dict[tuple[str, str], str] = {}  # (group, vm) -> kind alerted
        self._said: dict[tuple[str, str], tuple[Any, ...]] = {}  # last state logged
        self._unwatched: set[str] = set()

    async def run(self, gw: WatchedGateway) -> None:
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.round(gw)
                except Exception:  # a bug must not end the watch
                    log.exception("the host watch round failed; continuing")
                await asyncio.sleep(max(0.0, started + self.interval_s - time.monotonic()))
        finally:
            for site, worker in self._workers.items():
                worker.submit(self.readers[site].drop)  # logging out may hang: never wait for it
                worker.shutdown()

    def retain(self, keep: Callable[[str, str], bool]) -> None:
        """Forget what was alerted or logged of VMs for which `keep(group, vm)` is False (on the
        state thread, where `act` runs): a group added again starts afresh."""
        self._alerting = {k: v for k, v in self._alerting.items() if keep(*k)}
        self._said = {k: v for k, v in self._said.items() if keep(*k)}

    def targets(self, gw: WatchedGateway) -> dict[str, list[tuple[str, str]]]:
        """{site: [(group, primary VM)]} from the agents' role reports and the configuration."""
        out: dict[str, list[tuple[str, str]]] = {}
        for group in gw.settings.groups:
            primary = gw.tracker.primary(group)
            roster = gw.settings.roster(group)
            node = next((n for n in (roster.primary, roster.standby)
                         if n is not None and n.vm == primary), None)
            if node is None:
                continue
            if node.site not in self.readers:
                if node.site not in self._unwatched:
                    self._unwatched.add(node.site)
                    log.warning("no vCenter of site %s to watch: hosts there are not watched",
                                node.site)
                continue
            out.setdefault(node.site, []).append((group, node.vm))
        return out

    async def round(self, gw: WatchedGateway) -> None:
        targets = await gw.in_state(self.targets, gw)
        sites = list(targets)
        reads = await asyncio.gather(*(self._read(s, [vm for _, vm in targets[s]]) for s in sites))

        def judge_all() -> None:
            for site, (found, error) in zip(sites, reads, strict=True):
                for group, vm in targets[site]:
                    self.act(gw, self._observe(gw, site, group, vm, found.get(vm), error))

        await gw.in_state(judge_all)

    async def _read(self, site: str, vms: list[str]) -> tuple[dict[str, VmRead], str | None]:
        """What the site's vCenter says of `vms`, or ({}, why it did not answer)."""
        pending = self._pending.get(site)
        if pending is not None and not pending[0].done():
            return {}, f"its previous read has not ended after {time.monotonic() - pending[1]:.0f} s"
        future = asyncio.wrap_future(self._workers[site].submit(self.readers[site].read, vms))
        self._pending[site] = (future, time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.read_timeout_s), None
        except TimeoutError:
            return {}, f"no answer within {self.read_timeout_s:g} s"
        except ConnectionError as exc:
            return {}, str(exc)
        except Exception as exc:
            return {}, f"{type(exc).__name__}: {str(exc)[:200]}"

    def _observe(self, gw: WatchedGateway, site: str, group: str, vm: str, read: VmRead | None,
                 error: str | None) -> Observed:
        state = gw.tracker.get(group, vm)
        age = gw.tracker.age(state) if state is not None and state.heard else None
        history = gw.replication.evidence(group, vm).get("primary_lsn_history") or []
        db_age = max(0.0, time.time() - history[-1][0]) if history else None
        read = read or VmRead()
        return Observed(group=group, vm=vm, vcenter=self.readers[site].label,
                        heartbeat_timeout_s=gw.settings.heartbeat_timeout_s,
                        heartbeat_age_s=age, host=read.host, host_state=read.host_state,
                        vm_state=read.vm_state, error=error, vm_missing=read.missing and not error,
                        db_primary_age_s=db_age)

    def act(self, gw: WatchedGateway, o: Observed) -> Verdict:
        """Alert, note a recovery, or log what changed (on the state thread)."""
        v = judge(o)
        key = (o.group, o.vm)
        # Quiet verdicts are logged when they change, not every round.
        said = (v.kind, v.healthy, o.host_state, o.vm_state, o.vm_missing, o.error is None)
        if self._said.get(key) != said and v.kind is None:
            log.info("%s", v.reason)
        self._said[key] = said
        if v.kind is not None:
            self._alerting[key] = v.kind
            gw._raise_alert(Alert(group=o.group, kind=v.kind, agent_id=o.vm, reason=v.reason,
                                  evidence={"vcenter": o.vcenter, "host": o.host,
                                            "host_state": o.host_state, "vm_state": o.vm_state,
                                            "vcenter_error": o.error,
                                            "heartbeat_age_s": None if o.heartbeat_age_s is None
                                            else round(o.heartbeat_age_s, 3)}))
        elif v.healthy and key in self._alerting:
            kind = self._alerting.pop(key)
            why = f"recovered: {v.reason}"
            log.warning("%s alert of %s: %s", kind, o.group, why)
            gw._record("incident.alert", o.group, {"kind": kind, "agent_id": o.vm, "recovered": True},
                       "recovered", why)
        return v
