"""HMAC signing shared by agent webhooks, the agent control API and the gateway."""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Drflow-Timestamp"
SIGNATURE_HEADER = "X-Drflow-Signature"
SIGNATURE_PREFIX = "sha256="
DEFAULT_WINDOW_S = 300


class SignatureError(Exception):
    """The request is not signed, wrongly signed, or outside the clock window."""


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256(secret, timestamp + "." + raw_body)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def sign_headers(secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    """Headers to send with `body`."""
    ts = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: signature(secret, ts, body)}


def verify(
    secret: bytes,
    timestamp: str | None,
    sig: str | None,
    body: bytes,
    now: float | None = None,
    window_s: int = DEFAULT_WINDOW_S,
) -> int:
    """Check signature and clock window; return the timestamp. Raise SignatureError with why."""
    if not timestamp or not sig:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        ts = int(timestamp)
    except ValueError as exc:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not an integer") from exc
    expected = signature(secret, timestamp, body)
    if not hmac.compare_digest(expected, sig):
        raise SignatureError("signature does not match the body")
    current = time.time() if now is None else now
    if abs(current - ts) > window_s:
        raise SignatureError(f"timestamp is {int(current - ts)} s away from now (window {window_s} s)")
    return ts
