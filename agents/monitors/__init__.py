"""Monitors: one small check per resource type, each returning a CheckResult within its timeout.

Monitor modules are imported only for the resource types a config uses, so an agent without a
PostgreSQL resource never loads psycopg.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


class Monitor(Protocol):
    def check(self) -> CheckResult:
        """One check; must return (not raise) and honour the resource's timeout."""
        ...


_MODULES = {
    "process": "agents.monitors.process",
    "tcp": "agents.monitors.tcp",
    "http": "agents.monitors.http",
    "postgres": "agents.monitors.postgres",
    "volume": "agents.monitors.volume",
    "ip": "agents.monitors.ip",
}


def build_monitor(resource: Any) -> Monitor:
    """The monitor for one configured resource (`resource.type` picks the module)."""
    module = importlib.import_module(_MODULES[resource.type])
    monitor: Monitor = module.build(resource)
    return monitor


def failed(exc: BaseException, what: str) -> CheckResult:
    """A CheckResult for an unexpected exception, with a message a person can act on."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckResult(False, f"{what}: {text}")
