"""Placeholder: replaced by the module's owner."""

import typer

app = typer.Typer(help="Tamper-evident audit trail.", no_args_is_help=True)
