"""The `drflow` command line. Subcommand modules import heavy libraries inside their commands,
so that `drflow agent run` stays light and `--help` is instant."""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from agents.cli import app as agent_app
from drflow.audit.cli import app as audit_app
from drflow.config_cli import app as config_app

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
    # The lab registers itself through an entry point: product code never imports it.
    for ep in entry_points(group="drflow.cli"):
        try:
            app.add_typer(ep.load(), name=ep.name)
        except ImportError:
            continue


def main() -> None:
    _add_plugins()
    app()


if __name__ == "__main__":
    main()
