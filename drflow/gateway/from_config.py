"""Build GatewaySettings from drflow's configuration file (`drflow.config.DrflowConfig`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drflow.config import DrflowConfig
from drflow.gateway.settings import GatewaySettings, GroupPolicy


def settings_from_config(cfg: DrflowConfig, state_path: Path, **overrides: Any) -> GatewaySettings:
    """Resolve the webhook secret and take each group's auto_failover policy.

    `state_path` is the gateway's SQLite file (the config has no state directory); `overrides`
    set any other GatewaySettings field (max_body_bytes, …)."""
    return GatewaySettings(
        webhook_secret=cfg.secret(cfg.gateway.webhook_secret),
        heartbeat_timeout_s=cfg.gateway.heartbeat_timeout_s,
        groups={g.name: GroupPolicy(auto_failover=g.policy.auto_failover) for g in cfg.groups},
        state_path=state_path,
        **overrides,
    )


def listen_address(cfg: DrflowConfig) -> tuple[str, int]:
    """(host, port) from `gateway.listen`."""
    return cfg.gateway.host, cfg.gateway.port
