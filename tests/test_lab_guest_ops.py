"""vSphere guest operations on the lab: files into a VM and programs run in it, through the site's
vCenter, in the VM's own address and directories; refused as vCenter refuses them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic import SecretStr

from lab import faults, manager, postgres, vcsim
from tasks.vsphere import find_vm
from tasks.vsphere_guest import (
    GuestError,
    GuestLogin,
    download,
    processes,
    start_program,
    terminate,
    upload,
    wait_exit,
)
from tests.harness import new_lab_dir, wait_for

pytestmark = pytest.mark.lab

PROBE = b"""#!/bin/sh
# Where am I: my addresses, my argument and environment, and what this VM's directory holds.
ip -4 -o addr show | awk '{print $4}' > /var/lib/drflow/where
echo "arg=$1 env=$PROBE_ENV" >> /var/lib/drflow/where
ls /opt/drflow >> /var/lib/drflow/where
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    d = new_lab_dir("drflow-guest-")
    state = manager.up(d, groups=1, replication="sync", progress=lambda _m: None, agents=False,
                       unprotected=["crm"])
    try:
        yield state
    finally:
        faults.heal(d)
        manager.down(d, progress=lambda _m: None)


def _site(lab: dict[str, Any], site: str) -> tuple[Any, str]:
    vc = lab["vcenters"][site]
    return vcsim.connect(vc["url"], vc["user"], vc["password"]), vc["url"]


def _vcenter(lab: dict[str, Any], site: str) -> Any:
    from tasks.vsphere import VCenter

    vc = lab["vcenters"][site]
    return VCenter(vc["url"], vc["user"], SecretStr(vc["password"]), site)


def _login(lab: dict[str, Any], password: str | None = None) -> GuestLogin:
    return GuestLogin(lab["guest"]["user"], SecretStr(password or lab["guest"]["password"]))


def test_a_file_pushed_into_a_vm_runs_there_in_its_address_and_directories(
        lab: dict[str, Any]) -> None:
    g = lab["groups"][0]
    si, url = _site(lab, "prod")
    vm, login = find_vm(si, g["primary"]["vm"]), _login(lab)
    upload(si, url, vm, login, PROBE, "/opt/drflow/probe.sh", mode=0o755)
    upload(si, url, vm, login, b"x", "/var/lib/drflow/.keep")
    pid = start_program(si, vm, login, "/opt/drflow/probe.sh", "hello",
                        env={"PROBE_ENV": "set"})
    assert wait_exit(si, vm, login, pid, 10) == 0
    where = download(si, url, vm, login, "/var/lib/drflow/where").decode()
    assert f"{g['primary']['host']}/" in where, where  # the VM's address, not the machine's
    assert "arg=hello env=set" in where and "probe.sh" in where, where
    # The files are the VM's own: in its directory of the lab, not the DR VM's, not the machine's.
    lab_dir = Path(lab["dir"])
    assert (lab_dir / "vms" / g["primary"]["vm"] / "opt/drflow/probe.sh").stat().st_mode & 0o777 \
        == 0o755
    assert not (lab_dir / "vms" / g["standby"]["vm"] / "opt/drflow/probe.sh").exists()
    assert not Path("/opt/drflow/probe.sh").exists()
    [proc] = processes(si, vm, login, [pid])
    assert proc.exit_code == 0 and "probe.sh hello" in proc.cmdline


def test_a_lone_database_vm_serves_at_prod_with_a_template_to_protect_it_at_dr(
        lab: dict[str, Any]) -> None:
    [lone] = lab["unprotected"]
    assert (lone["name"], lone["vm"], lone["standby"]["vm"]) == ("crm", "crm-prod", "crm-dr")
    inst = lab["postgres_unprotected"]["crm"]
    assert (inst["host"], inst["port"]) == (lone["host"], lone["port"])
    with postgres.admin_conn(postgres.Instance.from_dict(inst)) as c:
        assert c.execute("select not pg_is_in_recovery()").fetchone() == (True,)
        assert c.execute("show synchronous_standby_names").fetchone() == ("",)
    si, url = _site(lab, "prod")
    vm = find_vm(si, "crm-prod")
    assert vm.runtime.powerState == "poweredOn" and vm.runtime.host.name == lone["esx_host"]
    si_dr, _ = _site(lab, "dr")
    with pytest.raises(LookupError):
        find_vm(si_dr, "crm-dr")  # protect creates it
    template = find_vm(si_dr, lab["template"]["vm"])
    assert template.config.template and template.runtime.powerState == "poweredOff"
    assert lone["standby"]["esx_host"] == lone["esx_host"].replace("esx-prod-", "esx-dr-")
    # It takes guest operations like any lab VM, in its own address.
    login = _login(lab)
    upload(si, url, vm, login, PROBE, "/opt/drflow/probe.sh", mode=0o755)
    upload(si, url, vm, login, b"x", "/var/lib/drflow/.keep")
    assert wait_exit(si, vm, login, start_program(si, vm, login, "/opt/drflow/probe.sh"), 10) == 0
    assert f"{lone['host']}/" in download(si, url, vm, login, "/var/lib/drflow/where").decode()


def test_guest_operations_are_refused_as_vcenter_refuses_them(lab: dict[str, Any]) -> None:
    g = lab["groups"][0]
    si, url = _site(lab, "prod")
    vm = find_vm(si, g["primary"]["vm"])
    wrong = "not-the-guest-password"
    with pytest.raises(GuestError, match="refused the login") as bad:
        upload(si, url, vm, _login(lab, wrong), b"x", "/opt/drflow/x")
    assert wrong not in str(bad.value) and lab["guest"]["password"] not in str(bad.value)
    with pytest.raises(GuestError, match="may not do it"):
        upload(si, url, vm, _login(lab), b"x", "/usr/local/bin/x")
    with pytest.raises(GuestError, match="no such file"):
        download(si, url, vm, _login(lab), "/var/lib/drflow/never-written")


def test_a_vm_powered_off_takes_its_programs_with_it(lab: dict[str, Any]) -> None:
    g = lab["groups"][0]
    si, _ = _site(lab, "dr")
    vm, login = find_vm(si, g["standby"]["vm"]), _login(lab)
    pid = start_program(si, vm, login, "/bin/sleep", "300")
    assert psutil.pid_exists(pid)
    stopped = start_program(si, vm, login, "/bin/sleep", "300")
    terminate(si, vm, login, stopped)
    assert wait_exit(si, vm, login, stopped, 5) == 128 + 9
    faults.fail(Path(lab["dir"]), "power-off", g["standby"]["vm"])
    try:
        wait_for(lambda: not _alive(pid), 5, "the program gone with its VM's power")
        with pytest.raises(GuestError, match="Tools is not running"):
            start_program(si, vm, login, "/bin/true")
    finally:
        task = vm.PowerOnVM_Task()
        deadline = time.monotonic() + 30
        while task.info.state not in ("success", "error") and time.monotonic() < deadline:
            time.sleep(0.1)


def test_a_guest_crash_kills_what_guest_operations_started(lab: dict[str, Any]) -> None:
    g = lab["groups"][0]
    si, _ = _site(lab, "prod")
    vm, login = find_vm(si, g["primary"]["vm"]), _login(lab)
    pid = start_program(si, vm, login, "/bin/sleep", "300")
    fault = faults.fail(Path(lab["dir"]), "guest-crash", g["primary"]["vm"])
    assert fault.detail["killed"] >= 2, fault  # PostgreSQL's tree and the program
    assert wait_exit(si, vm, login, pid, 5) == 128 + 9


def _wait(task: Any) -> Any:
    deadline = time.monotonic() + 30
    while task.info.state not in ("success", "error"):
        assert time.monotonic() < deadline, "vCenter task did not end"
        time.sleep(0.05)
    assert task.info.state == "success", task.info.error
    return task.info.result


UNIT = b"""[Unit]
Description=what boots with the VM

[Service]
Environment=WHO=unit
ExecStart=/bin/sh -c 'echo "booted as $WHO" >> /var/lib/drflow/boots; exec sleep 300'

[Install]
WantedBy=multi-user.target
"""


def test_a_vm_cloned_from_the_template_is_cabled_at_its_address_and_boots_its_units(
        lab: dict[str, Any]) -> None:
    from tasks.vsphere_provision import VmSpec, create_from_template

    [lone] = lab["unprotected"]
    want = lone["standby"]
    si, url = _site(lab, "dr")
    topo = manager.topology(lab)
    assert topo is not None
    # Clone onto the host asked, size, customize, power on (the steps are the product's own).
    create_from_template(_vcenter(lab, "dr"), VmSpec(
        name="probe-dr", template=lab["template"]["vm"], host=want["esx_host"], cpus=2,
        memory_mb=2048, address=want["address"], prefix_len=24))
    clone = find_vm(si, "probe-dr")  # through this test's own session
    try:
        assert clone.runtime.host.name == want["esx_host"]  # not the template's host
        assert clone.guest.ipAddress == want["address"]
        assert (clone.config.hardware.numCPU, clone.config.hardware.memoryMB) == (2, 2048)
        # Returned once vCenter says the guest takes guest operations (cabled and booted), and
        # they reach it at once, in its address.
        assert clone.guest.guestOperationsReady is True
        assert clone.guest.toolsRunningStatus == "guestToolsRunning"
        login = _login(lab)
        upload(si, url, clone, login, PROBE, "/opt/drflow/probe.sh", mode=0o755)
        upload(si, url, clone, login, UNIT, "/etc/systemd/system/probe.service")
        assert wait_exit(si, clone, login, start_program(
            si, clone, login, "/bin/sh", "-c 'mkdir -p /var/lib/drflow /etc/systemd/system/"
            "multi-user.target.wants && ln -sf /etc/systemd/system/probe.service "
            "/etc/systemd/system/multi-user.target.wants/ && /opt/drflow/probe.sh'"), 10) == 0, \
            _journal(lab, "probe-dr")
        assert f"{want['address']}/" in download(si, url, clone, login,
                                                  "/var/lib/drflow/where").decode()
        # Its enabled unit starts at each power-on, not before.
        with pytest.raises(GuestError):
            download(si, url, clone, login, "/var/lib/drflow/boots")
        _wait(clone.PowerOffVM_Task())
        wait_for(lambda: clone.guest.guestOperationsReady is False, 5, "Tools down with the VM")
        _wait(clone.PowerOnVM_Task())
        wait_for(lambda: _read(si, url, clone, login, "/var/lib/drflow/boots") == "booted as unit\n",
                 5, "the enabled unit run at boot")
    finally:
        if clone.runtime.powerState == "poweredOn":
            _wait(clone.PowerOffVM_Task())
        _wait(clone.Destroy_Task())
    # Gone from vCenter: its host goes too.
    wait_for(lambda: not Path(f"/run/netns/{topo.host_netns('probe-dr')}").exists(), 5,
             "the destroyed VM's namespace removed")


def _read(si: Any, url: str, vm: Any, login: GuestLogin, path: str) -> str | None:
    try:
        return download(si, url, vm, login, path).decode()
    except GuestError:
        return None


def _journal(lab: dict[str, Any], vm: str) -> str:
    """What the VM's programs printed (the lab keeps it; a guest's Tools would not)."""
    log = Path(lab["dir"]) / "vms" / vm / "journal" / "programs.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no output)"


def test_the_agent_pushed_into_a_lone_vm_discovers_its_database(lab: dict[str, Any]) -> None:
    import json

    from orchestrator import agent_bundle, agent_push

    [lone] = lab["unprotected"]
    si, url = _site(lab, "prod")
    guest = agent_push.Guest(si, url, find_vm(si, lone["vm"]), _login(lab))
    t0 = time.monotonic()
    agent_push.install(guest, agent_bundle.build())
    agent_push.install(guest, agent_bundle.build())  # again: the same
    pushed = time.monotonic() - t0
    found = json.loads(agent_push.agent(guest, "discover --json --pg-user postgres"))
    print(f"\npushed twice in {pushed:.1f} s")
    # Its own database only: the other lab VMs' servers run on this machine, not in this VM.
    [inst] = found["instances"]
    assert (inst["port"], inst["role"], inst["datadir"]) == (lone["port"], "primary",
                                                             lone["datadir"]), inst
    assert lone["host"] in inst["listen"]
    assert {r["type"] for r in found["resources"]} >= {"postgres", "volume", "ip"}


def test_a_standby_vm_is_created_from_the_template_once_and_removed(lab: dict[str, Any]) -> None:
    from tasks.vsphere_provision import ProvisionError, VmSpec, create_from_template, destroy

    [lone] = lab["unprotected"]
    want = lone["standby"]
    vc = _vcenter(lab, "dr")
    spec = VmSpec(name=want["vm"], template=lab["template"]["vm"], host=want["esx_host"], cpus=2,
                  memory_mb=1024, address=want["address"], prefix_len=24)
    with pytest.raises(ProvisionError, match="no VM template 'nope'"):
        create_from_template(vc, VmSpec(**{**spec.__dict__, "template": "nope"}))
    with pytest.raises(ProvisionError, match="no ESXi host named 'esx-nowhere'"):
        create_from_template(vc, VmSpec(**{**spec.__dict__, "host": "esx-nowhere"}))
    topo = manager.topology(lab)
    assert topo is not None
    try:
        t0 = time.monotonic()
        vm = create_from_template(vc, spec)
        made = time.monotonic() - t0
        again = create_from_template(vc, spec)  # a re-run finds it done
        assert again._moId == vm._moId
        assert (vm.runtime.host.name, vm.guest.ipAddress) == (want["esx_host"], want["address"])
        assert (vm.config.hardware.numCPU, vm.config.hardware.memoryMB) == (2, 1024)
        print(f"\nstandby VM made in {made:.2f} s")
        si, url = _site(lab, "dr")
        guest = find_vm(si, want["vm"])
        wait_for(lambda: _read(si, url, guest, _login(lab), "/etc/drflow/none") is None and
                 Path(f"/run/netns/{topo.host_netns(want['vm'])}").exists(), 5, "cabled")
        with pytest.raises(ProvisionError, match="runs with address"):
            create_from_template(vc, VmSpec(**{**spec.__dict__, "address": "198.18.0.99"}))
    finally:
        assert destroy(vc, want["vm"])
    assert not destroy(vc, want["vm"])  # nothing left to remove
    wait_for(lambda: not Path(f"/run/netns/{topo.host_netns(want['vm'])}").exists(), 5,
             "the removed VM's namespace gone")


def test_the_pushed_agent_runs_as_a_service_and_comes_back_with_its_vm(
        lab: dict[str, Any]) -> None:
    from drflow.control import ControlClient
    from drflow.signing import control_secret
    from lab.procs import free_port
    from orchestrator import agent_bundle, agent_push

    [lone] = lab["unprotected"]
    si, url = _site(lab, "prod")
    vm = find_vm(si, lone["vm"])
    guest = agent_push.Guest(si, url, vm, _login(lab))
    agent_push.install(guest, agent_bundle.build())
    master = lab["secrets"]["control"]
    listen = f"{lone['host']}:{free_port()}"
    agent_push.write_secrets(guest, {
        "/etc/drflow/webhook": SecretStr(lab["secrets"]["webhook"]),
        "/etc/drflow/db_password": SecretStr(lab["database"]["password"]),
        "/etc/drflow/control_secret": SecretStr(
            control_secret(master.encode(), lone["vm"]).decode())})
    agent_push.agent(guest, (
        f"discover --write {agent_push.CONFIG} --agent-id {lone['vm']} --group crm "
        f"--gateway-url {lab['gateway']['url']}/v1/events --secret-ref file:/etc/drflow/webhook "
        f"--outbox /var/lib/drflow/outbox.sqlite --pg-user {lab['database']['user']} "
        f"--pg-password-ref file:/etc/drflow/db_password --control-listen {listen} "
        "--control-secret-ref file:/etc/drflow/control_secret"))
    client = ControlClient.for_agent(f"http://{listen}/v1/control", SecretStr(master), lone["vm"],
                                     timeout_s=2)

    def answers() -> Any:
        try:
            return client.call("status")
        except Exception:
            return None

    agent_push.enable_service(guest)
    agent_push.enable_service(guest)  # again: restarted, one agent
    status = wait_for(answers, 15, "the agent's control API answering")
    assert (status["role"], status["port"]) == ("primary", lone["port"]), status
    assert agent_push.agent_running(guest)
    assert _read(si, url, vm, _login(lab), "/etc/drflow/db_password") is not None
    # Its VM power-cycled: it died with the power, and its unit starts it at boot.
    first = int(_read(si, url, vm, _login(lab), agent_push.PIDFILE) or 0)
    _wait(vm.PowerOffVM_Task())
    wait_for(lambda: not _alive(first), 2, "the agent gone with its VM's power")
    _wait(vm.PowerOnVM_Task())
    wait_for(answers, 15, "the agent back after the power cycle")
    assert int(_read(si, url, vm, _login(lab), agent_push.PIDFILE) or 0) not in (0, first)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
