"""Scale: 100 protection groups (200 agents) on one gateway, then the loss of a site.

The lab runs `--site-loss` + `--single` groups for real (PostgreSQL pairs, guest agents, prod
primaries) and the rest as inventory only: their VMs exist in the vCenters (primaries at DR,
standbys at prod) and lab/agent_swarm.py speaks for their agents on the wire, at the agents'
cadence: a signed heartbeat per node every second, the primary's leader lease (3 s) renewed
every second in etcd. One gateway (`drflow gateway`, embedded runs, at the DR site) serves all
of them, with its host watch reading every primary through the vCenters.

1. Steady for `--steady-s` (600): nothing fails. Any incident opened is a false takeover;
   the swarm also counts heartbeat gaps over the gateway's timeout (3 s) and lease renewals
   later than a real agent allows itself before fencing (lease_s - margin = 2.5 s).
2. Single-group RTO: the prod host of each of `--single` groups is lost (lab fault
   `host-loss`: silent, its processes killed), one after the other.
3. Site loss: prod is lost (`site-loss prod`: partitioned, every process there killed, its
   vCenter and etcd member included): the `--site-loss` groups fail over at once; the
   inventory-only groups, primary at DR, lose their standby and must not fail over.

RTO: the fault → the first write acknowledged by the new primary, through the group's DNS name
(lab.harness.Writer). Last line: {"false_takeovers", "single_rto_p50_s", "site_loss_rto_p50_s",
"site_loss_rto_p95_s", ...} with the swarm's figures and the gateway's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _p(xs: list[float], q: float) -> float:
    k = sorted(xs)
    return k[min(len(k) - 1, max(0, round(q * (len(k) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=100, help="protection groups in all")
    ap.add_argument("--site-loss", type=int, default=20, help="real groups lost with prod")
    ap.add_argument("--single", type=int, default=3, help="real groups failed over alone first")
    ap.add_argument("--steady-s", type=float, default=600.0, help="the steady phase's length")
    ap.add_argument("--prefect-db", choices=("postgresql", "sqlite"), default="postgresql",
                    help="the Prefect server's database (production runs it on PostgreSQL)")
    ap.add_argument("--layout", choices=("embedded", "distributed"), default="embedded",
                    help="embedded: the gateway runs the failovers in its own process (`drflow "
                         "up`); distributed: `drflow deploy`, warm runners at DR execute them "
                         "and the gateway runs in `--mode deployment` (production's layout)")
    ap.add_argument("--runners", type=int, default=2, help="warm runners (distributed)")
    ap.add_argument("--profile", metavar="DIR",
                    help="record the gateway and the Prefect server with py-spy through the "
                         "site loss, into DIR (pip install py-spy)")
    args = ap.parse_args()
    real = args.site_loss + args.single
    if args.groups < real or args.site_loss < 1 or args.single < 1:
        ap.error("--groups must cover --site-loss + --single, both at least 1")
    from lab.harness import throwaway_prefect

    with throwaway_prefect(database=args.prefect_db,
                           keep_log=Path(args.profile) / "prefect-server.log"
                           if args.profile else None):
        run(args, real)


def run(args: argparse.Namespace, real: int) -> None:
    import httpx
    import psutil

    from lab import agent_swarm, faults
    from lab.harness import Writer, start_env, stop_env, wait_for

    synthetic = [f"load{i + 1:03d}" for i in range(args.groups - real)]
    print(f"starting a lab: {real} groups with PostgreSQL and agents, {len(synthetic)} "
          f"inventory-only groups ({2 * len(synthetic)} agents spoken for by the swarm) …",
          flush=True)
    t0 = time.monotonic()
    env = start_env(groups=real, replication="sync", gateway=False, inventory_only=synthetic)
    swarm = None
    dist = None
    try:
        print(f"lab up in {time.monotonic() - t0:.0f} s", flush=True)
        spec = agent_swarm.configure(env.lab_dir, env.state, synthetic)
        swarm, figures_path = agent_swarm.start(env.lab_dir, spec)

        def figures() -> dict[str, Any]:
            return agent_swarm.read_figures(figures_path)

        wait_for(lambda: figures().get("renewals", 0) >= len(synthetic), 60,
                 "the swarm holding its leader keys")
        if args.layout == "distributed":
            dist = _start_runners(env, args.runners)
            dist.start_gateway()
        else:
            env.start_gateway(timeout=120)
        env.wait_all_heard(120)
        def all_heard() -> dict[str, Any] | None:
            try:  # GET /v1/groups: its first answer waits for every node's probe
                st = env.groups_status()
            except httpx.HTTPError:
                return None
            return st if all(st.get(n, {}).get("primary") == f"{n}-dr" for n in synthetic) \
                else None

        status = wait_for(all_heard, 120, "every swarm primary heard by the gateway")
        print(f"gateway up: {len(status)} groups, every primary heard "
              f"({time.monotonic() - t0:.0f} s)", flush=True)

        swarm.send_signal(signal.SIGUSR2)  # the swarm's figures count from here
        time.sleep(2.5)  # its next write has them
        gw = psutil.Process(env.gateway.pid) if env.gateway else None
        cpu0 = gw.cpu_times() if gw else None
        steady0, steady_at = time.time(), time.monotonic()
        while time.monotonic() - steady_at < args.steady_s:
            time.sleep(min(60.0, args.steady_s - (time.monotonic() - steady_at)))
            f = figures()
            print(f"  steady {time.monotonic() - steady_at:.0f} s: incidents "
                  f"{len(env.audit_records('incident.open'))}, swarm heartbeats "
                  f"{f.get('heartbeats')} (p99 {f.get('heartbeat_p99_s')} s, longest gap "
                  f"{f.get('longest_heartbeat_gap_s')} s), renewals {f.get('renewals')} "
                  f"(longest gap {f.get('longest_renewal_gap_s')} s, deadline misses "
                  f"{f.get('lease_deadline_misses')})", flush=True)
        steady_s = time.monotonic() - steady_at
        cpu_pct = None
        if gw is not None and cpu0 is not None:
            c = gw.cpu_times()
            cpu_pct = round(100 * ((c.user - cpu0.user) + (c.system - cpu0.system)) / steady_s, 1)
        steady_figures = figures()
        steady_incidents = [r for r in env.audit_records("incident.open")]
        print(f"steady phase over: {len(steady_incidents)} incidents, gateway CPU {cpu_pct} % "
              "of one core", flush=True)

        groups = env.state["groups"]
        singles, lost_groups = groups[:args.single], groups[args.single:]
        expected: dict[str, float] = {}  # group -> when it was meant to fail over
        single_rtos = []
        for g in singles:
            w = Writer(env, g["name"]).start()
            time.sleep(1.0)
            fault = faults.fail(env.lab_dir, "host-loss", g["primary"]["vm"])
            expected[g["name"]] = fault.at
            rto = _rto(env, w, g, fault.at, wait_for)
            single_rtos.append(rto)
            print(f"  {g['name']}: host loss → RTO {rto:.2f} s", flush=True)
            for line in _where_the_time_goes(env.audit_records(), {g["name"]}, fault.at):
                print("    " + line, flush=True)

        writers = {g["name"]: Writer(env, g["name"]).start() for g in lost_groups}
        spies = []
        if args.profile:
            import subprocess

            Path(args.profile).mkdir(parents=True, exist_ok=True)
            server = [p.pid for p in psutil.process_iter(["cmdline"])
                      if "orchestrator.prefect_server" in " ".join(p.info["cmdline"] or [])]
            for name, pid in [("gateway", gw.pid if gw else None),
                              ("prefect-server", server[0] if server else None)]:
                if pid is not None:
                    spies.append(subprocess.Popen(
                        ["py-spy", "record", "-p", str(pid), "-r", "50", "-d", "25", "-f", "raw",
                         "-o", str(Path(args.profile) / f"{name}.raw"), "--nonblocking",
                         "--idle", "--threads"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2.0)
        cpu_at_loss = _cpu_by_part(gw.pid if gw else None, swarm.pid if swarm else None)
        pressure_at_loss = _pressure()
        loss_at = time.monotonic()
        fault = faults.fail(env.lab_dir, "site-loss", "prod")
        if swarm is not None:
            swarm.send_signal(signal.SIGUSR1)  # the swarm's prod nodes died with the site
        for g in lost_groups:
            expected[g["name"]] = fault.at
        site_rtos = []
        for g in lost_groups:
            rto = _rto(env, writers[g["name"]], g, fault.at, wait_for)
            site_rtos.append(rto)
        print("  site loss: RTO " + ", ".join(f"{x:.2f}" for x in sorted(site_rtos)), flush=True)
        used = _cpu_by_part(gw.pid if gw else None, swarm.pid if swarm else None, cpu_at_loss)
        span = time.monotonic() - loss_at
        stalled = {k: (v - pressure_at_loss[k]) / 1e6 / span for k, v in _pressure().items()}
        print("  the machine meanwhile: " + ", ".join(
            f"{k} {100 * v:.0f} % of the time" for k, v in stalled.items()), flush=True)
        print(f"  CPU of the machine's {psutil.cpu_count()} cores from the loss to the last "
              f"write ({span:.1f} s), in cores: " + ", ".join(
                  f"{k} {v / span:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1])),
              flush=True)
        for spy in spies:
            spy.wait(60)
        if spies:
            print(f"  profiles through the site loss (py-spy, collapsed stacks, idle included): "
                  f"{args.profile}/", flush=True)
        for line in _where_the_time_goes(env.audit_records(), {g["name"] for g in lost_groups},
                                         fault.at):
            print("    " + line, flush=True)
        time.sleep(10.0)  # what the loss of their standbys does to the swarm's groups
        false = [r for r in env.audit_records("incident.open")
                 if r.target not in expected
                 or _ts(r.time) < expected[r.target] - 1.0]
        for r in false:
            print(f"  FALSE TAKEOVER: {r.target} at {r.time}: {r.reason}", flush=True)
        end = figures()
        result = {
            "false_takeovers": len(false),
            "single_rto_p50_s": round(statistics.median(single_rtos), 3),
            "site_loss_rto_p50_s": round(statistics.median(site_rtos), 3),
            "site_loss_rto_p95_s": round(_p(site_rtos, 0.95), 3),
            "site_loss_rto_max_s": round(max(site_rtos), 3),
            "groups": args.groups, "agents": 2 * real + 2 * len(synthetic),
            "site_loss_groups": len(lost_groups), "steady_s": round(steady_s),
            "steady_incidents": len(steady_incidents), "gateway_cpu_pct": cpu_pct,
            "swarm_heartbeat_p99_s": steady_figures.get("heartbeat_p99_s"),
            "swarm_longest_heartbeat_gap_s": steady_figures.get("longest_heartbeat_gap_s"),
            "swarm_heartbeats": steady_figures.get("heartbeats"),
            "swarm_heartbeat_failures": steady_figures.get("heartbeat_failures"),
            "swarm_heartbeat_gaps_over_timeout": steady_figures.get("heartbeat_gaps"),
            "swarm_longest_renewal_gap_s": steady_figures.get("longest_renewal_gap_s"),
            "swarm_renewals": steady_figures.get("renewals"),
            "swarm_lease_deadline_misses": steady_figures.get("lease_deadline_misses"),
            "swarm_leader_keys_lost": end.get("leader_keys_lost"),
            "started": steady0,
        }
    finally:
        if swarm is not None and swarm.poll() is None:
            swarm.terminate()
            try:
                swarm.wait(10)
            except Exception:
                swarm.kill()
        if dist is not None:
            _stop_runners(dist)
        stop_env(env)
    print(json.dumps(result))


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _start_runners(env: Any, runners: int) -> Any:
    """`drflow deploy` on the benchmark's Prefect server and `runners` warm runners at DR."""
    import tempfile

    from lab.distributed import BIN, Dist, deploy_and_start_runners

    base = Path(tempfile.mkdtemp(prefix="drflow-scale-", dir="/tmp"))
    child_env = {"PREFECT_API_URL": os.environ["PREFECT_API_URL"],
                 "PREFECT_HOME": str(base / "client-home"), "PREFECT_LOGGING_LEVEL": "WARNING",
                 "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    d = Dist(env, os.environ["PREFECT_API_URL"], child_env, base)
    deploy_and_start_runners(d, runners, timeout=600)
    print(f"deployed; {runners} warm runners take the runs", flush=True)
    return d


def _stop_runners(d: Any) -> None:
    import shutil

    from lab.distributed import stop_worker

    for proc in d.runners:
        stop_worker(proc)
    shutil.rmtree(d.base, ignore_errors=True)


def _pressure() -> dict[str, float]:
    """Linux's pressure stall totals (µs): some task waiting for CPU, for I/O; and the CPU time
    the hypervisor gave elsewhere (steal, in µs of one core)."""
    out: dict[str, float] = {}
    for res in ("cpu", "io"):
        try:
            line = Path(f"/proc/pressure/{res}").read_text().splitlines()[0]
            out[f"{res}-starved (some task waiting)"] = float(line.rsplit("total=", 1)[1])
        except (OSError, IndexError, ValueError):
            pass
    try:
        steal = int(Path("/proc/stat").read_text().splitlines()[0].split()[8])
        out["stolen by the hypervisor (one core)"] = steal * 1e6 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return out


def _cpu_by_part(gateway: int | None, swarm: int | None,
                 since: dict[int, tuple[str, float]] | None = None) -> Any:
    """CPU seconds of every process, by lab part; with `since` (an earlier call's snapshot),
    what each part used in between (processes alive at both)."""
    import psutil

    now: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            t = p.info["cpu_times"]
            used = t.user + t.system if t else 0.0
        except (psutil.Error, TypeError):
            continue
        name = p.info["name"] or ""
        part = ("gateway" if p.pid == gateway else "agent swarm" if p.pid == swarm
                else "this benchmark (writers)" if p.pid == os.getpid()
                else "postgres" if name.startswith("postgres")
                else "warm runners" if " runner " in f" {cmd} "
                else "prefect server" if "prefect" in cmd
                else "guest agents" if "agents" in cmd
                else "etcd" if name.startswith("etcd")
                else "vcsim" if "vcsim" in cmd
                else "other")
        if part == "other":
            part = f"other: {name}"
        now[p.pid] = (part, used)
    if since is None:
        return now
    by: dict[str, float] = {}
    for pid, (part, used) in now.items():
        if pid in since:
            by[part] = by.get(part, 0.0) + used - since[pid][1]
    return by


def _where_the_time_goes(records: list[Any], groups: set[str], at: float) -> list[str]:
    """Per step of the groups' failovers: when it started after the fault and how long it
    took (p50 and max over the groups), from the audit trail."""
    runs = {r.actor: r.target for r in records
            if r.action == "failover.start" and r.target in groups and _ts(r.time) >= at}
    starts: dict[str, list[float]] = {}
    took: dict[str, list[float]] = {}
    for r in records:
        if r.action == "incident.open" and r.target in groups and _ts(r.time) >= at - 1.0:
            starts.setdefault("incident.open", []).append(_ts(r.time) - at)
        if r.actor not in runs:
            continue
        if r.outcome == "started" or r.action == "failover.start":
            starts.setdefault(r.action, []).append(_ts(r.time) - at)
        elif r.duration_s is not None:
            took.setdefault(r.action, []).append(float(r.duration_s))
    out = []
    for action, xs in sorted(starts.items(), key=lambda kv: statistics.median(kv[1])):
        line = (f"{action}: starts {statistics.median(xs):.2f} s after the fault (max "
                f"{max(xs):.2f})")
        if action in took:
            line += (f", takes {statistics.median(took[action]):.2f} s (max "
                     f"{max(took[action]):.2f})")
        out.append(line)
    return out


def _rto(env: Any, w: Any, g: dict[str, Any], at: float, wait_for: Any) -> float:
    """Fault → first write acknowledged by the group's new primary (its DR standby)."""
    name = g["name"]
    fin = wait_for(lambda: [r for r in env.audit_records("failover.finish", name)
                            if _ts(r.time) >= at], 120, f"failover of {name}")[-1]
    if fin.outcome != "ok":
        sys.exit(f"{name}: failover did not complete: {fin.outcome}: {fin.reason}")
    new = (g["standby"]["host"], g["standby"]["port"])
    ack = wait_for(lambda: w.first_ack_after(at, new), 30, f"a write on {name}'s new primary")
    w.stop()
    return float(ack - at)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the lab is taken down on the way
    main()
