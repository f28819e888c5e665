"""The boot check asks etcd first (docs/fencing.md rule 8), on a real etcd, a real PostgreSQL
pair and a gateway roles endpoint over real HTTP (signed as the gateway signs it)."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from agents.boot import BootGate, roles_url
from agents.drivers.postgres import PostgresDriver
from drflow.events import HealthEvent
from drflow.leader_keys import Leader, SyncState, leader_key, sync_key
from drflow.signing import sign_headers
from lab import etcd, procs
from lab import postgres as pg
from tests.conftest import tracked_gate

pytestmark = pytest.mark.lab

SECRET = "w" * 32
GROUP = "boot"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="drflow-boottest-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for site in ("prod", "dr"):
            data = d / "pg" / GROUP / site / "data"
            if data.is_dir():
                pg.kill_hard(pg.Instance(name=site, datadir=data, port=0, log=data / "x"))
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(root: Path) -> Iterator[dict[str, Any]]:
    member = etcd.Member("boot-test", "127.0.0.1", [], client_port=procs.free_port(),
                         peer_port=procs.free_port())
    info = etcd.start_cluster(root / "etcd-lab", [member])
    try:
        yield info
    finally:
        etcd.stop_cluster(info)


@pytest.fixture(scope="module")
def pair(root: Path) -> tuple[pg.Instance, pg.Instance]:
    return pg.create_pair(root / "pg", GROUP, sync=True)


class Gateway:
    """The gateway's roles endpoint: a signed answer echoing the nonce, serving `primary_site`."""

    def __init__(self, primary: pg.Instance, standby: pg.Instance) -> None:
        self.primary_site = "prod"
        gw = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                nonce = parse_qs(urlsplit(self.path).query).get("nonce", [""])[0]
                body = json.dumps({
                    "nonce": nonce, "group": GROUP, "primary_site": gw.primary_site,
                    "in_transition": False,
                    "nodes": {"prod": {"host": primary.host, "port": primary.port},
                              "dr": {"host": standby.host, "port": standby.port}}}).encode()
                self.send_response(200)
                for k, v in sign_headers(SECRET.encode(), body).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def gateway(pair: tuple[pg.Instance, pg.Instance]) -> Iterator[Gateway]:
    gw = Gateway(*pair)
    yield gw
    gw.server.shutdown()


@pytest.fixture()
def stopped(cluster: dict[str, Any], pair: tuple[pg.Instance, pg.Instance],
            gateway: Gateway) -> pg.Instance:
    """The prod node rebooting: its PostgreSQL down, no keys yet, the gateway's record: prod."""
    primary, _ = pair
    pg.stop(primary, "immediate")
    c = etcd.Client(cluster["endpoints"])
    c.delete(leader_key(GROUP))
    c.delete(sync_key(GROUP))
    gateway.primary_site = "prod"
    return primary



def gate(primary: pg.Instance, gateway: Gateway, endpoints: list[str],
         events: list[HealthEvent], root: Path, gateway_url: str | None = None) -> BootGate:
    user, password = pg.client_credentials(root / "pg")
    driver = PostgresDriver(datadir=primary.datadir, port=primary.port, host=primary.host,
                            user=user, password=SecretStr(password))
    g = BootGate(agent_id=primary.name, group=GROUP, resource="postgres", port=primary.port,
                 host=primary.host, url=roles_url(gateway_url or gateway.url, GROUP),
                 secret=SecretStr(SECRET), driver=driver, emit=events.append, retry_s=0.5,
                 probe=None, etcd=etcd.Client(endpoints, 1.0))
    return tracked_gate(g)


def dead_endpoint() -> list[str]:
    return [f"http://127.0.0.1:{procs.free_port()}"]


def test_key_naming_another_holds_even_when_the_gateway_says_start(
        cluster: dict[str, Any], stopped: pg.Instance, gateway: Gateway, root: Path) -> None:
    etcd.Client(cluster["endpoints"]).put(leader_key(GROUP), Leader("boot-dr", "takeover").encode())
    events: list[HealthEvent] = []
    g = gate(stopped, gateway, cluster["endpoints"], events, root)
    d = g.start()
    g.stop()
    assert d.action == "hold", d.reason
    assert not pg.is_running(stopped) and g.driver.held_down
    assert events[-1].details["drflow_boot"] == "held_for_reprotect"


def test_key_naming_this_agent_starts_even_when_the_gateway_says_hold(
        cluster: dict[str, Any], stopped: pg.Instance, gateway: Gateway, root: Path) -> None:
    etcd.Client(cluster["endpoints"]).put(leader_key(GROUP), Leader(stopped.name).encode())
    gateway.primary_site = "dr"
    d = gate(stopped, gateway, cluster["endpoints"], [], root).start()
    assert d.action == "start", d.reason
    assert pg.role(stopped) == "primary"


def test_dr_down_sync_key_names_this_primary_starts(
        cluster: dict[str, Any], stopped: pg.Instance, gateway: Gateway, root: Path) -> None:
    """A prod VM rebooting while the DR site (and the gateway with it) is down."""
    etcd.Client(cluster["endpoints"]).put(sync_key(GROUP),
                                          SyncState(stopped.name, None).encode())
    dead_gateway = f"http://127.0.0.1:{procs.free_port()}/v1/events"
    g = gate(stopped, gateway, cluster["endpoints"], [], root, dead_gateway)
    d = g.start()
    g.stop()
    assert d.action == "start", d.reason
    assert pg.role(stopped) == "primary"


def test_etcd_unreachable_falls_back_to_the_gateway(
        stopped: pg.Instance, pair: tuple[pg.Instance, pg.Instance], root: Path) -> None:
    gw = Gateway(*pair)
    try:
        gw.primary_site = "dr"
        d = gate(stopped, gw, dead_endpoint(), [], root).start()
        assert d.action == "hold" and "served from dr" in d.reason, d.reason
        assert not pg.is_running(stopped)
        gw.primary_site = "prod"
        d = gate(stopped, gw, dead_endpoint(), [], root).start()
        assert d.action == "start" and "served from this side" in d.reason, d.reason
        assert pg.role(stopped) == "primary"
    finally:
        gw.server.shutdown()


def test_running_primary_with_key_naming_another_is_fenced(
        cluster: dict[str, Any], stopped: pg.Instance, gateway: Gateway, root: Path) -> None:
    pg.start(stopped)
    etcd.Client(cluster["endpoints"]).put(leader_key(GROUP), Leader("boot-dr", "takeover").encode())
    events: list[HealthEvent] = []
    d = gate(stopped, gateway, cluster["endpoints"], events, root).start()
    assert d.action == "fence", d.reason
    assert not pg.is_running(stopped)
    assert events[-1].details["drflow_boot"] == "second_primary"
