"""What the runbooks observe and their pure decisions take as input."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AppCheck:
    """A direct check of the application from the orchestrator, not through the agent."""

    reachable: bool
    writable_primary: bool = False
    detail: str = ""
