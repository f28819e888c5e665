"""Application drivers: the fixed set of verbs the control API may run for one application."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from drflow.struct_errors import dotted, split_error

T = TypeVar("T")


class VerbError(Exception):
    """A verb was refused or failed in the application's current state; the message says why."""


class ArgsError(ValueError):
    """Arguments that do not fit a verb; the message names the field, never echoes the value."""


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    """A verb without arguments (any argument is refused)."""


def args_of(model: type[T], raw: Any) -> T:
    """`raw` (decoded JSON) as the verb's argument type, strictly: wrong types, unknown fields and
    out-of-range values are an ArgsError before anything runs."""
    try:
        return msgspec.convert(raw, model, strict=True)
    except msgspec.ValidationError as exc:
        loc, message = split_error(exc)
        raise ArgsError(f"{dotted(loc)}: {message}" if loc else message) from None


@dataclass(frozen=True)
class Verb:
    """One control verb: its argument type (validated before anything runs) and its action."""

    args: type[Any]
    run: Callable[[Any], dict[str, Any]]
    summary: str


class Driver(Protocol):
    """What the control API needs from a driver."""

    application: str

    def verbs(self) -> Mapping[str, Verb]: ...


__all__ = ["ArgsError", "Driver", "NoArgs", "Verb", "VerbError", "args_of"]
