"""The client of a guest agent's signed control API, used by the orchestrator's tasks."""

from __future__ import annotations

import http.client
import json
import uuid
from typing import Any
from urllib.parse import urlsplit

from drflow.secret_refs import SecretStr, SecretValue
from drflow.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    control_secret,
    sign_control_headers,
    verify_control,
)

CONTROL_PATH = "/v1/control"


class ControlError(Exception):
    """The agent refused or failed a verb (status is the HTTP status, 0 if unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class ControlClient:
    """Calls one agent's control API: `ControlClient(url, secret, agent_id=vm).call("status")`.

    `secret` is that agent's own secret; `ControlClient.for_agent` derives it from the master.
    """

    def __init__(self, url: str, secret: SecretValue, *, agent_id: str,
                 timeout_s: float = 300.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"control URL must be http(s)://host:port{CONTROL_PATH}, got {url!r}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path if parts.path not in ("", "/") else CONTROL_PATH
        self._secret = secret
        self.agent_id = agent_id
        self.timeout_s = timeout_s

    @classmethod
    def for_agent(cls, url: str, master: SecretValue, agent_id: str, *,
                  timeout_s: float = 300.0) -> ControlClient:
        """A client for `agent_id`, its secret derived from the master `gateway.control_secret`."""
        derived = control_secret(master.get_secret_value().encode(), agent_id).decode()
        return cls(url, SecretStr(derived), agent_id=agent_id, timeout_s=timeout_s)

    def sign(self, verb: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """Signature headers for a request about `verb` to this client's agent."""
        return sign_control_headers(self._key(), self.agent_id, verb, body, now)

    def call(self, verb: str, /, **args: Any) -> dict[str, Any]:
        """Run `verb` on the agent; its result, or ControlError saying why not."""
        nonce = str(uuid.uuid4())
        body = json.dumps({"verb": verb, "args": args, "nonce": nonce}).encode()
        status, headers, answer = self.post(body, self.sign(verb, body))
        try:
            data = json.loads(answer)
            if not isinstance(data, dict):
                raise ValueError("answer is not a JSON object")
            verify_control(self._key(), self.agent_id, str(data.get("verb") or ""),
                           headers.get(TIMESTAMP_HEADER.lower()),
                           headers.get(SIGNATURE_HEADER.lower()), answer)
        except (SignatureError, ValueError) as exc:
            raise ControlError(status, f"answer from {self.url} is not from agent "
                                       f"{self.agent_id} ({exc})") from None
        # A refusal before the body was read carries no nonce; a result always carries ours.
        if (data.get("nonce") != nonce and (status == 200 or data.get("nonce") is not None)) or (
                status == 200 and data.get("verb") != verb):
            raise ControlError(status, f"answer from {self.url} is for another request")
        if status != 200 or not data.get("ok"):
            raise ControlError(status, str(data.get("error", "no error message")))
        return dict(data["result"])

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """One raw POST; header names come back lower-case (tests send forgeries with it)."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("POST", self._path, body=body,
                         headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ControlError(0, f"agent control API {self.url} unreachable: {exc}") from exc
        finally:
            conn.close()

    def _key(self) -> bytes:
        return self._secret.get_secret_value().encode()
