"""`drflow lab …`: the local DR lab on loopback (plugged into the CLI through an entry point)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="The local DR lab on 127.0.0.1: vcsim (prod and dr datacenters), a PostgreSQL "
    "primary/standby pair per group, moto (Route 53, S3, Secrets Manager), a Slack stand-in, "
    "and a power bridge tying VM power to the lab processes.",
    no_args_is_help=True,
)
console = Console()
DEFAULT_DIR = Path(os.environ.get("DRFLOW_LAB_DIR", "/tmp/drflow-lab"))  # as lab.manager
DirOpt = typer.Option(DEFAULT_DIR, "--dir", help="Lab directory (env DRFLOW_LAB_DIR).")


@app.command()
def up(
    groups: int = typer.Option(1, "--groups", min=1, max=20, help="Protection groups to create."),
    replication: str = typer.Option("sync", "--replication", help="sync or async."),
    lab_dir: Path = DirOpt,
    agents: bool = typer.Option(
        True, "--agents/--no-agents",
        help="Run a guest agent in each lab VM (reporting to the gateway URL in lab.json)."),
) -> None:
    """Start the lab and write DIR/lab.json (endpoints, credentials) and DIR/drflow.yaml."""
    from lab import manager

    try:
        manager.up(lab_dir, groups, replication, progress=console.print, agents=agents)
    except manager.LabError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    _print_status(lab_dir)


@app.command()
def status(
    lab_dir: Path = DirOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show every lab part and whether it is healthy (exit 1 if any is not)."""
    from lab import manager

    try:
        ok = _print_status(lab_dir, as_json)
    except manager.LabError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    raise typer.Exit(0 if ok else 1)


@app.command()
def down(lab_dir: Path = DirOpt) -> None:
    """Stop every lab process and remove the lab directory."""
    from lab import manager

    manager.down(lab_dir, progress=console.print)


def _print_status(lab_dir: Path, as_json: bool = False) -> bool:
    from lab import manager

    rows = manager.status(lab_dir)
    if as_json:
        print(json.dumps([{"part": p, "healthy": ok, "detail": d} for p, ok, d in rows]))
    else:
        table = Table(title=f"drflow lab in {lab_dir}")
        table.add_column("part")
        table.add_column("health")
        table.add_column("detail")
        for part, ok, detail in rows:
            table.add_row(part, "[green]healthy[/]" if ok else "[red]DOWN[/]", detail)
        console.print(table)
    return all(ok for _, ok, _ in rows)
