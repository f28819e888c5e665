"""HTTP endpoint: a GET answers with the expected status (stdlib client: no heavy imports)."""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import urlsplit

from agents.monitors import CheckResult


class HttpMonitor:
    def __init__(self, url: str, expect_status: int, timeout_s: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.expect_status = expect_status
        self.timeout_s = timeout_s

    def check(self) -> CheckResult:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("GET", self._path, headers={"User-Agent": "drflow-agent"})
            resp = conn.getresponse()
            resp.read(4096)
        except (OSError, http.client.HTTPException) as exc:
            return CheckResult(False, f"GET {self.url} failed: {exc or type(exc).__name__}")
        finally:
            conn.close()
        if resp.status != self.expect_status:
            return CheckResult(False, f"GET {self.url} answered {resp.status}, expected "
                               f"{self.expect_status}", {"status": resp.status})
        return CheckResult(True, f"GET {self.url} answered {resp.status}", {"status": resp.status})


def build(r: Any) -> HttpMonitor:
    return HttpMonitor(r.url, r.expect_status, r.timeout_s)
