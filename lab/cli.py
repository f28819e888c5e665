"""Placeholder: replaced by the module's owner."""

import typer

app = typer.Typer(help="The local DR lab: vcsim, PostgreSQL pairs, moto, Slack stand-in.", no_args_is_help=True)
