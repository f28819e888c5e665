"""The lab's networks: a namespace per site behind a core router, a namespace per host inside its
site, and the faults that drop packets.

One lab = one topology (id, slot) that owns 198.18.0.0/15 + slot*1024 (a /22); see the plan in the
lab docs. Each host (a VM, a vCenter, the orchestrator) gets its own namespace `drfl-<id>-h-<name>`
joined to its site's namespace by a veth pair (`dfl<id>h<i><nnn>` on the site side, `dfl<id>v<i><nnn>`
on the host side, i = site index, nnn = the address's last octet). The host has its address as a
/32 and routes to the lab's /22 and the internet address via the site's core-link address (onlink:
the site answers ARP for any of its own addresses); the site routes the /32 onto the veth and
forwards (ip_forward=1 in the site only). So every packet of a host crosses its site's router,
whatever the program binds: an unbound client gets the host's address as source, as on a VM.

Faults are nftables set elements matched on the forward and input hooks of a site namespace and on
the forward hook of core, plus, for a blackholed host, an input drop inside the host's own namespace
(what the site router itself sends never crosses its forward hook), so packets vanish (connects time
out) instead of being refused. Nothing is dropped on an output hook: that fails the sender at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

LOCATIONS = ("prod", "dr", "witness")
INTERNET_ADDRESS = "198.19.255.254"
# What cannot be produced on loopback: each needs packets dropped between network stacks.
PACKET_FAULTS = ("host-loss", "blackhole", "partition", "cut", "site-loss", "agent-cut")

_BASE = int(ipaddress.IPv4Address("198.18.0.0"))
_SLOTS = 127  # slot 127 (198.19.252.0/22) holds the shared internet address
_LAB_SPACE = ipaddress.IPv4Network("198.18.0.0/15")
_NETNS_DIR = Path("/run/netns")
_TAG = {"prod": "p", "dr": "d", "witness": "w", "internet": "r"}  # one letter per link end
_LINK_INDEX = {"internet": 0, "prod": 1, "dr": 2, "witness": 3}  # /30 number inside B+3.0/24
_TABLE = "inet drflow"
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(Exception):
    """A lab network could not be built, changed or removed; the message says what to do."""


@dataclass(frozen=True)
class Topology:
    """Names and addresses of one lab's networks (pure: nothing here touches the system)."""

    lab_id: str
    slot: int
    enabled: bool

    def netns(self, location: str) -> str:
        """`drfl-<id>-<location>` (also "core"); "" when the lab runs on loopback."""
        if location not in (*LOCATIONS, "core"):
            raise ValueError(f"unknown location {location!r}: one of {', '.join(LOCATIONS)}, core")
        return f"drfl-{self.lab_id}-{location}" if self.enabled else ""

    def subnet(self, location: str) -> str:
        return f"{self._host(location, 0)}/24"

    def address(self, location: str, n: int) -> str:
        """The n-th host address of a location (VMs and services from .10 up)."""
        if not 10 <= n <= 254:
            raise ValueError(f"host number {n} out of range 10..254")
        return self._host(location, n)

    @property
    def internet_address(self) -> str:
        return INTERNET_ADDRESS if self.enabled else "127.0.0.1"

    def exec_prefix(self, location: str) -> list[str]:
        """argv prefix that runs a program inside the location's namespace ([] on loopback)."""
        return ["ip", "netns", "exec", self.netns(location)] if self.enabled else []

    def location_of(self, address: str) -> str | None:
        """Which site of this lab an address belongs to, if any."""
        addr = ipaddress.IPv4Address(address)
        for loc in LOCATIONS:
            if addr in ipaddress.IPv4Network(self.subnet(loc)):
                return loc
        return None

    @property
    def block(self) -> str:
        """The lab's /22 (routes into the lab); loopback labs have none."""
        return f"{ipaddress.IPv4Address(_BASE + self.slot * 1024)}/22"

    def link(self, near: str, far: str) -> str:
        """Name of the veth end in `near` that leads to `far` (one of them is "core")."""
        return f"dfl{self.lab_id}{_TAG.get(near, 'c')}{_TAG.get(far, 'c')}"

    def link_address(self, location: str, core_side: bool) -> str:
        """Address on the /30 between core and a location ("internet" = the root namespace)."""
        k = _LINK_INDEX[location]
        # The root link is numbered root .1, core .2; the site links core .4k+1, site .4k+2.
        offset = (2 if core_side else 1) if location == "internet" else (1 if core_side else 2)
        return str(ipaddress.IPv4Address(_BASE + self.slot * 1024 + 3 * 256 + 4 * k + offset))

    def host_netns(self, name: str) -> str:
        """`drfl-<id>-h-<name>` for a host (name sanitised); "" when the lab runs on loopback."""
        return f"drfl-{self.lab_id}-h-{host_name(name)}" if self.enabled else ""

    def host_link(self, address: str, host_side: bool) -> str:
        """Name of a host's veth end: `dfl<id>h<i><nnn>` in the site, `dfl<id>v<i><nnn>` in the host."""
        loc = self.location_of(address)
        if loc is None:
            raise ValueError(f"{address} is in none of lab {self.lab_id}'s sites")
        n = int(ipaddress.IPv4Address(address)) - int(ipaddress.IPv4Network(self.subnet(loc)).network_address)
        return f"dfl{self.lab_id}{'v' if host_side else 'h'}{LOCATIONS.index(loc)}{n:03d}"

    def to_dict(self) -> dict[str, Any]:
        return {"lab_id": self.lab_id, "slot": self.slot, "enabled": self.enabled}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        return cls(lab_id=str(d["lab_id"]), slot=int(d["slot"]), enabled=bool(d["enabled"]))

    def _host(self, location: str, n: int) -> str:
        if location not in LOCATIONS:
            raise ValueError(f"unknown location {location!r}: one of {', '.join(LOCATIONS)}")
        i = LOCATIONS.index(location)
        if not self.enabled:  # all of 127/8 is local on Linux
            return f"127.{100 + i}.{self.slot}.{n}"
        return str(ipaddress.IPv4Address(_BASE + self.slot * 1024 + i * 256 + n))


def host_name(name: str) -> str:
    """A host name fit for a namespace name: lower case letters, digits and dashes, 40 at most."""
    clean = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    if not clean:
        raise ValueError(f"host name {name!r} has no letter or digit")
    return clean


# --- what the process may do ---------------------------------------------------------------------

def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin:/usr/bin")


def _can_manage() -> tuple[bool, str]:
    """Root with the tools and capabilities to build namespaces (whatever DRFLOW_LAB_NETNS says)."""
    if os.geteuid() != 0:
        return False, "not running as root"
    for name, package in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if _tool(name) is None:
            return False, f"`{name}` is not installed (apt-get install {package})"
    try:
        status = Path("/proc/self/status").read_text()
        cap_eff = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        return False, "cannot read this process's capabilities"
    for bit, cap in ((12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN")):
        if not cap_eff >> bit & 1:
            return False, f"root without {cap} (a container?)"
    return True, ""


def available() -> tuple[bool, str]:
    """Can this process build the lab's namespaces? When not, the reason."""
    if os.environ.get("DRFLOW_LAB_NETNS", "").strip().lower() == "off":
        return False, "DRFLOW_LAB_NETNS=off"
    return _can_manage()


# --- commands ------------------------------------------------------------------------------------

def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    path = _tool(argv[0]) or argv[0]
    proc = subprocess.run([path, *argv[1:]], input=stdin, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        what = " ".join(argv) + (f" <<{stdin.strip()[:300]!r}" if stdin else "")
        raise NetnsError(f"`{what}` failed (exit {proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc


def _ip_batch(commands: list[str], ns: str = "", force: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *(["-force"] if force else []), "-batch", "-"]
    proc = _run(argv, "\n".join(commands) + "\n", check=False)
    if proc.returncode != 0 and not force:
        line = proc.stderr.rsplit("Command failed -:", 1)[-1].strip()
        cmd = commands[int(line) - 1] if line.isdigit() and 0 < int(line) <= len(commands) else "?"
        raise NetnsError(f"`ip {'-n ' + ns + ' ' if ns else ''}{cmd}` failed: "
                         f"{proc.stderr.split('Command failed')[0].strip()[:300]}")
    return proc


def _nft(ns: str, script: str, sysctl_forward: bool = False) -> str:
    """Run an nft script inside a namespace (nsenter: no mount namespace to set up, unlike ip netns exec)."""
    nft = _tool("nft") or "nft"
    if sysctl_forward:  # /proc/sys/net follows the writer's network namespace
        argv = ["nsenter", f"--net={_NETNS_DIR / ns}", "sh", "-c",
                f"echo 1 > /proc/sys/net/ipv4/ip_forward && exec {nft} -f -"]
    else:
        argv = ["nsenter", f"--net={_NETNS_DIR / ns}", nft, "-f", "-"]
    return _run(argv, script).stdout


# --- state: records and locks --------------------------------------------------------------------

def state_dir() -> Path:
    """Where topology records and locks live (tmpfs /run for root: gone after a reboot, as namespaces)."""
    if os.geteuid() == 0:
        return Path("/run/drflow-lab")
    return Path(tempfile.gettempdir()) / f"drflow-lab-{os.geteuid()}"


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """flock (not lockf): it also excludes other threads of this process that open the file."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _global_lock() -> contextlib.AbstractContextManager[bool]:
    return _flock(state_dir() / ".lock")


def _records() -> list[dict[str, Any]]:
    out = []
    d = state_dir()
    if not d.is_dir():
        return []
    for f in sorted(d.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
            out.append({**rec, "id": f.stem})
        except (OSError, ValueError):
            continue  # removed meanwhile
    return out


def _write_record(topo: Topology, lab_dir: Path) -> None:
    rec = {"lab_dir": str(lab_dir), "slot": topo.slot, "pid": os.getpid(), "created": time.time(),
           "enabled": topo.enabled}
    path = state_dir() / f"{topo.lab_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(path)  # never a half-written record


def _root_slots() -> set[int]:
    """Slots whose /22 has a route in the root namespace (a lab nobody recorded still owns it)."""
    out = _run(["ip", "-j", "-4", "route", "show", "root", str(_LAB_SPACE)]).stdout
    slots = set()
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        with contextlib.suppress(ValueError):
            slots.add((int(ipaddress.IPv4Network(dst, strict=False).network_address) - _BASE) // 1024)
    return slots


def _existing_ids() -> set[str]:
    ids = set()
    if _NETNS_DIR.is_dir():
        ids |= {n.split("-")[1] for n in os.listdir(_NETNS_DIR)
                if n.startswith("drfl-") and n.count("-") >= 2}
    ids |= {n[3:7] for n in os.listdir("/sys/class/net") if n.startswith("dfl")}
    return ids


# --- build and remove ----------------------------------------------------------------------------

def create(lab_dir: Path, progress: Callable[[str], None] = print) -> Topology:
    """Allocate a slot and id, record them, then build namespaces, links, routes and empty fault sets."""
    ok, reason = available()
    with contextlib.ExitStack() as stack:
        with _global_lock():
            records = _records()
            used = {int(r["slot"]) for r in records} | (_root_slots() if ok else set())
            free = [s for s in range(_SLOTS) if s not in used]
            if not free:
                raise NetnsError(f"all {_SLOTS} lab network slots are taken: run `drflow lab down` on "
                                 f"labs no longer needed (records in {state_dir()})")
            taken = {str(r["id"]) for r in records} | (_existing_ids() if ok else set())
            lab_id = next(i for i in iter(lambda: secrets.token_hex(2), "") if i not in taken)
            topo = Topology(lab_id, free[0], ok)
            # Held until built: sweep_orphans leaves a lab under construction alone.
            stack.enter_context(_flock(state_dir() / f"{lab_id}.lock"))
            _write_record(topo, lab_dir)
        if not ok:
            progress(f"lab network: loopback only ({reason}); addresses 127.100-102.{topo.slot}.x; "
                     f"these faults cannot be produced: {', '.join(PACKET_FAULTS)}")
            return topo
        try:
            _build(topo)
        except (NetnsError, OSError, subprocess.SubprocessError) as e:
            try:
                destroy(topo)
                left = "nothing of it is left"
            except (NetnsError, OSError) as e2:
                left = f"cleaning up failed too ({e2}): run `drflow lab down`"
            raise NetnsError(f"could not build lab network {lab_id}: {e}; {left}. Check that "
                             "`ip netns add` and `nft` work here, or run the lab on loopback with "
                             "DRFLOW_LAB_NETNS=off") from e
        return topo


def _build(topo: Topology) -> None:
    ensure_internet()
    core = topo.netns("core")
    root_cmds = [f"netns add {topo.netns(loc)}" for loc in ("core", *LOCATIONS)]
    root_cmds.append(f"link add {topo.link('internet', 'core')} type veth peer name "
                     f"{topo.link('core', 'internet')} netns {core}")
    for loc in LOCATIONS:  # both ends created straight in their namespaces: no name clash in root
        root_cmds.append(f"link add {topo.link('core', loc)} netns {core} type veth peer name "
                         f"{topo.link(loc, 'core')} netns {topo.netns(loc)}")
    root_end = topo.link("internet", "core")
    root_cmds += [f"addr add {topo.link_address('internet', False)}/30 dev {root_end}",
                  f"link set {root_end} up",
                  f"route add {topo.block} via {topo.link_address('internet', True)}"]
    _ip_batch(root_cmds)

    core_cmds = ["link set lo up"]
    for loc in ("internet", *LOCATIONS):
        dev = topo.link("core", loc)
        core_cmds += [f"addr add {topo.link_address(loc, True)}/30 dev {dev}", f"link set {dev} up"]
    core_cmds.append(f"route add {INTERNET_ADDRESS}/32 via {topo.link_address('internet', False)}")
    core_cmds += [f"route add {topo.subnet(loc)} via {topo.link_address(loc, False)}" for loc in LOCATIONS]
    _ip_batch(core_cmds, ns=core)
    for loc in LOCATIONS:
        dev, gw = topo.link(loc, "core"), topo.link_address(loc, True)
        _ip_batch(["link set lo up", f"addr add {topo.link_address(loc, False)}/30 dev {dev}",
                   f"link set {dev} up", f"route add {topo.block} via {gw}",
                   f"route add {INTERNET_ADDRESS}/32 via {gw}"], ns=topo.netns(loc))

    _nft(core, _CORE_RULES, sysctl_forward=True)
    for loc in LOCATIONS:  # each site routes for its hosts (add_host)
        rules = _SITE_RULES.replace("@CORE_LINK@", topo.link(loc, "core"))
        _nft(topo.netns(loc), rules, sysctl_forward=True)


# Blackholed addresses in `bh`; partitioned links in `part`; cut link pairs in `cut` (both orders).
_CORE_RULES = """table inet drflow {
  set bh { type ipv4_addr; }
  set part { type ifname; }
  set cut { type ifname . ifname; }
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip saddr @bh drop
    ip daddr @bh drop
    iifname @part drop
    oifname @part drop
    iifname . oifname @cut drop
  }
}
"""
# Input: an address on the site's lo (add_address) still talks to itself (`self` holds A . A),
# nothing else in its site reaches it, and a blackholed host reaches none of the site's own
# addresses. Forward: the site router passes nothing to or from a blackholed host (hosts of the
# same site included), and sends nothing back to core that came from it (an address of the site
# that nobody holds is silent, not a routing loop ended by ICMP time exceeded).
_SITE_RULES = """table inet drflow {
  set bh { type ipv4_addr; }
  set self { type ipv4_addr . ipv4_addr; }
  chain input {
    type filter hook input priority 0; policy accept;
    ip saddr . ip daddr @self accept
    ip daddr @bh drop
    ip saddr @bh drop
  }
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip saddr @bh drop
    ip daddr @bh drop
    iifname "@CORE_LINK@" oifname "@CORE_LINK@" drop
  }
}
"""
# Inside a blackholed host: what the site router itself sends (it crosses no forward hook) is
# dropped on arrival; the host still talks to itself over its lo.
_HOST_BLACKHOLE = f"""add table {_TABLE}
delete table {_TABLE}
table {_TABLE} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "lo" accept
    drop
  }}
}}
"""
_HOST_CLEAR = f"add table {_TABLE}\ndelete table {_TABLE}\n"


def add_address(topo: Topology, location: str, address: str) -> None:
    """Give a VM its address: a /32 on the site namespace's lo."""
    if not topo.enabled:
        return
    if topo.location_of(address) != location:
        raise NetnsError(f"{address} is not in {location}'s subnet {topo.subnet(location)}")
    _add_to_lo(address, topo.netns(location))


def add_host(topo: Topology, location: str, name: str, address: str) -> list[str]:
    """Give a host (a VM, a vCenter, the orchestrator) its own namespace behind its site's router,
    with the address as its only one; returns the argv prefix that runs a program in it ([] on
    loopback, where the 127/8 address is usable as is). Adding the same host again is fine."""
    if not topo.enabled:
        host_name(name)  # a bad name fails on loopback too
        return []
    if topo.location_of(address) != location:
        raise NetnsError(f"{address} is not in {location}'s subnet {topo.subnet(location)}")
    ns, site = topo.host_netns(name), topo.netns(location)
    site_end, host_end = topo.host_link(address, False), topo.host_link(address, True)
    prefix = ["ip", "netns", "exec", ns]
    if (_NETNS_DIR / ns).exists():
        if _hosts_of(topo, location).get(address) == ns:
            return prefix
        raise NetnsError(f"host {name!r} of lab {topo.lab_id} already exists with another address or "
                         f"site than {address} in {location}: give each host its own name")
    gw = topo.link_address(location, False)  # the site's address on its core link
    try:
        _ip_batch([f"netns add {ns}",
                   f"link add {site_end} netns {site} type veth peer name {host_end} netns {ns}"])
        _ip_batch(["link set lo up", f"addr add {address}/32 dev {host_end}", f"link set {host_end} up",
                   f"route add {topo.block} via {gw} dev {host_end} onlink",
                   f"route add {INTERNET_ADDRESS}/32 via {gw} dev {host_end} onlink"], ns=ns)
        # The alias names the host's namespace: faults and processes_in find it from the site.
        _ip_batch([f"link set {site_end} alias {ns}", f"link set {site_end} up",
                   f"route add {address}/32 dev {site_end} src {gw}"], ns=site)
    except NetnsError as e:
        _ip_batch([f"netns del {ns}"], force=True)  # its veth goes with it
        raise NetnsError(f"could not add host {name!r} ({address}) to lab {topo.lab_id}: {e}") from e
    return prefix


def remove_host(topo: Topology, name: str, address: str) -> None:
    """Take a host's namespace and its link at the site away (its route goes with the link); a
    host that is not there is fine. The link is deleted by name: a namespace some process still
    holds outlives `netns del`, and so would its veth, whose name the address's next host needs."""
    if not topo.enabled:
        return
    location = topo.location_of(address)
    if location is not None:
        _ip_batch([f"link del {topo.host_link(address, False)}"], ns=topo.netns(location),
                  force=True)
    if (_NETNS_DIR / topo.host_netns(name)).exists():
        _ip_batch([f"netns del {topo.host_netns(name)}"], force=True)


def host_prefix(topo: Topology, name: str) -> list[str]:
    """argv prefix that runs a program inside a host added before ([] on loopback)."""
    if not topo.enabled:
        return []
    ns = topo.host_netns(name)
    if not (_NETNS_DIR / ns).exists():
        raise NetnsError(f"lab {topo.lab_id} has no host {name!r} ({ns}): add it with add_host first")
    return ["ip", "netns", "exec", ns]


def _hosts_of(topo: Topology, location: str) -> dict[str, str]:
    """A site's hosts, address -> namespace, read from its veths' aliases."""
    proc = _run(["ip", "-n", topo.netns(location), "-j", "link", "show"], check=False)
    if proc.returncode != 0:
        return {}
    out = {}
    subnet = ipaddress.IPv4Network(topo.subnet(location))
    tag = f"dfl{topo.lab_id}h{LOCATIONS.index(location)}"
    for link in json.loads(proc.stdout or "[]"):
        ifname, alias = str(link.get("ifname", "")), str(link.get("ifalias", ""))
        if ifname.startswith(tag) and ifname[len(tag):].isdigit() and alias:
            out[str(subnet.network_address + int(ifname[len(tag):]))] = alias
    return out


def _add_to_lo(address: str, ns: str = "") -> None:
    """Add a /32 to lo; already there is fine (two processes may race to add it)."""
    where = ["-n", ns] if ns else []
    proc = _run(["ip", *where, "addr", "add", f"{address}/32", "dev", "lo"], check=False)
    if proc.returncode == 0:
        return
    shown = _run(["ip", *where, "-4", "-o", "addr", "show", "dev", "lo"], check=False).stdout
    if f" {address}/32 " not in shown:
        raise NetnsError(f"cannot add {address} to lo{' in ' + ns if ns else ''}: {proc.stderr.strip()}")


def _ns_ids(names: list[str]) -> dict[tuple[int, int], str]:
    out = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(_NETNS_DIR / name)
            out[(st.st_dev, st.st_ino)] = name
    return out


def _pids_in(names: list[str]) -> list[int]:
    wanted = _ns_ids(names)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")  # zombies have none: they hold no namespace
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry.name))
    return sorted(pids)


def host_processes(topo: Topology, name: str) -> list[int]:
    """PIDs running in one host's network namespace (a VM: whatever runs in it)."""
    return _pids_in([topo.host_netns(name)]) if topo.enabled else []


def processes_in(topo: Topology, location: str) -> list[int]:
    """PIDs whose network namespace is that location's (core too) or one of its hosts'."""
    if not topo.enabled:
        return []
    hosts = list(_hosts_of(topo, location).values()) if location in LOCATIONS else []
    return _pids_in([topo.netns(location), *hosts])


def _lab_netns(lab_id: str) -> list[str]:
    """Every namespace of a lab, hosts included, by name: found even when nothing recorded them."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(_NETNS_DIR) if n.startswith(f"drfl-{lab_id}-"))
    return []


def _remove_network(lab_id: str, block: str | None) -> None:
    names = _lab_netns(lab_id)
    for _ in range(50):  # a process forked meanwhile is caught by the next round
        pids = _pids_in(names)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    # Deleting the root end first removes its peer at once; a namespace's own veths go with it
    # (asynchronously), and its nft table with it.
    cmds = [f"link del dfl{lab_id}rc"] + ([f"route del {block}"] if block else [])
    cmds += [f"netns del {n}" for n in names if (_NETNS_DIR / n).exists()]
    _ip_batch(cmds, force=True)
    left = [n for n in names if (_NETNS_DIR / n).exists()]
    left += [n for n in os.listdir("/sys/class/net") if n.startswith(f"dfl{lab_id}")]
    if left:
        raise NetnsError(f"could not remove {', '.join(left)} of lab network {lab_id}: "
                         f"remove by hand (`ip netns del NAME`, `ip link del NAME`)")


def destroy(topo: Topology) -> None:
    """Kill what runs in the lab's namespaces and remove them, its links, routes and record; repeatable."""
    if topo.enabled:
        _remove_network(topo.lab_id, topo.block)
    for suffix in (".json", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            (state_dir() / f"{topo.lab_id}{suffix}").unlink()
    if topo.enabled:
        release_internet()


def _owner_alive(rec: dict[str, Any]) -> bool:
    """Another process that created the topology still runs (started before its record: no reused pid)."""
    pid = int(rec.get("pid") or 0)
    if not pid or pid == os.getpid():
        return False
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and p.create_time() <= float(rec.get("created", 0)) + 1
    except psutil.Error:
        return False


def sweep_orphans(is_live: Callable[[Path], bool], progress: Callable[[str], None] = print) -> list[str]:
    """Remove what crashed labs left: recorded topologies whose lab_dir is not live (and whose
    creating process, if another one, has ended: tests build topologies without a lab directory),
    and any drfl-*/dfl* namespace or link that no record claims. Returns the ids removed."""
    can, _ = _can_manage()
    # Namespaces first, records second: a lab records itself before it creates anything, so a
    # namespace seen here without a record really has none.
    existing = _existing_ids() if can else set()
    removed = []
    records = _records()
    for rec in records:
        lab_id = str(rec["id"])
        topo = Topology(lab_id, int(rec["slot"]), bool(rec.get("enabled", True)))
        if (topo.enabled and not can) or _owner_alive(rec) or is_live(Path(str(rec["lab_dir"]))):
            continue
        with _flock(state_dir() / f"{lab_id}.lock", blocking=False) as free:
            if not free:
                continue  # still being built
            progress(f"removing lab network {lab_id} left by {rec['lab_dir']} (pid {rec.get('pid')})")
            destroy(topo)
        removed.append(lab_id)
    for lab_id in sorted(existing - {str(r["id"]) for r in records}):
        progress(f"removing unrecorded lab network {lab_id}")
        _remove_network(lab_id, None)
        removed.append(lab_id)
    if removed and can:
        release_internet()
    return removed


# --- the shared internet address -----------------------------------------------------------------

_pinned = False  # this process keeps the address until release_internet(unpin=True)


def ensure_internet(pin: bool = False) -> str:
    """Put the internet address on the root namespace's lo (idempotent); 127.0.0.1 on loopback labs.

    The calling process is recorded as a user of the address until it calls release_internet or
    dies: another process's release (a second test session ending) leaves it in place. `pin`: a
    process that serves there for its whole life (a test session's Prefect server) keeps it
    through its own labs going down, until release_internet(unpin=True)."""
    global _pinned
    if not available()[0]:
        return "127.0.0.1"
    with _global_lock():  # not while release_internet decides to remove it
        _add_to_lo(INTERNET_ADDRESS)
        _internet_user(register=True)
        _pinned = _pinned or pin
    return INTERNET_ADDRESS


def _internet_user(register: bool) -> bool:
    """Record (or forget) this process as a user of the internet address; True when another
    live process still uses it. Call under the global lock."""
    import psutil

    d = state_dir() / "internet-users"
    d.mkdir(parents=True, exist_ok=True)
    me = d / f"{os.getpid()}.json"
    if register:
        me.write_text(json.dumps({"pid": os.getpid(),
                                  "started": psutil.Process().create_time()}))
    else:
        me.unlink(missing_ok=True)
    others = False
    for f in d.glob("*.json"):
        if f == me:
            continue
        try:
            rec = json.loads(f.read_text())
            alive = abs(psutil.Process(int(rec["pid"])).create_time() - float(rec["started"])) < 1
        except (OSError, ValueError, KeyError, psutil.Error):
            alive = False
        if alive:
            others = True
        else:
            f.unlink(missing_ok=True)  # its process is gone (or the pid was reused)
    return others


def _listening(address: str) -> bool:
    """Does a socket in this namespace listen on (TCP) or bind (UDP) the address?"""
    hexaddr = ipaddress.IPv4Address(address).packed[::-1].hex().upper()
    for table, state in (("/proc/net/tcp", "0A"), ("/proc/net/udp", None)):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[1].split(":")[0] == hexaddr and (state is None or cols[3] == state):
                    return True
    return False


def release_internet(unpin: bool = False) -> None:
    """This process no longer needs the internet address (unless pinned and not `unpin`); remove
    it when no live process uses it, no lab topology is left and nothing listens on it."""
    global _pinned
    if not _can_manage()[0]:
        return
    with _global_lock():
        _pinned = _pinned and not unpin
        if _pinned or _internet_user(register=False) \
                or any(r.get("enabled", True) for r in _records()) or _listening(INTERNET_ADDRESS):
            return
        _run(["ip", "addr", "del", f"{INTERNET_ADDRESS}/32", "dev", "lo"], check=False)


# --- faults --------------------------------------------------------------------------------------

def _require(topo: Topology, fault: str) -> None:
    if not topo.enabled:
        raise NetnsError(f"{fault} needs packets dropped between network namespaces, but this lab runs "
                         "on loopback (not root, or DRFLOW_LAB_NETNS=off): start the lab as root "
                         "without DRFLOW_LAB_NETNS=off to produce it")


def _site(topo: Topology, address: str) -> str:
    try:
        loc = topo.location_of(address)
    except ValueError:
        loc = None
    if loc is None:
        raise NetnsError(f"{address!r} is no address of lab {topo.lab_id}'s sites "
                         f"({', '.join(topo.subnet(x) for x in LOCATIONS)})")
    return loc


def _location(loc: str) -> str:
    if loc not in (*LOCATIONS, "internet"):
        raise NetnsError(f"unknown location {loc!r}: one of {', '.join(LOCATIONS)}, internet")
    return loc


def blackhole(topo: Topology, address: str) -> float:
    """Nothing reaches the address and nothing from it reaches anyone; returns when it took effect."""
    _require(topo, "blackhole")
    site = _site(topo, address)
    host = _hosts_of(topo, site).get(address)
    if host:
        _nft(host, _HOST_BLACKHOLE)
    _nft(topo.netns(site), f"add element {_TABLE} self {{ {address} . {address} }}\n"
                           f"add element {_TABLE} bh {{ {address} }}\n")
    _nft(topo.netns("core"), f"add element {_TABLE} bh {{ {address} }}\n")
    return time.time()


def unblackhole(topo: Topology, address: str) -> float:
    _require(topo, "blackhole")
    site = _site(topo, address)
    # add-then-delete in one transaction: no error when the element was not there
    _nft(topo.netns("core"), _add_del("bh", address))
    _nft(topo.netns(site), _add_del("bh", address) + _add_del("self", f"{address} . {address}"))
    host = _hosts_of(topo, site).get(address)
    if host:
        _nft(host, _HOST_CLEAR)
    return time.time()


def _add_del(set_name: str, element: str) -> str:
    return (f"add element {_TABLE} {set_name} {{ {element} }}\n"
            f"delete element {_TABLE} {set_name} {{ {element} }}\n")


def partition(topo: Topology, location: str) -> float:
    """Cut a location from every other one, both ways; inside it everything keeps running."""
    _require(topo, "partition")
    dev = topo.link("core", _location(location))
    _nft(topo.netns("core"), f'add element {_TABLE} part {{ "{dev}" }}\n')
    return time.time()


def cut(topo: Topology, a: str, b: str) -> float:
    """Drop only what goes between two locations ("internet" = the root namespace)."""
    _require(topo, "cut")
    if _location(a) == _location(b):
        raise NetnsError(f"cut needs two different locations, got {a} twice")
    da, db = topo.link("core", a), topo.link("core", b)
    _nft(topo.netns("core"), f'add element {_TABLE} cut {{ "{da}" . "{db}", "{db}" . "{da}" }}\n')
    return time.time()


def heal(topo: Topology) -> float:
    """Remove every network fault of the lab."""
    _require(topo, "heal")
    holes = [f["target"] for f in faults(topo) if f["kind"] == "blackhole"]
    _nft(topo.netns("core"), "".join(f"flush set {_TABLE} {s}\n" for s in ("bh", "part", "cut")))
    for loc in LOCATIONS:
        _nft(topo.netns(loc), f"flush set {_TABLE} bh\nflush set {_TABLE} self\n")
    # Only the blackholed hosts (core's set names them): removing a table costs ~20 ms a host.
    hosts = {a: ns for loc in {_site(topo, a) for a in holes} for a, ns in _hosts_of(topo, loc).items()}
    for address in holes:
        if address in hosts:
            _nft(hosts[address], _HOST_CLEAR)
    return time.time()


# A VM's agent (root) loses the network while PostgreSQL (user postgres) keeps it: in the VM's
# own namespace, packets of root's sockets are dropped on output except on lo (the agent still
# watches its own PostgreSQL), and connects to its control port on input. A TCP connect whose SYN
# is dropped on output is not failed at once (tcp_connect ignores the error; checked here): it
# retransmits and times out, as across a cut cable. A separate table: a blackhole of the same host
# replaces `inet drflow` there.
_AGENT_TABLE = "inet drflow_agent"


def agent_cut(topo: Topology, host: str, control_port: int | None) -> float:
    """Cut the network of root's processes (the agent) in a host; returns when it took effect."""
    _require(topo, "agent-cut")
    host_prefix(topo, host)  # a clear error for a host never added
    port_rule = f"    tcp dport {int(control_port)} drop\n" if control_port else ""
    _nft(topo.host_netns(host), f"""add table {_AGENT_TABLE}
delete table {_AGENT_TABLE}
table {_AGENT_TABLE} {{
  chain output {{
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    meta skuid 0 drop
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "lo" accept
{port_rule}  }}
}}
""")
    return time.time()


def agent_uncut(topo: Topology, host: str) -> float:
    _require(topo, "agent-cut")
    _nft(topo.host_netns(host), f"add table {_AGENT_TABLE}\ndelete table {_AGENT_TABLE}\n")
    return time.time()


def faults(topo: Topology) -> list[dict[str, str]]:
    """The network faults in force now, read back from core's sets."""
    if not topo.enabled:
        return []
    nft = _tool("nft") or "nft"
    data = json.loads(_run(["nsenter", f"--net={_NETNS_DIR / topo.netns('core')}", nft, "-j", "list",
                            "table", *_TABLE.split()]).stdout)
    sets = {s["set"]["name"]: s["set"].get("elem", []) for s in data["nftables"] if "set" in s}
    by_dev = {topo.link("core", loc): loc for loc in (*LOCATIONS, "internet")}
    out = [{"kind": "blackhole", "target": str(a)} for a in sets.get("bh", [])]
    out += [{"kind": "partition", "target": by_dev.get(d, d)} for d in sets.get("part", [])]
    pairs = {tuple(sorted(by_dev.get(d, d) for d in e["concat"])) for e in sets.get("cut", [])}
    out += [{"kind": "cut", "target": f"{a}<->{b}"} for a, b in sorted(pairs)]
    return out


# --- running code inside a location --------------------------------------------------------------

def call_in(topo: Topology, location: str, fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a fresh thread that sits in the location's namespace: sockets it opens live there
    ("internet", or a loopback lab: runs here)."""
    if not topo.enabled or location == "internet":
        return fn(*args)
    return _call_in_netns(topo.netns(location), fn, *args)


def call_in_host(topo: Topology, name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a fresh thread that sits in a host's namespace (a loopback lab: runs here)."""
    if not topo.enabled:
        return fn(*args)
    host_prefix(topo, name)  # a clear error for a host never added
    return _call_in_netns(topo.host_netns(name), fn, *args)


def _call_in_netns(ns: str, fn: Callable[..., T], *args: Any) -> T:
    path = _NETNS_DIR / ns
    result: list[Any] = []

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:  # this thread only; it ends after fn
                    raise NetnsError(f"setns into {path} failed: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            result.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller
            result.append((False, e))

    t = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC
