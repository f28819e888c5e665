"""The lab's AWS: a moto server holding the Route 53 zone, the audit bucket and the lab's secrets.

DNS scheme. Every lab PostgreSQL instance listens on its VM's own address, on a port of its own
(ports stay unique in the lab, so the loopback layout works alike). Each group has two records, both
TTL 30, which a failover UPSERTs together in one change batch:

    <group>.db.lab.drflow.internal.                 A    198.18.0.20         (the primary's address)
    _postgresql._tcp.<group>.db.lab.drflow.internal. SRV  0 0 <port> <group>.db.lab.drflow.internal.

The SRV record is the standard DNS way to publish a port; its target is the group's A record, so
the address lives in one place. In production, where each VM has its own address and PostgreSQL
listens on 5432, the A record alone is what libpq clients follow and the SRV record is a
harmless extra. `resolve_endpoint` reads both through the Route 53 API; it is the lab's stand-in
for a DNS lookup (a real resolver would also cache the answer for the TTL).

moto 5.2.5 facts this module relies on: Route 53 changes are INSYNC at once; S3 Object Lock
configuration, default retention and per-object retention work (HeadObject/GetObject report
ObjectLockMode and ObjectLockRetainUntilDate, deleting a locked version is AccessDenied unless
BypassGovernanceRetention), but GetObjectRetention answers 500 and COMPLIANCE can be shortened.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from drflow.dns import endpoint_changes, fqdn
from lab import procs

if TYPE_CHECKING:
    from mypy_boto3_route53 import Route53Client
    from mypy_boto3_route53.type_defs import ChangeTypeDef
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import DefaultRetentionTypeDef
    from mypy_boto3_secretsmanager import SecretsManagerClient

ZONE = "lab.drflow.internal."
AUDIT_BUCKET = "drflow-audit"
TTL = 30
REGION = "us-east-1"
# moto accepts any credentials; these are the values its documentation uses.
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
AUDIT_RETENTION: DefaultRetentionTypeDef = {"Mode": "GOVERNANCE", "Days": 1}


def moto_server_path() -> Path:
    """The moto_server of the virtualenv this Python runs from."""
    return Path(sys.executable).parent / "moto_server"


def start_moto(lab_dir: Path, timeout: float = 30.0, host: str = "127.0.0.1") -> dict[str, Any]:
    """Start moto in server mode on a free port of `host`, detached; log to logs/moto.log."""
    exe = moto_server_path()
    if not exe.exists():
        raise RuntimeError(
            f"{exe} not found: install moto in server mode with "
            f"`{Path(sys.executable).parent / 'pip'} install 'moto[server]'`"
        )
    port = procs.free_port()
    log = lab_dir / "logs" / "moto.log"
    # Run from the lab directory: `lab down` finds it there even if `lab up` died before
    # recording its pid (its command line names nothing of the lab).
    proc = procs.spawn([str(exe), "-H", host, "-p", str(port)], log, cwd=lab_dir)
    try:
        procs.wait_port(port, timeout, "moto_server", proc, log, host=host)
    except BaseException:
        procs.stop_tree(proc.pid, timeout=2)
        raise
    return {
        "pid": proc.pid,
        "endpoint_url": f"http://{host}:{port}",
        "region": REGION,
        "access_key_id": ACCESS_KEY_ID,
        "secret_access_key": SECRET_ACCESS_KEY,
    }


def _kwargs(aws: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "endpoint_url": aws["endpoint_url"],
        "region_name": aws.get("region", REGION),
        "aws_access_key_id": aws.get("access_key_id", ACCESS_KEY_ID),
        "aws_secret_access_key": aws.get("secret_access_key", SECRET_ACCESS_KEY),
    }
    if quick:  # a status check must answer fast, not retry for a minute
        kw["config"] = Config(connect_timeout=2, read_timeout=3, retries={"max_attempts": 1})
    return kw


def route53(aws: dict[str, Any]) -> Route53Client:
    return boto3.client("route53", **_kwargs(aws))


def s3(aws: dict[str, Any]) -> S3Client:
    return boto3.client("s3", **_kwargs(aws))


def secretsmanager(aws: dict[str, Any]) -> SecretsManagerClient:
    return boto3.client("secretsmanager", **_kwargs(aws))


def record_name(group: str, zone: str = ZONE) -> str:
    """The group's A record, e.g. `orders.db.lab.drflow.internal.`."""
    return f"{group}.db.{fqdn(zone)}"


def _ensure_zone(client: Route53Client, zone: str) -> str:
    found = client.list_hosted_zones_by_name(DNSName=zone, MaxItems="1")["HostedZones"]
    if found and found[0]["Name"] == zone:
        return found[0]["Id"]
    resp = client.create_hosted_zone(
        Name=zone, CallerReference=f"drflow-lab-{uuid.uuid4()}",
        HostedZoneConfig={"Comment": "drflow lab: one record per protection group",
                          "PrivateZone": False},
    )
    return resp["HostedZone"]["Id"]


def _ensure_audit_bucket(client: S3Client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    rule = client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"].get(
        "Rule", {}).get("DefaultRetention", {})
    if (rule.get("Mode"), rule.get("Days")) == (AUDIT_RETENTION["Mode"], AUDIT_RETENTION["Days"]):
        return  # moto refuses to re-set it on a non-empty bucket (AWS would allow it)
    client.put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={"ObjectLockEnabled": "Enabled",
                                 "Rule": {"DefaultRetention": AUDIT_RETENTION}},
    )


def _ensure_secret(client: SecretsManagerClient, name: str, value: str) -> str:
    try:
        return client.create_secret(Name=name, SecretString=value)["ARN"]
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceExistsException":
            raise
        return client.put_secret_value(SecretId=name, SecretString=value)["ARN"]


def setup_aws(aws: dict[str, Any], groups: list[dict[str, Any]],
              secrets: dict[str, str]) -> dict[str, Any]:
    """Create the zone with each group's records, the Object Lock audit bucket and the secrets.

    `groups` is `[{"name", "primary": {"host", "port"}}]`. Safe to repeat.
    """
    r53 = route53(aws)
    zone_id = _ensure_zone(r53, ZONE)
    records: dict[str, str] = {}
    changes: list[ChangeTypeDef] = []
    for g in groups:
        records[g["name"]] = record_name(g["name"])
        changes += endpoint_changes(records[g["name"]], g["primary"]["host"],
                                    int(g["primary"]["port"]))
    if changes:
        r53.change_resource_record_sets(
            HostedZoneId=zone_id, ChangeBatch={"Comment": "drflow lab up", "Changes": changes})
    _ensure_audit_bucket(s3(aws), AUDIT_BUCKET)
    sm = secretsmanager(aws)
    secret_ids = {name: _ensure_secret(sm, name, value) for name, value in secrets.items()}
    return {"zone_id": zone_id, "zone": ZONE, "records": records,
            "audit_bucket": AUDIT_BUCKET, "secret_ids": secret_ids}


def health(aws: dict[str, Any]) -> tuple[bool, str]:
    """(healthy, detail) for `lab status`: the process is alive and Route 53 and S3 answer."""
    pid = aws.get("pid")
    if pid and not procs.pid_alive(int(pid)):
        return False, f"pid {pid} is not running"
    if not aws.get("endpoint_url"):
        return False, "not started"
    bucket = aws.get("audit_bucket")
    t0 = time.monotonic()
    try:
        zones = boto3.client("route53", **_kwargs(aws, quick=True)).list_hosted_zones()
        if bucket:
            boto3.client("s3", **_kwargs(aws, quick=True)).head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as e:
        return False, f"{aws['endpoint_url']} does not answer: {e}"
    ms = (time.monotonic() - t0) * 1000
    detail = f"{aws['endpoint_url']}, {len(zones['HostedZones'])} hosted zone(s)"
    if bucket:
        detail += f", bucket {bucket}"
    return True, detail + (f", pid {pid}" if pid else "") + f", {ms:.0f} ms"
