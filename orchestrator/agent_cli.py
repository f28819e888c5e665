"""`drflow agent …`: the guest agent's own command line (agents.cli, argparse) under drflow's.

The agent parses its arguments itself, so that the process in every VM does not load typer;
these commands only hand them over, `--help` included.
"""

from __future__ import annotations

import typer

from agents.cli import DISCOVER_HELP, HELP, RUN_HELP
from agents.cli import DRFLOW_PROG as PROG
from agents.cli import main as agent_main

# Every argument, option or not, reaches the agent's parser untouched.
_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True,
            "help_option_names": []}

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False)


def _forward(command: str, ctx: typer.Context) -> None:
    raise typer.Exit(agent_main([command, *ctx.args], prog=PROG))


@app.command(help=RUN_HELP, context_settings=_FORWARD, add_help_option=False)
def run(ctx: typer.Context) -> None:
    _forward("run", ctx)


@app.command(help=DISCOVER_HELP, context_settings=_FORWARD, add_help_option=False)
def discover(ctx: typer.Context) -> None:
    _forward("discover", ctx)
