"""What in a drill costs production its writes: each part of a drill's work, alone, under load.

A lab PostgreSQL pair with synchronous replication (as the lab's groups run) and a pgbench
database of `--scale`, `--clients` pgbench clients writing throughout. One after the other, with a
pause between, each part runs alone while the primary's commit rate is measured, relative to the
seconds just before and just after it:

- `idle`: nothing (what the measurement's own noise is);
- `base_backup`: `pg_basebackup` of the standby as a drill makes it (tasks/pg_copy.py: spread
  restartpoint, WAL fetched after the data, no manifest, no sync, `--max-rate`, niced), then
  removed;
- `base_backup_stream`: the same with the WAL streamed beside the copy (`-X stream`, the drill's
  fallback when the standby recycled the WAL the copy needs);
- `disk_write`: as many bytes as the database written to the same file system at `--max-rate`,
  from a process that touches no PostgreSQL;
- `standby_connections`: a connection to the standby, one query and a disconnect, 20 a second
  (a drill's readiness and observation steps connect a few times each).

Runs `--rounds` rounds; each figure is the median over them. The last line is one JSON object:
`{"idle": …, "base_backup_stream": …, …}` (write-throughput ratios, 1.0 = no cost).
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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.drill import commit_times  # noqa: E402
from lab import postgres  # noqa: E402

RUNAS = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
AROUND_S = 3.0  # the baseline: this long just before and just after each part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i scale (1 = ~16 MB)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench clients writing throughout")
    ap.add_argument("--max-rate", default="60M", help="pg_basebackup -r and the disk write's "
                                                      "pace (default 60M, the drill's default)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every part (default 3)")
    args = ap.parse_args()
    rate = int(args.max_rate.rstrip("Mm")) * 2**20

    work = Path(tempfile.mkdtemp(prefix="drflow-bench-drill-cost-", dir="/tmp"))
    work.chmod(0o777)  # the base backup is written by the postgres user
    primary = standby = None
    bench: subprocess.Popen[bytes] | None = None
    logs = work / "logs"
    marks: dict[str, list[tuple[float, float]]] = {}
    try:
        print("starting a lab PostgreSQL pair (synchronous) ...", flush=True)
        primary, standby = postgres.create_pair(work / "pg", "cost", sync=True)
        user, password = postgres.client_credentials(work / "pg")
        pgbench = postgres.pg_bin("pgbench")
        subprocess.run([*RUNAS, pgbench, "-h", str(primary.socket_dir), "-p", str(primary.port),
                        "-i", "-q", "-s", str(args.scale), "postgres"],
                       cwd="/tmp", check=True, capture_output=True)
        size = int(subprocess.run(
            [*RUNAS, "psql", "-h", str(primary.socket_dir), "-p", str(primary.port), "-Atc",
             "select pg_database_size('postgres')", "postgres"],
            cwd="/tmp", check=True, capture_output=True, text=True).stdout)
        logs.mkdir()
        if RUNAS:
            shutil.chown(logs, "postgres", "postgres")
        bench = subprocess.Popen(
            [*RUNAS, pgbench, "-h", str(primary.socket_dir), "-p", str(primary.port), "-n",
             "-c", str(args.clients), "-j", "2", "-T", "3600", "-l", "--log-prefix",
             str(logs / "tx"), "postgres"],
            cwd=logs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

        def base_backup(wal: str) -> Callable[[], None]:
            def run() -> None:
                target = work / "copy"
                done = subprocess.run(
                    ["nice", "-n", "10", *RUNAS, "env", f"PGPASSWORD={password}",
                     postgres.pg_bin("pg_basebackup"), "-h", standby.host, "-p", str(standby.port),
                     "-U", user, "-D", str(target), "-X", wal, "-c", "spread",
                     "--no-sync", "--no-manifest", "-r", args.max_rate],
                    cwd="/tmp", capture_output=True, text=True, check=False)
                shutil.rmtree(target, ignore_errors=True)
                if done.returncode:
                    raise RuntimeError(f"pg_basebackup -X {wal}: {done.stderr.strip()}")
            return run

        def disk_write() -> None:
            chunk, t0 = os.urandom(2**20), time.monotonic()
            with open(work / "blob", "wb") as f:
                for i in range(max(1, size // 2**20)):
                    f.write(chunk)
                    ahead = t0 + (i + 1) * 2**20 / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            os.remove(work / "blob")

        def standby_connections() -> None:
            import psycopg

            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.0:
                with psycopg.connect(host=standby.host, port=standby.port, user=user,
                                     password=password, dbname="postgres") as c:
                    c.execute("select pg_last_wal_replay_lsn()").fetchone()
                time.sleep(0.05)

        parts: dict[str, Callable[[], None]] = {
            "idle": lambda: time.sleep(4.0),
            "base_backup": base_backup("fetch"),
            "base_backup_stream": base_backup("stream"),
            "disk_write": disk_write,
            "standby_connections": standby_connections,
        }
        time.sleep(AROUND_S + 1)
        for r in range(args.rounds):
            for name, part in parts.items():
                print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
                start = time.time()
                part()
                marks.setdefault(name, []).append((start, time.time()))
                time.sleep(AROUND_S + 1)
    finally:
        if bench is not None:
            os.killpg(bench.pid, signal.SIGINT)
            bench.wait(20)
        for inst in (standby, primary):
            if inst is not None:
                postgres.destroy(inst)
    stamps = commit_times(logs)
    shutil.rmtree(work, ignore_errors=True)

    result: dict[str, float] = {}
    for name, spans in marks.items():
        ratios = []
        for a, b in spans:
            around = sum(1 for s in stamps if a - AROUND_S <= s < a or b <= s < b + AROUND_S)
            during = sum(1 for s in stamps if a <= s < b)
            ratios.append((during / (b - a)) / (around / (2 * AROUND_S)))
        result[name] = round(statistics.median(ratios), 3)
        print(f"{name:<22} {statistics.median(b - a for a, b in spans):5.1f} s   ratio "
              f"{result[name]:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    print(json.dumps({**result, "db_mb": round(size / 1e6), "max_rate": args.max_rate,
                      "rounds": args.rounds}))


if __name__ == "__main__":
    main()
