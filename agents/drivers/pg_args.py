"""What the PostgreSQL driver accepts: hosts and peers, the addresses a host stands for, verbs' arguments."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from typing import Annotated, Literal

import msgspec
import psutil

from drflow.struct_errors import FieldError

# Full matches only (`re.fullmatch`): `$` would let a trailing newline through.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9][A-Za-z0-9-]{0,62}(?:\.[A-Za-z0-9-]{1,63})*",
                       re.ASCII)
_IP_TEXT = re.compile(r"[0-9A-Fa-f:.]{2,45}", re.ASCII)


def check_host(value: str) -> str:
    """An IP address (no IPv6 scope id) or a DNS name; nothing that could smuggle conninfo keys,
    options or configuration lines."""
    if _IP_TEXT.fullmatch(value):
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(value)
            return value
    if _HOSTNAME.fullmatch(value):
        return value
    raise ValueError(f"{value[:80]!r} is not an IP address or a host name")


def parse_peer(value: str) -> tuple[str, int]:
    """"host:port" (IPv6 in brackets) of a peer node → (host, port); ValueError says why."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"peer {value[:80]!r} must be host:port")
    return check_host(host), int(port)


Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class _Args(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A verb's arguments: decoded strictly (no "5432" for 5432, no 1 for true) by args_of."""


class StopArgs(_Args):
    mode: Literal["smart", "fast", "immediate"] = "fast"


class FenceProof(_Args):
    """The orchestrator's proof that the other node is fenced (the leader-lease work fills it)."""

    kind: Literal["lease_expired", "powered_off", "operator_attested"]
    evidence: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class PromoteArgs(_Args):
    # A promoted standby with no standby of its own hangs every write while
    # synchronous_standby_names is set; the caller decides (and audits) relaxing it.
    relax_sync: bool = False
    # Without it a promote is refused while a peer answers as a writable primary.
    fence_proof: FenceProof | None = None


class SourceArgs(_Args):
    source_host: str
    source_port: Port

    def __post_init__(self) -> None:
        try:
            check_host(self.source_host)
        except ValueError as exc:
            raise FieldError(("source_host",), str(exc)) from None


class PrimaryArgs(_Args):
    primary_host: str
    primary_port: Port

    def __post_init__(self) -> None:
        try:
            check_host(self.primary_host)
        except ValueError as exc:
            raise FieldError(("primary_host",), str(exc)) from None


def addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address `host` stands for (as libpq would resolve it); empty when it resolves not."""
    with contextlib.suppress(ValueError):
        return {plain(ipaddress.ip_address(host))}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {plain(ipaddress.ip_address(str(i[4][0]).split("%", 1)[0])) for i in infos}


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    out.add(plain(ipaddress.ip_address(a.address.split("%", 1)[0])))
    return out


def plain(a: ipaddress.IPv4Address | ipaddress.IPv6Address
           ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """::ffff:127.0.0.1 is 127.0.0.1."""
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a
