"""The agent's configuration file (agent.yaml): what to watch, how to repair it, where to report."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agents.graph import Graph, GraphError
from drflow.listen import ListenAddress
from drflow.secrets import SecretRef

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
DEFAULT_PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")



def http_url(v: str, what: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError(f"{what} must start with http:// or https://, got {v!r}")
    return v

class ConfigError(Exception):
    """agent.yaml is missing, unreadable or invalid; the message points at the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backoff(_Model):
    initial: float = Field(1.0, gt=0, le=3600)
    max: float = Field(30.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> Backoff:
        if self.max < self.initial:
            raise ValueError(f"backoff max ({self.max:g} s) is below initial ({self.initial:g} s)")
        return self


class RestartPolicy(_Model):
    max_restarts: int = Field(3, ge=0, le=1000)
    window_s: float = Field(300.0, gt=0, le=7 * 86400)
    backoff_s: Backoff = Backoff()


class _Resource(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    depends_on: list[str] = Field(default_factory=list)
    interval_s: float = Field(1.0, gt=0, le=3600)
    timeout_s: float = Field(2.0, gt=0, le=600)
    failure_threshold: int = Field(2, ge=1, le=1000)
    restart: RestartPolicy = RestartPolicy()

    @property
    def restartable(self) -> bool:
        """Whether the agent knows how to restart this resource in place."""
        return False


class ProcessResource(_Resource):
    """A process found by its name or by a pid file; restartable only with a fixed `start` argv."""

    type: Literal["process"]
    process_name: str | None = Field(None, min_length=1, max_length=200)
    pidfile: Path | None = None
    start: list[str] | None = Field(
        None, min_length=1, description="argv run to restart it; fixed here, never from the network"
    )
    cwd: Path | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> ProcessResource:
        if (self.process_name is None) == (self.pidfile is None):
            raise ValueError("give exactly one of process_name or pidfile")
        return self

    @property
    def restartable(self) -> bool:
        return self.start is not None


class TcpResource(_Resource):
    type: Literal["tcp"]
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)


class HttpResource(_Resource):
    type: Literal["http"]
    url: str
    expect_status: int = Field(200, ge=100, le=599)

    _http_url = field_validator("url")(lambda v: http_url(v, "url"))


class PostgresResource(_Resource):
    """A PostgreSQL instance; checked over SQL, restarted through the PostgreSQL driver."""

    type: Literal["postgres"]
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    user: str = "postgres"
    dbname: str = "postgres"
    password: SecretRef | None = None
    datadir: Path
    bin_dir: Path = DEFAULT_PG_BIN_DIR
    run_as: str | None = Field(
        None, description="OS user running the server (PostgreSQL refuses root); e.g. postgres"
    )

    @property
    def restartable(self) -> bool:
        return True


class VolumeResource(_Resource):
    """A filesystem: present (and mounted where expected), writable, with enough free space."""

    type: Literal["volume"]
    path: Path
    mount_point: Path | None = None
    probe: bool = True
    min_free_pct: float = Field(0.0, ge=0, le=100)
    min_free_mb: float = Field(0.0, ge=0)


class IpResource(_Resource):
    """An address present on an interface whose link is up."""

    type: Literal["ip"]
    address: str
    interface: str | None = None

    @field_validator("address")
    @classmethod
    def _valid_ip(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError as exc:
            raise ValueError(f"not an IP address: {v!r}") from exc


Resource = Annotated[
    ProcessResource | TcpResource | HttpResource | PostgresResource | VolumeResource | IpResource,
    Field(discriminator="type"),
]


class GatewayConfig(_Model):
    url: str
    webhook_secret: SecretRef
    also: list[str] = Field(
        default_factory=list,
        description="the events URLs of other gateway replicas (at other sites), tried in turn "
                    "when the current one cannot be reached")

    _http_url = field_validator("url")(lambda v: http_url(v, "gateway url"))
    _also_urls = field_validator("also")(
        lambda v: [http_url(u, "gateway.also url") for u in v])


class ControlConfig(_Model, ListenAddress):
    listen: str = Field(description="host:port the control API binds to, e.g. 127.0.0.1:9101")
    secret: SecretRef = Field(description="this agent's own control secret: HMAC-SHA256 of its "
                                          "agent_id under the master gateway.control_secret")
    resource: str | None = Field(
        None, description="the postgres resource it controls (needed when there are several)")
    peers: list[str] = Field(
        default_factory=list, max_length=16,
        description="host:port of the group's other PostgreSQL nodes: the only targets of "
                    "rewind_to / attach_to and the only hosts that see the database password")

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: list[str]) -> list[str]:
        from agents.drivers.pg_args import parse_peer

        for peer in v:
            parse_peer(peer)
        return v

    def peer_addresses(self) -> list[tuple[str, int]]:
        from agents.drivers.pg_args import parse_peer

        return [parse_peer(p) for p in self.peers]

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen must be host:port, got {v!r}")
        return v


class LeaseConfig(_Model):
    """The group's leader lease in etcd, held while this node's PostgreSQL is the primary."""

    etcd: list[str] = Field(min_length=1, max_length=9,
                            description="client URLs of etcd members, e.g. http://10.0.0.5:2379")
    lease_s: int = Field(3, ge=2, le=60, description="the lease's TTL; the group's policy.lease_s")
    margin_s: float = Field(0.5, gt=0, le=10, description="fence this long before the lease "
                                                          "could expire in etcd")
    replication: Literal["sync", "async"] = Field(
        "sync", description="the group's replication: only a sync primary may keep serving "
                            "without etcd while its synchronous standby streams (failsafe)")
    standby_agents: dict[str, str] = Field(
        default_factory=dict, max_length=16,
        description="a standby's walreceiver application_name -> its agent id, for the sync "
                    "key; by default the application_name is the agent id (the lab's "
                    "cluster_name is the VM's name)")

    @field_validator("etcd")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return [http_url(u, "lease.etcd") for u in v]

    @model_validator(mode="after")
    def _margin(self) -> LeaseConfig:
        if self.margin_s >= self.lease_s / 2:
            raise ValueError(f"lease margin_s ({self.margin_s:g} s) must be under half of "
                             f"lease_s ({self.lease_s} s)")
        return self


class AgentConfig(_Model):
    agent_id: str = Field(min_length=1, max_length=200)
    group: str = Field(min_length=1, max_length=200)
    gateway: GatewayConfig
    heartbeat_interval_s: float = Field(1.0, gt=0, le=3600)
    outbox: Path = Path("agent-outbox.sqlite")
    control: ControlConfig | None = None
    # None: no leader lease (the group does not use etcd).
    lease: LeaseConfig | None = None
    resources: list[Resource] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_graph(self) -> AgentConfig:
        names = [r.name for r in self.resources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate resource name(s): {', '.join(dupes)}")
        self.graph()
        if self.control is not None:
            self.control_resource()
        return self

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


def load_config(path: Path) -> AgentConfig:
    """Read and validate agent.yaml; relative paths in it are relative to the file's directory."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc.strerror or exc}") from exc
    return parse_config(text, base_dir=path.resolve().parent, source=str(path))


def parse_config(text: str, base_dir: Path, source: str = "agent.yaml") -> AgentConfig:
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with agent_id, group, gateway, resources")
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, data, node, source)) from None
    return _resolve_paths(cfg, base_dir)


def _resolve_paths(cfg: AgentConfig, base_dir: Path) -> AgentConfig:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else base_dir / p

    resources: list[Any] = []
    for r in cfg.resources:
        updates: dict[str, Path] = {}
        for field in ("pidfile", "cwd", "datadir", "path", "mount_point", "bin_dir"):
            value = getattr(r, field, None)
            if isinstance(value, Path):
                updates[field] = absolute(value)
        resources.append(r.model_copy(update=updates))
    return cfg.model_copy(update={"outbox": absolute(cfg.outbox), "resources": resources})


def _explain(exc: ValidationError, data: dict[str, Any], node: yaml.Node | None, source: str) -> str:
    lines = [f"{source} is invalid ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = [p for p in err["loc"] if not _is_union_tag(p)]
        where = _loc_text(loc, data)
        line = _line_of(node, loc)
        at = f" (line {line})" if line else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; allowed fields are in the docs)"
        lines.append(f"  {where or '<top>'}{at}: {msg}")
    return "\n".join(lines)


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and part in {
        "process", "tcp", "http", "postgres", "volume", "ip"}


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
    """YAML text for a config dict (validated first, so what is written is what runs)."""
    AgentConfig.model_validate(data)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


__all__ = [
    "AgentConfig", "Backoff", "ConfigError", "ControlConfig", "GatewayConfig", "GraphError",
    "HttpResource", "IpResource", "PostgresResource", "ProcessResource", "Resource",
    "RestartPolicy", "TcpResource", "VolumeResource", "load_config", "parse_config",
]
