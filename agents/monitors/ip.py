"""IP address: present on an interface (the configured one, if any) whose link is up."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import psutil

from agents.monitors import CheckResult

_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def interface_of(address: str) -> str | None:
    """The interface carrying `address`, or None."""
    want = ipaddress.ip_address(address)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in _FAMILIES and _same(a.address, want):
                return name
    return None


def _same(text: str, want: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]) == want
    except ValueError:
        return False


class IpMonitor:
    def __init__(self, address: str, interface: str | None) -> None:
        self.address = address
        self.interface = interface

    def check(self) -> CheckResult:
        found = interface_of(self.address)
        if found is None:
            return CheckResult(False, f"address {self.address} is on no interface")
        facts: dict[str, Any] = {"interface": found}
        if self.interface is not None and found != self.interface:
            return CheckResult(False, f"address {self.address} is on {found}, expected on "
                               f"{self.interface}", facts)
        stats = psutil.net_if_stats().get(found)
        if stats is None or not stats.isup:
            return CheckResult(False, f"interface {found} carrying {self.address} is down", facts)
        return CheckResult(True, f"{self.address} up on {found}", facts)


def build(r: Any) -> IpMonitor:
    return IpMonitor(r.address, r.interface)
