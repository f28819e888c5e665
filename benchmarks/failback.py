"""Failover → re-protect → failback cycles on the lab, under a steady writer, medians over runs.

One sync group with real agents and the gateway as a process (it runs the failover and starts
re-protect itself when the old primary's agent reports in); the failback runs here and is
approved through the Slack stand-in → gateway → Prefect resume. Per cycle:

  divergence   while the prod VM is off after the failover, its PostgreSQL is started alone and
               takes DIVERGE_ROWS rows the new primary never sees (WAL bytes measured), then
               stopped: the VM comes back as a diverged old primary that must be rewound
  reprotect_s  the re-protect flow's own time (from its first step to verified replication)
  unavailable  failback write unavailability as the writer saw it: the longest gap between two
               acknowledged writes while the switchover ran (also the flow's stop→first write)
  lost         acknowledged writes (unique ids) missing from the final primary

Last line: {"reprotect_s", "failback_unavailable_p50_s", "acked_writes_lost", …}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="failover → re-protect → failback cycles")
    ap.add_argument("--data-mb", type=int, default=64, help="table data loaded before the runs")
    ap.add_argument("--diverge-rows", type=int, default=2000,
                    help="rows (1 kB each) the old primary takes after the fork")
    args = ap.parse_args()

    from lab.harness import throwaway_prefect

    with throwaway_prefect():
        from lab.harness import start_env, stop_env
        from lab.slack_standin import SlackLab

        print("starting a lab (1 sync group), agents and the gateway …", flush=True)
        env = start_env(groups=1, replication="sync")
        results: list[dict[str, Any]] = []
        try:
            SlackLab(env.state["slack"]["url"]).set_request_url(env.gateway_url + "/slack/actions")
            size = _load(env, args.data_mb)
            print(f"data: {size / 2**20:.0f} MB in the database", flush=True)
            for i in range(args.runs):
                r = _cycle(env, i + 1, args.diverge_rows)
                results.append(r)
                print(f"run {i + 1}: re-protect {r['reprotect_s']:.2f} s ({r['rewind']}, divergence "
                      f"{r['diverge_rows']} rows / {r['diverge_bytes']} WAL bytes), failback write "
                      f"unavailability {r['unavailable_s']:.3f} s (flow: stop → first write "
                      f"{r['flow_downtime_s']:.3f} s), {r['acked']} acknowledged, {r['lost']} lost, "
                      f"{r['unknown']} unknown", flush=True)
        finally:
            stop_env(env)
        print(json.dumps({
            "reprotect_s": round(statistics.median(r["reprotect_s"] for r in results), 3),
            "failback_unavailable_p50_s": round(statistics.median(r["unavailable_s"]
                                                                  for r in results), 3),
            "acked_writes_lost": sum(r["lost"] for r in results),
            "failback_flow_downtime_p50_s": round(statistics.median(r["flow_downtime_s"]
                                                                    for r in results), 3),
            "runs": len(results), "replication": "sync", "data_mb": args.data_mb,
            "divergence_rows": args.diverge_rows,
            "divergence_wal_bytes_p50": int(statistics.median(r["diverge_bytes"] for r in results)),
            "rewind_methods": sorted({r["rewind"] for r in results}),
        }))


def _load(env: Any, mb: int) -> int:
    from drflow.dns import resolve_endpoint

    g = env.group("orders")
    host, port = resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"])
    with env.connect(host, port, timeout=5) as c:
        c.execute("set statement_timeout = 0")
        c.execute("create table if not exists bench_data (id int primary key, pad text)")
        c.execute("insert into bench_data select g, repeat(md5(g::text), 32) "
                  "from generate_series(1, %s) g on conflict do nothing", (mb * 1024,))
        row = c.execute("select pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def _cycle(env: Any, n: int, diverge_rows: int) -> dict[str, Any]:
    from lab import postgres as lp
    from lab import vcsim
    from lab.harness import Writer, wait_for

    g = env.group("orders")
    prod = g["primary"]
    vc = env.state["vcenter"]
    si = vcsim.connect(vc["url"], vc["user"], vc["password"])
    writer = Writer(env, "orders").start()

    done_fo = _count(env, "failover.finish")
    vcsim.power_off(si, prod["vm"])
    fin = wait_for(lambda: _count(env, "failover.finish") > done_fo, 90, "failover")
    rec = env.audit_records("failover.finish", "orders")[-1]
    if rec.outcome != "ok":
        sys.exit(f"run {n}: failover did not complete: {rec.outcome}: {rec.reason}")
    del fin

    # The old primary takes writes the new one never sees (as if just before it died).
    inst = lp.Instance.from_dict(env.state["postgres"]["orders"]["primary"])
    lp.start(inst)
    with env.connect(prod["host"], prod["port"]) as c:
        c.execute("set synchronous_commit = local")
        before = c.execute("select pg_current_wal_lsn()").fetchone()
        c.execute("create table if not exists diverged (id int, pad text)")
        c.execute("insert into diverged select g, repeat('x', 1000) from generate_series(1, %s) g",
                  (diverge_rows,))
        diverge = c.execute("select pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                            (before[0] if before else None,)).fetchone()
    lp.stop(inst, "fast")

    done_rp = _count(env, "reprotect.finish")
    vcsim.power_on(si, prod["vm"])
    wait_for(lambda: _count(env, "reprotect.finish") > done_rp, 180, "re-protect")
    rp = env.audit_records("reprotect.finish", "orders")[-1]
    if rp.outcome != "ok":
        sys.exit(f"run {n}: re-protect did not complete: {rp.outcome}: {rp.reason}")

    t_req = time.time()
    result = _failback(env)
    t_done = time.time()
    time.sleep(0.5)
    writer.stop()
    if result.get("outcome") != "failed_back":
        sys.exit(f"run {n}: failback did not complete: {result}")
    window = [t for t in writer.ack_times if t_req <= t <= t_done]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    return {
        "reprotect_s": float(rp.parameters["reprotect_s"]),
        "rewind": str(rp.parameters.get("rewind_method")),
        "diverge_rows": diverge_rows, "diverge_bytes": int(diverge[0]) if diverge else 0,
        "unavailable_s": max(gaps) if gaps else 0.0,
        "flow_downtime_s": float(result["downtime_s"]),
        "acked": len(writer.acked), "unknown": len(writer.unknown),
        "lost": len(writer.lost(prod["host"], prod["port"])),
    }


def _count(env: Any, action: str) -> int:
    return len(env.audit_records(action, "orders"))


def _failback(env: Any) -> dict[str, Any]:
    """Run the failback flow here; approve it in Slack as an on-call approver."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.failback import failback
    from lab.harness import wait_for
    from lab.slack_standin import SlackLab

    out: dict[str, Any] = {}
    t0 = time.time()

    def run() -> None:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            out.update(failback("orders", requested_by="benchmark",
                                config_path=str(env.config)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    slack = SlackLab(env.state["slack"]["url"])
    msg = slack.wait_for_message(
        lambda m: m.get("text") == "Failback of orders: approval needed"
        and float(m["ts"]) >= t0 - 1
        and any(b.get("type") == "actions" for b in m.get("blocks", [])), 60)
    run_id = json.loads(msg["blocks"][-1]["elements"][0]["value"])["run"]
    _wait_paused(run_id)
    status, body = slack.click(msg["ts"], "drflow_failback_approve", "U0ONCALL1")
    if status != 200 or json.loads(body)["verdict"] != "approved":
        sys.exit(f"approval click refused: {status} {body}")
    t.join(180)
    wait_for(lambda: not t.is_alive(), 1, "failback finished")
    return out


def _wait_paused(run_id: str) -> None:
    from prefect.client.orchestration import get_client

    from lab.harness import wait_for

    with get_client(sync_client=True) as c:
        wait_for(lambda: (s := c.read_flow_run(uuid.UUID(run_id)).state) is not None
                 and s.is_paused(), 30, "failback paused for approval", 0.1)


if __name__ == "__main__":
    main()
