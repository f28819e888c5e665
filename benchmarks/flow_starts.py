"""How long N runbook flows started together take to begin their work, on a quiet machine.

Each flow is called in a thread of one process, as the gateway's warm runner calls failovers,
with the runner's settings (one TLS context, no heartbeats) and takes its group's slot
(`flows/locks.py`) like a runbook does; its start is the time from the call until it holds the
slot. Against a throwaway Prefect server on SQLite (what `drflow up` runs) or PostgreSQL (what
production runs). The first round warms the server and is not counted.

Last line: {"database", "flows", "rounds", "start_p50_s", "start_max_s", "single_start_s"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.harness import throwaway_prefect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=5, help="flows started together (default 5)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds counted (default 5)")
    ap.add_argument("--prefect-database", choices=("sqlite", "postgresql"), default="sqlite")
    args = ap.parse_args()
    with throwaway_prefect(args.prefect_database):
        result = measure(args.flows, args.rounds)
    print(json.dumps({"database": args.prefect_database, **result}))


def measure(n: int, rounds: int) -> dict[str, object]:
    from prefect import flow

    import flows  # noqa: F401  (the runner's TLS context)
    from flows.locks import ensure_limit, exclusive
    from orchestrator.embedded import no_heartbeats, warm_up_flow

    with no_heartbeats():
        warm_up_flow()
    for i in range(n):
        ensure_limit(f"roles-bench-{i}")
    started: dict[int, float] = {}

    @flow(name="start-probe", persist_result=False)
    def probe(i: int, t0: float) -> None:
        with exclusive(f"roles-bench-{i}"):
            started[i] = time.monotonic() - t0

    def call(i: int, t0: float) -> None:
        with no_heartbeats():
            probe(i, t0)

    def one_round(k: int) -> list[float]:
        started.clear()
        t0 = time.monotonic()
        threads = [threading.Thread(target=call, args=(i, t0)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(started.values())

    one_round(n)  # warms the server's caches and the runner's clients
    all_starts: list[float] = []
    for r in range(rounds):
        starts = one_round(n)
        all_starts += starts
        print(f"round {r + 1}: " + ", ".join(f"{s:.2f}" for s in starts) + " s", flush=True)
        time.sleep(1.0)
    single = statistics.median(one_round(1)[0] for _ in range(3))
    return {"flows": n, "rounds": rounds,
            "start_p50_s": round(statistics.median(all_starts), 3),
            "start_max_s": round(max(all_starts), 3), "single_start_s": round(single, 3)}


if __name__ == "__main__":
    main()
