"""Build GatewaySettings from drflow's configuration file (`drflow.config.DrflowConfig`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from drflow.config import DrflowConfig, NodeConfig
from drflow.secrets import SecretError
from orchestrator.gateway.settings import GatewaySettings, GroupNode, GroupPolicy, GroupRoster

log = logging.getLogger("drflow.gateway")


def settings_from_config(cfg: DrflowConfig, state_path: Path, **overrides: Any) -> GatewaySettings:
    """Resolve the webhook secret, take each group's auto_failover policy and etcd's endpoints.

    `state_path` is the gateway's SQLite file (the config has no state directory); `overrides`
    set any other GatewaySettings field (max_body_bytes, …)."""
    groups, rosters = group_settings(cfg)
    fields: dict[str, Any] = {
        "webhook_secret": cfg.secret(cfg.gateway.webhook_secret),
        "heartbeat_timeout_s": cfg.gateway.heartbeat_timeout_s,
        "groups": groups,
        "rosters": rosters,
        "slack_signing_secret": _slack_secret(cfg),
        "state_path": state_path,
    }
    if cfg.etcd is not None:
        fields["etcd_endpoints"] = [str(u) for u in cfg.etcd.endpoints]
        fields["etcd_timeout_s"] = cfg.etcd.timeout_s
        fields["state_in_etcd"] = cfg.gateway.shared_state
    return GatewaySettings(**{**fields, **overrides})


def group_settings(cfg: DrflowConfig) -> tuple[dict[str, GroupPolicy], dict[str, GroupRoster]]:
    """Each group's policy and roster as the gateway keeps them (no secret is resolved)."""
    groups = {g.name: GroupPolicy(auto_failover=g.policy.auto_failover) for g in cfg.groups}
    rosters = {g.name: GroupRoster(
        approvers=list(g.policy.approvers), approvals_required=g.policy.approvals_required,
        primary=_node(g.primary), standby=_node(g.standby)) for g in cfg.groups}
    return groups, rosters


def _slack_secret(cfg: DrflowConfig) -> SecretStr | None:
    # Failover must not depend on Slack: without the secret only approvals are refused.
    try:
        return cfg.secret(cfg.slack.signing_secret)
    except SecretError as exc:
        log.warning("Slack approvals disabled, the signing secret is unavailable: %s", exc)
        return None


def _node(n: NodeConfig) -> GroupNode:
    return GroupNode(site=n.site, vm=n.vm, host=n.host, port=n.port, agent_url=n.agent_url)


def listen_address(cfg: DrflowConfig) -> tuple[str, int]:
    """(host, port) from `gateway.listen`."""
    return cfg.gateway.host, cfg.gateway.port
