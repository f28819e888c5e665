"""VM lookup on a real vcsim holding both sites: scoped to the site's datacenter, and TLS.

One vCenter with datacenters `prod` and `dr`, each holding a VM named `erp-db` (a DR VM named
like the VM it protects): the fence must power off the one of the site it was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pyVmomi import vim

from lab import vcsim
from tasks import vsphere
from tests.harness import running_vcsim, vsphere_session

pytestmark = pytest.mark.lab

TWIN = "erp-db"


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_vcsim(tmp_path_factory.mktemp("twins"), ["crm"], twins=[TWIN]) as info:
        yield info


@pytest.fixture(scope="module")
def si(vc: dict[str, Any]) -> Iterator[vim.ServiceInstance]:
    with vsphere_session(vc) as conn:
        yield conn


def _site(vc: dict[str, Any], datacenter: str | None) -> vsphere.VCenter:
    return vsphere.VCenter(url=vc["url"], user=vc["user"], password=SecretStr(vc["password"]),
                           datacenter=datacenter)


def _power(si: vim.ServiceInstance) -> dict[str, str]:
    return {dc: vcsim.vm_power_state(si, TWIN, dc) for dc in ("prod", "dr")}


@pytest.mark.parametrize(("fenced", "spared"), [("dr", "prod"), ("prod", "dr")])
def test_fence_powers_off_the_vm_of_its_own_datacenter(vc: dict[str, Any], si: vim.ServiceInstance,
                                                       fenced: str, spared: str) -> None:
    assert vc["twins"] == [TWIN]
    assert _power(si) == {"prod": "poweredOn", "dr": "poweredOn"}
    try:
        state, err = vsphere.fence.fn(_site(vc, fenced), TWIN)
        assert (state, err) == ("poweredOff", None)
        assert _power(si) == {fenced: "poweredOff", spared: "poweredOn"}
        assert vsphere.read_power_state(_site(vc, spared), TWIN) == ("poweredOn", None)
        assert vsphere.read_power_state(_site(vc, fenced), TWIN) == ("poweredOff", None)
    finally:
        vcsim.power_on(si, TWIN, fenced)


def test_an_ambiguous_or_unknown_name_is_refused_not_guessed(vc: dict[str, Any],
                                                             si: vim.ServiceInstance) -> None:
    state, err = vsphere.fence.fn(_site(vc, None), TWIN)
    assert state is None and err is not None and f"several VMs named '{TWIN}'" in err
    state, err = vsphere.read_power_state(_site(vc, "nowhere"), TWIN)
    assert state is None and err is not None and "no datacenter 'nowhere'" in err
    state, err = vsphere.read_power_state(_site(vc, "prod"), "crm-dr")
    assert state is None and err is not None and "'crm-dr' not found in datacenter 'prod'" in err
    assert _power(si) == {"prod": "poweredOn", "dr": "poweredOn"}
    # The drill's lookups are scoped alike: the DR site's VM, not production's namesake.
    ok, detail = vsphere.vcenter_facts(_site(vc, "dr"), TWIN)
    assert ok, detail
    assert vsphere.drill_vms(_site(vc, "prod"), "crm-") == ["crm-prod"]


def test_lab_helpers_are_scoped_too(si: vim.ServiceInstance) -> None:
    with pytest.raises(LookupError, match=f"2 VMs named '{TWIN}' in vCenter"):
        vcsim.find_vm(si, TWIN)
    prod, dr = vcsim.find_vm(si, TWIN, "prod"), vcsim.find_vm(si, TWIN, "dr")
    assert prod._moId != dr._moId
    assert set(vcsim.vms_by_name(si, "dr")) == {"crm-dr", TWIN}
    with pytest.raises(LookupError, match="no datacenter 'x'"):
        vcsim.find_vm(si, TWIN, "x")


def test_verify_tls_false_accepts_a_self_signed_vcenter(tmp_path: Path) -> None:
    info = vcsim.start_vcsim(tmp_path, ["crm"], tls=True)
    try:
        assert info["url"].startswith("https://127.0.0.1:")
        # pyvmomi skips certificate checks for 127.0.0.1 and localhost on its own: 127.1 is the
        # same address spelled so that it does not, as for any vCenter's real name.
        info = {**info, "url": info["url"].replace("https://127.0.0.1:", "https://127.1:")}
        strict = _site(info, "prod")
        with pytest.raises(ConnectionError, match="cannot log in to vCenter"):
            vsphere.connect(strict, fresh=True)
        relaxed = vsphere.VCenter(url=info["url"], user=info["user"],
                                  password=SecretStr(info["password"]), datacenter="prod",
                                  verify_tls=False)
        assert vsphere.read_power_state(relaxed, "crm-prod") == ("poweredOn", None)
    finally:
        vcsim.stop_vcsim(info)
