"""DR drill runbook: readiness → bubble (VM clone + promoted copy) → checks → RTO/RPO → teardown → report.

Production is only ever read: the standby's replay position and newest completed transaction,
observed before the copy, are what the copy must hold; the copy's base backup asks the standby
for a spread restartpoint, never an immediate one. No write, table or setting on production, no
power operation on production VMs, no DNS change, no promotion of the production standby, no
change to replication settings. Teardown runs whatever happened.

RTO counts from the moment the copy of the standby is complete (what the bubble holds is
production as of then: the drill's stand-in for the moment of a disaster) to the copy writable
and verified. A real failover promotes the standby where it is and copies nothing, so the time
spent copying, which grows with the database and is paced to spare production, is the drill's
own overhead: it is reported beside the RTO as `ready_s` (drill start → copy verified).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow

from drflow.config import DrillConfig, GroupConfig
from drflow.dns import resolve_endpoint
from flows import drill_decisions
from flows.decisions import Decision
from flows.prefect_results import RESULTS
from flows.run import RunbookRun, final_state, minute_key
from flows.runtime import Runtime, runtime
from tasks import drill_checks, errors, pg_copy, vsphere
from tasks.postgres import Db


class DrillFailed(Exception):
    """The drill did not pass; its report (audit, artifact, Slack) says why."""


@dataclass
class _State:
    """What one drill built and measured: teardown and the report read it."""

    drill_id: str
    clone_prefix: str
    t0: float = field(default_factory=time.monotonic)
    step: str = ""
    run_dir: Path | None = None
    bindir: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    clone: Any = None  # the VM clone's future, made while the standby is copied
    copied_at: float | None = None  # monotonic time the copy of the standby was complete


@flow(name="drill", log_prints=False, persist_result=False, result_storage=RESULTS)
def drill(group: str, config_path: str | None = None,
          raise_on_failure: bool = True) -> dict[str, Any]:
    """Drill group `group` in an isolated bubble and report RTO and RPO; production untouched.

    Returns the report's figures. With `raise_on_failure` (the default, so that a scheduled
    run that did not pass shows as Failed in Prefect) a refused or failed drill raises
    DrillFailed after teardown and reporting."""
    rt = runtime(config_path)
    g = rt.cfg.group(group)
    dc = rt.cfg.drill or DrillConfig()
    drill_id = uuid.uuid4().hex[:10]
    st = _State(drill_id=drill_id, clone_prefix=f"{g.standby.vm}-drill-")
    started_at = datetime.now(UTC)
    run = RunbookRun(rt, "drill", group, title=f"DR drill of {group}")
    run.label(minute_key(started_at), g.standby.site)
    run.start(f"🧪 *{group}*: DR drill {drill_id} started — bubble on {dc.isolated_portgroup!r} "
              f"at site {g.standby.site}; production is not touched.",
              {"drill_id": drill_id, "standby": g.standby.vm, "portgroup": dc.isolated_portgroup,
               "rpo_budget_s": g.rpo_budget_s})
    work_dir = Path(dc.work_dir)
    refused: str | None = None
    failed: str | None = None
    teardown = Decision(True, "nothing was built")
    try:
        pg_copy.prepare_work_dir(work_dir)
        with pg_copy.group_lock(work_dir, group) as mine:
            if not mine:
                refused = f"another drill of {group} is running on this machine"
                run.note("refused", refused)
            else:
                try:
                    plan = drill_decisions.copy_plan(dc.copy_method, pg_copy.snapshot_problem(
                        Path(g.standby.datadir) if g.standby.datadir else None, work_dir))
                    refused = _readiness(run, rt, g, dc, plan)
                except Exception as exc:  # e.g. a secret that cannot be resolved
                    refused = f"readiness checks could not run: {type(exc).__name__}: {exc}"
            if mine and refused is None:
                try:
                    _build_and_check(run, rt, g, dc, st, work_dir, plan)
                except Exception as exc:
                    failed = f"step '{st.step}' failed: {type(exc).__name__}: {str(exc)[:500]}"
                finally:
                    teardown = _teardown(run, rt, g, dc, st, work_dir)
    except (errors.DrillError, OSError) as exc:  # the work directory itself is unusable
        refused = f"drill.work_dir {work_dir}: {exc}"
    outcome, reason = drill_decisions.drill_outcome(refused, failed, teardown)
    figures = _report(run, g, st, outcome, reason, started_at)
    if outcome != "passed" and raise_on_failure:
        raise DrillFailed(f"drill of {group} {outcome}: {reason}")
    return final_state(drill.fn, figures, drill_message(figures))


def drill_message(f: dict[str, Any]) -> str:
    """The drill run's final message: the outcome with its RTO and RPO, then why."""
    bytes_ = f" / {f['rpo_bytes']} bytes" if f.get("rpo_bytes") is not None else ""
    return (f"{f['outcome']}: RTO {_num(f.get('rto_s'))} s, RPO {_num(f.get('rpo_s'))} s"
            f"{bytes_}; {f['reason']}")


def _decide(step: Any, d: Decision) -> None:
    step.reason = d.reason
    if not d.proceed:
        step.outcome = "refused"


def _readiness(run: RunbookRun, rt: Runtime, g: GroupConfig, dc: DrillConfig,
               plan: drill_decisions.CopyPlan) -> str | None:
    """Every check runs (the report lists all reasons); None if all pass, else why not."""
    checks: dict[str, Decision] = {}
    primary, standby = rt.db(g, g.primary), rt.db(g, g.standby)
    with run.step("check replication", g.standby.vm, {"rpo_budget_s": g.rpo_budget_s}) as s:
        f = drill_checks.replication_facts(primary, standby)
        d = drill_decisions.replication_ready(f, f"{g.primary.host}:{g.primary.port}", g.replication,
                              g.rpo_budget_s)
        s.result = {"state": f.state, "sync_state": f.sync_state, "lag_s": f.lag_s,
                    "lag_bytes": f.lag_bytes, "replay_paused": f.replay_paused}
        _decide(s, d)
        checks["replication"] = d
    vc = rt.vcenter(g.standby.site)
    with run.step("check vCenter", vc.url) as s:
        ok, detail = vsphere.vcenter_facts(vc, g.standby.vm)
        d = Decision(ok, detail if ok else f"vCenter unreachable: {detail}")
        _decide(s, d)
        checks["vCenter"] = d
    with run.step("check isolation", dc.isolated_portgroup) as s:
        if ok:
            facts = vsphere.isolation_facts(vc, g.standby.vm, dc.isolated_portgroup)
            d = drill_decisions.isolation_proven(facts, dc.isolated_portgroup)
            s.result = {"host": facts.host, "vswitch": facts.vswitch, "pnics": list(facts.pnics),
                        "attached_vms": list(facts.attached_vms)}
        else:
            d = Decision(False, "cannot prove isolation: vCenter unreachable")
        _decide(s, d)
        checks["isolation"] = d
    with run.step("check DNS", g.dns.record) as s:
        try:
            resolved, err = resolve_endpoint(rt.route53, g.dns.zone_id, g.dns.record), None
        except Exception as exc:
            resolved, err = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        d = drill_decisions.dns_sane(resolved, err, g.dns.record, g.primary.host, g.primary.port)
        _decide(s, d)
        checks["DNS"] = d
    with run.step("check the copy method", dc.copy_method) as s:
        d = plan.decision
        _decide(s, d)
        checks["copy method"] = d
    verdict = drill_decisions.readiness(checks)
    return None if verdict.proceed else verdict.reason


def _build_and_check(run: RunbookRun, rt: Runtime, g: GroupConfig, dc: DrillConfig,
                     st: _State, work_dir: Path, plan: drill_decisions.CopyPlan) -> None:
    primary, standby = rt.db(g, g.primary), rt.db(g, g.standby)
    vc = rt.vcenter(g.standby.site)
    leftovers = pg_copy.leftover_copies(work_dir, g.name)
    stray_vms = vsphere.drill_vms(vc, st.clone_prefix)
    if leftovers or stray_vms:
        st.step = "remove leftovers of an earlier drill"
        with run.step(st.step, g.name) as s:
            left = [p for d in leftovers for p in pg_copy.remove_copy(d, str(pg_copy.pg_bindir()))]
            destroyed, refused = vsphere.destroy_clones(vc, st.clone_prefix, dc.isolated_portgroup)
            s.reason = (f"removed {len(leftovers)} copy/copies and {len(destroyed)} clone(s)"
                        + (f"; left: {left + refused}" if left or refused else ""))

    st.step = "observe the standby"
    with run.step(st.step, g.standby.vm) as s:
        seen = drill_checks.observe_standby(standby)
        s.reason = (f"standby replayed up to {_lsn(seen.replay_lsn)}; newest completed "
                    f"transaction {seen.witness_xid} ({seen.witness_status}); "
                    f"{len(seen.tables)} user table(s); read-only")

    # The VM clone (a whole disk copy on a real vCenter) and the copy of the standby need
    # nothing from each other: the clone is made while the standby is copied, and waited for
    # after. Teardown waits for it too, whatever happened.
    clone_name = st.clone_prefix + st.drill_id
    st.figures["clone"] = clone_name
    st.clone = vsphere.clone_into_bubble.submit(vc, g.standby.vm, clone_name,
                                               dc.isolated_portgroup)

    st.step = "copy the standby"
    name = f"{g.name}-{st.drill_id}"
    with run.step(st.step, g.standby.vm, {"copy": name}) as s:
        st.run_dir = work_dir / name  # set first: teardown removes a half-made copy too
        if plan.method == "snapshot" and g.standby.datadir:
            made = pg_copy.snapshot_copy(standby, Path(g.standby.datadir), work_dir,
                                         dc.port_range, name, g.name)
            how = f"btrfs snapshot of {g.standby.datadir}, nothing read through the standby"
        else:
            made = pg_copy.make_copy(standby, work_dir, dc.port_range, name, g.name, dc.max_rate)
            how = (f"pg_basebackup, WAL {made['wal_method']}, max rate "
                   f"{dc.max_rate or 'unlimited'}; {plan.reason}")
        # The copy now holds production as of this moment: the drill's stand-in for the moment
        # of a disaster, from which its RTO counts (module docstring).
        st.copied_at = time.monotonic()
        copy: pg_copy.DrillCopy = made["copy"]
        st.bindir = made["bindir"]
        # RPO: what a failover at the moment of the copy would have lost (the standby's lag).
        lag = drill_checks.replication_facts(primary, standby)
        st.figures.update(copy_s=round(made["seconds"], 3), copy_bytes=made["bytes"],
                          wal_method=made["wal_method"], copy_port=copy.port,
                          copy_method="snapshot" if made["wal_method"] == "snapshot"
                          else "basebackup",
                          rpo_s=None if lag.lag_s is None else round(lag.lag_s, 3),
                          rpo_bytes=lag.lag_bytes)
        s.reason = (f"{made['bytes'] / 1e6:.1f} MB in {made['seconds']:.2f} s ({how}); "
                    "standby lag then "
                    f"{_num(lag.lag_s)} s / {lag.lag_bytes} bytes")

    st.step = "clone the DR VM into the bubble"
    with run.step(st.step, g.standby.vm, {"clone": clone_name,
                                          "portgroup": dc.isolated_portgroup}) as s:
        clone = st.clone.result()
        s.reason = (f"{clone_name} on {', '.join(clone['networks']) or 'no network'} "
                    f"({clone['power_state']})")

    st.step = "start and promote the copy"
    copy_db = Db(host=pg_copy.COPY_HOST, port=copy.port, dbname=g.database.name,
                 user=g.database.user, password=rt.secret(g.database.password))
    with run.step(st.step, f"{pg_copy.COPY_HOST}:{copy.port}") as s:
        pg_copy.start_copy(copy, made["bindir"])
        copy_lsn = pg_copy.promote_copy(copy_db)
        st.figures["copy_lsn"] = _lsn(copy_lsn)
        s.reason = f"promoted on port {copy.port} at LSN {_lsn(copy_lsn)}"

    st.step = "check the copy"
    with run.step(st.step, f"{pg_copy.COPY_HOST}:{copy.port}",
                  {"witness_xid": seen.witness_xid}) as s:
        facts = drill_checks.check_copy(copy_db, seen, copy_lsn, st.drill_id, (primary, standby),
                                  copy.name)
        d = drill_decisions.copy_verified(facts)
        s.reason = d.reason
        if not d.proceed:
            s.outcome = "failed"
            raise errors.DrillError(d.reason)
    done = time.monotonic()
    st.figures["rto_s"] = round(done - (st.copied_at or st.t0), 3)
    st.figures["ready_s"] = round(done - st.t0, 3)


def _teardown(run: RunbookRun, rt: Runtime, g: GroupConfig, dc: DrillConfig, st: _State,
              work_dir: Path) -> Decision:
    """Remove everything the drill built, each part on its own, then check nothing is left."""
    left: list[str] = []
    with run.step("tear down the bubble", g.name) as s:
        if st.clone is not None:
            # A clone still being made would appear after the check below: let it finish.
            with contextlib.suppress(Exception):
                st.clone.wait(timeout=600)
        if st.run_dir is not None:
            try:
                left += pg_copy.remove_copy(st.run_dir, st.bindir or str(pg_copy.pg_bindir()))
            except Exception as exc:
                left.append(f"copy {st.run_dir}: {type(exc).__name__}: {exc}")
        try:
            vc = rt.vcenter(g.standby.site)
            _destroyed, refused = vsphere.destroy_clones(vc, st.clone_prefix,
                                                        dc.isolated_portgroup)
            left += refused
            # Check from scratch, not from what the call above returned.
            left += [f"VM {n}" for n in vsphere.drill_vms(vc, st.clone_prefix)]
        except Exception as exc:
            left.append(f"clones {st.clone_prefix}*: {type(exc).__name__}: {exc}")
        if st.run_dir is not None:
            left += [f"process {p}" for p in pg_copy.processes_under(st.run_dir)]
            if st.run_dir.exists():
                left.append(f"directory {st.run_dir}")
        d = drill_decisions.teardown_clean(sorted(set(left)))
        s.reason = d.reason
        if not d.proceed:
            s.outcome = "failed"
    return d


def _report(run: RunbookRun, g: GroupConfig, st: _State, outcome: str, reason: str,
            started_at: datetime) -> dict[str, Any]:
    drill_s = time.monotonic() - st.t0
    steps = [{"name": t.name, "outcome": t.outcome, "seconds": round(t.seconds, 3),
              "reason": t.reason} for t in run.timings]
    f = st.figures
    figures: dict[str, Any] = {
        "group": g.name, "drill_id": st.drill_id, "run_id": run.run_id, "outcome": outcome,
        "reason": reason, "started_at": started_at.isoformat(timespec="seconds"),
        "drill_s": round(drill_s, 3), "rto_s": f.get("rto_s"), "ready_s": f.get("ready_s"),
        "rpo_s": f.get("rpo_s"),
        "rpo_bytes": f.get("rpo_bytes"), "rpo_budget_s": g.rpo_budget_s,
        "copy_lsn": f.get("copy_lsn"), "copy_bytes": f.get("copy_bytes"),
        "copy_s": f.get("copy_s"), "copy_method": f.get("copy_method"), "clone": f.get("clone"),
        "steps": steps,
    }
    icon = {"passed": "✅", "refused": "⛔"}.get(outcome, "❌")
    if outcome == "passed":
        headline = (f"{icon} *{g.name}*: DR drill passed — RTO {_num(f.get('rto_s'))} s, "
                    f"RPO {_num(f.get('rpo_s'))} s / {f.get('rpo_bytes')} bytes; bubble torn "
                    "down, production untouched.")
    else:
        headline = f"{icon} *{g.name}*: DR drill {outcome} — {reason}"
    markdown = render_markdown(figures, run.steps_table())
    run.finish(outcome, headline, figures, markdown)
    return figures


def render_markdown(f: dict[str, Any], steps_table: str) -> str:
    """The Prefect artifact of one drill: figures, verdict and every step with its timing."""
    copy_mb = f"{f['copy_bytes'] / 1e6:.1f} MB" if f.get("copy_bytes") is not None else "—"
    return (
        f"# DR drill of {f['group']}: {f['outcome'].upper()}\n\n"
        f"{f['reason']}\n\n"
        "| figure | value |\n|---|---|\n"
        f"| RTO (copy of the standby complete → copy writable and verified) | "
        f"**{_num(f.get('rto_s'))} s** |\n"
        f"| bubble ready (drill start → copy writable and verified) | "
        f"{_num(f.get('ready_s'))} s |\n"
        f"| RPO (standby lag at the moment of the copy) | **{_num(f.get('rpo_s'))} s / "
        f"{f.get('rpo_bytes') if f.get('rpo_bytes') is not None else '—'} bytes** "
        f"(budget {f['rpo_budget_s']:g} s) |\n"
        f"| drill wall time | {_num(f.get('drill_s'))} s |\n"
        f"| copy | {copy_mb} in {_num(f.get('copy_s'))} s, LSN {f.get('copy_lsn') or '—'} |\n"
        f"| clone | {f.get('clone') or '—'} |\n"
        f"| drill id / flow run | {f['drill_id']} / {f['run_id']} |\n"
        f"| started (UTC) | {f['started_at']} |\n\n"
        "## Steps\n\n" + steps_table + "\n"
    )


def _lsn(v: int) -> str:
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def _num(x: Any) -> str:
    return "—" if x is None else f"{float(x):.2f}"
