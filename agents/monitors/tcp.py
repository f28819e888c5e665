"""TCP port: something accepts a connection within the timeout."""

from __future__ import annotations

import socket
from typing import Any

from agents.monitors import CheckResult


class TcpMonitor:
    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s

    def check(self) -> CheckResult:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout_s):
                return CheckResult(True, f"{self.host}:{self.port} accepts connections")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return CheckResult(False, f"{self.host}:{self.port} refuses connections: {reason}")


def build(r: Any) -> TcpMonitor:
    return TcpMonitor(r.host, r.port, r.timeout_s)
