"""`drflow drill run | history | report | schedules`: run DR drills and show what they proved.

The audit trail is the record: each drill ends with one `drill.finish` record holding its
figures (RTO, RPO, steps, outcome). History and compliance reports are read from there.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from drflow.audit.store import AuditStore
    from drflow.config import DrflowConfig

app = typer.Typer(help="DR drills: run one, show their history, write compliance reports.",
                  no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option(
    "--config", envvar="DRFLOW_CONFIG", help="drflow configuration file.",
    show_default=False)]
GroupArg = Annotated[str, typer.Argument(help="Protection group name.", show_default=False)]
EXIT_FAILED, EXIT_REFUSED = 1, 2
BEGIN = "# BEGIN drill schedules"
END = "# END drill schedules"


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _config(path: Path) -> DrflowConfig:
    from drflow.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(f"invalid configuration:\n{exc}") from None


def _group_known(cfg: DrflowConfig, group: str) -> None:
    try:
        cfg.group(group)
    except KeyError as exc:
        raise _fail(str(exc.args[0])) from None


StateDirOpt = Annotated[Path, typer.Option(
    "--state-dir", envvar="DRFLOW_STATE_DIR",
    help="The state directory of the `drflow up` whose Prefect records the run "
         "(unless PREFECT_API_URL is set; env DRFLOW_STATE_DIR).")]


@app.command()
def run(group: GroupArg, config: ConfigOpt,
        as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")]
        = False,
        state_dir: StateDirOpt = Path("./drflow-state")) -> None:
    """Drill GROUP now, in this process, recorded in the orchestrator's Prefect.

    Exit status: 0 passed, 1 failed, 2 refused."""
    from orchestrator.cli_common import need_prefect

    cfg = _config(config)
    _group_known(cfg, group)
    need_prefect(state_dir)
    from flows.drill import drill

    figures = drill(group, config_path=str(config), raise_on_failure=False)
    if as_json:
        typer.echo(json.dumps(figures, sort_keys=True))
    else:
        typer.echo(f"{group}: drill {figures['outcome']} — {figures['reason']}")
        typer.echo(f"  RTO {_num(figures.get('rto_s'))} s, RPO {_num(figures.get('rpo_s'))} s / "
                   f"{figures.get('rpo_bytes') if figures.get('rpo_bytes') is not None else '—'}"
                   f" bytes, wall {_num(figures.get('drill_s'))} s")
    codes = {"passed": 0, "failed": EXIT_FAILED}
    raise typer.Exit(codes.get(figures["outcome"], EXIT_REFUSED))


# --- history and reports from the audit trail ----------------------------------------------------


def _store(cfg: DrflowConfig) -> AuditStore:
    from drflow.audit.open import open_store
    from drflow.audit.store import AuditStoreError

    a = cfg.audit
    try:
        return open_store(a.url, create=False,
                          password=cfg.secret(a.password) if a.password else None)
    except AuditStoreError as exc:
        raise _fail(f"{exc} (no drill has been recorded there yet?)") from None


def drill_rows(store: AuditStore, group: str | None = None) -> list[dict[str, Any]]:
    """Every finished drill (oldest first), with the RTO change against the group's previous one."""
    rows: list[dict[str, Any]] = []
    last_rto: dict[str, float] = {}
    for rec in store.iter_records():
        if rec.action != "drill.finish" or (group is not None and rec.target != group):
            continue
        row = {**rec.parameters, "group": rec.target, "outcome": rec.outcome,
               "headline": rec.reason, "time": rec.time, "seq": rec.seq, "hash": rec.hash}
        rto = row.get("rto_s")
        prev = last_rto.get(rec.target)
        row["rto_delta_s"] = round(rto - prev, 3) if rto is not None and prev is not None else None
        if rto is not None:
            last_rto[rec.target] = float(rto)
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, pass rate and RTO/RPO spread of a list of drills."""
    rtos = [float(r["rto_s"]) for r in rows if r.get("rto_s") is not None]
    rpos = [float(r["rpo_s"]) for r in rows if r.get("rpo_s") is not None]
    passed = [r for r in rows if r["outcome"] == "passed"]
    return {
        "drills": len(rows), "passed": len(passed),
        "failed": sum(1 for r in rows if r["outcome"] == "failed"),
        "refused": sum(1 for r in rows if r["outcome"] == "refused"),
        "pass_rate": round(len(passed) / len(rows), 3) if rows else None,
        "last_passed_at": passed[-1]["time"] if passed else None,
        "last_outcome": rows[-1]["outcome"] if rows else None,
        "rto_s": {"min": min(rtos), "median": round(statistics.median(rtos), 3),
                  "max": max(rtos)} if rtos else None,
        "rpo_s_max": max(rpos) if rpos else None,
    }


def _trend(delta: float | None) -> str:
    if delta is None:
        return ""
    if abs(delta) < 0.005:
        return "="
    return f"[red]▲ +{delta:.2f}[/]" if delta > 0 else f"[green]▼ {delta:.2f}[/]"


@app.command()
def history(group: Annotated[str | None, typer.Argument(
                help="Only this protection group.", show_default=False)] = None,
            config: ConfigOpt = Path("drflow.yaml"),
            limit: Annotated[int, typer.Option("--limit", "-n", min=1,
                                               help="Show the last N drills.")] = 50,
            as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False) -> None:
    """Past drills, newest last, with the RTO trend against each group's previous drill."""
    cfg = _config(config)
    if group is not None:
        _group_known(cfg, group)
    with _store(cfg) as store:
        rows = drill_rows(store, group)[-limit:]
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, sort_keys=True, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DR drills" + (f" of {group}" if group else ""))
    for col in ("started (UTC)", "group", "outcome", "RTO s", "trend", "RPO s", "RPO bytes",
                "wall s", "reason"):
        table.add_column(col, overflow="fold")
    styles = {"passed": "green", "failed": "red", "refused": "yellow"}
    for r in rows:
        table.add_row(
            str(r.get("started_at") or r["time"])[:19].replace("T", " "), r["group"],
            f"[{styles.get(r['outcome'], 'white')}]{r['outcome']}[/]", _num(r.get("rto_s")),
            _trend(r.get("rto_delta_s")), _num(r.get("rpo_s")),
            "—" if r.get("rpo_bytes") is None else str(r["rpo_bytes"]), _num(r.get("drill_s")),
            "" if r["outcome"] == "passed" else str(r.get("reason", ""))[:160])
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    if not rows:
        typer.echo("no drills recorded yet")
        return
    groups = sorted({r["group"] for r in rows})
    for g in groups:
        s = summary([r for r in rows if r["group"] == g])
        rto = s["rto_s"]
        typer.echo(f"{g}: {s['passed']}/{s['drills']} passed"
                   + (f", RTO median {rto['median']:.2f} s (min {rto['min']:.2f}, max "
                      f"{rto['max']:.2f})" if rto else "")
                   + (f", worst RPO {s['rpo_s_max']:.2f} s" if s["rpo_s_max"] is not None else ""))


@app.command()
def report(group: GroupArg, config: ConfigOpt = Path("drflow.yaml"),
           fmt: Annotated[str, typer.Option("--format", help="md or json.")] = "md",
           last: Annotated[int, typer.Option("--last", min=1,
                                             help="Include the last N drills.")] = 100) -> None:
    """A compliance report of GROUP's drills, and whether their audit trail verifies.

    It holds a summary, every drill, the latest one's steps, and whether the audit trail they
    come from verifies."""
    if fmt not in ("md", "json"):
        raise _fail("--format must be md or json")
    cfg = _config(config)
    _group_known(cfg, group)
    with _store(cfg) as store:
        rows = drill_rows(store, group)[-last:]
        verified = store.verify()
        location = store.location
    data = {
        "group": group, "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "audit": {"store": location, "verified": verified.ok, "summary": verified.summary()},
        "summary": summary(rows), "drills": rows,
    }
    typer.echo(json.dumps(data, indent=2, default=str) if fmt == "json" else render_report(data))


def render_report(data: dict[str, Any]) -> str:
    """The Markdown compliance report of one group's drills."""
    s, rows, audit = data["summary"], data["drills"], data["audit"]
    rto = s["rto_s"] or {}
    rate = "—" if s["pass_rate"] is None else f"{s['pass_rate']:.0%}"
    out = [
        f"# DR drill report: {data['group']}", "",
        f"Generated {data['generated_at']} from the audit trail at {audit['store']}.",
        f"Audit trail verification: **{'ok' if audit['verified'] else 'FAILED'}** "
        f"({audit['summary']}).", "",
        "## Summary", "",
        "| drills | passed | failed | refused | pass rate | last passed | RTO median (min-max) "
        "| worst RPO |", "|---:|---:|---:|---:|---:|---|---|---:|",
        f"| {s['drills']} | {s['passed']} | {s['failed']} | {s['refused']} | "
        f"{rate} | "
        f"{s['last_passed_at'] or 'never'} | "
        f"{_num(rto.get('median'))} s ({_num(rto.get('min'))} to {_num(rto.get('max'))}) | "
        f"{_num(s['rpo_s_max'])} s |", "",
        "## Drills", "",
        "| started (UTC) | outcome | RTO s | ΔRTO s | RPO s | RPO bytes | wall s | reason | "
        "audit seq |", "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        delta = r.get("rto_delta_s")
        out.append(
            f"| {str(r.get('started_at') or r['time'])[:19]} | {r['outcome']} | "
            f"{_num(r.get('rto_s'))} | {'' if delta is None else f'{delta:+.2f}'} | "
            f"{_num(r.get('rpo_s'))} | {r.get('rpo_bytes') if r.get('rpo_bytes') is not None else '—'}"
            f" | {_num(r.get('drill_s'))} | {_cell(str(r.get('reason', '')))} | {r['seq']} |")
    if rows:
        latest = rows[-1]
        out += ["", f"## Latest drill ({latest.get('drill_id')}): steps", "",
                "| step | outcome | seconds | why |", "|---|---|---:|---|"]
        out += [f"| {st['name']} | {st['outcome']} | {st['seconds']:.3f} | {_cell(st['reason'])} |"
                for st in latest.get("steps", [])]
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _num(x: Any) -> str:
    return "—" if x is None else f"{float(x):.2f}"


# --- schedules in prefect.yaml --------------------------------------------------------------------


def schedules_block(cfg: DrflowConfig, indent: str) -> list[str]:
    """The `schedules:` YAML of the drill deployment: one cron per group that has one."""
    lines = [f"{indent}schedules:"]
    groups = [g for g in cfg.groups if g.policy.drill_schedule]
    if not groups:
        return [f"{indent}schedules: []"]
    for g in groups:
        lines += [f'{indent}  - cron: "{g.policy.drill_schedule}"',
                  f"{indent}    timezone: UTC",
                  f"{indent}    slug: drill-{g.name}",
                  f"{indent}    parameters: {{group: {g.name}}}"]
    return lines


def with_schedules(text: str, cfg: DrflowConfig) -> str:
    """`text` (a prefect.yaml) with the block between the BEGIN/END drill lines regenerated."""
    lines = text.splitlines()
    begin = next((i for i, ln in enumerate(lines) if ln.strip().startswith(BEGIN)), None)
    end = next((i for i, ln in enumerate(lines) if ln.strip().startswith(END)), None)
    if begin is None or end is None or end < begin:
        raise ValueError(f"no '{BEGIN} … {END}' lines in the drill deployment: add them around "
                         "its schedules")
    indent = re.match(r"\s*", lines[begin]).group(0)  # type: ignore[union-attr]
    return "\n".join(lines[:begin + 1] + schedules_block(cfg, indent) + lines[end:]) + "\n"


@app.command()
def schedules(config: ConfigOpt = Path("drflow.yaml"),
              prefect_file: Annotated[Path, typer.Option(
                  "--prefect-file", help="The prefect.yaml holding the drill deployment.")]
              = Path("prefect.yaml"),
              write: Annotated[bool, typer.Option(
                  "--write", help="Rewrite --prefect-file in place.")] = False,
              out: Annotated[Path | None, typer.Option(
                  "--out", help="Write the result here instead.", show_default=False)] = None
              ) -> None:
    """Regenerate the drill deployment's per-group cron schedules from the config."""
    cfg = _config(config)
    try:
        text = with_schedules(prefect_file.read_text(), cfg)
    except (OSError, ValueError) as exc:
        raise _fail(f"{prefect_file}: {exc}") from None
    target = prefect_file if write else out
    if target is None:
        typer.echo(text, nl=False)
        return
    target.write_text(text)
    n = sum(1 for g in cfg.groups if g.policy.drill_schedule)
    typer.echo(f"{target}: {n} drill schedule(s); deploy with `prefect deploy --name drill`")
