"""Field types and checks shared by the configuration's models, and the path of a field."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
)

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# Only the loader sets this: it runs the cross-field checks itself to report exact paths.
DEFER_CROSS_CHECKS = "drflow_defer_cross_checks"

Loc = tuple[str | int, ...]


class Model(BaseModel):
    # hide_input_in_errors: a mistyped field may well hold a secret; errors never echo input.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


def check_url(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"URL must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.password is not None:
        raise ValueError("URL must not contain a password; put it in a secret reference")
    return value


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value.removesuffix(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError("must be a host name or an IP address")
    return value


HttpUrl = Annotated[str, AfterValidator(check_url)]
HostName = Annotated[str, AfterValidator(check_host)]


def check_dns_label(value: str, what: str) -> str:
    if not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{what} must be DNS-label-safe: 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def format_path(loc: Loc) -> str:
    """('groups', 1, 'dns', 'ttl') → 'groups[1].dns.ttl'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def matching(pattern: re.Pattern[str], message: str) -> Callable[[str | None], str | None]:
    """A validator of an optional string that must match `pattern` whole; `message` if not."""
    def check(v: str | None) -> str | None:
        if v is not None and not pattern.fullmatch(v):
            raise ValueError(message)
        return v
    return check
