"""Bring the whole local DR lab up, report its health, and take it down without leftovers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from lab import agents as lab_agents
from lab import aws, etcd, guests, netns, postgres, procs, slack_standin, vcsim
from lab import pg_storage as storage  # `pg_storage` is up()'s parameter
from lab.labconfig import write_drflow_yaml

GROUP_NAMES = ["orders", "payments", "ledger", "inventory", "billing", "ledger2"]
DEFAULT_DIR = Path(os.environ.get("DRFLOW_LAB_DIR", "/tmp/drflow-lab"))
TEMPLATE_VM = "drflow-pg-template"  # at DR: what a standby VM is created from
PG_STORAGES = ("plain", "btrfs")


class LabError(Exception):
    """The lab cannot do what was asked; the message says what to do instead."""


Progress = Callable[[str], None]


def group_names(n: int) -> list[str]:
    return [GROUP_NAMES[i] if i < len(GROUP_NAMES) else f"group{i + 1}" for i in range(n)]


def state_path(lab_dir: Path) -> Path:
    return lab_dir / "lab.json"


def load(lab_dir: Path = DEFAULT_DIR) -> dict[str, Any]:
    """The running lab's lab.json, or LabError saying how to start one."""
    path = state_path(lab_dir)
    if not path.exists():
        raise LabError(f"no lab in {lab_dir}: start one with `drflow lab up --dir {lab_dir}`")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _pids(state: dict[str, Any]) -> list[int]:
    return [int(p) for p in state.get("processes", {}).values() if p]


def is_live(lab_dir: Path) -> bool:
    """A lab that came up completely and still has processes running."""
    try:
        state = load(lab_dir)
    except (LabError, json.JSONDecodeError):
        return False
    return bool(state.get("complete", True)) and any(procs.pid_alive(p) for p in _pids(state))


def up(
    lab_dir: Path = DEFAULT_DIR,
    groups: int = 1,
    replication: str = "sync",
    progress: Progress = print,
    agents: bool = True,
    inventory_only: list[str] | None = None,
    unprotected: list[str] | None = None,
    pg_storage: str = "plain",
) -> dict[str, Any]:
    """Build the sites' networks, then start a vcsim per site, etcd (a member per location),
    PostgreSQL pairs, moto, the Slack stand-in and a power bridge per site; write lab.json and
    drflow.yaml.

    `inventory_only`: more group names whose two VMs exist in the vCenters, with no database or
    agent in them (`NAME-prod`, `NAME-dr`): for a load generator that speaks for their agents
    (lab/agent_swarm.py). They are not in lab.json's groups nor in drflow.yaml.

    `unprotected`: names of lone databases, what `drflow protect` starts from: VM `NAME-prod`
    in prod only, its PostgreSQL primary with no standby, no agent, no DNS record, not in
    drflow.yaml (lab.json's `unprotected`). DR has a host and an address kept for its standby,
    and the template VM (`TEMPLATE_VM`) to create it from.

    `pg_storage`: `plain` keeps the data directories in the lab directory's file system;
    `btrfs` on a loop-mounted btrfs image at `<lab dir>/pg`, each a subvolume, so that a drill
    snapshots the standby instead of copying it (lab.json's `pg_storage`)."""
    if replication not in ("sync", "async"):
        raise LabError(f"--replication must be sync or async, not {replication!r}")
    if pg_storage not in PG_STORAGES:
        raise LabError(f"--pg-storage must be plain or btrfs, not {pg_storage!r}")
    if pg_storage == "btrfs" and (why := storage.available()):
        raise LabError(f"--pg-storage btrfs is not possible here: {why}. Without it drills "
                       "copy the standby with pg_basebackup: use --pg-storage plain")
    if groups < 1:
        raise LabError("--groups must be at least 1")
    if is_live(lab_dir):
        raise LabError(
            f"a lab is already running in {lab_dir}; nothing was changed. "
            f"See it with `drflow lab status --dir {lab_dir}`, or `drflow lab down --dir {lab_dir}` first."
        )
    if lab_dir.exists():
        progress(f"removing the remains of a stopped lab in {lab_dir}")
        down(lab_dir, progress=lambda _m: None)
    for orphan in netns.sweep_orphans(_is_live_or_starting, progress=lambda _m: None):
        progress(f"removed the networks of a lab that crashed ({orphan})")
    _sweep_etcd_data()
    lab_dir.mkdir(parents=True)
    lab_dir.chmod(0o755)  # PostgreSQL runs as `postgres` and must traverse it
    (lab_dir / "logs").mkdir()
    secrets_dir = lab_dir / "secrets"
    secrets_dir.mkdir(mode=0o700)

    names = group_names(groups)
    lone = list(unprotected or [])
    clash = sorted(set(lone) & set([*names, *(inventory_only or [])])) or sorted(
        {n for n in lone if lone.count(n) > 1})
    if clash:
        raise LabError(f"--unprotected {', '.join(clash)}: the name is taken (a protection group "
                       "or another --unprotected); choose another")
    t0 = time.monotonic()
    state: dict[str, Any] = {"dir": str(lab_dir), "replication": replication, "processes": {},
                             "manager_pid": os.getpid(), "complete": False,
                             "inventory_only": list(inventory_only or []),
                             "pg_storage": pg_storage}
    _write_state(lab_dir, state)  # lets `lab down` clean up even if `up` dies half-way
    try:
        if pg_storage == "btrfs":
            # Before any pair: each data directory is made as a subvolume of this file system.
            try:
                _timed(progress, f"btrfs for PostgreSQL at {lab_dir / 'pg'}",
                       storage.mount_btrfs, lab_dir / "pg")
            except storage.StorageError as e:
                raise LabError(f"--pg-storage btrfs: {e}") from e
        topo = netns.create(lab_dir, progress)
        state["network"] = topo.to_dict()
        _write_state(lab_dir, state)
        internet = netns.ensure_internet() if topo.enabled else "127.0.0.1"
        addr = _addresses(topo, [*names, *lone])
        # Every host (VM, vCenter, orchestrator, witness) its own network stack behind its
        # site's router: whatever a program binds, its packets carry its host's address.
        hosts = {(f"{name}-{site}" if name in (*names, *lone, "vcenter", "etcd") else name): (site, a)
                 for site in (*SITES, "witness") for name, a in addr[site].items()
                 if not (site == "dr" and name in lone)}  # DR's is for a standby not made yet
        prefix = {h: netns.add_host(topo, site, h, a) for h, (site, a) in hosts.items()}
        guest_password = os.urandom(12).hex()
        _write_secret(secrets_dir / "guest_password", guest_password)
        state["guest"] = {"user": guests.GUEST_USER, "password": guest_password,
                          "dirs": list(guests.GUEST_DIRS)}
        for site in SITES:
            guests.write(lab_dir, site, {vm: prefix[vm] for vm in
                                         [f"{n}-{site}" for n in [*names, *lone]] if vm in prefix},
                         guest_password)
        with ThreadPoolExecutor(max_workers=6 + groups) as pool:
            f_etcd = pool.submit(_timed, progress, "etcd", _start_etcd, lab_dir, topo, addr, prefix)
            f_vcs = {
                site: pool.submit(_timed, progress, f"vCenter {site} (vcsim, {addr[site]['vcenter']})",
                                  functools.partial(
                                      vcsim.start_vcsim, guests=guests.path(lab_dir, site),
                                      lone=lone, template=TEMPLATE_VM if site == "dr" else None),
                                  lab_dir, [*names, *(inventory_only or [])],
                                  0, 30.0, None, False,
                                  (site,), addr[site]["vcenter"], prefix[f"vcenter-{site}"],
                                  f"vcsim-{site}")
                for site in SITES
            }
            f_moto = pool.submit(_timed, progress, "moto server", aws.start_moto, lab_dir, 30.0,
                                 internet)
            f_slack = pool.submit(_timed, progress, "Slack stand-in", slack_standin.start_slack,
                                  lab_dir, 10.0, internet)
            f_pairs: dict[str, Future[Any]] = {
                n: pool.submit(
                    _timed, progress, f"PostgreSQL pair {n} ({replication})",
                    postgres.create_pair, lab_dir / "pg", n, replication == "sync", 60.0,
                    ((addr["prod"][n], tuple(prefix[f"{n}-prod"])),
                     (addr["dr"][n], tuple(prefix[f"{n}-dr"]))),
                )
                for n in names
            }
            f_lone = {n: pool.submit(_timed, progress, f"lone PostgreSQL {n}-prod (unprotected)",
                                     postgres.create_single, lab_dir / "pg", n,
                                     (addr["prod"][n], tuple(prefix[f"{n}-prod"])))
                      for n in lone}
            vcs = {site: _record(state, f"vcsim-{site}", f) for site, f in f_vcs.items()}
            moto = _record(state, "moto", f_moto)
            slack = _record(state, "slack", f_slack)
            pairs = {n: f.result() for n, f in f_pairs.items()}
            singles = {n: f.result() for n, f in f_lone.items()}
            state["etcd"] = f_etcd.result()
        state["postgres"] = {
            n: {"primary": postgres.describe(p), "standby": postgres.describe(s)}
            for n, (p, s) in pairs.items()
        }
        state["postgres_unprotected"] = {n: postgres.describe(i) for n, i in singles.items()}
        _write_state(lab_dir, state)

        db_user, db_password = postgres.client_credentials(lab_dir / "pg")
        webhook_secret = os.urandom(24).hex()
        control_secret = os.urandom(24).hex()
        vc_password = vcs["prod"]["password"]
        secret_values = {
            "drflow-lab/vcenter": json.dumps({"password": vc_password}),
            "drflow-lab/slack": json.dumps(
                {"bot_token": slack["bot_token"], "signing_secret": slack["signing_secret"]}
            ),
            "drflow-lab/gateway": json.dumps(
                {"webhook_secret": webhook_secret, "control_secret": control_secret}
            ),
            "drflow-lab/postgres": json.dumps({"password": db_password}),
        }
        _write_secret(secrets_dir / "aws_access_key_id", moto["access_key_id"])
        _write_secret(secrets_dir / "aws_secret_access_key", moto["secret_access_key"])
        _write_secret(secrets_dir / "webhook_secret", webhook_secret)
        _write_secret(secrets_dir / "control_secret", control_secret)
        _write_secret(secrets_dir / "db_password", db_password)

        dns_groups = [
            {"name": n, "primary": {"host": p.host, "port": p.port}} for n, (p, _) in pairs.items()
        ]
        aws_info = _timed(progress, "Route 53 zone, audit bucket, secrets", aws.setup_aws,
                          moto, dns_groups, secret_values)

        vcenters = {site: {"url": vc["url"], "user": vc["user"], "password": vc["password"],
                           "address": addr[site]["vcenter"],
                           "isolated_portgroup": vc.get("isolated_portgroup", "drflow-isolated")}
                    for site, vc in vcs.items()}
        vms = {**vcs["prod"]["vms"], **vcs["dr"]["vms"]}
        state.update(
            vcenters=vcenters,
            # The production site's vCenter, where the lab's power-offs of primaries go.
            vcenter=vcenters["prod"],
            aws={**{k: moto[k] for k in ("endpoint_url", "region", "access_key_id",
                                         "secret_access_key")},
                 "audit_bucket": aws_info["audit_bucket"], "secret_ids": aws_info["secret_ids"]},
            slack={"url": slack["url"], "bot_token": slack["bot_token"],
                   "signing_secret": slack["signing_secret"], "channel": slack["channel"]},
            database={"user": db_user, "password": db_password, "name": "postgres"},
            secrets={"webhook": webhook_secret, "control": control_secret},
            groups=[
                _group_entry(n, p, s, vms, aws_info) for n, (p, s) in pairs.items()
            ],
            unprotected=[_lone_entry(n, i, vms, addr["dr"][n], vcs["dr"]["hosts"])
                         for n, i in singles.items()],
            template={"vm": vcs["dr"]["template"], "datacenter": "dr"},
            # The orchestrator (gateway, Prefect, runbooks) runs at the DR site, as in production.
            orchestrator={"site": "dr", "address": addr["dr"]["orchestrator"],
                          "netns_prefix": prefix["orchestrator"]},
            witness={"site": "witness", "address": addr["witness"]["witness"]},
            internet=internet,
            gateway={"url": f"http://{addr['dr']['orchestrator']}:{procs.free_port()}"},
            # Started only by what needs it (Env.start_gateway_replica); agents fall back to it.
            gateway_replica={"url": f"http://{addr['witness']['gateway']}:{procs.free_port()}",
                             "netns_prefix": prefix["gateway"]},
        )
        services = _services(lab_dir, state, pairs, agents, prefix)
        for n, inst in singles.items():
            services[f"{n}-prod"] = [{**postgres.service_spec(inst), "netns": prefix[f"{n}-prod"]}]
        for site in SITES:
            site_services = {vm: specs for vm, specs in services.items() if vm.endswith(f"-{site}")}
            state["processes"][f"power_bridge-{site}"] = _start_bridge(
                lab_dir, site, vcenters[site], site_services, topo.exec_prefix(site))
        if topo.enabled:
            _write_state(lab_dir, state)  # what the provisioners read
            for site in SITES:
                state["processes"][f"provisioner-{site}"] = _start_provisioner(lab_dir, site)
        if agents:
            for specs in services.values():
                for spec in specs:
                    if spec["name"].startswith("agent:"):
                        state["processes"][spec["name"]] = lab_agents.start_agent(spec)
            progress(f"  {len(services)} guest agents started (they report to {state['gateway']['url']})")
        state["complete"] = True
        _write_state(lab_dir, state)
        write_drflow_yaml(lab_dir, state)
        progress(f"lab up in {time.monotonic() - t0:.1f} s: {lab_dir}/lab.json, {lab_dir}/drflow.yaml")
        return state
    except BaseException:
        progress("lab up failed; taking down what was started")
        down(lab_dir, progress=lambda _m: None)
        raise


SITES = ("prod", "dr")
ETCD_SITES = ("prod", "dr", "witness")


def _start_etcd(lab_dir: Path, topo: netns.Topology, addr: dict[str, dict[str, str]],
                prefix: dict[str, list[str]]) -> dict[str, Any]:
    """etcd as production runs it: a member per location, each in its own host (etcd-prod,
    etcd-dr, etcd-witness); on loopback a single member. Returns lab.json's `etcd`."""
    sites = ETCD_SITES if topo.enabled else ("dr",)
    members = [etcd.Member(f"etcd-{s}", addr[s]["etcd"], prefix[f"etcd-{s}"]) for s in sites]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        # Data on tmpfs, for the reason the lab's PostgreSQL runs with fsync off (lab/postgres.py):
        # lab faults kill processes, never the kernel's page cache. On this shared disk, etcd's WAL
        # creation and fsyncs took up to 2 s while the PostgreSQL pairs were being made (it was
        # 0.3 s otherwise), which also made every leader-key write wait on someone else's I/O.
        data = shm / f"drflow-etcd-{topo.lab_id}"
        data.mkdir(mode=0o700)
        (lab_dir / "etcd").symlink_to(data)
    info = etcd.start_cluster(lab_dir, members)
    by_site = {s: members[0].client_url for s in ETCD_SITES}
    if len(members) > 1:
        by_site = {s: m.client_url for s, m in zip(sites, members, strict=True)}
        # A member that becomes leader extends every lease by an election timeout (the lessor's
        # Promote). With the leader at the witness, losing prod or DR (and its member) costs no
        # election, so the lease of an agent lost with its site expires on time, not 1-3 s late.
        info["leader_moved_in_s"] = round(etcd.move_leader(info, "etcd-witness"), 2)
    return {**info, "by_site": by_site}


def _sweep_etcd_data() -> None:
    """Remove the tmpfs etcd data of labs that no longer exist (removed without `lab down`): a lab
    records its id (lab/netns.py) before it creates its data there."""
    for d in Path("/dev/shm").glob("drflow-etcd-*"):
        if not (netns.state_dir() / f"{d.name.removeprefix('drflow-etcd-')}.json").exists():
            shutil.rmtree(d, ignore_errors=True)


def _addresses(topo: netns.Topology, names: list[str]) -> dict[str, dict[str, str]]:
    """Every address of the lab: a site's vCenter, each VM, the orchestrator, the witness."""
    out: dict[str, dict[str, str]] = {}
    for site in SITES:
        out[site] = {"vcenter": topo.address(site, 10)}
        out[site].update({n: topo.address(site, 20 + i) for i, n in enumerate(names)})
    out["dr"]["orchestrator"] = topo.address("dr", 11)
    # A second gateway replica at the third location, for the cases that lose the DR site.
    out["witness"] = {"witness": topo.address("witness", 10),
                      "gateway": topo.address("witness", 11)}
    for site in ETCD_SITES:  # a member per location: etcd-prod, etcd-dr, etcd-witness
        out[site]["etcd"] = topo.address(site, 12)
    return out


def _is_live_or_starting(lab_dir: Path) -> bool:
    """A lab someone is still building counts as live: its networks are not orphans yet."""
    if is_live(lab_dir):
        return True
    try:
        pid = int(load(lab_dir).get("manager_pid") or 0)
    except (LabError, json.JSONDecodeError, ValueError):
        return False
    return bool(pid) and procs.pid_alive(pid) and pid != os.getpid()


def topology(state: dict[str, Any]) -> netns.Topology | None:
    net = state.get("network")
    return netns.Topology.from_dict(net) if net else None


def _timed(progress: Progress, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    t = time.monotonic()
    result = fn(*args)
    progress(f"  {what} ready ({time.monotonic() - t:.1f} s)")
    return result


def _record(state: dict[str, Any], name: str, fut: Future[Any]) -> Any:
    info = fut.result()
    state["processes"][name] = info["pid"]
    return info


def _group_entry(name: str, primary: postgres.Instance, standby: postgres.Instance,
                 vms: dict[str, Any], aws_info: dict[str, Any]) -> dict[str, Any]:
    def side(inst: postgres.Instance, site: str) -> dict[str, Any]:
        vm = f"{name}-{site}"
        return {"vm": vm, "datacenter": site, "esx_host": vms.get(vm, {}).get("esx_host"),
                "host": inst.host, "port": inst.port, "datadir": str(inst.datadir)}

    return {
        "name": name,
        "dns": {"zone_id": aws_info["zone_id"], "zone": aws_info["zone"],
                "record": aws_info["records"][name]},
        "primary": side(primary, "prod"),
        "standby": side(standby, "dr"),
    }


def _lone_entry(name: str, inst: postgres.Instance, vms: dict[str, Any], dr_address: str,
                dr_hosts: dict[str, list[str]]) -> dict[str, Any]:
    """lab.json's record of a lone database: its VM, and what DR keeps for its standby."""
    vm = f"{name}-prod"
    esx = vms.get(vm, {}).get("esx_host")
    # The same slot of DR's cluster as its prod host's (esx-prod-NN → esx-dr-NN).
    dr_esx = esx.replace("esx-prod-", "esx-dr-") if isinstance(esx, str) else None
    return {"name": name, "vm": vm, "datacenter": "prod", "esx_host": esx, "host": inst.host,
            "port": inst.port, "datadir": str(inst.datadir),
            "standby": {"vm": f"{name}-dr", "datacenter": "dr", "address": dr_address,
                        "esx_host": dr_esx if dr_esx in dr_hosts.get("dr", []) else None}}


def bridge_state_path(lab_dir: Path, site: str) -> Path:
    return lab_dir / f"bridge-{site}.json"


def _services(lab_dir: Path, state: dict[str, Any],
              pairs: dict[str, tuple[postgres.Instance, postgres.Instance]],
              agents: bool, prefix: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """What runs on each lab VM: its PostgreSQL instance and, with agents, its guest agent; each
    in the VM's own network (`netns`: the argv prefix that enters it)."""
    services: dict[str, list[dict[str, Any]]] = {}
    for g in state["groups"]:
        p, s = pairs[g["name"]]
        for role, inst in (("primary", p), ("standby", s)):
            node = g[role]
            services[node["vm"]] = [postgres.service_spec(inst)]
            if agents:
                # On power-on the agent decides whether PostgreSQL may start (it asks the gateway
                # first); the bridge still kills PostgreSQL on power-off.
                services[node["vm"]][0]["start"] = ["true"]
                port = procs.free_port()
                node["agent_url"] = f"http://{node['host']}:{port}"
                cfg = lab_agents.write_agent_config(lab_dir, state, g, role, port)
                services[node["vm"]].append(lab_agents.service_spec(lab_dir, node["vm"], cfg))
            for spec in services[node["vm"]]:
                spec["netns"] = prefix[node["vm"]]
    return services


def _start_bridge(lab_dir: Path, site: str, vcenter: dict[str, Any],
                  services: dict[str, list[dict[str, Any]]], prefix: list[str]) -> int:
    """The site's hypervisors: a power bridge in the site's network, watching its vCenter."""
    write_bridge_services(lab_dir, site, vcenter, services)
    log = lab_dir / "logs" / f"power_bridge-{site}.log"
    proc = procs.spawn([*prefix, sys.executable, "-m", "lab.power_bridge", "--state",
                        str(bridge_state_path(lab_dir, site))], log)
    _wait_log(log, "watching", 15.0, proc)
    return proc.pid


def _start_provisioner(lab_dir: Path, site: str) -> int:
    """The site's cabling for VMs created later (lab/provisioner.py). In the root namespace: a
    namespace made under `ip netns exec` is mounted in that command's private mount namespace
    only, and is unusable outside it."""
    log = lab_dir / "logs" / f"provisioner-{site}.log"
    proc = procs.spawn([sys.executable, "-m", "lab.provisioner",
                        "--lab", str(lab_dir), "--site", site], log)
    _wait_log(log, "provisioning new VMs", 15.0, proc)
    return proc.pid


def write_bridge_services(lab_dir: Path, site: str, vcenter: dict[str, Any],
                          services: dict[str, list[dict[str, Any]]]) -> None:
    """(Re)write what a site's power bridge binds to each VM; it re-reads the file on change."""
    path = bridge_state_path(lab_dir, site)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"vcenter": {k: vcenter[k] for k in ("url", "user", "password")},
                               "services": services}, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


def _wait_log(log: Path, needle: str, timeout: float, proc: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise LabError(f"{log.stem} exited early; see {log}:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise LabError(f"{log.stem} did not start within {timeout:.0f} s; see {log}")


def _write_secret(path: Path, value: str) -> None:
    path.write_text(value)
    path.chmod(0o600)


def save(lab_dir: Path, state: dict[str, Any]) -> None:
    """Write lab.json again (faults that restart a part record its new pid)."""
    _write_state(lab_dir, state)


def _write_state(lab_dir: Path, state: dict[str, Any]) -> None:
    path = state_path(lab_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.chmod(0o600)  # holds the lab's throwaway credentials
    tmp.replace(path)


def status(lab_dir: Path = DEFAULT_DIR) -> list[tuple[str, bool, str]]:
    """(part, healthy, detail) for every part of the lab."""
    state = load(lab_dir)
    rows: list[tuple[str, bool, str]] = []
    pids = state.get("processes", {})
    topo = topology(state)
    if topo is not None:
        rows.append(("networks", True, _network_detail(topo)))
    for site, vc in (state.get("vcenters") or {}).items():
        rows.append((f"vCenter {site} (vcsim)", *vcsim.health({**vc, "pid": pids.get(f"vcsim-{site}")})))
    if not state.get("vcenters"):
        rows.append(("vcsim", False, "not started"))
    if state.get("etcd"):
        n = len(state["etcd"].get("members") or [])
        rows.append((f"etcd ({n} member{'s' if n != 1 else ''})", *etcd.health(state["etcd"])))
    rows.append(("moto (Route 53, S3, Secrets Manager)",
                 *aws.health({**state.get("aws", {}), "pid": pids.get("moto")})))
    rows.append(("Slack stand-in", *slack_standin.health({**state.get("slack", {}),
                                                          "pid": pids.get("slack")})))
    for name, bridge in pids.items():
        if name.startswith("power_bridge"):
            alive = bool(bridge and procs.pid_alive(bridge))
            rows.append((name.replace("_", " "), alive, f"pid {bridge}" if alive else "not running"))
    for name, pair in state.get("postgres", {}).items():
        for role in ("primary", "standby"):
            inst = postgres.Instance.from_dict(pair[role])
            ok, detail = postgres.health(inst)
            rows.append((f"{name} {role} {inst.host}:{inst.port}", ok, detail))
    for name, single in state.get("postgres_unprotected", {}).items():
        inst = postgres.Instance.from_dict(single)
        ok, detail = postgres.health(inst)
        rows.append((f"{name} unprotected {inst.host}:{inst.port}", ok, detail))
    return rows


def _network_detail(topo: netns.Topology) -> str:
    if not topo.enabled:
        return "loopback layout (no namespaces): host-loss, blackhole, partition, cut, site-loss unavailable"
    faults = netns.faults(topo)
    active = ", ".join(" ".join(str(v) for v in f.values()) for f in faults) or "no network fault"
    return f"lab {topo.lab_id}: sites {', '.join(topo.netns(s) for s in ('prod', 'dr', 'witness'))}; {active}"


def down(lab_dir: Path = DEFAULT_DIR, progress: Progress = print) -> None:
    """Stop every lab process and remove the lab directory. Safe to repeat."""
    if not lab_dir.exists():
        progress(f"no lab in {lab_dir}; nothing to do")
        return
    try:
        state = load(lab_dir)
    except (LabError, json.JSONDecodeError):
        state = {}
    pids = state.get("processes", {})
    # The bridges first, or they would restart what we stop; stopped, not killed: a frozen
    # (stunned) process only dies once it runs again.
    bridges = [k for k in pids if k.startswith("power_bridge")]
    for name in (*bridges, *[k for k in pids if k not in bridges]):
        pid = pids.get(name)
        if pid:
            procs.stop_tree(int(pid), timeout=3)
    etcd.stop_cluster(state.get("etcd") or {})
    for pair in state.get("postgres", {}).values():
        for role in ("primary", "standby"):
            postgres.kill_hard(postgres.Instance.from_dict(pair[role]))
    for single in state.get("postgres_unprotected", {}).values():
        postgres.kill_hard(postgres.Instance.from_dict(single))
    _kill_strays(lab_dir)
    # After every PostgreSQL (and drill clone) is gone; by the mount table, not lab.json, so
    # that the btrfs of a lab whose lab.json is lost is unmounted too.
    try:
        storage.unmount(lab_dir / "pg")
    except storage.StorageError as e:
        progress(f"warning: {e}; see `grep {lab_dir / 'pg'} /proc/self/mounts`")
    if (lab_dir / "etcd").is_symlink():  # its data on tmpfs (_start_etcd)
        shutil.rmtree((lab_dir / "etcd").resolve(), ignore_errors=True)
    topo = topology(state)
    if topo is not None:
        netns.destroy(topo)
    # Networks whose lab never recorded them (a manager killed while building them).
    netns.sweep_orphans(_is_live_or_starting, progress=lambda _m: None)
    _remove_dir(lab_dir)
    progress(f"lab in {lab_dir} is down")


def _kill_strays(lab_dir: Path) -> None:
    """Anything still running from inside the lab directory (agents, extra instances, clones)."""
    marker = str(lab_dir)
    victims = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and (marker + "/" in cmd + "/" or
                                         (p.info["cwd"] or "").startswith(marker)):
                victims.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=3)


def _remove_dir(lab_dir: Path) -> None:
    shutil.rmtree(lab_dir, ignore_errors=True)
