"""The pydantic models of `drflow.yaml`, and the checks that span several fields."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from drflow.config.cron import cron_problem
from drflow.config.fields import (
    DEFER_CROSS_CHECKS,
    HostName,
    HttpUrl,
    Loc,
    Model,
    check_dns_label,
    check_host,
    check_url,
    format_path,
    is_wildcard,
    matching,
)
from drflow.listen import ListenAddress
from drflow.secrets import SecretRef, resolve

_SLACK_USER = re.compile(r"[UW][A-Z0-9]+")
_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ZONE_ID = re.compile(r"[A-Z0-9]+")


SiteName = Annotated[str, AfterValidator(lambda v: check_dns_label(v, "site name"))]


class VCenterConfig(Model):
    """How to reach one site's vCenter (the vSphere API endpoint, usually ending in /sdk)."""

    url: HttpUrl
    datacenter: str = Field(min_length=1)
    username: str = Field(min_length=1)
    password: SecretRef
    verify_tls: bool = True

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/sdk"


class SiteConfig(Model):
    vcenter: VCenterConfig


class AwsConfig(Model):
    """AWS access (Route 53, S3, Secrets Manager). Omitted settings fall to boto3's default chain."""

    region: str | None = None
    endpoint_url: HttpUrl | None = None
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None

    _region = field_validator("region")(
        matching(_AWS_REGION, "must be an AWS region name such as 'us-east-1'"))


class SlackConfig(Model):
    api_url: str = "https://slack.com/api/"
    channel: str = Field(min_length=1, pattern=r"^\S+$")
    bot_token: SecretRef
    signing_secret: SecretRef

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str) -> str:
        # slack_sdk joins method names onto base_url: without the slash it would drop "api".
        return check_url(v) if v.endswith("/") else check_url(v) + "/"


class AuditConfig(Model):
    """Where the hash-chained audit trail lives (SQLite or PostgreSQL) and where it is exported."""

    url: str
    password: SecretRef | None = None
    s3_bucket: str | None = None
    retention_days: int = Field(default=365, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        # SQLAlchemy's convention, as the audit store reads it: sqlite:////abs, sqlite:///rel.
        if v.startswith("sqlite:///") and len(v) > len("sqlite:///") and ":memory:" not in v:
            return v
        if v.startswith(("postgresql://", "postgres://")):
            return check_url(v, ("postgresql", "postgres"))
        raise ValueError("must be 'sqlite:////ABSOLUTE/PATH.db', 'sqlite:///RELATIVE/PATH.db' or "
                         "'postgresql://USER@HOST:PORT/DB'")

    _bucket = field_validator("s3_bucket")(
        matching(_S3_BUCKET, "must be an S3 bucket name: 3-63 lowercase letters, digits, '.', '-'"))


class GatewayConfig(Model, ListenAddress):
    """The webhook gateway: where it listens and how agents' webhooks are verified."""

    listen: str = "127.0.0.1:8088"
    # Where runbooks (possibly on another host) reach the gateway; default: `listen`, unless that
    # binds every address (0.0.0.0, ::), which no client can dial.
    url: HttpUrl | None = None
    webhook_secret: SecretRef
    # Signs the orchestrator's calls to the agents' control API (start, stop, rewind_to, …).
    control_secret: SecretRef | None = None
    heartbeat_timeout_s: float = Field(default=3.0, gt=0)
    # How often the gateway refreshes each group's status (GET /v1/groups, /metrics, the
    # console) in the background; a request gets the last completed refresh at once.
    status_refresh_s: float = Field(default=2.0, gt=0)
    # Incidents, the replay cache, roles records and approvals kept in etcd (needs `etcd`), so
    # that every gateway replica answers every agent and click alike; False: in each replica's
    # own SQLite file (one replica).
    shared_state: bool = False

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("must be 'HOST:PORT' with a port in 1..65535, e.g. '127.0.0.1:8088'")
        check_host(host.strip("[]"))
        return v

    @model_validator(mode="after")
    def _reachable(self) -> Self:
        if self.url is None and is_wildcard(self.host):
            raise ValueError(f"gateway.listen {self.listen!r} binds every address, which is no "
                             "address a runbook can call: set gateway.url to the URL workers "
                             "reach the gateway at, e.g. 'http://gateway.dr.example.com:8088'")
        return self

    @property
    def client_url(self) -> str:
        """Base URL (no trailing slash) runbooks report role changes to."""
        if self.url is not None:
            return self.url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _absolute_path(v: str) -> str:
    # PostgreSQL settings quote it, and a copy must never land in a relative, moving place.
    if not v.startswith("/") or any(c in v for c in "'\"\\ \t\n"):
        raise ValueError("must be an absolute path without spaces, quotes or backslashes")
    return v


class DatabaseConfig(Model):
    """The application database drflow connects to for checks, promotion and lag."""

    name: str = Field(min_length=1)
    user: str = Field(min_length=1)
    password: SecretRef


class NodeConfig(Model):
    """One side of a protection group: the VM, its database endpoint and its guest agent."""

    site: str
    vm: str = Field(min_length=1)
    host: HostName
    port: int = Field(ge=1, le=65535)
    agent_url: HttpUrl | None = None
    # This node's PostgreSQL data directory as the machine running drills sees it (a drill worker
    # in the DR VM, or on the host whose storage holds it). When it is a btrfs subvolume on the
    # file system of `drill.work_dir`, a drill snapshots it instead of copying the database
    # through the standby (docs/drills.md).
    datadir: str | None = None

    @field_validator("datadir")
    @classmethod
    def _datadir(cls, v: str | None) -> str | None:
        if v is not None:
            _absolute_path(v)
        return v


class DnsConfig(Model):
    """The Route 53 record clients use; failover re-points it at the new primary."""

    zone_id: str
    record: str
    ttl: int = Field(gt=0, le=2_147_483_647)

    @field_validator("zone_id")
    @classmethod
    def _zone(cls, v: str) -> str:
        bare = v.removeprefix("/hostedzone/")
        if not _ZONE_ID.fullmatch(bare):
            raise ValueError("must be a Route 53 hosted zone id such as 'Z0123456789ABC'")
        return bare

    @field_validator("record")
    @classmethod
    def _record(cls, v: str) -> str:
        # Route 53 answers with lowercase, dot-terminated names: store them that way.
        name = v.lower().removesuffix(".")
        if "." not in name:
            raise ValueError("must be a fully qualified name, e.g. 'orders.db.example.com.'")
        check_host(name)
        return name + "."


class PolicyConfig(Model):
    """What drflow may do on its own, and who approves what it may not."""

    auto_failover: bool = False
    auto_failback: bool = False
    approvers: list[str] = Field(default_factory=list)
    approvals_required: Literal[1, 2] = 1
    approval_timeout_s: float = Field(default=3600.0, gt=0)
    drill_schedule: str | None = None
    # The primary agent's leader lease (docs/fencing.md): it fences itself before this runs out.
    lease_s: int = Field(default=3, ge=2, le=60)
    # How long a takeover waits for a VM that vCenter shows stunned (snapshot, migration).
    stun_grace_s: float = Field(default=10.0, ge=0, le=600)

    @field_validator("approvers")
    @classmethod
    def _approvers(cls, v: list[str]) -> list[str]:
        for uid in v:
            if not _SLACK_USER.fullmatch(uid):
                raise ValueError(
                    f"{uid!r} is not a Slack user id: use ids like 'U0123ABCD' "
                    "(profile → ⋮ → Copy member ID), not names"
                )
        if len(set(v)) != len(v):
            raise ValueError("lists the same approver twice")
        return v

    @field_validator("drill_schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and (problem := cron_problem(v)):
            raise ValueError(problem)
        return v


class GroupConfig(Model):
    """A protection group: one application with a primary and a standby at different sites."""

    name: str
    application: Literal["postgres"] = "postgres"
    replication: Literal["sync", "async"]
    rpo_budget_s: float = Field(ge=0)
    database: DatabaseConfig
    primary: NodeConfig
    standby: NodeConfig
    dns: DnsConfig
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_dns_label(v, "group name")


class DrillConfig(Model):
    """Where DR drills build their bubble (optional section; the defaults suit most sites).

    The drill's copy of a standby is made by the machine running the drill, under `work_dir`,
    at most `max_rate` fast, and listens on 127.0.0.1 only, on a free port of `port_range`.
    """

    isolated_portgroup: str = Field(default="drflow-isolated", min_length=1)
    work_dir: str = "/var/tmp/drflow-drill"
    port_range: tuple[int, int] = (54400, 54499)
    # pg_basebackup --max-rate (kB/s, or with k/M): what the copy may take from the standby,
    # hence from production's commit latency. null: as fast as it goes. The drill's RTO counts
    # from the end of the copy, so a slower copy only lengthens the drill (BENCHMARKS.md).
    max_rate: str | None = Field(default="60M", pattern=r"^[1-9][0-9]*[kM]?$")
    # How the copy is made. snapshot: a copy-on-write snapshot of the standby's data directory
    # (its node's `datadir`, a btrfs subvolume on work_dir's file system): nothing read through
    # the standby, whatever the database's size. basebackup: pg_basebackup through the standby
    # at most `max_rate` fast. auto: snapshot where it can be made, else basebackup (the step
    # says why).
    copy_method: Literal["auto", "snapshot", "basebackup"] = "auto"

    @field_validator("work_dir")
    @classmethod
    def _work_dir(cls, v: str) -> str:
        return _absolute_path(v)

    @field_validator("port_range")
    @classmethod
    def _ports(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError("must be [LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535")
        return v


class EtcdConfig(Model):
    """The consensus store holding each group's leader and sync keys (docs/fencing.md).

    Production: three members, at prod, at DR and at a third location (the witness)."""

    endpoints: list[HttpUrl] = Field(min_length=1)
    timeout_s: float = Field(default=1.0, gt=0, le=30)


class DrflowConfig(Model):
    """The whole of `drflow.yaml`."""

    sites: dict[SiteName, SiteConfig] = Field(min_length=1)
    aws: AwsConfig | None = None
    slack: SlackConfig
    audit: AuditConfig
    gateway: GatewayConfig
    groups: list[GroupConfig] = Field(min_length=1)
    drill: DrillConfig | None = None  # None: the defaults of DrillConfig
    # None: no leader leases; failover then fences through vSphere only.
    etcd: EtcdConfig | None = None

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Self:
        if info.context and info.context.get(DEFER_CROSS_CHECKS):
            return self
        problems = cross_check(self)
        if problems:
            raise ValueError("; ".join(f"{format_path(loc)}: {msg}" for loc, msg in problems))
        return self

    def group(self, name: str) -> GroupConfig:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no protection group {name!r}; configured: "
                       + ", ".join(g.name for g in self.groups))

    def secret(self, ref: SecretRef) -> SecretStr:
        """Resolve `ref` using this config's `aws` section for `aws-sm:` references."""
        return resolve(ref, self.aws)

    def refs(self) -> list[tuple[str, SecretRef]]:
        """Every secret reference in the config, with its field path."""
        return [(format_path(loc), ref) for loc, ref in _iter_refs(self, ())]


def _iter_refs(value: Any, loc: Loc) -> Iterator[tuple[Loc, SecretRef]]:
    if isinstance(value, SecretRef):
        yield loc, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _iter_refs(getattr(value, name), (*loc, name))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _iter_refs(v, (*loc, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _iter_refs(v, (*loc, i))


def cross_check(cfg: DrflowConfig) -> list[tuple[Loc, str]]:
    """Checks that span fields: site references, uniqueness, approvals, AWS credentials."""
    problems: list[tuple[Loc, str]] = []
    if cfg.aws is not None:
        a = cfg.aws
        if (a.access_key_id is None) != (a.secret_access_key is None):
            missing = "secret_access_key" if a.secret_access_key is None else "access_key_id"
            problems.append((("aws", missing), "access_key_id and secret_access_key go together: "
                                               "set both, or neither to use boto3's default chain"))
        if a.session_token is not None and a.access_key_id is None:
            problems.append((("aws", "session_token"), "needs access_key_id and secret_access_key"))
        for name in ("access_key_id", "secret_access_key", "session_token"):
            ref = getattr(a, name)
            if ref is not None and ref.scheme == "aws-sm":
                problems.append((("aws", name), "AWS credentials cannot come from Secrets Manager "
                                                "itself: use an env: or file: reference"))
    if cfg.gateway.shared_state and cfg.etcd is None:
        problems.append((("gateway", "shared_state"), "keeps the gateway's state in etcd: add an "
                                                      "etcd section with its endpoints"))
    seen_names: dict[str, int] = {}
    seen_endpoints: dict[tuple[str, int], str] = {}
    seen_records: dict[str, int] = {}
    for i, g in enumerate(cfg.groups):
        at: Loc = ("groups", i)
        if g.name in seen_names:
            problems.append(((*at, "name"), f"duplicate group name {g.name!r} "
                                            f"(also groups[{seen_names[g.name]}])"))
        seen_names.setdefault(g.name, i)
        for role in ("primary", "standby"):
            node: NodeConfig = getattr(g, role)
            if node.site not in cfg.sites:
                problems.append(((*at, role, "site"), f"site {node.site!r} is not defined under "
                                 f"sites (defined: {', '.join(cfg.sites)})"))
            if not _is_ipv4(node.host):
                problems.append(((*at, role, "host"), f"failover and failback point the A record "
                                 f"{g.dns.record} at this host, and an A record holds an IPv4 "
                                 f"address: {node.host!r} is not one; write the address"))
            endpoint = (node.host, node.port)
            where = f"groups[{i}].{role}"
            if endpoint in seen_endpoints:
                problems.append(((*at, role, "port"), f"{node.host}:{node.port} is already used by "
                                 f"{seen_endpoints[endpoint]}"))
            seen_endpoints.setdefault(endpoint, where)
        if g.primary.site == g.standby.site:
            problems.append(((*at, "standby", "site"), "standby must be at a different site than "
                             f"the primary (both are {g.primary.site!r})"))
        if g.dns.record in seen_records:
            problems.append(((*at, "dns", "record"), f"{g.dns.record} is already managed by "
                             f"groups[{seen_records[g.dns.record]}]"))
        seen_records.setdefault(g.dns.record, i)
        p = g.policy
        if p.auto_failback and not p.approvers:
            problems.append(((*at, "policy", "approvers"),
                             "auto_failback needs at least one approver (Slack user id)"))
        if p.approvers and p.approvals_required > len(p.approvers):
            problems.append(((*at, "policy", "approvals_required"),
                             f"is {p.approvals_required} but only {len(p.approvers)} approver(s) "
                             "are listed"))
    return problems


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True

