"""Placeholder: replaced by the module's owner."""

import typer

app = typer.Typer(help="Check a drflow configuration file.", no_args_is_help=True)
