"""The lab's moto server: Route 53 endpoint records, the Object Lock audit bucket, secrets."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from drflow import dns
from lab import aws, procs
from tests.conftest import new_lab_dir

GROUPS = [
    {"name": "orders", "primary": {"host": "127.0.0.1", "port": 5433}},
    {"name": "payments", "primary": {"host": "127.0.0.1", "port": 5434}},
]
SECRETS = {"drflow-lab/slack": json.dumps({"bot_token": "xoxb-1"}), "drflow-lab/plain": "s3cr3t"}


@pytest.fixture(scope="module")
def moto() -> Iterator[dict[str, Any]]:
    lab_dir = new_lab_dir("drflow-aws-")
    info = aws.start_moto(lab_dir)
    try:
        yield info
    finally:
        procs.stop_tree(info["pid"], timeout=3)
        shutil.rmtree(lab_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def setup(moto: dict[str, Any]) -> dict[str, Any]:
    return aws.setup_aws(moto, GROUPS, SECRETS)


def test_start_moto_returns_a_loopback_endpoint(moto: dict[str, Any]) -> None:
    assert moto["endpoint_url"].startswith("http://127.0.0.1:")
    assert moto["region"] == "us-east-1"
    assert procs.pid_alive(moto["pid"])


def test_setup_publishes_each_primary_as_a_and_srv(moto: dict[str, Any],
                                                   setup: dict[str, Any]) -> None:
    r53 = aws.route53(moto)
    zone = r53.get_hosted_zone(Id=setup["zone_id"])["HostedZone"]
    assert zone["Name"] == "lab.drflow.internal."
    assert zone["Config"]["PrivateZone"] is False
    assert setup["records"] == {"orders": "orders.db.lab.drflow.internal.",
                                "payments": "payments.db.lab.drflow.internal."}
    rrsets = {(r["Name"], r["Type"]): r for r in
              r53.list_resource_record_sets(HostedZoneId=setup["zone_id"])["ResourceRecordSets"]}
    a = rrsets[("orders.db.lab.drflow.internal.", "A")]
    srv = rrsets[("_postgresql._tcp.orders.db.lab.drflow.internal.", "SRV")]
    assert a["TTL"] == 30 and a["ResourceRecords"] == [{"Value": "127.0.0.1"}]
    assert srv["TTL"] == 30
    assert srv["ResourceRecords"] == [{"Value": "0 0 5433 orders.db.lab.drflow.internal."}]
    assert dns.resolve_endpoint(r53, setup["zone_id"], setup["records"]["orders"]) == \
        ("127.0.0.1", 5433)
    assert dns.resolve_endpoint(r53, setup["zone_id"], "payments.db.lab.drflow.internal") == \
        ("127.0.0.1", 5434)


def test_upsert_moves_the_endpoint_and_resolve_follows(moto: dict[str, Any],
                                                       setup: dict[str, Any]) -> None:
    r53 = aws.route53(moto)
    zone_id, record = setup["zone_id"], setup["records"]["orders"]
    try:
        # What a failover does with plain boto3: both records in one change batch.
        change = r53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [
            {"Action": "UPSERT", "ResourceRecordSet": {
                "Name": record, "Type": "A", "TTL": 30,
                "ResourceRecords": [{"Value": "127.0.0.2"}]}},
            {"Action": "UPSERT", "ResourceRecordSet": {
                "Name": "_postgresql._tcp." + record, "Type": "SRV", "TTL": 30,
                "ResourceRecords": [{"Value": f"0 0 6543 {record}"}]}},
        ]})
        assert change["ChangeInfo"]["Status"] == "INSYNC"
        back = r53.list_resource_record_sets(
            HostedZoneId=zone_id, StartRecordName="_postgresql._tcp." + record,
            StartRecordType="SRV", MaxItems="1")["ResourceRecordSets"]
        assert back[0]["ResourceRecords"] == [{"Value": f"0 0 6543 {record}"}]
        assert dns.resolve_endpoint(r53, zone_id, record) == ("127.0.0.2", 6543)
        assert dns.resolve_endpoint(r53, zone_id, setup["records"]["payments"]) == \
            ("127.0.0.1", 5434)
    finally:
        dns.point_record(r53, zone_id, record, "127.0.0.1", 5433)
    assert dns.resolve_endpoint(r53, zone_id, record) == ("127.0.0.1", 5433)


def test_resolve_without_srv_uses_5432_and_missing_records_fail(moto: dict[str, Any],
                                                                setup: dict[str, Any]) -> None:
    r53 = aws.route53(moto)
    name = "legacy.db.lab.drflow.internal."
    r53.change_resource_record_sets(HostedZoneId=setup["zone_id"], ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": {
            "Name": name, "Type": "A", "TTL": 30, "ResourceRecords": [{"Value": "10.0.0.7"}]}}]})
    assert dns.resolve_endpoint(r53, setup["zone_id"], name) == ("10.0.0.7", 5432)
    with pytest.raises(LookupError, match="no A record nosuch"):
        dns.resolve_endpoint(r53, setup["zone_id"], "nosuch.db.lab.drflow.internal.")
    with pytest.raises(ValueError, match="IPv4"):
        dns.endpoint_changes(name, "db.example.com", 5432)


def test_audit_bucket_has_object_lock_and_keeps_retention(moto: dict[str, Any],
                                                          setup: dict[str, Any]) -> None:
    s3 = aws.s3(moto)
    bucket = setup["audit_bucket"]
    assert bucket == "drflow-audit"
    conf = s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    assert conf["ObjectLockEnabled"] == "Enabled"
    assert conf["Rule"]["DefaultRetention"]["Mode"] == "GOVERNANCE"
    assert conf["Rule"]["DefaultRetention"]["Days"] == 1
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"

    until = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).replace(microsecond=0)
    put = s3.put_object(Bucket=bucket, Key="chain/000001.json", Body=b'{"seq": 1}',
                        ObjectLockMode="GOVERNANCE", ObjectLockRetainUntilDate=until)
    head = s3.head_object(Bucket=bucket, Key="chain/000001.json")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] == until
    # moto has no GetObjectRetention; HeadObject is how the retention is read back here.
    plain = s3.put_object(Bucket=bucket, Key="chain/000002.json", Body=b'{"seq": 2}')
    default = s3.head_object(Bucket=bucket, Key="chain/000002.json")
    left = default["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.UTC)
    assert default["ObjectLockMode"] == "GOVERNANCE"
    assert dt.timedelta(hours=23) < left <= dt.timedelta(days=1)

    with pytest.raises(ClientError, match="AccessDenied"):
        s3.delete_object(Bucket=bucket, Key="chain/000001.json", VersionId=put["VersionId"])
    assert s3.get_object(Bucket=bucket, Key="chain/000001.json")["Body"].read() == b'{"seq": 1}'
    # GOVERNANCE yields to an explicit bypass (COMPLIANCE would not, on real S3).
    s3.delete_object(Bucket=bucket, Key="chain/000002.json", VersionId=plain["VersionId"],
                     BypassGovernanceRetention=True)


def test_secrets_are_readable_by_name_and_arn(moto: dict[str, Any],
                                              setup: dict[str, Any]) -> None:
    sm = aws.secretsmanager(moto)
    arn = setup["secret_ids"]["drflow-lab/slack"]
    assert arn.startswith("arn:aws:secretsmanager:us-east-1:")
    assert json.loads(sm.get_secret_value(SecretId=arn)["SecretString"]) == {"bot_token": "xoxb-1"}
    assert sm.get_secret_value(SecretId="drflow-lab/plain")["SecretString"] == "s3cr3t"


def test_setup_again_reuses_the_zone_and_updates_secrets(moto: dict[str, Any],
                                                        setup: dict[str, Any]) -> None:
    again = aws.setup_aws(moto, GROUPS[:1], {"drflow-lab/plain": "rotated"})
    try:
        assert again["zone_id"] == setup["zone_id"]
        zones = aws.route53(moto).list_hosted_zones()["HostedZones"]
        assert [z["Name"] for z in zones].count("lab.drflow.internal.") == 1
        sm = aws.secretsmanager(moto)
        assert sm.get_secret_value(SecretId="drflow-lab/plain")["SecretString"] == "rotated"
    finally:
        aws.setup_aws(moto, GROUPS, SECRETS)


def test_health_reports_running_and_unreachable(moto: dict[str, Any],
                                                setup: dict[str, Any]) -> None:
    ok, detail = aws.health({**moto, "audit_bucket": setup["audit_bucket"]})
    assert ok, detail
    assert "bucket drflow-audit" in detail and "1 hosted zone" in detail
    ok, detail = aws.health({**moto, "endpoint_url": f"http://127.0.0.1:{procs.free_port()}"})
    assert not ok and "does not answer" in detail
    ok, detail = aws.health({**moto, "audit_bucket": "no-such-bucket"})
    assert not ok
