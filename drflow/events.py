"""Health events sent by guest agents to the gateway."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EventKind(StrEnum):
    HEARTBEAT = "heartbeat"
    RESOURCE_FAILED = "resource_failed"
    RESOURCE_RECOVERED = "resource_recovered"
    RECOVERY_EXHAUSTED = "recovery_exhausted"
    ROLE_CHANGED = "role_changed"


class HealthEvent(BaseModel):
    """One signed webhook body. `details` carries kind-specific facts (attempt, error, role, lag)."""

    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    agent_id: str = Field(min_length=1, max_length=200)
    group: str = Field(min_length=1, max_length=200)
    kind: EventKind
    resource: str | None = Field(default=None, max_length=200)
    observed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    details: dict[str, Any] = Field(default_factory=dict)
