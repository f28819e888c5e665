"""Host-loss failover on the lab, end to end, medians over several groups.

Per run: a steady writer on the group through its DNS name, a vSphere power-off of the group's
prod VM, then the real agents, gateway and failover flow do the rest. Measured:
  rto      power-off → first acknowledged write on the new primary through DNS
  detect   power-off → the gateway opens the incident
  takeover_to_first_step   the gateway starts the run → the flow's first step starts
  lost     acknowledged writes missing on the new primary (sync replication)

--mode one-machine (default): the gateway runs the flow in its own process (`drflow gateway`).
--mode distributed: the layout of several machines (lab/distributed.py): a Prefect server on
PostgreSQL, the runbooks deployed, two warm runners (`drflow runner`) at the DR site, and the
gateway in `--mode deployment` creating deployment runs that a runner executes.

Last line: {"rto_p50_s", "detect_p50_s", "takeover_to_first_step_p50_s", "acked_writes_lost",
"mode"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="failovers (one lab group each)")
    ap.add_argument("--mode", choices=("one-machine", "distributed"), default="one-machine",
                    help="where the flows run (see above)")
    args = ap.parse_args()
    if args.mode == "distributed":
        from lab.distributed import start_distributed, stop_distributed

        print(f"starting a lab with {args.runs} sync groups in the distributed layout (Prefect "
              "on PostgreSQL, drflow deploy, two warm runners, gateway --mode deployment) …",
              flush=True)
        dist = start_distributed(groups=args.runs, runners=2)
        try:
            measure(dist.env, args)
        finally:
            stop_distributed(dist)
        return
    from lab.harness import throwaway_prefect

    with throwaway_prefect():
        from lab.harness import start_env, stop_env

        print(f"starting a lab with {args.runs} sync groups, agents and the gateway …", flush=True)
        env = start_env(groups=args.runs, replication="sync")
        try:
            measure(env, args)
        finally:
            stop_env(env)


def measure(env: Any, args: argparse.Namespace) -> None:
    """One host loss per group, one after the other; prints a line per run and the JSON line."""
    from lab import vcsim
    from lab.harness import Writer, wait_for

    rtos, detects, starts, lost_total = [], [], [], 0
    vc = env.state["vcenter"]
    si = vcsim.connect(vc["url"], vc["user"], vc["password"])
    for g in env.state["groups"]:
        name = g["name"]
        writer = Writer(env, name).start()
        time.sleep(1.0)
        t_off = time.time()
        vcsim.power_off(si, g["primary"]["vm"])
        fin = wait_for(lambda n=name: env.audit_records("failover.finish", n), 60,
                       f"failover of {name}")[-1]
        if fin.outcome != "ok":
            sys.exit(f"{name}: failover did not complete: {fin.outcome}: {fin.reason}")
        done = time.time()
        wait_for(lambda w=writer, d=done: w.first_ack_after(d), 15, "writes after failover")
        writer.stop()
        new_primary = (g["standby"]["host"], g["standby"]["port"])
        rto = (writer.first_ack_after(t_off, new_primary) or done) - t_off
        opened = env.audit_records("incident.open", name)[0]
        started = next(r for r in env.audit_records("incident.start", name)
                       if r.outcome == "started")
        first_task = next(r for r in env.audit_records("failover.confirm failure")
                          if r.outcome == "started" and r.seq > started.seq)
        detect = _ts(opened.time) - t_off
        to_task = _ts(first_task.time) - _ts(started.time)
        lost = writer.lost(g["standby"]["host"], g["standby"]["port"])
        lost_total += len(lost)
        rtos.append(rto)
        detects.append(detect)
        starts.append(to_task)
        print(f"{name}: RTO {rto:.2f} s, detection {detect:.2f} s, takeover→first step "
              f"{to_task * 1000:.0f} ms, flow RTO {fin.parameters.get('rto_s')} s, "
              f"{len(writer.acked)} acknowledged writes, {len(lost)} lost, "
              f"{len(writer.unknown)} unknown (acknowledgement lost with the host)", flush=True)
    print(json.dumps({
        "rto_p50_s": round(statistics.median(rtos), 3),
        "detect_p50_s": round(statistics.median(detects), 3),
        "takeover_to_first_step_p50_s": round(statistics.median(starts), 3),
        "acked_writes_lost": lost_total,
        "runs": len(rtos), "mode": args.mode, "replication": "sync", "heartbeat_timeout_s": 3,
    }))


if __name__ == "__main__":
    main()
