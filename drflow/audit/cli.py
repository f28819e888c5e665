"""`drflow audit show | verify | verify-export | export`: read, check and archive the trail."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from drflow.audit.store import AuditStore

app = typer.Typer(help="Tamper-evident audit trail: show, verify and export it.",
                  no_args_is_help=True)

DEFAULT_URL = "sqlite:///./drflow-audit.db"  # the same as drflow.audit.store.DEFAULT_URL
DEFAULT_RETENTION_DAYS = 365

UrlOpt = Annotated[str | None, typer.Option(
    "--url", help="Audit store URL (sqlite:///path or postgresql://…). Default: audit.url from "
    "--config, else $DRFLOW_AUDIT_URL, else " + DEFAULT_URL, show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", envvar="DRFLOW_CONFIG", help="drflow configuration file (its `audit:` section).",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@dataclass
class _Settings:
    """What the config's `audit:` (and `aws:`) sections say; all empty without a config."""

    url: str | None = None
    password: Any = None  # SecretStr from audit.password, for PostgreSQL
    s3_bucket: str | None = None
    retention_days: int | None = None
    config: Any = None  # the loaded DrflowConfig, for the aws section at export time


def _settings(config: Path | None) -> _Settings:
    if config is None:
        return _Settings()
    if not config.is_file():
        raise _fail(f"config file {config} not found", 2)
    try:
        config_mod: Any = importlib.import_module("drflow.config")
    except ImportError:
        config_mod = None
    try:
        if config_mod is None:
            # Without drflow.config, read the one section needed straight from the YAML.
            import yaml

            section = (yaml.safe_load(config.read_text()) or {}).get("audit") or {}
            return _Settings(url=section.get("url"), s3_bucket=section.get("s3_bucket"),
                             retention_days=section.get("retention_days"))
        cfg = config_mod.load_config(config)
    except Exception as exc:
        raise _fail(f"cannot load config {config}: {exc}", 2) from exc
    audit = cfg.audit
    password = None
    if getattr(audit, "password", None) is not None:
        try:
            password = cfg.secret(audit.password)
        except Exception as exc:
            raise _fail(f"cannot resolve audit.password in {config}: {exc}", 2) from exc
    return _Settings(url=audit.url, password=password, s3_bucket=audit.s3_bucket,
                     retention_days=audit.retention_days, config=cfg)


def _open(url: str | None, config: Path | None) -> tuple[AuditStore, _Settings]:
    from drflow.audit.open import open_store
    from drflow.audit.store import AuditStoreError

    settings = _settings(config)
    target = url or settings.url or os.environ.get("DRFLOW_AUDIT_URL") or DEFAULT_URL
    try:
        return open_store(target, create=False, password=settings.password), settings
    except AuditStoreError as exc:
        raise _fail(str(exc), 2) from exc


@app.command()
def show(url: UrlOpt = None, config: ConfigOpt = None,
         limit: Annotated[int, typer.Option("--limit", "-n", min=1,
                                            help="Show the last N records.")] = 50,
         since: Annotated[int | None, typer.Option(
             "--since", help="Show records after this seq instead of the last N.",
             show_default=False)] = None,
         as_json: JsonOpt = False) -> None:
    """Show audit records, newest last."""
    from drflow.audit.records import canonical_json
    from drflow.audit.store import AuditStoreError

    store, _ = _open(url, config)
    try:
        with store:
            if since is None:
                last, _h = store.head()
                since = max(0, last - limit)
            records = store.records(since_seq=since, limit=limit)
    except AuditStoreError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        for rec in records:
            typer.echo(canonical_json(rec.model_dump()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Audit trail: {store.location}", show_lines=False)
    for col in ("seq", "time (UTC)", "actor", "action", "target", "outcome", "s", "reason",
                "parameters", "hash"):
        table.add_column(col, overflow="fold")
    styles = {"ok": "green", "failed": "red", "refused": "yellow", "started": "cyan"}
    for rec in records:
        table.add_row(
            str(rec.seq), rec.time[:23].replace("T", " "), rec.actor, rec.action, rec.target,
            f"[{styles.get(rec.outcome, 'white')}]{rec.outcome}[/]",
            "" if rec.duration_s is None else f"{rec.duration_s:.2f}", rec.reason,
            json.dumps(rec.parameters, sort_keys=True)[:120], rec.hash[:12])
    # Piped output (no terminal) would otherwise be squeezed into 80 columns.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if not records:
        typer.echo("no records")


def _parse_head(text: str) -> tuple[int, str]:
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise typer.BadParameter("expected SEQ:HASH, e.g. 42:3f2a… (64 hex digits)")
    return int(seq), digest.lower()


@app.command()
def verify(url: UrlOpt = None, config: ConfigOpt = None,
           expect_head: Annotated[str | None, typer.Option(
               "--expect-head", metavar="SEQ:HASH",
               help="A head noted earlier: the chain must still contain it (detects a "
               "truncated tail).", show_default=False)] = None,
           anchor: Annotated[Path | None, typer.Option(
               "--anchor", help="An earlier export file whose head the chain must contain.",
               show_default=False)] = None,
           as_json: JsonOpt = False) -> None:
    """Recompute every hash and link; exit 1 naming the first bad record."""
    from drflow.audit.export import read_export_head
    from drflow.audit.store import AuditStoreError

    expected = _parse_head(expect_head) if expect_head else None
    if anchor is not None:
        try:
            expected = read_export_head(anchor)
        except (OSError, AuditStoreError) as exc:
            raise _fail(f"cannot read the anchor {anchor}: {exc}", 2) from exc
    store, _ = _open(url, config)
    with store:
        result = store.verify(expected_head=expected)
    if as_json:
        typer.echo(json.dumps({"ok": result.ok, "checked": result.checked,
                               "first_bad_seq": result.first_bad_seq,
                               "problem": result.problem, "head_seq": result.head_seq,
                               "head_hash": result.head_hash, "notes": list(result.notes),
                               "store": store.location}))
    else:
        typer.echo(result.summary())
        for note in result.notes:
            typer.echo(f"note: {note}", err=True)
    raise typer.Exit(0 if result.ok else 1)


@app.command("verify-export")
def verify_export_cmd(path: Annotated[Path, typer.Argument(help="An export (JSON lines).")]
                      ) -> None:
    """Verify an export file on its own (e.g. one fetched back from S3)."""
    from drflow.audit.export import verify_export
    from drflow.audit.store import AuditStoreError

    try:
        with open(path, encoding="ascii") as f:
            result = verify_export(f)
    except (OSError, ValueError, AuditStoreError) as exc:
        raise _fail(f"cannot read {path}: {exc}", 2) from exc
    typer.echo(result.summary())
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def export(to: Annotated[str | None, typer.Option(
               "--to", metavar="s3://BUCKET/PREFIX | FILE",
               help="Destination; default s3://<audit.s3_bucket>/drflow-audit from the config.",
               show_default=False)] = None,
           url: UrlOpt = None, config: ConfigOpt = None,
           retention_days: Annotated[int | None, typer.Option(
               "--retention-days", min=1, help="S3 Object Lock retention (default: "
               f"audit.retention_days, else {DEFAULT_RETENTION_DAYS}).",
               show_default=False)] = None,
           mode: Annotated[str, typer.Option(
               "--mode", help="Object Lock mode: GOVERNANCE or COMPLIANCE.")] = "GOVERNANCE",
           endpoint_url: Annotated[str | None, typer.Option(
               "--endpoint-url", envvar="AWS_ENDPOINT_URL",
               help="S3 endpoint (e.g. a local S3-compatible server).",
               show_default=False)] = None,
           region: Annotated[str | None, typer.Option(
               "--region", envvar="AWS_DEFAULT_REGION", show_default=False)] = None) -> None:
    """Export all records plus the chain head, to S3 under Object Lock or to a local file."""
    from drflow.audit.export import export_to_file, export_to_s3
    from drflow.audit.store import AuditStoreError

    store, settings = _open(url, config)
    if to is None:
        if not settings.s3_bucket:
            raise _fail("say where to export: --to s3://bucket/prefix or --to FILE "
                        "(or set audit.s3_bucket in the config)", 2)
        to = f"s3://{settings.s3_bucket}/drflow-audit"
    days = int(retention_days or settings.retention_days or DEFAULT_RETENTION_DAYS)
    try:
        with store:
            if to.startswith("s3://"):
                bucket, _, prefix = to[len("s3://"):].partition("/")
                if not bucket:
                    raise _fail(f"no bucket in {to!r}: use s3://bucket/prefix", 2)
                s3 = _s3_client(settings, endpoint_url, region)
                key = export_to_s3(store, s3, bucket, prefix, days, mode)
                where = f"s3://{bucket}/{key} (Object Lock {mode.upper()}, {days} days)"
            else:
                where = str(export_to_file(store, to))
            head_seq, head_hash = store.head()
    except AuditStoreError as exc:
        raise _fail(str(exc)) from exc
    except ValueError as exc:
        raise _fail(str(exc), 2) from exc
    except Exception as exc:  # boto/botocore errors: say what failed, without a traceback
        if type(exc).__module__.startswith(("botocore", "boto3")):
            raise _fail(f"export to {to} failed: {exc}") from exc
        raise
    typer.echo(f"exported to {where}; store head now seq {head_seq} {head_hash}")


def _s3_client(settings: _Settings, endpoint_url: str | None, region: str | None) -> Any:
    """boto3 S3 client: options and environment first, then the config's `aws:` section."""
    import boto3

    kw: dict[str, Any] = {}
    if settings.config is not None and getattr(settings.config, "aws", None) is not None:
        from drflow.secrets import aws_client_kwargs

        kw = aws_client_kwargs(settings.config.aws)
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    if region:
        kw["region_name"] = region
    kw.setdefault("region_name", "us-east-1")
    if kw.get("endpoint_url") is not None:
        kw["endpoint_url"] = str(kw["endpoint_url"])
    return boto3.client("s3", **kw)
