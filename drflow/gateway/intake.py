"""Turn an untrusted request into a verified HealthEvent, or a Rejection saying why not."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from drflow.events import HealthEvent
from drflow.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, signature, verify


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


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes before reading (or buffering) it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise Rejection(400, "bad_request", "Content-Length is not an integer") from exc
        if size > limit:
            raise Rejection(413, "oversized", f"body of {size} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Rejection(413, "oversized", f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


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
        verify(secret, ts, sig, body, window_s=window_s)
    except SignatureError as exc:
        # verify() checks the HMAC before the clock: a matching HMAC means the clock was the problem.
        stale = hmac.compare_digest(signature(secret, ts, body), sig)
        reason = "stale" if stale else "bad_signature"
        hint = "check the sender's clock" if stale else "check the webhook secret"
        raise Rejection(401, reason, f"{exc}: {hint}") from exc
    return sig


def parse_model(model: type[BaseModel], body: bytes, what: str) -> Any:
    """Validate `body` as `model`; a 422 naming each bad field (never echoing the input)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p)[:64] for p in e["loc"]) or "(body)", "message": e["msg"]}
            for e in exc.errors(include_input=False, include_url=False)
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise Rejection(422, "malformed", f"invalid {what}: {summary}", errors) from exc


def parse_event(body: bytes) -> HealthEvent:
    event: HealthEvent = parse_model(HealthEvent, body, "event body")
    return event
