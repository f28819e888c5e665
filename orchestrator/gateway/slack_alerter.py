"""Alerts to the on-call Slack channel: what needs a person but starts no failover."""

from __future__ import annotations

import asyncio
import logging

from slack_sdk.errors import SlackApiError

from orchestrator.gateway.contracts import Alert
from tasks.slack import SlackTarget

log = logging.getLogger("drflow.gateway.alerts")

_ICON = {"lease_fenced": "🛑", "lease_failsafe": "⚠️", "sync_relaxed": "⚠️"}


def alert_text(alert: Alert) -> str:
    icon = _ICON.get(alert.kind, "⚠️")
    return f"{icon} *{alert.group}*: {alert.kind.replace('_', ' ')} ({alert.agent_id}) — {alert.reason}"


class SlackAlerter:
    """Posts each alert as one message; a Slack outage is logged and never delays the gateway."""

    def __init__(self, target: SlackTarget, timeout_s: float = 10.0) -> None:
        self.target = target
        self.timeout_s = timeout_s

    async def alert(self, alert: Alert) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._post, alert), self.timeout_s)
        except (TimeoutError, SlackApiError, OSError) as exc:
            log.warning("could not post the %s alert of %s to Slack: %s", alert.kind, alert.group,
                        type(exc).__name__)

    def _post(self, alert: Alert) -> None:
        self.target.client().chat_postMessage(channel=self.target.channel, text=alert_text(alert))
