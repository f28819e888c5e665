"""Footprint of a real `drflow agent run`: RSS and CPU with 6 resources checked every second.

Starts a lab PostgreSQL pair, a small HTTP endpoint and a signed-webhook receiver on 127.0.0.1,
then an agent watching ip, volume, postgres, tcp port, process (the postmaster, by pid file) and
http, each at a 1 s interval with 1 s heartbeats, holding its group's leader lease in a one-member
etcd (3 s lease renewed every second, its PostgreSQL observed every second; `--no-lease`: none)
over a synchronous pair, as a protected primary does. After a warm-up it samples the agent process
with psutil for `--seconds` (default 60). The last line of output is one JSON object:
`{"rss_mb": …, "cpu_pct": …}` (peak RSS; CPU in % of one core over the window).
Targets: RSS ≤ 45 MB, CPU ≤ 1 % of one core.

`--entry` chooses how the agent is started:

- `bundle` (default): what is deployed. The agent bundle (orchestrator.agent_bundle) is built,
  unpacked into the benchmark's directory, and its `bin/drflow-agent run` started as a guest
  starts it: with /usr/bin/python3 (its shebang), on the bundle's libraries only, psycopg over
  the system's libpq. Where /usr/bin/python3 is not the Python the bundle was built for, the
  same file is run with this interpreter instead (said in the output).
- `drflow`: `drflow agent run`, what operators run on a machine with drflow installed (the
  drflow CLI, typer included, and the venv's libraries).
- `module`: `python -m agents.cli run` in the venv: the agent's own command line, but the
  venv's libraries (psycopg-binary among them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil
import yaml

from drflow.etcd import Client as EtcdClient
from drflow.leader_keys import Leader, leader_key
from drflow.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    sign_headers,
    verify,
)
from lab import etcd, postgres, procs

ROOT = Path(__file__).resolve().parent.parent
DRFLOW = ROOT / ".venv" / "bin" / "drflow"


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def start_http(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def receiver(secret: bytes, counts: dict[str, int], port: int) -> ThreadingHTTPServer:
    """The gateway's stand-in: signed events in, and the signed roles answer the boot check asks
    for (this node's side serves), so the boot check settles as it does against a gateway."""

    class Receiver(_Quiet):
        def do_GET(self) -> None:
            nonce = parse_qs(urlsplit(self.path).query).get("nonce", [""])[0]
            body = json.dumps({
                "group": "bench", "nonce": nonce, "at": time.time(), "primary_site": "prod",
                "in_transition": False, "incident_open": False,
                "nodes": {"prod": {"host": "127.0.0.1", "port": port}},
            }).encode()
            counts["roles"] = counts.get("roles", 0) + 1
            self.send_response(200)
            for k, v in sign_headers(secret, body).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                verify(secret, self.headers.get(TIMESTAMP_HEADER),
                       self.headers.get(SIGNATURE_HEADER), body)
            except SignatureError:
                counts["bad"] += 1
                self._reply(401)
                return
            kind = json.loads(body)["kind"]
            counts[kind] = counts.get(kind, 0) + 1
            self._reply(202)

    return start_http(Receiver)


def health_endpoint() -> ThreadingHTTPServer:
    class Health(_Quiet):
        def do_GET(self) -> None:
            self._reply(200)

    return start_http(Health)


def agent_config(work: Path, inst: postgres.Instance, password_env: str, secret_env: str,
                 events_url: str, health_url: str, control_port: int) -> dict[str, Any]:
    every = {"interval_s": 1, "timeout_s": 2}
    return {
        "agent_id": "bench-agent", "group": "bench", "heartbeat_interval_s": 1,
        "gateway": {"url": events_url, "webhook_secret": {"ref": f"env:{secret_env}"}},
        "outbox": str(work / "outbox.sqlite"),
        # As deployed: the control API listens too (idle here).
        "control": {"listen": f"127.0.0.1:{control_port}",
                    "secret": {"ref": f"env:{secret_env}"}},
        "resources": [
            {"name": "lo", "type": "ip", "address": "127.0.0.1", **every},
            {"name": "data", "type": "volume", "path": str(inst.datadir.parent),
             "depends_on": ["lo"], **every},
            {"name": "pg", "type": "postgres", "depends_on": ["data"], "port": inst.port,
             "user": "drflow", "password": {"ref": f"env:{password_env}"},
             "datadir": str(inst.datadir), **every},
            {"name": "postmaster", "type": "process", "pidfile": str(inst.pidfile),
             "depends_on": ["data"], **every},
            {"name": "port", "type": "tcp", "port": inst.port, "depends_on": ["pg"], **every},
            {"name": "api", "type": "http", "url": health_url, **every},
        ],
    }


ENTRIES = {
    # What operators run: the drflow CLI (it also loads CLI plugins such as the lab's).
    "drflow": [str(DRFLOW), "agent", "run"],
    # The agent's own command module, without the rest of the CLI.
    "module": [sys.executable, "-m", "agents.cli", "run"],
}
GUEST_PYTHON = "/usr/bin/python3"  # the bundle's shebang


def unpack_bundle(into: Path) -> list[str]:
    """Build the agent bundle, unpack it into `into`, and return the argv that runs it as a
    guest does (`bin/drflow-agent run`)."""
    from orchestrator.agent_bundle import ENTRY, build, python_tag, tag_of

    with tarfile.open(build()) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python < 3.11.4 (Debian 12's) has no extraction filters; the bundle is our own
            tar.extractall(into)
    entry = into / ENTRY
    tag = tag_of(GUEST_PYTHON)
    if tag == python_tag():
        return [str(entry), "run"]
    print(f"{GUEST_PYTHON} is {tag or 'missing'}, the bundle is for {python_tag()}: running "
          f"{ENTRY} with {sys.executable}", flush=True)
    return [sys.executable, "-sE", str(entry), "run"]


def measure(seconds: float, warmup: float, entry: str = "bundle",
            lease: bool = True) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="drflow-bench-agent-", dir="/tmp"))
    os.chmod(work, 0o755)
    primary = standby = None
    cluster: dict[str, Any] | None = None
    agent: subprocess.Popen[bytes] | None = None
    counts: dict[str, int] = {"bad": 0}
    secret = "bench-" + uuid.uuid4().hex
    events: ThreadingHTTPServer | None = None
    health = health_endpoint()
    try:
        print("starting a lab PostgreSQL pair ...", flush=True)
        # Synchronous, as a protected group runs: the lease then also keeps the group's sync key.
        primary, standby = postgres.create_pair(work / "pg", "bench", sync=lease)
        if lease:
            print("starting etcd for the leader lease ...", flush=True)
            cluster = etcd.start_cluster(work / "etcd-lab", [etcd.Member(
                "bench", "127.0.0.1", [], client_port=procs.free_port(),
                peer_port=procs.free_port())])
        events = receiver(secret.encode(), counts, primary.port)
        _user, password = postgres.client_credentials(work / "pg")
        cfg = agent_config(
            work, primary, "BENCH_PG_PASSWORD", "BENCH_WEBHOOK_SECRET",
            f"http://127.0.0.1:{events.server_address[1]}/v1/events",
            f"http://127.0.0.1:{health.server_address[1]}/healthz", procs.free_port())
        if cluster is not None:
            cfg["lease"] = {"etcd": cluster["endpoints"], "lease_s": 3, "replication": "sync"}
        (work / "agent.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = {**os.environ, "BENCH_PG_PASSWORD": password, "BENCH_WEBHOOK_SECRET": secret}
        if entry == "bundle":
            argv, cwd = unpack_bundle(work / "bundle"), work
        else:
            argv, cwd = ENTRIES[entry], ROOT
        log = open(work / "agent.log", "ab")  # noqa: SIM115 - closed with the agent
        agent = subprocess.Popen([*argv, "--config", str(work / "agent.yaml")],
                                 stdout=log, stderr=subprocess.STDOUT, env=env,
                                 stdin=subprocess.DEVNULL, cwd=cwd)
        proc = psutil.Process(agent.pid)
        deadline = time.monotonic() + 30
        while counts.get("heartbeat", 0) < 2:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not start: see " + str(work / "agent.log"))
            time.sleep(0.1)
        time.sleep(warmup)
        print(f"measuring the agent (pid {agent.pid}, {' '.join(argv[-3:])}) for "
              f"{seconds:.0f} s ...", flush=True)
        before = proc.cpu_times()
        beats_before = counts.get("heartbeat", 0)
        t0 = time.monotonic()
        rss_peak = rss_sum = 0.0
        samples = 0
        while time.monotonic() - t0 < seconds:
            time.sleep(1.0)
            rss = proc.memory_info().rss / 2**20
            rss_peak, rss_sum, samples = max(rss_peak, rss), rss_sum + rss, samples + 1
        after = proc.cpu_times()
        wall = time.monotonic() - t0
        cpu_s = (after.user - before.user) + (after.system - before.system)
        holder = None
        if cluster is not None:  # the agent held the group's lease throughout, as a primary does
            raw = EtcdClient(cluster["endpoints"]).get(leader_key("bench"))
            holder = Leader.decode(raw).agent_id if raw else None
            if holder != "bench-agent":
                raise RuntimeError(f"the agent does not hold the leader lease (holder: {holder}): "
                                   f"see {work / 'agent.log'}")
        result = {
            "lease_holder": holder,
            "rss_mb": round(rss_peak, 1), "rss_mean_mb": round(rss_sum / max(1, samples), 1),
            "cpu_pct": round(100 * cpu_s / wall, 2), "seconds": round(wall, 1),
            "threads": proc.num_threads(), "heartbeats": counts.get("heartbeat", 0) - beats_before,
            "failures": counts.get("resource_failed", 0), "bad_signatures": counts["bad"],
            "roles_asked": counts.get("roles", 0),
        }
        if result["failures"]:
            print("warning: resources failed during the run; see " + str(work / "agent.log"))
        return result
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        for inst in (standby, primary):
            if inst is not None:
                postgres.destroy(inst)
        if cluster is not None:
            etcd.stop_cluster(cluster)
        if events is not None:
            events.shutdown()
        health.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement window (default 60)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    ap.add_argument("--no-lease", action="store_true",
                    help="no etcd and no leader lease (the figures before 2026-12-04)")
    ap.add_argument("--entry", choices=["bundle", *sorted(ENTRIES)], default="bundle",
                    help="bundle: the agent bundle's bin/drflow-agent run, as deployed "
                         "(default); drflow: `drflow agent run`; module: `python -m agents.cli "
                         "run` in the venv")
    args = ap.parse_args()
    r = measure(args.seconds, args.warmup, args.entry, not args.no_lease)
    print(f"agent RSS peak {r['rss_mb']} MB (mean {r['rss_mean_mb']} MB), CPU {r['cpu_pct']} % "
          f"of one core over {r['seconds']} s; {r['threads']} threads, {r['heartbeats']} "
          f"heartbeats delivered, {r['failures']} resource failures, "
          f"{r['bad_signatures']} bad signatures; leader lease "
          f"{'held throughout' if r['lease_holder'] else 'not run (--no-lease)'}")
    print(f"target: RSS ≤ 45 MB ({'ok' if r['rss_mb'] <= 45 else 'MISSED'}), "
          f"CPU ≤ 1 % ({'ok' if r['cpu_pct'] <= 1 else 'MISSED'})")
    print(json.dumps({"rss_mb": r["rss_mb"], "cpu_pct": r["cpu_pct"]}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
