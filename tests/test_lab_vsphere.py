"""The lab's vSphere part against a real vcsim: inventory, power, drill clones, the power bridge."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pyVmomi import vim

from lab import procs, vcsim
from tests.harness import running_vcsim, vsphere_session

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
GROUPS = ["orders", "billing"]


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vsphere")


@pytest.fixture(scope="module")
def vc(lab_dir: Path) -> Iterator[dict[str, Any]]:
    t0 = time.monotonic()
    vcsim.build_launcher()  # ~16 s the first time, then served from the cache
    built = time.monotonic()
    with running_vcsim(lab_dir, GROUPS) as info:
        print(f"\nvcsim launcher ready in {built - t0:.2f} s, "
              f"vcsim up in {time.monotonic() - built:.2f} s")
        yield info


@pytest.fixture(scope="module")
def si(vc: dict[str, Any]) -> Iterator[vim.ServiceInstance]:
    with vsphere_session(vc) as conn:
        yield conn


def _datacenter(si: vim.ServiceInstance, name: str) -> vim.Datacenter:
    dcs = [e for e in si.content.rootFolder.childEntity if isinstance(e, vim.Datacenter)]
    return next(dc for dc in dcs if dc.name == name)


def _nics(vm: Any) -> list[Any]:
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` until true; return the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_inventory_has_sites_and_one_powered_on_vm_per_group(si: vim.ServiceInstance,
                                                             vc: dict[str, Any]) -> None:
    dcs = {e.name for e in si.content.rootFolder.childEntity if isinstance(e, vim.Datacenter)}
    assert dcs == {"prod", "dr"}
    expected = {f"{g}-{site}" for g in GROUPS for site in ("prod", "dr")}
    assert set(vcsim.vms_by_name(si)) == expected  # no simulator default VMs left over
    assert set(vc["vms"]) == expected
    for site in ("prod", "dr"):
        in_folder = {vm.name for vm in _datacenter(si, site).vmFolder.childEntity}
        assert in_folder == {f"{g}-{site}" for g in GROUPS}
    for name, where in vc["vms"].items():
        vm: Any = vcsim.find_vm(si, name)
        assert where["datacenter"] == name.rsplit("-", 1)[1]
        assert vm.runtime.host.name == where["esx_host"]
        assert vm.runtime.powerState == "poweredOn"
    with pytest.raises(LookupError, match="no VM named 'nope-prod'"):
        vcsim.find_vm(si, "nope-prod")


def test_power_off_and_on_are_idempotent(si: vim.ServiceInstance) -> None:
    vcsim.power_off(si, "orders-dr")
    assert vcsim.vm_power_state(si, "orders-dr") == "poweredOff"
    vcsim.power_off(si, "orders-dr")  # already off: InvalidPowerState counts as done
    assert vcsim.vm_power_state(si, "orders-dr") == "poweredOff"
    vcsim.power_on(si, "orders-dr")
    vcsim.power_on(si, "orders-dr")
    assert vcsim.vm_power_state(si, "orders-dr") == "poweredOn"


def test_isolated_portgroup_has_no_uplink(si: vim.ServiceInstance, vc: dict[str, Any]) -> None:
    pg_name = vc["isolated_portgroup"]
    assert pg_name == "drflow-isolated"
    host: Any = vcsim.find_vm(si, "orders-dr").runtime.host
    net = host.configManager.networkSystem.networkInfo
    switches = {sw.name: sw for sw in net.vswitch}
    pgs = {pg.spec.name: pg for pg in net.portgroup}
    isolated = switches[pgs[pg_name].spec.vswitchName]
    assert not isolated.pnic and isolated.spec.bridge is None
    assert [p.spec.name for p in net.portgroup if p.spec.vswitchName == isolated.name] == [pg_name]
    # The check above can fail: the production switch does have an uplink.
    uplinked = switches[pgs["VM Network"].spec.vswitchName]
    assert uplinked.pnic and uplinked.spec.bridge is not None
    assert pg_name in {n.name for n in host.network}
    prod_host: Any = vcsim.find_vm(si, "orders-prod").runtime.host
    assert pg_name not in {pg.spec.name for pg in prod_host.configManager.networkSystem.networkInfo.portgroup}


def test_clone_dr_vm_onto_isolated_portgroup_then_destroy(si: vim.ServiceInstance,
                                                          vc: dict[str, Any]) -> None:
    dr = _datacenter(si, "dr")
    pg_name = vc["isolated_portgroup"]
    isolated = next(n for n in dr.network if n.name == pg_name)
    source: Any = vcsim.find_vm(si, "billing-dr")
    nic = _nics(source)[0]
    nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
        deviceName=pg_name, network=isolated)
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=source.resourcePool, host=source.runtime.host),
        powerOn=False, template=False,
        config=vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=nic)]),
    )
    clone: Any = vcsim.wait_task(source.CloneVM_Task(folder=dr.vmFolder, name="billing-drill", spec=spec))
    try:
        clone_nics = _nics(clone)
        assert [n.backing.deviceName for n in clone_nics] == [pg_name]
        assert pg_name in {n.name for n in clone.network}
        vcsim.power_on(si, "billing-drill")  # vcsim 0.24 ignores CloneSpec.powerOn
        assert clone.runtime.powerState == "poweredOn"
        assert [n.backing.deviceName for n in _nics(source)] == ["VM Network"]  # source untouched
    finally:
        vcsim.power_off(si, "billing-drill")
        vcsim.wait_task(clone.Destroy_Task())
    with pytest.raises(LookupError):
        vcsim.find_vm(si, "billing-drill")


# --- power bridge -------------------------------------------------------------------------------

def _web_service(root: Path, name: str) -> tuple[int, dict[str, Any]]:
    """A real long-running service: sh (pid in the pidfile) with an HTTP server as its child.

    Like PostgreSQL it refuses to start over an existing pidfile, and killing only the pidfile's
    pid would leave the child listening: only a whole-tree kill closes the port.
    """
    port = procs.free_port()
    pidfile = root / f"{name}.pid"
    script = (
        f"if [ -e {shlex.quote(str(pidfile))} ]; then echo 'lock file already exists'; exit 1; fi; "
        f"echo $$ > {shlex.quote(str(pidfile))}; "
        f"{shlex.quote(sys.executable)} -m http.server {port} --bind 127.0.0.1"
    )
    return port, {"name": name, "pidfile": str(pidfile), "start": ["sh", "-c", script],
                  "run_as": None, "cwd": str(root), "log": str(root / f"{name}.log")}


def _write_state(path: Path, vc: dict[str, Any], services: dict[str, list[dict[str, Any]]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "vcenter": {"url": vc["url"], "user": vc["user"], "password": vc["password"]},
        "services": services,
    }))
    os.replace(tmp, path)


def _start(svc: dict[str, Any], port: int) -> int:
    proc = procs.spawn(svc["start"], log=Path(svc["log"]), cwd=Path(svc["cwd"]))
    procs.wait_port(port, 10, svc["name"], proc=proc, log=Path(svc["log"]))
    pid = _service_pid(svc)
    assert pid == proc.pid
    return pid


def _service_pid(svc: dict[str, Any]) -> int | None:
    try:
        return int(Path(svc["pidfile"]).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Bridge:
    def __init__(self, root: Path, state: Path) -> None:
        self.log = root / "power-bridge.log"
        self.proc = procs.spawn([sys.executable, "-m", "lab.power_bridge", "--state", str(state)],
                                log=self.log, cwd=REPO)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, needle: str, timeout: float = 15) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"power bridge exited:\n{self.text()}"
            return needle in self.text()
        _wait(seen, timeout, f"power bridge log line {needle!r}; log:\n{self.text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)


@pytest.fixture
def services_dir(lab_dir: Path) -> Iterator[Path]:
    """A directory for service pidfiles; every service still running there is killed after."""
    root = lab_dir / f"svc-{time.monotonic_ns()}"
    root.mkdir()
    yield root
    for pidfile in root.glob("*.pid"):
        pid = _service_pid({"pidfile": str(pidfile)})
        if pid is not None:
            procs.kill_tree(pid)


@pytest.fixture
def postgres_dir() -> Iterator[Path]:
    """A directory the `postgres` user owns and can reach (pytest's tmp dirs are root-only)."""
    # The lab runs as root with Debian's postgresql installed (make bootstrap): no skip.
    pw = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="drflow-bridge-"))
    os.chown(root, pw.pw_uid, pw.pw_gid)
    root.chmod(0o755)
    try:
        yield root
    finally:
        pid = _service_pid({"pidfile": str(root / "sleeper.pid")})
        if pid is not None:
            procs.kill_tree(pid)
        shutil.rmtree(root, ignore_errors=True)


def test_power_bridge_kills_on_power_off_and_restarts_on_power_on(
        si: vim.ServiceInstance, vc: dict[str, Any], services_dir: Path, postgres_dir: Path) -> None:
    port, svc = _web_service(services_dir, "web")
    first_pid = _start(svc, port)
    # Not running at first; started as `postgres` when the VM comes back, like PostgreSQL.
    sleeper_pidfile = postgres_dir / "sleeper.pid"
    sleeper = {"name": "sleeper", "pidfile": str(sleeper_pidfile), "run_as": "postgres",
               "start": ["sh", "-c", f"echo $$ > {sleeper_pidfile}; exec sleep 600"],
               "cwd": None, "log": str(services_dir / "sleeper.log")}
    state = services_dir / "bridge.json"
    _write_state(state, vc, {"billing-prod": [svc, sleeper]})
    bridge = Bridge(services_dir, state)
    try:
        bridge.wait_for("watching 1 VM(s) for power changes: billing-prod")
        assert procs.port_open(port)  # the bridge leaves a running service on a running VM alone

        t0 = time.monotonic()
        vcsim.power_off(si, "billing-prod")
        latency = _wait(lambda: not procs.port_open(port) and not procs.pid_alive(first_pid),
                        1.5, "service tree killed after power-off")
        print(f"\npower-off -> service dead: {time.monotonic() - t0:.3f} s after the call, "
              f"{latency:.3f} s after the task finished")
        assert Path(svc["pidfile"]).exists()  # left stale, as after a real crash

        vcsim.power_on(si, "billing-prod")
        _wait(lambda: procs.port_open(port), 10, "service back after power-on")
        new_pid = _service_pid(svc)
        assert new_pid is not None and new_pid != first_pid and procs.pid_alive(new_pid)
        assert "lock file already exists" not in Path(svc["log"]).read_text()
        _wait(lambda: _service_pid(sleeper) is not None, 5, "sleeper started")
        sleeper_pid = _service_pid(sleeper)
        assert sleeper_pid is not None
        assert psutil.Process(sleeper_pid).username() == "postgres"
        log = bridge.text()
        assert "billing-prod: killed web" in log and "billing-prod: started web" in log
        assert vc["password"] not in log
        bridge.stop()
        assert procs.port_open(port) and procs.pid_alive(sleeper_pid)  # not the bridge's children
    finally:
        bridge.stop()
        vcsim.power_on(si, "billing-prod")


def test_power_bridge_survives_vcsim_restart_and_follows_new_bindings(
        lab_dir: Path, services_dir: Path) -> None:
    own = vcsim.start_vcsim(lab_dir / "restart", ["crm"])
    port_a, svc_a = _web_service(services_dir, "a")
    _start(svc_a, port_a)
    state = services_dir / "bridge.json"
    _write_state(state, own, {"crm-prod": [svc_a]})
    bridge = Bridge(services_dir, state)
    try:
        bridge.wait_for("watching 1 VM(s)")
        vcsim.stop_vcsim(own)
        bridge.wait_for("failed:")
        assert bridge.proc.poll() is None and procs.port_open(port_a)  # vCenter down is no power cut

        own = vcsim.start_vcsim(lab_dir / "restart", ["crm"], port=own["port"])
        bridge.wait_for("(recovered)")
        # A binding added while running (an agent, say) is followed after the file changes.
        port_b, svc_b = _web_service(services_dir, "b")
        _start(svc_b, port_b)
        _write_state(state, own, {"crm-prod": [svc_a], "crm-dr": [svc_b]})
        bridge.wait_for("watching 2 VM(s) for power changes: crm-dr, crm-prod")
        si2 = vcsim.connect(own["url"], own["user"], own["password"])
        try:
            vcsim.power_off(si2, "crm-dr")
            _wait(lambda: not procs.port_open(port_b), 1.5, "newly bound service killed")
            vcsim.power_off(si2, "crm-prod")
            _wait(lambda: not procs.port_open(port_a), 1.5, "service killed after reconnect")
        finally:
            vcsim.disconnect(si2)
    finally:
        bridge.stop()
        vcsim.stop_vcsim(own)


# --- launcher build cache -----------------------------------------------------------------------

def test_concurrent_builds_share_one_sound_binary(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRFLOW_CACHE_DIR", str(tmp_path))
    results: list[Path | BaseException] = []

    def build() -> None:
        try:
            results.append(vcsim.build_launcher())
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1
    binary = results[0]
    assert isinstance(binary, Path) and binary.parent == tmp_path / "vcsim"
    assert sorted(p.name for p in binary.parent.iterdir() if p.name != "go-build") == \
        sorted([binary.name, ".build.lock"])
    done = subprocess.run([str(binary), "-h"], capture_output=True, text=True, timeout=10)
    assert "-groups" in done.stderr
    t0 = time.monotonic()
    assert vcsim.build_launcher() == binary
    assert time.monotonic() - t0 < 0.5


def test_missing_toolchain_names_the_debian_packages(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRFLOW_CACHE_DIR", str(tmp_path))  # an empty cache forces a build
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install golang-go"):
        vcsim.build_launcher()
    monkeypatch.undo()
    monkeypatch.setenv("DRFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(vcsim, "GOVMOMI_SIMULATOR", tmp_path / "no-govmomi")
    with pytest.raises(RuntimeError, match="golang-github-vmware-govmomi-dev"):
        vcsim.build_launcher()
