"""`drflow protect VM` and `drflow unprotect GROUP`: a wizard in the terminal, or flags and
`--yes` for scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from drflow.config import DrflowConfig
    from orchestrator.protect import Request

EXIT_FAILED, EXIT_REFUSED = 1, 2


def register(app: typer.Typer) -> None:
    app.command("protect")(protect)
    app.command("unprotect")(unprotect)


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _shared(cfg: DrflowConfig, pick: Any) -> Any:
    """The value every configured group agrees on (a sane default for the next), else None."""
    values = {pick(g) for g in cfg.groups}
    return values.pop() if len(values) == 1 else None


def _default_zone_domain(cfg: DrflowConfig) -> str | None:
    """The domain existing groups' records live in: `orders.db.example.com` → db.example.com."""
    return _shared(cfg, lambda g: g.dns.record.rstrip(".").partition(".")[2] or None)


Opt = typer.Option
ConfigOpt = Annotated[Path, Opt("--config", "-c", envvar="DRFLOW_CONFIG", exists=True,
                                dir_okay=False,
                                help="drflow configuration file (env DRFLOW_CONFIG).")]


def protect(
    vm: Annotated[str, typer.Argument(help="The database VM, as vCenter names it.",
                                      show_default=False)],
    config: ConfigOpt = Path("drflow.yaml"),
    site: Annotated[str, Opt(help="The VM's site (a key of `sites`).")] = "prod",
    to: Annotated[str, Opt("--to", help="The site its standby goes to.")] = "dr",
    group: Annotated[str | None, Opt(help="Protection group name [default: VM name without "
                                          "-prod].", show_default=False)] = None,
    port: Annotated[int, Opt(help="The database's port.")] = 5432,
    address: Annotated[str | None, Opt(help="The database's address [default: what VMware "
                                            "Tools reports].", show_default=False)] = None,
    standby_vm: Annotated[str | None, Opt(help="The standby VM's name [default: GROUP-dr].",
                                          show_default=False)] = None,
    standby_address: Annotated[str | None, Opt(help="The standby's fixed address.",
                                               show_default=False)] = None,
    prefix_len: Annotated[int, Opt(help="The standby network's prefix length.")] = 24,
    standby_gateway: Annotated[str | None, Opt(help="The standby network's router.",
                                               show_default=False)] = None,
    standby_host: Annotated[str | None, Opt(help="The ESXi host at the DR site for the standby.",
                                            show_default=False)] = None,
    template: Annotated[str | None, Opt(help="The VM template at the DR site [default: the "
                                             "only one there].", show_default=False)] = None,
    replication: Annotated[str, Opt(help="sync (no acknowledged write lost) or async.")] = "sync",
    dns_record: Annotated[str | None, Opt(help="The Route 53 record clients use [default: "
                                               "GROUP in the zone of the other groups].",
                                          show_default=False)] = None,
    zone_id: Annotated[str | None, Opt(help="Its hosted zone [default: the other groups'].",
                                       show_default=False)] = None,
    ttl: Annotated[int, Opt(help="The record's TTL (s).")] = 30,
    rpo_budget_s: Annotated[float, Opt(help="The group's RPO budget (s).")] = 5.0,
    db_name: Annotated[str | None, Opt(help="Database drflow checks [default: the other "
                                            "groups'].", show_default=False)] = None,
    db_user: Annotated[str | None, Opt(help="Its login (superuser or pg_read_all_settings; "
                                            "replication) [default: the other groups'].",
                                       show_default=False)] = None,
    db_password_ref: Annotated[str | None, Opt(help="Its password, by reference (file:, env:, "
                                                    "aws-sm:) [default: the other groups'].",
                                               show_default=False)] = None,
    guest_user: Annotated[str, Opt(help="The guests' login for VMware Tools.")] = "root",
    guest_password_ref: Annotated[str, Opt(help="Its password, by reference.")]
    = "env:DRFLOW_GUEST_PASSWORD",
    yes: Annotated[bool, Opt("--yes", "-y", help="Ask nothing: every answer from the flags "
                                                 "and defaults.")] = False,
    dry_run: Annotated[bool, Opt("--dry-run", help="Print the plan; change nothing.")] = False,
    rollback: Annotated[bool, Opt("--rollback", help="Remove what this protection of VM "
                                                     "created (asked with the same flags).")]
    = False,
    no_drill: Annotated[bool, Opt("--no-drill", help="Skip the proving drill.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print the figures as JSON at the end.")]
    = False,
    state_dir: Annotated[Path, Opt("--state-dir", envvar="DRFLOW_STATE_DIR",
                                   help="The `drflow up` state directory (its Prefect records "
                                        "the drill).")] = Path("./drflow-state"),
) -> None:
    """Protect a running database VM: its standby made at the DR site, seeded, in DNS and config.

    Steps: push the agent, discover, create the standby VM from a template, seed and cluster it,
    create the DNS record, add the group to the config, prove it with a drill. Each step is
    checked before it acts: after a failure, run the same command again.
    Exit status: 0 protected, 1 a step failed, 2 refused (nothing changed)."""
    if not (dry_run or rollback or no_drill):
        from orchestrator.cli_common import need_prefect

        # Before Prefect is first imported (orchestrator.protect does): it reads its API address
        # once, and a drill run without it would go to a temporary server nobody looks at.
        need_prefect(state_dir)
    from orchestrator.protect import ProtectError, Protection, Request, load_record

    cfg = _config(config)
    ask = not yes and sys.stdin.isatty()
    name = group or vm.removesuffix("-prod")
    saved = load_record(config, name)
    if saved is not None and not _same_vm(saved.request, vm):
        raise _fail(f"group {name} is being protected for VM {saved.request['vm']}, not {vm}")
    answers: dict[str, Any] = dict(saved.request) if saved else {}

    def value(key: str, given: Any, default: Any, question: str) -> Any:
        if given is not None:
            return given
        if key in answers:
            return answers[key]
        if ask:
            return typer.prompt(question, default=default) if default is not None else \
                typer.prompt(question)
        if default is None:
            raise _fail(f"--{key.replace('_', '-')} is needed (no default for it here)",
                        EXIT_REFUSED)
        return default

    try:
        dr_vc_hosts, templates = _dr_choices(cfg, to)
    except Exception as exc:
        raise _fail(f"cannot read the {to} site's vCenter: {exc}") from None
    domain = _default_zone_domain(cfg)
    req = Request(
        vm=vm, site=site, to=to, group=name, port=port, address=address,
        standby_vm=value("standby_vm", standby_vm, f"{name}-dr", "Standby VM name"),
        standby_address=value("standby_address", standby_address, None,
                              f"Standby address at {to}"),
        standby_host=value("standby_host", standby_host,
                           dr_vc_hosts[0] if len(dr_vc_hosts) == 1 else None,
                           f"ESXi host at {to} ({', '.join(dr_vc_hosts)})"),
        template=value("template", template, templates[0] if len(templates) == 1 else None,
                       f"Template at {to} ({', '.join(templates) or 'none found'})"),
        prefix_len=prefix_len, standby_gateway=standby_gateway, replication=replication,
        record=value("record", dns_record, f"{name}.{domain}" if domain else None,
                     "DNS record clients use"),
        zone_id=value("zone_id", zone_id, _shared(cfg, lambda g: g.dns.zone_id),
                      "Route 53 hosted zone id"),
        ttl=ttl, rpo_budget_s=rpo_budget_s,
        db_name=value("db_name", db_name, _shared(cfg, lambda g: g.database.name),
                      "Database drflow checks"),
        db_user=value("db_user", db_user, _shared(cfg, lambda g: g.database.user),
                      "Its login"),
        db_password_ref=value("db_password_ref", db_password_ref,
                              _shared(cfg, lambda g: g.database.password.ref),
                              "Its password (file:, env: or aws-sm: reference)"),
        guest_user=guest_user, guest_password_ref=guest_password_ref)
    try:
        p = Protection(config, req, progress=lambda m: typer.echo(m, err=True))
        if rollback:
            undone = p.rollback()
            typer.echo("\n".join(undone) if undone else "nothing to undo")
            return
        typer.echo(f"Reading {vm} at {site} and the {to} site…", err=True)
        seen = p.observe()
    except ProtectError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    _show(req, seen)
    if not seen.plan.ok:
        raise _fail("refused, nothing was changed:\n  - " + "\n  - ".join(seen.plan.refusals),
                    EXIT_REFUSED)
    if dry_run:
        return
    if ask and not typer.confirm("Protect it?", default=False):
        raise _fail("not confirmed; nothing was changed", EXIT_REFUSED)
    drill = None if no_drill else _drill(config)
    try:
        figures = p.run(seen, drill)
    except ProtectError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{req.group}: protected ({req.vm} at {req.site} → {req.standby_vm} at {req.to}, "
               f"{req.replication}); `drflow status` shows it")
    if as_json:
        typer.echo(json.dumps(figures, default=str, sort_keys=True))


def _same_vm(request: dict[str, Any], vm: str) -> bool:
    return request.get("vm") == vm


def _show(req: Request, seen: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    d = seen.database
    con.print(f"[bold]{req.vm}[/bold] at {req.site}: PostgreSQL {d.version} {d.role}, "
              f"{seen.primary.address}:{seen.primary.port}, data {d.datadir} "
              f"({d.data_bytes / 1e9:.2f} GB), {seen.cpus} vCPU, {seen.memory_mb} MB")
    if not seen.plan.ok:
        return
    t = Table(title=f"Protecting {req.vm} as group {req.group}", show_lines=False)
    t.add_column("#")
    t.add_column("step")
    t.add_column("what it does", overflow="fold")
    for i, s in enumerate(seen.plan.steps, 1):
        t.add_row(str(i), s.name, s.does)
    con.print(t)


def _dr_choices(cfg: DrflowConfig, site: str) -> tuple[list[str], list[str]]:
    """(ESXi hosts, templates) at `site`, for the wizard's defaults."""
    from pyVmomi import vim

    from flows.runtime import Runtime
    from tasks.vsphere import connect

    if site not in cfg.sites:
        raise ValueError(f"no site {site!r} in the config (sites: {', '.join(cfg.sites)})")
    si = connect(Runtime(cfg=cfg, path="").vcenter(site))
    view = si.content.viewManager.CreateContainerView(
        si.content.rootFolder, [vim.HostSystem, vim.VirtualMachine], True)
    try:
        hosts = sorted(o.name for o in view.view if isinstance(o, vim.HostSystem))
        templates = sorted(o.name for o in view.view if isinstance(o, vim.VirtualMachine)
                           and o.config is not None and o.config.template)
    finally:
        view.DestroyView()
    return hosts, templates


def _drill(config: Path) -> Any:
    def run(group: str) -> dict[str, Any]:
        from flows.drill import drill

        return dict(drill(group, config_path=str(config), raise_on_failure=False))

    return run


def _config(path: Path) -> DrflowConfig:
    from drflow.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(f"invalid configuration:\n{exc}", EXIT_REFUSED) from None


def unprotect(
    group: Annotated[str, typer.Argument(help="Protection group name.", show_default=False)],
    config: ConfigOpt = Path("drflow.yaml"),
    remove_standby: Annotated[bool, Opt("--remove-standby", help="Also delete the standby VM "
                                                                "and its data.")] = False,
    guest_user: Annotated[str, Opt(help="The guests' login for VMware Tools.")] = "root",
    guest_password_ref: Annotated[str, Opt(help="Its password, by reference.")]
    = "env:DRFLOW_GUEST_PASSWORD",
    yes: Annotated[bool, Opt("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop protecting GROUP; its database keeps serving.

    The group leaves the config, its agents are stopped and removed, the primary no longer
    waits for a synchronous standby. The DNS record stays (clients use
    it) and the standby VM with its data stays unless --remove-standby."""
    from orchestrator.unprotect import UnprotectError, unprotect_group

    cfg = _config(config)
    try:
        cfg.group(group)
    except KeyError as exc:
        raise _fail(str(exc.args[0]), EXIT_REFUSED) from None
    if not yes and sys.stdin.isatty() and not typer.confirm(
            f"Stop protecting {group}{' and delete its standby VM' if remove_standby else ''}?",
            default=False):
        raise _fail("not confirmed; nothing was changed", EXIT_REFUSED)
    try:
        for line in unprotect_group(config, group, remove_standby=remove_standby,
                                    guest_user=guest_user, guest_password_ref=guest_password_ref,
                                    progress=lambda m: typer.echo(m, err=True)):
            typer.echo(line)
    except UnprotectError as exc:
        raise _fail(str(exc)) from None
