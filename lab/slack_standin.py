"""A Slack Web API stand-in for the lab: records messages and clicks buttons with signed payloads.

It speaks the wire format slack_sdk's `WebClient(base_url="http://127.0.0.1:PORT/api/")` uses:
POST (or GET) `/api/<method>` with a bearer token and a JSON, form-encoded or multipart body,
answered with HTTP 200 and `{"ok": ...}`. Methods: auth.test, chat.postMessage, chat.update,
conversations.history and conversations.replies. Every message is kept in memory and appended to
`messages.jsonl` in the state directory (replayed on restart).

The lab-only surface under `/_lab/` (unauthenticated; loopback only) sets the interactivity
Request URL, lists messages and response_url posts, and clicks a button: it posts a
`block_actions` interaction to the Request URL exactly as Slack does (form field `payload`,
`X-Slack-Signature: v0=HMAC-SHA256(secret, "v0:{ts}:{body}")`). `response_url` points back here
under `/actions/…` and honours replace_original, delete_original and response_type.

Stdlib only, so the process starts in a fraction of a second. Secrets come from a 0600 JSON file,
never argv.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TEAM_ID = "T0DRFLOW1"
TEAM_DOMAIN = "drflow-lab"
BOT_USER_ID = "U0DRFLOWBOT"
BOT_NAME = "drflow"
BOT_ID = "B0DRFLOW1"
APP_ID = "A0DRFLOW1"
CHANNEL_ID = "C0DRFLOW1"
CHANNEL_NAME = "drflow-incidents"
# Slack gives up on an interaction after 3 s; the stand-in waits longer so a test can see how late.
CLICK_TIMEOUT_S = 10.0
# response_url: valid for 30 minutes and 5 uses, as on Slack.
RESPONSE_URL_TTL_S = 1800
RESPONSE_URL_USES = 5


class SlackError(Exception):
    """An API error: answered as HTTP 200 `{"ok": false, "error": code}` like Slack."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class LabError(Exception):
    """A bad request to the lab control surface, answered with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json_field(value: Any, error: str) -> Any:
    # Form-encoded callers send blocks/attachments as JSON text, JSON callers as lists.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SlackError(error) from None
    if not isinstance(value, list) or not all(isinstance(b, dict) for b in value):
        raise SlackError(error)
    return value


class Store:
    """Messages, channels and response URLs; thread-safe; every change is appended to JSONL."""

    def __init__(self, state_dir: Path, base_url: str) -> None:
        self.state_dir = state_dir
        self.base_url = base_url
        self.lock = threading.Lock()
        self.channels: dict[str, str] = {CHANNEL_ID: CHANNEL_NAME}
        self.messages: dict[str, dict[str, Any]] = {}  # ts -> {"channel", "message"}
        self.responses: list[dict[str, Any]] = []
        self.response_urls: dict[str, dict[str, Any]] = {}
        self.request_url: str | None = None
        self._last_ts = 0.0
        self.journal = state_dir / "messages.jsonl"
        self._replay()

    def _replay(self) -> None:
        if not self.journal.exists():
            return
        for line in self.journal.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            self._apply(ev)
            if "ts" in ev:
                self._last_ts = max(self._last_ts, float(ev["ts"]))

    def _apply(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind in ("post", "update"):
            self.messages[ev["ts"]] = {"channel": ev["channel"], "message": ev["message"]}
            self.channels.setdefault(ev["channel"], ev["channel"].lower())
        elif kind == "delete":
            self.messages.pop(ev["ts"], None)
        elif kind == "response":
            self.responses.append(ev["response"])
        elif kind == "request_url":
            self.request_url = ev["url"]

    def record(self, ev: dict[str, Any]) -> None:
        """Apply and journal one change; call with the lock held."""
        self._apply(ev)
        with self.journal.open("a") as f:
            f.write(json.dumps({**ev, "at": time.time()}) + "\n")

    def new_ts(self) -> str:
        # Slack ts are unique per channel and ordered; one clock for all channels is enough here.
        self._last_ts = max(time.time(), self._last_ts + 0.000001)
        return f"{self._last_ts:.6f}"

    def channel_id(self, channel: Any, by_name: bool = True) -> str:
        """The id of `channel`; with `by_name` (chat.postMessage) a name or #name also works."""
        if not channel or not isinstance(channel, str):
            raise SlackError("channel_not_found")
        if channel in self.channels:
            return channel
        if not by_name:  # as Slack: chat.update takes only the id
            raise SlackError("channel_not_found")
        name = channel.lstrip("#")
        for cid, cname in self.channels.items():
            if cname == name:
                return cid
        if channel[0] in "CG" and channel[1:].isalnum() and channel.isupper() and len(channel) >= 9:
            self.channels[channel] = channel.lower()  # any well-formed id is a channel the bot is in
            return channel
        raise SlackError("channel_not_found")

    def in_channel(self, channel: str) -> list[dict[str, Any]]:
        found = [m["message"] for m in self.messages.values() if m["channel"] == channel]
        return sorted(found, key=lambda m: float(m["ts"]))

    def get(self, channel: str, ts: Any) -> dict[str, Any] | None:
        entry = self.messages.get(str(ts))
        return entry["message"] if entry and entry["channel"] == channel else None


def _is_top_level(m: dict[str, Any]) -> bool:
    return m.get("thread_ts") in (None, m["ts"]) or m.get("subtype") == "thread_broadcast"


def _page(items: list[dict[str, Any]], params: dict[str, Any],
          default: int) -> tuple[list[dict[str, Any]], str]:
    """Apply `limit` and `cursor`; returns the page and the next cursor ('' at the end)."""
    try:
        limit = int(params.get("limit") or default)
        offset = int(base64.b64decode(params["cursor"]).decode().split(":")[1]) \
            if params.get("cursor") else 0
    except (ValueError, IndexError):
        raise SlackError("invalid_cursor") from None
    limit = max(1, min(limit, 999))
    page = items[offset:offset + limit]
    more = offset + limit < len(items)
    return page, base64.b64encode(f"offset:{offset + limit}".encode()).decode() if more else ""


def _fill_block_ids(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Slack gives every block without a block_id a random one; interactions report it.
    return [b if b.get("block_id") else {**b, "block_id": secrets.token_urlsafe(4)} for b in blocks]


class Api:
    """The Web API methods; each takes the merged parameters and returns the response body."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def call(self, method: str, p: dict[str, Any]) -> dict[str, Any]:
        fn: Callable[[dict[str, Any]], dict[str, Any]] | None = {
            "auth.test": self.auth_test,
            "chat.postMessage": self.post_message,
            "chat.update": self.update,
            "conversations.history": self.history,
            "conversations.replies": self.replies,
        }.get(method)
        if fn is None:
            return {"ok": False, "error": "unknown_method", "req_method": method}
        with self.store.lock:
            return fn(p)

    def auth_test(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": f"https://{TEAM_DOMAIN}.slack.com/", "team": "drflow lab",
                "user": BOT_NAME, "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": BOT_ID,
                "is_enterprise_install": False}

    def _content(self, p: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if p.get("text") is not None:
            out["text"] = str(p["text"])
        if p.get("blocks") is not None:
            out["blocks"] = _fill_block_ids(_json_field(p["blocks"], "invalid_blocks"))
        if p.get("attachments") is not None:
            out["attachments"] = _json_field(p["attachments"], "invalid_attachments")
        return out

    def post_message(self, p: dict[str, Any], *, record: bool = True) -> dict[str, Any]:
        s = self.store
        channel = s.channel_id(p.get("channel"))
        content = self._content(p)
        if not (content.get("text") or content.get("blocks") or content.get("attachments")):
            raise SlackError("no_text")
        ts = s.new_ts()
        msg: dict[str, Any] = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID,
                               "app_id": APP_ID, "text": content.pop("text", ""), "ts": ts,
                               "team": TEAM_ID, **content}
        if p.get("thread_ts"):
            parent = s.get(channel, p["thread_ts"])
            if parent is None:
                raise SlackError("thread_not_found")
            root = s.get(channel, parent.get("thread_ts", parent["ts"])) or parent
            msg["thread_ts"] = root["ts"]
            msg["parent_user_id"] = root["user"]
            if str(p.get("reply_broadcast", "")).lower() in ("true", "1"):
                msg["subtype"] = "thread_broadcast"
            replies = [m for m in s.in_channel(channel)
                       if m.get("thread_ts") == root["ts"] and m["ts"] != root["ts"]]
            s.record({"event": "update", "channel": channel, "ts": root["ts"], "message": {
                **root, "thread_ts": root["ts"], "reply_count": len(replies) + 1,
                "reply_users": [BOT_USER_ID], "reply_users_count": 1, "latest_reply": ts}})
        s.record({"event": "post", "channel": channel, "ts": ts, "message": msg})
        return {"ok": True, "channel": channel, "ts": ts, "message": msg}

    def update(self, p: dict[str, Any]) -> dict[str, Any]:
        s = self.store
        channel = s.channel_id(p.get("channel"), by_name=False)
        old = s.get(channel, p.get("ts"))
        if old is None:
            raise SlackError("message_not_found")
        if old.get("user") != BOT_USER_ID:
            raise SlackError("cant_update_message")
        msg = {**old, **self._content(p), "edited": {"user": BOT_USER_ID, "ts": s.new_ts()}}
        s.record({"event": "update", "channel": channel, "ts": old["ts"], "message": msg})
        return {"ok": True, "channel": channel, "ts": old["ts"], "text": msg["text"],
                "message": msg}

    def history(self, p: dict[str, Any]) -> dict[str, Any]:
        s = self.store
        channel = s.channel_id(p.get("channel"))
        inclusive = str(p.get("inclusive", "")).lower() in ("true", "1")
        latest = float(p.get("latest") or "inf")
        oldest = float(p.get("oldest") or 0)

        def within(ts: float) -> bool:
            if inclusive:
                return oldest <= ts <= latest
            return oldest < ts < latest

        top = [m for m in s.in_channel(channel) if _is_top_level(m) and within(float(m["ts"]))]
        page, cursor = _page(list(reversed(top)), p, 100)
        return {"ok": True, "messages": page, "has_more": bool(cursor), "pin_count": 0,
                "channel_actions_ts": None, "channel_actions_count": 0,
                "response_metadata": {"next_cursor": cursor}}

    def replies(self, p: dict[str, Any]) -> dict[str, Any]:
        s = self.store
        channel = s.channel_id(p.get("channel"))
        msg = s.get(channel, p.get("ts"))
        if msg is None:
            raise SlackError("thread_not_found")
        root = msg.get("thread_ts", msg["ts"])
        thread = [m for m in s.in_channel(channel) if m["ts"] == root or m.get("thread_ts") == root]
        page, cursor = _page(thread, p, 1000)
        return {"ok": True, "messages": page, "has_more": bool(cursor),
                "response_metadata": {"next_cursor": cursor}}


class Clicker:
    """Sends block_actions interactions to the Request URL and serves response_url posts."""

    def __init__(self, store: Store, api: Api, signing_secret: str,
                 verification_token: str) -> None:
        self.store = store
        self.api = api
        self.signing_secret = signing_secret
        self.verification_token = verification_token

    @staticmethod
    def _find_button(message: dict[str, Any], action_id: str) -> tuple[str, dict[str, Any]]:
        for block in message.get("blocks", []):
            elements = list(block.get("elements", []))
            if isinstance(block.get("accessory"), dict):
                elements.append(block["accessory"])
            for el in elements:
                if el.get("type") == "button" and el.get("action_id") == action_id:
                    return block["block_id"], el
        raise LabError(404, f"message {message['ts']} has no button with action_id {action_id!r}")

    def payload(self, req: dict[str, Any]) -> dict[str, Any]:
        s = self.store
        with s.lock:
            entry = s.messages.get(str(req.get("ts")))
            if entry is None:
                raise LabError(404, f"no message with ts {req.get('ts')!r}")
            channel, message = entry["channel"], entry["message"]
            block_id, button = self._find_button(message, str(req.get("action_id")))
            token = secrets.token_urlsafe(18)
            s.response_urls[token] = {"channel": channel, "ts": message["ts"],
                                      "expires": time.time() + RESPONSE_URL_TTL_S,
                                      "uses": RESPONSE_URL_USES,
                                      "thread_ts": message.get("thread_ts")}
            channel_name = s.channels.get(channel, channel.lower())
        user_id = str(req.get("user_id") or "")
        if not user_id:
            raise LabError(400, "user_id is required")
        name = str(req.get("user_name") or user_id.lower())
        action: dict[str, Any] = {"action_id": button["action_id"], "block_id": block_id,
                                  "text": button.get("text"), "type": "button",
                                  "action_ts": f"{time.time():.6f}"}
        value = req.get("value") if req.get("value") is not None else button.get("value")
        if value is not None:
            action["value"] = value
        if button.get("style"):
            action["style"] = button["style"]
        container: dict[str, Any] = {"type": "message", "message_ts": message["ts"],
                                     "channel_id": channel, "is_ephemeral": False}
        if message.get("thread_ts"):
            container["thread_ts"] = message["thread_ts"]
        n = secrets.randbelow(10**13)
        return {
            "type": "block_actions",
            "user": {"id": user_id, "username": name, "name": name, "team_id": TEAM_ID},
            "api_app_id": APP_ID,
            "token": self.verification_token,
            "container": container,
            "trigger_id": f"{int(time.time())}.{n}.{secrets.token_hex(16)}",
            "team": {"id": TEAM_ID, "domain": TEAM_DOMAIN},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": channel, "name": channel_name},
            "message": message,
            "state": {"values": {}},
            "response_url": f"{s.base_url}/actions/{TEAM_ID}/{n}/{token}",
            "actions": [action],
        }

    def click(self, req: dict[str, Any]) -> dict[str, Any]:
        url = self.store.request_url
        if not url:
            raise LabError(409, "no interactivity Request URL: POST /_lab/request_url first")
        payload = self.payload(req)
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        ts = str(int(time.time()) - int(req.get("stale_by_s") or 0))
        secret = secrets.token_hex(16) if req.get("wrong_secret") else self.signing_secret
        sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body,
                               hashlib.sha256).hexdigest()
        http_req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": sig,
        })
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(http_req, timeout=CLICK_TIMEOUT_S) as resp:
                status, text = resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            raise LabError(502, f"the Request URL {url} did not answer: {e}") from None
        elapsed = time.monotonic() - t0
        with self.store.lock:
            self.store.record({"event": "click", "message_ts": payload["container"]["message_ts"],
                               "action_id": payload["actions"][0]["action_id"],
                               "user_id": payload["user"]["id"], "status": status,
                               "elapsed_s": round(elapsed, 3)})
        return {"ok": True, "status": status, "body": text, "elapsed_s": elapsed,
                "trigger_id": payload["trigger_id"], "response_url": payload["response_url"]}

    def respond(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        """A post to a response_url: record it and apply it to the original message."""
        s = self.store
        with s.lock:
            target = s.response_urls.get(token)
            if target is None or target["expires"] < time.time() or target["uses"] <= 0:
                raise LabError(404, "expired_url")
            target["uses"] -= 1
            channel, ts = target["channel"], target["ts"]
            s.record({"event": "response", "response": {
                "channel": channel, "message_ts": ts, "body": body, "received_at": time.time()}})
            if body.get("delete_original"):
                s.record({"event": "delete", "channel": channel, "ts": ts})
            elif body.get("replace_original"):
                old = s.get(channel, ts)
                if old is None:
                    raise LabError(404, "message_not_found")
                # Replacing means replacing: blocks not resent are gone, as on Slack.
                kept = {k: v for k, v in old.items() if k not in ("text", "blocks", "attachments")}
                new = {**kept, "text": "", **self.api._content(body)}
                s.record({"event": "update", "channel": channel, "ts": ts, "message": new})
            elif body.get("response_type") == "in_channel":
                thread = body.get("thread_ts") or target["thread_ts"]
                self.api.post_message({**body, "channel": channel, "thread_ts": thread})
        return {"ok": True}


def _parse_body(content_type: str, raw: bytes) -> dict[str, Any]:
    ctype = content_type.split(";")[0].strip().lower()
    if not raw:
        return {}
    if ctype == "application/json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise SlackError("invalid_json") from None
        if not isinstance(data, dict):
            raise SlackError("invalid_json")
        return data
    if ctype == "multipart/form-data":
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        out: dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(data, bytes) and not part.get_filename():
                out[name] = data.decode()
        return out
    return dict(urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True))


class Handler(BaseHTTPRequestHandler):
    server_version = "drflow-slack-standin/1"
    api: Api
    clicker: Clicker
    bot_token: str

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The request line may carry ?token=…: log the path only.
        path = self.path.split("?")[0]
        self.log_message("%s %s %s", self.command, path, code)

    def log_message(self, format: str, *args: Any) -> None:
        text = re.sub(r"token=[^&\s'\"]*", "token=…", format % args)
        sys.stderr.write(f"{self.log_date_time_string()} {text}\n")

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _raw(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        raw = self._raw()
        try:
            if url.path.startswith("/api/"):
                self._send(200, self._api(url.path[len("/api/"):], url.query, raw))
            elif url.path.startswith("/actions/"):
                body = _parse_body(self.headers.get("Content-Type", ""), raw)
                if "payload" in body and isinstance(body["payload"], str):
                    body = json.loads(body["payload"])
                self._send(200, self.clicker.respond(url.path.rsplit("/", 1)[-1], body))
            elif url.path.startswith("/_lab/"):
                self._send(200, self._lab(url.path[len("/_lab/"):], url.query, raw))
            else:
                self._send(404, {"ok": False, "error": f"no such path {url.path}"})
        except SlackError as e:
            self._send(200, {"ok": False, "error": e.code})
        except LabError as e:
            self._send(e.status, {"ok": False, "error": str(e)})
        except (ValueError, KeyError, TypeError) as e:
            self._send(400, {"ok": False, "error": f"bad request: {e}"})

    def _api(self, method: str, query: str, raw: bytes) -> dict[str, Any]:
        params: dict[str, Any] = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        params.update(_parse_body(self.headers.get("Content-Type", ""), raw))
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else params.pop("token", "")
        if not token:
            raise SlackError("not_authed")
        if not hmac.compare_digest(str(token).encode(), self.bot_token.encode()):
            raise SlackError("invalid_auth")
        return self.api.call(method, params)

    def _lab(self, what: str, query: str, raw: bytes) -> dict[str, Any]:
        store = self.clicker.store
        q = dict(urllib.parse.parse_qsl(query))
        body = json.loads(raw) if raw else {}
        if what == "health":
            with store.lock:
                return {"ok": True, "messages": len(store.messages),
                        "request_url": store.request_url}
        if what == "messages":
            with store.lock:
                entries = sorted(store.messages.values(), key=lambda e: float(e["message"]["ts"]))
                return {"ok": True, "messages": [
                    {"channel": e["channel"], **e["message"]} for e in entries
                    if not q.get("channel") or e["channel"] == q["channel"]]}
        if what == "responses":
            with store.lock:
                return {"ok": True, "responses": list(store.responses)}
        if what == "request_url" and self.command == "POST":
            with store.lock:
                store.record({"event": "request_url", "url": body.get("url")})
            return {"ok": True}
        if what == "click" and self.command == "POST":
            return self.clicker.click(body)
        raise LabError(404, f"no lab endpoint {self.command} /_lab/{what}")


def serve(port: int, secrets_file: Path, state_dir: Path, host: str = "127.0.0.1") -> None:
    """Run the stand-in until killed."""
    conf = json.loads(secrets_file.read_text())
    state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(state_dir, f"http://{host}:{port}")
    api = Api(store)
    Handler.api = api
    Handler.clicker = Clicker(store, api, conf["signing_secret"], conf["verification_token"])
    Handler.bot_token = conf["bot_token"]
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f"Slack stand-in listening on http://{host}:{port}/api/", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--secrets-file", type=Path, required=True,
                    help="JSON with bot_token, signing_secret, verification_token (mode 0600)")
    ap.add_argument("--state-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    serve(args.port, args.secrets_file, args.state_dir, args.host)


# ---- client side: used by the lab, tests and the demo ----


def _http(method: str, url: str, body: dict[str, Any] | None = None,
          timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class SlackLab:
    """Drive the stand-in's lab surface: read messages, set the Request URL, click buttons."""

    def __init__(self, url: str) -> None:
        base = url.rstrip("/")
        self.base = base[: -len("/api")] if base.endswith("/api") else base

    def _get(self, path: str) -> dict[str, Any]:
        status, body = _http("GET", f"{self.base}/_lab/{path}")
        if status != 200:
            raise RuntimeError(f"Slack stand-in: GET /_lab/{path} -> {status} {body}")
        return body

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        """All current messages (thread replies too), oldest first, each with its `channel`."""
        q = "?" + urllib.parse.urlencode({"channel": channel}) if channel else ""
        msgs: list[dict[str, Any]] = self._get("messages" + q)["messages"]
        return msgs

    def responses(self) -> list[dict[str, Any]]:
        """What was posted to response_urls: `{channel, message_ts, body, received_at}`."""
        out: list[dict[str, Any]] = self._get("responses")["responses"]
        return out

    def set_request_url(self, url: str) -> None:
        status, body = _http("POST", f"{self.base}/_lab/request_url", {"url": url})
        if status != 200:
            raise RuntimeError(f"Slack stand-in refused the Request URL: {body}")

    def click(self, ts: str, action_id: str, user_id: str, *, value: str | None = None,
              stale_by_s: int = 0, wrong_secret: bool = False) -> tuple[int, str]:
        """Click a button of message `ts` as `user_id`; returns the Request URL's status and body."""
        status, body = _http("POST", f"{self.base}/_lab/click", {
            "ts": ts, "action_id": action_id, "user_id": user_id, "value": value,
            "stale_by_s": stale_by_s, "wrong_secret": wrong_secret})
        if status == 502:
            raise ConnectionError(body.get("error"))
        if status != 200:
            raise LookupError(f"cannot click: {body.get('error')}")
        return int(body["status"]), str(body["body"])

    def wait_for_message(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                         channel: str | None = None) -> dict[str, Any]:
        """The first message `match` accepts, polling until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages(channel):
                if match(m):
                    return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching Slack message within {timeout:.0f} s")
            time.sleep(0.1)


def start_slack(lab_dir: Path, timeout: float = 10.0, host: str = "127.0.0.1") -> dict[str, Any]:
    """Start the stand-in detached on a free port with fresh secrets; state in lab_dir/slack."""
    # Imported here so the server process stays stdlib-only and quick to start.
    from lab import procs

    state_dir = lab_dir / "slack"
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    conf = {
        "bot_token": f"xoxb-{secrets.randbelow(10**12):012d}-{secrets.randbelow(10**13):013d}-"
                     f"{secrets.token_hex(12)}",
        "signing_secret": secrets.token_hex(16),
        "verification_token": secrets.token_hex(12),
    }
    secrets_file = state_dir / "secrets.json"
    secrets_file.touch(mode=0o600)
    secrets_file.chmod(0o600)
    secrets_file.write_text(json.dumps(conf))
    port = procs.free_port()
    log = lab_dir / "logs" / "slack.log"
    proc = procs.spawn([sys.executable, "-m", "lab.slack_standin", "--port", str(port), "--host", host,
                        "--secrets-file", str(secrets_file), "--state-dir", str(state_dir)], log,
                       cwd=Path(__file__).resolve().parent.parent)
    try:
        procs.wait_port(port, timeout, "Slack stand-in", proc, log, host=host)
    except BaseException:
        procs.stop_tree(proc.pid, timeout=2)
        raise
    return {"pid": proc.pid, "url": f"http://{host}:{port}/api/",
            "bot_token": conf["bot_token"], "signing_secret": conf["signing_secret"],
            "channel": CHANNEL_ID}


def health(info: dict[str, Any]) -> tuple[bool, str]:
    """(healthy, detail) for `lab status`: alive, the lab surface answers and the token works."""
    from lab import procs

    pid = info.get("pid")
    if pid and not procs.pid_alive(int(pid)):
        return False, f"pid {pid} is not running"
    if not info.get("url"):
        return False, "not started"
    lab = SlackLab(info["url"])
    try:
        status, h = _http("GET", f"{lab.base}/_lab/health", timeout=3)
        if info.get("bot_token"):
            req = urllib.request.Request(
                f"{lab.base}/api/auth.test", data=b"", method="POST",
                headers={"Authorization": f"Bearer {info['bot_token']}"})
            with urllib.request.urlopen(req, timeout=3) as resp:
                auth = json.loads(resp.read())
            if not auth.get("ok"):
                return False, f"auth.test with the lab's bot token failed: {auth.get('error')}"
    except (OSError, ValueError) as e:
        return False, f"{info['url']} does not answer: {e}"
    if status != 200:
        return False, f"{info['url']} answered {status}"
    detail = f"{info['url']}, {h['messages']} message(s)"
    detail += f", Request URL {h['request_url']}" if h.get("request_url") else ", no Request URL"
    return True, detail + (f", pid {pid}" if pid else "")


if __name__ == "__main__":
    main()
