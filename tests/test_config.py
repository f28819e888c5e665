"""drflow's configuration: models, loader errors with paths and lines, secret references, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from drflow import secrets
from drflow.config import (
    ConfigError,
    DrflowConfig,
    cron_matches,
    cron_problem,
    dump_config,
    load_config,
    parse_config,
)
from drflow.secrets import SecretError, SecretRef, resolve
from lab.procs import free_port, spawn, stop_tree, wait_port
from orchestrator.cli_app import app as cli_app

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
runner = CliRunner()

# Two groups so that errors in groups[1] prove the index is right.
GOOD = """\
sites:
  prod:
    vcenter:
      url: "http://127.0.0.1:18989/sdk"
      datacenter: prod
      username: drflow
      password: {ref: "env:DRFLOW_TEST_VC_PASSWORD"}
  dr:
    vcenter:
      url: "http://127.0.0.1:18989/sdk"
      datacenter: dr
      username: drflow
      password: {ref: "env:DRFLOW_TEST_VC_PASSWORD"}
aws:
  region: us-east-1
  endpoint_url: "http://127.0.0.1:18990"
  access_key_id: {ref: "file:/tmp/drflow-test-none/aws_access_key_id"}
  secret_access_key: {ref: "file:/tmp/drflow-test-none/aws_secret_access_key"}
slack:
  api_url: "http://127.0.0.1:18991/api/"
  channel: C0DRFLOW1
  bot_token: {ref: "env:SLACK_BOT_TOKEN"}
  signing_secret: {ref: "aws-sm:drflow-lab/slack#signing_secret"}
audit:
  url: "sqlite:////tmp/drflow-test-none/audit.db"
  s3_bucket: drflow-audit
  retention_days: 365
gateway:
  listen: "127.0.0.1:8088"
  webhook_secret: {ref: "env:DRFLOW_WEBHOOK_SECRET"}
  heartbeat_timeout_s: 3
groups:
  - name: orders
    application: postgres
    replication: sync
    rpo_budget_s: 5
    database: {name: postgres, user: drflow, password: {ref: "aws-sm:drflow-lab/postgres#password"}}
    primary: {site: prod, vm: orders-prod, host: 127.0.0.1, port: 5433, agent_url: "http://127.0.0.1:7001"}
    standby: {site: dr, vm: orders-dr, host: 127.0.0.1, port: 5434, agent_url: "http://127.0.0.1:7002"}
    dns: {zone_id: Z123, record: orders.db.lab.drflow.internal., ttl: 30}
    policy:
      auto_failover: true
      approvers: [U0ONCALL1]
      approvals_required: 1
      approval_timeout_s: 3600
      drill_schedule: "0 3 * * 0"
  - name: payments
    replication: async
    rpo_budget_s: 30
    database:
      name: postgres
      user: drflow
      password: {ref: "aws-sm:drflow-lab/postgres#password"}
    primary:
      site: prod
      vm: payments-prod
      host: 127.0.0.1
      port: 5435
    standby:
      site: dr
      vm: payments-dr
      host: 127.0.0.1
      port: 5436
    dns:
      zone_id: Z123
      record: payments.db.lab.drflow.internal.
      ttl: 30
"""


@pytest.fixture(autouse=True)
def _fresh_secret_cache() -> Iterator[None]:
    secrets.clear_cache()
    yield
    secrets.clear_cache()


def write(tmp_path: Path, text: str, name: str = "drflow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def mutate(old: str, new: str, count: int = 1, start: str = "") -> str:
    """GOOD with the first `count` occurrences of `old` (after `start`) replaced by `new`."""
    at = GOOD.index(start) if start else 0
    assert old in GOOD[at:], old
    return GOOD[:at] + GOOD[at:].replace(old, new, count)


# --- good files ----------------------------------------------------------------------------


def test_good_config_loads_with_its_shape(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert list(cfg.sites) == ["prod", "dr"]
    assert [g.name for g in cfg.groups] == ["orders", "payments"]
    orders, payments = cfg.groups
    assert orders.primary.port == 5433 and orders.standby.site == "dr"
    assert orders.policy.auto_failover and orders.policy.drill_schedule == "0 3 * * 0"
    assert payments.application == "postgres" and payments.policy.auto_failover is False
    assert payments.primary.agent_url is None
    assert cfg.aws is not None and cfg.aws.endpoint_url == "http://127.0.0.1:18990"
    assert orders.database.password == SecretRef(ref="aws-sm:drflow-lab/postgres#password")
    vc = cfg.sites["prod"].vcenter
    assert (vc.host, vc.port, vc.protocol, vc.path) == ("127.0.0.1", 18989, "http", "/sdk")
    assert (cfg.gateway.host, cfg.gateway.port) == ("127.0.0.1", 8088)
    assert cfg.gateway.status_refresh_s == 2.0
    assert cfg.group("payments") is payments
    with pytest.raises(KeyError, match="orders, payments"):
        cfg.group("nope")
    assert len(cfg.refs()) == 9
    assert ("slack.bot_token", SecretRef(ref="env:SLACK_BOT_TOKEN")) in cfg.refs()


def test_example_file_is_valid() -> None:
    cfg = load_config(REPO / "examples" / "drflow.yaml")
    assert [g.name for g in cfg.groups] == ["orders"]
    assert cfg.groups[0].policy.approvers == ["U0ONCALL1", "U0ONCALL2"]


def test_dump_round_trips_and_keeps_refs(tmp_path: Path) -> None:
    cfg = parse_config(GOOD)
    text = dump_config(cfg)
    assert parse_config(text) == cfg
    assert yaml.safe_load(text)["slack"]["bot_token"] == {"ref": "env:SLACK_BOT_TOKEN"}


def test_normalisation() -> None:
    text = mutate("record: orders.db.lab.drflow.internal.", "record: Orders.DB.lab.drflow.internal")
    text = text.replace("zone_id: Z123, record: Orders", "zone_id: /hostedzone/Z123, record: Orders")
    text = text.replace('api_url: "http://127.0.0.1:18991/api/"', 'api_url: "http://127.0.0.1:18991/api"')
    cfg = parse_config(text)
    assert cfg.groups[0].dns.record == "orders.db.lab.drflow.internal."
    assert cfg.groups[0].dns.zone_id == "Z123"
    assert cfg.slack.api_url == "http://127.0.0.1:18991/api/"


def test_cli_check_good_file(tmp_path: Path) -> None:
    result = runner.invoke(cli_app, ["config", "check", str(write(tmp_path, GOOD))])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    assert "prod, dr" in result.output
    assert "orders: postgres sync, prod → dr" in result.output
    assert "payments: postgres async" in result.output


def test_cli_check_as_real_subprocess(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    ok = subprocess.run([str(VENV_BIN / "drflow"), "config", "check", str(path)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "2 group(s)" in ok.stdout
    bad = subprocess.run([str(VENV_BIN / "drflow"), "config", "check",
                          str(write(tmp_path, mutate("ttl: 30", "ttl: 0", start="payments")))],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    line = GOOD.splitlines().index("      ttl: 30") + 1
    assert f"{path}:{line}: groups[1].dns.ttl: must be > 0" in bad.stderr


def test_cli_show_prints_normalised_config(tmp_path: Path) -> None:
    result = runner.invoke(cli_app, ["config", "show", str(write(tmp_path, GOOD))])
    assert result.exit_code == 0, result.output
    assert parse_config(result.output) == parse_config(GOOD)


def test_cli_help_is_useful() -> None:
    result = runner.invoke(cli_app, ["config", "check", "--help"])
    assert result.exit_code == 0
    assert "--resolve-secrets" in result.output and "Exit status" in result.output


# --- bad files: each problem names the field path and the YAML line ------------------------

HERE = "  # HERE"
BAD_CASES = [
    # (id, old, new, start, expected "path: message" prefix)
    ("ttl", "      ttl: 30", "      ttl: 0" + HERE, "payments", "groups[1].dns.ttl: must be > 0"),
    ("status-refresh", "  heartbeat_timeout_s: 3",
     "  heartbeat_timeout_s: 3\n  status_refresh_s: 0" + HERE, "",
     "gateway.status_refresh_s: must be > 0"),
    ("rpo", "rpo_budget_s: 5", "rpo_budget_s: -1" + HERE, "", "groups[0].rpo_budget_s: must be >= 0"),
    ("port-high", "      port: 5435", "      port: 70000" + HERE, "",
     "groups[1].primary.port: must be <= 65535"),
    ("port-zero", "      port: 5436", "      port: 0" + HERE, "", "groups[1].standby.port: must be >= 1"),
    ("dup-name", "  - name: payments", "  - name: orders" + HERE, "",
     "groups[1].name: duplicate group name 'orders' (also groups[0])"),
    ("bad-name", "  - name: payments", "  - name: Payments_1" + HERE, "",
     "groups[1].name: group name must be DNS-label-safe"),
    ("same-site", "      site: dr", "      site: prod" + HERE, "payments",
     "groups[1].standby.site: standby must be at a different site"),
    ("unknown-site", "      site: dr", "      site: drr" + HERE, "payments",
     "groups[1].standby.site: site 'drr' is not defined under sites (defined: prod, dr)"),
    ("approvals-3", "      approvals_required: 1", "      approvals_required: 3" + HERE, "",
     "groups[0].policy.approvals_required: must be 1 or 2"),
    ("approvals-gt", "      approvals_required: 1", "      approvals_required: 2" + HERE, "",
     "groups[0].policy.approvals_required: is 2 but only 1 approver(s) are listed"),
    ("failback-no-approvers", "      approvers: [U0ONCALL1]",
     "      auto_failback: true\n      approvers: []" + HERE, "",
     "groups[0].policy.approvers: auto_failback needs at least one approver"),
    ("approver-name", "[U0ONCALL1]", "['@alice']" + HERE, "",
     "groups[0].policy.approvers: '@alice' is not a Slack user id"),
    ("cron-fields", '"0 3 * * 0"', '"0 3 * *"' + HERE, "",
     "groups[0].policy.drill_schedule: must be a 5-field cron expression"),
    ("cron-range", '"0 3 * * 0"', '"0 25 * * 0"' + HERE, "",
     "groups[0].policy.drill_schedule: cron hour field '25': values must be within 0-23"),
    ("replication", "    replication: async", "    replication: semi" + HERE, "",
     "groups[1].replication: must be 'sync' or 'async'"),
    ("agent-url", '"http://127.0.0.1:7002"}', '"127.0.0.1:7002"}' + HERE, "",
     "groups[0].standby.agent_url: URL must start with http:// or https://"),
    ("vcenter-url", '"http://127.0.0.1:18989/sdk"', '"ftp://127.0.0.1/sdk"' + HERE, "",
     "sites.prod.vcenter.url: URL must start with http:// or https://"),
    ("ref-scheme", '"env:SLACK_BOT_TOKEN"}', '"vault:slack/token"}' + HERE, "",
     "slack.bot_token.ref: unknown secret reference scheme 'vault'"),
    ("ref-relative-file", '"file:/tmp/drflow-test-none/aws_access_key_id"}',
     '"file:aws_access_key_id"}' + HERE, "", "aws.access_key_id.ref: file: reference needs an "
     "absolute path"),
    ("typo", "      ttl: 30", "      tll: 30" + HERE, "payments",
     "groups[1].dns.tll: unknown field; did you mean 'ttl'?"),
    ("missing", "    dns:\n      zone_id: Z123\n", "    dns:" + HERE + "\n", "payments",
     "groups[1].dns.zone_id: is required"),
    ("unknown-section", "gateway:\n", "gatway:" + HERE + "\n", "",
     "gatway: unknown field; did you mean 'gateway'?"),
    # A missing field has no line of its own: the problem points at its section.
    ("aws-half-creds", 'aws:\n  region: us-east-1\n', "aws:" + HERE + "\n  region: us-east-1\n", "",
     "aws.secret_access_key: access_key_id and secret_access_key go together"),
    ("aws-creds-from-sm", '"file:/tmp/drflow-test-none/aws_access_key_id"}',
     '"aws-sm:x#key"}' + HERE, "", "aws.access_key_id: AWS credentials cannot come from Secrets "
     "Manager"),
    ("dup-record", "record: payments.db.lab.drflow.internal.",
     "record: orders.db.lab.drflow.internal." + HERE, "",
     "groups[1].dns.record: orders.db.lab.drflow.internal. is already managed by groups[0]"),
    ("dup-endpoint", "      port: 5436", "      port: 5433" + HERE, "",
     "groups[1].standby.port: 127.0.0.1:5433 is already used by groups[0].primary"),
    ("audit-url-password", '"sqlite:////tmp/drflow-test-none/audit.db"',
     '"postgresql://drflow:pw@127.0.0.1/audit"' + HERE, "",
     "audit.url: URL must not contain a password"),
    ("listen", '"127.0.0.1:8088"', '"127.0.0.1"' + HERE, "", "gateway.listen: must be 'HOST:PORT'"),
    ("site-name", "  prod:\n", "  Prod:" + HERE + "\n", "",
     "sites.Prod: site name must be DNS-label-safe"),
    ("ref-not-mapping", '  webhook_secret: {ref: "env:DRFLOW_WEBHOOK_SECRET"}',
     "  webhook_secret: null" + HERE, "", "gateway.webhook_secret: must be a secret reference such as"),
    ("dup-key", "      ttl: 30", "      ttl: 30\n      ttl: 40" + HERE, "payments",
     "groups[1].dns.ttl: duplicate key"),
    ("dns-host-name", "      host: 127.0.0.1", "      host: payments-db.example.com" + HERE,
     "payments", "groups[1].primary.host: failover and failback point the A record "
     "payments.db.lab.drflow.internal. at this host, and an A record holds an IPv4 address: "
     "'payments-db.example.com' is not one"),
    ("dns-host-ipv6", "      host: 127.0.0.1", "      host: '::1'" + HERE, "payments",
     "groups[1].primary.host: failover and failback point the A record"),
]


def _marked_line(text: str) -> int:
    lines = text.splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.endswith(HERE))


@pytest.mark.parametrize(("old", "new", "start", "expected"),
                         [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_file_reports_path_and_line(tmp_path: Path, old: str, new: str, start: str,
                                        expected: str) -> None:
    text = mutate(old, new, start=start)
    if expected.startswith("aws.secret_access_key"):
        text = "\n".join(ln for ln in text.splitlines() if "secret_access_key" not in ln) + "\n"
    path = write(tmp_path, text)
    line = _marked_line(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.line == line and f"{p.path}: {p.message}".startswith(expected)
               for p in info.value.problems), str(info.value)
    result = runner.invoke(cli_app, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert f"{path}:{line}: {expected}" in result.output
    assert "problem" in result.output and "nothing was changed" in result.output


def test_several_problems_are_all_reported() -> None:
    text = mutate("      ttl: 30", "      ttl: -5", start="payments")
    text = text.replace("rpo_budget_s: 5", "rpo_budget_s: -1").replace("port: 5433", "port: 0")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "drflow.yaml")
    paths = [p.path for p in info.value.problems]
    assert paths == ["groups[0].rpo_budget_s", "groups[0].primary.port", "groups[1].dns.ttl"]
    assert [p.line for p in info.value.problems] == sorted(p.line or 0 for p in info.value.problems)


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    text = GOOD.replace("  channel: C0DRFLOW1", "  channel: [C0DRFLOW1")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.message.startswith("YAML syntax error")
    assert problem.line is not None and problem.column is not None
    result = runner.invoke(cli_app, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert f"{path}:{problem.line}:{problem.column}: YAML syntax error" in result.output


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file is empty"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("sites: {}\n", "sites: must have at least 1 entry"),
])
def test_degenerate_files(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(missing)
    result = runner.invoke(cli_app, ["config", "check", str(missing)])
    assert result.exit_code == 2
    assert f"{missing}: no such file; copy examples/drflow.yaml" in result.output


def test_direct_model_validation_also_runs_cross_checks() -> None:
    data = yaml.safe_load(mutate("      site: dr", "      site: prod", start="payments"))
    with pytest.raises(ValidationError, match=r"groups\[1\]\.standby\.site: standby must be"):
        DrflowConfig.model_validate(data)


@pytest.mark.parametrize("expr", ["0 3 * * 0", "*/5 * * * *", "0 0-23/2 1,15 jan-jun mon-fri",
                                  "30 4 1 * 7", "5/15 * * * *"])
def test_valid_cron(expr: str) -> None:
    assert cron_problem(expr) is None


@pytest.mark.parametrize(("expr", "why"), [
    ("0 3 * * 0 2024", "5-field"), ("60 * * * *", "0-59"), ("0 3 0 * *", "1-31"),
    ("0 3 * 13 *", "1-12"), ("0 3 * * 8", "0-7"), ("*/0 * * * *", "positive"),
    ("0 5-1 * * *", "backwards"), ("0 3 * * funday", "not a number"), ("@daily", "5-field"),
])
def test_invalid_cron(expr: str, why: str) -> None:
    problem = cron_problem(expr)
    assert problem is not None and why in problem


# --- secrets ---------------------------------------------------------------------------------

INLINE = "Inl1ne-S3cret-Value"


def test_inline_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    text = GOOD.replace('password: {ref: "aws-sm:drflow-lab/postgres#password"}}',
                        f"password: {INLINE}}}")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "groups[0].database.password: inline secrets are not allowed; use a reference" \
        in str(info.value)
    assert INLINE not in str(info.value) and INLINE not in repr(info.value)
    result = runner.invoke(cli_app, ["config", "check", str(path)])
    assert result.exit_code == 2 and INLINE not in result.output
    with pytest.raises(ValidationError) as direct:
        DrflowConfig.model_validate(yaml.safe_load(text))
    assert INLINE not in str(direct.value)
    # A secret under a mistyped key must not leak through the "unknown field" error either.
    typo = GOOD.replace("  bot_token: {ref", f"  bot_tokn: {INLINE}\n  bot_token: {{ref")
    with pytest.raises(ConfigError) as info2:
        parse_config(typo)
    assert "slack.bot_tokn: unknown field; did you mean 'bot_token'?" in str(info2.value)
    assert INLINE not in str(info2.value)


def test_env_and_file_refs_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRFLOW_TEST_TOKEN", "xoxb-from-env")
    assert resolve(SecretRef(ref="env:DRFLOW_TEST_TOKEN")).get_secret_value() == "xoxb-from-env"
    f = tmp_path / "pw"
    f.write_text("  from-file\n\n")
    ref = SecretRef(ref=f"file:{f}")
    assert resolve(ref).get_secret_value() == "from-file"
    # Cached per process: a rotated file is seen only after clear_cache().
    f.write_text("rotated\n")
    assert resolve(ref).get_secret_value() == "from-file"
    secrets.clear_cache()
    assert resolve(ref).get_secret_value() == "rotated"


def test_unresolvable_refs_name_the_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRFLOW_TEST_UNSET", raising=False)
    with pytest.raises(SecretError, match="env:DRFLOW_TEST_UNSET: environment variable "
                                          "DRFLOW_TEST_UNSET is not set"):
        resolve(SecretRef(ref="env:DRFLOW_TEST_UNSET"))
    with pytest.raises(SecretError, match=r"cannot read .*No such file"):
        resolve(SecretRef(ref=f"file:{tmp_path}/absent"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretError, match="value is empty"):
        resolve(SecretRef(ref=f"file:{tmp_path}/empty"))


@pytest.mark.parametrize(("ref", "why"), [
    ("plain", "unknown secret reference scheme"), ("env:", "variable name"),
    ("env:1BAD", "variable name"), ("aws-sm:", "secret id"), ("aws-sm:x#", "json key"),
])
def test_malformed_refs(ref: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        SecretRef(ref=ref)


def test_light_import_does_not_load_boto3() -> None:
    code = ("import sys, drflow.config, drflow.secrets, drflow.config_cli; "
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- aws-sm: against a real moto server ------------------------------------------------------

SM_JSON = {"password": "pg-Pa55-from-sm", "signing_secret": "slack-sign-from-sm"}
SM_PLAIN = "vcenter-plain-from-sm"
AWS_KEY_ID = "AKIDDRFLOWTEST1"
AWS_SECRET_KEY = "drflow-moto-secret-key"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto server holding the lab's secrets, plus credential files for it."""
    import boto3

    d = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = d / "moto.log"
    proc = spawn([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log)
    try:
        wait_port(port, 30, "moto_server", proc, log)
        url = f"http://127.0.0.1:{port}"
        sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=url,
                          aws_access_key_id=AWS_KEY_ID, aws_secret_access_key=AWS_SECRET_KEY)
        sm.create_secret(Name="drflow-lab/postgres", SecretString=json.dumps(SM_JSON))
        sm.create_secret(Name="drflow-lab/slack", SecretString=json.dumps(SM_JSON))
        sm.create_secret(Name="drflow-lab/vcenter-plain", SecretString=SM_PLAIN)
        (d / "aws_access_key_id").write_text(AWS_KEY_ID + "\n")
        (d / "aws_secret_access_key").write_text(AWS_SECRET_KEY + "\n")
        yield {"url": url, "dir": str(d)}
    finally:
        stop_tree(proc.pid)
        proc.wait(timeout=10)


def _moto_config(moto: dict[str, str]) -> DrflowConfig:
    text = GOOD.replace("http://127.0.0.1:18990", moto["url"]).replace(
        "/tmp/drflow-test-none/aws_", f"{moto['dir']}/aws_")
    return parse_config(text)


def test_aws_sm_refs_resolve_against_moto(moto: dict[str, str]) -> None:
    cfg = _moto_config(moto)
    pw = cfg.secret(cfg.groups[0].database.password)
    assert pw.get_secret_value() == SM_JSON["password"]
    assert cfg.secret(cfg.slack.signing_secret).get_secret_value() == SM_JSON["signing_secret"]
    plain = SecretRef(ref="aws-sm:drflow-lab/vcenter-plain")
    assert cfg.secret(plain).get_secret_value() == SM_PLAIN


def test_aws_sm_failures_name_the_ref_not_the_value(moto: dict[str, str]) -> None:
    cfg = _moto_config(moto)
    cases = {
        "aws-sm:drflow-lab/postgres#nokey": "has no key 'nokey' (keys: password, signing_secret)",
        "aws-sm:drflow-lab/absent": "secret 'drflow-lab/absent' does not exist",
        "aws-sm:drflow-lab/vcenter-plain#password": "is not a JSON object",
    }
    for ref, why in cases.items():
        with pytest.raises(SecretError) as info:
            cfg.secret(SecretRef(ref=ref))
        msg = str(info.value)
        assert ref in msg and why in msg, msg
        assert all(v not in msg for v in (*SM_JSON.values(), SM_PLAIN)), msg
        # Chained exceptions are printed in tracebacks: they must not carry values either.
        ctx = info.value.__cause__ or info.value.__context__
        assert ctx is None or all(v not in f"{ctx!r}{getattr(ctx, 'doc', '')}"
                                  for v in (*SM_JSON.values(), SM_PLAIN))


def test_aws_sm_unreachable_endpoint_is_explained(moto: dict[str, str]) -> None:
    cfg = _moto_config(moto)
    assert cfg.aws is not None
    dead = cfg.model_copy(update={"aws": cfg.aws.model_copy(
        update={"endpoint_url": f"http://127.0.0.1:{free_port()}"})})
    with pytest.raises(SecretError, match="cannot reach Secrets Manager"):
        dead.secret(dead.groups[0].database.password)


def test_cli_resolve_secrets(moto: dict[str, str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"DRFLOW_TEST_VC_PASSWORD": "vc-env-value-1", "SLACK_BOT_TOKEN": "xoxb-env-value-2",
              "DRFLOW_WEBHOOK_SECRET": "webhook-env-value-3"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    path = write(tmp_path, dump_config(_moto_config(moto)))
    result = runner.invoke(cli_app, ["config", "check", str(path), "--resolve-secrets"])
    assert result.exit_code == 0, result.output
    assert result.output.count("): ok") == 9
    assert "groups[0].database.password (aws-sm:drflow-lab/postgres#password): ok" in result.output
    monkeypatch.delenv("SLACK_BOT_TOKEN")
    secrets.clear_cache()
    failed = runner.invoke(cli_app, ["config", "check", str(path), "--resolve-secrets"])
    assert failed.exit_code == 1
    assert "slack.bot_token: FAILED: secret env:SLACK_BOT_TOKEN: environment variable" \
        in failed.output
    for out in (result.output, failed.output):
        for v in (*values.values(), *SM_JSON.values(), AWS_KEY_ID, AWS_SECRET_KEY):
            assert v not in out


def test_secret_values_never_show(moto: dict[str, str], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _moto_config(moto)
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-never-shown")
    resolved = [cfg.secret(ref) for _, ref in cfg.refs() if not ref.ref.startswith("env:DRFLOW")]
    values = [s.get_secret_value() for s in resolved]
    assert "xoxb-never-shown" in values and SM_JSON["password"] in values
    texts = [str(cfg), repr(cfg), dump_config(cfg), cfg.model_dump_json(),
             *(str(s) for s in resolved), *(repr(s) for s in resolved)]
    for text in texts:
        for v in values:
            assert v not in text


# --- the example claims every field; the cron matcher the embedded drill scheduler uses --------


def _unclaimed(model: type[BaseModel], data: Any, commented: set[str],
               path: str = "") -> Iterator[str]:
    """Paths of fields of `model` that `data` (the example, loaded) neither sets nor shows as a
    commented-out line; fields of models inside are checked where the example sets them."""
    for name, field in model.model_fields.items():
        if not (isinstance(data, dict) and name in data):
            if name not in commented:
                yield f"{path}{name}"
            continue
        inner = _model_type(field.annotation)
        if inner is None or inner is SecretRef:  # references: explained once, at the top
            continue
        value = data[name]
        is_map = get_origin(_unwrap_optional(field.annotation)) is dict
        items = value if isinstance(value, list) else list(value.values()) if is_map else [value]
        # Shown once is enough for a list or map of the same model (e.g. two sites).
        per_item = [set(_unclaimed(inner, item, commented, f"{path}{name}.")) for item in items]
        yield from sorted(set.intersection(*per_item)) if per_item else []


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp


def _model_type(tp: Any) -> type[BaseModel] | None:
    for arg in (tp, *get_args(tp), *(a for t in get_args(tp) for a in get_args(t))):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def test_example_claims_every_field_of_the_config() -> None:
    text = (REPO / "examples" / "drflow.yaml").read_text()
    commented = {m.group(1) for m in re.finditer(r"^\s*#\s*([a-z_0-9]+):", text, re.M)}
    missing = list(_unclaimed(DrflowConfig, yaml.safe_load(text), commented))
    assert missing == [], f"examples/drflow.yaml does not show {missing}"
    load_config(REPO / "examples" / "drflow.yaml")
    # agent_url is marked as what re-protect and failback need.
    for line in [ln for ln in text.splitlines() if ln.strip().startswith("agent_url:")]:
        assert "re-protect and failback" in line, line


@pytest.mark.parametrize(("cron", "when", "fires"), [
    ("0 3 * * 0", datetime(2026, 11, 29, 3, 0), True),  # a Sunday
    ("0 3 * * 0", datetime(2026, 11, 30, 3, 0), False),
    ("0 3 * * 7", datetime(2026, 11, 29, 3, 0), True),
    ("*/15 * * * *", datetime(2026, 1, 1, 0, 45), True),
    ("*/15 * * * *", datetime(2026, 1, 1, 0, 46), False),
    ("30 2 * * 1-5", datetime(2026, 12, 2, 2, 30), True),
    ("30 2 * * mon-fri", datetime(2026, 12, 5, 2, 30), False),  # a Saturday
    ("0 0 1 * sun", datetime(2026, 12, 1, 0, 0), True),  # day of month OR day of week
    ("0 0 1 * sun", datetime(2026, 11, 29, 0, 0), True),
    ("0 0 1 * sun", datetime(2026, 12, 2, 0, 0), False),
    ("5/20 * * * *", datetime(2026, 1, 1, 0, 45), True),
    ("0 0 * jan-mar *", datetime(2026, 4, 1, 0, 0), False),
])
def test_cron_matches(cron: str, when: datetime, fires: bool) -> None:
    assert cron_problem(cron) is None
    assert cron_matches(cron, when) is fires
