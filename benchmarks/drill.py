"""Benchmark a DR drill on its own lab: drill wall time, measured RTO and RPO for a pgbench-loaded
database, and the primary's write throughput during the drill relative to just before it.

RTO counts from the moment the copy of the standby is complete; `drill_ready_s` from the drill's
start (flows/drill.py says why).

`--placement sites` gives production (its PostgreSQL primary and the pgbench clients, its
application) CPU 0 to itself and runs everything else on CPU 1: the DR site's standby, the drill
(its flow, Prefect server, the copy) and the lab's services. In a datacenter the production VM
does not share its CPUs with the DR VM or the orchestrator; on the lab's two shared cores
(`--placement shared`, the default) production competes with all of them (measured, that is not
where most of a drill's cost is: BENCHMARKS.md).

`--pg-storage btrfs` puts the lab's data directories on btrfs subvolumes: the drill then
snapshots the standby instead of copying it (docs/drills.md).

`writes_lost_s`: production's writes lost to the drill, in seconds of its baseline rate
((baseline - during) * drill duration / baseline), which, unlike the ratio, does not depend on
how long the drill takes to spend the same cost.

Last line: {"drill_s": …, "drill_rto_s": …, "drill_rpo_s": …, "write_throughput_ratio": …,
"writes_lost_s": …, …}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i scale (1 = ~16 MB)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench clients writing throughout")
    ap.add_argument("--baseline-s", type=float, default=5.0,
                    help="writes measured just before and just after each drill")
    ap.add_argument("--drills", type=int, default=3, help="drills in a row (figures: median)")
    ap.add_argument("--by-step", action="store_true", help="also print write rates per step")
    ap.add_argument("--cpu", action="store_true",
                    help="also print the CPU time each process spent during each drill")
    ap.add_argument("--max-rate", default=None,
                    help="drill.max_rate for the copy (default: the config's default; "
                         "'unlimited' for none)")
    ap.add_argument("--pg-storage", choices=("plain", "btrfs"), default="plain",
                    help="plain (default): the lab's data directories on the machine's file "
                         "system, the drill copies the standby with pg_basebackup; btrfs: each a "
                         "btrfs subvolume, the drill snapshots the standby")
    ap.add_argument("--placement", choices=("shared", "sites"), default="shared",
                    help="shared: every process on every CPU (default); sites: production "
                         "(primary, pgbench) alone on CPU 0, the rest on CPU 1")
    args = ap.parse_args()
    if args.placement == "sites":
        if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
            ap.error("--placement sites needs CPUs 0 and 1")
        # Inherited by everything this process starts: the Prefect server, the lab, the drill.
        os.sched_setaffinity(0, {1})

    root = Path(tempfile.mkdtemp(prefix="drflow-bench-drill-", dir="/tmp"))
    root.chmod(0o755)
    lab_dir = root / "lab"
    home = root / "prefect"
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_LOGGING_LEVEL="WARNING")
    from lab import manager, procs
    from orchestrator.prefect_local import start_local_server

    port = procs.free_port()
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"  # before prefect is imported
    server = None
    try:
        t = time.monotonic()
        server = start_local_server(home, port)
        state = manager.up(lab_dir, groups=1, replication="sync", progress=lambda _m: None,
                           pg_storage=args.pg_storage)
        print(f"lab and Prefect up in {time.monotonic() - t:.1f} s", flush=True)
        config, max_rate = _config(lab_dir, root, args.max_rate)
        group = state["groups"][0]["name"]
        pair = state["postgres"][group]["primary"]
        t = time.monotonic()
        db_bytes = _pgbench_init(pair, args.scale)
        print(f"pgbench -i -s {args.scale}: {db_bytes / 1e6:.0f} MB in {time.monotonic() - t:.1f} s",
              flush=True)
        if args.placement == "sites":
            print(f"production on CPU 0: {_pin_tree(Path(pair['datadir']), 0)} processes",
                  flush=True)
        results = [_one(config, group, pair, root / f"pgbench-{i}", args) for i in range(args.drills)]
    finally:
        manager.down(lab_dir, progress=lambda _m: None)
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

    def med(key: str) -> float | None:
        vals = [r[key] for r in results if r.get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None

    print(json.dumps({
        "drill_s": med("drill_s"), "drill_rto_s": med("rto_s"), "drill_ready_s": med("ready_s"),
        "drill_rpo_s": med("rpo_s"),
        "write_throughput_ratio": med("ratio"), "writes_lost_s": med("lost_s"),
        "drill_rpo_bytes": med("rpo_bytes"),
        "db_mb": round(db_bytes / 1e6), "pgbench_scale": args.scale, "clients": args.clients,
        "copy_max_rate": max_rate,
        "tps_baseline": med("tps_baseline"), "tps_during": med("tps_during"),
        "placement": args.placement, "pg_storage": args.pg_storage,
        "copy_method": results[0].get("copy_method") if results else None,
        "drills": len(results), "all_passed": all(r["outcome"] == "passed" for r in results),
    }))


def _config(lab_dir: Path, root: Path, max_rate: str | None) -> tuple[str, str | None]:
    from drflow.config import DrillConfig

    cfg = yaml.safe_load((lab_dir / "drflow.yaml").read_text())
    # The lab's work_dir: with btrfs storage it is on the standbys' file system, as a snapshot needs.
    cfg["drill"] = {**cfg.get("drill", {}), "port_range": [47000, 47999]}
    if max_rate is not None:
        cfg["drill"]["max_rate"] = None if max_rate == "unlimited" else max_rate
    path = root / "drflow.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path), DrillConfig.model_validate(cfg["drill"]).max_rate


def _pin_tree(datadir: Path, cpu: int) -> int:
    """Move a running PostgreSQL (its postmaster and every process under it) to one CPU; the
    backends it forks later inherit the postmaster's CPU."""
    import psutil

    postmaster = psutil.Process(int((datadir / "postmaster.pid").read_text().split()[0]))
    moved = 0
    for proc in [postmaster, *postmaster.children(recursive=True)]:
        try:  # a backend may end while we move it
            for thread in proc.threads():
                os.sched_setaffinity(thread.id, {cpu})
            moved += 1
        except (psutil.NoSuchProcess, ProcessLookupError, FileNotFoundError):
            continue
    return moved


def _pg(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    runas = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*runas, *argv], text=True, capture_output=True, check=True, **kw)


def _pgbench_bin() -> str:
    from lab.postgres import pg_bin

    return pg_bin("pgbench")


def _pgbench_init(pair: dict[str, Any], scale: int) -> int:
    _pg([_pgbench_bin(), "-h", pair["socket_dir"], "-p", str(pair["port"]), "-i", "-q",
         "-s", str(scale), "postgres"], cwd="/tmp")
    out = _pg(["psql", "-h", pair["socket_dir"], "-p", str(pair["port"]), "-Atc",
               "select pg_database_size('postgres')", "postgres"], cwd="/tmp")
    return int(out.stdout.strip())


def _one(config: str, group: str, pair: dict[str, Any], logs: Path,
         args: argparse.Namespace) -> dict[str, Any]:
    """Write with pgbench throughout; drill between two baseline windows; compare commit rates."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.drill import drill

    logs.mkdir()
    runas = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if runas:  # pgbench writes its transaction logs as `postgres`
        shutil.chown(logs, "postgres", "postgres")
    bench = subprocess.Popen(
        [*(["taskset", "-c", "0"] if args.placement == "sites" else []), *runas,
         _pgbench_bin(), "-h", pair["socket_dir"], "-p", str(pair["port"]), "-n",
         "-c", str(args.clients), "-j", "2", "-T", "600", "-l", "--log-prefix",
         str(logs / "tx"), "postgres"],
        cwd=logs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # A shell's background job inherits SIGINT ignored, and so would pgbench: the SIGINT
        # that ends it below must not be lost.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(1.0 + args.baseline_s)  # 1 s of warm-up, then the baseline window
        start = time.time()
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            t = time.monotonic()
            cpu_before = _cpu_by_process() if args.cpu else {}
            figures = drill(group, config_path=config, raise_on_failure=False)
            cpu_after = _cpu_by_process() if args.cpu else {}
            wall = time.monotonic() - t
        end = time.time()
        time.sleep(args.baseline_s + 0.5)  # a second baseline window, after the drill
    finally:
        # Log lines of its very last moments may be lost: they are after every window we count.
        os.killpg(bench.pid, signal.SIGINT)
        bench.wait(20)
    stamps = commit_times(logs)
    # The baseline is the mean of the windows just before and just after the drill, so that a
    # drift of the machine's load (others share it) does not count for or against the drill.
    b = args.baseline_s
    base = sum(1 for s in stamps if start - b <= s < start or end <= s < end + b) / (2 * b)
    during = sum(1 for s in stamps if start <= s < end) / (end - start)
    ratio = during / base if base else None
    # Production's loss in writes, whatever the drill's length: a ratio over the drill's duration
    # rewards a long, cheap copy and punishes a short drill of the same total cost.
    lost_s = (base - during) * (end - start) / base if base else None
    print(f"drill {figures['outcome']}: wall {wall:.2f} s, RTO {figures['rto_s']} s (ready "
          f"{figures.get('ready_s')} s after the start), RPO "
          f"{figures['rpo_s']} s / {figures['rpo_bytes']} bytes; writes {base:.0f} tps around, "
          f"{during:.0f} tps during (ratio {ratio:.2f}; {lost_s:.2f} s of production's writes "
          f"lost)" if ratio and lost_s is not None else "no baseline writes",
          flush=True)
    if args.by_step:  # where the drill costs production its writes
        t = start
        for step in figures["steps"]:
            n = sum(1 for s in stamps if t <= s < t + step["seconds"])
            rate = n / step["seconds"] if step["seconds"] > 0 else 0
            print(f"    {step['name']:<34} {step['seconds']:6.2f} s  {rate:6.0f} tps "
                  f"({rate / base:.2f})" if base else "", flush=True)
            t += step["seconds"]
    if args.cpu:
        _print_cpu(cpu_before, cpu_after, wall)
    if figures["outcome"] != "passed":
        print(f"  reason: {figures['reason']}", flush=True)
    return {"drill_s": figures["drill_s"], "rto_s": figures["rto_s"],
            "ready_s": figures.get("ready_s"), "rpo_s": figures["rpo_s"],
            "rpo_bytes": figures["rpo_bytes"], "ratio": ratio, "lost_s": lost_s,
            "tps_baseline": base,
            "tps_during": during, "outcome": figures["outcome"],
            "copy_method": figures.get("copy_method")}


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process, by pid, with what it is."""
    import psutil

    seen = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        seen[p.pid] = (_what(p.info["name"] or "", " ".join(p.info["cmdline"] or [])),
                       t.user + t.system)
    return seen


def _what(name: str, cmd: str) -> str:
    if "prefect" in cmd and "server" in cmd:
        return "Prefect server"
    if "benchmarks/drill.py" in cmd:
        return "the drill's flow (this process)"
    if name.startswith("postgres") or cmd.startswith("postgres:"):
        return "PostgreSQL " + " ".join(cmd.split()[1:3]).rstrip(":")
    return name.split("/")[0] or cmd[:40]


def _print_cpu(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               wall: float) -> None:
    """Per kind of process, the CPU it spent during the drill (processes that ended during it,
    such as the copy's server, are not counted)."""
    spent: dict[str, float] = {}
    for pid, (what, cpu) in after.items():
        spent[what] = spent.get(what, 0.0) + cpu - before.get(pid, (what, 0.0))[1]
    print(f"    CPU during the drill ({wall:.2f} s):", flush=True)
    for what, cpu in sorted(spent.items(), key=lambda kv: -kv[1])[:10]:
        if cpu >= 0.02:
            print(f"      {cpu:6.2f} s  {what}", flush=True)


def commit_times(logs: Path) -> list[float]:
    """Commit times (epoch s) from pgbench's per-transaction logs (`-l`)."""
    stamps = []
    for f in logs.glob("tx*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            # client_id transaction_no time script_no time_epoch time_us
            if len(parts) >= 6 and parts[4].isdigit():
                stamps.append(int(parts[4]) + int(parts[5]) / 1e6)
    return stamps


if __name__ == "__main__":
    main()
