"""`drflow runner`: the DR site's warm runner of deployment runs (orchestrator/warm_runner.py)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from orchestrator.cli_common import ConfigOpt

console = Console(stderr=True)


def runner(
    config: Path = ConfigOpt,
    pool: str = typer.Option("drflow-dr", "--pool",
                             help="Work pool whose runs to execute (drflow deploy makes "
                                  "drflow-<site>; the runbooks' deployments use drflow-dr)."),
    poll_s: float = typer.Option(2.0, "--poll", min=0.2,
                                 help="Seconds between asks to Prefect for the pool's scheduled "
                                      "runs (runs the gateway starts arrive at once through "
                                      "etcd; this catches the rest)."),
) -> None:
    """Execute the runbooks' deployment runs in this warm process, at the DR site.

    Start two or more, on different machines of the DR site, with PREFECT_API_URL set to the
    shared Prefect server; each has the config's secrets, vCenter sessions and Prefect's engine
    loaded before any outage. A run goes to the first runner (or Prefect worker) that claims it.
    Ctrl-C or SIGTERM stops taking runs; runs under way finish first."""
    from drflow.config.loader import load_config
    from drflow.etcd import Client
    from orchestrator.warm_runner import WarmRunner

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config)
    etcd = None
    if cfg.etcd is not None:
        etcd = Client([str(u) for u in cfg.etcd.endpoints], cfg.etcd.timeout_s)
    else:
        console.print("no etcd in the config: runs are found by polling Prefect only "
                      f"(every {poll_s:g} s)")
    wr = WarmRunner(str(config.resolve()), pool, etcd, poll_s=poll_s)
    console.print(f"warming up {wr.name} (secrets, vCenter sessions, Prefect) …")
    try:
        console.print(f"warm in {wr.warm_up():.2f} s")
    except Exception as exc:
        console.print(f"error: {type(exc).__name__}: {exc}\nCheck PREFECT_API_URL and that "
                      "`drflow deploy --config …` made the pool.")
        raise typer.Exit(2) from None

    def stop(*_: Any) -> None:
        wr.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    console.print(f"taking the runs of pool {pool} "
                  f"({'etcd dispatch + ' if etcd else ''}Prefect poll every {poll_s:g} s)")
    wr.serve()
    under_way = wr.running()
    if under_way:
        console.print(f"stopping: waiting for {len(under_way)} run(s) under way …")
        wr.join()
    wr.close()
    console.print("runner stopped")
