"""msgspec's validation errors as (field path, message), the input left out unless asked for."""

from __future__ import annotations

import re

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
# `.field`, `[index]`, and `[...]` (a dict's key or value, which names no field).
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")
# msgspec quotes a bad enum or literal value in its message: never echo what a client sent.
_QUOTED = re.compile(r"(?<=value) (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]{0,64})`")


class FieldError(ValueError):
    """Raised by a `__post_init__` check about one of the struct's fields (`loc`, below it).

    msgspec locates an error raised in `__post_init__` at the struct and keeps it as the
    ValidationError's cause; split_error adds `loc`, so the message points at the field."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def split_error(exc: BaseException, *, echo_values: bool = False
                ) -> tuple[list[str | int], str]:
    """`Expected int - at $.a[0].b` → (["a", 0, "b"], "Expected int"). An unknown or missing
    field is located at that field (msgspec puts it at its parent), a FieldError at its field.
    A bad enum value is left out of the message unless `echo_values` (an operator's own file)."""
    text = str(exc)
    match = _AT.search(text)
    loc: list[str | int] = []
    if match:
        for part in _PATH_PART.finditer(match["path"]):
            if part[1] is not None:
                loc.append(part[1])
            elif part[2] is not None:
                loc.append(int(part[2]))
        text = text[:match.start()]
    named = _NAMED.search(text)
    if named:
        loc.append(named[1])
    if isinstance(exc.__cause__, FieldError):
        loc.extend(exc.__cause__.loc)
    return loc, text if echo_values else _QUOTED.sub("", text)


def dotted(loc: list[str | int]) -> str:
    """["a", 0, "b"] → "a.0.b"."""
    return ".".join(str(p) for p in loc)
