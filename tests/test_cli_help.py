"""Every `drflow` command answers --help with a description of what it does."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import click
import typer.main
from typer.testing import CliRunner

from orchestrator.cli_app import _add_plugins, app

DRFLOW = str(Path(sys.executable).parent / "drflow")


def _commands() -> list[tuple[list[str], click.Command]]:
    _add_plugins()
    root = typer.main.get_command(app)
    found: list[tuple[list[str], click.Command]] = []

    def walk(path: list[str], cmd: click.Command) -> None:
        found.append((path, cmd))
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk([*path, name], sub)

    walk([], root)
    return found


def test_every_command_has_a_description() -> None:
    commands = _commands()
    names = {" ".join(p) for p, _ in commands}
    for expected in ("up", "gateway", "failover", "agent run", "agent discover", "config check",
                     "audit verify", "lab up", "lab status", "lab down", "drill run"):
        assert expected in names
    undocumented = [" ".join(p) for p, c in commands if p and not (c.help or "").strip()]
    assert undocumented == []


def test_help_runs_for_every_command() -> None:
    for path, _ in _commands():
        out = subprocess.run([DRFLOW, *path, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (path, out.stderr)
        assert "Usage" in out.stdout


def test_help_reads_well_at_80_columns() -> None:
    # A group lists each command by the first paragraph of its help, line breaks included: one
    # line of source, or the listing breaks mid-sentence. Flags take no value: no `<bool>`.
    commands = _commands()
    broken = [" ".join(p) for p, c in commands
              if "\n" in inspect.cleandoc(c.help or "").split("\n\n")[0]]
    assert broken == []
    runner = CliRunner()
    for path, _ in commands:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert out.exit_code == 0, (path, out.output)
        assert "<bool>" not in out.output, path
        assert max(len(line) for line in out.output.splitlines()) <= 80, path
