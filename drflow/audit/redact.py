"""Make audit parameters JSON-safe and free of secrets before they are hashed and stored."""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

REDACTED = "***redacted***"

# A key is secret when any of its words is one of these ("db_password", "apiKey", "X-Auth-Token").
SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "tokens", "key",
    "keys", "apikey", "credential", "credentials", "creds", "authorization", "auth", "cookie",
    "cookies", "signature", "sig", "otp",
})
# Keys made of a secret word that are known to be harmless and useful to keep in the trail.
SAFE_KEYS = frozenset({"idempotency_key", "key_prefix", "object_key", "public_key", "s3_key"})

_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

# Secrets that are recognisable by shape, wherever they appear in a string.
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host  ->  scheme://user:***redacted***@host
    (re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)"),
     rf"\g<keep>{REDACTED}"),
    (re.compile(r"(?i)(?P<keep>\bbearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\g<keep>{REDACTED}"),
    (re.compile(r"\bxox[abposre]-[A-Za-z0-9-]+"), REDACTED),  # Slack tokens
    (re.compile(r"(?i)(?P<keep>\b(?:password|passwd|pwd|secret|token)\s*[=:]\s*)[^\s,;&]+"),
     rf"\g<keep>{REDACTED}"),
)


def is_secret_key(key: str) -> bool:
    """True when a mapping key names something secret (password, api_key, authToken, ...)."""
    normal = _CAMEL.sub("_", key).lower()
    if normal in SAFE_KEYS:
        return False
    words = [w for w in _WORD_SPLIT.split(normal) if w]
    return any(w in SECRET_WORDS for w in words) or "password" in normal or "secret" in normal


class Redactor:
    """Redacts by key, by type (`SecretStr`), by shape and by known secret values."""

    def __init__(self, secret_values: Iterable[str | SecretStr] = ()) -> None:
        self._values: set[str] = set()
        self.add_secret_values(secret_values)

    def add_secret_values(self, values: Iterable[str | SecretStr]) -> None:
        """Scrub these exact values from every string from now on (defence in depth)."""
        for v in values:
            text = v.get_secret_value() if isinstance(v, SecretStr) else v
            # Very short values would shred ordinary words without protecting anything.
            if text and len(text) >= 4:
                self._values.add(text)

    def text(self, value: str) -> str:
        """A string with known secret values and secret-shaped substrings replaced."""
        # Lone surrogates and NUL cannot be stored as text (UTF-8, PostgreSQL): make them visible.
        value = value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
        # Longest first, so a secret containing another secret is removed whole.
        for secret in sorted(self._values, key=len, reverse=True):
            if secret in value:
                value = value.replace(secret, REDACTED)
        for pattern, repl in _SECRET_PATTERNS:
            value = pattern.sub(repl, value)
        return value

    def value(self, value: Any, _depth: int = 0) -> Any:
        """`value` as plain JSON types (dict/list/str/int/float/bool/None), secrets redacted."""
        if _depth > 32:
            return REDACTED  # a self-referencing structure has no place in the trail
        d = _depth + 1
        if isinstance(value, SecretStr | SecretBytes):
            return REDACTED
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, BaseModel):
            return self.value(value.model_dump(mode="python"), d)
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for k, v in value.items():
                key = self.text(str(k))
                out[key] = REDACTED if is_secret_key(str(k)) else self.value(v, d)
            return out
        if isinstance(value, set | frozenset):
            items = [self.value(v, d) for v in value]
            return sorted(items, key=lambda x: repr(x))
        if isinstance(value, list | tuple):
            return [self.value(v, d) for v in value]
        if isinstance(value, bytes | bytearray):
            return f"<{len(value)} bytes>"
        if isinstance(value, dt.datetime | dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, dt.timedelta):
            return value.total_seconds()
        if isinstance(value, enum.Enum):
            return self.value(value.value, d)
        if isinstance(value, Decimal | uuid.UUID | PurePath):
            return self.text(str(value))
        if isinstance(value, BaseException):
            return {"type": type(value).__name__, "message": self.text(str(value))}
        return self.text(repr(value))
