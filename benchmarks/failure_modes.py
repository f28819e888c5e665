"""What drflow does in each failure a datacenter has, measured on the lab, against what it must do.

Each case injects one fault (lab/faults.py) on its own group while an application-like writer
writes through the group's DNS name with the FOLLOW client settings (lab/clients.py); for a
partition or a cut link, a second writer inside the cut-off site writes straight to its primary.
The gateway runs at the DR site, as in production (for the loss of the DR site, a second
gateway runs at the witness site, and the agents fall back to it). A case ends when a `failover.finish` record
with outcome ok appears, or when its observation window ends (90 s; host and management loss:
`--not-responding-after` + 45 s), since a stopped failover may be tried again while the fault
lasts; then the fault is healed (not a stun: it ends by itself) and writes are watched for a few
more seconds. Every `failover.finish` is listed, those after the heal marked. The VM-level
cases share one lab (a group each, one after another); partition, cut and site loss get a lab of
their own.

Per case:
  failover            a `failover.*` audit record for the group after the fault
  outcome / reason    the `failover.finish` record's outcome and reason, or why none started
  rto_s               fault → first write acknowledged by the new primary (null if none), by any
                      client: the application-like writer or a probe (a new client every 0.1 s,
                      FOLLOW settings: when the service takes writes again)
  app_rto_s           the same for the long-lived writer alone: what its stuck connection and
                      its timeouts (tcp_user_timeout 3 s, connect_timeout 2 s) add
  acked_lost          acknowledged writes missing from the node that is primary at the end
  two_writers         two nodes acknowledged writes in overlapping periods (lab.clients.two_writers)
  healthy_powered_off a VM the fault did not kill is poweredOff at the end (its site's vCenter;
                      an unreachable vCenter counts as unknown → false, said in the reason)
host_loss_libpq_defaults, blackhole_libpq_defaults: the same fault seen by a second writer with
libpq's default settings (for these two cases the fault lasts the whole window); `hung_s` is how
long its call to the silent host waited: until its first error, or the end (`still_hung`).

Each case has a required outcome (docs/fencing.md's table): a failover (with an RTO p50 bound
where one is required) or none; never an acknowledged write lost, never two writers; prod keeps
acknowledging writes through the faults it must survive (longest write gap ≤ 10 s); with no etcd
majority, a Slack message names `--declare-fenced`; where an alert is required (management-
network loss, loss of the DR site) it is in the audit trail before the heal. `--runs N` repeats
the VM-level cases in N labs and reports their RTO median. A case is `green` when its outcome is
the required one.

Last line: one JSON object, a key per case, plus `all_green`, `green` and `cases`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    kind: str
    target: str  # "primary" (the group's prod VM) or a location
    lab: str  # "vm": the shared lab of VM-level cases; otherwise its own
    groups: int = 1
    other: str | None = None
    seconds: float | None = None
    task: str = "none"
    site_writer: bool = False
    libpq_writer: bool = False  # also a writer with libpq's defaults; the fault lasts the window
    expect: str = "failover"  # or "no_failover": the required outcome
    rto_max: float | None = None  # the required RTO (p50 over runs)
    pre: tuple[tuple[str, str], ...] = ()  # faults made first (kind, target), e.g. witness down
    reprotect_after_heal: bool = False  # the old primary, back after the heal, is re-protected
    alert: str | None = None  # an alert of this kind must reach the audit trail (and Slack)
    replica: bool = False  # a second gateway runs at the witness site (it outlives DR)


LEASE_S = 3.0  # the lab's policy.lease_s
REPROTECT_WAIT_S = 90.0  # after a heal: the old primary rewound and streaming again

CASES: dict[str, Case] = {
    "power_off": Case("power-off", "primary", "vm", expect="failover", rto_max=4.0),
    "guest_crash": Case("guest-crash", "primary", "vm", expect="failover", rto_max=4.0),
    "host_loss": Case("host-loss", "primary", "vm", libpq_writer=True, expect="failover",
                      rto_max=LEASE_S + 1.5),
    "mgmt_loss": Case("mgmt-loss", "primary", "vm", expect="no_failover",
                      alert="host_unreachable"),
    "stun_5s_snapshot": Case("stun", "primary", "vm", seconds=5, task="snapshot",
                             expect="no_failover"),
    "stun_8s": Case("stun", "primary", "vm", seconds=8, expect="failover"),
    "blackhole": Case("blackhole", "primary", "vm", libpq_writer=True, expect="failover",
                      rto_max=LEASE_S + 1.5),
    "agent_cut": Case("agent-cut", "primary", "vm", expect="no_failover"),
    "gateway_down": Case("gateway-down", "gateway", "vm", expect="no_failover"),
    "etcd_down": Case("etcd-down", "all", "vm", expect="no_failover"),
    "partition_prod": Case("partition", "prod", "own", site_writer=True, expect="failover",
                           reprotect_after_heal=True),
    "cut_prod_dr": Case("cut", "prod", "own", other="dr", site_writer=True,
                        expect="no_failover"),
    "site_loss_prod": Case("site-loss", "prod", "own", groups=5, expect="failover",
                           rto_max=LEASE_S + 2.0),
    "site_loss_dr": Case("site-loss", "dr", "own", expect="no_failover", alert="sync_relaxed",
                         replica=True),
    "site_loss_prod_no_witness": Case("site-loss", "prod", "own", expect="no_failover",
                                      pre=(("partition", "witness"),)),
}
# Cases where prod must keep acknowledging writes through the fault (no outage).
KEEPS_SERVING = ("mgmt_loss", "stun_5s_snapshot", "agent_cut", "gateway_down", "etcd_down",
                 "cut_prod_dr", "site_loss_dr")
KILLS_TARGET = ("power-off", "guest-crash", "host-loss")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass(eq=False)
class GroupRun:
    """One group under one fault: its writers and what was observed."""

    g: dict[str, Any]
    writers: list[Any] = field(default_factory=list)
    site_proc: Any = None
    site_out: Path | None = None
    libpq: Any = None

    @property
    def name(self) -> str:
        return str(self.g["name"])

    def node(self, role: str) -> tuple[str, int]:
        return (str(self.g[role]["host"]), int(self.g[role]["port"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: "
                    + ", ".join(CASES))
    ap.add_argument("--window", type=float, default=90.0,
                    help="seconds to wait for a failover.finish record before healing")
    ap.add_argument("--not-responding-after", type=float, default=60.0,
                    help="host-loss / mgmt-loss: seconds until vCenter marks the host "
                         "notResponding (vCenter's default: 60)")
    ap.add_argument("--after-heal", type=float, default=10.0,
                    help="seconds writes are watched after the heal")
    ap.add_argument("--quick", action="store_true",
                    help="short windows (30 s, not responding after 10 s, 5 s after heal)")
    ap.add_argument("--runs", type=int, default=1,
                    help="labs to run the VM-level cases in (RTO p50 over them); the "
                         "site-level cases run once each")
    ap.add_argument("--prefect-database", choices=("sqlite", "postgresql"), default="sqlite",
                    help="the Prefect server's database: SQLite as `drflow up` runs it on one "
                         "machine (default; concurrent flow starts may wait out Prefect's "
                         "retries of SQLITE_BUSY: 2 s, 4 s, …), or PostgreSQL as production does")
    ap.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                    help="copy the Prefect server's log (retryable errors included) and each "
                         "lab's logs (gateway, agents) into DIR before they are removed")
    args = ap.parse_args()
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.window, args.not_responding_after, args.after_heal = 30.0, 10.0, 5.0
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")

    from lab.harness import throwaway_prefect

    runs: dict[str, list[dict[str, Any]]] = {}
    with throwaway_prefect(args.prefect_database, keep_log=None if args.keep_logs is None
                           else args.keep_logs / "prefect-server.log"):
        vm_cases = [n for n in names if CASES[n].lab == "vm"]
        for i in range(args.runs if vm_cases else 0):
            log(f"VM-level cases, run {i + 1} of {args.runs}")
            one: dict[str, dict[str, Any]] = {}
            run_lab(vm_cases, len(vm_cases), args, one)
            for k, v in one.items():
                runs.setdefault(k, []).append(v)
        for n in names:
            if CASES[n].lab != "vm":
                one = {}
                run_lab([n], CASES[n].groups, args, one)
                for k, v in one.items():
                    runs.setdefault(k, []).append(v)
    results = {k: summarize(k, v) for k, v in runs.items()}
    print_table(results)
    green = [k for k, v in results.items() if k in CASES and v["green"]]
    print(json.dumps({**results, "all_green": len(green) == len([k for k in results if k in CASES]),
                      "green": len(green), "cases": len([k for k in results if k in CASES])}))


def summarize(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per case: the first run's details, RTO as the median over runs, the verdict."""
    out = dict(rows[0])
    rtos = [r["rto_s"] for r in rows]
    known = sorted(x for x in rtos if x is not None)
    out["rto_s"] = None if not known or len(known) < len(rtos) else _median(known)
    out["rto_runs"] = rtos
    apps = [r.get("app_rto_s") for r in rows]
    out["app_rto_s"] = (None if any(a is None for a in apps)
                        else _median([float(a) for a in apps if a is not None]))
    out["acked_lost"] = sum(r["acked_lost"] for r in rows)
    out["two_writers"] = any(r["two_writers"] for r in rows)
    out["healthy_powered_off"] = any(r["healthy_powered_off"] for r in rows)
    if len(rows) > 1:
        out["runs"] = rows
    case = CASES.get(name)
    if case is not None:
        out["green"], out["verdict"] = verdict(name, case, out, rows)
    return out


def verdict(name: str, case: Case, row: dict[str, Any],
            rows: list[dict[str, Any]]) -> tuple[bool, str]:
    """Does the case meet its required outcome? (green, what failed or held)"""
    problems: list[str] = []
    failed_over = [r["outcome"] == "ok" and not r.get("promoted_after_heal") for r in rows]
    if case.expect == "failover":
        if case.groups > 1:
            bad = [r for r in rows if "ok x" not in str(r["outcome"])
                   or any(g["outcome"] != "ok" for g in r.get("groups", []))]
            if bad:
                problems.append(f"not every group failed over ({bad[0]['outcome']})")
        elif not all(failed_over):
            problems.append(f"no failover in {failed_over.count(False)} of {len(rows)} run(s)")
        if case.rto_max is not None and (row["rto_s"] is None or row["rto_s"] > case.rto_max):
            problems.append(f"RTO p50 {row['rto_s']} s > {case.rto_max:g} s")
    else:
        promoted = [r for r in rows if r["outcome"] == "ok" or any(
            f["outcome"] == "ok" and not f["after_heal"] for f in r.get("finishes", []))]
        if promoted:
            problems.append("failed over")
        if row["healthy_powered_off"]:
            problems.append("a healthy VM was powered off")
    if name in KEEPS_SERVING:
        gaps = [r.get("longest_write_gap_s") for r in rows]
        slow = [g for g in gaps if g is None or g > 10.0]
        if slow:
            problems.append(f"prod stopped acknowledging writes (longest gap {slow[0]} s)")
    if case.alert and not all(r.get("alerted") for r in rows):
        problems.append(f"no {case.alert} alert")
    if case.reprotect_after_heal and any(r.get("reprotected_after_heal_s") is None
                                         for r in rows):
        problems.append(f"the old primary was not re-protected within {REPROTECT_WAIT_S:.0f} s "
                        "of the heal")
    if case.pre and not row.get("slack_names_declare_fenced"):
        problems.append("no Slack message names --declare-fenced")
    if row["acked_lost"]:
        problems.append(f"{row['acked_lost']} acknowledged write(s) lost")
    if row["two_writers"]:
        problems.append("two nodes acknowledged writes in overlapping time")
    if problems:
        return False, "; ".join(problems)
    return True, "as required"


def run_lab(cases: list[str], groups: int, args: argparse.Namespace,
            results: dict[str, dict[str, Any]]) -> None:
    from lab import faults
    from lab.harness import start_env, stop_env

    log(f"starting a lab with {groups} sync group(s), agents and the gateway for "
        f"{', '.join(cases)} …")
    t = time.monotonic()
    env = start_env(groups=groups, replication="sync")
    log(f"lab up in {time.monotonic() - t:.0f} s ({env.lab_dir})")
    try:
        if any(CASES[n].replica for n in cases):
            env.start_gateway_replica()
            log(f"a second gateway at the witness site: {env.state['gateway_replica']['url']}")
        for i, name in enumerate(cases):
            case = CASES[name]
            gs = env.state["groups"] if case.groups > 1 else [env.state["groups"][i]]
            runs = [GroupRun(g) for g in gs]
            try:
                results.update(run_case(env, name, case, runs, args))
            except Exception as exc:  # one case's trouble must not hide the others' results
                log(f"{name}: the benchmark itself failed: {type(exc).__name__}: {exc}")
                results[name] = {"failover": False, "outcome": "benchmark_error",
                                 "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                                 "rto_s": None, "acked_lost": 0, "two_writers": False,
                                 "healthy_powered_off": False}
                stop_writers(runs)
                with contextlib.suppress(Exception):
                    faults.heal(env.lab_dir, progress=log)
    finally:
        if args.keep_logs is not None:
            with contextlib.suppress(OSError):
                shutil.copytree(env.lab_dir / "logs", args.keep_logs / env.lab_dir.name,
                                dirs_exist_ok=True)
        stop_env(env)


def stop_writers(runs: list[GroupRun]) -> None:
    from lab import procs

    for r in runs:
        for w in r.writers:
            w.stop(timeout=1)
        if r.libpq is not None:
            r.libpq.stop(timeout=0.1)
        if r.site_proc is not None:
            procs.stop_tree(r.site_proc.pid, timeout=2)


def run_case(env: Any, name: str, case: Case, runs: list[GroupRun],
             args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from lab import clients, faults

    db = env.state["database"]
    gs = [r.g for r in runs]
    for r in runs:
        resolve = clients.dns_resolver(env.route53(), r.g["dns"]["zone_id"], r.g["dns"]["record"])
        clients.ensure_table(resolve(), db)
        r.writers.append(clients.ClientWriter(f"dns-{r.name}", resolve, db, clients.FOLLOW).start())
        r.writers.append(clients.Prober(f"probe-{r.name}", resolve, db).start())
        if case.libpq_writer:
            r.libpq = clients.ClientWriter(f"libpq-{r.name}", resolve, db,
                                           clients.LIBPQ_DEFAULTS).start()
        if case.site_writer:
            start_site_writer(env, r, case.target)
    time.sleep(2.0)
    target = gs[0]["primary"]["vm"] if case.target == "primary" else case.target
    for kind, where in case.pre:
        log(f"{name}: first {kind} {where}")
        faults.fail(env.lab_dir, kind, where, background=True, progress=log)
    log(f"{name}: {case.kind} {target}" + (f" {case.other}" if case.other else ""))
    if case.kind == "gateway-down":  # the orchestrator alone: its process killed
        fault: Any = faults.Fault("gateway-down", "gateway", time.time(), {})
        env.stop_gateway()
    else:
        fault = faults.fail(env.lab_dir, case.kind, target, other=case.other,
                            seconds=case.seconds, task=case.task,
                            not_responding_after=args.not_responding_after,
                            background=True, progress=log)
    window = args.window
    if case.kind in ("host-loss", "mgmt-loss"):
        window = max(window, args.not_responding_after + 45)
    finished = wait_finish(env, runs, fault.at, window)
    log(f"{name}: " + (", ".join(f"{r.name} {f.outcome}" for r, f in finished.items() if f)
                       or f"no failover.finish within {window:.0f} s"))
    for r, fin in finished.items():
        if fin is not None and fin.outcome == "ok":  # give the writer its first write there
            wait(partial(clients.rto_s, fault.at, r.writers[0].acks, r.node("standby")), 15)
    if case.libpq_writer:  # a heal would end its wait: let the fault last the whole window
        time.sleep(max(0.0, fault.at + window - time.time()))
    faults.wait_ha_restarts()  # a stun's end
    end_of_fault = time.time()
    healed = None
    if case.kind == "gateway-down":
        healed = time.time()
        env.start_gateway()
    elif case.kind != "stun":
        healed = faults.heal(env.lab_dir, progress=log).at
    time.sleep(args.after_heal)
    reprotected: dict[GroupRun, float | None] = {}
    if case.reprotect_after_heal and healed is not None:
        for r in runs:
            fin = wait(partial(_reprotected, env, r, healed), REPROTECT_WAIT_S)
            reprotected[r] = None if fin is None else _ts(fin.time) - healed
            log(f"{name}: {r.name} " + (f"re-protected {reprotected[r]:.1f} s after the heal"
                                        if fin is not None else
                                        f"not re-protected within {REPROTECT_WAIT_S:.0f} s"))
    stop_writers(runs)
    per_group = [observe(env, name, case, r, fault, finished.get(r), end_of_fault, healed, window)
                 for r in runs]
    if case.reprotect_after_heal:
        for r, row in zip(runs, per_group, strict=True):
            row["reprotected_after_heal_s"] = _round(reprotected.get(r))
    out = {name: combine(per_group)}
    if case.libpq_writer:
        out[f"{name}_libpq_defaults"] = libpq_row(env, name, out[name], runs[0], fault.at, healed)
    log(f"{name}: {json.dumps(out[name])}")
    return out


def start_site_writer(env: Any, r: GroupRun, site: str) -> None:
    """A writer inside the cut-off site, straight to the group's node there."""
    from lab import clients, manager, procs

    topo = manager.topology(env.state)
    prefix = topo.exec_prefix(site) if topo else []
    role = "primary" if r.g["primary"]["datacenter"] == site else "standby"
    r.site_out = env.lab_dir / "clients" / f"site-{r.name}.jsonl"
    r.site_out.parent.mkdir(exist_ok=True)
    db = env.state["database"]
    argv = clients.site_writer_argv(prefix, f"in-{site}-{r.name}", r.node(role), db, r.site_out)
    r.site_proc = procs.spawn(argv, env.lab_dir / "logs" / f"site-writer-{r.name}.log",
                              env={"PGPASSWORD": db["password"]}, cwd=REPO)
    wait(lambda: len(clients.read_records(r.site_out)[0]) >= 3 if r.site_out else False, 15,
         "the in-site writer's first acknowledged writes")


def wait(predicate: Callable[[], Any], timeout: float, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    if what:
        raise TimeoutError(f"{what}: not within {timeout:.0f} s")
    return None


def _reprotected(env: Any, r: GroupRun, since: float) -> Any:
    return next((x for x in _group_records(env, r, since, "reprotect.finish")
                 if x.outcome == "ok"), None)


def _group_records(env: Any, r: GroupRun, since: float, prefix: str) -> list[Any]:
    targets = {r.name, r.g["primary"]["vm"], r.g["standby"]["vm"]}
    return [x for x in env.audit_records() if x.action.startswith(prefix)
            and x.target in targets and _ts(x.time) >= since - 1]


def wait_finish(env: Any, runs: list[GroupRun], since: float,
                window: float) -> dict[GroupRun, Any]:
    """Each group's last failover.finish record once every group has one with outcome ok, or
    when the window ends (a stopped failover may be tried again while the fault lasts)."""
    deadline = time.monotonic() + window
    while True:
        found = {r: (fins[-1] if (fins := _group_records(env, r, since, "failover.finish"))
                     else None) for r in runs}
        if all(f is not None and f.outcome == "ok" for f in found.values()):
            return found
        if time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def role_of(node: tuple[str, int], db: dict[str, str]) -> str:
    """primary, standby or unreachable (asked from here, the operator's laptop)."""
    from lab import clients

    settings = clients.ClientSettings("probe", {**clients.FOLLOW.params,
                                                "target_session_attrs": "any"})
    try:
        with clients.connect(node, db, settings) as c:
            row = c.execute("select pg_is_in_recovery()").fetchone()
            return "standby" if row and row[0] else "primary"
    except Exception:
        return "unreachable"


def observe(env: Any, name: str, case: Case, r: GroupRun, fault: Any, fin: Any,
            end_of_fault: float, healed: float | None, window: float) -> dict[str, Any]:
    from lab import clients

    db = env.state["database"]
    acks = [a for w in r.writers for a in w.acks]
    if r.site_out is not None:
        acks += clients.read_records(r.site_out)[0]
    started = _group_records(env, r, fault.at, "failover.")
    old, new = r.node("primary"), r.node("standby")
    roles = {old: role_of(old, db), new: role_of(new, db)}
    promoted = (fin is not None and fin.outcome == "ok") or roles[new] == "primary"
    row: dict[str, Any] = {
        "failover": bool(started),
        "outcome": fin.outcome if fin is not None else ("unfinished" if started else "none"),
        "reason": fin.reason if fin is not None else why_none(env, r, fault.at, window, started),
        "rto_s": _round(clients.rto_s(fault.at, acks, new if promoted else None)),
        # The long-lived application writer alone: its stuck connection and timeouts included.
        "app_rto_s": _round(clients.rto_s(fault.at, r.writers[0].acks,
                                          new if promoted else None)),
    }
    # Lost: against the node that is primary at the end; else the one that would be promoted.
    check = next((n for n in (new, old) if roles[n] == "primary"), None)
    if check is None:
        check = next((n for n in (new, old) if roles[n] == "standby"), None)
    lost: list[Any] = []
    if check is not None:
        lost = clients.acked_lost(acks, clients.present_ids(check, db))
    row["acked_lost"] = len(lost)
    row["acked_lost_checked_on"] = (f"{_vm_at(r, check)} ({roles[check]})" if check
                                    else "no node reachable")
    row["two_writers"] = clients.two_writers(acks)
    row["healthy_powered_off"], unknown = healthy_powered_off(env, case, r, fault)
    if unknown:
        row["reason"] += f" [power state unknown: {unknown}]"
    row["acks"] = len(acks)
    errs = [e for e in r.writers[0].errors if e.at > fault.at]
    # How soon the application noticed: its first error after the fault.
    row["first_error_s"] = _round(errs[0].at - fault.at) if errs else None
    row["acks_by_node"] = {_vm_at(r, n): sum(1 for a in acks if a.node == n)
                           for n in {a.node for a in acks}}
    row["longest_write_gap_s"] = _round(clients.longest_gap_s(
        [a for a in r.writers[0].acks], fault.at, end_of_fault))
    row["roles_at_end"] = {_vm_at(r, n): v for n, v in roles.items()}
    # What the gateway and the flow did, seconds after the fault: where an RTO's time went.
    row["timeline"] = [f"{_ts(x.time) - fault.at:.2f} {x.action} {x.outcome}"
                       for x in _group_records(env, r, fault.at, "")
                       if x.action.split(".")[0] in ("incident", "failover")]
    # Every failover.finish, seconds after the fault; those after the heal are not what drflow
    # did while the fault lasted.
    row["finishes"] = [{"outcome": x.outcome, "at_s": _round(_ts(x.time) - fault.at),
                        "after_heal": healed is not None and _ts(x.time) > healed}
                       for x in _group_records(env, r, fault.at, "failover.finish")]
    first_new = clients.rto_s(fault.at, acks, new)
    row["promoted_after_heal"] = bool(healed is not None and first_new is not None
                                      and fault.at + first_new > healed)
    if healed is not None:
        row["healed_at_s"] = _round(healed - fault.at)
    if case.alert:  # while the fault lasts: not an event queued until the heal
        alerts = [_ts(x.time) - fault.at
                  for x in _group_records(env, r, fault.at, "incident.alert")
                  if x.outcome == "alerted" and x.parameters.get("kind") == case.alert
                  and (healed is None or _ts(x.time) < healed)]
        row["alerted"] = bool(alerts)
        row["alerted_at_s"] = _round(min(alerts)) if alerts else None
    if case.pre:  # no proof of the fence: the way out must be named to the people on call
        row["slack_names_declare_fenced"] = slack_mentions(env, r.name, "--declare-fenced")
    if r.site_out is not None:
        site_acks, site_errors = clients.read_records(r.site_out)
        row["in_site_acks_after_fault"] = sum(1 for a in site_acks if a.at > fault.at)
        later = [e for e in site_errors if e.at > fault.at]
        row["in_site_errors_after_fault"] = len(later)
        if later:
            row["in_site_last_error"] = f"{later[-1].what[:160]} at +{later[-1].at - fault.at:.1f} s"
    return row


def slack_mentions(env: Any, group: str, text: str) -> bool:
    from lab.slack_standin import SlackLab

    try:
        msgs = SlackLab(env.state["slack"]["url"]).messages()
    except Exception:
        return False
    return any(group in json.dumps(m) and text in json.dumps(m) for m in msgs)


def _vm_at(r: GroupRun, node: tuple[str, int] | None) -> str:
    for role in ("primary", "standby"):
        if node == r.node(role):
            return str(r.g[role]["vm"])
    return str(node)


def why_none(env: Any, r: GroupRun, since: float, window: float, started: list[Any]) -> str:
    if started:
        return (f"failover started ({started[-1].action}: {started[-1].outcome}) but no "
                f"failover.finish within {window:.0f} s")
    inc = _group_records(env, r, since, "incident.")
    gw = env.gateway
    if gw is None or gw.poll() is not None:
        if env.replica is not None and inc:  # the witness site's gateway heard the agents
            return (f"the DR gateway died with its site; the witness site's gateway recorded "
                    f"{inc[-1].action}: {inc[-1].outcome} {inc[-1].reason}".strip())
        return "the gateway is down (it ran at the lost site)"
    if inc:
        last = inc[-1]
        return (f"no failover within {window:.0f} s; last gateway record {last.action}: "
                f"{last.outcome} {last.reason}".strip())
    return f"no incident within {window:.0f} s: the gateway was told of no failure"


def healthy_powered_off(env: Any, case: Case, r: GroupRun, fault: Any) -> tuple[bool, str]:
    """(a VM the fault did not kill is poweredOff in its vCenter, what could not be read)."""
    from lab import vcsim

    killed: set[str] = set()
    if case.kind in KILLS_TARGET:
        killed.add(str(fault.target))
    if case.kind == "site-loss":
        killed |= {r.g[role]["vm"] for role in ("primary", "standby")
                   if r.g[role]["datacenter"] == case.target}
    off, unknown = False, []
    for role in ("primary", "standby"):
        vm, site = r.g[role]["vm"], r.g[role]["datacenter"]
        if vm in killed:
            continue
        vc = env.state["vcenters"][site]
        try:
            si = vcsim.connect(vc["url"], vc["user"], vc["password"], timeout=5)
            try:
                off |= vcsim.vm_power_state(si, vm) == "poweredOff"
            finally:
                vcsim.disconnect(si)
        except Exception as exc:
            unknown.append(f"{vm}: {site} vCenter unreachable ({type(exc).__name__})")
    return off, "; ".join(unknown)


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a case; several groups (site loss): any failover, outcomes counted, the
    median RTO over the groups and the slowest (null if a group got none), losses summed,
    per-group rows kept."""
    if len(rows) == 1:
        return rows[0]
    outcomes: dict[str, int] = {}
    for x in rows:
        outcomes[x["outcome"]] = outcomes.get(x["outcome"], 0) + 1
    rtos = [x["rto_s"] for x in rows]
    return {
        "failover": any(x["failover"] for x in rows),
        "outcome": ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())),
        "reason": rows[0]["reason"],
        # The median over the groups (each group's RTO is in `groups`, the slowest in rto_max_s).
        "rto_s": None if any(v is None for v in rtos) else _median(rtos),
        "rto_max_s": None if any(v is None for v in rtos) else max(rtos),
        "app_rto_s": None if any(x["app_rto_s"] is None for x in rows)
        else _median([x["app_rto_s"] for x in rows]),
        "acked_lost": sum(x["acked_lost"] for x in rows),
        "two_writers": any(x["two_writers"] for x in rows),
        "healthy_powered_off": any(x["healthy_powered_off"] for x in rows),
        "longest_write_gap_s": max(x["longest_write_gap_s"] for x in rows),
        "promoted_after_heal": any(x["promoted_after_heal"] for x in rows),
        "finishes": [f for x in rows for f in x["finishes"]],
        "groups": rows,
    }


def libpq_row(env: Any, name: str, host_loss: dict[str, Any], r: GroupRun, fault_at: float,
              healed: float | None) -> dict[str, Any]:
    """The same fault as seen by the writer with libpq's defaults: `hung_s` is fault → its
    first error (the call to the dead host gave up), or → now while that call still waits."""
    from lab import clients

    w, db = r.libpq, env.state["database"]
    acks = list(w.acks)
    errors = [e for e in w.errors if e.at > fault_at]
    still = bool(w.busy_since is not None and not errors)
    hung_until = errors[0].at if errors else time.time()
    old, new = r.node("primary"), r.node("standby")
    check = next((n for n in (new, old) if role_of(n, db) == "primary"), None)
    lost = len(clients.acked_lost(acks, clients.present_ids(check, db))) if check else 0
    return {
        "failover": host_loss["failover"], "outcome": host_loss["outcome"],
        "reason": f"the {name} case, writer with libpq's default settings: " + (
            f"still waiting on the dead host {hung_until - fault_at:.0f} s after the fault" if still
            else "no error" if not errors
            else f"waited until the heal made the address refuse, {hung_until - fault_at:.1f} s "
                 f"after the fault" if healed is not None and hung_until >= healed
            else f"first error {hung_until - fault_at:.1f} s after the fault: "
                 f"{errors[0].what[:100]}"),
        "rto_s": _round(clients.rto_s(fault_at, acks, new)),
        "acked_lost": lost,
        "two_writers": clients.two_writers(acks),
        "healthy_powered_off": host_loss["healthy_powered_off"],
        "hung_s": _round(hung_until - fault_at),
        "still_hung": still,
        "acks_after_fault": sum(1 for a in acks if a.at > fault_at),
    }


def _median(xs: list[float]) -> float | None:
    k = sorted(xs)
    return _round(k[len(k) // 2] if len(k) % 2 else (k[len(k) // 2 - 1] + k[len(k) // 2]) / 2)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def required(case: Case | None) -> str:
    if case is None:
        return "—"
    alert = f", a {case.alert} alert" if case.alert else ""
    if case.expect == "no_failover":
        return "no failover" + alert
    return "failover" + (f", RTO p50 ≤ {case.rto_max:g} s" if case.rto_max else "") + alert


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print("| case | required | green | failover | outcome | RTO p50 (s) | runs | app writer RTO "
          "(s) | longest write gap (s) | acked lost | two writers | healthy VM off | reason |")
    print("|---|---|---|---|---|---:|---|---:|---:|---:|---|---|---|")
    for k, v in results.items():
        case = CASES.get(k)
        rto = "—" if v.get("rto_s") is None else f"{v['rto_s']:.1f}"
        runs = ", ".join("—" if x is None else f"{x:.1f}" for x in v.get("rto_runs", []))
        reason = str(v.get("reason", "")).replace("|", "/").replace("\n", " ")[:160]
        if case is not None and not v.get("green"):
            reason = f"**{v.get('verdict')}**; {reason}"
        later = [f["outcome"] for f in v.get("finishes", []) if f["after_heal"]]
        outcome = v["outcome"] + (f" (after heal: {', '.join(later)})" if later else "")
        gap = v.get("longest_write_gap_s", v.get("hung_s"))
        gap_s = "—" if gap is None else f"{gap:.1f}"
        green = "—" if case is None else ("yes" if v.get("green") else "**no**")
        app = "—" if v.get("app_rto_s") is None else f"{v['app_rto_s']:.1f}"
        print(f"| {k} | {required(case)} | {green} | {'yes' if v['failover'] else 'no'} | "
              f"{outcome} | {rto} | {runs} | {app} | {gap_s} | {v['acked_lost']} | "
              f"{'yes' if v['two_writers'] else 'no'} | "
              f"{'yes' if v['healthy_powered_off'] else 'no'} | {reason} |")


if __name__ == "__main__":
    main()
