"""Guest-agent steps of the runbooks: the agent's control API (status, stop, start, rewind_to,
attach_to) as Prefect tasks.

Every verb is idempotent on the agent's side (asking for the state it is in answers
`{"action": "none"}`), so a retry is always safe; retries happen only when the agent could not be
reached or answered 502-504, never on a refusal (409) or a bad request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from drflow.control import ControlClient, ControlError

TRANSIENT_STATUSES = {0, 502, 503, 504}


@dataclass(frozen=True)
class AgentRef:
    """How to reach one node's agent: `name` is its VM (= its agent_id, what messages show),
    `secret` the master `gateway.control_secret`: each request is signed with the secret
    derived for this very agent, and names it and its verb."""

    name: str
    url: str
    secret: SecretStr

    def __str__(self) -> str:  # never the secret
        return f"agent of {self.name} ({self.url})"

    def call(self, verb: str, timeout_s: float = 300.0, **args: Any) -> dict[str, Any]:
        client = ControlClient.for_agent(self.url, self.secret, self.name, timeout_s=timeout_s)
        return client.call(verb, **args)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ControlError) and exc.status in TRANSIENT_STATUSES


def retry_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the agent was unreachable."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


def read_status(agent: AgentRef, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The agent's status, or None when it cannot be reached (no retry: a probe)."""
    try:
        return agent.call("status", timeout_s=timeout_s)
    except ControlError:
        return None


@task(name="agent status", retries=3, retry_delay_seconds=0.5, retry_condition_fn=retry_unreachable,
      cache_policy=NO_CACHE)
def status(agent: AgentRef) -> dict[str, Any]:
    return agent.call("status", timeout_s=15)


@task(name="agent stop", retries=2, retry_delay_seconds=0.3, retry_condition_fn=retry_unreachable,
      cache_policy=NO_CACHE)
def stop(agent: AgentRef, mode: str = "fast") -> dict[str, Any]:
    """Stop PostgreSQL and hold it down (the agent's local recovery leaves it alone)."""
    return agent.call("stop", timeout_s=90, mode=mode)


@task(name="agent start", retries=2, retry_delay_seconds=0.3, retry_condition_fn=retry_unreachable,
      cache_policy=NO_CACHE)
def start(agent: AgentRef) -> dict[str, Any]:
    return agent.call("start", timeout_s=90)


@task(name="rewind to the new primary", retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_unreachable, cache_policy=NO_CACHE)
def rewind_to(agent: AgentRef, host: str, port: int) -> dict[str, Any]:
    """Make the node a streaming standby of host:port: pg_rewind, or a base backup (reason)."""
    return agent.call("rewind_to", timeout_s=3600, source_host=host, source_port=port)


@task(name="attach to the primary", retries=2, retry_delay_seconds=0.5,
      retry_condition_fn=retry_unreachable, cache_policy=NO_CACHE)
def attach_to(agent: AgentRef, host: str, port: int) -> dict[str, Any]:
    return agent.call("attach_to", timeout_s=120, primary_host=host, primary_port=port)
