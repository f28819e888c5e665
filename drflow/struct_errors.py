"""msgspec's validation errors as (field path, message) without the input that caused them."""

from __future__ import annotations

import re

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
# msgspec quotes a bad enum or literal value in its message: never echo what a client sent.
_QUOTED = re.compile(r"(?<=value) (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]{0,64})`")


def split_error(text: str) -> tuple[list[str | int], str]:
    """`Expected int - at $.a[0].b` → (["a", 0, "b"], "Expected int"). An unknown or missing
    field is located at that field (msgspec puts it at its parent)."""
    match = _AT.search(text)
    loc: list[str | int] = []
    if match:
        for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", match["path"]):
            loc.append(part[0] if part[0] else int(part[1]))
        text = text[:match.start()]
    named = _NAMED.search(text)
    if named:
        loc.append(named[1])
    return loc, _QUOTED.sub("", text)


def dotted(loc: list[str | int]) -> str:
    """["a", 0, "b"] → "a.0.b"."""
    return ".".join(str(p) for p in loc)
