"""Signed heartbeats one gateway replica accepts per second, its state in SQLite or in etcd.

One real gateway (uvicorn on 127.0.0.1, the app `drflow gateway` serves) and, for the shared
state, one etcd member on loopback. `--senders` threads post signed heartbeats of one group's
standby over keep-alive connections, `--events` in all, after a warm-up; both stores are
measured in the same run. The senders share the machine with the gateway, so the figures are
what the gateway sustains while the machine is also busy sending.

Last line: {"sqlite_events_per_s", "sqlite_p50_ms", "shared_events_per_s", "shared_p50_ms",
"shared_p99_ms", "events"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drflow.signing import sign_headers
from lab import etcd
from lab.procs import free_port
from orchestrator.gateway import GatewaySettings, GroupPolicy, Incident, create_app
from orchestrator.gateway.settings import GroupNode, GroupRoster

SECRET = "benchmark-secret-0123456789abcdef"


class _NoRuns:
    async def start_incident(self, incident: Incident) -> str:
        return "none"


@contextmanager
def _gateway(settings: GatewaySettings) -> Iterator[str]:
    app = create_app(settings, _NoRuns())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _settings(state: Path, **kw: Any) -> GatewaySettings:
    roster = GroupRoster(primary=GroupNode(site="prod", vm="pg-a", host="127.0.0.1", port=5432),
                         standby=GroupNode(site="dr", vm="pg-b", host="127.0.0.2", port=5432))
    return GatewaySettings(webhook_secret=SECRET, state_path=state, groups={"g": GroupPolicy()},
                           rosters={"g": roster}, **kw)


def _heartbeat() -> bytes:
    return json.dumps({"event_id": str(uuid.uuid4()), "agent_id": "pg-b", "group": "g",
                       "kind": "heartbeat", "observed_at": datetime.now(UTC).isoformat(),
                       "details": {"role": "standby"}}).encode()


def _measure(url: str, events: int, senders: int) -> tuple[float, float, float]:
    local = threading.local()

    def send(body: bytes) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        t = time.perf_counter()
        r = local.client.post(url + "/v1/events", content=body, headers={
            "Content-Type": "application/json", **sign_headers(SECRET.encode(), body)})
        if r.status_code != 202:
            raise RuntimeError(f"the gateway answered {r.status_code}: {r.text[:200]}")
        return time.perf_counter() - t

    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(send, [_heartbeat() for _ in range(min(200, events))]))  # warm-up
        bodies = [_heartbeat() for _ in range(events)]
        t0 = time.perf_counter()
        lat = sorted(pool.map(send, bodies))
        elapsed = time.perf_counter() - t0
    return events / elapsed, lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=3000, help="heartbeats per store (3000)")
    ap.add_argument("--senders", type=int, default=16, help="concurrent senders (16)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="drflow-gwstate-"))
    member = etcd.Member("etcd-1", "127.0.0.1", [], client_port=free_port(), peer_port=free_port())
    print("starting one etcd member …", flush=True)
    info = etcd.start_cluster(tmp, [member])
    out: dict[str, Any] = {"events": args.events}
    try:
        for name, extra in (("sqlite", {}), ("shared", {"etcd_endpoints": [member.client_url],
                                                        "state_in_etcd": True})):
            with _gateway(_settings(tmp / f"{name}.sqlite", **extra)) as url:
                rate, p50, p99 = _measure(url, args.events, args.senders)
            print(f"{name}: {rate:.0f} events/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
            out |= {f"{name}_events_per_s": round(rate), f"{name}_p50_ms": round(p50, 1)}
            if name == "shared":
                out["shared_p99_ms"] = round(p99, 1)
    finally:
        etcd.stop_cluster(info)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
