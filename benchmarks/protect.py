"""Benchmark `drflow protect` on its own lab: a lone database VM of about 1 GB (pgbench) made a
protected pair (sync, streaming, DNS, config, a passing drill) under a steady writer.

`protect_s` is the command's wall time, from its start to "protected" (the drill included).
`writes_lost`: writes the writer had acknowledged that the new standby lacks afterwards;
`writes_refused`: writes that failed while it ran.

Last line: {"protect_s": …, "protected": …, "writes_lost": …, "writes_refused": …, …}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=int, default=64, help="pgbench -i scale (64 ≈ 1 GB)")
    ap.add_argument("--runs", type=int, default=1,
                    help="protections in a row, each on a lab of its own (figures: median)")
    args = ap.parse_args()
    results = [_one(args.scale) for _ in range(args.runs)]
    protect = sorted(r["protect_s"] for r in results)
    out = {
        "protect_s": protect[len(protect) // 2], "protect_s_all": protect,
        "protected": all(r["protected"] for r in results),
        "writes_lost": sum(r["writes_lost"] for r in results),
        "writes_refused": sum(r["writes_refused"] for r in results),
        "writes_acked": sum(r["writes_acked"] for r in results),
        "db_mb": results[0]["db_mb"], "steps_s": results[len(results) // 2]["steps_s"],
        "pgbench_scale": args.scale, "runs": args.runs,
    }
    print(json.dumps(out, sort_keys=True))


def _one(scale: int) -> dict[str, Any]:
    from lab.harness import DRFLOW, ServerWriter, start_env, stop_env
    from lab.postgres import pg_bin

    t = time.monotonic()
    env = start_env(groups=1, replication="sync", gateway=False, unprotected=["bench"])
    try:
        env.start_gateway("up", timeout=180)
        env.wait_all_heard()
        u = next(x for x in env.state["unprotected"] if x["name"] == "bench")
        pg = env.state["postgres_unprotected"]["bench"]
        print(f"lab and orchestrator up in {time.monotonic() - t:.1f} s", flush=True)
        t = time.monotonic()
        runas = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*runas, pg_bin("pgbench"), "-h", pg["socket_dir"], "-p", str(pg["port"]),
                        "-i", "-q", "-s", str(scale), "postgres"], cwd="/tmp", check=True,
                       capture_output=True)
        with env.connect(u["host"], u["port"]) as c:
            row = c.execute("select sum(pg_database_size(oid)) from pg_database").fetchone()
            db_bytes = int(row[0]) if row else 0
        print(f"pgbench -i -s {scale}: {db_bytes / 1e6:.0f} MB in {time.monotonic() - t:.1f} s",
              flush=True)
        writer = ServerWriter(env, u["host"], u["port"]).start()
        argv = [*env.orchestrator_prefix, DRFLOW, "protect", u["vm"], "--config", str(env.config),
                "--state-dir", str(env.state_dir), "--address", u["host"],
                "--port", str(u["port"]), "--standby-address", u["standby"]["address"],
                "--standby-host", u["standby"]["esx_host"],
                "--guest-password-ref", f"file:{env.lab_dir / 'secrets' / 'guest_password'}",
                "--yes", "--json"]
        t = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        took = time.monotonic() - t
        writer.stop(15)
        print(r.stderr[-4000:], flush=True)
        figures: dict[str, Any] = {}
        if r.returncode == 0:
            figures = json.loads(r.stdout.strip().splitlines()[-1])
        drill = figures.get("drill") or {}
        lost = len(writer.lost(u["standby"]["address"], u["port"])) if r.returncode == 0 else -1
        return {"protect_s": round(took, 2), "protected": r.returncode == 0 and
                drill.get("outcome") == "passed", "writes_lost": lost,
                "writes_refused": len(writer.refused), "writes_acked": len(writer.acked),
                "db_mb": round(db_bytes / 1e6), "steps_s": figures.get("steps")}
    finally:
        stop_env(env)


if __name__ == "__main__":
    main()
