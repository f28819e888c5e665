"""The lab's etcd on real namespaces: a member at prod, DR and the witness; quorum across a
partition; leases and the create-if-absent transaction that the next issue's fencing builds on."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lab import etcd, netns
from lab.netns import Topology

needs_netns = pytest.mark.skipif(not netns.available()[0], reason=f"no namespaces: {netns.available()[1]}")
SITES = ("prod", "dr", "witness")
T = TypeVar("T")


@dataclass
class Cluster:
    topo: Topology
    lab_dir: Path
    members: dict[str, etcd.Member]
    info: dict[str, Any]

    def client(self, site: str, timeout: float = 2.0) -> etcd.Client:
        return etcd.Client(self.members[site].client_url, timeout)

    def in_host(self, site: str, fn: Callable[[], T]) -> T:
        """Run fn inside the site's etcd host: the test process (the internet) is cut off too."""
        return netns.call_in_host(self.topo, self.members[site].name, fn)

    def member_id(self, site: str) -> int:
        return int(self.client(site).status()["header"]["member_id"])

    def leader_site(self, via: str) -> str | None:
        leader = int(self.client(via).status().get("leader", 0))
        return next((s for s in SITES if self.member_id(s) == leader), None)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not netns.available()[0]:
        pytest.skip(f"no namespaces: {netns.available()[1]}")
    lab_dir = tmp_path_factory.mktemp("etcd") / "lab"
    topo = netns.create(lab_dir, progress=lambda _m: None)
    info: dict[str, Any] = {}
    try:
        members = {}
        for site in SITES:
            address = topo.address(site, 40)
            name = f"etcd-{site}"
            members[site] = etcd.Member(name, address, netns.add_host(topo, site, name, address))
        t0 = time.monotonic()
        info = etcd.start_cluster(lab_dir, list(members.values()))
        print(f"3-member cluster answered /health with a leader {time.monotonic() - t0:.2f} s after start")
        yield Cluster(topo, lab_dir, members, info)
    finally:
        etcd.stop_cluster(info)
        netns.destroy(topo)


@needs_netns
def test_three_members_elect_a_leader_and_replicate(cluster: Cluster) -> None:
    ok, detail = etcd.health(cluster.info)
    assert ok, detail
    assert "3/3 members up" in detail and "leader etcd-" in detail
    assert [m["name"] for m in cluster.info["members"]] == ["etcd-prod", "etcd-dr", "etcd-witness"]
    assert cluster.info["endpoints"] == [f"http://{cluster.topo.address(s, 40)}:2379" for s in SITES]

    key = f"replicated-{secrets.token_hex(4)}"
    cluster.client("dr").put(key, "written at DR")
    # Linearizable: the witness answers only after its leader confirms it is up to date.
    assert cluster.client("witness").get(key) == "written at DR"
    assert cluster.client("prod").get(key) == "written at DR"


@needs_netns
def test_lease_expires_its_ttl_after_the_last_keepalive(cluster: Cluster) -> None:
    dr, witness = cluster.client("dr"), cluster.client("witness")
    # etcd raises a TTL to 1.5 x the election timeout rounded up to whole seconds: 1 s becomes 2 s.
    assert dr.grant(1)[1] == 2
    lease, ttl = dr.grant(2)
    assert ttl == 2
    key = f"leased-{secrets.token_hex(4)}"
    dr.put(key, "held", lease=lease)
    for _ in range(3):  # 2.1 s of renewals: longer than the TTL, so renewing works
        time.sleep(0.7)
        sent = time.monotonic()
        assert dr.keepalive(lease) == 2
    while witness.get(key) is not None:
        assert time.monotonic() - sent < ttl + 3, "the lease did not expire"
        time.sleep(0.02)
    gone = time.monotonic() - sent
    print(f"lease TTL {ttl} s: key gone {gone:.2f} s after the last keepalive was sent")
    # Never before its TTL counted from when the renewal was sent (what a holder's deadline counts
    # from); late by at most the lessor's 0.5 s expiry check plus the revoke's round through raft.
    assert ttl <= gone <= ttl + 1.0
    assert dr.keepalive(lease) == 0  # an expired lease is gone, not renewable


@needs_netns
def test_create_if_absent_succeeds_once_while_the_key_lives(cluster: Cluster) -> None:
    dr, witness = cluster.client("dr"), cluster.client("witness")
    lease, _ = dr.grant(30)
    key = f"leader-{secrets.token_hex(4)}"
    assert dr.txn_create_if_absent(key, "first", lease) is True
    assert witness.txn_create_if_absent(key, "second", lease) is False
    assert witness.get(key) == "first"
    dr.revoke(lease)  # the key goes with its lease: the next taker gets it
    assert witness.get(key) is None
    assert witness.txn_create_if_absent(key, "second") is True
    assert dr.get(key) == "second"


@needs_netns
def test_partition_prod_keeps_the_dr_witness_majority(cluster: Cluster) -> None:
    dr = cluster.client("dr", timeout=0.3)
    # The worst case for the majority: prod's member leads and takes its leadership with it.
    leader = cluster.leader_site("dr")
    assert leader is not None
    if leader != "prod":
        cluster.client(leader).move_leader(cluster.member_id("prod"))
    deadline = time.monotonic() + 5
    while cluster.leader_site("dr") != "prod":
        assert time.monotonic() < deadline, "leadership did not move to prod"
        time.sleep(0.05)
    lease, ttl = dr.grant(2)
    leased = f"leased-{secrets.token_hex(4)}"
    dr.put(leased, "held", lease=lease)
    sent = time.monotonic()
    assert dr.keepalive(lease) == ttl
    key = f"during-{secrets.token_hex(4)}"
    prod_id = cluster.member_id("prod")

    t0 = time.monotonic()
    netns.partition(cluster.topo, "prod")
    try:
        while int(_or_zero(dr.status).get("leader", 0)) in (0, prod_id):
            assert time.monotonic() - t0 < 10, "DR and the witness elected no leader"
            time.sleep(0.02)
        elected = time.monotonic() - t0
        while True:
            try:
                dr.put(key, "majority")
                break
            except etcd.EtcdError:
                assert time.monotonic() - t0 < 10, "the DR+witness majority never accepted a put"
        accepted = time.monotonic() - t0
        print(f"partition prod (prod led): new leader after {elected:.2f} s, "
              f"DR+witness accepted a put after {accepted:.2f} s")
        # Randomised election timeout in [1 s, 2 s); a pre-vote refused by a follower that heard the
        # old leader a tick later costs one more timeout.
        assert accepted < 4.0
        assert cluster.client("witness").get(key) == "majority"

        while dr.get(leased) is not None:
            assert time.monotonic() - sent < 15, "the lease held at prod's leader never expired"
            time.sleep(0.02)
        gone = time.monotonic() - t0
        extend = etcd.ELECTION_MS / 1000
        print(f"lease TTL {ttl} s across the partition: gone {gone:.2f} s after the partition, "
              f"{time.monotonic() - sent:.2f} s after its last keepalive "
              f"({elected:.2f} s election + {ttl} s TTL + {extend:g} s)")
        # The new leader restarts every lease's full TTL plus one election timeout (the lessor's
        # Promote): a holder cut off with the old leader is outlived by that much.
        assert elected + ttl + extend - 0.1 <= gone <= elected + ttl + extend + 1.0

        def cut_off() -> tuple[str, str, str | None, tuple[bool, str]]:
            prod = etcd.Client(cluster.members["prod"].client_url, timeout=1.5)
            outcome = []
            for attempt in (lambda: prod.put(key, "from prod"), lambda: prod.get(key)):
                try:
                    attempt()
                    outcome.append("answered")
                except etcd.EtcdError as e:
                    outcome.append(str(e))
            return (outcome[0], outcome[1], prod.get(key, serializable=True),
                    etcd.member_health(cluster.members["prod"].client_url))

        put, get, stale, prod_health = cluster.in_host("prod", cut_off)
        assert "answered" not in (put, get), (put, get)
        assert stale is None  # its own copy: it never saw the majority's write
        assert prod_health[0] is False, prod_health
        ok, detail = etcd.health(cluster.info)
        assert not ok and "2/3 members up" in detail and "etcd-prod" in detail, detail
        term = int(cluster.client("dr").status()["header"]["raft_term"])
    finally:
        healed = time.monotonic()
        netns.heal(cluster.topo)

    def caught_up() -> float:
        prod = etcd.Client(cluster.members["prod"].client_url, timeout=1.0)
        while True:
            try:
                if prod.get(key) == "majority":
                    return time.monotonic() - healed
            except etcd.EtcdError:
                pass
            assert time.monotonic() - healed < 10, "prod's member did not catch up after the heal"
            time.sleep(0.02)

    print(f"heal: prod's member served the majority's write {cluster.in_host('prod', caught_up):.2f} s later")
    # Prod's refused put was never committed: prod's leader had it only in its own log (or, once
    # it stepped down, dropped it), and the new leader's log replaced that.
    assert cluster.client("dr").get(key) == "majority"
    deadline = time.monotonic() + 5
    while not etcd.health(cluster.info)[0]:
        assert time.monotonic() < deadline, etcd.health(cluster.info)[1]
        time.sleep(0.1)
    # Pre-vote: prod's member campaigned for seconds without raising its term, so rejoining did not
    # depose the majority's leader (an election would stall every lease renewal for 1-2 s).
    assert int(cluster.client("dr").status()["header"]["raft_term"]) == term


def _or_zero(status: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A member's status, or {} while it does not answer in time."""
    try:
        return status()
    except etcd.EtcdError:
        return {}


def test_single_member_on_loopback(tmp_path: Path) -> None:
    """What `drflow up` starts on one machine: one member, no namespace."""
    address = f"127.{secrets.randbelow(50) + 200}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}"
    t0 = time.monotonic()
    info = etcd.start_cluster(tmp_path, [etcd.Member("solo", address)])
    try:
        print(f"single member answered /health with a leader {time.monotonic() - t0:.2f} s after start")
        assert etcd.health(info) == (True, "leader solo, 1/1 members up")
        c = etcd.Client(info["endpoints"][0])
        c.put("k", "v")
        assert c.get("k") == "v"
        assert (tmp_path / "etcd" / "solo" / "member").is_dir()
        assert (tmp_path / "logs" / "etcd-solo.log").is_file()
        with pytest.raises(etcd.EtcdError, match="already holds etcd data"):
            etcd.start_cluster(tmp_path, [etcd.Member("solo", address)])
    finally:
        etcd.stop_cluster(info)
    ok, detail = etcd.health(info)
    assert not ok and "not running" in detail


def test_restart_member_keeps_its_data(tmp_path: Path) -> None:
    """What `lab heal` does after `etcd-down`: the same data dir, --initial-cluster-state existing."""
    address = f"127.{secrets.randbelow(50) + 200}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}"
    info = etcd.start_cluster(tmp_path, [etcd.Member("solo", address)])
    try:
        etcd.Client(info["endpoints"][0]).put("kept", "yes")
        etcd.stop_cluster(info)
        assert not etcd.health(info)[0]
        info["members"] = [etcd.restart_member(info["members"][0])]
        assert "existing" in info["members"][0]["argv"]
        deadline = time.monotonic() + 10
        while not etcd.health(info)[0]:
            assert time.monotonic() < deadline, etcd.health(info)[1]
            time.sleep(0.05)
        assert etcd.Client(info["endpoints"][0]).get("kept") == "yes"
    finally:
        etcd.stop_cluster(info)


def test_drflow_up_starts_a_member_only_for_one_silent_loopback_endpoint(tmp_path: Path) -> None:
    from orchestrator import etcd_local

    address = f"127.{secrets.randbelow(50) + 200}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}"
    url = f"http://{address}:2379"
    assert etcd_local.to_start([url + "/"]) == url
    assert etcd_local.to_start(["http://198.18.0.12:2379"]) is None  # not loopback: not ours
    assert etcd_local.to_start([url, f"http://{address}:12379"]) is None  # a cluster elsewhere
    local = etcd_local.start_local_etcd(tmp_path / "etcd" / "data", url)
    try:
        etcd.Client(url).put("k", "v")
        # Someone answers there now (as a system etcd would): nothing more is started.
        assert etcd_local.to_start([url]) is None
        assert (tmp_path / "etcd" / "etcd.log").is_file()
    finally:
        local.stop()
    local = etcd_local.start_local_etcd(tmp_path / "etcd" / "data", url)  # a restart of drflow up
    try:
        assert etcd.Client(url).get("k") == "v"
    finally:
        local.stop()
    assert etcd_local.to_start([url]) == url


def test_a_silent_member_costs_one_timeout_per_process_not_one_per_client(tmp_path: Path) -> None:
    """A member lost with its site (connects accepted, nothing answered, as a frozen member): the
    first client pays its timeout, the others (five failovers starting together) ask the live
    member first."""
    import socket

    from drflow import etcd as core_etcd

    address = f"127.{secrets.randbelow(50) + 200}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}"
    info = etcd.start_cluster(tmp_path, [etcd.Member("solo", address)])
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes connects; nobody ever reads or answers
    dead = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        live = info["endpoints"][0]
        core_etcd.Client(live).put("k", "v")
        t0 = time.monotonic()
        assert core_etcd.Client([dead, live], timeout=1.0).get("k") == "v"
        first = time.monotonic() - t0
        t1 = time.monotonic()
        assert core_etcd.Client([dead, live], timeout=1.0).get("k") == "v"
        second = time.monotonic() - t1
        print(f"first client {first:.2f} s, a second one {second:.3f} s")
        assert first >= 1.0 and second < 0.5, (first, second)
    finally:
        silent.close()
        etcd.stop_cluster(info)
        core_etcd._suspect(dead, False)
