"""What the command-line modules share: finding the Prefect API or exiting with how to start one."""

from __future__ import annotations

from pathlib import Path

import typer

ConfigOpt = typer.Option(..., "--config", "-c", envvar="DRFLOW_CONFIG", exists=True, dir_okay=False,
                         help="drflow configuration file (env DRFLOW_CONFIG).")


def need_prefect(state_dir: Path) -> str:
    """PREFECT_API_URL, or the Prefect that `drflow up` recorded in `state_dir`; else exit 2
    saying how to start one (never Prefect's fallback to a temporary database)."""
    from orchestrator.prefect_api import NoPrefectAPI, resolve

    try:
        return resolve(state_dir)
    except NoPrefectAPI as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
