"""Turn an untrusted request into a verified HealthEvent, or a Rejection saying why not."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from drflow.events import EventError, HealthEvent
from drflow.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    parse_timestamp,
    signature,
    verify,
)
from orchestrator.gateway.settings import GatewaySettings


class Rejection(Exception):
    """A refused request: HTTP status, a metric/audit reason label and a safe detail message."""

    def __init__(
        self, status: int, reason: str, detail: str, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.errors = errors or []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.detail, "reason": self.reason}
        if self.errors:
            out["errors"] = self.errors
        return out

    def headers(self) -> dict[str, str]:
        """A refusal that leaves the request's body unread closes the connection."""
        return {"Connection": "close"} if self.status in (400, 408, 413, 415) else {}


class BodyTimeout(Exception):
    """The client did not send its whole body within the gateway's body read timeout."""


# Refusals quote at most this much of anything the client sent.
_ECHO_MAX = 80
# JSON strings, so that brackets and commas inside them are not counted as structure.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def clip(value: object, limit: int = _ECHO_MAX) -> str:
    """`repr(value)` cut to `limit` characters: what a refusal may quote of the input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


@dataclass(frozen=True)
class JsonLimits:
    """How much structure an untrusted JSON body may have (its byte size is checked earlier)."""

    max_depth: int = 32
    max_elements: int = 10_000


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes before reading (or buffering) it all.

    413 oversized; 400 for a Content-Length that is not plain digits; 408 when the body read
    timeout (the app's middleware) runs out; 400 `client_disconnected` when the client hangs up
    (nobody reads that answer: it makes the refusal one log line, not a traceback)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 18:
            raise Rejection(400, "bad_request", "Content-Length is not a plain decimal integer")
        size = int(declared)
        if size > limit:
            raise Rejection(413, "oversized", f"body of {size} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise Rejection(413, "oversized", f"body exceeds the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Rejection(400, "client_disconnected",
                        f"the client hung up after {total} bytes of its body") from None
    except BodyTimeout as exc:
        raise Rejection(408, "body_timeout", f"{exc}: send the whole body at once") from None
    return b"".join(chunks)


def require_json(headers: Mapping[str, str]) -> None:
    """415 unless the request says its body is `application/json` (parameters allowed)."""
    declared = headers.get("content-type", "")
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise Rejection(415, "unsupported_media_type",
                        f"Content-Type {clip(declared)} is not application/json")


def check_json_shape(body: bytes, limits: JsonLimits, what: str) -> None:
    """Refuse JSON nested deeper than, or holding more elements than, `limits` (422), before any
    parser recurses into it. Counts brackets outside strings; malformed JSON is left to the
    parser."""
    bare = _JSON_STRING.sub(b'""', body)
    elements = bare.count(b",") + bare.count(b"[") + bare.count(b"{")
    if elements > limits.max_elements:
        raise Rejection(422, "too_complex", f"invalid {what}: more than {limits.max_elements} "
                        "JSON elements")
    depth = 0
    for match in _BRACKETS.finditer(bare):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > limits.max_depth:
                raise Rejection(422, "too_complex", f"invalid {what}: JSON nested deeper than "
                                f"{limits.max_depth} levels")
        else:
            depth -= 1


def load_json(raw: bytes | str, limits: JsonLimits, what: str) -> Any:
    """Untrusted JSON text to Python values: shape checked first; every failure a 4xx."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    check_json_shape(data, limits, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Rejection(400, "malformed", f"invalid {what}: not UTF-8") from None
    except (ValueError, RecursionError):
        raise Rejection(422, "malformed", f"invalid {what}: not valid JSON") from None


def authenticate(secret: bytes, headers: Mapping[str, str], body: bytes, window_s: int) -> str:
    """Verify signature and clock window; return the signature (the replay key)."""
    ts, sig = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
    if not ts or not sig:
        raise Rejection(
            401, "unsigned",
            f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header: sign the body with the "
            "group's webhook secret",
        )
    try:
        parse_timestamp(ts, TIMESTAMP_HEADER)
    except SignatureError as exc:
        raise Rejection(401, "bad_timestamp", str(exc)) from None
    try:
        verify(secret, ts, sig, body, window_s=window_s)
    except SignatureError as exc:
        # verify() checks the HMAC before the clock: a matching HMAC means the clock was the problem.
        stale = sig.isascii() and hmac.compare_digest(signature(secret, ts, body), sig)
        reason = "stale" if stale else "bad_signature"
        hint = "check the sender's clock" if stale else "check the webhook secret"
        raise Rejection(401, reason, f"{exc}: {hint}") from None
    return sig


def parse_model(model: type[BaseModel], body: bytes, what: str,
                limits: JsonLimits | None = None) -> Any:
    """Validate `body` as `model`; a 4xx naming each bad field (never echoing the input)."""
    check_json_shape(body, limits or JsonLimits(), what)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p)[:64] for p in e["loc"])[:200] or "(body)",
             "message": e["msg"][:200]}
            for e in exc.errors(include_input=False, include_url=False)[:20]
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise Rejection(422, "malformed", f"invalid {what}: {summary}", errors) from None
    except RecursionError:
        raise Rejection(422, "too_complex", f"invalid {what}: nested too deep") from None


def parse_event(body: bytes, limits: JsonLimits | None = None) -> HealthEvent:
    """Validate `body` as a HealthEvent; a 422 naming the first bad field (never the input)."""
    check_json_shape(body, limits or JsonLimits(), "event body")
    try:
        return HealthEvent.from_json(body)
    except EventError as exc:
        field = exc.field[:200] or "(body)"
        raise Rejection(422, "malformed", f"invalid event body: {field}: {exc.message[:200]}",
                        [{"field": field, "message": exc.message[:200]}]) from None


def check_member(settings: GatewaySettings, group: str, agent_id: str) -> None:
    """Refuse an event of a group the configuration does not name, or from an agent that is not
    one of the group's nodes (the configuration as reloaded last)."""
    if group not in settings.groups:
        raise Rejection(404, "unknown_group", f"unknown protection group {clip(group)}: add it to "
                        "the configuration or fix the agent's group")
    if agent_id not in settings.known_agents(group):
        raise Rejection(403, "unknown_agent", f"agent {clip(agent_id)} is not a node of group "
                        f"{group} (agents are the VM names of the group's nodes in the "
                        "configuration)")
