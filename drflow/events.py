"""Health events sent by guest agents to the gateway.

A msgspec Struct, not a pydantic model: the guest agent builds and sends these and must not load
pydantic (about 20 MB in every protected VM); the gateway validates them with the same type.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import msgspec

from drflow.struct_errors import dotted, split_error


class EventKind(StrEnum):
    HEARTBEAT = "heartbeat"
    RESOURCE_FAILED = "resource_failed"
    RESOURCE_RECOVERED = "resource_recovered"
    RECOVERY_EXHAUSTED = "recovery_exhausted"
    ROLE_CHANGED = "role_changed"


class EventError(ValueError):
    """A body that is not a valid HealthEvent. `field` is the dotted path of the first bad field
    ("" for the body itself); the message never echoes the input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def _now() -> datetime:
    return datetime.now(UTC)


class HealthEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One signed webhook body. `details` carries kind-specific facts (attempt, error, role, lag).

    Constraints hold when a body is decoded (`from_json`), where untrusted input arrives."""

    event_id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)
    agent_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    group: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    kind: EventKind
    resource: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    observed_at: datetime = msgspec.field(default_factory=_now)
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    def to_json(self) -> bytes:
        """The wire form (what is signed and sent)."""
        return _ENCODER.encode(self)

    @classmethod
    def from_json(cls, body: bytes | str) -> HealthEvent:
        """Decode and validate a wire body; EventError says which field is wrong."""
        try:
            return _DECODER.decode(body)
        except msgspec.ValidationError as exc:
            loc, message = split_error(exc)
            raise EventError(dotted(loc), message) from None
        except msgspec.DecodeError:
            raise EventError("", "not valid JSON") from None


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(HealthEvent)
