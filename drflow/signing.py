"""HMAC signing shared by agent webhooks, the agent control API and the gateway."""

from __future__ import annotations

import hashlib
import hmac
import re
import time

TIMESTAMP_HEADER = "X-Drflow-Timestamp"
SIGNATURE_HEADER = "X-Drflow-Signature"
SIGNATURE_PREFIX = "sha256="
DEFAULT_WINDOW_S = 300


class SignatureError(Exception):
    """The request is not signed, wrongly signed, or outside the clock window."""


# Unix seconds as the signers write them (`str(int(time))`): ASCII digits, no sign, no leading
# zero, no `_` or spaces, at most 12 digits. `int()` alone accepts far more (`²`, `1_7…`, `+1`).
_TIMESTAMP = re.compile(r"(?:0|[1-9][0-9]{0,11})", re.ASCII)
_SIGNATURE = re.compile(re.escape(SIGNATURE_PREFIX) + r"[0-9a-f]{64}", re.ASCII)


def parse_timestamp(value: str, header: str = TIMESTAMP_HEADER) -> int:
    """The signature timestamp as an int; SignatureError unless it is plain ASCII digits."""
    if not _TIMESTAMP.fullmatch(value):
        raise SignatureError(f"{header} must be Unix seconds in ASCII digits (at most 12)")
    return int(value)


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
    ts = parse_timestamp(timestamp, TIMESTAMP_HEADER)
    if not _SIGNATURE.fullmatch(sig):
        raise SignatureError(f"{SIGNATURE_HEADER} is not {SIGNATURE_PREFIX}<64 hex digits>")
    expected = signature(secret, timestamp, body)
    if not hmac.compare_digest(expected, sig):
        raise SignatureError("signature does not match the body")
    current = time.time() if now is None else now
    if abs(current - ts) > window_s:
        raise SignatureError(f"timestamp is {int(current - ts)} s away from now (window {window_s} s)")
    return ts


# -- agent control API ------------------------------------------------------------------------
# A control request is bound to the agent it is meant for and to its verb, and signed with that
# agent's own secret, derived from the orchestrator's master `gateway.control_secret`: a request
# captured on one VM, or the secret stolen from one VM, commands no other.

def control_secret(master: bytes, agent_id: str) -> bytes:
    """One agent's control secret: hex HMAC-SHA256(master, agent_id) (what its config holds)."""
    return hmac.new(master, agent_id.encode(), hashlib.sha256).hexdigest().encode()


def control_signature(secret: bytes, agent_id: str, verb: str, timestamp: str,
                      body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256(secret, "drflow-control\\n" agent_id \\n verb \\n ts \\n body)."""
    msg = b"\n".join([b"drflow-control", agent_id.encode(), verb.encode(), timestamp.encode(),
                      body])
    return SIGNATURE_PREFIX + hmac.new(secret, msg, hashlib.sha256).hexdigest()


def sign_control_headers(secret: bytes, agent_id: str, verb: str, body: bytes,
                         now: float | None = None) -> dict[str, str]:
    """Headers for a control request (or answer) about `verb`, meant for `agent_id`."""
    ts = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: ts,
            SIGNATURE_HEADER: control_signature(secret, agent_id, verb, ts, body)}


def verify_control(secret: bytes, agent_id: str, verb: str, timestamp: str | None,
                   sig: str | None, body: bytes, now: float | None = None,
                   window_s: int = DEFAULT_WINDOW_S) -> int:
    """Check a control signature (strict ASCII forms) and the clock window; SignatureError why."""
    if not timestamp or not sig:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    ts = parse_timestamp(timestamp)
    if not _SIGNATURE.fullmatch(sig):
        raise SignatureError(f"{SIGNATURE_HEADER} must be sha256=<64 lower-case hex digits>")
    expected = control_signature(secret, agent_id, verb, timestamp, body)
    if not hmac.compare_digest(expected, sig):
        raise SignatureError("signature does not match this agent, verb and body")
    current = time.time() if now is None else now
    if abs(current - ts) > window_s:
        raise SignatureError(f"timestamp is {int(current - ts)} s away from now "
                             f"(window {window_s} s)")
    return ts
