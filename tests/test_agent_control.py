"""The agent's control API driving a real PostgreSQL pair of the lab (tests run in file order)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from agents.control_api import ControlServer, serve
from agents.drivers.postgres import PostgresDriver
from drflow.control import ControlClient, ControlError
from drflow.signing import control_secret, sign_control_headers
from lab import postgres as lp
from lab.procs import free_port
from tests.conftest import new_lab_dir

pytestmark = pytest.mark.lab

SECRET = SecretStr("control-test-" + uuid.uuid4().hex)  # the master, as the orchestrator holds it
LOCAL = "127.0.0.1"


# These tests make split brains on purpose; the agent refuses a promote beside a writable
# primary unless the orchestrator proves a fence.
SPLIT_BRAIN = {"kind": "operator_attested", "evidence": "test: split brain on purpose"}


def own_secret(agent_id: str) -> SecretStr:
    """What the agent's config holds: its secret derived from the master."""
    return SecretStr(control_secret(SECRET.get_secret_value().encode(), agent_id).decode())


@dataclass
class Node:
    inst: lp.Instance
    driver: PostgresDriver
    server: ControlServer
    client: ControlClient


@dataclass
class Pair:
    base: Path
    user: str
    password: str
    prod: Node
    dr: Node

    def conn(self, node: Node | lp.Instance) -> psycopg.Connection[Any]:
        inst = node.inst if isinstance(node, Node) else node
        return psycopg.connect(lp.conninfo(inst, self.user, self.password), autocommit=True)

    def driver_for(self, inst: lp.Instance, **kw: Any) -> PostgresDriver:
        peers = [(LOCAL, n.inst.port) for n in (self.prod, self.dr)]
        return PostgresDriver(datadir=inst.datadir, port=inst.port, host=LOCAL, user=self.user,
                              password=SecretStr(self.password), log_path=inst.log,
                              socket_dir=inst.socket_dir, peers=peers, **kw)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    base = new_lab_dir("drflow-ctl-")
    prod, dr = lp.create_pair(base, "ctl", sync=True)
    user, password = lp.client_credentials(base)
    nodes: list[Node] = []
    try:
        for inst, other in ((prod, dr), (dr, prod)):
            drv = PostgresDriver(datadir=inst.datadir, port=inst.port, host=LOCAL, user=user,
                                 password=SecretStr(password), log_path=inst.log,
                                 socket_dir=inst.socket_dir, peers=[(LOCAL, other.port)])
            srv = serve(f"{LOCAL}:0", own_secret(inst.name), drv, agent_id=inst.name,
                        nonce_db=base / f"{inst.name}-nonces.db")
            nodes.append(Node(inst, drv, srv, ControlClient.for_agent(srv.url, SECRET, inst.name,
                                                                      timeout_s=120)))
        with psycopg.connect(lp.conninfo(prod, user, password), autocommit=True) as c:
            c.execute("CREATE TABLE marker (id serial PRIMARY KEY, note text)")
        yield Pair(base, user, password, nodes[0], nodes[1])
    finally:
        for n in nodes:
            n.server.stop()
        for inst in (prod, dr):
            lp.destroy(inst)
        shutil.rmtree(base, ignore_errors=True)


def _mark(p: Pair, node: Node, note: str) -> None:
    with p.conn(node) as c:
        c.execute("SET statement_timeout = '5s'")  # a write stuck on a missing sync standby fails
        c.execute("INSERT INTO marker(note) VALUES (%s)", (note,))


def _notes(p: Pair, node: Node | lp.Instance) -> list[str]:
    with p.conn(node) as c:
        return [r[0] for r in c.execute("SELECT note FROM marker ORDER BY id").fetchall()]


def _wait_note(p: Pair, node: Node | lp.Instance, note: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while note not in _notes(p, node):
        assert time.monotonic() < deadline, f"{note!r} never reached {node}"
        time.sleep(0.05)


def _post(node: Node, payload: dict[str, Any], *, secret: str | None = None,
          ts: float | None = None, headers: dict[str, str] | None = None
          ) -> tuple[int, dict[str, Any], bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    if headers is None:
        key = (secret or own_secret(node.inst.name).get_secret_value()).encode()
        headers = sign_control_headers(key, node.inst.name, str(payload.get("verb")), body,
                                       now=ts)
    status, _resp_headers, answer = node.client.post(body, headers)
    return status, json.loads(answer), body, headers


def _request(verb: str, **args: Any) -> dict[str, Any]:
    return {"verb": verb, "args": args, "nonce": str(uuid.uuid4())}


def test_refused_requests_change_nothing(pair: Pair) -> None:
    dr = pair.dr
    before = dr.driver.status()
    assert before["role"] == "standby" and before["receiver"] == "streaming"

    promote = _request("promote", relax_sync=True)
    refusals = [
        ("unsigned", _post(dr, promote, headers={}), 401),
        ("wrong secret", _post(dr, promote, secret="guess"), 401),
        ("old timestamp", _post(dr, _request("promote"), ts=time.time() - 301), 401),
        ("future timestamp", _post(dr, _request("promote"), ts=time.time() + 301), 401),
        ("unknown verb", _post(dr, _request("exec", cmd="rm -rf /")), 400),
        ("extra argument", _post(dr, _request("promote", command="touch /x")), 400),
        ("wrong type", _post(dr, _request("promote", relax_sync="yes")), 400),
        ("host injection", _post(dr, _request("rewind_to", source_host="127.0.0.1 port=1",
                                              source_port=1)), 400),
        ("option injection", _post(dr, _request("attach_to", primary_host="-oX",
                                                primary_port=5432)), 400),
        ("port as text", _post(dr, _request("attach_to", primary_host="127.0.0.1",
                                            primary_port="5432")), 400),
        ("bad stop mode", _post(dr, _request("stop", mode="now; reboot")), 400),
        ("no nonce", _post(dr, {"verb": "promote", "args": {}}), 400),
    ]
    for what, (status, answer, _body, _hdrs), expected in refusals:
        assert status == expected, (what, status, answer)
        assert answer["ok"] is False and answer["error"], what

    # Replays: the same bytes again, and a new request that reuses a spent nonce.
    status, answer, body, headers = _post(dr, _request("status"))
    assert status == 200 and answer["result"]["role"] == "standby"
    replay_status, _h, replay_answer = dr.client.post(body, headers)
    assert replay_status == 401 and "already used" in json.loads(replay_answer)["error"]
    reused = {**_request("promote", relax_sync=True), "nonce": json.loads(body)["nonce"]}
    status, answer, _b, _h2 = _post(dr, reused)
    assert status == 401 and "already used" in answer["error"]

    # A restarted agent still knows the nonces of the window.
    dr.server.stop()
    dr.server = serve(f"{LOCAL}:0", own_secret(dr.inst.name), dr.driver, agent_id=dr.inst.name,
                      nonce_db=pair.base / f"{dr.inst.name}-nonces.db")
    dr.client = ControlClient.for_agent(dr.server.url, SECRET, dr.inst.name, timeout_s=120)
    replay_status, _h, replay_answer = dr.client.post(body, headers)
    assert replay_status == 401 and "already used" in json.loads(replay_answer)["error"]

    # A forged request does not even spend its nonce: the genuine one with it still works.
    forged = _request("status")
    assert _post(dr, forged, secret="guess")[0] == 401
    assert _post(dr, forged)[0] == 200

    with pytest.raises(ControlError) as err:
        ControlClient.for_agent(dr.server.url, SecretStr("guess"), dr.inst.name).call("promote")
    assert err.value.status == 401

    # Nothing changed: still a standby streaming from prod, and it still follows prod's writes.
    after = dr.driver.status()
    assert after["role"] == "standby" and after["upstream"] == f"{LOCAL}:{pair.prod.inst.port}"
    assert after["receiver"] == "streaming" and not after["held_down"]
    assert lp.role(pair.prod.inst) == "primary"
    _mark(pair, pair.prod, "after-refusals")
    _wait_note(pair, dr, "after-refusals")


def test_status_verb_reports_roles(pair: Pair) -> None:
    prod = pair.prod.client.call("status")
    dr = pair.dr.client.call("status")
    assert prod["role"] == "primary" and prod["running"]
    assert [r["application_name"] for r in prod["replicas"]] == ["ctl-dr"]
    assert prod["replicas"][0]["sync_state"] == "sync"
    assert dr["role"] == "standby" and dr["sync_state"] == "sync"
    assert dr["upstream"] == f"{LOCAL}:{pair.prod.inst.port}"
    assert dr["replay_lag_bytes"] is not None and dr["replay_lag_s"] is not None


def test_promote_makes_the_standby_writable(pair: Pair) -> None:
    dr = pair.dr
    with pair.conn(dr) as c, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        c.execute("INSERT INTO marker(note) VALUES ('on a standby')")
    with pytest.raises(ControlError) as err:  # prod still answers as a writable primary
        dr.client.call("promote", relax_sync=True)
    assert err.value.status == 409 and "writable primary" in err.value.message
    assert lp.role(dr.inst) == "standby"
    result = dr.client.call("promote", relax_sync=True, fence_proof=SPLIT_BRAIN)
    assert result["action"] == "promoted" and result["sync_relaxed"] is True
    assert result["fence_proof"] == "operator_attested"
    assert result["synchronous_standby_names"] == ""
    assert lp.role(dr.inst) == "primary"
    _mark(pair, dr, "written on the new primary")
    again = dr.client.call("promote")
    assert again["action"] == "none" and again["reason"] == "already primary"


def test_rewind_turns_the_diverged_old_primary_into_a_standby(pair: Pair) -> None:
    prod, dr = pair.prod, pair.dr
    assert lp.role(prod.inst) == "primary"  # split brain: prod never learnt of the promotion
    with pair.conn(prod) as c:
        c.execute("SET synchronous_commit = local")  # its sync standby is gone
        c.execute("INSERT INTO marker(note) VALUES ('lost: never reached dr')")
    result = prod.client.call("rewind_to", source_host=LOCAL, source_port=dr.inst.port)
    print("rewind_to:", result)
    assert result["method"] == "pg_rewind" and result["action"] == "rewound"
    assert result["streaming"] is True
    assert lp.role(prod.inst) == "standby"
    notes = _notes(pair, prod)
    assert "written on the new primary" in notes
    assert "lost: never reached dr" not in notes
    _mark(pair, dr, "after rewind")
    _wait_note(pair, prod, "after rewind")
    with pair.conn(prod) as c:  # its own settings survived the rewind (port, cluster_name)
        assert c.execute("SHOW cluster_name").fetchone() == ("ctl-prod",)
    status = dr.client.call("status")
    assert [(r["application_name"], r["state"]) for r in status["replicas"]] == [
        ("ctl-prod", "streaming")]
    again = prod.client.call("rewind_to", source_host=LOCAL, source_port=dr.inst.port)
    assert again["action"] == "none"


def test_rewind_impossible_falls_back_to_base_backup(pair: Pair) -> None:
    prod, dr = pair.prod, pair.dr
    # Fail back the other way: prod is promoted, dr (still a primary) takes a write, crashes,
    # and its WAL is gone, so pg_rewind cannot work out what to undo.
    assert prod.client.call("promote", relax_sync=True,
                            fence_proof=SPLIT_BRAIN)["action"] == "promoted"
    _mark(pair, prod, "written on prod again")
    with pair.conn(dr) as c:
        c.execute("INSERT INTO marker(note) VALUES ('lost on dr')")
    lp.kill_hard(dr.inst)
    assert dr.inst.pidfile.exists()
    for seg in (dr.inst.datadir / "pg_wal").iterdir():
        if seg.is_file():
            seg.unlink()
    result = dr.client.call("rewind_to", source_host=LOCAL, source_port=prod.inst.port)
    print("rewind_to with fallback:", result)
    assert result["method"] == "pg_basebackup" and result["action"] == "rebuilt"
    assert "pg_rewind failed" in result["reason"]
    assert result["streaming"] is True
    assert lp.role(dr.inst) == "standby"
    assert "lost on dr" not in _notes(pair, dr)
    _mark(pair, prod, "after base backup")
    _wait_note(pair, dr, "after base backup")
    with pair.conn(dr) as c:
        assert c.execute("SHOW cluster_name").fetchone() == ("ctl-dr",)
    assert not list(dr.inst.datadir.parent.glob("*.drflow-*"))


def test_start_after_kill_and_stop_holds_down(pair: Pair) -> None:
    dr = pair.dr
    lp.kill_hard(dr.inst)
    assert dr.inst.pidfile.exists()
    started = dr.client.call("start")
    assert started["action"] == "started" and started["removed_stale_pidfile"] is True
    assert started["role"] == "standby"
    stopped = dr.client.call("stop")
    assert stopped["action"] == "stopped" and dr.driver.held_down
    assert not lp.is_running(dr.inst)
    assert dr.client.call("stop")["action"] == "none"
    assert dr.client.call("start")["action"] == "started" and not dr.driver.held_down
    assert dr.client.call("start")["action"] == "none"
    assert dr.driver._wait_streaming(LOCAL, pair.prod.inst.port, 15)


def test_attach_to_points_a_standby_at_another_upstream(pair: Pair) -> None:
    prod, dr = pair.prod, pair.dr
    with pytest.raises(ControlError) as err:
        prod.client.call("attach_to", primary_host=LOCAL, primary_port=dr.inst.port)
    assert err.value.status == 409 and "primary" in err.value.message
    assert dr.client.call("attach_to", primary_host=LOCAL,
                          primary_port=prod.inst.port)["action"] == "none"

    # A third instance, built from nothing by rewind_to (a fresh base backup) ...
    home = prod.inst.datadir.parent.parent / "third"
    home.mkdir(mode=0o700)
    shutil.chown(home, "postgres", "postgres")
    third = lp.Instance(name="ctl-third", datadir=home / "data", port=free_port(),
                        log=home / "server.log")
    lp.write_instance_conf(third)
    drv = pair.driver_for(third)
    try:
        built = drv.rewind_to(LOCAL, prod.inst.port)
        assert built["method"] == "pg_basebackup" and built["streaming"]
        # ... is moved to cascade from dr while running, then back to prod while stopped.
        moved = drv.attach_to(LOCAL, dr.inst.port)
        assert moved["action"] == "attached" and moved["streaming"]
        assert drv.status()["upstream"] == f"{LOCAL}:{dr.inst.port}"
        _mark(pair, prod, "via dr")
        _wait_note(pair, third, "via dr")
        drv.stop()
        back = drv.attach_to(LOCAL, prod.inst.port)
        assert back["streaming"] and drv.status()["upstream"] == f"{LOCAL}:{prod.inst.port}"
        replicas = {r["application_name"]: r["state"] for r in prod.driver.status()["replicas"]}
        assert replicas == {"ctl-dr": "streaming", "ctl-third": "streaming"}
    finally:
        lp.destroy(third)


def test_each_agent_has_its_own_secret_and_peers_are_validated(tmp_path: Path) -> None:
    import hashlib
    import hmac

    from agents.config import ConfigError, parse_config

    master = b"master"
    assert control_secret(master, "orders-prod") == hmac.new(
        master, b"orders-prod", hashlib.sha256).hexdigest().encode()
    assert control_secret(master, "orders-prod") != control_secret(master, "orders-dr")

    def config(peers: list[str]) -> str:
        return ("agent_id: a\ngroup: g\n"
                "gateway: {url: 'http://127.0.0.1:1/v1/events', webhook_secret: {ref: 'env:X'}}\n"
                "control: {listen: '127.0.0.1:9101', secret: {ref: 'env:Y'}, peers: "
                + json.dumps(peers) + "}\n"
                "resources: [{name: pg, type: postgres, datadir: /tmp/x}]\n")

    cfg = parse_config(config(["10.0.0.2:5432", "[::1]:5433", "db-2.example.net:5432"]),
                       tmp_path)
    assert cfg.control is not None
    assert cfg.control.peer_addresses() == [("10.0.0.2", 5432), ("::1", 5433),
                                            ("db-2.example.net", 5432)]
    for bad in ("db\n:5432", "::1%eth0:5432", "[fe80::1%lo]:5432", "db:0", "db", "db:5432 x",
                "db:²"):
        with pytest.raises(ConfigError, match="peers"):
            parse_config(config([bad]), tmp_path)


def test_discover_writes_the_agents_own_secret_and_its_peers(pair: Pair, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    master_file = tmp_path / "master"
    master_file.write_text(SECRET.get_secret_value())
    out = tmp_path / "agent.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "agent", "discover", "--datadir",
         str(pair.dr.inst.datadir), "--agent-id", "ctl-dr", "--control-listen", "127.0.0.1:9101",
         "--control-master-ref", f"file:{master_file}", "--peer", f"{LOCAL}:{pair.prod.inst.port}",
         "--write", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(out.read_text())
    secret_file = tmp_path / "control_secret"
    assert cfg["control"]["secret"] == {"ref": f"file:{secret_file}"}
    assert cfg["control"]["peers"] == [f"{LOCAL}:{pair.prod.inst.port}"]
    assert secret_file.read_text() == own_secret("ctl-dr").get_secret_value()
    assert os.stat(secret_file).st_mode & 0o777 == 0o600
    assert SECRET.get_secret_value() not in out.read_text() + secret_file.read_text()


def test_configuration_literals_are_quoted_as_postgresql_quotes_them() -> None:
    from agents.drivers.postgres import conf_literal

    assert conf_literal("host=a port=1") == "'host=a port=1'"
    assert conf_literal("pass='x\\y'") == "'pass=''x\\\\y'''"
    for bad in ("a\nrestore_command = 'id'", "a\rb", "a\x00b", "a\x7fb"):
        with pytest.raises(ValueError):
            conf_literal(bad)
