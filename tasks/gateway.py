"""Runbook calls to the gateway: report changed roles, read the primary's replication evidence.

Both are signed with the webhook secret and best effort: a runbook must work with the gateway
down (that is when a manual failover is most needed). What the gateway could not be told, the
agents' boot check still guards (agents/boot.py: it never starts a primary while the other node
answers as one); what could not be read, the runbook treats as unknown.
"""

from __future__ import annotations

import functools
import json
import ssl
import uuid
from typing import Any

import httpx
from pydantic import SecretStr

from drflow.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, sign_headers, verify

# A black-holed gateway (lost with its site) must not add much to a failover's RTO.
TIMEOUT = httpx.Timeout(3.0, connect=1.0)


@functools.cache
def _tls() -> ssl.SSLContext:
    # Built once: each new context loads the CA bundle (50-60 ms of CPU), and five failovers
    # starting together each call here twice.
    return ssl.create_default_context()


def report_roles(base_url: str, secret: SecretStr, group: str, **update: Any) -> str:
    """POST the roles a runbook changed (`RolesUpdate` fields); says what happened."""
    body = json.dumps(update).encode()
    url = f"{base_url}/v1/groups/{group}/roles"
    key = secret.get_secret_value().encode()
    try:
        r = httpx.post(url, content=body, timeout=TIMEOUT, verify=_tls(), headers={
            "Content-Type": "application/json", **sign_headers(key, body)})
    except httpx.HTTPError as exc:
        return f"gateway at {base_url} not told ({type(exc).__name__}); it learns from the agents"
    return "gateway told" if r.status_code == 200 else \
        f"gateway at {base_url} refused: {r.status_code}"


class EvidenceUnavailable(Exception):
    """The gateway gave no trustworthy evidence; the message says why."""


def fetch_evidence(base_url: str, secret: SecretStr, group: str, agent_id: str) -> dict[str, Any]:
    """What the heartbeats of `agent_id` (the failed primary) last said about replication.

    A signed request; the answer must be signed and echo our nonce (no stale or forged answer
    can make a lagging standby look synchronous)."""
    nonce = uuid.uuid4().hex
    key = secret.get_secret_value().encode()
    url = f"{base_url}/v1/groups/{group}/evidence"
    try:
        r = httpx.get(url, params={"agent_id": agent_id, "nonce": nonce}, timeout=TIMEOUT,
                      verify=_tls(), headers=sign_headers(key, b""))
    except httpx.HTTPError as exc:
        raise EvidenceUnavailable(f"gateway at {base_url} unreachable "
                                  f"({type(exc).__name__})") from None
    if r.status_code != 200:
        raise EvidenceUnavailable(f"gateway at {base_url} answered {r.status_code}")
    try:
        verify(key, r.headers.get(TIMESTAMP_HEADER), r.headers.get(SIGNATURE_HEADER), r.content)
        data = json.loads(r.content)
    except (SignatureError, ValueError) as exc:
        raise EvidenceUnavailable(f"answer from {base_url} is not the gateway's ({exc})") from None
    if not isinstance(data, dict) or data.get("nonce") != nonce or \
            not isinstance(data.get("evidence"), dict):
        raise EvidenceUnavailable(f"answer from {base_url} is not for this request")
    return dict(data["evidence"])
