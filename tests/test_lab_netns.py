"""The lab's network layer on real namespaces: reachability, packet-drop faults, isolation, cleanup."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from lab import netns
from lab.netns import Topology

PORT = 7000
T = TypeVar("T")
needs_netns = pytest.mark.skipif(not netns.available()[0], reason=f"no namespaces: {netns.available()[1]}")

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


@dataclass
class Lab:
    topo: Topology
    lab_dir: Path
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def serve(self, location: str, n: int) -> str:
        """A TCP server on the location's n-th address, run inside its namespace."""
        addr = self.topo.address(location, n)
        netns.add_address(self.topo, location, addr)
        proc = subprocess.Popen([*self.topo.exec_prefix(location), sys.executable, "-c", SERVER, addr,
                                 str(PORT)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        self.servers.append(proc)
        return addr

    def serve_host(self, location: str, n: int, name: str) -> str:
        """A host of the location with its own namespace and a TCP server on its address."""
        addr = self.topo.address(location, n)
        prefix = netns.add_host(self.topo, location, name, addr)
        assert prefix == netns.host_prefix(self.topo, name)
        proc = subprocess.Popen([*prefix, sys.executable, "-c", SERVER, addr, str(PORT)],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        self.servers.append(proc)
        return addr

    def destroy(self) -> None:
        netns.destroy(self.topo)
        for p in self.servers:
            p.wait(timeout=5)


def new_lab(tmp: Path, name: str) -> Lab:
    lab_dir = tmp / name
    return Lab(netns.create(lab_dir, progress=lambda _m: None), lab_dir)


def connect(address: str, port: int = PORT, src: str | None = None) -> str:
    """'ok', 'timeout' (packets dropped) or the error's name (refused, unreachable…)."""
    try:
        with socket.create_connection((address, port), timeout=1,
                                      source_address=(src, 0) if src else None):
            return "ok"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return type(e).__name__ + (f"[{os.strerror(e.errno)}]" if e.errno else "")


Check = tuple[str, str, str | None] | tuple[str, str, str | None, int]


def call(topo: Topology, where: str, fn: Callable[..., T], *args: object) -> T:
    """Run fn in a location, or in a host when `where` is "host:NAME"."""
    if where.startswith("host:"):
        return netns.call_in_host(topo, where[5:], fn, *args)
    return netns.call_in(topo, where, fn, *args)


def probe(topo: Topology, checks: Mapping[str, Check], port: int = PORT) -> dict[str, str]:
    """Run connects at once, each (from location or host:NAME, to address, source address or
    None[, port])."""
    with ThreadPoolExecutor(len(checks)) as pool:
        futs = {k: pool.submit(call, topo, c[0], connect, c[1], c[3] if len(c) > 3 else port, c[2])
                for k, c in checks.items()}
        return {k: f.result() for k, f in futs.items()}


Leg = tuple[str, str | None, str, str]  # from location, source address or None, to location, to address
UDP_PORT = 7100


def _udp_socket(address: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, port))
    return s


def _udp_send(src: str | None, dst: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if src:
            s.bind((src, 0))
        s.sendto(b"x", (dst, port))


def one_way(topo: Topology, legs: Mapping[str, Leg]) -> dict[str, bool]:
    """Does a datagram get through? One direction at a time, which a TCP connect cannot tell."""
    return {k: v is not None for k, v in one_way_from(topo, legs).items()}


def one_way_from(topo: Topology, legs: Mapping[str, Leg]) -> dict[str, str | None]:
    """The source address each datagram arrived with, None when it did not get through."""
    rxs = {k: call(topo, to, _udp_socket, dst, UDP_PORT + i)
           for i, (k, (_f, _s, to, dst)) in enumerate(legs.items())}
    try:
        for i, (frm, src, _t, dst) in enumerate(legs.values()):
            call(topo, frm, _udp_send, src, dst, UDP_PORT + i)
        deadline = time.monotonic() + 0.5
        out: dict[str, str | None] = {}
        for k, rx in rxs.items():
            rx.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                out[k] = str(rx.recvfrom(16)[1][0])
            except TimeoutError:
                out[k] = None
        return out
    finally:
        for rx in rxs.values():
            rx.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One lab with a server in prod (.10 and .11), dr and witness, another lab beside it, and a
    server on the shared internet address in the root namespace."""
    if not netns.available()[0]:
        pytest.skip(netns.available()[1])
    tmp = tmp_path_factory.mktemp("netns")
    lab, other = new_lab(tmp, "lab"), new_lab(tmp, "other")
    inet = socket.socket()
    try:
        addrs = {"p10": lab.serve("prod", 10), "p11": lab.serve("prod", 11), "d10": lab.serve("dr", 10),
                 "w10": lab.serve("witness", 10), "o10": other.serve("prod", 10)}
        inet.bind((netns.ensure_internet(), 0))
        inet.listen(64)  # the kernel completes handshakes without accept()
        yield {"lab": lab, "other": other, "inet_port": inet.getsockname()[1], **addrs}
    finally:
        inet.close()
        lab.destroy()
        other.destroy()
    # This session pinned the address (tests/conftest.py): its Prefect server may start there
    # after its last lab went down, so a lab going down leaves it.
    lo = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    assert f"{netns.INTERNET_ADDRESS}/32" in lo, "a lab going down took the session's address away"


def _all(result: dict[str, str], want: str) -> None:
    assert result == dict.fromkeys(result, want), result


def test_addresses_are_the_plans() -> None:
    t = Topology("a3f9", 1, True)
    assert (t.subnet("prod"), t.subnet("dr"), t.subnet("witness")) == \
        ("198.18.4.0/24", "198.18.5.0/24", "198.18.6.0/24")
    assert t.address("dr", 10) == "198.18.5.10" and t.block == "198.18.4.0/22"
    links = {loc: (t.link_address(loc, core_side=False), t.link_address(loc, core_side=True))
             for loc in ("internet", "prod", "witness")}
    assert links == {"internet": ("198.18.7.1", "198.18.7.2"), "prod": ("198.18.7.6", "198.18.7.5"),
                     "witness": ("198.18.7.14", "198.18.7.13")}
    assert Topology("a3f9", 126, True).subnet("witness") == "198.19.250.0/24"  # below slot 127
    assert t.netns("prod") == "drfl-a3f9-prod"
    assert t.exec_prefix("dr") == ["ip", "netns", "exec", "drfl-a3f9-dr"]
    assert max(len(t.link(a, b)) for a in (*netns.LOCATIONS, "internet") for b in ("core",)) <= 15
    assert t.location_of("198.18.6.77") == "witness" and t.location_of("198.18.7.1") is None
    assert Topology.from_dict(t.to_dict()) == t and t.internet_address == netns.INTERNET_ADDRESS
    off = Topology("a3f9", 3, False)
    assert (off.address("prod", 10), off.address("witness", 12), off.internet_address) == \
        ("127.100.3.10", "127.102.3.12", "127.0.0.1")
    assert off.netns("prod") == "" and off.exec_prefix("prod") == []
    with pytest.raises(ValueError):
        t.address("prod", 9)
    assert t.host_netns("Orders_PROD.db 1") == "drfl-a3f9-h-orders-prod-db-1"
    assert t.host_netns("x" * 60) == "drfl-a3f9-h-" + "x" * 40 and off.host_netns("orders-prod") == ""
    with pytest.raises(ValueError):
        t.host_netns("..")
    assert (t.host_link("198.18.4.255", False), t.host_link("198.18.6.10", True)) == \
        ("dfla3f9h0255", "dfla3f9v2010")
    assert max(len(t.host_link(t.address(loc, 254), side)) for loc in netns.LOCATIONS
               for side in (True, False)) <= 15


@needs_netns
def test_prod_reachable_from_root_other_sites_and_itself(net: dict) -> None:
    lab: Lab = net["lab"]
    _all(probe(lab.topo, {"root": ("internet", net["p10"], None), "dr": ("dr", net["p10"], None),
                          "witness": ("witness", net["p10"], None), "prod": ("prod", net["p10"], net["p11"]),
                          "dr->witness": ("dr", net["w10"], None)}), "ok")
    inet = {loc: (loc, netns.INTERNET_ADDRESS, None) for loc in netns.LOCATIONS}
    _all(probe(lab.topo, inet, port=net["inet_port"]), "ok")


@needs_netns
def test_blackhole_drops_to_and_from_the_address_until_unblackholed(net: dict) -> None:
    lab: Lab = net["lab"]
    p10, p11 = net["p10"], net["p11"]
    before = time.time()
    took = netns.blackhole(lab.topo, p10)
    try:
        assert before <= took <= time.time()
        assert netns.faults(lab.topo) == [{"kind": "blackhole", "target": p10}]
        res = probe(lab.topo, {"dr": ("dr", p10, None), "root": ("internet", p10, None),
                               "prod": ("prod", p10, p11), "from it": ("prod", p11, p10),
                               "other VM": ("dr", p11, None), "itself": ("prod", p10, p10)})
        assert res == {"dr": "timeout", "root": "timeout", "prod": "timeout", "from it": "timeout",
                       "other VM": "ok", "itself": "ok"}, res
        inet, d10 = netns.INTERNET_ADDRESS, net["d10"]
        legs = one_way(lab.topo, {"dr->it": ("dr", None, "prod", p10), "it->dr": ("prod", p10, "dr", d10),
                                  "it->root": ("prod", p10, "internet", inet),
                                  "vm->it": ("prod", p11, "prod", p10), "it->vm": ("prod", p10, "prod", p11),
                                  "it->itself": ("prod", p10, "prod", p10),
                                  "dr->vm": ("dr", None, "prod", p11)})
        assert legs == {"dr->it": False, "it->dr": False, "it->root": False, "vm->it": False, "it->vm": False,
                        "it->itself": True, "dr->vm": True}, legs
    finally:
        netns.unblackhole(lab.topo, p10)
    _all(probe(lab.topo, {"dr": ("dr", p10, None), "prod": ("prod", p10, p11)}), "ok")
    assert netns.faults(lab.topo) == []
    netns.unblackhole(lab.topo, p10)  # twice: no error


@needs_netns
def test_partition_drops_both_ways_while_the_site_works_inside(net: dict) -> None:
    lab: Lab = net["lab"]
    took = netns.partition(lab.topo, "prod")
    try:
        assert netns.faults(lab.topo) == [{"kind": "partition", "target": "prod"}]
        res = probe(lab.topo, {"prod->dr": ("prod", net["d10"], net["p10"]),
                               "dr->prod": ("dr", net["p10"], None),
                               "root->prod": ("internet", net["p10"], None),
                               "prod->internet": ("prod", netns.INTERNET_ADDRESS, net["p10"],
                                                  net["inet_port"]),
                               "prod->prod": ("prod", net["p10"], net["p11"])})
        assert res == {"prod->dr": "timeout", "dr->prod": "timeout", "root->prod": "timeout",
                       "prod->internet": "timeout", "prod->prod": "ok"}, res
        p10, p11 = net["p10"], net["p11"]
        legs = one_way(lab.topo, {"prod->dr": ("prod", p10, "dr", net["d10"]),
                                  "dr->prod": ("dr", None, "prod", p10),
                                  "root->prod": ("internet", None, "prod", p10),
                                  "prod->root": ("prod", p10, "internet", netns.INTERNET_ADDRESS),
                                  "prod->prod": ("prod", p11, "prod", p10),
                                  "dr->witness": ("dr", None, "witness", net["w10"])})
        assert legs == {"prod->dr": False, "dr->prod": False, "root->prod": False, "prod->root": False,
                        "prod->prod": True, "dr->witness": True}, legs
        assert took <= time.time()
    finally:
        netns.heal(lab.topo)
    _all(probe(lab.topo, {"prod->dr": ("prod", net["d10"], net["p10"]), "dr->prod": ("dr", net["p10"], None),
                          "root->prod": ("internet", net["p10"], None)}), "ok")
    assert netns.faults(lab.topo) == []


@needs_netns
def test_cut_drops_only_between_the_two_locations(net: dict) -> None:
    lab: Lab = net["lab"]
    netns.cut(lab.topo, "prod", "dr")
    netns.cut(lab.topo, "dr", "internet")
    try:
        assert sorted((f["kind"], f["target"]) for f in netns.faults(lab.topo)) == \
            [("cut", "dr<->internet"), ("cut", "dr<->prod")]
        res = probe(lab.topo, {"prod->dr": ("prod", net["d10"], net["p10"]),
                               "dr->prod": ("dr", net["p10"], None),
                               "root->prod": ("internet", net["p10"], None),
                               "witness->prod": ("witness", net["p10"], None),
                               "prod->witness": ("prod", net["w10"], net["p10"]),
                               "root->dr": ("internet", net["d10"], None),
                               "witness->dr": ("witness", net["d10"], None)})
        assert res == {"prod->dr": "timeout", "dr->prod": "timeout", "root->prod": "ok",
                       "witness->prod": "ok", "prod->witness": "ok", "root->dr": "timeout",
                       "witness->dr": "ok"}, res
        p10, d10 = net["p10"], net["d10"]
        legs = one_way(lab.topo, {"prod->dr": ("prod", p10, "dr", d10), "dr->prod": ("dr", None, "prod", p10),
                                  "dr->root": ("dr", None, "internet", netns.INTERNET_ADDRESS),
                                  "root->dr": ("internet", None, "dr", d10),
                                  "root->prod": ("internet", None, "prod", p10),
                                  "witness->prod": ("witness", None, "prod", p10),
                                  "prod->witness": ("prod", p10, "witness", net["w10"])})
        assert legs == {"prod->dr": False, "dr->prod": False, "dr->root": False, "root->dr": False,
                        "root->prod": True, "witness->prod": True, "prod->witness": True}, legs
    finally:
        netns.heal(lab.topo)
    _all(probe(lab.topo, {"prod->dr": ("prod", net["d10"], net["p10"]),
                          "root->dr": ("internet", net["d10"], None)}), "ok")


@needs_netns
def test_sites_route_only_inside_their_lab(net: dict) -> None:
    lab: Lab = net["lab"]
    other: Lab = net["other"]
    assert lab.topo.slot != other.topo.slot
    block = ipaddress.IPv4Network(lab.topo.block)
    for loc in netns.LOCATIONS:
        routes = subprocess.run(["ip", "-n", lab.topo.netns(loc), "-4", "route"], capture_output=True,
                                text=True, check=True).stdout.splitlines()
        dsts = [r.split()[0] for r in routes]
        assert "default" not in dsts
        assert all(d == netns.INTERNET_ADDRESS or ipaddress.IPv4Network(d).subnet_of(block)
                   for d in dsts), routes
    res = probe(lab.topo, {"prod->other": ("prod", net["o10"], net["p10"]),
                           "dr->other": ("dr", net["o10"], None),
                           "prod->outside": ("prod", "192.0.2.1", None)})
    assert all(v != "ok" for v in res.values()), res
    assert probe(other.topo, {"other->lab": ("prod", net["p10"], net["o10"])})["other->lab"] != "ok"
    _all(probe(lab.topo, {"root->lab": ("internet", net["p10"], None),
                          "root->other": ("internet", net["o10"], None)}), "ok")


@pytest.fixture(scope="module")
def hosts(net: dict) -> dict[str, str]:
    """Hosts with their own namespaces in the module's lab: A and B in prod, C in dr, each serving."""
    lab: Lab = net["lab"]
    return {"A": lab.serve_host("prod", 20, "orders-prod"), "B": lab.serve_host("prod", 21, "billing-prod"),
            "C": lab.serve_host("dr", 20, "orders-dr")}


A, B, C = "host:orders-prod", "host:billing-prod", "host:orders-dr"


@needs_netns
def test_hosts_reach_each_other_and_unbound_clients_speak_with_their_own_address(net: dict,
                                                                                  hosts: dict) -> None:
    lab: Lab = net["lab"]
    a, b, c, inet = hosts["A"], hosts["B"], hosts["C"], netns.INTERNET_ADDRESS
    _all(probe(lab.topo, {"B->A": (B, a, None), "C->A": (C, a, None), "root->A": ("internet", a, None),
                          "site->A": ("prod", a, None), "A->B": (A, b, None), "A->C": (A, c, None),
                          "A->site VM": (A, net["p10"], None), "A->A": (A, a, None)}), "ok")
    assert probe(lab.topo, {"A->internet": (A, inet, None, net["inet_port"])}) == {"A->internet": "ok"}
    seen = one_way_from(lab.topo, {"A->B": (A, None, B, b), "A->C": (A, None, C, c),
                                   "A->root": (A, None, "internet", inet), "C->A": (C, None, A, a)})
    assert seen == {"A->B": a, "A->C": a, "A->root": a, "C->A": c}, seen


@needs_netns
def test_blackholed_host_is_silent_whatever_its_clients_bind(net: dict, hosts: dict) -> None:
    lab: Lab = net["lab"]
    a, b, c, inet = hosts["A"], hosts["B"], hosts["C"], netns.INTERNET_ADDRESS
    netns.blackhole(lab.topo, a)
    try:
        assert netns.faults(lab.topo) == [{"kind": "blackhole", "target": a}]
        res = probe(lab.topo, {"B->A": (B, a, None), "C->A": (C, a, None), "root->A": ("internet", a, None),
                               "site->A": ("prod", a, None), "site VM->A": ("prod", a, net["p10"]),
                               "A->B": (A, b, None), "A->C": (A, c, None),
                               "A->internet": (A, inet, None, net["inet_port"]),
                               "A->site VM": (A, net["p10"], None), "A bound->B": (A, b, a),
                               "A->A": (A, a, None), "B->C": (B, c, None), "C->B": (C, b, None),
                               "root->B": ("internet", b, None), "B->site VM": (B, net["p10"], None)})
        untouched = ("A->A", "B->C", "C->B", "root->B", "B->site VM")
        want = dict.fromkeys(res, "timeout") | dict.fromkeys(untouched, "ok")
        assert res == want, res
        legs = one_way(lab.topo, {"A->B": (A, None, B, b), "B->A": (B, None, A, a),
                                  "A->root": (A, None, "internet", inet), "root->A": ("internet", None, A, a),
                                  "site->A": ("prod", None, A, a),
                                  "A->site VM": (A, None, "prod", net["p10"]),
                                  "B->C": (B, None, C, c)})
        assert legs == {"A->B": False, "B->A": False, "A->root": False, "root->A": False, "site->A": False,
                        "A->site VM": False, "B->C": True}, legs
    finally:
        netns.unblackhole(lab.topo, a)
    _all(probe(lab.topo, {"B->A": (B, a, None), "C->A": (C, a, None), "root->A": ("internet", a, None),
                          "A->B": (A, b, None), "A->C": (A, c, None), "site->A": ("prod", a, None)}), "ok")
    assert probe(lab.topo, {"A->internet": (A, inet, None, net["inet_port"])}) == {"A->internet": "ok"}
    netns.blackhole(lab.topo, a)
    netns.heal(lab.topo)  # heal undoes it too
    assert probe(lab.topo, {"B->A": (B, a, None), "A->C": (A, c, None)}) == {"B->A": "ok", "A->C": "ok"}
    assert netns.faults(lab.topo) == []


def _udp_answer(dst: str) -> str:
    """Send a datagram to a closed port: 'refused' (the host is there), 'timeout' (silence) or the
    ICMP error that came back instead (a routing loop's time exceeded, an unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR: soft ICMP errors (time exceeded) too
        s.connect((dst, UDP_PORT - 1))
        s.settimeout(0.5)
        s.send(b"x")
        try:
            s.recv(16)
            return "answered"
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            return os.strerror(e.errno or 0)


@needs_netns
def test_an_address_nobody_holds_is_silent_not_a_routing_loop(net: dict, hosts: dict) -> None:
    lab: Lab = net["lab"]
    nobody = lab.topo.address("prod", 99)
    res = {"root": netns.call_in(lab.topo, "internet", _udp_answer, nobody),
           "dr host": netns.call_in_host(lab.topo, "orders-dr", _udp_answer, nobody),
           "prod host": netns.call_in_host(lab.topo, "orders-prod", _udp_answer, nobody),
           "a host": netns.call_in(lab.topo, "internet", _udp_answer, hosts["B"])}
    assert res == {"root": "timeout", "dr host": "timeout", "prod host": "timeout", "a host": "refused"}, res


@needs_netns
def test_partition_and_cut_hold_for_hosts(net: dict, hosts: dict) -> None:
    lab: Lab = net["lab"]
    a, b, c, inet, port = hosts["A"], hosts["B"], hosts["C"], netns.INTERNET_ADDRESS, net["inet_port"]
    netns.partition(lab.topo, "prod")
    try:
        res = probe(lab.topo, {"A->C": (A, c, None), "C->A": (C, a, None), "root->A": ("internet", a, None),
                               "A->internet": (A, inet, None, port), "A->B": (A, b, None),
                               "B->A": (B, a, None), "A->site VM": (A, net["p10"], None),
                               "C->witness": (C, net["w10"], None)})
        assert res == {"A->C": "timeout", "C->A": "timeout", "root->A": "timeout", "A->internet": "timeout",
                       "A->B": "ok", "B->A": "ok", "A->site VM": "ok", "C->witness": "ok"}, res
    finally:
        netns.heal(lab.topo)
    netns.cut(lab.topo, "prod", "dr")
    try:
        res = probe(lab.topo, {"A->C": (A, c, None), "C->A": (C, a, None), "root->A": ("internet", a, None),
                               "A->internet": (A, inet, None, port), "C->internet": (C, inet, None, port),
                               "A->B": (A, b, None), "C->witness": (C, net["w10"], None)})
        assert res == {"A->C": "timeout", "C->A": "timeout", "root->A": "ok", "A->internet": "ok",
                       "C->internet": "ok", "A->B": "ok", "C->witness": "ok"}, res
    finally:
        netns.heal(lab.topo)
    _all(probe(lab.topo, {"A->C": (A, c, None), "root->A": ("internet", a, None)}), "ok")


@needs_netns
def test_hosts_route_only_into_their_lab_through_their_site(net: dict, hosts: dict) -> None:
    lab: Lab = net["lab"]
    block = ipaddress.IPv4Network(lab.topo.block)
    for name, addr in (("orders-prod", hosts["A"]), ("orders-dr", hosts["C"])):
        ns = lab.topo.host_netns(name)
        routes = subprocess.run(["ip", "-n", ns, "-4", "route"], capture_output=True, text=True,
                                check=True).stdout.splitlines()
        assert sorted(r.split()[0] for r in routes) == sorted([str(block), netns.INTERNET_ADDRESS]), routes
        addrs = subprocess.run(["ip", "-n", ns, "-4", "-o", "addr"], capture_output=True, text=True,
                               check=True).stdout
        assert sorted(ln.split()[3] for ln in addrs.splitlines()) == ["127.0.0.1/8", f"{addr}/32"], addrs
    res = probe(lab.topo, {"A->other lab": (A, net["o10"], None), "A->outside": (A, "192.0.2.1", None)})
    assert all(v != "ok" for v in res.values()), res
    pids = netns.processes_in(lab.topo, "prod")
    host_pids = [p.pid for p in lab.servers[-3:-1]]  # A and B, of prod
    assert set(host_pids) <= set(pids) and lab.servers[-1].pid not in pids
    with pytest.raises(netns.NetnsError, match="add_host first"):
        netns.host_prefix(lab.topo, "nobody")
    again = netns.add_host(lab.topo, "prod", "orders-prod", hosts["A"])  # the same host: fine
    assert again == netns.host_prefix(lab.topo, "orders-prod")
    with pytest.raises(netns.NetnsError, match="its own name"):
        netns.add_host(lab.topo, "prod", "orders-prod", lab.topo.address("prod", 30))
    with pytest.raises(netns.NetnsError, match="not in dr"):
        netns.add_host(lab.topo, "dr", "x", lab.topo.address("prod", 30))


def _leftovers(topo: Topology, route: bool = True) -> list[str]:
    left = [n for n in os.listdir("/run/netns") if n.startswith(f"drfl-{topo.lab_id}-")]
    left += [n for n in os.listdir("/sys/class/net") if n.startswith(f"dfl{topo.lab_id}")]
    routes = subprocess.run(["ip", "route", "show", topo.block], capture_output=True, text=True).stdout
    left += [routes] if route and routes.strip() else []
    left += [p.name for p in netns.state_dir().glob(f"{topo.lab_id}.*")]
    return left


@needs_netns
def test_destroy_leaves_nothing_and_can_repeat(tmp_path: Path) -> None:
    lab = new_lab(tmp_path, "gone")
    lab.serve("prod", 10)
    lab.serve("dr", 10)
    pids = netns.processes_in(lab.topo, "prod") + netns.processes_in(lab.topo, "dr")
    assert sorted(pids) == sorted(p.pid for p in lab.servers)
    lab.destroy()
    assert _leftovers(lab.topo) == []
    assert all(p.returncode == -9 for p in lab.servers)
    netns.destroy(lab.topo)


@needs_netns
def test_destroy_with_hosts_leaves_nothing_and_kills_their_processes(tmp_path: Path) -> None:
    lab = new_lab(tmp_path, "hosted")
    lab.serve_host("prod", 10, "orders-prod")
    lab.serve_host("prod", 11, "vcenter-prod")
    lab.serve_host("dr", 10, "orchestrator")
    prod = netns.processes_in(lab.topo, "prod")
    assert sorted(prod) == sorted(p.pid for p in lab.servers[:2])
    assert netns.processes_in(lab.topo, "dr") == [lab.servers[2].pid]
    lab.destroy()
    assert _leftovers(lab.topo) == []
    assert all(p.returncode == -9 for p in lab.servers)
    netns.destroy(lab.topo)


CRASHING_LAB = """
import sys, subprocess, time
from pathlib import Path
from lab import netns
topo = netns.create(Path(sys.argv[1]), progress=lambda _m: None)
for i in range(3):
    loc = netns.LOCATIONS[i % 2]
    prefix = netns.add_host(topo, loc, f"vm-{i}", topo.address(loc, 10 + i))
    subprocess.Popen([*prefix, "sleep", "300"])
print(topo.lab_id, topo.slot, flush=True)
time.sleep(300)
"""


@needs_netns
def test_sweep_removes_the_hosts_of_a_lab_whose_manager_was_killed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_LAB, str(tmp_path / "crashed")],
                            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    assert proc.stdout is not None
    lab_id, slot = proc.stdout.readline().split()
    topo = Topology(lab_id.decode(), int(slot), True)
    try:
        hosts = [n for n in os.listdir("/run/netns") if n.startswith(f"drfl-{topo.lab_id}-h-")]
        assert len(hosts) == 3 and len(netns.processes_in(topo, "prod")) == 2
        proc.kill()
        proc.wait()
        # Its sleeps live on in the hosts (their parent is gone); the sweep kills and removes them.
        assert len(netns.processes_in(topo, "prod") + netns.processes_in(topo, "dr")) == 3
        removed = netns.sweep_orphans(lambda p: p != tmp_path / "crashed", progress=lambda _m: None)
        assert topo.lab_id in removed and _leftovers(topo) == []
    finally:
        proc.kill()
        netns.destroy(topo)


@needs_netns
def test_create_and_twelve_hosts_take_well_under_two_seconds(tmp_path: Path) -> None:
    t0 = time.monotonic()
    topo = netns.create(tmp_path / "timed", progress=lambda _m: None)
    t1 = time.monotonic()
    try:
        for i in range(12):
            loc = netns.LOCATIONS[i % 3]
            netns.add_host(topo, loc, f"vm-{i}-{loc}", topo.address(loc, 10 + i))
        t2 = time.monotonic()
    finally:
        netns.destroy(topo)
    t3 = time.monotonic()
    print(f"create {t1 - t0:.3f} s, 12 hosts {t2 - t1:.3f} s, destroy {t3 - t2:.3f} s")
    assert t2 - t0 < 2.0, (t1 - t0, t2 - t1)
    assert _leftovers(topo) == []


@needs_netns
def test_a_failed_create_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_SITE_RULES", "table inet drflow { chain input { nonsense } }")  # last step
    with pytest.raises(netns.NetnsError, match="nothing of it is left") as e:
        netns.create(tmp_path / "broken", progress=lambda _m: None)
    lab_id = str(e.value).split("could not build lab network ")[1][:4]
    assert _leftovers(Topology(lab_id, 0, True), route=False) == []


@needs_netns
def test_sweep_removes_what_a_crashed_lab_left_and_nothing_live(tmp_path: Path) -> None:
    live, dead = new_lab(tmp_path, "live"), new_lab(tmp_path, "dead")
    dead.serve("prod", 10)
    stray = secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", f"drfl-{stray}-core"], check=True)
    try:
        is_live = lambda p: p != dead.lab_dir  # noqa: E731
        # While a lab is being built (its lock held) a sweep leaves it alone.
        with netns._flock(netns.state_dir() / f"{dead.topo.lab_id}.lock"):
            first = netns.sweep_orphans(is_live, progress=lambda _m: None)
        assert stray in first and dead.topo.lab_id not in first
        removed = netns.sweep_orphans(is_live, progress=lambda _m: None)
        assert dead.topo.lab_id in removed and live.topo.lab_id not in first + removed
        assert _leftovers(dead.topo) == [] and not os.path.exists(f"/run/netns/drfl-{stray}-core")
        dead.servers[0].wait(timeout=5)
        assert len(_leftovers(live.topo)) == 8  # 4 namespaces, root link, route, record, lock file
    finally:
        subprocess.run(["ip", "netns", "del", f"drfl-{stray}-core"], capture_output=True)
        live.destroy()
        dead.destroy()


@needs_netns
def test_labs_built_at_once_get_different_slots(tmp_path: Path) -> None:
    with ThreadPoolExecutor(3) as pool:
        topos = list(pool.map(lambda i: netns.create(tmp_path / f"l{i}", progress=lambda _m: None), range(3)))
    try:
        assert len({t.slot for t in topos}) == 3 and len({t.lab_id for t in topos}) == 3
    finally:
        for t in topos:
            netns.destroy(t)


@needs_netns
def test_a_slot_with_a_route_in_the_root_namespace_is_not_free(tmp_path: Path) -> None:
    first = netns.create(tmp_path / "first", progress=lambda _m: None)
    netns.destroy(first)  # its slot is free again, unless a route still claims it
    subprocess.run(["ip", "route", "add", "unreachable", first.block], check=True)
    try:
        second = netns.create(tmp_path / "second", progress=lambda _m: None)
        netns.destroy(second)
        assert second.slot != first.slot
    finally:
        subprocess.run(["ip", "route", "del", "unreachable", first.block], check=True)


@needs_netns
def test_internet_address_stays_while_a_lab_exists(net: dict) -> None:
    netns.release_internet()
    out = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    assert f"{netns.INTERNET_ADDRESS}/32" in out
    assert netns.ensure_internet() == netns.INTERNET_ADDRESS  # idempotent


@needs_netns
def test_internet_address_stays_while_another_process_uses_it() -> None:
    # Two test sessions on one machine: one ending (its release at exit) while the other has
    # the address but nothing listening on it yet must not take it away.
    assert netns.ensure_internet() == netns.INTERNET_ADDRESS  # this process: a user
    code = ("import sys; from lab import netns; netns.ensure_internet(); "
            "others = netns._internet_user(register=False); netns.release_internet(); "
            "sys.exit(0 if others else 3)")
    other = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                           timeout=60)
    assert other.returncode == 0, "the other process did not see this one using the address"
    out = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"], capture_output=True,
                         text=True).stdout
    assert f"{netns.INTERNET_ADDRESS}/32" in out


@needs_netns
def test_a_pinned_process_keeps_its_use_through_its_own_lab_going_down(tmp_path: Path) -> None:
    # A test session pins the address for its Prefect server, which may start after the session's
    # last lab went down: that lab's destroy must not drop the session's use of it.
    code = ("import sys, os; from pathlib import Path; from lab import netns; "
            "netns.ensure_internet(pin=True); "
            "me = netns.state_dir() / 'internet-users' / f'{os.getpid()}.json'; "
            f"netns.destroy(netns.create(Path({str(tmp_path)!r}), progress=lambda _m: None)); "
            "kept = me.exists(); netns.release_internet(unpin=True); "
            "sys.exit(0 if kept and not me.exists() else 3)")
    child = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                           timeout=60)
    assert child.returncode == 0, "the pin was dropped by the lab going down, or kept by unpin"


def test_loopback_lab_when_namespaces_are_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRFLOW_LAB_NETNS", "off")
    assert netns.available() == (False, "DRFLOW_LAB_NETNS=off")
    said: list[str] = []
    topo = netns.create(tmp_path / "lo", progress=said.append)
    try:
        assert not topo.enabled and topo.internet_address == "127.0.0.1" == netns.ensure_internet()
        assert topo.address("prod", 10) == f"127.100.{topo.slot}.10" and topo.exec_prefix("prod") == []
        assert "blackhole" in said[0] and "partition" in said[0] and "DRFLOW_LAB_NETNS=off" in said[0]
        with socket.socket() as s:  # the loopback address is usable as is
            s.bind((topo.address("dr", 10), 0))
            s.listen()
            assert connect(topo.address("dr", 10), s.getsockname()[1]) == "ok"
            assert netns.add_host(topo, "prod", "orders-prod", topo.address("prod", 10)) == []
            assert netns.host_prefix(topo, "orders-prod") == []
            assert netns.call_in_host(topo, "orders-prod", connect, topo.address("dr", 10),
                                      s.getsockname()[1]) == "ok"
        for fault, args in ((netns.blackhole, ("127.100.0.10",)), (netns.partition, ("prod",)),
                            (netns.cut, ("prod", "dr")), (netns.heal, ())):
            with pytest.raises(netns.NetnsError, match="loopback"):
                fault(topo, *args)  # type: ignore[operator]
        assert netns.faults(topo) == [] and netns.processes_in(topo, "prod") == []
    finally:
        netns.destroy(topo)
    assert not (netns.state_dir() / f"{topo.lab_id}.json").exists()
