"""What the gateway hands to the rest of drflow: incidents, alerts, and the sinks that take them."""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field


class IncidentKind(StrEnum):
    HEARTBEAT_LOST = "heartbeat_lost"
    RECOVERY_EXHAUSTED = "recovery_exhausted"
    LEASE_EXPIRED = "lease_expired"  # the primary's leader key vanished from etcd (leases.py)


class Incident(BaseModel):
    """One failure of a group's primary that warrants a failover run."""

    model_config = ConfigDict(frozen=True)

    group: str
    kind: IncidentKind
    reason: str = Field(description="Why this is an incident, for humans.")
    evidence: dict[str, Any] = Field(default_factory=dict)
    first_failure_at: datetime = Field(description="Earliest failure evidence: RTO starts here.")
    idempotency_key: str = Field(description="failover:{group}:{epoch}; one run per key.")


class Alert(BaseModel):
    """Something on-call should know that does not (or may not) start a failover."""

    model_config = ConfigDict(frozen=True)

    group: str
    kind: str
    agent_id: str
    reason: str
    evidence: dict[str, Any] = Field(default_factory=dict)


class IncidentStarter(Protocol):
    """Starts the failover run for an incident.

    Must be idempotent on `incident.idempotency_key`: the gateway retries with the same key after
    an error or a timeout, and the same key must give back the same run.
    """

    async def start_incident(self, incident: Incident) -> str:
        """Start (or find) the run for this incident; return its run id."""
        ...


class Alerter(Protocol):
    """Tells on-call about an alert (Slack, …). Failures are logged, never retried."""

    async def alert(self, alert: Alert) -> None: ...


class AuditSink(Protocol):
    """The audit trail (`drflow.audit`). Called from the gateway's event-loop thread."""

    def append(
        self,
        actor: str,
        action: str,
        target: str,
        parameters: dict[str, Any],
        outcome: str,
        reason: str,
    ) -> object: ...


def append_or_log(audit: AuditSink | None, action: str, target: str, parameters: dict[str, Any],
                  outcome: str, reason: str) -> None:
    """Audit one of the gateway's acts; a failing audit trail must not stop a failover: it is
    logged loudly instead."""
    if audit is None:
        return
    try:
        audit.append("gateway", action, target, parameters, outcome, reason)
    except Exception:
        logging.getLogger("drflow.gateway").exception("audit append failed for %s on %s",
                                                      action, target)
