"""drflow's configuration: pydantic models of `drflow.yaml`, validation, load and dump.

Every problem is reported at once, each with its field path (`groups[1].dns.ttl`) and the YAML
line it comes from. Secrets appear only as references (see `drflow.secrets`).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from drflow.secrets import SecretRef, resolve

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_SLACK_USER = re.compile(r"[UW][A-Z0-9]+")
_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ZONE_ID = re.compile(r"[A-Z0-9]+")
# Only the loader sets this: it runs the cross-field checks itself to report exact paths.
_DEFER_CROSS_CHECKS = "drflow_defer_cross_checks"


class _Model(BaseModel):
    # hide_input_in_errors: a mistyped field may well hold a secret; errors never echo input.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


def _check_url(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"URL must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.password is not None:
        raise ValueError("URL must not contain a password; put it in a secret reference")
    return value


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value.removesuffix(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError("must be a host name or an IP address")
    return value


HttpUrl = Annotated[str, AfterValidator(_check_url)]
HostName = Annotated[str, AfterValidator(_check_host)]


def _check_dns_label(value: str, what: str) -> str:
    if not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{what} must be DNS-label-safe: 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return value


_CRON_FIELDS: list[tuple[str, int, int, list[str]]] = [
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day of month", 1, 31, []),
    ("month", 1, 12, ["jan", "feb", "mar", "apr", "may", "jun",
                      "jul", "aug", "sep", "oct", "nov", "dec"]),
    ("day of week", 0, 7, ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]),
]


def cron_problem(expr: str) -> str | None:
    """Why `expr` is not a valid 5-field cron expression, or None if it is."""
    parts = expr.split()
    if len(parts) != 5:
        return (f"must be a 5-field cron expression 'minute hour day-of-month month day-of-week', "
                f"e.g. '0 3 * * 0' (got {len(parts)} fields)")
    for part, (name, lo, hi, names) in zip(parts, _CRON_FIELDS, strict=True):
        for item in part.split(","):
            rng, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                return f"cron {name} field {part!r}: step must be a positive number"
            if rng == "*":
                continue
            bounds = rng.split("-")
            if len(bounds) > 2:
                return f"cron {name} field {part!r}: bad range {rng!r}"
            values: list[int] = []
            for b in bounds:
                if b.isdigit():
                    values.append(int(b))
                elif b.lower() in names:
                    # Month names count from 1, weekday names from 0 (sun).
                    values.append(names.index(b.lower()) + (1 if lo == 1 else 0))
                else:
                    return f"cron {name} field {part!r}: {b!r} is not a number"
            if any(not lo <= v <= hi for v in values):
                return f"cron {name} field {part!r}: values must be within {lo}-{hi}"
            if len(values) == 2 and values[0] > values[1]:
                return f"cron {name} field {part!r}: range {rng!r} runs backwards"
    return None


def _cron_values(part: str, lo: int, hi: int, names: list[str]) -> set[int]:
    out: set[int] = set()
    for item in part.split(","):
        rng, _, step = item.partition("/")
        if rng == "*":
            a, b = lo, hi
        else:
            bounds = [int(x) if x.isdigit() else names.index(x.lower()) + (1 if lo == 1 else 0)
                      for x in rng.split("-")]
            a, b = bounds[0], bounds[-1] if len(bounds) == 2 or not step else hi
        out.update(range(a, b + 1, int(step) if step else 1))
    return out


def cron_matches(expr: str, at: datetime) -> bool:
    """Whether the valid 5-field cron `expr` fires in the minute of `at` (cron's rules: when
    both day of month and day of week are restricted, either one matching is enough)."""
    sets = [_cron_values(p, lo, hi, names)
            for p, (_, lo, hi, names) in zip(expr.split(), _CRON_FIELDS, strict=True)]
    minute, hour, mday, month, wday = sets
    if 7 in wday:
        wday.add(0)  # 0 and 7 are both Sunday
    day_ok = at.day in mday, at.isoweekday() % 7 in wday
    dom_any, dow_any = expr.split()[2] == "*", expr.split()[4] == "*"
    day = (day_ok[0] and day_ok[1]) if dom_any or dow_any else (day_ok[0] or day_ok[1])
    return at.minute in minute and at.hour in hour and at.month in month and day


SiteName = Annotated[str, AfterValidator(lambda v: _check_dns_label(v, "site name"))]


class VCenterConfig(_Model):
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


class SiteConfig(_Model):
    vcenter: VCenterConfig


class AwsConfig(_Model):
    """AWS access (Route 53, S3, Secrets Manager). Omitted settings fall to boto3's default chain."""

    region: str | None = None
    endpoint_url: HttpUrl | None = None
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not _AWS_REGION.fullmatch(v):
            raise ValueError("must be an AWS region name such as 'us-east-1'")
        return v


class SlackConfig(_Model):
    api_url: str = "https://slack.com/api/"
    channel: str = Field(min_length=1, pattern=r"^\S+$")
    bot_token: SecretRef
    signing_secret: SecretRef

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str) -> str:
        # slack_sdk joins method names onto base_url: without the slash it would drop "api".
        return _check_url(v) if v.endswith("/") else _check_url(v) + "/"


class AuditConfig(_Model):
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
            return _check_url(v, ("postgresql", "postgres"))
        raise ValueError("must be 'sqlite:////ABSOLUTE/PATH.db', 'sqlite:///RELATIVE/PATH.db' or "
                         "'postgresql://USER@HOST:PORT/DB'")

    @field_validator("s3_bucket")
    @classmethod
    def _bucket(cls, v: str | None) -> str | None:
        if v is not None and not _S3_BUCKET.fullmatch(v):
            raise ValueError("must be an S3 bucket name: 3-63 lowercase letters, digits, '.', '-'")
        return v


class GatewayConfig(_Model):
    """The webhook gateway: where it listens and how agents' webhooks are verified."""

    listen: str = "127.0.0.1:8088"
    # Where runbooks (possibly on another host) reach the gateway; default: `listen`, unless that
    # binds every address (0.0.0.0, ::), which no client can dial.
    url: HttpUrl | None = None
    webhook_secret: SecretRef
    # Signs the orchestrator's calls to the agents' control API (start, stop, rewind_to, …).
    control_secret: SecretRef | None = None
    heartbeat_timeout_s: float = Field(default=3.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("must be 'HOST:PORT' with a port in 1..65535, e.g. '127.0.0.1:8088'")
        _check_host(host.strip("[]"))
        return v

    @model_validator(mode="after")
    def _reachable(self) -> Self:
        if self.url is None and _is_wildcard(self.host):
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

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class DatabaseConfig(_Model):
    """The application database drflow connects to for checks, promotion and lag."""

    name: str = Field(min_length=1)
    user: str = Field(min_length=1)
    password: SecretRef


class NodeConfig(_Model):
    """One side of a protection group: the VM, its database endpoint and its guest agent."""

    site: str
    vm: str = Field(min_length=1)
    host: HostName
    port: int = Field(ge=1, le=65535)
    agent_url: HttpUrl | None = None


class DnsConfig(_Model):
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
        _check_host(name)
        return name + "."


class PolicyConfig(_Model):
    """What drflow may do on its own, and who approves what it may not."""

    auto_failover: bool = False
    auto_failback: bool = False
    approvers: list[str] = Field(default_factory=list)
    approvals_required: Literal[1, 2] = 1
    approval_timeout_s: float = Field(default=3600.0, gt=0)
    drill_schedule: str | None = None

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


class GroupConfig(_Model):
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
        return _check_dns_label(v, "group name")


class DrillConfig(_Model):
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

    @field_validator("work_dir")
    @classmethod
    def _work_dir(cls, v: str) -> str:
        # PostgreSQL settings quote it, and a copy must never land in a relative, moving place.
        if not v.startswith("/") or any(c in v for c in "'\"\\ \t\n"):
            raise ValueError("must be an absolute path without spaces, quotes or backslashes")
        return v

    @field_validator("port_range")
    @classmethod
    def _ports(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError("must be [LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535")
        return v


class DrflowConfig(_Model):
    """The whole of `drflow.yaml`."""

    sites: dict[SiteName, SiteConfig] = Field(min_length=1)
    aws: AwsConfig | None = None
    slack: SlackConfig
    audit: AuditConfig
    gateway: GatewayConfig
    groups: list[GroupConfig] = Field(min_length=1)
    drill: DrillConfig | None = None  # None: the defaults of DrillConfig

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Self:
        if info.context and info.context.get(_DEFER_CROSS_CHECKS):
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


Loc = tuple[str | int, ...]


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


def format_path(loc: Loc) -> str:
    """('groups', 1, 'dns', 'ttl') → 'groups[1].dns.ttl'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def format(self, source: str) -> str:
        where = source if self.line is None else f"{source}:{self.line}"
        if self.line is not None and self.column is not None:
            where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every issue found."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.format(source) for p in problems))


@dataclass
class _Marks:
    """YAML positions (1-based line, column) of keys and values, by path."""

    keys: dict[Loc, int]
    values: dict[Loc, int]

    def line_of(self, loc: Loc) -> int | None:
        # A missing field has no position: point at the nearest enclosing one instead.
        for n in range(len(loc), -1, -1):
            sub = loc[:n]
            pos = self.keys.get(sub) or self.values.get(sub)
            if pos is not None:
                return pos
        return None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _collect_marks(node: yaml.Node, loc: Loc, marks: _Marks, problems: list[Problem],
                   stack: set[int]) -> None:
    if id(node) in stack:  # a recursive alias
        return
    marks.values.setdefault(loc, _line(node))
    stack.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key: str | int = key_node.value
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag.endswith(":int"):
                key = int(key_node.value)
            line = _line(key_node)
            if str(key) in first and key != "<<":
                problems.append(Problem(format_path((*loc, key)),
                                        f"duplicate key (first at line {first[str(key)]})", line))
            first.setdefault(str(key), line)
            marks.keys.setdefault((*loc, key), line)
            _collect_marks(value_node, (*loc, key), marks, problems, stack)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_marks(item, (*loc, i), marks, problems, stack)
    stack.discard(id(node))


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class found at `loc` when walking down from DrflowConfig, if any."""
    tp: Any = DrflowConfig
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict and isinstance(part, str):
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _message(err: Any, loc: Loc) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        if close:
            return f"unknown field; did you mean {close[0]!r}?"
        return "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
           "less_than_equal": "<="}
    if kind in ops:
        limit = next(iter(ctx.values()), "?")
        return f"must be {ops[kind]} {limit}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"must have at least {n} {'entry' if n == 1 else 'entries'}"
    msg = str(err["msg"])
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if msg.startswith("Input should be"):
        return "must be" + msg.removeprefix("Input should be")
    return msg


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    return tuple(p for p in loc if p != "[key]")


def parse_config(text: str, source: str = "<string>") -> DrflowConfig:
    """Validate YAML `text`; raise ConfigError with every problem, each with path and line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        what = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            started = f" started at line {e.context_mark.line + 1}" if e.context_mark else ""
            what += f" ({e.context}{started})"
        raise ConfigError(source, [Problem("", f"YAML syntax error: {what}", line, col)]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [Problem("", f"YAML error: {e}")]) from None
    if root is None:
        raise ConfigError(source, [Problem("", "the file is empty; start from "
                                               "examples/drflow.yaml")])
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the top level must be a mapping of sections "
                                               "(sites, aws, slack, audit, gateway, groups)", 1)])
    marks = _Marks({}, {})
    problems: list[Problem] = []
    _collect_marks(root, (), marks, problems, set())

    def problem(loc: Loc, message: str) -> Problem:
        # Columns only for syntax errors: a field's line is enough to find it.
        return Problem(format_path(loc), message, marks.line_of(loc))

    try:
        cfg = DrflowConfig.model_validate(data, context={_DEFER_CROSS_CHECKS: True})
    except ValidationError as e:
        for err in e.errors(include_input=False, include_url=False):
            loc = _clean_loc(err["loc"])
            problems.append(problem(loc, _message(err, loc)))
        raise ConfigError(source, _sorted(problems)) from None
    problems += [problem(loc, msg) for loc, msg in cross_check(cfg)]
    if problems:
        raise ConfigError(source, _sorted(problems))
    return cfg


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.path))


def load_config(path: str | Path) -> DrflowConfig:
    """Read and validate a drflow YAML file; raise ConfigError (also for a missing file)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [Problem("", "no such file; copy examples/drflow.yaml and "
                                               "adapt it")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, [Problem("", f"cannot read the file: {e}")]) from None
    return parse_config(text, source)


def dump_config(cfg: DrflowConfig) -> str:
    """YAML text that `load_config` reads back to an equal config; secrets stay references."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
