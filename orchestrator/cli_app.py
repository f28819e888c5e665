"""The `drflow` command line's Typer app, with every subcommand plugged in (`drflow agent`
is dispatched before this is imported: orchestrator/cli.py).

Subcommand modules import heavy libraries inside their commands, so that `--help` is instant.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import typer

from drflow.audit.cli import app as audit_app
from drflow.config_cli import app as config_app
from orchestrator.agent_cli import app as agent_app


def _flags_show_no_type() -> None:
    # Typer 0.29 prints `<bool>` beside flags (--help, --json), which take no value: print nothing.
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    setattr(TyperOption, "display_type_rich", display_type_rich)  # noqa: B010


_flags_show_no_type()

app = typer.Typer(
    help="drflow: DR runbooks for business-critical applications in VMware VMs.\n\n"
    "Failover, re-protect, failback and DR drills as Prefect flows, driven by guest agents.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(config_app, name="config")
app.add_typer(agent_app, name="agent")
app.add_typer(audit_app, name="audit")


def _add_plugins() -> None:
    # The runbook commands and the lab plug in through entry points, imported only when the
    # command line runs (product code never imports the lab). An entry point is a Typer (a
    # command group) or a function that adds commands.
    for ep in entry_points(group="drflow.cli"):
        try:
            obj = ep.load()
        except ImportError:
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        else:
            obj(app)


def run() -> None:
    _add_plugins()
    app()
