"""Commands that run the runbooks: `drflow gateway`, `drflow failover`, …

Modules import Prefect and the runbooks inside the commands, so `drflow --help` stays instant.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from orchestrator.cli_common import ConfigOpt, need_prefect

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    from orchestrator.deploy_cli import deploy
    from orchestrator.drill_cli import app as drill_app
    from orchestrator.runner_cli import runner
    from orchestrator.status_cli import status

    app.command("up")(up)
    app.add_typer(drill_app, name="drill")
    app.command("gateway")(gateway)
    app.command("failover")(failover_cmd)
    app.command("reprotect")(reprotect_cmd)
    app.command("failback")(failback_cmd)
    app.command("deploy")(deploy)
    app.command("runner")(runner)
    app.command("status")(status)


class Mode(StrEnum):
    embedded = "embedded"
    deployment = "deployment"


ModeOpt = typer.Option(Mode.embedded, "--mode",
                       help="embedded: run the flows in this process (one machine, the warm path); "
                            "deployment: start the Prefect deployments of `drflow deploy`, run by "
                            "workers at the DR site.")
StateDirOpt = typer.Option(Path("./drflow-state"), "--state-dir", envvar="DRFLOW_STATE_DIR",
                           help="drflow's state directory: the gateway's incident state, the "
                                "local Prefect server of `drflow up` and where it records its "
                                "API address for the other commands (env DRFLOW_STATE_DIR).")


def gateway(
    config: Path = ConfigOpt,
    state_dir: Path = StateDirOpt,
    listen: str = typer.Option("", "--listen", help="HOST:PORT; default: gateway.listen of the config."),
    mode: Mode = ModeOpt,
) -> None:
    """Receive agent webhooks and run failovers in this process or on the DR site's workers.

    By default the flows run in this process (the warm path); with `--mode deployment` they run
    as deployment runs on the DR site's workers.

    Needs a Prefect API: PREFECT_API_URL, or the one a `drflow up` with the same --state-dir
    started."""
    need_prefect(state_dir)
    _serve(config, state_dir, listen, mode)


def up(
    config: Path = ConfigOpt,
    state_dir: Path = StateDirOpt,
    prefect_port: int = typer.Option(
        4200, "--prefect-port", envvar="DRFLOW_PREFECT_PORT",
        help="Port of the local Prefect server (when PREFECT_API_URL is unset)."),
    mode: Mode = ModeOpt,
) -> None:
    """The whole orchestrator on one machine: the gateway, warm flow runners, a local Prefect.

    The local Prefect server (SQLite) is started and stopped with it when PREFECT_API_URL is not
    set; so is a single etcd member when drflow.yaml's etcd.endpoints is one loopback URL that
    nobody answers.

    Ctrl-C stops everything; an incident interrupted that way is resumed at the next start."""
    # A service manager stops us with SIGTERM: leave through `finally` as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from orchestrator.prefect_api import forget, record

    local = None
    if not os.environ.get("PREFECT_API_URL", "").strip():
        from orchestrator.prefect_local import start_local_server

        home = (state_dir / "prefect").resolve()
        host = _prefect_host(config)
        console.print(f"starting a local Prefect server on {host} (SQLite in {home}) …")
        local = start_local_server(home, prefect_port, host=host)
        os.environ["PREFECT_API_URL"] = local.api_url
        console.print(f"Prefect UI: {local.ui_url}")
    else:
        console.print(f"Prefect API: {os.environ['PREFECT_API_URL']}")
    # Where `drflow failover|reprotect|failback|drill run|deploy` find this Prefect.
    console.print(f"Prefect API recorded in {record(state_dir, os.environ['PREFECT_API_URL'])}")
    local_etcd = None
    try:
        from orchestrator.etcd_local import maybe_start

        local_etcd = maybe_start(config, state_dir, console.print)
        _serve(config, state_dir, "", mode)
    finally:
        forget(state_dir)
        if local_etcd is not None:
            console.print("stopping the local etcd member …")
            local_etcd.stop()
        if local is not None:
            console.print("stopping the local Prefect server …")
            local.stop()
        console.print("drflow stopped")


def _prefect_host(config: Path) -> str:
    """The local Prefect listens where the gateway does: runbooks and commands on other hosts of
    the DR site reach both at the orchestrator's address."""
    from drflow.config.fields import is_wildcard
    from drflow.config.loader import load_config
    from orchestrator.gateway.from_config import listen_address

    host = listen_address(load_config(config))[0]
    return "127.0.0.1" if is_wildcard(host) else host


def _serve(config: Path, state_dir: Path, listen: str, mode: str = Mode.embedded) -> None:
    import uvicorn

    from flows.runtime import runtime
    from orchestrator.embedded import EmbeddedStarter
    from orchestrator.gateway import create_app
    from orchestrator.gateway.from_config import listen_address, settings_from_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["DRFLOW_CONFIG"] = str(config.resolve())
    rt = runtime(str(config))
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_from_config(rt.cfg, state_dir / "gateway.db",
                                    runs_in_process=mode != Mode.deployment)
    host, port = listen_address(rt.cfg)
    if listen:
        host, _, p = listen.rpartition(":")
        port = int(p)
    from drflow.secrets import SecretError
    from orchestrator.gateway.slack_alerter import SlackAlerter

    # Alerts (no failover, but a person must know) go to the on-call channel; without a bot
    # token they are only logged and audited: failover itself never depends on Slack.
    alerter: SlackAlerter | None = None
    try:
        alerter = SlackAlerter(rt.slack)
        console.print(f"alerts: Slack channel {rt.slack.channel}")
    except SecretError as exc:
        console.print(f"alerts: NOT sent to Slack (the bot token is unavailable: {exc}); "
                      "they are only logged and audited")
    if mode == Mode.deployment:
        from drflow.etcd import Client as EtcdClient
        from orchestrator.deployed import DeploymentStarter

        pusher = (EtcdClient([str(u) for u in rt.cfg.etcd.endpoints], rt.cfg.etcd.timeout_s)
                  if rt.cfg.etcd is not None else None)
        deployed = DeploymentStarter(etcd=pusher)
        app = create_app(settings, deployed, audit=rt.audit, alerter=alerter)
        deployed.attach(app.state.gateway)  # closes incidents when their runs end
        app.state.roles.starter = deployed
        # A re-protect run that did not protect the group is tried again later.
        deployed.on_reprotect_done = app.state.roles.reprotect_finished
        starter: EmbeddedStarter | DeploymentStarter = deployed
    else:
        embedded = EmbeddedStarter(str(config.resolve()))
        app = create_app(settings, embedded, audit=rt.audit, alerter=alerter)
        embedded.close = app.state.gateway.close_incident_threadsafe
        from orchestrator.embedded import ReprotectStarter

        # The gateway starts re-protect itself when an old primary's agent reports in.
        # A run that ends unprotected is tried again later (RolesService.reprotect_finished).
        app.state.roles.starter = ReprotectStarter(str(config.resolve()),
                                                   on_done=app.state.roles.reprotect_finished)
        starter = embedded
    from orchestrator.gateway.reload import ConfigReloader
    from orchestrator.gateway.status import GroupStatusProvider

    group_status = GroupStatusProvider(rt.cfg, rt.audit,
                                       interval_s=rt.cfg.gateway.status_refresh_s)
    app.state.group_status = group_status
    # Groups added to or removed from the file are served without a restart (reload.py).
    reloader = ConfigReloader(rt.path, rt.cfg)
    reloader.hooks += [group_status.use_config, lambda _cfg: _rewarm(rt.path)]
    app.state.gateway.config_watch = reloader
    from orchestrator.gateway.host_watch import HostWatcher

    # The primaries' ESXi hosts as vCenter sees them: a host lost while its VM serves is an
    # alert, not a failover (management network). DRFLOW_HOST_WATCH_S=0 turns it off.
    every = float(os.environ.get("DRFLOW_HOST_WATCH_S", "5") or 5)
    vcenters = {}
    for site in rt.cfg.sites:
        try:
            vcenters[site] = rt.vcenter(site)
        except SecretError as exc:
            console.print(f"host watch: site {site} not watched (vCenter password unavailable: {exc})")
    if every > 0 and vcenters:
        app.state.gateway.host_watch = HostWatcher(vcenters, interval_s=every)
        console.print(f"host watch: every {every:g} s, the primaries' hosts through the vCenters "
                      f"of {', '.join(vcenters)}")
    else:
        console.print("host watch: off")
    console.print(f"warming up ({mode} mode: secrets, vCenter sessions, Prefect) …")
    try:
        console.print(f"warm in {starter.warm_up():.2f} s")
    except RuntimeError as exc:  # e.g. --mode deployment before `drflow deploy`
        console.print(f"error: {exc}")
        raise typer.Exit(2) from None
    console.print(f"gateway: http://{host}:{port}  (agents post to /v1/events; "
                  f"metrics: /metrics; groups: /v1/groups)")
    console.print(f"console: http://{host}:{port}/console  (read-only; open it in a browser)")
    console.print(f"audit trail: {rt.cfg.audit.url}   (drflow audit show|verify)")
    from orchestrator.drill_scheduler import DrillScheduler, describe, run_drill, schedules

    # Embedded mode runs each group's drill_schedule itself; deployment mode leaves it to Prefect.
    crons = schedules(rt.cfg) if mode != Mode.deployment else {}
    for line in describe(crons, mode == Mode.deployment):
        console.print(line)
    drills = DrillScheduler(crons, run_drill(str(config.resolve())))
    drills.start()
    if mode != Mode.deployment:
        reloader.hooks.append(lambda cfg: drills.use(schedules(cfg)))
    try:
        from orchestrator.gateway.http_server import server_config

        # With the gateway's header and body read timeouts (slow clients are cut off).
        uvicorn.Server(server_config(app, settings, host, port)).run()
    finally:
        drills.stop()


def _rewarm(config_path: str) -> None:
    """After a reload, what the start warmed up, for added groups too: their secrets resolved
    now rather than at their first incident (and scrubbed by the audit trail the gateway shares
    with the runbooks), their runbooks' locks made when they are Prefect limits."""
    from flows.locks import ensure_limit, roles_limit
    from flows.runtime import runtime

    try:
        rt = runtime(config_path)
        _ = rt.secret_values, rt.audit
        if rt.etcd is None:
            for g in rt.cfg.groups:
                ensure_limit(roles_limit(g.name))
    except Exception as exc:
        logging.getLogger("drflow.gateway.reload").warning(
            "warming up the reloaded configuration failed (the runbooks do it when they need "
            "it): %s: %s", type(exc).__name__, exc)


def failover_cmd(
    group: str = typer.Argument(..., help="Protection group to fail over."),
    config: Path = ConfigOpt,
    force: bool = typer.Option(False, "--force",
                               help="Promote even beyond the RPO budget (audited override)."),
    reason: str = typer.Option("manual failover", "--reason", help="Why, for the audit trail."),
    declare_fenced: bool = typer.Option(
        False, "--declare-fenced",
        help="No fence can be proven (etcd majority and vCenter lost with the site): you attest "
             "the old primary can no longer acknowledge writes. Asks the group's approvers in "
             "Slack first; audited as an attested fence. Needs --reason."),
    timeout: float | None = typer.Option(None, "--approval-timeout",
                                         help="With --declare-fenced: seconds to wait for the "
                                              "approvers (default: policy)."),
    state_dir: Path = StateDirOpt,
) -> None:
    """Fail GROUP over, now, from the node its DNS name points at to the other one.

    The steps: confirm, fence, check lag, take over the leader key, promote, DNS, verify."""
    if declare_fenced and reason == "manual failover":
        console.print("error: --declare-fenced needs --reason TEXT: why you know the old "
                      "primary can no longer acknowledge writes (it goes to the approvers and "
                      "the audit trail)")
        raise typer.Exit(2)
    need_prefect(state_dir)
    from flows.failover import failover
    from flows.runtime import runtime
    from tasks.dns import resolve_endpoint_or_none

    rt = runtime(str(config.resolve()))
    g = rt.cfg.group(group)
    serving = resolve_endpoint_or_none(rt.route53, g.dns.zone_id, g.dns.record)
    failed = g.standby if serving == (g.standby.host, g.standby.port) else g.primary
    console.print(f"{g.dns.record} points at {failed.vm}: failing over from it")
    if declare_fenced:
        console.print(f"asking {g.policy.approvals_required} approver(s) in Slack to attest "
                      f"that {failed.vm} can no longer acknowledge writes …")
    # No incident key: the flow derives it from these fields, so the same command run again
    # after a crash recognises its own takeover.
    incident = {"kind": "manual", "reason": reason, "primary_vm": failed.vm}

    def run() -> dict[str, Any]:
        try:
            return failover(group, incident, force=force, config_path=str(config.resolve()),
                            declare_fenced=reason if declare_fenced else None,
                            approval_timeout_s=timeout)
        except Exception as exc:  # a timed-out pause ends the Prefect run Failed, by design
            console.print(f"failover did not complete: {type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None

    _run_and_exit("failed_over", run)


def reprotect_cmd(
    group: str = typer.Argument(..., help="Protection group to re-protect."),
    config: Path = ConfigOpt,
    reason: str = typer.Option("manual re-protect", "--reason", help="Why, for the audit trail."),
    state_dir: Path = StateDirOpt,
) -> None:
    """Make the node that does not serve GROUP a standby of the one that does.

    Fences a second primary, rewinds (or rebuilds) through its agent, waits until it streams and
    caught up, restores synchronous replication, verifies."""
    need_prefect(state_dir)
    from flows.reprotect import reprotect

    _run_and_exit("protected", lambda: reprotect(group, {"kind": "manual", "reason": reason},
                                                 config_path=str(config.resolve())))


def failback_cmd(
    group: str = typer.Argument(..., help="Protection group to move back home."),
    config: Path = ConfigOpt,
    requested_by: str = typer.Option("cli", "--requested-by", help="Who asks, for the record."),
    timeout: float | None = typer.Option(None, "--approval-timeout",
                                         help="Seconds to wait for approval (default: policy)."),
    state_dir: Path = StateDirOpt,
) -> None:
    """Ask for approval in Slack, then switch GROUP back home with zero data loss.

    Waits (paused in Prefect) until an approver clicks in Slack; the gateway resumes it."""
    need_prefect(state_dir)
    from flows.failback import failback

    def run() -> dict[str, Any]:
        try:
            return failback(group, requested_by=requested_by, approval_timeout_s=timeout,
                            config_path=str(config.resolve()))
        except Exception as exc:  # a timed-out pause ends the Prefect run Failed, by design
            console.print(f"failback did not complete: {type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None

    _run_and_exit("failed_back", run)


def _run_and_exit(success: str, run: Callable[[], dict[str, Any]]) -> NoReturn:
    """Run a runbook here (no flow heartbeats), print its result; exit 0 on `success`, else 1."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        result = run()
    console.print(result)
    raise typer.Exit(0 if result.get("outcome") == success else 1)
