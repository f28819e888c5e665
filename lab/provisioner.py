"""A site's cabling for VMs made after the lab came up (a standby cloned from the template).

Run as `python -m lab.provisioner --lab DIR --site SITE` (by `lab up`, in the root namespace:
lab/manager.py says why). Every `POLL_S` it reads the site vCenter's VMs in one call: a VM powered on whose
`guest.ipAddress` (set by guest customization) is in the site's subnet and that has no lab host
yet gets one, as a VM booting on a cabled host becomes reachable: a network namespace with
that address behind the site's router (lab/netns.py), and an entry for guest operations
(lab/guests.py). A VM it cabled that left the inventory has its namespace taken away. What it
cabled is in `<lab>/provisioned-<site>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from drflow.vsphere import vm_properties
from lab import guests, manager, netns, vcsim

log = logging.getLogger("lab.provisioner")

POLL_S = 0.5


class Provisioner:
    def __init__(self, lab_dir: Path, site: str) -> None:
        self.lab_dir, self.site = lab_dir, site
        state = manager.load(lab_dir)
        topo = manager.topology(state)
        if topo is None:
            raise SystemExit("the lab has no network description")
        self.topo = topo
        self.vcenter = state["vcenters"][site]
        self.password = (lab_dir / "secrets" / "guest_password").read_text().strip()
        self.record = lab_dir / f"provisioned-{site}.json"
        self.cabled: dict[str, str] = (json.loads(self.record.read_text())
                                       if self.record.exists() else {})
        # The lab's own hosts (made by `lab up`): never cabled or taken away here.
        self.known = set(json.loads(guests.path(lab_dir, site).read_text())) - set(self.cabled)
        self.si: Any = None

    def _save(self) -> None:
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cabled, indent=1))
        tmp.replace(self.record)

    def step(self) -> None:
        if self.si is None:
            vc = self.vcenter
            self.si = vcsim.connect(vc["url"], vc["user"], vc["password"], timeout=10)
        seen: dict[str, tuple[str, str | None]] = {}
        for _vm, props in vm_properties(self.si, self.si.content.rootFolder,
                                        ["name", "runtime.powerState", "guest.ipAddress"]):
            seen[str(props["name"])] = (str(props.get("runtime.powerState")),
                                        props.get("guest.ipAddress"))
        for name, (power, address) in seen.items():
            if name in self.known or name in self.cabled or power != "poweredOn" or not address:
                continue
            if self.topo.location_of(address) != self.site:
                log.warning("%s: address %s is not in %s's subnet %s: not cabled", name, address,
                            self.site, self.topo.subnet(self.site))
                self.known.add(name)
                continue
            prefix = netns.add_host(self.topo, self.site, name, address)
            guests.add(self.lab_dir, self.site, name, prefix, self.password)
            self.cabled[name] = address
            self._save()
            log.info("%s: cabled at %s (%s)", name, address, " ".join(prefix))
        for name in [n for n in self.cabled if n not in seen]:
            netns.remove_host(self.topo, name, self.cabled[name])
            guests.remove(self.lab_dir, self.site, name)
            del self.cabled[name]
            self._save()
            log.info("%s: gone from vCenter: its host is taken away", name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab", type=Path, required=True, help="the lab directory")
    ap.add_argument("--site", required=True, choices=manager.SITES)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    p = Provisioner(args.lab, args.site)
    log.info("provisioning new VMs of %s", args.site)
    failing = ""
    while not stopping:
        try:
            p.step()
            failing = ""
        except Exception as exc:  # vCenter away (a site fault): keep trying
            if str(exc) != failing:
                log.warning("vCenter at %s failed: %s; retrying", p.vcenter["url"], exc)
            failing = str(exc)
            with contextlib.suppress(Exception):
                vcsim.disconnect(p.si)
            p.si = None
        time.sleep(POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
