"""The Slack Web API stand-in, driven by the real slack_sdk client and a real signed-click receiver."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.webhook import WebhookClient

from lab import procs, slack_standin
from lab.slack_standin import SlackLab
from tests.conftest import new_lab_dir

APPROVAL_BLOCKS: list[dict[str, Any]] = [
    {"type": "section", "text": {"type": "mrkdwn", "text": "Fail back *orders*?"}},
    {"type": "actions", "block_id": "approval", "elements": [
        {"type": "button", "action_id": "approve", "style": "primary", "value": "run-42",
         "text": {"type": "plain_text", "text": "Approve"}},
        {"type": "button", "action_id": "reject", "style": "danger", "value": "run-42",
         "text": {"type": "plain_text", "text": "Reject"}},
    ]},
]


@pytest.fixture(scope="module")
def lab_dir() -> Iterator[Path]:
    d = new_lab_dir("drflow-slack-")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def slack(lab_dir: Path) -> Iterator[dict[str, Any]]:
    info = slack_standin.start_slack(lab_dir)
    try:
        yield info
    finally:
        procs.stop_tree(info["pid"], timeout=3)


@pytest.fixture(scope="module")
def web(slack: dict[str, Any]) -> WebClient:
    return WebClient(token=slack["bot_token"], base_url=slack["url"])


class Receiver:
    """A minimal interactivity endpoint: verifies like a real app, then answers on response_url."""

    def __init__(self, signing_secret: str) -> None:
        self.verifier = SignatureVerifier(signing_secret)
        self.calls: list[dict[str, Any]] = []
        receiver = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                ok = receiver.verifier.is_valid(
                    raw, self.headers.get("X-Slack-Request-Timestamp", ""),
                    self.headers.get("X-Slack-Signature", ""))
                form = urllib.parse.parse_qs(raw.decode())
                payload = json.loads(form["payload"][0])
                receiver.calls.append({"valid": ok, "payload": payload, "fields": list(form),
                                       "content_type": self.headers["Content-Type"]})
                if ok:
                    who = payload["user"]["id"]
                    WebhookClient(payload["response_url"]).send(
                        replace_original=True, text=f"Approved by <@{who}>")
                status, text = (200, "") if ok else (401, "invalid signature")
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", procs.free_port()), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}/slack/interactions"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver(slack: dict[str, Any]) -> Iterator[Receiver]:
    r = Receiver(slack["signing_secret"])
    SlackLab(slack["url"]).set_request_url(r.url)
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def test_auth_test_and_start_info(slack: dict[str, Any], web: WebClient) -> None:
    assert slack["bot_token"].startswith("xoxb-")
    assert slack["url"].startswith("http://127.0.0.1:") and slack["url"].endswith("/api/")
    auth = web.auth_test()
    assert auth["ok"] and auth["user_id"] == slack_standin.BOT_USER_ID
    # Secrets stay out of the process table.
    cmdline = " ".join(psutil.Process(slack["pid"]).cmdline())
    assert slack["signing_secret"] not in cmdline and slack["bot_token"] not in cmdline


def test_post_update_and_history_newest_first(slack: dict[str, Any], web: WebClient) -> None:
    channel = slack["channel"]
    sent = [web.chat_postMessage(channel=channel, text=f"history {i}") for i in range(3)]
    assert sent[0]["channel"] == channel and sent[0]["message"]["text"] == "history 0"
    assert float(sent[0]["ts"]) < float(sent[1]["ts"]) < float(sent[2]["ts"])

    updated = web.chat_update(channel=channel, ts=sent[1]["ts"], text="history 1 (edited)",
                              blocks=APPROVAL_BLOCKS[:1])
    assert updated["ts"] == sent[1]["ts"] and updated["message"]["text"] == "history 1 (edited)"

    page = web.conversations_history(channel=channel, limit=2)
    assert [m["ts"] for m in page["messages"]] == [sent[2]["ts"], sent[1]["ts"]]
    assert page["has_more"] is True
    assert page["messages"][1]["blocks"][0]["text"]["text"] == "Fail back *orders*?"
    assert "edited" in page["messages"][1]
    rest = web.conversations_history(channel=channel, limit=2,
                                     cursor=page["response_metadata"]["next_cursor"])
    assert rest["messages"][0]["ts"] == sent[0]["ts"]

    with pytest.raises(SlackApiError) as e:
        web.chat_update(channel=channel, ts="1.000001", text="nope")
    assert e.value.response["error"] == "message_not_found"
    with pytest.raises(SlackApiError) as e:
        web.chat_postMessage(channel="#no-such-channel", text="x")
    assert e.value.response["error"] == "channel_not_found"


def test_update_takes_only_a_channel_id_as_slack_does(slack: dict[str, Any],
                                                       web: WebClient) -> None:
    by_name = web.chat_postMessage(channel=f"#{slack_standin.CHANNEL_NAME}", text="by name")
    assert by_name["channel"] == slack_standin.CHANNEL_ID  # Slack answers with the id
    with pytest.raises(SlackApiError) as e:
        web.chat_update(channel=f"#{slack_standin.CHANNEL_NAME}", ts=by_name["ts"], text="x")
    assert e.value.response["error"] == "channel_not_found"
    done = web.chat_update(channel=by_name["channel"], ts=by_name["ts"], text="by id")
    assert done["message"]["text"] == "by id"


def test_incident_thread_on_a_channel_name_updates_its_headline(slack: dict[str, Any]) -> None:
    from pydantic import SecretStr

    from tasks.slack import IncidentThread, SlackTarget

    target = SlackTarget(api_url=slack["url"], channel=f"#{slack_standin.CHANNEL_NAME}",
                         token=SecretStr(slack["bot_token"]))
    thread = IncidentThread(target, "Failover of orders")
    thread.start("⏳ started")
    thread.step("ok", "fenced")
    thread.headline("✅ failed over")
    thread.close()
    assert thread.errors == []
    root = next(m for m in SlackLab(slack["url"]).messages() if m["ts"] == thread.root_ts)
    assert root["text"] == "✅ failed over" and root["channel"] == slack_standin.CHANNEL_ID
    assert thread.steps == ["✅ fenced"]


def test_threads_stay_out_of_history_and_come_back_in_replies(slack: dict[str, Any],
                                                              web: WebClient) -> None:
    channel = slack["channel"]
    parent = web.chat_postMessage(channel=channel, text="Incident orders: failover started")
    r1 = web.chat_postMessage(channel=channel, text="fenced", thread_ts=parent["ts"])
    r2 = web.chat_postMessage(channel=channel, text="promoted", thread_ts=parent["ts"])
    assert r1["message"]["thread_ts"] == parent["ts"]

    thread = web.conversations_replies(channel=channel, ts=parent["ts"])
    assert [m["text"] for m in thread["messages"]] == [
        "Incident orders: failover started", "fenced", "promoted"]
    assert thread["messages"][0]["reply_count"] == 2
    assert thread["messages"][0]["latest_reply"] == r2["ts"]

    top = web.conversations_history(channel=channel, limit=5)["messages"]
    assert top[0]["ts"] == parent["ts"]
    assert r1["ts"] not in {m["ts"] for m in top}


def test_form_encoded_and_multipart_bodies(slack: dict[str, Any], web: WebClient) -> None:
    form = web.api_call("chat.postMessage", params={
        "channel": "#" + slack_standin.CHANNEL_NAME, "text": "form",
        "blocks": json.dumps(APPROVAL_BLOCKS[:1])})
    assert form["channel"] == slack["channel"]
    assert form["message"]["blocks"][0]["type"] == "section"
    multipart = web.api_call("chat.postMessage", data={"channel": slack["channel"],
                                                       "text": "multipart"})
    assert multipart["message"]["text"] == "multipart"
    # Token in the form body instead of the header, as older clients send it.
    body = urllib.parse.urlencode({"token": slack["bot_token"]}).encode()
    with urllib.request.urlopen(slack["url"] + "auth.test", data=body) as resp:
        assert json.loads(resp.read())["ok"] is True


def test_wrong_or_missing_token_is_rejected(slack: dict[str, Any]) -> None:
    bad = WebClient(token="xoxb-0-0-wrong", base_url=slack["url"])
    with pytest.raises(SlackApiError) as e:
        bad.chat_postMessage(channel=slack["channel"], text="should not be stored")
    assert e.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as e:
        WebClient(base_url=slack["url"]).auth_test()
    assert e.value.response["error"] == "not_authed"
    assert not any(m["text"] == "should not be stored" for m in SlackLab(slack["url"]).messages())


def test_messages_are_journaled_with_blocks(slack: dict[str, Any], web: WebClient,
                                            lab_dir: Path) -> None:
    sent = web.chat_postMessage(channel=slack["channel"], text="journal", blocks=APPROVAL_BLOCKS)
    lines = [json.loads(x) for x in (lab_dir / "slack" / "messages.jsonl").read_text().splitlines()]
    posted = [x for x in lines if x["event"] == "post" and x["ts"] == sent["ts"]]
    assert posted and posted[0]["message"]["blocks"][1]["elements"][0]["action_id"] == "approve"
    assert all(slack["bot_token"] not in json.dumps(x) for x in lines)


def _approval(slack: dict[str, Any], web: WebClient) -> str:
    ts: str = web.chat_postMessage(channel=slack["channel"], text="approve failback?",
                                   blocks=APPROVAL_BLOCKS)["ts"]
    return ts


def test_signed_click_verifies_and_response_url_replaces_the_message(
        slack: dict[str, Any], web: WebClient, receiver: Receiver) -> None:
    lab = SlackLab(slack["url"])
    ts = _approval(slack, web)
    status, _ = lab.click(ts, "approve", "U0ONCALL1")
    assert status == 200
    call = receiver.calls[-1]
    assert call["valid"] is True
    assert call["fields"] == ["payload"]
    assert call["content_type"] == "application/x-www-form-urlencoded"
    p = call["payload"]
    assert p["type"] == "block_actions"
    assert p["user"]["id"] == "U0ONCALL1" and p["team"]["id"] == slack_standin.TEAM_ID
    assert p["channel"]["id"] == slack["channel"] and p["container"]["message_ts"] == ts
    assert p["message"]["ts"] == ts and p["message"]["blocks"][1]["block_id"] == "approval"
    assert p["actions"] == [{**p["actions"][0], "action_id": "approve", "block_id": "approval",
                             "value": "run-42", "type": "button"}]
    assert p["trigger_id"] and p["api_app_id"] == slack_standin.APP_ID
    assert p["response_url"].startswith(slack["url"].removesuffix("api/"))

    # The receiver answered on response_url with replace_original: buttons are gone.
    now = next(m for m in lab.messages(slack["channel"]) if m["ts"] == ts)
    assert now["text"] == "Approved by <@U0ONCALL1>" and "blocks" not in now
    assert lab.responses()[-1]["body"]["replace_original"] is True
    assert lab.responses()[-1]["message_ts"] == ts


def test_value_override_and_a_section_accessory_button(slack: dict[str, Any], web: WebClient,
                                                      receiver: Receiver) -> None:
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": "drill report"},
               "accessory": {"type": "button", "action_id": "ack", "value": "a",
                             "text": {"type": "plain_text", "text": "Ack"}}}]
    ts = web.chat_postMessage(channel=slack["channel"], text="drill", blocks=blocks)["ts"]
    assert SlackLab(slack["url"]).click(ts, "ack", "U0ONCALL2", value="b")[0] == 200
    action = receiver.calls[-1]["payload"]["actions"][0]
    assert action["action_id"] == "ack" and action["value"] == "b"
    assert action["block_id"]  # filled in by the stand-in, as Slack does


@pytest.mark.parametrize("kwargs", [{"stale_by_s": 301}, {"wrong_secret": True}])
def test_stale_or_badly_signed_clicks_fail_verification(
        slack: dict[str, Any], web: WebClient, receiver: Receiver, kwargs: dict[str, Any]) -> None:
    ts = _approval(slack, web)
    status, body = SlackLab(slack["url"]).click(ts, "reject", "U0ONCALL1", **kwargs)
    assert (status, body) == (401, "invalid signature")
    assert receiver.calls[-1]["valid"] is False
    assert receiver.calls[-1]["payload"]["actions"][0]["action_id"] == "reject"


def test_click_errors_say_what_is_wrong(slack: dict[str, Any], web: WebClient,
                                        receiver: Receiver) -> None:
    lab = SlackLab(slack["url"])
    ts = _approval(slack, web)
    with pytest.raises(LookupError, match="no button with action_id 'nope'"):
        lab.click(ts, "nope", "U0ONCALL1")
    with pytest.raises(LookupError, match="no message with ts"):
        lab.click("1.000001", "approve", "U0ONCALL1")
    lab.set_request_url(f"http://127.0.0.1:{procs.free_port()}/closed")
    try:
        with pytest.raises(ConnectionError, match="did not answer"):
            lab.click(ts, "approve", "U0ONCALL1")
    finally:
        lab.set_request_url(receiver.url)


def test_health(slack: dict[str, Any]) -> None:
    ok, detail = slack_standin.health(slack)
    assert ok, detail
    assert "message(s)" in detail
    ok, detail = slack_standin.health({**slack, "bot_token": "xoxb-wrong"})
    assert not ok and "invalid_auth" in detail
    ok, detail = slack_standin.health({"url": f"http://127.0.0.1:{procs.free_port()}/api/"})
    assert not ok and "does not answer" in detail


def test_restart_replays_the_journal(lab_dir: Path) -> None:
    info = slack_standin.start_slack(lab_dir / "restart")
    state = lab_dir / "restart" / "slack"
    try:
        ts = WebClient(token=info["bot_token"], base_url=info["url"]).chat_postMessage(
            channel=info["channel"], text="before restart")["ts"]
    finally:
        procs.stop_tree(info["pid"], timeout=3)
    port = procs.free_port()
    proc = procs.spawn([sys.executable, "-m", "lab.slack_standin", "--port", str(port),
                        "--secrets-file", str(state / "secrets.json"), "--state-dir", str(state)],
                       lab_dir / "restart" / "logs" / "slack2.log")
    try:
        procs.wait_port(port, 10, "Slack stand-in", proc)
        again = WebClient(token=info["bot_token"], base_url=f"http://127.0.0.1:{port}/api/")
        msgs = again.conversations_history(channel=info["channel"])["messages"]
        assert [m["ts"] for m in msgs] == [ts]
    finally:
        procs.stop_tree(proc.pid, timeout=3)


def test_gateway_alerts_reach_the_channel_and_a_slack_outage_is_only_logged(
        slack: dict[str, Any]) -> None:
    import asyncio

    from pydantic import SecretStr

    from orchestrator.gateway.contracts import Alert
    from orchestrator.gateway.slack_alerter import SlackAlerter
    from tasks.slack import SlackTarget

    alert = Alert(group="orders", kind="sync_relaxed", agent_id="orders-prod",
                  reason="group orders: primary orders-prod relaxed synchronous replication")
    target = SlackTarget(slack["url"], slack["channel"], SecretStr(slack["bot_token"]))
    asyncio.run(SlackAlerter(target).alert(alert))
    msgs = SlackLab(slack["url"].removesuffix("/api/")).messages()
    posted = [m for m in msgs if "relaxed synchronous replication" in m.get("text", "")]
    assert posted and "*orders*" in posted[-1]["text"] and "orders-prod" in posted[-1]["text"]
    # Nobody listens there: the alert is dropped with a log line, within its timeout.
    dead = SlackTarget("http://127.0.0.1:9/api/", "#drflow-alerts", SecretStr("xoxb-x"))
    t = time.monotonic()
    asyncio.run(SlackAlerter(dead, timeout_s=3).alert(alert))
    assert time.monotonic() - t < 3.5
