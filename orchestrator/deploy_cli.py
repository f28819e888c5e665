"""`drflow deploy`: the work pools, the concurrency limits and the deployments, on a Prefect server.

Safe to repeat: what exists is left as it is (a limit with another size is set back to 1), and
`prefect deploy` updates deployments in place.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from drflow.config import DrflowConfig

POOL_PREFIX = "drflow-"
POOL_TYPE = "process"


@dataclass(frozen=True)
class DeployPlan:
    pools: list[str]
    limits: list[str]
    deployments: list[tuple[str, str]]  # (flow/deployment name, pool)
    notes: list[str]


def site_pool(site: str) -> str:
    """The work pool of a site: its workers run the runbooks from there."""
    return f"{POOL_PREFIX}{site}"


def plan(cfg: DrflowConfig, prefect_yaml: dict[str, Any]) -> DeployPlan:
    """What `drflow deploy` makes for this config and prefect.yaml (pure)."""
    from orchestrator.entrypoints import limit_names

    pools = [site_pool(s) for s in cfg.sites]
    notes: list[str] = []
    deployments: list[tuple[str, str]] = []
    for d in prefect_yaml.get("deployments") or []:
        pool = str(((d.get("work_pool") or {}).get("name")) or "")
        flow_name = str(d.get("entrypoint", "")).rpartition(":")[2]
        deployments.append((f"{flow_name}/{d.get('name')}", pool))
        if pool and pool not in pools:
            pools.append(pool)
            notes.append(f"pool {pool} (deployment {d.get('name')}) is no site of the config "
                         f"({', '.join(cfg.sites)}): created anyway; its workers must still run "
                         "where they survive the loss of the primary site")
    limits = [name for g in cfg.groups for name in limit_names(g.name)]
    return DeployPlan(pools, limits, deployments, notes)


async def ensure_pool(client: PrefectClient, name: str) -> str:
    """Create the process work pool `name` unless it exists; returns what was done."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        await client.create_work_pool(WorkPoolCreate(
            name=name, type=POOL_TYPE, description="drflow runbooks (drflow deploy)",
            base_job_template=ProcessWorker.get_default_base_job_template()))
        return f"work pool {name} ({POOL_TYPE}): created"
    if pool.type != POOL_TYPE:
        return (f"work pool {name}: exists with type {pool.type!r}, not {POOL_TYPE!r}; left as it "
                "is (its workers must be able to run drflow's flows)")
    return f"work pool {name} ({POOL_TYPE}): exists"


async def ensure_limit(client: PrefectClient, name: str, limit: int = 1) -> str:
    """Create the global concurrency limit `name` of size `limit`, or set it back to it."""
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    try:
        current = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True))
        return f"concurrency limit {name} = {limit}: created"
    if current.limit != limit or not current.active:
        await client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
        return f"concurrency limit {name} = {limit}: updated (was {current.limit})"
    return f"concurrency limit {name} = {limit}: exists"


async def _ensure(p: DeployPlan) -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        done = [await ensure_pool(client, name) for name in p.pools]
        done += [await ensure_limit(client, name) for name in p.limits]
    return done


def prefect_deploy(prefect_yaml: Path) -> subprocess.CompletedProcess[str]:
    """`prefect deploy --all` for `prefect_yaml`, from its directory (the runs' working dir)."""
    prefect_bin = str(Path(sys.executable).parent / "prefect")
    return subprocess.run(
        [prefect_bin, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)],
        cwd=prefect_yaml.parent, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL, env={**os.environ, "PREFECT_CLI_WRAP_LINES": "false"})


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    value = PREFECT_API_URL.value()
    return str(value) if value else None


def deploy(
    config: Annotated[Path, typer.Option(
        "--config", "-c", envvar="DRFLOW_CONFIG", exists=True, dir_okay=False,
        help="drflow configuration file (env DRFLOW_CONFIG): its sites and groups.")],
    prefect_yaml: Annotated[Path, typer.Option(
        "--prefect-yaml", exists=True, dir_okay=False,
        help="The prefect.yaml declaring the deployments.")] = Path("prefect.yaml"),
    state_dir: Annotated[Path, typer.Option(
        "--state-dir", envvar="DRFLOW_STATE_DIR",
        help="The state directory of a `drflow up` whose Prefect to use when PREFECT_API_URL "
             "is not set (env DRFLOW_STATE_DIR).")] = Path("./drflow-state"),
) -> None:
    """Create the work pools, concurrency limits and deployments on the Prefect server.

    One work pool per site, one concurrency limit per group, and the deployments of
    prefect.yaml, on the orchestrator's Prefect server. Safe to repeat."""
    from drflow.config import ConfigError, load_config
    from orchestrator.prefect_api import NoPrefectAPI, resolve

    try:
        url: str | None = resolve(state_dir)
    except NoPrefectAPI as exc:
        url = api_url()  # a Prefect profile that names a server
        if not url:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: invalid configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    try:
        spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    except yaml.YAMLError as exc:
        typer.echo(f"error: {prefect_yaml} is not valid YAML: {exc}", err=True)
        raise typer.Exit(2) from None
    p = plan(cfg, spec)
    typer.echo(f"Prefect API: {url}")
    for note in p.notes:
        typer.echo(f"note: {note}")
    try:
        for line in asyncio.run(_ensure(p)):
            typer.echo(line)
    except Exception as exc:
        typer.echo(f"error: the Prefect API at {url} refused or did not answer: "
                   f"{type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"deploying {len(p.deployments)} deployment(s) from {prefect_yaml} "
               "(prefect deploy --all) …")
    out = prefect_deploy(prefect_yaml.resolve())
    if out.returncode != 0:
        typer.echo((out.stdout + out.stderr)[-4000:], err=True)
        typer.echo(f"error: prefect deploy failed (exit {out.returncode}); see above", err=True)
        raise typer.Exit(1)
    for name, pool in p.deployments:
        typer.echo(f"deployment {name} → pool {pool}: deployed")
    runbook_pools = sorted({pl for _, pl in p.deployments if pl}) or p.pools
    typer.echo(f"done. Start workers at the DR site, from drflow's environment (its `python` first "
               f"on PATH): DRFLOW_CONFIG={config.resolve()} PREFECT_WORKER_QUERY_SECONDS=0.5 "
               f"prefect worker start --pool {runbook_pools[0]} --type process")
