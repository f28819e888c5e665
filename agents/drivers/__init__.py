"""Application drivers: the fixed set of verbs the control API may run for one application."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


class VerbError(Exception):
    """A verb was refused or failed in the application's current state; the message says why."""


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Verb:
    """One control verb: its argument model (validated before anything runs) and its action."""

    args: type[BaseModel]
    run: Callable[[Any], dict[str, Any]]
    summary: str


class Driver(Protocol):
    """What the control API needs from a driver."""

    application: str

    def verbs(self) -> Mapping[str, Verb]: ...


__all__ = ["Driver", "NoArgs", "Verb", "VerbError"]
