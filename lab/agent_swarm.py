"""Speaks for the guest agents of many protection groups at once, from one process.

A scale run needs more agents than a lab machine can run as processes (a real agent is ~58 MB
and a few % of a core: 200 of them are a machine of their own). For the groups of
`inventory_only` (their VMs exist in the vCenters, no database runs for them) this process does
what their agents do that the orchestrator sees, at the agents' cadence and on the wire:

- every node posts a signed heartbeat (`HealthEvent`, the agents' own details: resources,
  role, the primary's WAL position and its sync standby) every `heartbeat_s`, on a keep-alive
  connection and a thread of its own, to the gateway and on to the next URL when one does not
  answer;
- every primary holds its group's leader key under an etcd lease of `lease_s`, created
  if absent and renewed every `lease_s` / 3 (and read back) on a thread of its own, as
  agents/lease.py does: a slow gateway delays no renewal.

It measures what a real agent would have suffered: a primary whose renewals fell behind by
`lease_s - margin_s` would have fenced itself (`lease_deadline_misses`), a node whose
heartbeats were apart by more than `heartbeat_timeout_s` would have looked dead
(`heartbeat_gaps`). SIGUSR1 loses the site `lose_site` names: its nodes stop, and the
primaries' heartbeats report no standby from then on. SIGUSR2 starts the figures again (a
measured phase begins). SIGTERM ends it. Its figures are written
to `out` every 2 s and at the end.

    python -m lab.agent_swarm SPEC.json OUT.json
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agents.outbox import KeepAliveHttp
from drflow.etcd import Client, EtcdError, absent, put_op
from drflow.leader_keys import Leader, leader_key
from drflow.signing import sign_headers

RETRY_S = 0.2  # after a failed renewal, as agents/lease.py


@dataclass
class Node:
    group: str
    agent_id: str
    role: str  # primary | standby
    site: str
    peer: str
    urls: list[str]
    https: list[KeepAliveHttp] = field(default_factory=list)  # one per URL, as an agent's
    url_index: int = 0
    last_beat_ok: float | None = None
    beats: int = 0
    beat_failures: int = 0
    longest_beat_gap_s: float = 0.0
    beat_latencies: list[float] = field(default_factory=list)
    # primary only
    lease_id: int | None = None
    last_renew_ok: float | None = None
    renewals: int = 0
    renew_failures: int = 0
    longest_renew_gap_s: float = 0.0
    deadline_misses: int = 0
    keys_lost: int = 0
    lsn: int = 0x3000000
    lost: bool = False


class Swarm:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.secret = str(spec["webhook_secret"]).encode()
        self.heartbeat_s = float(spec.get("heartbeat_s", 1.0))
        self.heartbeat_timeout_s = float(spec.get("heartbeat_timeout_s", 3.0))
        self.lease_s = int(spec.get("lease_s", 3))
        self.margin_s = float(spec.get("margin_s", 0.5))
        self.etcd_endpoints = list(spec["etcd"])
        self.lose_site = spec.get("lose_site")
        self.site_lost_at: float | None = None
        self.stop = threading.Event()
        self.nodes: list[Node] = []
        for g in spec["groups"]:
            for role, other in (("primary", "standby"), ("standby", "primary")):
                self.nodes.append(Node(group=g["name"], agent_id=g[role]["vm"], role=role,
                                       site=g[role]["site"], peer=g[other]["vm"],
                                       urls=list(spec["gateway_urls"]),
                                       https=[KeepAliveHttp(u, 3.0)
                                              for u in spec["gateway_urls"]]))
        self.started = time.time()

    # -- heartbeats ---------------------------------------------------------------------------

    def _details(self, n: Node) -> dict[str, Any]:
        standby_gone = self.site_lost_at is not None
        if n.role == "primary":
            n.lsn += 0x2000
            pg: dict[str, Any] = {"role": "primary", "wal_lsn": f"0/{n.lsn:X}", "replicas": [] if
                                  standby_gone else [{"application_name": n.peer,
                                                      "state": "streaming", "sync_state": "sync"}]}
        else:
            pg = {"role": "standby", "upstream": n.peer, "lag_bytes": 0, "replay_delay_s": 0.0}
        return {"resources": {"postgres": "ok"}, "roles": {"postgres": n.role}, "postgres": pg}

    def _post(self, n: Node, body: bytes) -> int:
        """One signed POST on the node's keep-alive connection, with the agents' own sender (a
        beat sent as the gateway closes an idle connection goes again on a fresh one); on to
        the next URL after a failure, as the agents' outbox does."""
        headers = sign_headers(self.secret, body)
        try:
            status, _ = n.https[n.url_index].post(body, headers)
            return status
        except (OSError, http.client.HTTPException):
            n.url_index = (n.url_index + 1) % len(n.urls)
            raise

    def beat(self, n: Node, now: float) -> None:
        event = {"event_id": str(uuid.uuid4()), "agent_id": n.agent_id, "group": n.group,
                 "kind": "heartbeat", "resource": None,
                 "observed_at": datetime.now(UTC).isoformat(), "details": self._details(n)}
        body = json.dumps(event, separators=(",", ":")).encode()
        t0 = time.monotonic()
        try:
            status = self._post(n, body)
        except (OSError, http.client.HTTPException):
            status = 0
        if status in (200, 202, 409):
            done = time.monotonic()
            n.beat_latencies.append(done - t0)
            if n.last_beat_ok is not None:
                n.longest_beat_gap_s = max(n.longest_beat_gap_s, t0 - n.last_beat_ok)
            n.last_beat_ok, n.beats = t0, n.beats + 1
        else:
            n.beat_failures += 1

    # -- leases -------------------------------------------------------------------------------

    def renew(self, n: Node, etcd: Client) -> bool:
        """One renewal step; False when it failed (the agent tries again at once)."""
        sent = time.monotonic()
        try:
            if n.lease_id is None:
                lease_id, _ = etcd.grant(self.lease_s)
                value = Leader(agent_id=n.agent_id, by="agent", since=time.time()).encode()
                ok, _ = etcd.txn([absent(leader_key(n.group))],
                                 [put_op(leader_key(n.group), value, lease_id)])
                if not ok:
                    etcd.revoke(lease_id)
                    raise EtcdError(f"the leader key of {n.group} is held by someone else")
                n.lease_id = lease_id
            else:
                if etcd.keepalive(n.lease_id) == 0:
                    n.keys_lost += 1
                    n.lease_id = None
                    raise EtcdError("the lease was gone")
                kv = etcd.get_kv(leader_key(n.group))
                if kv is None or json.loads(kv.value).get("agent_id") != n.agent_id:
                    n.keys_lost += 1
                    raise EtcdError("the leader key is no longer this agent's")
        except (EtcdError, OSError, ValueError):
            n.renew_failures += 1
            return False
        if n.last_renew_ok is not None:
            gap = sent - n.last_renew_ok
            n.longest_renew_gap_s = max(n.longest_renew_gap_s, gap)
            if gap > self.lease_s - self.margin_s:
                n.deadline_misses += 1  # a real agent would have fenced itself
        n.last_renew_ok, n.renewals = sent, n.renewals + 1
        return True

    # -- loop ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Start the figures again (a measured phase begins); counts and maxima only."""
        for n in self.nodes:
            n.beats = n.beat_failures = n.renewals = n.renew_failures = 0
            n.deadline_misses = n.keys_lost = 0
            n.longest_beat_gap_s = n.longest_renew_gap_s = 0.0
            n.beat_latencies = []
        self.started = time.time()

    def lose(self) -> None:
        self.site_lost_at = time.time()
        for n in self.nodes:
            if n.site == self.lose_site:
                n.lost = True

    def beats(self, n: Node, first: float) -> None:
        """One node's heartbeats, on a thread of its own as in its agent (a slow answer to one
        agent delays no other)."""
        next_at = first
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            if n.lost:
                return
            now = time.monotonic()
            next_at = max(next_at + self.heartbeat_s, now)  # fell behind: no burst after
            self.beat(n, now)

    def renewals(self, n: Node, first: float) -> None:
        """One primary's lease, on a thread of its own as agents/lease.py renews it."""
        etcd = Client(self.etcd_endpoints, timeout=self.lease_s / 4)
        next_at = first
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            if n.lost:
                return
            began = time.monotonic()
            ok = self.renew(n, etcd)
            next_at = began + (self.lease_s / 3 if ok else RETRY_S)

    def figures(self) -> dict[str, Any]:
        lat = sorted(x for n in self.nodes for x in n.beat_latencies[-2000:])

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

        primaries = [n for n in self.nodes if n.role == "primary"]
        before = [n for n in self.nodes if not n.lost]
        return {
            "nodes": len(self.nodes), "groups": len(primaries),
            "seconds": round(time.time() - self.started, 1),
            "heartbeats": sum(n.beats for n in self.nodes),
            "heartbeat_failures": sum(n.beat_failures for n in self.nodes),
            "heartbeat_p50_s": q(0.5), "heartbeat_p99_s": q(0.99),
            "longest_heartbeat_gap_s": round(max((n.longest_beat_gap_s for n in before),
                                                 default=0.0), 3),
            "heartbeat_gaps": sum(1 for n in before
                                  if n.longest_beat_gap_s > self.heartbeat_timeout_s),
            "renewals": sum(n.renewals for n in primaries),
            "renewal_failures": sum(n.renew_failures for n in primaries),
            "longest_renewal_gap_s": round(max((n.longest_renew_gap_s for n in primaries),
                                               default=0.0), 3),
            "lease_deadline_misses": sum(n.deadline_misses for n in primaries),
            "leader_keys_lost": sum(n.keys_lost for n in primaries),
            "site_lost_at": self.site_lost_at,
        }

    def run(self, out: Path) -> None:
        start, k = time.monotonic(), len(self.nodes)
        workers = []
        for i, n in enumerate(self.nodes):  # spread over the period, as agents started apart
            workers.append(threading.Thread(target=self.beats,
                                            args=(n, start + self.heartbeat_s * i / k),
                                            daemon=True, name=f"beats-{n.agent_id}"))
            if n.role == "primary":
                workers.append(threading.Thread(target=self.renewals,
                                                args=(n, start + self.lease_s / 3 * i / k),
                                                daemon=True, name=f"lease-{n.agent_id}"))
        for t in workers:
            t.start()
        while not self.stop.wait(2.0):
            _write(out, self.figures())
        for t in workers:
            t.join(5)
        _write(out, self.figures())


def configure(lab_dir: Path, state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Add the inventory-only groups `names` to the lab's drflow.yaml (primaries at DR,
    standbys at prod, the lab's policy) and return the swarm's spec for them."""
    import yaml

    from lab.agents import lease_section
    from lab.labconfig import lab_config

    cfg = lab_config(lab_dir, state)
    model = cfg["groups"][0]
    zone = state["groups"][0]["dns"]["zone"]
    nowhere = state["orchestrator"]["address"]  # no database listens on these ports
    groups = []
    for i, name in enumerate(names):
        nodes = {"primary": {"site": "dr", "vm": f"{name}-dr", "host": nowhere,
                             "port": 40000 + 2 * i},
                 "standby": {"site": "prod", "vm": f"{name}-prod", "host": nowhere,
                             "port": 40001 + 2 * i}}
        cfg["groups"].append({**model, "name": name, **nodes,
                              "dns": {**model["dns"], "record": f"{name}.{zone}"}})
        groups.append({"name": name, **nodes})
    (lab_dir / "drflow.yaml").write_text(
        "# drflow configuration for the lab, with the groups lab/agent_swarm.py speaks for.\n"
        + yaml.safe_dump(cfg, sort_keys=False))
    return {"webhook_secret": state["secrets"]["webhook"],
            "gateway_urls": [state["gateway"]["url"] + "/v1/events"],
            # Its primaries are all at DR: their renewals go to DR's member first, as a real
            # agent's do (lab/agents.lease_section), and do not wait on prod's when it is lost.
            "etcd": lease_section(state, "dr")["etcd"], "heartbeat_s": 1,
            "heartbeat_timeout_s": cfg["gateway"]["heartbeat_timeout_s"],
            "lease_s": model["policy"]["lease_s"], "margin_s": 0.5, "lose_site": "prod",
            "groups": groups}


def start(lab_dir: Path, spec: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
    """The swarm as a process of its own (its GIL not shared with whoever measures it):
    (the process, the file of its figures)."""
    from lab import procs

    spec_path, figures_path = lab_dir / "swarm.json", lab_dir / "swarm-figures.json"
    spec_path.write_text(json.dumps(spec))
    proc = procs.spawn([sys.executable, "-m", "lab.agent_swarm", str(spec_path),
                        str(figures_path)], lab_dir / "logs" / "agent_swarm.log")
    return proc, figures_path


def read_figures(path: Path) -> dict[str, Any]:
    """The swarm's last figures ({} before its first write)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _write(out: Path, figures: dict[str, Any]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures))
    tmp.replace(out)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    swarm = Swarm(json.loads(Path(argv[0]).read_text()))
    signal.signal(signal.SIGTERM, lambda *_: swarm.stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: swarm.lose())
    signal.signal(signal.SIGUSR2, lambda *_: swarm.reset())
    swarm.run(Path(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
