"""How drflow publishes a protection group's primary in Route 53, and how clients find it.

Each group has two records, UPSERTed together in one change batch so they never disagree:

    <record>                   A    <primary address>
    _postgresql._tcp.<record>  SRV  0 0 <primary port> <record>

The A record is what libpq clients follow when every VM has its own address and PostgreSQL listens
on 5432; the SRV record is the standard way to publish a port, which the lab needs because all its
instances share 127.0.0.1. `resolve_endpoint` reads both through the Route 53 API, as a client that
honours the TTL would resolve on each connect.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mypy_boto3_route53 import Route53Client
    from mypy_boto3_route53.type_defs import ChangeTypeDef

DEFAULT_TTL = 30
DEFAULT_PG_PORT = 5432


def fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def srv_name(record: str) -> str:
    """The SRV record that carries the primary's port for `record`."""
    return f"_postgresql._tcp.{fqdn(record)}"


def endpoint_changes(record: str, host: str, port: int, ttl: int = DEFAULT_TTL) -> list[ChangeTypeDef]:
    """The UPSERTs that point `record` at host:port (A + SRV), for one change batch."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"an A record needs an IPv4 address, not {host!r}") from None
    record = fqdn(record)
    return [
        {"Action": "UPSERT", "ResourceRecordSet": {
            "Name": record, "Type": "A", "TTL": ttl, "ResourceRecords": [{"Value": host}]}},
        {"Action": "UPSERT", "ResourceRecordSet": {
            "Name": srv_name(record), "Type": "SRV", "TTL": ttl,
            "ResourceRecords": [{"Value": f"0 0 {port} {record}"}]}},
    ]


def point_record(client: Route53Client, zone_id: str, record: str, host: str, port: int,
                 ttl: int = DEFAULT_TTL, comment: str = "drflow") -> str:
    """UPSERT A + SRV for `record` in one change batch; returns the change id."""
    resp = client.change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={"Comment": comment, "Changes": endpoint_changes(record, host, port, ttl)},
    )
    return resp["ChangeInfo"]["Id"]


def lookup(client: Route53Client, zone_id: str, name: str,
            rtype: Literal["A", "SRV"]) -> list[str] | None:
    # Route 53 lists from StartRecordName onwards, so the first row may be a different record.
    resp = client.list_resource_record_sets(
        HostedZoneId=zone_id, StartRecordName=name, StartRecordType=rtype,
        MaxItems="1",
    )
    for rrset in resp["ResourceRecordSets"]:
        if rrset["Name"].lower() == name.lower() and rrset["Type"] == rtype:
            return [r["Value"] for r in rrset.get("ResourceRecords", [])]
    return None


def resolve_endpoint(route53_client: Route53Client, zone_id: str, record: str) -> tuple[str, int]:
    """(host, port) the record currently sends clients to: SRV port and A address, else A:5432."""
    record = fqdn(record)
    target, port = record, DEFAULT_PG_PORT
    srv = lookup(route53_client, zone_id, srv_name(record), "SRV")
    if srv:
        # "priority weight port target": the lab publishes one target, so the lowest priority wins.
        _prio, _weight, port_s, target = min((v.split() for v in srv), key=lambda f: int(f[0]))
        port = int(port_s)
    addresses = lookup(route53_client, zone_id, fqdn(target), "A")
    if not addresses:
        raise LookupError(f"no A record {target} in hosted zone {zone_id}")
    return addresses[0], port
