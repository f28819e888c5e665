"""`drflow config …`: check a configuration file and show it as drflow reads it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from drflow.config import DrflowConfig

app = typer.Typer(
    help="Check a drflow configuration file (start from examples/drflow.yaml).",
    no_args_is_help=True,
)

FileArg = Annotated[Path, typer.Argument(metavar="FILE", show_default=False,
                                          help="The drflow YAML file, e.g. drflow.yaml.")]

EXIT_INVALID = 2
EXIT_SECRETS = 1


@app.callback()
def _group() -> None:
    """Check a drflow configuration file (start from examples/drflow.yaml)."""


def _load_or_exit(file: Path) -> DrflowConfig:
    from drflow.config import ConfigError, load_config  # pydantic models: only when used

    try:
        return load_config(file)
    except ConfigError as e:
        for p in e.problems:
            typer.echo(p.format(e.source), err=True)
        n = len(e.problems)
        typer.echo(f"{n} problem{'s' if n != 1 else ''} in {e.source}; nothing was changed.",
                   err=True)
        raise typer.Exit(EXIT_INVALID) from None


def _summary(cfg: DrflowConfig) -> list[str]:
    lines = [f"{len(cfg.sites)} site(s): {', '.join(cfg.sites)}",
             f"{len(cfg.groups)} group(s):"]
    for g in cfg.groups:
        auto = "auto-failover" if g.policy.auto_failover else "manual failover"
        lines.append(
            f"  {g.name}: {g.application} {g.replication}, {g.primary.site} → {g.standby.site}, "
            f"RPO budget {g.rpo_budget_s:g} s, {g.dns.record} (ttl {g.dns.ttl}), {auto}"
        )
    return lines


@app.command()
def check(
    file: FileArg,
    resolve_secrets: Annotated[bool, typer.Option(
        "--resolve-secrets",
        help="Also fetch every secret reference (env:, file:, aws-sm:); prints ok or the "
             "failure for each, never a value.",
    )] = False,
) -> None:
    """Validate FILE: every problem is printed as FILE:LINE: field.path: message.

    Exit status: 0 valid; 2 invalid or unreadable; 1 valid but a secret could not be resolved.
    """
    cfg = _load_or_exit(file)
    typer.echo(f"{file}: ok")
    for line in _summary(cfg):
        typer.echo(line)
    if not resolve_secrets:
        return
    from drflow.secrets import SecretError

    failures = 0
    typer.echo("secrets:")
    for path, ref in cfg.refs():
        try:
            cfg.secret(ref)
        except SecretError as e:
            failures += 1
            typer.echo(f"  {path}: FAILED: {e}")
        else:
            typer.echo(f"  {path} ({ref.ref}): ok")
    if failures:
        typer.echo(f"{failures} secret reference(s) could not be resolved.", err=True)
        raise typer.Exit(EXIT_SECRETS)


@app.command()
def show(file: FileArg) -> None:
    """Print FILE as drflow reads it, defaults filled in (secrets stay references)."""
    from drflow.config import dump_config

    typer.echo(dump_config(_load_or_exit(file)), nl=False)
