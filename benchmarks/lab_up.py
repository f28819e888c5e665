"""Time `drflow lab up --groups N` (median over runs); last line: {"lab_up_s": …}."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DRFLOW = str(Path(sys.executable).parent / "drflow")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    times = []
    for i in range(args.runs):
        lab_dir = Path(tempfile.mkdtemp(prefix="drflow-bench-", dir="/tmp"))
        lab_dir.rmdir()
        t0 = time.monotonic()
        up = subprocess.run([DRFLOW, "lab", "up", "--groups", str(args.groups), "--dir", str(lab_dir)],
                            capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        status = subprocess.run([DRFLOW, "lab", "status", "--dir", str(lab_dir)],
                                capture_output=True, text=True)
        subprocess.run([DRFLOW, "lab", "down", "--dir", str(lab_dir)], capture_output=True)
        if up.returncode != 0 or status.returncode != 0:
            print(up.stdout, up.stderr, status.stdout, file=sys.stderr)
            sys.exit(f"run {i + 1}: lab did not come up healthy")
        times.append(elapsed)
        print(f"run {i + 1}: lab up --groups {args.groups} in {elapsed:.1f} s, all parts healthy")
    print(json.dumps({"lab_up_s": round(statistics.median(times), 2), "groups": args.groups,
                      "runs": args.runs, "all_s": [round(t, 2) for t in times]}))


if __name__ == "__main__":
    main()
