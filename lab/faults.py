"""Faults the lab can inject, as a datacenter has them: each is logged with the instant it took
effect (`<lab>/faults.jsonl`), so benchmarks measure from that instant.

- power-off VM      vSphere powers the VM off (the clean case): its processes die.
- guest-crash VM    the VM's processes die; the host is fine, vCenter shows it on and connected.
- host-loss VM      its processes die and its address goes silent (packets dropped); its vCenter
                    shows it on/connected until --not-responding-after, then the host
                    notResponding and the VM disconnected; power operations never succeed.
                    --ha-restart-after S: vSphere HA powers it on again on the spare host.
- mgmt-loss VM      only the host's management link: vCenter as for host-loss, the VM keeps
                    running and serving.
- stun VM SECONDS   every process of the VM frozen (SIGSTOP) for that long, then resumed; with
                    --task snapshot|vmotion the site's vCenter shows that task running meanwhile.
- blackhole VM      the VM's address goes silent while its processes run (NIC or switch port).
- partition SITE    the site is cut from every other location and the outside, both ways.
- cut SITE SITE     only the link between two locations (prod, dr, witness, internet).
- site-loss SITE    every process of the site dies (VMs, its vCenter, its etcd member, whatever
                    else runs there) and its addresses go silent.
- agent-cut VM      the VM's guest agent alone loses the network (its connects time out, its
                    control port is silent); PostgreSQL and replication carry on.
- etcd-down SITE|all  that etcd member (or every one) dies (SIGKILL); with --hang it freezes
                    instead (SIGSTOP): connects still complete, nothing answers.
The witness location down: `partition witness` (its etcd member cut off, running) or
`site-loss witness` (dead).
`heal` undoes blackholes, partitions, cuts and agent cuts, restarts downed etcd members with their
data (or resumes frozen ones), and gives lost hosts back to vCenter (their VMs then show powered
off: they lost power).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lab import etcd, manager, netns, vcsim

KINDS = ("power-off", "guest-crash", "host-loss", "mgmt-loss", "stun", "blackhole", "partition",
         "cut", "site-loss", "agent-cut", "etcd-down")
VM_KINDS = ("power-off", "guest-crash", "host-loss", "mgmt-loss", "stun", "blackhole", "agent-cut")
NEEDS_NETWORK = ("host-loss", "blackhole", "partition", "cut", "site-loss", "agent-cut")
LOCATIONS = ("prod", "dr", "witness", "internet")
Progress = Callable[[str], None]


class FaultError(Exception):
    """The fault cannot be injected; the message says why and what to do."""


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # time.time() when it took effect
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lab:
    """What the fault code needs of a running lab."""

    dir: Path
    state: dict[str, Any]

    @classmethod
    def load(cls, lab_dir: Path) -> Lab:
        return cls(lab_dir, manager.load(lab_dir))

    @property
    def topo(self) -> netns.Topology:
        topo = manager.topology(self.state)
        if topo is None:
            raise FaultError(f"the lab in {self.dir} has no network description; recreate it")
        return topo

    def node(self, vm: str) -> dict[str, Any]:
        for g in self.state.get("groups", []):
            for role in ("primary", "standby"):
                if g[role]["vm"] == vm:
                    return dict(g[role])
        for lone in self.state.get("unprotected", []):
            if lone["vm"] == vm:
                return dict(lone)
        known = sorted([*(g[r]["vm"] for g in self.state.get("groups", [])
                          for r in ("primary", "standby")),
                        *(lone["vm"] for lone in self.state.get("unprotected", []))])
        raise FaultError(f"no lab VM named {vm!r}; the lab's VMs: {', '.join(known)}")

    def site_of(self, vm: str) -> str:
        return str(self.node(vm)["datacenter"])

    def vcenter(self, site: str) -> dict[str, Any]:
        return dict(self.state["vcenters"][site])

    def services(self, vm: str) -> list[dict[str, Any]]:
        path = manager.bridge_state_path(self.dir, self.site_of(vm))
        data = json.loads(path.read_text())
        return list(data.get("services", {}).get(vm, []))

    def vm_processes(self, vm: str) -> list[psutil.Process]:
        """Every running process of the VM: its services' process trees, and whatever else
        runs in its network namespace (programs started through guest operations)."""
        from lab.power_bridge import running_pid

        found: dict[int, psutil.Process] = {}
        for svc in self.services(vm):
            pid = running_pid(Path(svc["pidfile"]))
            if pid is None:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(pid)
                found |= {p.pid: p for p in [root, *root.children(recursive=True)]}
        for pid in netns.host_processes(self.topo, vm) if "network" in self.state else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                found.setdefault(pid, psutil.Process(pid))
        return list(found.values())

    def log(self, fault: Fault) -> Fault:
        with open(self.dir / "faults.jsonl", "a") as f:
            f.write(json.dumps(asdict(fault)) + "\n")
        return fault

    def active(self) -> list[dict[str, Any]]:
        path = self.dir / "faults-active.json"
        return list(json.loads(path.read_text())) if path.exists() else []

    def set_active(self, faults: list[dict[str, Any]]) -> None:
        path = self.dir / "faults-active.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(faults))
        tmp.replace(path)


def _kill(ps: list[psutil.Process]) -> None:
    for p in ps:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(ps, timeout=5)


def _signal(ps: list[psutil.Process], sig: int) -> None:
    for p in ps:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def fail(lab_dir: Path, kind: str, target: str, *, other: str | None = None,
         seconds: float | None = None, task: str = "none", not_responding_after: float = 60.0,
         ha_restart_after: float | None = None, background: bool = False, hang: bool = False,
         progress: Progress = lambda _m: None) -> Fault:
    """Inject one fault now; returns it with the instant it took effect.

    `stun` blocks for `seconds` unless `background`; `--ha-restart-after` always runs in a
    background thread of this process (the command line waits for it)."""
    if kind not in KINDS:
        raise FaultError(f"unknown fault {kind!r}; one of: {', '.join(KINDS)}")
    lab = Lab.load(lab_dir)
    if kind in NEEDS_NETWORK and not lab.topo.enabled:
        raise FaultError(f"{kind} needs packet drops, which this lab cannot make: it runs on "
                         "loopback (not root, or DRFLOW_LAB_NETNS=off)")
    if kind in VM_KINDS:
        lab.node(target)
    elif kind in ("partition", "site-loss") and target not in ("prod", "dr", "witness"):
        raise FaultError(f"{kind} takes a site: prod, dr or witness, not {target!r}")
    if kind == "etcd-down" and target not in ("prod", "dr", "witness", "all"):
        raise FaultError(f"etcd-down takes a site (prod, dr, witness) or all, not {target!r}")
    if kind == "cut" and (target not in LOCATIONS or other not in LOCATIONS or target == other):
        raise FaultError(f"cut takes two different locations of {', '.join(LOCATIONS)}")
    if kind == "stun" and (seconds is None or seconds <= 0):
        raise FaultError("stun needs SECONDS > 0")
    if task not in ("none", "snapshot", "vmotion"):
        raise FaultError(f"--task must be snapshot, vmotion or none, not {task!r}")
    fault = _ACTIONS[kind](lab, target, other=other, seconds=seconds, task=task,
                           not_responding_after=not_responding_after,
                           ha_restart_after=ha_restart_after, background=background,
                           hang=hang, progress=progress)
    return lab.log(fault)


def heal(lab_dir: Path, progress: Progress = lambda _m: None) -> Fault:
    """Undo network faults and give lost hosts back; a lost site stays lost (its processes died)."""
    lab = Lab.load(lab_dir)
    lost_sites = []
    at = time.time()
    if lab.topo.enabled:
        at = netns.heal(lab.topo)
    for f in lab.active():
        if f["kind"] == "agent-cut":
            netns.agent_uncut(lab.topo, f["target"])
        elif f["kind"] == "etcd-down":
            lost = [x["target"] for x in lab.active() if x["kind"] == "site-loss"]
            _etcd_up(lab, f["target"], bool(f.get("hang")), lost, progress)
        elif f["kind"] == "site-loss":
            lost_sites.append(f["target"])
            netns.partition(lab.topo, f["target"])
        elif f["kind"] in ("host-loss", "mgmt-loss"):
            url = lab.vcenter(lab.site_of(f["target"]))["url"]
            vcsim.host_restore(url, f["target"])
            if f["kind"] == "host-loss":
                # Its processes died with the host: it comes back powered off.
                _power_off_quietly(lab, f["target"])
            progress(f"host of {f['target']} back in vCenter")
    lab.set_active([f for f in lab.active() if f["kind"] == "site-loss"])
    return lab.log(Fault("heal", "all", at, {"still_lost_sites": lost_sites}))


def _power_off_quietly(lab: Lab, vm: str) -> None:
    with contextlib.suppress(Exception):
        _power_off(lab, vm)


def _remember(lab: Lab, kind: str, target: str, **extra: Any) -> None:
    lab.set_active([*lab.active(), {"kind": kind, "target": target, **extra}])


def _power_off(lab: Lab, vm: str, **_: Any) -> Fault:
    vc = lab.vcenter(lab.site_of(vm))
    si = vcsim.connect(vc["url"], vc["user"], vc["password"])
    try:
        vcsim.power_off(si, vm)
    finally:
        vcsim.disconnect(si)
    return Fault("power-off", vm, time.time())


def _guest_crash(lab: Lab, vm: str, **_: Any) -> Fault:
    ps = lab.vm_processes(vm)
    at = time.time()  # the kill is the fault; reaping the dead (up to seconds) is not
    _kill(ps)
    return Fault("guest-crash", vm, at, {"killed": len(ps)})


def _host_loss(lab: Lab, vm: str, *, not_responding_after: float, ha_restart_after: float | None,
               progress: Progress, mgmt_only: bool = False, **_: Any) -> Fault:
    url = lab.vcenter(lab.site_of(vm))["url"]
    killed = 0
    if not mgmt_only:
        address = lab.node(vm)["host"]
        netns.blackhole(lab.topo, address)  # silent first: no refusal ever escapes
        at = time.time()  # silent from here: the kill and its reaping come after
        ps = lab.vm_processes(vm)
        _kill(ps)
        killed = len(ps)
    else:
        at = time.time()
    vcsim.host_loss(url, vm, not_responding_after, mgmt_only=mgmt_only)
    kind = "mgmt-loss" if mgmt_only else "host-loss"
    _remember(lab, kind, vm)
    if ha_restart_after is not None and not mgmt_only:
        # Counted from when the host is truly dead (its processes reaped), not from the silence.
        t = threading.Thread(target=_ha_restart, args=(lab, vm, time.time() + ha_restart_after,
                                                       progress),
                             name=f"ha-restart-{vm}", daemon=False)
        t.start()
    return Fault(kind, vm, at, {"killed": killed, "not_responding_after": not_responding_after,
                                "ha_restart_after": ha_restart_after})


def _ha_restart(lab: Lab, vm: str, when: float, progress: Progress) -> None:
    time.sleep(max(0.0, when - time.time()))
    netns.unblackhole(lab.topo, lab.node(vm)["host"])
    at = vcsim.host_restore(lab.vcenter(lab.site_of(vm))["url"], vm, ha=True)
    lab.set_active([f for f in lab.active() if not (f["kind"] == "host-loss" and f["target"] == vm)])
    lab.log(Fault("ha-restart", vm, at))
    progress(f"vSphere HA restarted {vm} on its site's spare host")


def _mgmt_loss(lab: Lab, vm: str, **kw: Any) -> Fault:
    return _host_loss(lab, vm, mgmt_only=True, **kw)


def _stun(lab: Lab, vm: str, *, seconds: float, task: str, background: bool, **_: Any) -> Fault:
    detail: dict[str, Any] = {"seconds": seconds, "task": task}
    if task != "none":
        detail["vcenter_task"] = vcsim.stun_task(lab.vcenter(lab.site_of(vm))["url"], vm, task,
                                                 seconds)
    ps = lab.vm_processes(vm)
    _signal(ps, signal.SIGSTOP)
    at = time.time()
    detail["frozen"] = len(ps)

    def resume() -> None:
        time.sleep(max(0.0, at + seconds - time.time()))
        _signal(ps, signal.SIGCONT)
        lab.log(Fault("stun-end", vm, time.time(), {"frozen_for": time.time() - at}))

    if background:
        threading.Thread(target=resume, name=f"stun-{vm}", daemon=False).start()
    else:
        resume()
    return Fault("stun", vm, at, detail)


def _blackhole(lab: Lab, vm: str, **_: Any) -> Fault:
    at = netns.blackhole(lab.topo, lab.node(vm)["host"])
    _remember(lab, "blackhole", vm)
    return Fault("blackhole", vm, at)


def _partition(lab: Lab, site: str, **_: Any) -> Fault:
    at = netns.partition(lab.topo, site)
    _remember(lab, "partition", site)
    return Fault("partition", site, at)


def _cut(lab: Lab, a: str, *, other: str, **_: Any) -> Fault:
    at = netns.cut(lab.topo, a, other)
    _remember(lab, "cut", f"{a}:{other}")
    return Fault("cut", a, at, {"other": other})


def _site_loss(lab: Lab, site: str, **_: Any) -> Fault:
    topo = lab.topo
    netns.partition(topo, site)  # its addresses go silent at once
    at = time.time()  # the fault; killing and reaping its processes take seconds after it
    pids = netns.processes_in(topo, site)
    ps = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            ps.append(psutil.Process(pid))
    # Children that run elsewhere (none should) are the site's too.
    _kill([p for p in ps if p.pid != os.getpid()])
    _remember(lab, "site-loss", site)
    return Fault("site-loss", site, at, {"killed": len(ps)})


def _agent_cut(lab: Lab, vm: str, **_: Any) -> Fault:
    url = lab.node(vm).get("agent_url")
    port = int(url.rsplit(":", 1)[1]) if url else None
    at = netns.agent_cut(lab.topo, vm, port)
    _remember(lab, "agent-cut", vm)
    return Fault("agent-cut", vm, at, {"control_port": port})


def _etcd_members(lab: Lab, target: str) -> list[dict[str, Any]]:
    """The members a site names (on loopback the single member stands for every site)."""
    info = lab.state.get("etcd") or {}
    if not info.get("members"):
        raise FaultError(f"the lab in {lab.dir} runs no etcd; recreate it with `drflow lab up`")
    urls = set(info["by_site"].values()) if target == "all" else {info["by_site"][target]}
    return [m for m in info["members"] if m["client_url"] in urls]


def _etcd_down(lab: Lab, target: str, *, hang: bool, **_: Any) -> Fault:
    # SIGKILL by default: a dead member's port refuses (or, with its host, goes silent), clients
    # move on to the next endpoint at once. --hang (SIGSTOP) is the nastier case: the kernel still
    # completes connects, nothing answers, and only a client's timeout gets it out.
    members = _etcd_members(lab, target)
    ps = []
    for m in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(int(m["pid"]))
            if p.name() == "etcd":
                ps.append(p)
    if hang:
        _signal(ps, signal.SIGSTOP)
    else:
        _kill(ps)
    at = time.time()
    _remember(lab, "etcd-down", target, hang=hang)
    return Fault("etcd-down", target, at, {"members": [m["name"] for m in members],
                                           "signal": "SIGSTOP" if hang else "SIGKILL"})


def _etcd_up(lab: Lab, target: str, hang: bool, lost_sites: list[str],
             progress: Progress) -> None:
    """Resume frozen members, or start killed ones again with their data; a member of a lost
    site stays down with it."""
    info = lab.state["etcd"]
    lost = {info["by_site"][s] for s in lost_sites if s in info["by_site"]}
    restarted: list[dict[str, Any]] = []
    for m in _etcd_members(lab, target):
        if m["client_url"] in lost and len(info["members"]) > 1:
            continue
        if hang:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(m["pid"])).send_signal(signal.SIGCONT)
            continue
        new = etcd.restart_member(m)
        restarted.append(new)
        info["members"] = [new if x["name"] == m["name"] else x for x in info["members"]]
        progress(f"etcd member {m['name']} started again with its data (pid {new['pid']})")
    manager.save(lab.dir, lab.state)
    # Each member was only waited for until it listened (alone it has no quorum): now the
    # restarted ones must serve again, with a leader.
    deadline = time.monotonic() + 20
    while restarted and not all(etcd.member_health(m["client_url"], 0.5)[0] for m in restarted):
        if time.monotonic() > deadline:
            raise FaultError("etcd did not serve again within 20 s of restarting "
                             f"{', '.join(m['name'] for m in restarted)}: see their logs")
        time.sleep(0.1)


_ACTIONS: dict[str, Callable[..., Fault]] = {
    "power-off": _power_off, "guest-crash": _guest_crash, "host-loss": _host_loss,
    "mgmt-loss": _mgmt_loss, "stun": _stun, "blackhole": _blackhole, "partition": _partition,
    "cut": _cut, "site-loss": _site_loss, "agent-cut": _agent_cut, "etcd-down": _etcd_down,
}


def wait_ha_restarts() -> None:
    """Wait for this process's pending HA restarts and stun ends (the command line does)."""
    for t in threading.enumerate():
        if t.name.startswith(("ha-restart-", "stun-")):
            t.join()

