"""Commands that run the runbooks: `drflow gateway`, `drflow failover`, …

Modules import Prefect and the runbooks inside the commands, so `drflow --help` stays instant.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
ConfigOpt = typer.Option(..., "--config", "-c", envvar="DRFLOW_CONFIG", exists=True, dir_okay=False,
                         help="drflow configuration file (env DRFLOW_CONFIG).")


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)
    app.command("failover")(failover_cmd)


def gateway(
    config: Path = ConfigOpt,
    state_dir: Path = typer.Option(Path("./drflow-state"), "--state-dir",
                                   help="Where the gateway keeps its dedupe and incident state."),
    listen: str = typer.Option("", "--listen", help="HOST:PORT; default: gateway.listen of the config."),
) -> None:
    """Receive agent webhooks and run failovers in this process (the warm path)."""
    import uvicorn

    from drflow.gateway import create_app
    from drflow.gateway.from_config import listen_address, settings_from_config
    from flows.embedded import EmbeddedStarter
    from flows.runtime import runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["DRFLOW_CONFIG"] = str(config.resolve())
    rt = runtime(str(config))
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_from_config(rt.cfg, state_dir / "gateway.db")
    host, port = listen_address(rt.cfg)
    if listen:
        host, _, p = listen.rpartition(":")
        port = int(p)
    starter = EmbeddedStarter(str(config.resolve()))
    app = create_app(settings, starter, audit=rt.audit)
    starter.close = app.state.gateway.close_incident_threadsafe
    console.print("warming up (secrets, vCenter sessions, Prefect) …")
    console.print(f"warm in {starter.warm_up():.2f} s")
    console.print(f"gateway on http://{host}:{port} (events: /v1/events, metrics: /metrics)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def failover_cmd(
    group: str = typer.Argument(..., help="Protection group to fail over."),
    config: Path = ConfigOpt,
    force: bool = typer.Option(False, "--force",
                               help="Promote even beyond the RPO budget (audited override)."),
    reason: str = typer.Option("manual failover", "--reason", help="Why, for the audit trail."),
) -> None:
    """Fail a group over to its standby now (confirm, fence, promote, DNS, verify)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.failover import failover

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        result = failover(group, {"kind": "manual", "reason": reason}, force=force,
                          config_path=str(config.resolve()))
    console.print(result)
    raise typer.Exit(0 if result.get("outcome") == "failed_over" else 1)
