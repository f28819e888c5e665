"""The gateway's own settings, independent of the config file's layout."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from drflow.signing import DEFAULT_WINDOW_S


class GroupPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auto_failover: bool = True


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhook_secret: SecretStr
    state_path: Path = Field(description="SQLite file: seen events, agents' roles, incidents.")
    groups: dict[str, GroupPolicy]
    heartbeat_timeout_s: float = Field(default=3.0, gt=0)
    signature_window_s: int = Field(default=DEFAULT_WINDOW_S, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    dedupe_retention_s: float = Field(
        default=3600.0, description="How long event ids are remembered (≥ the signature window)."
    )
    start_timeout_s: float = Field(default=30.0, gt=0, description="Per start_incident attempt.")
    start_retry_max_s: float = Field(default=30.0, gt=0, description="Cap of the retry backoff.")

    @model_validator(mode="after")
    def _retention_covers_window(self) -> GatewaySettings:
        # A signature is only replayable inside its window: forgetting earlier would let it in.
        if self.dedupe_retention_s < self.signature_window_s:
            raise ValueError(
                f"dedupe_retention_s ({self.dedupe_retention_s}) must be at least "
                f"signature_window_s ({self.signature_window_s})"
            )
        return self

    def secret_bytes(self) -> bytes:
        return self.webhook_secret.get_secret_value().encode()
