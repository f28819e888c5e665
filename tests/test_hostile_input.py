"""Hostile input against the real guest agents of a lab (the control API).

Each test is an attack from the issue's findings, made by someone who holds what a compromised
VM holds; each refusal is the documented 4xx and nothing changes: no command runs, the
configuration still parses, the primary keeps serving, the password reaches no stranger, another
agent's request is refused, a promote beside a writable primary is refused, and no malformed
request goes unanswered. The gateway's half is in test_hostile_gateway.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from pydantic import SecretStr

from drflow.control import ControlClient
from drflow.signing import control_secret, sign_control_headers
from lab import postgres as lp
from lab.procs import free_port
from tests.conftest import new_lab_dir
from tests.harness import wait_for

pytestmark = pytest.mark.lab

GROUP = "orders"


@dataclass
class Lab:
    dir: Path
    state: dict[str, Any]

    @property
    def prod(self) -> dict[str, Any]:
        return dict(self.state["groups"][0]["primary"])

    @property
    def dr(self) -> dict[str, Any]:
        return dict(self.state["groups"][0]["standby"])

    def inst(self, node: dict[str, Any]) -> lp.Instance:
        role = "primary" if node["vm"] == self.prod["vm"] else "standby"
        return lp.Instance.from_dict(self.state["postgres"][self.state["groups"][0]["name"]][role])

    def conn(self, node: dict[str, Any]) -> psycopg.Connection[Any]:
        db = self.state["database"]
        return psycopg.connect(host=node["host"], port=node["port"], user=db["user"],
                               password=db["password"], dbname=db["name"], connect_timeout=3,
                               autocommit=True)

    def agent_log(self, node: dict[str, Any]) -> str:
        return (self.dir / "logs" / f"agent-{node['vm']}.log").read_text(errors="replace")

    # The orchestrator's side of the protocol: the master secret, one derived secret per agent.
    def client(self, node: dict[str, Any]) -> ControlClient:
        return ControlClient.for_agent(node["agent_url"],
                                       SecretStr(self.state["secrets"]["control"]), node["vm"],
                                       timeout_s=120)

    def sign(self, node: dict[str, Any], verb: str, body: bytes) -> dict[str, str]:
        """Headers a holder of `node`'s own secret would send to `node` for `verb`."""
        own = control_secret(self.state["secrets"]["control"].encode(), node["vm"])
        return sign_control_headers(own, node["vm"], verb, body)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    from lab import manager

    d = new_lab_dir("drflow-hostile-")
    state = manager.up(d, groups=1, replication="sync", progress=lambda _m: None)
    try:
        lab = Lab(d, state)
        for node in (lab.prod, lab.dr):
            wait_for(_answering(lab, node), 30, f"agent of {node['vm']}")
        yield lab
    finally:
        manager.down(d, progress=lambda _m: None)


def _answering(lab: Lab, node: dict[str, Any]) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return bool(lab.client(node).call("status")["running"])
        except Exception:
            return False
    return probe


def _request(verb: str, **args: Any) -> bytes:
    return json.dumps({"verb": verb, "args": args, "nonce": str(uuid.uuid4())}).encode()


def _send(lab: Lab, node: dict[str, Any], body: bytes,
          headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    status, _h, answer = lab.client(node).post(body, headers)
    return status, json.loads(answer)


def _verb(lab: Lab, node: dict[str, Any], verb: str, **args: Any) -> tuple[int, dict[str, Any]]:
    body = _request(verb, **args)
    return _send(lab, node, body, lab.sign(node, verb, body))


def _snapshot(lab: Lab) -> dict[str, Any]:
    """What must not change: who is primary, the postmasters, where the standby streams from."""
    out: dict[str, Any] = {}
    for name, node in (("prod", lab.prod), ("dr", lab.dr)):
        inst = lab.inst(node)
        out[name] = (lp.role(inst), lp._postmaster_pid(inst))
    with lab.conn(lab.dr) as c:
        out["dr_receiver"] = c.execute(
            "SELECT status, sender_port FROM pg_stat_wal_receiver").fetchone()
    return out


def _writable(lab: Lab, node: dict[str, Any]) -> bool:
    with lab.conn(node) as c:
        c.execute("SET statement_timeout = '5s'")
        c.execute("CREATE TABLE IF NOT EXISTS hostile_probe (at timestamptz)")
        c.execute("INSERT INTO hostile_probe VALUES (now())")
    return True


def test_no_host_can_inject_settings_or_commands(lab: Lab) -> None:
    dr, prod = lab.dr, lab.prod
    before = _snapshot(lab)
    datadir = lab.inst(dr).datadir
    # No "/" in it: ipaddress refuses that even in a scope id. The command runs in the datadir.
    name = f"drflow-hostile-{uuid.uuid4().hex}"
    marker = datadir / name
    injected = f"::1%x'\nrestore_command = 'id >{name}'\n#"
    hosts = [injected, "localhost\n", f"{prod['host']}\n", "::1%eth0", "::1%x'", "fe80::1%lo",
             f"{prod['host']} port=1", "-oX", "", "h" * 300, "exa mple.com", "ex\x00ample"]
    answers = []
    for host in hosts:
        answers.append(("attach_to", host, *_verb(lab, dr, "attach_to", primary_host=host,
                                                  primary_port=prod["port"])))
        answers.append(("rewind_to", host, *_verb(lab, dr, "rewind_to", source_host=host,
                                                  source_port=prod["port"])))
    time.sleep(3)  # time enough for a reloaded standby to fall back to a restore_command

    assert not marker.exists(), f"the injected restore_command ran: {marker.read_text()!r}"
    for verb, host, status, answer in answers:
        assert status == 400, (verb, host, status, answer)
        assert answer["ok"] is False and f"bad arguments for {verb}" in answer["error"]
    # The configuration still parses (PostgreSQL's own reading of it), with nothing injected.
    shown = subprocess.run(
        ["runuser", "-u", "postgres", "--", lp.pg_bin("postgres"), "-D", str(datadir), "-C",
         "restore_command"], capture_output=True, text=True, timeout=30, cwd="/")
    assert shown.returncode == 0 and shown.stdout.strip() == "", shown
    assert "restore_command" not in (datadir / "postgresql.auto.conf").read_text()
    assert _snapshot(lab) == before

    # An honest attach_to afterwards: accepted, and still no injected line.
    assert lab.client(dr).call("attach_to", primary_host=prod["host"],
                               primary_port=prod["port"])["action"] == "none"
    assert "restore_command" not in (datadir / "postgresql.auto.conf").read_text()
    assert not marker.exists()


def test_rewind_to_itself_never_stops_the_primary(lab: Lab) -> None:
    prod = lab.prod
    before = _snapshot(lab)
    spellings = ["127.1", "0x7f000001", "2130706433", "localhost", "127.0.0.1",
                 "::ffff:127.0.0.1", "127.000.000.001"]
    for host in spellings:
        status, answer = _verb(lab, prod, "rewind_to", source_host=host,
                               source_port=prod["port"])
        assert lp.role(lab.inst(prod)) == "primary", f"{host}: the primary was stopped"
        assert status in (400, 409), (host, status, answer)
        assert "nothing was changed" in answer["error"] or status == 400, (host, answer)
        assert _writable(lab, prod)
    assert _snapshot(lab) == before


class FakePostgres:
    """A listener that speaks just enough of PostgreSQL's protocol to be sent a password."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received = bytearray()
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        while True:
            head = conn.recv(8)
            self.received += head
            if len(head) < 8:
                return
            length, code = struct.unpack("!ii", head)
            if code == 80877103 or code == 80877104:  # SSL or GSS request: not here
                conn.sendall(b"N")
                continue
            self.received += conn.recv(length - 8)
            break
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        while chunk := conn.recv(4096):
            self.received += chunk

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def test_the_database_password_goes_to_no_stranger(lab: Lab) -> None:
    dr, prod = lab.dr, lab.prod
    before = _snapshot(lab)
    password = lab.state["database"]["password"].encode()
    fake = FakePostgres()
    try:
        answers = []
        for host in ("127.0.0.1", "localhost", "127.0.0.2"):
            for node in (dr, prod):
                answers.append(_verb(lab, node, "rewind_to", source_host=host,
                                     source_port=fake.port))
                answers.append(_verb(lab, node, "attach_to", primary_host=host,
                                     primary_port=fake.port))
        time.sleep(0.5)
    finally:
        fake.close()
    assert password not in bytes(fake.received), "the database password reached the listener"
    assert fake.connections == 0, f"{fake.connections} connection(s) to a host outside the group"
    for status, answer in answers:
        assert status == 409 and "not a node of this group" in answer["error"], (status, answer)
    assert _snapshot(lab) == before


def test_a_request_for_one_agent_is_refused_by_another(lab: Lab) -> None:
    dr, prod = lab.dr, lab.prod
    before = _snapshot(lab)
    # Captured on its way to prod (never delivered there, so its nonce is unspent)...
    body = _request("promote", relax_sync=True)
    captured = lab.sign(prod, "promote", body)
    status, answer = _send(lab, dr, body, captured)
    assert status == 401 and "not authenticated" in answer["error"], (status, answer)

    # ... a compromised prod VM signing for dr with its own secret ...
    own_prod = control_secret(lab.state["secrets"]["control"].encode(), prod["vm"])
    body = _request("promote", relax_sync=True)
    status, answer = _send(lab, dr, body, sign_control_headers(own_prod, dr["vm"], "promote",
                                                               body))
    assert status == 401, (status, answer)

    # ... the master secret used as the agent's own, and a signature made for another verb.
    master = lab.state["secrets"]["control"].encode()
    body = _request("promote", relax_sync=True)
    assert _send(lab, dr, body, sign_control_headers(master, dr["vm"], "promote", body))[0] == 401
    body = _request("promote", relax_sync=True)
    assert _send(lab, dr, body, lab.sign(dr, "status", body))[0] == 401

    assert _snapshot(lab) == before
    assert lp.role(lab.inst(dr)) == "standby"


def test_promote_is_refused_while_the_other_node_is_a_writable_primary(lab: Lab) -> None:
    dr, prod = lab.dr, lab.prod
    before = _snapshot(lab)
    results = []
    for _ in range(3):
        results.append(_verb(lab, dr, "promote", relax_sync=True))
    for status, answer in results:
        assert status == 409, (status, answer)
        assert "writable primary" in answer["error"] and "fence_proof" in answer["error"]
    assert lp.role(lab.inst(dr)) == "standby" and _writable(lab, prod)
    assert _snapshot(lab) == before
    assert "promote refused" in lab.agent_log(dr)
    # A fence proof of the wrong shape is a bad request, not a promotion.
    status, answer = _verb(lab, dr, "promote", fence_proof={"kind": "trust me"})
    assert status == 400, (status, answer)
    assert _snapshot(lab) == before


def _raw(node: dict[str, Any], data: bytes) -> bytes:
    """Send raw bytes to the agent's control port; whatever comes back within 10 s."""
    url = urlsplit(node["agent_url"])
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    return bytes(out)


def test_every_malformed_request_gets_a_4xx(lab: Lab) -> None:
    dr = lab.dr
    before = _snapshot(lab)
    tracebacks = lab.agent_log(dr).count("Traceback")

    def request(body: bytes, headers: dict[str, str] | None = None,
                raw_headers: bytes = b"") -> bytes:
        hdrs = lab.sign(dr, "status", body) if headers is None else headers
        lines = [b"POST /v1/control HTTP/1.1", b"Host: agent",
                 b"Content-Type: application/json"]
        lines += [f"{k}: {v}".encode() for k, v in hdrs.items()]
        if b"Content-Length" not in raw_headers and b"Transfer-Encoding" not in raw_headers:
            lines.append(f"Content-Length: {len(body)}".encode())
        if raw_headers:
            lines.append(raw_headers)
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    good = _request("status")
    deep = b'{"verb": "status", "args": ' + b"[" * 2000 + b"]" * 2000 + b', "nonce": "x"}'
    not_utf8 = b'{"verb": "status\xff\xfe", "args": {}, "nonce": "' + str(uuid.uuid4()).encode() + b'"}'
    cases = {
        "non-ASCII byte in the signature": request(good, headers={}, raw_headers=(
            b"X-Drflow-Timestamp: " + str(int(time.time())).encode()
            + b"\r\nX-Drflow-Signature: sha256=\xff" + b"0" * 63)),
        "non-ASCII timestamp": request(good, headers={}, raw_headers=(
            "X-Drflow-Timestamp: \u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660".encode()
            + b"\r\nX-Drflow-Signature: sha256=" + b"0" * 64)),
        "Content-Length of superscript two (latin-1)": request(good, raw_headers=(
            b"Content-Length: \xb2")),
        "Content-Length of superscript two (UTF-8)": request(good, raw_headers=(
            "Content-Length: ²".encode())),
        "Content-Length 1_0": request(good, raw_headers=b"Content-Length: 1_0"),
        "two Content-Lengths": request(good, raw_headers=(
            f"Content-Length: {len(good)}\r\nContent-Length: 5".encode())),
        "chunked": request(b"5\r\nhello\r\n0\r\n\r\n", raw_headers=b"Transfer-Encoding: chunked"),
        "body nested 2,000 deep": request(deep),
        "body nested 2,000 deep, unsigned": request(deep, headers={}),
        "body not UTF-8": request(not_utf8),
        "duplicate keys": request(b'{"verb": "status", "verb": "promote", "args": {}, '
                                  b'"nonce": "' + str(uuid.uuid4()).encode() + b'"}'),
        "NaN": request(b'{"verb": "status", "args": {"x": NaN}, "nonce": "'
                       + str(uuid.uuid4()).encode() + b'"}'),
        "not an object": request(b"[1, 2, 3]"),
        "a verb of 60 KB": request(b'{"verb": "' + b"x" * 60_000 + b'", "args": {}, "nonce": "'
                                   + str(uuid.uuid4()).encode() + b'"}'),
    }
    for what, data in cases.items():
        answer = _raw(dr, data)
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1."), (what, answer[:200])
        code = int(status_line.split()[1])
        assert 400 <= code < 500, (what, status_line)
        assert len(answer) < 2048, (what, "the answer echoes the input", len(answer))
    time.sleep(0.5)
    log = lab.agent_log(dr)
    assert log.count("Traceback") == tracebacks, log[-3000:]
    assert lab.client(dr).call("status")["role"] == "standby"  # the agent still serves
    assert _snapshot(lab) == before
