"""`drflow lab …`: the local DR lab (plugged into the CLI through an entry point)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="The local DR lab: sites prod, dr and witness as network namespaces, a vCenter "
    "(vcsim) per site, a PostgreSQL primary/standby pair per group, moto (Route 53, S3, Secrets "
    "Manager) and a Slack stand-in outside the sites, a power bridge per site tying VM power to "
    "the lab processes, and the faults a datacenter has (`drflow lab fail`).",
    no_args_is_help=True,
)
console = Console()
DEFAULT_DIR = Path(os.environ.get("DRFLOW_LAB_DIR", "/tmp/drflow-lab"))  # as lab.manager
DirOpt = typer.Option(DEFAULT_DIR, "--dir", help="Lab directory (env DRFLOW_LAB_DIR).")


@app.command()
def up(
    groups: int = typer.Option(1, "--groups", min=1, max=20, help="Protection groups to create."),
    replication: str = typer.Option("sync", "--replication", help="sync or async."),
    lab_dir: Path = DirOpt,
    agents: bool = typer.Option(
        True, "--agents/--no-agents",
        help="Run a guest agent in each lab VM (reporting to the gateway URL in lab.json)."),
    unprotected: list[str] = typer.Option(
        [], "--unprotected", metavar="NAME",
        help="Also a lone database to protect: VM NAME-prod with PostgreSQL, no agent, no "
             "standby, no DNS record, not in drflow.yaml (repeat for more)."),
    pg_storage: str = typer.Option(
        "plain", "--pg-storage", metavar="[plain|btrfs]",
        help="Where PostgreSQL's data directories live: plain (the lab directory's file system) "
             "or btrfs (a loop-mounted image, a subvolume per data directory), which lets drills "
             "snapshot the standby instead of copying it. btrfs needs root and btrfs-progs."),
) -> None:
    """Start the lab and write DIR/lab.json (endpoints, credentials) and DIR/drflow.yaml."""
    from lab import manager

    try:
        manager.up(lab_dir, groups, replication, progress=console.print, agents=agents,
                   unprotected=unprotected, pg_storage=pg_storage)
    except manager.LabError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    _print_status(lab_dir)


@app.command()
def status(
    lab_dir: Path = DirOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show every lab part and whether it is healthy (exit 1 if any is not)."""
    from lab import manager

    try:
        ok = _print_status(lab_dir, as_json)
    except manager.LabError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    raise typer.Exit(0 if ok else 1)


@app.command()
def down(lab_dir: Path = DirOpt) -> None:
    """Stop every lab process and remove the lab directory."""
    from lab import manager

    manager.down(lab_dir, progress=console.print)


@app.command()
def fail(
    kind: str = typer.Argument(..., help="power-off, guest-crash, host-loss, mgmt-loss, stun, "
                               "blackhole, agent-cut (a VM); partition, site-loss (a site); "
                               "etcd-down (a site's etcd member, or all); cut (two locations). "
                               "The witness down: partition witness or site-loss witness."),
    target: str = typer.Argument(..., help="A VM (e.g. orders-prod), a site (prod, dr, witness; "
                                 "etcd-down also all) or, for cut, the first location (prod, dr, "
                                 "witness, internet)."),
    arg: str = typer.Argument(None, help="stun: SECONDS; cut: the second location."),
    task: str = typer.Option("none", "--task", help="stun: snapshot, vmotion or none (the "
                             "vCenter task shown running on the VM meanwhile)."),
    not_responding_after: float = typer.Option(
        60.0, "--not-responding-after", min=0,
        help="host-loss/mgmt-loss: seconds until vCenter marks the host notResponding."),
    ha_restart_after: float = typer.Option(
        None, "--ha-restart-after", min=0,
        help="host-loss: vSphere HA powers the VM on again on the spare host after SECONDS "
             "(the command waits for it)."),
    hang: bool = typer.Option(
        False, "--hang", help="etcd-down: freeze the member(s) (SIGSTOP: connects complete, "
        "nothing answers) instead of killing them."),
    lab_dir: Path = DirOpt,
) -> None:
    """Inject a fault, as a datacenter has it; prints the instant it took effect."""
    from lab import faults, manager

    seconds = other = None
    try:
        if kind == "stun":
            seconds = float(arg) if arg is not None else None
        elif kind == "cut":
            other = arg
        f = faults.fail(lab_dir, kind, target, other=other, seconds=seconds, task=task,
                        not_responding_after=not_responding_after,
                        ha_restart_after=ha_restart_after, hang=hang, progress=console.print)
    except ValueError as exc:
        console.print(f"[red]error:[/] stun takes SECONDS as a number, not {arg!r}")
        raise typer.Exit(2) from exc
    except (faults.FaultError, manager.LabError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"{f.kind} {f.target}: in effect at {f.at:.3f} "
                  f"({time.strftime('%H:%M:%S', time.localtime(f.at))}); "
                  f"logged in {lab_dir / 'faults.jsonl'}")
    if ha_restart_after is not None:
        console.print(f"waiting {ha_restart_after:.0f} s for vSphere HA to restart {target} …")
    faults.wait_ha_restarts()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="A lab host: orchestrator, vcenter-prod, vcenter-dr, "
                               "witness, etcd-prod, etcd-dr, etcd-witness, or a VM such as "
                               "orders-prod."),
    lab_dir: Path = DirOpt,
) -> None:
    """Run a command on a lab host, in its network: `drflow lab run orchestrator -- drflow up …`."""
    from lab import manager, netns

    if not ctx.args:
        console.print("[red]error:[/] give the command after `--`, e.g. "
                      "`drflow lab run orchestrator -- drflow up --config DIR/drflow.yaml`")
        raise typer.Exit(2)
    try:
        topo = manager.topology(manager.load(lab_dir))
        prefix = netns.host_prefix(topo, host) if topo is not None else []
    except (manager.LabError, netns.NetnsError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    argv = [*prefix, *ctx.args]
    os.execvp(argv[0], argv)


@app.command()
def heal(lab_dir: Path = DirOpt) -> None:
    """Undo the network faults, bring etcd members back, give lost hosts back to vCenter.

    Network faults: blackholes, partitions, cuts and agent cuts. Downed etcd members restart
    with their data. A lost site stays lost (its processes died)."""
    from lab import faults, manager

    try:
        f = faults.heal(lab_dir, progress=console.print)
    except (faults.FaultError, manager.LabError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    lost = f.detail.get("still_lost_sites")
    console.print(f"healed at {f.at:.3f}" + (f"; site(s) {', '.join(lost)} stay lost" if lost else ""))


def _print_status(lab_dir: Path, as_json: bool = False) -> bool:
    from lab import manager

    rows = manager.status(lab_dir)
    if as_json:
        print(json.dumps([{"part": p, "healthy": ok, "detail": d} for p, ok, d in rows]))
    else:
        table = Table(title=f"drflow lab in {lab_dir}")
        table.add_column("part")
        table.add_column("health")
        table.add_column("detail")
        for part, ok, detail in rows:
            table.add_row(part, "[green]healthy[/]" if ok else "[red]DOWN[/]", detail)
        console.print(table)
    return all(ok for _, ok, _ in rows)
