"""The gateway's own settings, independent of the config file's layout."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from drflow.signing import DEFAULT_WINDOW_S


class GroupNode(BaseModel):
    """One side of a protection group as the gateway tells it to agents and flows."""

    model_config = ConfigDict(extra="forbid")

    site: str
    vm: str
    host: str
    port: int
    agent_url: str | None = None


class GroupPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auto_failover: bool = True


class GroupRoster(BaseModel):
    """A group's sides and failback approvers (roles record, Slack approvals)."""

    model_config = ConfigDict(extra="forbid")

    # Who may approve a failback in Slack (user ids), and how many distinct approvals it takes.
    approvers: list[str] = Field(default_factory=list)
    approvals_required: int = Field(default=1, ge=1, le=2)
    # The configured home (primary) and DR (standby) sides; the roles record says which serves.
    primary: GroupNode | None = None
    standby: GroupNode | None = None


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhook_secret: SecretStr
    # Verifies Slack interactions (POST /slack/actions); None: the endpoint refuses everything.
    slack_signing_secret: SecretStr | None = None
    state_path: Path = Field(description="SQLite file: seen events, agents' roles, incidents.")
    groups: dict[str, GroupPolicy]
    rosters: dict[str, GroupRoster] = Field(default_factory=dict)
    heartbeat_timeout_s: float = Field(default=3.0, gt=0)
    signature_window_s: int = Field(default=DEFAULT_WINDOW_S, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    dedupe_retention_s: float = Field(
        default=3600.0, description="How long event ids are remembered (≥ the signature window)."
    )
    start_timeout_s: float = Field(default=30.0, gt=0, description="Per start_incident attempt.")
    start_retry_max_s: float = Field(default=30.0, gt=0, description="Cap of the retry backoff.")
    runs_in_process: bool = Field(
        default=False, description="Incident runs live in this process (embedded mode): after a "
        "restart, open incidents are run again rather than left to a worker.")
    incident_hold_down_s: float = Field(
        default=300.0, ge=0, description="After an incident closes, further failure reports of "
        "the same agent join it for this long instead of opening the next one (and repeated "
        "alerts of one agent are sent once per this period).")
    max_json_depth: int = Field(default=32, gt=0, description="Nesting limit of JSON bodies.")
    max_json_elements: int = Field(default=10_000, gt=0, description="Element limit of JSON bodies.")
    header_timeout_s: float = Field(
        default=5.0, gt=0, description="A client must send its request line and headers within "
        "this long (408 and the connection closed otherwise).")
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="A client must send its whole body within this long of "
        "the request's start (408 and the connection closed otherwise).")
    keep_alive_s: float = Field(default=5.0, gt=0, description="Idle keep-alive connections.")
    etcd_endpoints: list[str] = Field(
        default_factory=list, description="etcd client URLs holding the groups' leader and sync "
        "keys (leases.py); empty: no leader-key watch, failover on heartbeats only.")
    etcd_timeout_s: float = Field(default=1.0, gt=0, description="Per etcd request and endpoint.")
    state_in_etcd: bool = Field(
        default=False, description="Incidents, the replay cache, roles records and approvals in "
        "etcd (etcd_state.py), shared by every replica; False: in state_path, this replica's own.")
    lease_poll_s: float = Field(default=0.1, gt=0, le=5, description="How often every group's "
                                "leader and sync keys are read (one range read).")

    @model_validator(mode="after")
    def _retention_covers_window(self) -> GatewaySettings:
        # A signature is only replayable inside its window: forgetting earlier would let it in.
        if self.dedupe_retention_s < self.signature_window_s:
            raise ValueError(
                f"dedupe_retention_s ({self.dedupe_retention_s}) must be at least "
                f"signature_window_s ({self.signature_window_s})"
            )
        return self

    @model_validator(mode="after")
    def _shared_state_needs_etcd(self) -> GatewaySettings:
        if self.state_in_etcd and not self.etcd_endpoints:
            raise ValueError("state_in_etcd needs etcd_endpoints")
        return self

    def roster(self, group: str) -> GroupRoster:
        return self.rosters.get(group) or GroupRoster()

    def known_agents(self, group: str) -> frozenset[str]:
        """The agents that may speak for `group`: the VM names of its configured nodes."""
        roster = self.roster(group)
        return frozenset(n.vm for n in (roster.primary, roster.standby) if n is not None)

    def secret_bytes(self) -> bytes:
        return self.webhook_secret.get_secret_value().encode()
