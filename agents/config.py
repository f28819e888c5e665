"""The agent's configuration file (agent.yaml): what to watch, how to repair it, where to report.

The models are msgspec Structs, not pydantic models: the agent stays resident in every protected
VM and pydantic alone would cost it about 20 MB. Field constraints are `msgspec.Meta`
annotations (checked when a document is decoded); cross-field rules live in `__post_init__`
(checked on decoding and on construction).
"""

from __future__ import annotations

import ipaddress
import re
from os import PathLike
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

import msgspec
import yaml

from agents.graph import Graph, GraphError
from drflow.listen import ListenAddress
from drflow.secret_refs import SecretRef
from drflow.struct_errors import FieldError, split_error

# `\Z`, not `$`: msgspec matches with Python's `re`, where `$` also matches before a trailing
# newline (pydantic's Rust regex did not), and a name ends up in events and file names.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z"
DEFAULT_PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")


def http_url(v: str, what: str) -> str:
    """`v` if it is an http(s) URL, else ValueError naming `what`."""
    if not v.startswith(("http://", "https://")):
        raise ValueError(f"{what} must start with http:// or https://, got {v!r}")
    return v


class ConfigError(Exception):
    """agent.yaml is missing, unreadable or invalid; the message points at the field."""


# Frozen: the running agent shares one config between threads. Unknown fields are errors: a
# misspelt key must not silently fall back to a default. Every subclass repeats kw_only (msgspec
# does not inherit it, and subclasses add required fields after the base's optional ones) and
# frozen (msgspec inherits it, but mypy's dataclass_transform would take the class as mutable).
class _Model(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Backoff(_Model, frozen=True, kw_only=True):
    initial: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    max: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0

    def __post_init__(self) -> None:
        if self.max < self.initial:
            raise ValueError(f"backoff max ({self.max:g} s) is below initial ({self.initial:g} s)")


class RestartPolicy(_Model, frozen=True, kw_only=True):
    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3
    window_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 300.0
    backoff_s: Backoff = msgspec.field(default_factory=Backoff)


# The resource kinds form a union told apart by `type`; msgspec owns that key as the tag, so
# each class carries its tag again as a class attribute for code that reads `resource.type`.
class _Resource(_Model, tag_field="type", frozen=True, kw_only=True):
    type: ClassVar[str]

    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    depends_on: list[str] = msgspec.field(default_factory=list)
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 2.0
    failure_threshold: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)

    @property
    def restartable(self) -> bool:
        """Whether the agent knows how to restart this resource in place."""
        return False


class ProcessResource(_Resource, tag="process", frozen=True, kw_only=True):
    """A process found by its name or by a pid file; restartable only with a fixed `start` argv."""

    type: ClassVar[str] = "process"

    process_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    pidfile: Path | None = None
    # The argv run to restart it: fixed here, never taken from the network.
    start: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None
    cwd: Path | None = None

    def __post_init__(self) -> None:
        if (self.process_name is None) == (self.pidfile is None):
            raise ValueError("give exactly one of process_name or pidfile")

    @property
    def restartable(self) -> bool:
        return self.start is not None


class TcpResource(_Resource, tag="tcp", frozen=True, kw_only=True):
    type: ClassVar[str] = "tcp"

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]


class HttpResource(_Resource, tag="http", frozen=True, kw_only=True):
    type: ClassVar[str] = "http"

    url: str
    expect_status: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200

    def __post_init__(self) -> None:
        try:
            http_url(self.url, "url")
        except ValueError as exc:
            raise FieldError(("url",), str(exc)) from None


class PostgresResource(_Resource, tag="postgres", frozen=True, kw_only=True):
    """A PostgreSQL instance; checked over SQL, restarted through the PostgreSQL driver."""

    type: ClassVar[str] = "postgres"

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 5432
    user: str = "postgres"
    dbname: str = "postgres"
    password: SecretRef | None = None
    datadir: Path
    bin_dir: Path = DEFAULT_PG_BIN_DIR
    # The OS user running the server (PostgreSQL refuses root); e.g. postgres.
    run_as: str | None = None

    @property
    def restartable(self) -> bool:
        return True


class VolumeResource(_Resource, tag="volume", frozen=True, kw_only=True):
    """A filesystem: present (and mounted where expected), writable, with enough free space."""

    type: ClassVar[str] = "volume"

    path: Path
    mount_point: Path | None = None
    probe: bool = True
    min_free_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    min_free_mb: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class IpResource(_Resource, tag="ip", frozen=True, kw_only=True):
    """An address present on an interface whose link is up."""

    type: ClassVar[str] = "ip"

    address: str
    interface: str | None = None

    def __post_init__(self) -> None:
        try:
            canonical = str(ipaddress.ip_address(self.address))
        except ValueError:
            raise FieldError(("address",), f"not an IP address: {self.address!r}") from None
        # The canonical spelling (::1, not 0::1) is what the monitor compares with the
        # interface's addresses; the struct is frozen, hence force_setattr.
        if canonical != self.address:
            msgspec.structs.force_setattr(self, "address", canonical)


Resource: TypeAlias = (
    ProcessResource | TcpResource | HttpResource | PostgresResource | VolumeResource | IpResource
)
_RESOURCE_TAGS = tuple(cls.type for cls in get_args(Resource))


class GatewayConfig(_Model, frozen=True, kw_only=True):
    url: str
    webhook_secret: SecretRef
    # The events URLs of other gateway replicas (at other sites), tried in turn when the
    # current one cannot be reached.
    also: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            http_url(self.url, "gateway url")
        except ValueError as exc:
            raise FieldError(("url",), str(exc)) from None
        for i, u in enumerate(self.also):
            try:
                http_url(u, "gateway.also url")
            except ValueError as exc:
                raise FieldError(("also", i), str(exc)) from None


class ControlConfig(_Model, ListenAddress, frozen=True, kw_only=True):
    # host:port the control API binds to, e.g. 127.0.0.1:9101.
    listen: str
    # This agent's own control secret: HMAC-SHA256 of its agent_id under the master
    # gateway.control_secret.
    secret: SecretRef
    # The postgres resource it controls (needed when there are several).
    resource: str | None = None
    # host:port of the group's other PostgreSQL nodes: the only targets of rewind_to /
    # attach_to and the only hosts that see the database password.
    peers: Annotated[list[str], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FieldError(("listen",), f"listen must be host:port, got {self.listen!r}")
        if not self.peers:
            return
        # Imported here: the driver's argument module is only needed when peers are set.
        from agents.drivers.pg_args import parse_peer

        for i, peer in enumerate(self.peers):
            try:
                parse_peer(peer)
            except ValueError as exc:
                raise FieldError(("peers", i), str(exc)) from None

    def peer_addresses(self) -> list[tuple[str, int]]:
        from agents.drivers.pg_args import parse_peer

        return [parse_peer(p) for p in self.peers]


class LeaseConfig(_Model, frozen=True, kw_only=True):
    """The group's leader lease in etcd, held while this node's PostgreSQL is the primary."""

    # Client URLs of etcd members, e.g. http://10.0.0.5:2379.
    etcd: Annotated[list[str], msgspec.Meta(min_length=1, max_length=9)]
    # The lease's TTL; the group's policy.lease_s.
    lease_s: Annotated[int, msgspec.Meta(ge=2, le=60)] = 3
    # Fence this long before the lease could expire in etcd.
    margin_s: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.5
    # The group's replication: only a sync primary may keep serving without etcd while its
    # synchronous standby streams (failsafe).
    replication: Literal["sync", "async"] = "sync"
    # A standby's walreceiver application_name -> its agent id, for the sync key; by default
    # the application_name is the agent id (the lab's cluster_name is the VM's name).
    standby_agents: Annotated[dict[str, str], msgspec.Meta(max_length=16)] = msgspec.field(
        default_factory=dict)

    def __post_init__(self) -> None:
        for i, u in enumerate(self.etcd):
            try:
                http_url(u, "lease.etcd")
            except ValueError as exc:
                raise FieldError(("etcd", i), str(exc)) from None
        if self.margin_s >= self.lease_s / 2:
            raise ValueError(f"lease margin_s ({self.margin_s:g} s) must be under half of "
                             f"lease_s ({self.lease_s} s)")


class AgentConfig(_Model, frozen=True, kw_only=True):
    agent_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    group: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    gateway: GatewayConfig
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    outbox: Path = Path("agent-outbox.sqlite")
    control: ControlConfig | None = None
    # None: no leader lease (the group does not use etcd).
    lease: LeaseConfig | None = None
    resources: Annotated[list[Resource], msgspec.Meta(min_length=1)]

    def __post_init__(self) -> None:
        names = [r.name for r in self.resources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate resource name(s): {', '.join(dupes)}")
        self.graph()
        if self.control is not None:
            self.control_resource()

    def control_resource(self) -> PostgresResource:
        """The resource the control API drives (ValueError when the choice is unclear)."""
        assert self.control is not None
        pgs = [r for r in self.resources if isinstance(r, PostgresResource)]
        if self.control.resource is not None:
            for r in pgs:
                if r.name == self.control.resource:
                    return r
            raise ValueError(f"control.resource {self.control.resource!r} is not a postgres "
                             f"resource (postgres resources: {', '.join(r.name for r in pgs) or 'none'})")
        if not pgs:
            raise ValueError("control: the control API drives a postgres resource and none is "
                             "configured (add one, or remove the control section)")
        if len(pgs) > 1:
            raise ValueError(f"control: {len(pgs)} postgres resources ("
                             f"{', '.join(r.name for r in pgs)}); name the one to drive with "
                             "control.resource")
        return pgs[0]

    def graph(self) -> Graph:
        """The dependency graph; GraphError names an unknown dependency or a cycle."""
        return Graph({r.name: r.depends_on for r in self.resources})

    def resource(self, name: str) -> Resource:
        for r in self.resources:
            if r.name == name:
                return r
        raise KeyError(name)


def _dec_hook(type_: type, obj: Any) -> Any:
    """Build the field types msgspec does not know: paths and secret references."""
    if type_ is Path:
        if isinstance(obj, str | PathLike):
            return Path(obj)
        raise ValueError(f"Expected a path (`str`), got `{type(obj).__name__}`")
    if type_ is SecretRef:
        # Its ValueErrors never echo the value (an inline value is likely the secret itself).
        return SecretRef.parse(obj)
    raise NotImplementedError(f"no decoder for {type_!r}")


def _validate(data: dict[str, Any]) -> AgentConfig:
    # strict=False: YAML's `1` is a valid float, and a quoted "5432" a valid port.
    return msgspec.convert(data, AgentConfig, strict=False, dec_hook=_dec_hook)


def config_from_dict(data: dict[str, Any], source: str = "config") -> AgentConfig:
    """An AgentConfig from an agent.yaml document already parsed (paths are kept as given);
    ConfigError names the problem like `parse_config` does, without line numbers."""
    try:
        return _validate(data)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, data, None, source)) from None


def load_config(path: Path) -> AgentConfig:
    """Read and validate agent.yaml; relative paths in it are relative to the file's directory."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc.strerror or exc}") from exc
    return parse_config(text, base_dir=path.resolve().parent, source=str(path))


def parse_config(text: str, base_dir: Path, source: str = "agent.yaml") -> AgentConfig:
    """Validate agent.yaml's text; ConfigError points at the problem (file, field and line)."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with agent_id, group, gateway, resources")
    try:
        cfg = _validate(data)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, data, node, source)) from None
    return _resolve_paths(cfg, base_dir)


def _resolve_paths(cfg: AgentConfig, base_dir: Path) -> AgentConfig:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else base_dir / p

    resources: list[Resource] = []
    for r in cfg.resources:
        updates: dict[str, Path] = {}
        for field in ("pidfile", "cwd", "datadir", "path", "mount_point", "bin_dir"):
            value = getattr(r, field, None)
            if isinstance(value, Path):
                updates[field] = absolute(value)
        resources.append(msgspec.structs.replace(r, **updates))
    return msgspec.structs.replace(cfg, outbox=absolute(cfg.outbox), resources=resources)


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.*)`\Z", re.S)
_MISSING_FIELD = re.compile(r"Object missing required field `(.*)`\Z", re.S)
_BOUND = re.compile(r"Expected `\w+` (<=|>=|<|>) (\S+)\Z")
_LENGTH = re.compile(r"Expected `(\w+)` of length (<=|>=) (\d+)\Z")
_PATTERN = re.compile(r"Expected `str` matching regex (.*)\Z", re.S)
_BOUND_WORDS = {"<=": "less than or equal to", ">=": "greater than or equal to",
                "<": "less than", ">": "greater than"}
_LENGTH_WORDS = {"str": ("String", "character"), "array": ("List", "item"),
                 "object": ("Dictionary", "item")}


def _number(text: str) -> str:
    """msgspec writes float bounds as 3600.0; the config's readers wrote 3600."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def _reword(msg: str, loc: list[str | int]) -> tuple[str, list[str | int]]:
    """A user's wording (the one agent.yaml's messages have always had) for msgspec's message,
    and the loc of the field it is about."""
    if _UNKNOWN_FIELD.match(msg):
        return "unknown field (check the spelling; allowed fields are in the docs)", loc
    if _MISSING_FIELD.match(msg):
        return "Field required", loc
    if loc and loc[-1] == "type" and msg.startswith("Invalid value "):
        # A resource `type` that names no kind: say which ones there are. The value is a type
        # name the user wrote, never a secret.
        tags = ", ".join(repr(t) for t in _RESOURCE_TAGS)
        found = msg.removeprefix("Invalid value ")
        return (f"Input tag {found} found using 'type' does not match any of the expected tags: "
                f"{tags}", loc[:-1])
    if m := _BOUND.match(msg):
        return f"Input should be {_BOUND_WORDS[m[1]]} {_number(m[2])}", loc
    if (m := _LENGTH.match(msg)) and m[1] in _LENGTH_WORDS:
        what, unit = _LENGTH_WORDS[m[1]]
        n = int(m[3])
        most = "at most" if m[2] == "<=" else "at least"
        return f"{what} should have {most} {n} {unit}{'' if n == 1 else 's'}", loc
    if m := _PATTERN.match(msg):
        return f"String should match pattern {m[1]}", loc
    return msg, loc


def _explain(exc: msgspec.ValidationError, data: dict[str, Any], node: yaml.Node | None,
             source: str) -> str:
    # msgspec stops at the first problem, so there is exactly one to report.
    loc, msg = split_error(exc, echo_values=True)  # the operator's own file: say what it says
    msg, loc = _reword(msg, loc)
    where = _loc_text(loc, data)
    line = _line_of(node, loc)
    at = f" (line {line})" if line else ""
    return f"{source} is invalid (1 problem(s)):\n  {where or '<top>'}{at}: {msg}"


def _loc_text(loc: list[Any], data: dict[str, Any]) -> str:
    out = ""
    cur: Any = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            item = cur[part] if isinstance(cur, list) and part < len(cur) else None
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                out += f"({item['name']})"
            cur = item
        else:
            out += f".{part}" if out else str(part)
            cur = cur.get(part) if isinstance(cur, dict) else None
    return out


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the deepest YAML node on `loc` (where the user should look)."""
    best = None
    for part in loc:
        if node is None:
            break
        best = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            node = None
    if node is not None:
        best = node.start_mark.line + 1
    return best


def dump_config(data: dict[str, Any]) -> str:
    """YAML text for a config dict (validated first, so what is written is what runs).

    ValueError when it does not validate, with the same text as agent.yaml's errors.
    """
    try:
        _validate(data)
    except msgspec.ValidationError as exc:
        # Not a ValueError itself (pydantic's was): callers catch ValueError.
        raise ValueError(_explain(exc, data, None, "the config")) from None
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


__all__ = [
    "AgentConfig", "Backoff", "ConfigError", "ControlConfig", "GatewayConfig", "GraphError",
    "HttpResource", "IpResource", "PostgresResource", "ProcessResource", "Resource",
    "RestartPolicy", "TcpResource", "VolumeResource", "load_config", "parse_config",
]
