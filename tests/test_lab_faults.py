"""The lab's faults look to drflow as a datacenter's do: silent hosts, vCenter's own timeline, stuns,
partitions, a lost site; `heal` undoes them; `lab down` leaves nothing, even after a crash."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from pyVmomi import vim

from lab import etcd, faults, manager, netns, postgres, procs, vcsim
from lab.harness import DRFLOW, wait_for
from tests.conftest import new_lab_dir

pytestmark = pytest.mark.skipif(not netns.available()[0],
                                reason=f"the lab runs on loopback here: {netns.available()[1]}")


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    d = new_lab_dir("drflow-faults-")
    state = manager.up(d, groups=3, replication="sync", progress=lambda _m: None, agents=False)
    try:
        yield state
    finally:
        manager.down(d, progress=lambda _m: None)


def _dir(lab: dict[str, Any]) -> Path:
    return Path(lab["dir"])


def _topo(lab: dict[str, Any]) -> netns.Topology:
    topo = manager.topology(lab)
    assert topo is not None
    return topo


def _connect_outcome(host: str, port: int, timeout: float = 1.5) -> str:
    """'ok', 'refused' or 'timeout' for one TCP connect."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "ok"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


# A machine of each site to try connections from: the orchestrator at dr, the vCenter at prod.
_ONLOOKER = {"dr": "orchestrator", "prod": "vcenter-prod"}


def _from(lab: dict[str, Any], site: str, host: str, port: int) -> str:
    return netns.call_in_host(_topo(lab), _ONLOOKER[site], _connect_outcome, host, port)


def _si(lab: dict[str, Any], site: str) -> Any:
    vc = lab["vcenters"][site]
    return vcsim.connect(vc["url"], vc["user"], vc["password"], timeout=5)


def _write_locally(lab: dict[str, Any], node: dict[str, Any], site: str) -> bool:
    db = lab["database"]

    def write() -> bool:
        with psycopg.connect(host=node["host"], port=node["port"], user=db["user"],
                             password=db["password"], dbname=db["name"], connect_timeout=2,
                             autocommit=True,
                             # its synchronous standby is out of reach: commit locally
                             options="-c synchronous_commit=local") as c:
            c.execute("create table if not exists local_writes (at timestamptz default now())")
            c.execute("insert into local_writes default values")
            return True
    return bool(netns.call_in_host(_topo(lab), _ONLOOKER[site], write))


def test_host_loss_is_silent_and_vcenter_follows_its_timeline(lab: dict[str, Any]) -> None:
    g = lab["groups"][0]
    prod = g["primary"]
    assert _from(lab, "dr", prod["host"], prod["port"]) == "ok"
    f = faults.fail(_dir(lab), "host-loss", prod["vm"], not_responding_after=4)
    si = _si(lab, "prod")
    try:
        # A dead host answers nothing: the connect times out, it is never refused.
        assert _from(lab, "dr", prod["host"], prod["port"]) == "timeout"
        assert _connect_outcome(prod["host"], prod["port"]) == "timeout"
        # Until the heartbeat timeout, vCenter still shows the VM on and connected.
        if time.time() - f.at < 3:
            assert vcsim.vm_power_state(si, prod["vm"]) == "poweredOn"
            assert vcsim.vm_connection_state(si, prod["vm"]) == "connected"
        # A power-off through vCenter does not succeed.
        vm = vcsim.find_vm(si, prod["vm"])
        task = vm.PowerOffVM_Task()
        done = wait_for(lambda: task.info.state in ("success", "error") and task.info.state,
                        15, "the power-off task to end")
        assert done == "error"
        wait_for(lambda: vcsim.vm_connection_state(si, prod["vm"]) == "disconnected", 10,
                 "VM disconnected")
        assert time.time() - f.at >= 3.5
        assert vcsim.host_connection_state(si, prod["esx_host"]) == "notResponding"
        assert vcsim.vm_power_state(si, prod["vm"]) == "poweredOn"  # its last known state
        with pytest.raises(vim.fault.VimFault):
            vcsim.power_off(si, prod["vm"])
        # The other groups' hosts are fine.
        other = lab["groups"][1]["primary"]
        assert vcsim.vm_connection_state(si, other["vm"]) == "connected"
        assert _from(lab, "dr", other["host"], other["port"]) == "ok"
    finally:
        faults.heal(_dir(lab))
        vcsim.disconnect(si)
    # Healed: the host is back, the VM shows the power it lost; power it on and it serves again.
    si = _si(lab, "prod")
    try:
        assert vcsim.host_connection_state(si, prod["esx_host"]) == "connected"
        assert vcsim.vm_power_state(si, prod["vm"]) == "poweredOff"
        vcsim.power_on(si, prod["vm"])
    finally:
        vcsim.disconnect(si)
    wait_for(lambda: _from(lab, "dr", prod["host"], prod["port"]) == "ok", 30, "primary back")
    postgres.wait_ready(postgres.Instance.from_dict(lab["postgres"][g["name"]]["primary"]), 30)


def test_a_lost_management_network_leaves_the_vm_serving(lab: dict[str, Any]) -> None:
    prod = lab["groups"][2]["primary"]
    faults.fail(_dir(lab), "mgmt-loss", prod["vm"], not_responding_after=1)
    si = _si(lab, "prod")
    try:
        wait_for(lambda: vcsim.host_connection_state(si, prod["esx_host"]) == "notResponding", 10,
                 "host notResponding")
        assert vcsim.vm_connection_state(si, prod["vm"]) == "disconnected"
        assert _from(lab, "dr", prod["host"], prod["port"]) == "ok"  # it still serves
        with pytest.raises(vim.fault.VimFault):
            vcsim.power_off(si, prod["vm"])
    finally:
        vcsim.disconnect(si)
        faults.heal(_dir(lab))
    si = _si(lab, "prod")
    try:
        assert vcsim.host_connection_state(si, prod["esx_host"]) == "connected"
        assert vcsim.vm_power_state(si, prod["vm"]) == "poweredOn"  # nothing lost its power
    finally:
        vcsim.disconnect(si)


def test_vsphere_ha_restarts_a_lost_host_s_vm_on_the_spare(lab: dict[str, Any]) -> None:
    g = lab["groups"][2]
    dr = g["standby"]
    f = faults.fail(_dir(lab), "host-loss", dr["vm"], not_responding_after=1,
                    ha_restart_after=2)
    assert _from(lab, "prod", dr["host"], dr["port"]) == "timeout"
    faults.wait_ha_restarts()
    si = _si(lab, "dr")
    try:
        assert vcsim.vm_host(si, dr["vm"]).endswith("-spare")
        assert vcsim.vm_connection_state(si, dr["vm"]) == "connected"
    finally:
        vcsim.disconnect(si)
    # The power bridge saw the power-on and started the VM's PostgreSQL again.
    wait_for(lambda: _from(lab, "prod", dr["host"], dr["port"]) == "ok", 30, "standby back")
    assert time.time() - f.at >= 2
    postgres.wait_ready(postgres.Instance.from_dict(lab["postgres"][g["name"]]["standby"]), 30)


def test_a_guest_crash_refuses_and_vcenter_sees_nothing(lab: dict[str, Any]) -> None:
    g = lab["groups"][2]
    dr = g["standby"]
    faults.fail(_dir(lab), "guest-crash", dr["vm"])
    si = _si(lab, "dr")
    try:
        assert _from(lab, "prod", dr["host"], dr["port"]) == "refused"
        assert vcsim.vm_power_state(si, dr["vm"]) == "poweredOn"
        assert vcsim.vm_connection_state(si, dr["vm"]) == "connected"
        vcsim.power_off(si, dr["vm"])  # the host is fine: a power cycle brings it back
        vcsim.power_on(si, dr["vm"])
    finally:
        vcsim.disconnect(si)
    wait_for(lambda: _from(lab, "prod", dr["host"], dr["port"]) == "ok", 30, "standby back")


def test_stun_freezes_for_the_asked_time_with_the_task_visible(lab: dict[str, Any]) -> None:
    g = lab["groups"][1]
    prod = g["primary"]
    db = lab["database"]
    with psycopg.connect(host=prod["host"], port=prod["port"], user=db["user"],
                         password=db["password"], dbname=db["name"], autocommit=True) as c:
        c.execute("select 1")
        f = faults.fail(_dir(lab), "stun", prod["vm"], seconds=2.0, task="snapshot",
                        background=True)
        si = _si(lab, "prod")
        try:
            vm = vcsim.find_vm(si, prod["vm"])
            running = [t for t in vm.recentTask if t.info.state == "running"]
            assert running and running[0].info.descriptionId.startswith("VirtualMachine.createSnapshot")
        finally:
            vcsim.disconnect(si)
        # A query sent during the stun is answered only once the VM runs again.
        c.execute("select 1")
        frozen = time.time() - f.at
    faults.wait_ha_restarts()
    assert 1.8 <= frozen <= 2.3, frozen
    ends = [json.loads(line) for line in (_dir(lab) / "faults.jsonl").read_text().splitlines()]
    end = [e for e in ends if e["kind"] == "stun-end"][-1]
    assert abs(end["detail"]["frozen_for"] - 2.0) <= 0.2


def test_blackhole_silences_an_address_and_heal_restores_it(lab: dict[str, Any]) -> None:
    dr = lab["groups"][1]["standby"]
    faults.fail(_dir(lab), "blackhole", dr["vm"])
    try:
        assert _from(lab, "prod", dr["host"], dr["port"]) == "timeout"
        assert _connect_outcome(dr["host"], dr["port"]) == "timeout"
        assert postgres.is_running(postgres.Instance.from_dict(
            lab["postgres"][lab["groups"][1]["name"]]["standby"]))  # it still runs
    finally:
        faults.heal(_dir(lab))
    assert _from(lab, "prod", dr["host"], dr["port"]) == "ok"


def test_partition_drops_both_ways_while_the_site_keeps_serving(lab: dict[str, Any]) -> None:
    g = lab["groups"][1]
    prod, dr = g["primary"], g["standby"]
    vc_prod = lab["vcenters"]["prod"]
    faults.fail(_dir(lab), "partition", "prod")
    try:
        assert _from(lab, "dr", prod["host"], prod["port"]) == "timeout"
        assert _from(lab, "prod", dr["host"], dr["port"]) == "timeout"
        assert _connect_outcome(prod["host"], prod["port"]) == "timeout"  # the laptop too
        # Prod's etcd member is cut off with it; DR and the witness keep a majority.
        assert _from(lab, "dr", _etcd_host(lab, "prod"), 2379) == "timeout"
        assert _from(lab, "prod", _etcd_host(lab, "prod"), 2379) == "ok"
        etcd.Client(lab["etcd"]["by_site"]["dr"], timeout=3).put("while-prod-was-away", "yes")
        # Inside the site all runs: the cut-off primary takes a local write.
        assert _from(lab, "prod", prod["host"], prod["port"]) == "ok"
        assert _write_locally(lab, prod, "prod")
        port = int(vc_prod["url"].rsplit(":", 1)[1].split("/")[0])
        assert _from(lab, "prod", vc_prod["address"], port) == "ok"
    finally:
        faults.heal(_dir(lab))
    assert _from(lab, "dr", prod["host"], prod["port"]) == "ok"


def test_cut_drops_only_the_link_between_two_sites(lab: dict[str, Any]) -> None:
    g = lab["groups"][1]
    prod, dr = g["primary"], g["standby"]
    faults.fail(_dir(lab), "cut", "prod", other="dr")
    try:
        assert _from(lab, "dr", prod["host"], prod["port"]) == "timeout"
        assert _from(lab, "prod", dr["host"], dr["port"]) == "timeout"
        assert _connect_outcome(prod["host"], prod["port"]) == "ok"
        assert _connect_outcome(dr["host"], dr["port"]) == "ok"
    finally:
        faults.heal(_dir(lab))
    assert _from(lab, "dr", prod["host"], prod["port"]) == "ok"


def _etcd_host(lab: dict[str, Any], site: str) -> str:
    return str(lab["etcd"]["by_site"][site]).removeprefix("http://").rsplit(":", 1)[0]


def _as_postgres_in(lab: dict[str, Any], vm: str, host: str, port: int) -> str:
    """One connect from a VM's network as the `postgres` user (not root, as its agent is)."""
    code = (f"import socket\ntry:\n socket.create_connection(({host!r}, {port}), timeout=1.5)\n"
            " print('ok')\nexcept TimeoutError:\n print('timeout')\n"
            "except ConnectionRefusedError:\n print('refused')\n")
    out = subprocess.run([*netns.host_prefix(_topo(lab), vm), "runuser", "-u", "postgres", "--",
                          "python3", "-c", code], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or out.stderr


def test_agent_cut_silences_the_agent_but_not_replication(lab: dict[str, Any]) -> None:
    g = lab["groups"][2]
    prod, dr = g["primary"], g["standby"]
    db = lab["database"]
    primary = postgres.Instance.from_dict(lab["postgres"][g["name"]]["primary"])
    etcd_dr = _etcd_host(lab, "dr")

    def root_connect(host: str, port: int) -> str:  # root, like the agent
        return netns.call_in_host(_topo(lab), prod["vm"], _connect_outcome, host, port)

    assert root_connect(etcd_dr, 2379) == "ok"
    f = faults.fail(_dir(lab), "agent-cut", prod["vm"])
    try:
        assert f.kind == "agent-cut"
        # The agent's connects vanish (a timeout, not an error at once), to etcd and everything else.
        assert root_connect(etcd_dr, 2379) == "timeout"
        assert root_connect(_etcd_host(lab, "witness"), 2379) == "timeout"
        assert root_connect(dr["host"], dr["port"]) == "timeout"
        # Its own PostgreSQL over the VM's address (lo) is still watched.
        assert root_connect(prod["host"], prod["port"]) == "ok"
        # Another user of the VM still reaches etcd; other VMs' agents are not cut.
        assert _as_postgres_in(lab, prod["vm"], etcd_dr, 2379) == "ok"
        assert netns.call_in_host(_topo(lab), dr["vm"], _connect_outcome, etcd_dr, 2379) == "ok"
        # Replication carries on past wal_sender_timeout/wal_receiver_timeout (2 s): a
        # synchronous commit is acknowledged by the standby.
        time.sleep(2.5)
        with psycopg.connect(host=prod["host"], port=prod["port"], user=db["user"],
                             password=db["password"], dbname=db["name"], connect_timeout=2,
                             autocommit=True, options="-c statement_timeout=5000") as c:
            c.execute("create table if not exists agent_cut (at timestamptz default now())")
            c.execute("insert into agent_cut default values")
            row = c.execute("select state, sync_state, now() - reply_time < interval '2 s' "
                            "from pg_stat_replication").fetchone()
        assert row == ("streaming", "sync", True), row
        assert postgres.health(primary)[0]
    finally:
        faults.heal(_dir(lab))
    assert root_connect(etcd_dr, 2379) == "ok"


def test_agent_cut_silences_the_agent_s_control_port(lab: dict[str, Any]) -> None:
    """The control port is dropped on input whoever listens (here a listener of `postgres`,
    whose own replies the output rule would not drop)."""
    vm = lab["groups"][1]["standby"]
    port = procs.free_port()
    code = (f"import socket,time\ns=socket.socket()\ns.bind(({vm['host']!r},{port}))\n"
            "s.listen()\ntime.sleep(60)\n")
    listener = subprocess.Popen([*netns.host_prefix(_topo(lab), vm["vm"]), "runuser", "-u",
                                 "postgres", "--", "python3", "-c", code])
    try:
        wait_for(lambda: _connect_outcome(vm["host"], port) == "ok", 10, "the listener")
        netns.agent_cut(_topo(lab), vm["vm"], port)
        try:
            assert _connect_outcome(vm["host"], port) == "timeout"
            assert _connect_outcome(vm["host"], vm["port"]) == "ok"  # PostgreSQL still answers
        finally:
            netns.agent_uncut(_topo(lab), vm["vm"])
        assert _connect_outcome(vm["host"], port) == "ok"
    finally:
        procs.kill_tree(listener.pid)
        listener.wait(5)


def test_etcd_down_and_heal_brings_members_back_with_their_data(lab: dict[str, Any]) -> None:
    info = lab["etcd"]
    everyone = etcd.Client(info["endpoints"], timeout=1.0)
    faults.fail(_dir(lab), "etcd-down", "dr")
    ok, detail = etcd.health(info)
    assert not ok and "2/3 members up" in detail and "etcd-dr" in detail, detail
    assert "leader etcd-witness" in detail  # a follower lost: no election
    assert _connect_outcome(_etcd_host(lab, "dr"), 2379) == "refused"
    everyone.put("written-while-dr-was-down", "yes")
    out = subprocess.run([DRFLOW, "lab", "heal", "--dir", lab["dir"]], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    state = manager.load(_dir(lab))
    wait_for(lambda: etcd.health(state["etcd"])[0], 10, "etcd healthy after the heal")
    # Same data dir, same member: it caught up on what the majority wrote meanwhile.
    assert etcd.Client(info["by_site"]["dr"]).get("written-while-dr-was-down") == "yes"
    new_pid = next(m["pid"] for m in state["etcd"]["members"] if m["name"] == "etcd-dr")
    assert procs.pid_alive(new_pid) and new_pid != next(
        m["pid"] for m in info["members"] if m["name"] == "etcd-dr")
    lab["etcd"] = state["etcd"]  # later tests see the new pid

    # All of it hung: connects still complete, nothing answers.
    out = subprocess.run([DRFLOW, "lab", "fail", "etcd-down", "all", "--hang", "--dir", lab["dir"]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        assert _connect_outcome(_etcd_host(lab, "witness"), 2379) == "ok"
        with pytest.raises(etcd.EtcdError):
            etcd.Client(info["endpoints"], timeout=0.5).get("written-while-dr-was-down")
    finally:
        faults.heal(_dir(lab))
    wait_for(lambda: etcd.health(lab["etcd"])[0], 10, "etcd healthy after the heal")
    assert everyone.get("written-while-dr-was-down") == "yes"


def test_partition_witness_is_the_witness_down(lab: dict[str, Any]) -> None:
    info = lab["etcd"]
    faults.fail(_dir(lab), "partition", "witness")
    try:
        assert _connect_outcome(_etcd_host(lab, "witness"), 2379) == "timeout"
        # Its member led: prod and DR elect one of theirs and keep serving.
        dr = etcd.Client(info["by_site"]["dr"], timeout=0.5)

        def put() -> bool:
            try:
                dr.put("while-the-witness-was-away", "yes")
                return True
            except etcd.EtcdError:
                return False
        wait_for(put, 10, "a put through the prod+DR majority")
        ok, detail = etcd.health(info)
        assert not ok and "2/3 members up" in detail and "etcd-witness" in detail, detail
    finally:
        faults.heal(_dir(lab))
    wait_for(lambda: etcd.health(info)[0], 10, "etcd healthy after the heal")
    etcd.move_leader(info, "etcd-witness")  # as lab up leaves it


def test_faults_refuse_bad_targets(lab: dict[str, Any]) -> None:
    for kind, target in (("host-loss", "nosuch-vm"), ("partition", "orders-prod"),
                         ("explode", "prod"), ("agent-cut", "prod"), ("etcd-down", "mars")):
        with pytest.raises(faults.FaultError):
            faults.fail(_dir(lab), kind, target)
    out = subprocess.run([DRFLOW, "lab", "fail", "stun", lab["groups"][0]["primary"]["vm"],
                          "soon", "--dir", lab["dir"]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "SECONDS" in out.stdout + out.stderr


def test_site_loss_takes_the_site_and_its_vcenter(lab: dict[str, Any]) -> None:
    """Last in this module: a lost site stays lost."""
    vc_prod, vc_dr = lab["vcenters"]["prod"], lab["vcenters"]["dr"]
    prod = lab["groups"][0]["primary"]
    faults.fail(_dir(lab), "site-loss", "prod")
    faults.heal(_dir(lab))  # a lost site stays lost
    port = int(vc_prod["url"].rsplit(":", 1)[1].split("/")[0])
    assert _connect_outcome(vc_prod["address"], port) == "timeout"
    assert _from(lab, "dr", vc_prod["address"], port) == "timeout"
    assert _connect_outcome(prod["host"], prod["port"]) == "timeout"
    si = vcsim.connect(vc_dr["url"], vc_dr["user"], vc_dr["password"], timeout=5)
    vcsim.disconnect(si)
    assert not procs.pid_alive(lab["processes"]["vcsim-prod"])
    # Its etcd member died with it; DR and the witness keep a majority with a leader.
    state = manager.load(_dir(lab))
    prod_member = next(m for m in state["etcd"]["members"] if m["name"] == "etcd-prod")
    assert not procs.pid_alive(prod_member["pid"])
    ok, detail = etcd.health(state["etcd"])
    assert not ok and "2/3 members up" in detail and "leader etcd-" in detail, detail
    assert "leader none" not in detail and "leader etcd-prod" not in detail
    etcd.Client(state["etcd"]["endpoints"], timeout=2).put("after-prod-was-lost", "yes")


def _holds_file_in(pid: int, lab_dir: Path) -> bool:
    """Has the process a file of the lab open (its log, say), even one deleted since?"""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(lab_dir) + "/"):
                return True
        except OSError:
            continue
    return False


def _leftovers(lab_dir: Path, lab_id: str) -> list[str]:
    left = []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left += [n for n in out.split() if n.startswith(f"drfl-{lab_id}")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [ln.split(":")[1].strip() for ln in links.splitlines() if f"dfl{lab_id}" in ln]
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if str(lab_dir) in " ".join(p.info["cmdline"] or []) or \
                (p.info["cwd"] or "").startswith(str(lab_dir)) or _holds_file_in(p.pid, lab_dir):
            left.append(f"pid {p.pid} {' '.join(p.info['cmdline'] or [])[:80]}")
    if lab_dir.exists():
        left.append(str(lab_dir))
    return left


def test_lab_down_leaves_nothing_after_the_manager_is_killed() -> None:
    d = new_lab_dir("drflow-crash-")
    proc = subprocess.Popen([DRFLOW, "lab", "up", "--groups", "1", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it half-way: its networks and some processes exist, the lab is not complete.
        # moto's command line names nothing of the lab: it must be found all the same.
        wait_for(lambda: (d / "lab.json").exists() and
                 "network" in json.loads((d / "lab.json").read_text() or "{}") and
                 any(d.glob("pg/*/prod/server.log")) and (d / "logs" / "moto.log").exists(),
                 60, "the lab half-way up")
        lab_id = json.loads((d / "lab.json").read_text())["network"]["lab_id"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(1)
        assert _leftovers(d, lab_id), "nothing was started before the kill: the test proves nothing"
        out = subprocess.run([DRFLOW, "lab", "down", "--dir", str(d)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _leftovers(d, lab_id) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        manager.down(d, progress=lambda _m: None)


def test_lab_up_removes_what_a_crashed_lab_left() -> None:
    d = new_lab_dir("drflow-crash-")
    proc = subprocess.Popen([DRFLOW, "lab", "up", "--groups", "1", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (d / "lab.json").exists() and
                 "network" in json.loads((d / "lab.json").read_text() or "{}"), 60,
                 "the lab's networks")
        lab_id = json.loads((d / "lab.json").read_text())["network"]["lab_id"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        state = manager.up(d, groups=1, progress=lambda _m: None, agents=False)
        assert state["network"]["lab_id"] != lab_id
        assert [x for x in _leftovers(d, lab_id) if not x.startswith(("pid", "/"))] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        manager.down(d, progress=lambda _m: None)


def _listening(prefix: list[str]) -> set[str]:
    out = subprocess.run([*prefix, "ss", "-ltnH"], capture_output=True, text=True, check=True)
    return {line.split()[3].rsplit(":", 1)[0] for line in out.stdout.splitlines()}


def test_a_lab_with_agents_goes_down_without_leftovers() -> None:
    d = new_lab_dir("drflow-down-")
    try:
        state = manager.up(d, groups=1, replication="sync", progress=lambda _m: None)
        lab_id = state["network"]["lab_id"]
        topo = manager.topology(state)
        assert topo is not None
        # Each VM's PostgreSQL and agent listen on the VM's own address, and on nothing else.
        for role in ("primary", "standby"):
            node = state["groups"][0][role]
            wait_for(lambda n=node: procs.port_open(int(n["agent_url"].rsplit(":", 1)[1]),
                                                   n["host"]), 30, "the agent's control API")
            assert _listening(netns.host_prefix(topo, node["vm"])) == {node["host"]}
        # The orchestrator's address is at the DR site, moto and Slack on the internet address.
        assert topo.location_of(state["orchestrator"]["address"]) == "dr"
        assert state["aws"]["endpoint_url"].startswith(f"http://{netns.INTERNET_ADDRESS}:")
    finally:
        manager.down(d, progress=lambda _m: None)
    assert _leftovers(d, lab_id) == []



def test_without_namespaces_the_lab_runs_on_loopback_and_says_what_it_cannot_do(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRFLOW_LAB_NETNS", "off")
    d = new_lab_dir("drflow-loopback-")
    said: list[str] = []
    try:
        state = manager.up(d, groups=1, replication="sync", progress=said.append, agents=False)
        prod = state["groups"][0]["primary"]
        assert prod["host"].startswith("127.") and prod["host"] != state["groups"][0]["standby"]["host"]
        assert any("host-loss" in m and "cannot" in m for m in said), said
        with pytest.raises(faults.FaultError, match="loopback"):
            faults.fail(d, "host-loss", prod["vm"])
        faults.fail(d, "guest-crash", prod["vm"])
        assert _connect_outcome(prod["host"], prod["port"]) == "refused"
        # One etcd member on a loopback address stands for every location.
        assert [m["name"] for m in state["etcd"]["members"]] == ["etcd-dr"]
        assert etcd.health(state["etcd"])[0]
        faults.fail(d, "etcd-down", "witness")
        assert not etcd.health(state["etcd"])[0]
        faults.heal(d)
        assert etcd.health(manager.load(d)["etcd"])[0]
    finally:
        manager.down(d, progress=lambda _m: None)
