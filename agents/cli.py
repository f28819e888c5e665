"""Placeholder: replaced by the module's owner."""

import typer

app = typer.Typer(help="Guest agent: monitor, repair, report.", no_args_is_help=True)
