"""Secret references (`env:`, `file:`, `aws-sm:`) as pydantic models, resolved to pydantic's
`SecretStr`: the orchestrator's side of `drflow.secret_refs` (same checks, same values, same
cache).

The configuration only ever holds references; values are fetched on demand, cached for the life
of the process, and never put into messages, exceptions or logs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator, model_validator

from drflow.secret_refs import (
    REF_EXAMPLES,
    SCHEMES,
    AwsConfig,
    SecretError,
    aws_client_kwargs,
    check_ref,
    clear_cache,
    fetch,
    refuse_inline,
)

__all__ = [
    "REF_EXAMPLES", "SCHEMES", "AwsConfig", "SecretError", "SecretRef", "aws_client_kwargs",
    "clear_cache", "resolve",
]


class SecretRef(BaseModel):
    """Where a secret lives: `{ref: "scheme:location"}`. Inline values are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    ref: str

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline(cls, data: Any) -> Any:
        if not isinstance(data, SecretRef):
            refuse_inline(data)
        return data

    @field_validator("ref")
    @classmethod
    def _known_scheme(cls, ref: str) -> str:
        return check_ref(ref)

    @property
    def scheme(self) -> str:
        return self.ref.partition(":")[0]

    def __str__(self) -> str:
        return self.ref


def resolve(ref: SecretRef, aws: AwsConfig | None = None) -> SecretStr:
    """The value `ref` points to; `aws` (region, endpoint, credentials) is used for `aws-sm:`."""
    return SecretStr(fetch(ref.ref, aws))
