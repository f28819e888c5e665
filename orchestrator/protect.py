"""`drflow protect`: one running database VM made a protected pair, step by step.

Each step checks what is done before it acts, so a re-run after a failure continues where the
failed run stopped. What this protection created is recorded as it is created (a small JSON
file beside drflow.yaml), so that `rollback` removes exactly that and nothing an operator made.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from drflow.config import DrflowConfig
from drflow.config.edit import add_group, remove_group
from drflow.control import ControlClient
from drflow.dns import fqdn, point_record
from drflow.secrets import SecretRef
from drflow.signing import control_secret
from flows.runtime import Runtime
from orchestrator import agent_push, protect_observe
from orchestrator.protect_build import (
    CONTROL_SECRET,
    DB_PASSWORD,
    WEBHOOK_SECRET,
    Common,
    Node,
    agent_config,
    group_entry,
    standby_datadir,
    standby_identity,
)
from orchestrator.protect_plan import STEPS, Ask, Known, Plan, plan
from tasks.dns import resolve_endpoint_or_none
from tasks.postgres import Db
from tasks.replication import primary_view, set_sync_names, sync_setting, wait_streaming
from tasks.vsphere import connect, find_vm
from tasks.vsphere_guest import GuestLogin
from tasks.vsphere_provision import VmSpec, create_from_template, destroy

Progress = Callable[[str], None]
CONTROL_PORT = 9101
HEARD_TIMEOUT_S = 30.0


class ProtectError(RuntimeError):
    """A step failed or was refused; the message names the step and what to do."""


@dataclass(frozen=True)
class Request:
    """Everything `drflow protect` was asked (the wizard's answers, or the flags)."""

    vm: str
    site: str
    to: str
    group: str
    port: int
    standby_vm: str
    standby_address: str
    standby_host: str
    template: str
    prefix_len: int
    standby_gateway: str | None
    replication: str
    record: str
    zone_id: str
    ttl: int
    rpo_budget_s: float
    db_name: str
    db_user: str
    db_password_ref: str
    guest_user: str
    guest_password_ref: str
    control_port: int = CONTROL_PORT
    address: str | None = None  # the primary's; default: what VMware Tools reports


@dataclass
class Record:
    """What this protection made, kept beside drflow.yaml until it is done or rolled back."""

    request: dict[str, Any]
    done: list[str] = field(default_factory=list)
    standby_vm: bool = False
    primary_agent: bool = False
    dns: bool = False
    config: bool = False
    sync_before: str | None = None


def record_path(config: Path, group: str) -> Path:
    return config.resolve().parent / f".drflow-protect-{group}.json"


def load_record(config: Path, group: str) -> Record | None:
    p = record_path(config, group)
    if not p.exists():
        return None
    return Record(**json.loads(p.read_text()))


def _save(config: Path, group: str, rec: Record) -> None:
    p = record_path(config, group)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rec), indent=1))
    os.replace(tmp, p)


@dataclass
class Observed:
    plan: Plan
    primary: Node
    standby: Node
    database: protect_observe.Database
    cpus: int
    memory_mb: int


class Protection:
    """One protection's steps against the configuration at `config`."""

    def __init__(self, config: Path, req: Request, progress: Progress = print) -> None:
        self.config = config
        self.req = req
        self.progress = progress
        self.rt = Runtime(cfg=_load(config), path=str(config))
        self.cfg: DrflowConfig = self.rt.cfg
        self.record = load_record(config, req.group) or Record(request=asdict(req))
        self.bin_dir = ""  # the primary's PostgreSQL binaries, as its agent found them

    # -- reading ----------------------------------------------------------------------------

    def _db(self, host: str, port: int) -> Db:
        return Db(host=host, port=port, dbname=self.req.db_name, user=self.req.db_user,
                  password=self.rt.secret(SecretRef(ref=self.req.db_password_ref)))

    def observe(self) -> Observed:
        r = self.req
        for site in (r.site, r.to):
            if site not in self.cfg.sites:
                raise ProtectError(f"site {site!r} is not in {self.config} (sites: "
                                   f"{', '.join(self.cfg.sites)}): add it under `sites`")
        pvm = protect_observe.primary_vm(self.rt.vcenter(r.site), r.vm)
        address = r.address or pvm.address
        if not address:
            raise ProtectError(f"VMware Tools reports no address for {r.vm}: give the "
                               "database's address (`--address`)")
        d = protect_observe.database(self._db(address, r.port))
        dr = protect_observe.dr_site(self.rt.vcenter(r.to), r.to, r.template, r.standby_host,
                                     r.standby_vm, r.standby_address,
                                     made_before=self.record.standby_vm)
        known = Known(groups=frozenset(g.name for g in self.cfg.groups) - self._ours(),
                      vms=frozenset(n.vm for g in self.cfg.groups if g.name != r.group
                                    for n in (g.primary, g.standby)),
                      records=frozenset(fqdn(g.dns.record) for g in self.cfg.groups
                                        if g.name != r.group))
        ask = Ask(r.group, r.standby_vm, r.standby_address, r.replication, fqdn(r.record))
        p = plan(protect_observe.primary(r.vm, r.site, pvm, address, r.port, d), dr, ask, known)
        primary = Node(r.vm, r.site, address, r.port, d.datadir, r.control_port)
        standby = Node(r.standby_vm, r.to, r.standby_address, r.port,
                       standby_datadir(d.version, r.group), r.control_port)
        return Observed(p, primary, standby, d, pvm.cpus, pvm.memory_mb)

    def _ours(self) -> frozenset[str]:
        """This group, when an earlier run of this very protection wrote it into the config."""
        return frozenset([self.req.group]) if self.record.config else frozenset()

    # -- acting -----------------------------------------------------------------------------

    def run(self, seen: Observed, drill: Callable[[str], dict[str, Any]] | None) -> dict[str, Any]:
        """Every step in order (those a previous run finished are checked again, cheaply)."""
        if not seen.plan.ok:
            raise ProtectError("refused, nothing was changed:\n  - "
                               + "\n  - ".join(seen.plan.refusals))
        _save(self.config, self.req.group, self.record)
        actions: dict[str, Callable[[Observed], None]] = {
            "push the agent": self._push_primary, "discover": self._discover,
            "create the standby VM": self._create_standby, "seed and cluster": self._seed,
            "DNS": self._dns, "config": self._config}
        figures: dict[str, Any] = {"steps": {}}
        for i, step in enumerate(STEPS, 1):
            self.progress(f"[{i}/{len(STEPS)}] {step}")
            t0 = time.monotonic()
            try:
                if step == "prove it":
                    figures["drill"] = self._prove(drill)
                else:
                    actions[step](seen)
            except ProtectError as exc:
                raise ProtectError(f"step {i}/{len(STEPS)} ({step}) failed: {exc}") from None
            except Exception as exc:
                raise ProtectError(
                    f"step {i}/{len(STEPS)} ({step}) failed: {self.rt.scrub(str(exc))}\n"
                    "Fix what it names and run the same command again: finished steps are "
                    f"checked, not redone. `drflow protect {self.req.vm} --config {self.config} "
                    "--rollback` removes what this protection made.") from None
            figures["steps"][step] = round(time.monotonic() - t0, 2)
            if step not in self.record.done:
                self.record.done.append(step)
                _save(self.config, self.req.group, self.record)
        return figures

    def _guest(self, site: str, vm: str) -> agent_push.Guest:
        vc = self.rt.vcenter(site)
        si = connect(vc)
        login = GuestLogin(self.req.guest_user,
                           self.rt.secret(SecretRef(ref=self.req.guest_password_ref)))
        return agent_push.Guest(si, vc.url, find_vm(si, vm, vc.datacenter), login, vc.verify_tls)

    def _push_primary(self, seen: Observed) -> None:
        from orchestrator import agent_bundle

        self.record.primary_agent = True
        _save(self.config, self.req.group, self.record)
        agent_push.install(self._guest(self.req.site, self.req.vm), agent_bundle.build(),
                           self.progress)

    def _discover(self, seen: Observed) -> None:
        out = agent_push.agent(self._guest(self.req.site, self.req.vm), "discover --json")
        found = json.loads(out)
        mine = [i for i in found.get("instances", []) if i.get("port") == seen.primary.port]
        if not mine or os.path.normpath(mine[0]["datadir"]) != os.path.normpath(
                seen.database.datadir):
            raise ProtectError(
                f"the agent in {self.req.vm} finds no PostgreSQL on port {seen.primary.port} "
                f"with data in {seen.database.datadir} (it finds: "
                + (", ".join(f"port {i['port']} {i['datadir']}" for i in found.get("instances", []))
                   or "none")
                + f"): {seen.primary.address}:{seen.primary.port} is not a database of this VM; "
                  "check `--address` and `--port`")
        self.bin_dir = str(mine[0]["bin_dir"])
        kinds = sorted({r["type"] for r in found.get("resources", [])})
        self.progress(f"  {self.req.vm}: PostgreSQL {seen.database.version} on port "
                      f"{seen.primary.port}, data {seen.database.datadir}; resources: "
                      f"{', '.join(kinds)}")

    def _create_standby(self, seen: Observed) -> None:
        from orchestrator import agent_bundle

        r = self.req
        self.record.standby_vm = True
        _save(self.config, self.req.group, self.record)
        create_from_template(self.rt.vcenter(r.to), VmSpec(
            name=r.standby_vm, template=r.template, host=r.standby_host, cpus=seen.cpus,
            memory_mb=seen.memory_mb, address=r.standby_address, prefix_len=r.prefix_len,
            gateway=r.standby_gateway))
        self.progress(f"  {r.standby_vm} runs at {r.to} ({r.standby_address}); pushing its agent")
        agent_push.install(self._guest(r.to, r.standby_vm), agent_bundle.build(), self.progress)

    def _common(self, seen: Observed) -> Common:
        gw = self.cfg.gateway.client_url
        etcd = tuple(str(u) for u in self.cfg.etcd.endpoints) if self.cfg.etcd else ()
        bin_dir = self.bin_dir
        return Common(group=self.req.group, gateway_urls=(gw,), etcd=etcd,
                      lease_s=3, replication=self.req.replication, db_user=self.req.db_user,
                      db_name=self.req.db_name, bin_dir=bin_dir)

    def _client(self, node: Node, timeout_s: float = 5.0) -> ControlClient:
        master = self._master()
        return ControlClient.for_agent(f"http://{node.address}:{node.control_port}/v1/control",
                                       master, node.vm, timeout_s=timeout_s)

    def _master(self) -> SecretStr:
        ref = self.cfg.gateway.control_secret
        if ref is None:
            raise ProtectError(f"{self.config} has no gateway.control_secret: the agents' control "
                               "API needs one; add it (a secret reference) and run again")
        return self.rt.secret(ref)

    def _start_agent(self, node: Node, peer: Node, common: Common) -> None:
        guest = self._guest(node.site, node.vm)
        agent_push.write_secrets(guest, {
            WEBHOOK_SECRET: self.rt.secret(self.cfg.gateway.webhook_secret),
            CONTROL_SECRET: SecretStr(control_secret(
                self._master().get_secret_value().encode(), node.vm).decode()),
            DB_PASSWORD: self.rt.secret(SecretRef(ref=self.req.db_password_ref))})
        import yaml

        text = yaml.safe_dump(agent_config(node, peer, common), sort_keys=False)
        if agent_push.read_file(guest, agent_push.CONFIG) == text.encode() and \
                agent_push.agent_running(guest):
            return  # a re-run: the agent runs with this very config already
        agent_push.enable_service(guest, text)

    def _wait_control(self, node: Node, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                return self._client(node).call("status")
            except Exception as exc:
                last = str(exc)
                time.sleep(0.3)
        raise ProtectError(f"the agent in {node.vm} does not answer on "
                           f"{node.address}:{node.control_port} after {timeout_s:.0f} s ({last}); "
                           f"its log: /var/lib/drflow/agent.log in {node.vm}")

    def _seed(self, seen: Observed) -> None:
        """The standby first, the primary's agent last: until a standby streams, a primary
        agent holding the lease would fence production on an etcd outage with nothing to fail
        over to. And the primary waits for its standby only once that standby streams."""
        p, s, r = seen.primary, seen.standby, self.req
        common = self._common(seen)
        sguest = self._guest(s.site, s.vm)
        home = os.path.dirname(s.datadir)
        agent_push.check(sguest, f"install -d -o postgres -g postgres -m 0700 {shlex.quote(home)}",
                         f"making {home}")
        for f in standby_identity(seen.database.settings, p, s):
            agent_push.write_file(sguest, f.path, f.text.encode(), 0o644)
            agent_push.check(sguest, f"chown postgres:postgres {shlex.quote(f.path)}",
                             f"giving {f.path} to postgres")
        self.progress(f"  {s.vm}: the agent runs as a service")
        self._start_agent(s, p, common)
        self._wait_control(s)
        db = self._db(p.address, p.port)
        view = primary_view(db)
        if view.replica(s.vm) is None:
            self.progress(f"  base backup of {_gb(seen.database.data_bytes)} from {p.vm} into "
                          f"{s.vm}")
            result = self._client(s, timeout_s=3600).call(
                "rewind_to", source_host=p.address, source_port=p.port)
            self.progress(f"  {s.vm}: {result.get('action')} in {result.get('seconds')} s")
        wait_streaming(db, s.vm, 600, caught_up=True)
        if r.replication == "sync":
            want = sync_setting([s.vm])
            if view.sync_names != want:
                if self.record.sync_before is None:
                    self.record.sync_before = view.sync_names
                    _save(self.config, r.group, self.record)
                set_sync_names.fn(db, want)
        rep, _view, _waited = wait_streaming(db, s.vm, 600, caught_up=True,
                                             sync=r.replication == "sync")
        self.progress(f"  {s.vm} streams ({rep.sync_state}), caught up")
        self.progress(f"  {p.vm}: the agent runs as a service, holding the group's lease")
        self._start_agent(p, s, common)
        self._wait_control(p)

    def _dns(self, seen: Observed) -> None:
        r, p = self.req, seen.primary
        client = self.rt.route53
        now = resolve_endpoint_or_none(client, r.zone_id, r.record)
        if now == (p.address, p.port):
            self.progress(f"  {fqdn(r.record)} already points at {p.address}:{p.port}")
            return
        if now is not None and not self.record.dns:
            raise ProtectError(f"{fqdn(r.record)} points at {now[0]}:{now[1]}, not at {p.vm} "
                               f"({p.address}:{p.port}): clients use it; choose another record "
                               "(`--dns-record`), or point it at the primary first")
        self.record.dns = True
        _save(self.config, r.group, self.record)
        point_record(client, r.zone_id, fqdn(r.record), p.address, p.port, r.ttl,
                     comment=f"drflow protect {r.group}")

    def _config(self, seen: Observed) -> None:
        r = self.req
        cfg = _load(self.config)
        if r.group not in {g.name for g in cfg.groups}:
            policy = {"auto_failover": True, "lease_s": 3}
            self.record.config = True
            _save(self.config, r.group, self.record)
            add_group(self.config, group_entry(
                group=r.group, replication=r.replication, rpo_budget_s=r.rpo_budget_s,
                db_name=r.db_name, db_user=r.db_user, db_password_ref=r.db_password_ref,
                primary=seen.primary, standby=seen.standby, zone_id=r.zone_id, record=r.record,
                ttl=r.ttl, policy=policy))
        self.progress(f"  {self.config}: group {r.group} added; waiting for the gateway to hear "
                      "both agents")
        self._wait_heard(seen)

    def _wait_heard(self, seen: Observed) -> None:
        url = f"{self.cfg.gateway.client_url}/v1/groups"
        want = {seen.primary.vm, seen.standby.vm}
        deadline = time.monotonic() + HEARD_TIMEOUT_S
        heard: set[str] = set()
        while time.monotonic() < deadline:
            try:
                g = httpx.get(url, timeout=3).json().get(self.req.group) or {}
                heard = {a["agent_id"] for a in g.get("agents", [])
                         if a.get("heartbeat_age_s") is not None and a["heartbeat_age_s"] < 3}
            except (httpx.HTTPError, ValueError):
                pass
            if want <= heard:
                return
            time.sleep(0.3)
        raise ProtectError(f"the gateway at {url} has not heard {', '.join(sorted(want - heard))} "
                           f"within {HEARD_TIMEOUT_S:.0f} s: is the orchestrator running "
                           "(`drflow up`) with this config, and can the VMs reach it?")

    def _prove(self, drill: Callable[[str], dict[str, Any]] | None) -> dict[str, Any] | None:
        if drill is None:
            self.progress("  skipped (--no-drill)")
            return None
        figures = drill(self.req.group)
        self.progress(f"  drill {figures.get('outcome')}: {figures.get('reason')}; RTO "
                      f"{figures.get('rto_s')} s")
        if figures.get("outcome") != "passed":
            raise ProtectError(f"the drill of {self.req.group} did not pass: "
                               f"{figures.get('reason')}; see `drflow drill history "
                               f"{self.req.group}`")
        return figures

    # -- undoing ----------------------------------------------------------------------------

    def rollback(self) -> list[str]:
        """Undo what the record says this protection made, newest first; what was undone."""
        r, rec, undone = self.req, self.record, []
        if rec.config and remove_group(self.config, r.group):
            undone.append(f"group {r.group} removed from {self.config}")
        rec.config = False
        _save(self.config, r.group, rec)
        if rec.dns:
            from drflow.dns import endpoint_changes

            now = resolve_endpoint_or_none(self.rt.route53, r.zone_id, r.record)
            if now is not None:
                changes = endpoint_changes(fqdn(r.record), now[0], now[1], r.ttl)
                for c in changes:
                    c["Action"] = "DELETE"
                self.rt.route53.change_resource_record_sets(
                    HostedZoneId=r.zone_id, ChangeBatch={"Changes": changes})
                undone.append(f"DNS record {fqdn(r.record)} deleted")
            rec.dns = False
            _save(self.config, r.group, rec)
        if rec.sync_before is not None:
            addr = rec.request.get("address") or self._primary_address()
            if addr:
                set_sync_names.fn(self._db(addr, r.port), rec.sync_before)
                undone.append(f"synchronous_standby_names on {r.vm} back to "
                              f"{rec.sync_before!r}")
            rec.sync_before = None
            _save(self.config, r.group, rec)
        if rec.standby_vm:
            if destroy(self.rt.vcenter(r.to), r.standby_vm):
                undone.append(f"VM {r.standby_vm} removed at {r.to}")
            rec.standby_vm = False
            _save(self.config, r.group, rec)
        if rec.primary_agent:
            self._remove_agent(r.site, r.vm)
            undone.append(f"the agent removed from {r.vm}")
            rec.primary_agent = False
        record_path(self.config, r.group).unlink(missing_ok=True)
        return undone

    def _primary_address(self) -> str | None:
        return protect_observe.primary_vm(self.rt.vcenter(self.req.site), self.req.vm).address

    def _remove_agent(self, site: str, vm: str) -> None:
        guest = self._guest(site, vm)
        agent_push.check(guest, agent_push.REMOVE, f"removing the agent from {vm}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _load(config: Path) -> DrflowConfig:
    from drflow.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        raise ProtectError(f"invalid configuration:\n{exc}") from None
