"""A small stdlib-only client for etcd's v3 HTTP/JSON gateway (the agent stays light).

etcd 3.4 facts it relies on (Debian `etcd-server` 3.4.23, checked here):
- The gateway answers under `/v3/…`. Keys and values are base64; int64 fields (IDs, TTLs,
  revisions) come back as JSON strings; false and zero fields are left out (a failed txn has no
  "succeeded", an absent key no "kvs").
- `/v3/lease/keepalive` is a stream: one JSON request body gives one `{"result": …}` line. A
  lease that no longer exists is not an error there: the answer has no TTL.
- A lease's TTL is raised to at least 1.5 x the election timeout, rounded up to whole seconds.
- A member that becomes leader extends every lease by the election timeout past its full TTL.

Every call fails with EtcdError within the client's timeout per endpoint tried; with several
endpoints the client tries each in turn, starting with the last one that answered.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

API = "/v3"

# etcd is reached directly, never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Members that did not answer lately, for every client in this process: a member lost with its
# site costs one timeout, not one per client (five failovers starting together, the lease
# watcher, a boot check), until it answers again or SUSPECT_S passes.
SUSPECT_S = 5.0
_suspects: dict[str, float] = {}
_suspects_lock = threading.Lock()


def _suspect(endpoint: str, failed: bool) -> None:
    with _suspects_lock:
        if failed:
            _suspects[endpoint] = time.monotonic() + SUSPECT_S
        else:
            _suspects.pop(endpoint, None)


def _suspected(endpoint: str) -> bool:
    with _suspects_lock:
        until = _suspects.get(endpoint)
    return until is not None and time.monotonic() < until


class EtcdError(Exception):
    """etcd could not be reached or refused a request; the message says which and why."""


class EtcdRefused(EtcdError):
    """etcd answered, and refused the request (as opposed to not answering)."""


class EtcdLeaseNotFound(EtcdRefused):
    """etcd refused a request naming a lease it does not have (expired, or revoked)."""


# What etcd 3.4 answers (HTTP 404, gRPC NotFound) for a put, txn or revoke naming such a lease.
_LEASE_NOT_FOUND = "requested lease not found"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def parse(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(key=base64.b64decode(kv.get("key", "")).decode(),
                   value=base64.b64decode(kv.get("value", "")).decode(),
                   create_revision=int(kv.get("create_revision", 0)),
                   mod_revision=int(kv.get("mod_revision", 0)),
                   lease=int(kv.get("lease", 0)))


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return base64.b64encode(bytes(raw)).decode()
        raw.pop()
    return b64(b"\0")


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return str(e.reason)
    return str(e) or type(e).__name__


# --- txn building blocks (etcd's JSON shapes) ----------------------------------------------------

def absent(key: str) -> dict[str, Any]:
    """Compare: the key does not exist."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def value_is(key: str, value: str) -> dict[str, Any]:
    """Compare: the key exists with exactly this value."""
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def mod_revision_is(key: str, revision: int) -> dict[str, Any]:
    """Compare: the key was last written at this revision (0: it does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def put_op(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def range_op(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


class Client:
    """Requests to an etcd cluster through one or more members' client URLs."""

    def __init__(self, endpoints: str | Sequence[str], timeout: float = 2.0) -> None:
        eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not eps:
            raise ValueError("an etcd client needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in eps]
        self.timeout = timeout
        self._preferred = 0
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._preferred]

    def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """POST `body` to `/v3{path}`, trying each endpoint once; the first answer wins."""
        with self._lock:
            first = self._preferred
        rotated = self.endpoints[first:] + self.endpoints[:first]
        # Members that failed lately go last (still tried: they may be all there is).
        order = sorted(rotated, key=_suspected)
        problems: list[str] = []
        for ep in order:
            try:
                result = self._call_one(ep, path, body, timeout or self.timeout)
            except EtcdRefused:
                _suspect(ep, False)
                raise
            except EtcdError as e:
                _suspect(ep, True)
                problems.append(str(e))
                continue
            _suspect(ep, False)
            with self._lock:
                self._preferred = self.endpoints.index(ep)
            return result
        raise EtcdError("; ".join(problems))

    def _call_one(self, endpoint: str, path: str, body: dict[str, Any],
                  timeout: float) -> dict[str, Any]:
        req = urllib.request.Request(f"{endpoint}{API}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            answer: object
            try:
                answer = json.loads(e.read() or b"{}")
            except (ValueError, OSError):
                answer = None
            # Not etcd's own error object (a proxy's page, a list): the status is all we have.
            msg = (answer.get("message") if isinstance(answer, dict) else None) or f"HTTP {e.code}"
            # 5xx: this member cannot serve (no leader, stopping): another member may.
            cls = EtcdError if e.code >= 500 else (
                EtcdLeaseNotFound if _LEASE_NOT_FOUND in str(msg) else EtcdRefused)
            raise cls(f"etcd at {endpoint} refused {path}: {msg}") from None
        except (OSError, ValueError) as e:  # timeouts, refused connects, reset streams
            raise EtcdError(f"etcd at {endpoint} did not answer {path} within {timeout:g} s: "
                            f"{_reason(e)}") from None
        # Streaming calls (keepalive) answer one {"result": …} or {"error": …} object per line.
        try:
            first = json.loads(raw.splitlines()[0] if raw.strip() else b"{}")
        except ValueError:
            raise EtcdError(f"etcd at {endpoint} answered {path} with something not JSON") from None
        if not isinstance(first, dict):
            raise EtcdError(f"etcd at {endpoint} answered {path} with JSON that is no object")
        if "error" in first:
            err = first["error"]
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise EtcdError(f"etcd at {endpoint} could not serve {path}: {msg}")
        return dict(first.get("result", first))

    # -- keys -------------------------------------------------------------------------------------

    def put(self, key: str, value: str, lease: int = 0) -> int:
        """Write key=value (bound to a lease when given); returns the new revision."""
        return int(self.call("/kv/put", put_op(key, value, lease)["request_put"])
                   ["header"]["revision"])

    def get_kv(self, key: str, serializable: bool = False) -> KeyValue | None:
        """The key with its revisions and lease, or None. Linearizable unless `serializable`."""
        body: dict[str, Any] = {"key": b64(key)}
        if serializable:
            body["serializable"] = True
        kvs = self.call("/kv/range", body).get("kvs") or []
        return KeyValue.parse(kvs[0]) if kvs else None

    def get(self, key: str, serializable: bool = False) -> str | None:
        kv = self.get_kv(key, serializable)
        return kv.value if kv is not None else None

    def get_prefix(self, prefix: str, serializable: bool = False) -> tuple[int, list[KeyValue]]:
        """(the store's revision, every key under `prefix`), in one request."""
        body: dict[str, Any] = {"key": b64(prefix), "range_end": _prefix_end(prefix)}
        if serializable:
            body["serializable"] = True
        r = self.call("/kv/range", body)
        return (int(r.get("header", {}).get("revision", 0)),
                [KeyValue.parse(kv) for kv in r.get("kvs") or []])

    def delete(self, key: str) -> int:
        """Delete the key; returns how many keys were deleted (0 or 1)."""
        return int(self.call("/kv/deleterange", {"key": b64(key)}).get("deleted", 0))

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, list[dict[str, Any]]]:
        """One atomic transaction: (succeeded, the responses of the branch taken)."""
        body: dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            body["failure"] = failure
        r = self.call("/kv/txn", body)
        return bool(r.get("succeeded", False)), list(r.get("responses") or [])

    def txn_create_if_absent(self, key: str, value: str, lease: int = 0) -> bool:
        """Create the key only if it does not exist; True when created."""
        ok, _ = self.txn([absent(key)], [put_op(key, value, lease)])
        return ok

    def watch(self, prefix: str, start_revision: int,
              idle_s: float = 2.0) -> Iterator[tuple[int, list[tuple[str, KeyValue]]]]:
        """Changes under `prefix` from `start_revision` on, as they happen: (revision seen,
        [("PUT"|"DELETE", kv), …]) per message. Ends quietly when nothing arrives for `idle_s`
        (a member lost with its site sends nothing, not an error): watch again from the last
        revision seen + 1. Raises EtcdError when no member takes the watch or it is cancelled
        (the revision was compacted: read the prefix again)."""
        body = {"create_request": {"key": b64(prefix), "range_end": _prefix_end(prefix),
                                   "start_revision": str(start_revision)}}
        resp = None
        problems = []
        for ep in sorted(self.endpoints, key=_suspected):
            req = urllib.request.Request(f"{ep}{API}/watch", data=json.dumps(body).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                resp = _OPENER.open(req, timeout=idle_s)
                break
            except (OSError, ValueError) as e:
                _suspect(ep, True)
                problems.append(f"etcd at {ep} did not take a watch: {_reason(e)}")
        if resp is None:
            raise EtcdError("; ".join(problems))
        with resp:
            while True:
                try:
                    line = resp.readline()
                except (OSError, ValueError):  # quiet for idle_s (or the member went away)
                    return
                if not line:
                    return
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise EtcdError("etcd answered a watch with something not JSON") from None
                result = msg.get("result") or {}
                if "error" in msg or result.get("canceled"):
                    why = msg.get("error") or result.get("cancel_reason") or "compacted"
                    raise EtcdError(f"etcd cancelled the watch of {prefix}: {why}")
                revision = int(result.get("header", {}).get("revision", 0))
                events = [(str(ev.get("type", "PUT")), KeyValue.parse(ev.get("kv") or {}))
                          for ev in result.get("events") or []]
                yield revision, events

    # -- leases -----------------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, TTL etcd granted, which may be more than asked)."""
        r = self.call("/lease/grant", {"TTL": str(ttl)})
        if r.get("error"):
            raise EtcdRefused(f"etcd at {self.endpoint} refused a lease of {ttl} s: {r['error']}")
        return int(r["ID"]), int(r["TTL"])

    def keepalive(self, lease: int, timeout: float | None = None) -> int:
        """Renew a lease; returns its TTL again, 0 when the lease no longer exists."""
        return int(self.call("/lease/keepalive", {"ID": str(lease)}, timeout).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End a lease now: the keys bound to it are deleted."""
        self.call("/lease/revoke", {"ID": str(lease)})

    # -- cluster ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The preferred member's view: header.member_id, leader, raftTerm…"""
        return self.call("/maintenance/status", {})

    def move_leader(self, target_member_id: int) -> None:
        """Hand leadership to another member (must be sent to the current leader)."""
        self.call("/maintenance/transfer-leadership", {"targetID": str(target_member_id)})
