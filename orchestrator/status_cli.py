"""`drflow status`: every protection group at a glance, as a table or JSON.

What is true now comes from the databases themselves, history from the audit trail, and what
the gateway knows (open incident, the agents' heartbeats, its roles record) from its
`GET /v1/groups` when it answers. The same per-group status is in that answer under `status`,
refreshed in the background: its age is shown, and called stale beyond the refresh interval plus
a second. Times are ISO 8601 UTC; ages are computed when printed.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from drflow.audit.store import AuditStore
    from drflow.config import DrflowConfig

STYLE = {"protected": "green", "unprotected": "yellow", "degraded": "bold red",
         "unknown": "magenta"}


def gather(cfg: DrflowConfig, gateway_url: str | None,
           audit: AuditStore | None) -> dict[str, Any]:
    """{"groups": {name: status}, "gateway": {...}}: the databases, the audit trail and, when it
    answers, the gateway."""
    import httpx

    from orchestrator.gateway.status import GroupStatusProvider

    groups = GroupStatusProvider(cfg, audit).collect()
    gw: dict[str, Any] = {"url": gateway_url, "reachable": False}
    if gateway_url:
        try:
            r = httpx.get(f"{gateway_url.rstrip('/')}/v1/groups", timeout=3)
            r.raise_for_status()
            view = r.json()
            gw["reachable"] = True
        except (httpx.HTTPError, ValueError) as exc:
            gw["error"] = f"{type(exc).__name__}: {exc}"
            view = {}
        for name, st in groups.items():
            g = view.get(name) or {}
            st["gateway"] = gateway_part(g) if g else None
    return {"groups": groups, "gateway": gw}


def gateway_part(g: dict[str, Any]) -> dict[str, Any]:
    """What `drflow status` shows of the gateway's answer for one group, with how old the
    gateway's own (background) status of it is."""
    out = {k: g.get(k) for k in ("primary", "primary_heartbeat_age_s", "open_incident", "roles")}
    gst: dict[str, Any] = g["status"] if isinstance(g.get("status"), dict) else {}
    out.update(status_checked_at=gst.get("checked_at"), status_age_s=gst.get("age_s"),
               status_protection=gst.get("protection"))
    return out


def _audit(cfg: DrflowConfig) -> tuple[AuditStore | None, str | None]:
    from drflow.audit import open_store

    try:
        password = cfg.secret(cfg.audit.password) if cfg.audit.password else None
        return open_store(cfg.audit.url, create=False, password=password), None
    except Exception as exc:
        return None, f"audit trail unavailable ({type(exc).__name__}: {exc}): no history shown"


def _when(iso: str | None) -> str:
    """ISO 8601 UTC to the second (the audit trail keeps microseconds)."""
    if not iso:
        return ""
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat("T", "seconds")


def age_text(age_s: float | None, interval_s: float) -> str:
    """`checked 0.4 s ago`, or `checked 5.2 s ago (stale)` beyond interval + 1 s."""
    from orchestrator.gateway.status import is_stale

    if age_s is None:
        return "never checked (stale)"
    return f"checked {age_s:.1f} s ago" + (" (stale)" if is_stale(age_s, interval_s) else "")


def with_ages(data: dict[str, Any], now: float) -> dict[str, Any]:
    """Each group's status aged as of `now` (`age_s`, `stale`; the keys' `read_age_s`)."""
    from orchestrator.gateway.status import REFRESH_INTERVAL_S, aged

    groups = {name: aged(st, now, float(st.get("refresh_interval_s") or REFRESH_INTERVAL_S))
              for name, st in data["groups"].items()}
    return {**data, "groups": groups}


def _num(x: Any, unit: str = " s") -> str:
    return "—" if x is None else f"{x:.1f}{unit}" if isinstance(x, int | float) else str(x)


def _last(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "none"
    out = f"{_when(rec.get('at'))} {str(rec.get('outcome', '')).replace('_', ' ')}"
    if rec.get("rto_s") is not None:
        out += f"\nRTO {_num(rec.get('rto_s'))}, RPO {_num(rec.get('rpo_s'))}"
    return out


def _incident(st: dict[str, Any]) -> str:
    gw = st.get("gateway") or {}
    open_inc = gw.get("open_incident")
    if open_inc:
        return f"[bold red]OPEN[/] {open_inc.get('idempotency_key')} ({open_inc.get('status')})"
    return _last(st.get("last_failover"))


def _lag(st: dict[str, Any]) -> str:
    r = st["replication"]
    if r["state"] == "none":
        return "—"
    size = r.get("lag_bytes")
    return f"{_num(r.get('lag_s'))}/{size if size is not None else '?'} B"


def _standby(st: dict[str, Any]) -> str:
    serving = (st.get("serving") or {}).get("vm")
    others = [n for n in st.get("nodes", []) if n["vm"] != serving]
    if not others:
        return "—"
    n = others[0]
    if n["role"] == "standby":
        return f"{n['site']} {'streaming' if n.get('receiver') == 'streaming' else 'not streaming'}"
    return f"{n['site']} {'PRIMARY too' if n['role'] == 'primary' else n['role']}"


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="drflow protection groups", show_lines=True)
    for col in ("group", "serving", "standby", "replication", "protection", "last incident",
                "last drill"):
        table.add_column(col, no_wrap=col in ("group", "protection"))
    for name, st in data["groups"].items():
        serving = st.get("serving")
        rep = st["replication"]
        prot = st["protection"]
        table.add_row(
            name, serving["site"] if serving else "[bold red]none[/]", _standby(st),
            f"{rep['state']}, lag {_lag(st)}" if rep["state"] != "none" else "none",
            f"[{STYLE.get(prot, 'white')}]{prot}[/]", _incident(st), _last(st.get("last_drill")))
    console.print(table)
    for name, st in data["groups"].items():
        if st["protection"] != "protected":
            console.print(f"[{STYLE.get(st['protection'], 'white')}]{name}: {st['protection']}[/]"
                          f" — {st['protection_reason']}")
    etcd_errors = set()
    for name, st in data["groups"].items():
        lz = st.get("leases")  # the leader and sync keys in etcd, when configured
        if lz:
            by = (lz.get("leader") or {}).get("by")
            sync = lz.get("sync")
            standby = "no key" if not sync else sync.get("standby") or "none"
            console.print(f"{name}: leader key {lz['leader_holder']}" + (f" (by {by})" if by else "")
                          + f", sync key standby {standby}")
            if lz.get("etcd_error"):
                etcd_errors.add(lz["etcd_error"])
    for err in sorted(etcd_errors):
        console.print(f"[yellow]{err}[/]")
    gw = data["gateway"]
    if gw.get("url"):
        console.print(f"gateway {gw['url']}: " + ("reachable" if gw.get("reachable")
                                                  else f"[yellow]unreachable[/] ({gw.get('error')})"))
    for name, st in data["groups"].items():
        for w in st.get("pending_approvals") or []:
            console.print(f"{name}: {w['runbook']} waiting for approval since {_when(w['since'])}"
                          f" (expires {_when(w.get('expires_at')) or 'never'})")
    for line in freshness_lines(data):
        console.print(line)
    for note in data.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def freshness_lines(data: dict[str, Any]) -> list[str]:
    """When each status was checked, here and by the gateway, and whether that is old."""
    from orchestrator.gateway.status import REFRESH_INTERVAL_S, is_stale

    out = []
    for name, st in data["groups"].items():
        interval = float(st.get("refresh_interval_s") or REFRESH_INTERVAL_S)
        line = f"{name}: {age_text(st.get('age_s'), interval)} ({st.get('checked_at')})"
        gw = st.get("gateway") or {}
        if gw:
            age = gw.get("status_age_s")
            text = age_text(age, interval)
            if is_stale(age, interval):
                text = f"[yellow]{text}[/]"
            line += f"; the gateway's status {text}"
        out.append(line)
    return out


def status(
    config: Annotated[Path, typer.Option(
        "--config", "-c", envvar="DRFLOW_CONFIG", exists=True, dir_okay=False,
        help="drflow configuration file (env DRFLOW_CONFIG).")],
    gateway: Annotated[str | None, typer.Option(
        "--gateway", help="Gateway URL; default: gateway.url of the config (else from gateway.listen). "
                          "'' skips it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every protection group: serving side, replication, protection state, last incident.

    For each group: which side serves, replication mode and lag, protection state (protected /
    unprotected after failover / degraded / unknown), last incident and last drill."""
    from drflow.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: invalid configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    url = cfg.gateway.client_url if gateway is None else gateway or None
    audit, audit_note = _audit(cfg)
    try:
        data = gather(cfg, url, audit)
    finally:
        if audit is not None:
            audit.close()
    data["notes"] = [n for n in [audit_note] if n]
    data = with_ages(data, time.time())
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)
