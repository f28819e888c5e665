"""`drflow-agent run` and `drflow-agent discover`, with heavy imports inside the commands.

The command line is argparse's: this process lives in every protected VM for as long as the VM
runs, and a CLI framework (typer, click, rich) would stay resident in it for one parse of argv.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

HELP = "Guest agent: monitor, repair, report."
DRFLOW_PROG = "drflow agent"  # its name under the `drflow` command
RUN_HELP = """Watch the configured resources, repair them in place, report to the gateway.

Runs until SIGTERM or SIGINT, then stops cleanly: pending events stay in the outbox and are
delivered by the next run."""
DISCOVER_HELP = ("Find running PostgreSQL instances and what they stand on; show or write the "
                 "agent config.")

# psycopg loads the guest's libpq through ctypes (the bundle carries no libpq of its own).
NO_LIBPQ = ("PostgreSQL's client library libpq.so.5 is not installed in this VM: install it "
            "(Debian, Ubuntu: apt-get install libpq5; RHEL and the like: dnf install libpq)")

log = logging.getLogger("agents")


class _Formatter(argparse.HelpFormatter):
    """Paragraphs kept, each wrapped to the terminal; `Usage:` as the rest of drflow prints it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                         subsequent_indent=indent)
                           for p in text.split("\n\n"))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def add_usage(self, usage: str | None, actions: Iterable[argparse.Action],
                  groups: Iterable[Any], prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)


def parser(prog: str = "drflow-agent") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=HELP, formatter_class=_Formatter)
    sub = ap.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    run = sub.add_parser("run", help=RUN_HELP.split("\n\n")[0], description=RUN_HELP,
                         formatter_class=_Formatter)
    run.add_argument("--config", "-c", type=Path, required=True, metavar="FILE", help="agent.yaml to run")
    run.add_argument("--log-level", type=str.lower, default="info",
                     choices=("debug", "info", "warning", "error"), metavar="LEVEL",
                     help="debug, info, warning or error (default: %(default)s)")
    run.add_argument("--pidfile", type=Path, default=None, metavar="FILE",
                     help="write this process's pid here while it runs (what stops or restarts "
                          "it: `kill $(cat FILE)`)")

    disc = sub.add_parser("discover", help=DISCOVER_HELP, description=DISCOVER_HELP,
                          formatter_class=_Formatter)
    disc.add_argument("--json", dest="as_json", action="store_true",
                      help="print JSON instead of a table")
    disc.add_argument("--write", type=Path, default=None, metavar="FILE",
                      help="write an agent.yaml for what was found")
    disc.add_argument("--datadir", type=Path, action="append", default=[], metavar="DIR",
                      help="only the instance(s) with this data directory (repeatable)")
    disc.add_argument("--gateway-url", default="http://127.0.0.1:8088/v1/events", metavar="URL",
                      help="where the written config sends events (the gateway listens on 8088 "
                           "by default) (default: %(default)s)")
    disc.add_argument("--secret-ref", default="env:DRFLOW_WEBHOOK_SECRET", metavar="REF",
                      help="reference to the webhook secret (env:NAME or file:/path) "
                           "(default: %(default)s)")
    disc.add_argument("--agent-id", default=None, metavar="NAME",
                      help="this VM's name in vCenter (as primary.vm / standby.vm in "
                           "drflow.yaml); required with --write")
    disc.add_argument("--group", default="default", metavar="NAME",
                      help="protection group of this agent (default: %(default)s)")
    disc.add_argument("--outbox", default="agent-outbox.sqlite", metavar="PATH",
                      help="outbox path (relative to the written file) (default: %(default)s)")
    disc.add_argument("--pg-user", default="postgres", metavar="ROLE",
                      help="role the SQL checks log in as (default: %(default)s)")
    disc.add_argument("--pg-password-ref", default=None, metavar="REF",
                      help="reference to its password (env:NAME or file:/path)")
    disc.add_argument("--control-listen", default=None, metavar="HOST:PORT",
                      help="host:port for the control API (with --control-secret-ref)")
    disc.add_argument("--control-secret-ref", default=None, metavar="REF",
                      help="reference to this agent's own control secret (already derived for "
                           "its agent id)")
    disc.add_argument("--control-master-ref", default=None, metavar="REF",
                      help="reference to the master gateway.control_secret: the agent's own "
                           "secret is derived from it and written, mode 0600, as control_secret "
                           "next to --write (the master is not kept)")
    disc.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                      help="host:port of another PostgreSQL node of the group (repeatable): the "
                           "only targets of rewind_to / attach_to")
    return ap


def main(argv: list[str] | None = None, prog: str = "drflow-agent") -> int:
    """Run the agent's command line; its exit code (2: usage, config, secret or setup error)."""
    ap = parser(prog)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        if args.command == "run":
            return run(args.config, args.log_level, args.pidfile)
        if args.command == "discover":
            return discover(**{k: v for k, v in vars(args).items() if k != "command"})
    except ImportError as exc:
        if not _libpq_missing(exc):
            raise
        print(f"error: {NO_LIBPQ}", file=sys.stderr)
        return 2
    ap.print_help()
    return 2


def _libpq_missing(exc: BaseException) -> bool:
    """psycopg could not load libpq (its words, whichever implementation it tried)."""
    text = str(exc)
    return "libpq library not found" in text or "no pq wrapper available" in text


def run(config: Path, log_level: str = "info", pidfile: Path | None = None) -> int:
    """Load the config and run the agent until a signal stops it (see RUN_HELP)."""
    from agents.config import ConfigError, load_config
    from drflow.secret_refs import SecretError

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config)
        _run(cfg, pidfile)
    except (ConfigError, SecretError, _SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


class _SetupError(Exception):
    """The agent could not start (outbox, control API, driver); the message says why."""


# glibc's mallopt parameter: how many malloc arenas threads may use.
_M_ARENA_MAX = -8


def _few_malloc_arenas() -> None:
    """Two malloc arenas for the agent's dozen threads, not glibc's one per thread (up to eight
    per core): the threads sleep nearly all the time, and each arena keeps what its thread once
    touched resident (about 0.3 MB in all). Before any thread starts; a no-op off glibc."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)


def _run(cfg: Any, pidfile: Path | None = None) -> None:
    import sqlite3

    from agents.outbox import Outbox, Sender, SenderAlreadyRunning
    from agents.runner import Agent
    from drflow.secret_refs import resolve

    _few_malloc_arenas()
    secret = resolve(cfg.gateway.webhook_secret)
    outbox: Any = None
    sender: Any = None
    lease: Any = None
    try:
        outbox = Outbox(cfg.outbox)
        sender = Sender(outbox, cfg.gateway.url, secret, also=cfg.gateway.also)
        sender.start()  # first: refuses when another agent already delivers this outbox
        agent = Agent(cfg, emit=outbox.enqueue)
        control = _start_control(cfg, agent) if cfg.control else None
        gate = None
        if cfg.control is not None:
            # Ask the gateway who is primary before starting PostgreSQL: a returning old primary
            # must never take writes after the group failed over away from it.
            from agents.boot import BootGate

            gate = BootGate.from_config(cfg, agent.drivers[cfg.control_resource().name],
                                        outbox.enqueue)
            gate.start()
        if cfg.lease is not None:
            from agents.lease import LeaseHolder

            lease = LeaseHolder.from_config(cfg, _lease_driver(cfg, agent), outbox.enqueue)
            agent.on_recovery_exhausted = lease.on_recovery_exhausted
            lease.start()
    except (OSError, ValueError, sqlite3.Error, SenderAlreadyRunning, ImportError) as exc:
        if sender is not None:
            sender.stop(flush_timeout_s=0)
        if outbox is not None:
            outbox.close()
        if isinstance(exc, ImportError):
            if not _libpq_missing(exc):
                raise
            raise _SetupError(f"cannot start the agent: {NO_LIBPQ}") from None
        raise _SetupError(f"cannot start the agent: {exc}") from None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if pidfile is not None:  # after the outbox's lock: the pid of the agent that runs, not of one refused
        pidfile.write_text(f"{os.getpid()}\n")
    # Everything imported and built so far lives as long as the agent: move it out of the
    # collector's generations, so the full collections that the every-second checks and events
    # trigger now and then do not walk a hundred thousand start-up objects each time.
    gc.collect()
    gc.freeze()
    try:
        agent.run()
    finally:
        if pidfile is not None:
            with contextlib.suppress(OSError):
                if pidfile.read_text().strip() == str(os.getpid()):
                    pidfile.unlink()
        if lease is not None:
            lease.stop()  # no revoke: PostgreSQL keeps serving (docs/fencing.md rule 6)
        if gate is not None:
            gate.stop()
        if control is not None:
            control.stop()
        sender.stop(flush_timeout_s=2.0)
        pending = outbox.pending_count()
        outbox.close()
        log.info("outbox %s closed, %d event(s) pending for the next run", cfg.outbox, pending)


def _lease_driver(cfg: Any, agent: Any) -> Any:
    """The PostgreSQL driver the leader lease fences: the control API's, else the only one."""
    from agents.config import PostgresResource

    if cfg.control is not None:
        return agent.drivers[cfg.control_resource().name]
    pgs = [r.name for r in cfg.resources if isinstance(r, PostgresResource)]
    if len(pgs) != 1:
        raise ValueError(f"lease: the leader lease fences one postgres resource; {len(pgs)} "
                         "are configured (add a control section naming it)")
    return agent.drivers[pgs[0]]


def _start_control(cfg: Any, agent: Any) -> Any:
    from agents.control_api import serve
    from drflow.secret_refs import resolve

    # The same driver object as local recovery: its lock keeps a verb and a restart apart.
    driver = agent.drivers[cfg.control_resource().name]
    driver.peers = tuple(cfg.control.peer_addresses())
    nonce_db = cfg.outbox.with_name(cfg.outbox.name + ".nonces")
    return serve(cfg.control.listen, resolve(cfg.control.secret), driver,
                 agent_id=cfg.agent_id, nonce_db=nonce_db)


def discover(as_json: bool = False, write: Path | None = None, datadir: list[Path] | None = None,
             gateway_url: str = "http://127.0.0.1:8088/v1/events",
             secret_ref: str = "env:DRFLOW_WEBHOOK_SECRET", agent_id: str | None = None,
             group: str = "default", outbox: str = "agent-outbox.sqlite", pg_user: str = "postgres",
             pg_password_ref: str | None = None, control_listen: str | None = None,
             control_secret_ref: str | None = None, control_master_ref: str | None = None,
             peer: list[str] | None = None) -> int:
    """Find running PostgreSQL instances and what they stand on (see DISCOVER_HELP)."""
    from agents import discovery
    from drflow.secret_refs import SecretError, SecretRef, resolve

    datadir, peer = datadir or [], peer or []

    password = None
    if pg_password_ref:
        try:
            password = resolve(SecretRef(ref=pg_password_ref))
        except (SecretError, ValueError) as exc:
            print(f"error: --pg-password-ref: {exc}", file=sys.stderr)
            return 2
    if write is not None and not agent_id:
        # The host name is often not the VM's name, and failover fences the VM by that name.
        print("error: --agent-id is required with --write: it must be this VM's name in "
              "vCenter, as written in drflow.yaml (primary.vm / standby.vm), because "
              "the gateway matches events and failover fences the VM by it", file=sys.stderr)
        return 2
    if control_master_ref and (control_secret_ref or write is None):
        print("error: --control-master-ref needs --write and excludes --control-secret-ref",
              file=sys.stderr)
        return 2
    instances = discovery.discover(datadir or None, pg_user, password)
    if not instances:
        print("no running PostgreSQL instance found"
              + (f" with data directory {', '.join(map(str, datadir))}" if datadir else ""),
              file=sys.stderr)
        return 1
    own_secret: Path | None = None
    if control_master_ref and write is not None:
        own_secret = write.absolute().with_name("control_secret")
        control_secret_ref = f"file:{own_secret}"
    cfg = discovery.config_for(
        instances, agent_id=agent_id, group=group, gateway_url=gateway_url,
        secret_ref=secret_ref, outbox=outbox, pg_user=pg_user, pg_password_ref=pg_password_ref,
        control_listen=control_listen, control_secret_ref=control_secret_ref,
        control_peers=peer)
    if as_json:
        print(json.dumps({"instances": [i.to_dict() for i in instances],
                          "resources": cfg["resources"]}, indent=2))
    else:
        _print_tables(instances, cfg["resources"])
    if write is not None:
        from agents.config import dump_config

        try:
            text = dump_config(cfg)
        except ValueError as exc:
            print(f"error: the discovered config does not validate: {exc}", file=sys.stderr)
            return 1
        if (own_secret is not None and control_master_ref
                and not _write_own_secret(own_secret, control_master_ref, cfg["agent_id"])):
            return 2
        write.write_text(text)
        print(f"wrote {write}", file=sys.stderr)
    return 0


def _write_own_secret(path: Path, master_ref: str, agent_id: str) -> bool:
    """This agent's control secret, derived from the master (which is not written), mode
    0600; False (the error printed) when the master cannot be read."""
    from drflow.secret_refs import SecretError, SecretRef, resolve
    from drflow.signing import control_secret

    try:
        master = resolve(SecretRef(ref=master_ref))
    except (SecretError, ValueError) as exc:
        print(f"error: --control-master-ref: {exc}", file=sys.stderr)
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(control_secret(master.get_secret_value().encode(), agent_id))
    print(f"wrote {path} (this agent's control secret)", file=sys.stderr)
    return True


def _print_tables(instances: list[Any], resources: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    found = Table(title="PostgreSQL instances")
    for col in ("pid", "port", "role", "upstream", "data directory", "listen", "volume", "run as"):
        found.add_column(col)
    for i in instances:
        up = f"{i.upstream.host}:{i.upstream.port}" if i.upstream else "-"
        found.add_row(str(i.pid), str(i.port), f"{i.role} ({i.role_source})", up, i.datadir,
                      ", ".join(i.listen) or "-", i.volume.mount_point, i.run_as)
    console.print(found)
    graph = Table(title="Resource graph (start order)")
    for col in ("resource", "type", "depends on", "target"):
        graph.add_column(col)
    for r in resources:
        target = {
            "ip": lambda r: f"{r['address']} on {r.get('interface', '?')}",
            "volume": lambda r: r["path"],
            "postgres": lambda r: f"{r['host']}:{r['port']} {r['datadir']}",
            "tcp": lambda r: f"{r['host']}:{r['port']}",
        }[r["type"]](r)
        graph.add_row(r["name"], r["type"], ", ".join(r.get("depends_on", [])) or "-", target)
    console.print(graph)
    for i in instances:
        for note in i.notes:
            console.print(f"note ({i.datadir}): {note}")


if __name__ == "__main__":
    # `python -m agents.cli run --config …`: the agent alone, without the drflow CLI.
    sys.exit(main(prog="python -m agents.cli"))
