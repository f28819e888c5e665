"""Slack notifications: one thread per incident, updated step by step, off the critical path.

A recovery must not wait for Slack: messages are queued and sent in order by a background
thread, and `close()` waits for them at the end of the run.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

log = logging.getLogger("drflow.slack")

ICONS = {"started": "⏳", "ok": "✅", "failed": "❌", "refused": "⛔", "skipped": "⏭", "info": "💬"}


@dataclass(frozen=True)
class SlackTarget:
    api_url: str
    channel: str
    token: SecretStr

    def client(self) -> WebClient:
        return WebClient(token=self.token.get_secret_value(), base_url=self.api_url, timeout=10)


@dataclass
class IncidentThread:
    """A root message (the incident's headline) plus one reply per step."""

    target: SlackTarget
    title: str
    scrub: Callable[[str], str] = lambda s: s
    root_ts: str | None = None
    # Slack answers chat.postMessage with the channel's id; chat.update accepts only an id, so
    # a configured "#name" is replaced by the id the first post returned.
    channel_id: str | None = None
    steps: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _q: queue.Queue[tuple[str, str] | None] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def start(self, headline: str) -> None:
        self._thread = threading.Thread(target=self._run, args=(headline,), daemon=True,
                                        name="slack-thread")
        self._thread.start()

    def step(self, outcome: str, text: str) -> None:
        self._q.put(("reply", f"{ICONS.get(outcome, '•')} {text}"))

    def headline(self, text: str) -> None:
        self._q.put(("update", text))

    def close(self, timeout: float = 15.0) -> None:
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, headline: str) -> None:
        client = self.target.client()
        try:
            root = client.chat_postMessage(channel=self.target.channel, text=self.scrub(headline),
                                           blocks=_blocks(self.title, self.scrub(headline)))
            self.root_ts = str(root["ts"])
            self.channel_id = str(root.get("channel") or self.target.channel)
        except SlackApiError as exc:
            self.errors.append(f"chat.postMessage: {exc.response.get('error')}")
        except Exception as exc:  # Slack down must never stop a recovery
            self.errors.append(f"chat.postMessage: {type(exc).__name__}")
        while (item := self._q.get()) is not None:
            kind, text = item
            text = self.scrub(text)
            if self.root_ts is None:
                continue
            try:
                if kind == "reply":
                    self.steps.append(text)
                    client.chat_postMessage(channel=self.channel_id or self.target.channel,
                                            thread_ts=self.root_ts, text=text)
                else:
                    client.chat_update(channel=self.channel_id or self.target.channel,
                                       ts=self.root_ts, text=text, blocks=_blocks(self.title, text))
            except SlackApiError as exc:
                self.errors.append(f"{kind}: {exc.response.get('error')}")
            except Exception as exc:
                self.errors.append(f"{kind}: {type(exc).__name__}")
        if self.errors:
            log.warning("Slack notifications incomplete: %s", "; ".join(self.errors))


def _blocks(title: str, text: str) -> list[dict[str, Any]]:
    return [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}},
    ]
