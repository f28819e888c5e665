"""`make demo`: the lab comes up, drflow protects three PostgreSQL groups, and failures are handled
end to end while a timeline tells the story. Exits 0 only if every step held."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from drflow.dns import resolve_endpoint
from lab import faults, procs, vcsim
from lab.harness import DRFLOW, Env, Writer, start_env, stop_env, wait_for
from lab.slack_standin import SlackLab

console = Console(highlight=False)
KEPT_AUDIT = Path("/tmp/drflow-demo-audit.db")


@dataclass
class Story:
    t0: float = field(default_factory=time.monotonic)
    figures: list[tuple[str, str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)  # audit sequence numbers chapters share

    def say(self, text: str, style: str = "") -> None:
        console.print(f"[dim]{time.monotonic() - self.t0:6.1f}s[/]  {text}", style=style)

    def chapter(self, title: str, what: str) -> None:
        console.print()
        console.print(Panel(what, title=f"[bold]{title}[/]", title_align="left", expand=False))

    def ok(self, text: str) -> None:
        self.say(f"[green]✔[/] {text}")

    def fail(self, text: str) -> None:
        self.failures.append(text)
        self.say(f"[red]✘ {text}[/]")

    def figure(self, step: str, name: str, value: str) -> None:
        self.figures.append((step, name, value))

    def check(self, cond: bool, good: str, bad: str) -> bool:
        (self.ok if cond else self.fail)(good if cond else bad)
        return cond






def _last(env: Env, action: str, target: str, after_seq: int, timeout: float) -> Any:
    def found() -> Any:
        recs = [r for r in env.audit_records(action, target) if r.seq > after_seq]
        return recs[-1] if recs else None
    return wait_for(found, timeout, f"{action} {target}", 0.1)


def _head_seq(env: Env) -> int:
    recs = env.audit_records()
    return recs[-1].seq if recs else 0


def crash_repaired(story: Story, env: Env) -> None:
    g = env.group("orders")
    story.chapter("1. A crash repaired in place",
                  f"PostgreSQL on {g['primary']['vm']} is killed (kill -9). Its guest agent should "
                  "restart it within seconds: no failover, nobody paged.")
    pid = int((Path(g["primary"]["datadir"]) / "postmaster.pid").read_text().split()[0])
    seq = _head_seq(env)
    t = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    story.say(f"kill -9 {pid} (the postmaster of {g['primary']['vm']})")
    wait_for(lambda: not env.writable(g["primary"]), 5, "the crash to be visible")
    wait_for(lambda: env.writable(g["primary"]), 15, "the agent to repair PostgreSQL", 0.05)
    repair = time.monotonic() - t
    story.ok(f"the agent restarted PostgreSQL: accepting writes again after {repair:.1f} s")
    story.figure("crash repaired in place", "time to repair", f"{repair:.1f} s")
    time.sleep(4)  # longer than the heartbeat timeout: nothing else may happen
    runs = [r for r in env.audit_records("failover.start", "orders") if r.seq > seq]
    story.check(not runs, "no failover was started: the agent handled it",
                f"a failover was started for a crash the agent repaired: {runs}")


HA_RESTART_AFTER_S = 20.0  # vSphere HA restarts the lost VM on the site's spare host


def host_loss(story: Story, env: Env, writer: Writer) -> None:
    g = env.group("payments")
    vm = g["primary"]["vm"]
    story.chapter("2. A primary's ESXi host lost, and failed over",
                  f"The host running {vm} dies while an application writes to "
                  f"{g['dns']['record']} about 100 times a second: its address goes silent, and "
                  "vCenter can never confirm a power-off (it marks the host not responding, later). "
                  "drflow should prove the fence by the primary's leader lease in etcd running "
                  "out, promote the DR standby, re-point DNS, and lose no acknowledged write.")
    seq = story.marks["host lost"] = _head_seq(env)
    try:
        fault = faults.fail(env.lab_dir, "host-loss", vm, not_responding_after=10.0,
                            ha_restart_after=HA_RESTART_AFTER_S)
        t_off = fault.at
        what = "host-loss"
        story.say(f"lab: the ESXi host of {vm} is lost (address silent, processes gone); "
                  f"vSphere HA restarts the VM on a spare host in {HA_RESTART_AFTER_S:.0f} s")
    except faults.FaultError as exc:  # loopback lab: no packet drops, so the old fault
        story.say(f"lab: {exc}; powering {vm} off instead")
        t_off = time.time()
        vcsim.power_off(env.si(), vm)
        what = "power-off"
    opened = _last(env, "incident.open", "payments", seq, 30)
    story.say(f"gateway: [yellow]incident opened[/] — {opened.reason}")
    shown: set[int] = set()

    def progress() -> Any:
        for r in env.audit_records():
            if (r.seq > seq and r.seq not in shown and r.action.startswith("failover.")
                    and r.outcome not in ("started",) and r.target in (
                        g["primary"]["vm"], g["standby"]["vm"], g["dns"]["record"], "payments")):
                shown.add(r.seq)
                if r.action != "failover.finish":
                    story.say(f"  failover · {r.action.removeprefix('failover.')}: {r.reason}")
        recs = [r for r in env.audit_records("failover.finish", "payments") if r.seq > seq]
        return recs[-1] if recs else None

    fin = wait_for(progress, 60, "the failover to finish", 0.1)
    if not story.check(fin.outcome == "ok", "failover complete",
                       f"failover ended {fin.outcome}: {fin.reason}"):
        return
    standby = (g["standby"]["host"], g["standby"]["port"])
    after = time.time()
    wait_for(lambda: writer.first_ack_after(after, standby), 15, "writes through DNS again")
    rto = (writer.first_ack_after(t_off, standby) or after) - t_off
    lost = writer.lost(*standby)
    story.check(resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"]) == standby,
                f"DNS {g['dns']['record']} now points at {g['standby']['vm']}",
                "DNS still points at the old primary")
    story.check(not lost, f"{len(writer.acked)} writes acknowledged so far, none lost",
                f"{len(lost)} acknowledged writes lost")
    story.ok(f"application writes resumed {rto:.1f} s after the {what} "
             f"(RTO measured by drflow from the last heartbeat: {fin.parameters['rto_s']:.1f} s, "
             f"RPO {fin.parameters['rpo_s']} s)")
    story.figure(f"{what} → failover", f"RTO ({what} → acknowledged write via DNS)", f"{rto:.1f} s")
    story.figure(f"{what} → failover", "RPO (standby lag at promotion)",
                 f"{fin.parameters['rpo_s']} s / {fin.parameters['rpo_bytes']} bytes")
    story.figure(f"{what} → failover", "acknowledged writes lost", str(len(lost)))


def reprotect(story: Story, env: Env) -> None:
    g = env.group("payments")
    story.chapter("3. vSphere HA restarts the VM, and it is re-protected",
                  f"vSphere HA powers {g['primary']['vm']} on again on a spare host. Its agent asks "
                  "etcd (and the gateway) who is primary before starting PostgreSQL: the leader key "
                  "names the DR node, so it keeps PostgreSQL stopped, and drflow rewinds it into a "
                  "standby of the new primary.")
    # HA may restart it while the failover is still being checked: count from the host's loss.
    seq = story.marks.get("host lost", _head_seq(env))
    if faults.Lab.load(env.lab_dir).topo.enabled:
        faults.wait_ha_restarts()
        story.say(f"vSphere HA: {g['primary']['vm']} restarted on its site's spare host")
    else:
        vcsim.power_on(env.si(), g["primary"]["vm"])
        story.say(f"vSphere: {g['primary']['vm']} powered on")
    fin = _last(env, "reprotect.finish", "payments", seq, 120)
    for r in env.audit_records():
        if r.seq > seq and r.action.startswith("reprotect.") and r.outcome not in ("started",) \
                and r.action != "reprotect.finish":
            story.say(f"  re-protect · {r.action.removeprefix('reprotect.')}: {r.reason[:150]}")
    if not story.check(fin.outcome == "ok", f"re-protected: {fin.reason[:160]}",
                       f"re-protect ended {fin.outcome}: {fin.reason}"):
        return
    story.check(not env.writable(g["primary"]),
                f"{g['primary']['vm']} came back as a standby and never took a write as a primary",
                f"{g['primary']['vm']} is writable: two primaries")
    secs = fin.duration_s or 0.0
    story.figure("host back → re-protect", "re-protect time", f"{secs:.1f} s")


def failback(story: Story, env: Env, writer: Writer, prefect_api: str) -> None:
    g = env.group("payments")
    story.chapter("4. Failback, approved in Slack",
                  "On-call asks to move payments home. drflow posts an approval request with "
                  "Approve/Reject buttons and waits. A user who is not an approver clicks first; "
                  "then an approver does, and a zero-data-loss switchover runs under write load.")
    slack = SlackLab(env.state["slack"]["url"].removesuffix("/api/"))
    seq = _head_seq(env)
    t0 = time.time()
    # No PREFECT_API_URL: the command finds `drflow up`'s Prefect through its state directory.
    proc = subprocess.Popen([DRFLOW, "failback", "payments", "--config", str(env.config),
                             "--state-dir", str(env.state_dir), "--requested-by", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        request = slack.wait_for_message(
            lambda m: "approval needed" in m.get("text", "") and float(m["ts"]) >= t0 - 1
            and any(b.get("type") == "actions" for b in m.get("blocks", [])), 90)
        story.say(f"Slack: [cyan]{request['text']}[/] (Approve / Reject buttons)")
        run_id = json.loads(request["blocks"][-1]["elements"][0]["value"])["run"]
        wait_for(lambda: _paused(prefect_api, run_id), 30, "the failback run to pause for approval",
                 0.2)
        status, body = slack.click(request["ts"], APPROVE, "U0STRANGER")
        story.check(status == 200 and "not" in body.lower(),
                    f"a click by U0STRANGER (not an approver) is refused: {_verdict(body)}",
                    f"an unauthorized click was not refused: {status} {body[:200]}")
        status, body = slack.click(request["ts"], APPROVE, "U0ONCALL1")
        story.check(status == 200, f"approver U0ONCALL1 approves: {_verdict(body)}",
                    f"the approver's click failed: {status} {body[:200]}")
        proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        fin = _last(env, "failback.finish", "payments", seq, 30)
    except TimeoutError as exc:  # say what the command itself printed
        out = proc.stdout.read() if proc.stdout is not None else ""
        raise TimeoutError(f"{exc}; `drflow failback` exited {proc.returncode}: "
                           f"{out[-3000:]}") from None
    if not story.check(fin.outcome == "ok", f"failed back: {fin.reason[:200]}",
                       f"failback ended {fin.outcome}: {fin.reason}"):
        return
    home = (g["primary"]["host"], g["primary"]["port"])
    story.check(resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"]) == home,
                f"DNS points home at {g['primary']['vm']} again", "DNS does not point home")
    after = time.time()
    wait_for(lambda: writer.first_ack_after(after, home), 15, "writes at home")
    lost = writer.lost(*home)
    story.check(not lost, f"{len(writer.acked)} writes acknowledged in all, none lost",
                f"{len(lost)} acknowledged writes lost: {writer.lost_details(*home)}")
    downtime = fin.parameters.get("downtime_s")
    story.figure("failback (approved)", "write downtime during the switchover", f"{downtime} s")
    story.figure("failback (approved)", "approved by", str(fin.parameters.get("approver")))
    story.figure("payments, the whole story", "acknowledged writes lost", str(len(lost)))


APPROVE = "drflow_failback_approve"


def _paused(prefect_api: str, run_id: str) -> bool:
    run = httpx.get(f"{prefect_api}/flow_runs/{run_id}", timeout=5).json()
    return bool((run.get("state") or {}).get("type") == "PAUSED")


def _verdict(body: str) -> str:
    try:
        return str(json.loads(body).get("verdict", body))[:160]
    except ValueError:
        return body[:160]


def drill(story: Story, env: Env) -> None:
    g = env.group("ledger")
    story.chapter("5. A DR drill, production untouched",
                  f"A drill of group {g['name']}: a clone of {g['standby']['vm']} on the isolated "
                  "port group and a promoted copy of the standby, checked, measured, torn down.")
    before = env.writable(g["primary"]), env.writable(g["standby"])
    out = subprocess.run([DRFLOW, "drill", "run", g["name"], "--config", str(env.config),
                          "--state-dir", str(env.state_dir)],
                         capture_output=True, text=True, timeout=300)
    rec = env.audit_records("drill.finish", g["name"])
    if not story.check(out.returncode == 0 and bool(rec), "drill passed",
                       f"drill failed ({out.returncode}): {out.stdout[-800:]}{out.stderr[-800:]}"):
        return
    p = rec[-1].parameters
    figures = p.get("figures", p)
    story.ok(f"drill RTO {figures.get('rto_s')} s, RPO {figures.get('rpo_s')} s "
             f"({figures.get('rpo_bytes')} bytes); bubble torn down")
    story.figure("DR drill", "drill RTO / RPO", f"{figures.get('rto_s')} s / {figures.get('rpo_s')} s")
    after = env.writable(g["primary"]), env.writable(g["standby"])
    story.check(before == after, "production roles unchanged by the drill",
                f"production roles changed: {before} → {after}")
    report = subprocess.run([DRFLOW, "drill", "report", g["name"], "--config", str(env.config),
                             "--format", "md"], capture_output=True, text=True, timeout=60)
    for line in report.stdout.splitlines()[:8]:
        story.say(f"  [dim]{line}[/]")


def audit(story: Story, env: Env) -> None:
    story.chapter("6. Proof", "Every step above is in a hash-chained audit trail. Verify it.")
    out = subprocess.run([DRFLOW, "audit", "verify", "--url", env.audit_url],
                         capture_output=True, text=True, timeout=60)
    story.check(out.returncode == 0, f"drflow audit verify: {out.stdout.strip()}",
                f"audit verify failed: {out.stdout}{out.stderr}")


def slack_summary(story: Story, env: Env) -> None:
    slack = SlackLab(env.state["slack"]["url"].removesuffix("/api/"))
    roots = [m for m in slack.messages() if m.get("thread_ts") in (None, m.get("ts"))]
    story.say(f"Slack (#{env.state['slack']['channel']}): {len(roots)} threads posted, e.g.:")
    for m in roots[:3]:
        story.say(f"  [cyan]{m.get('text', '')[:150]}[/]")


def main() -> int:
    # Every command below must find `drflow up`'s Prefect by itself, never a user's setting.
    os.environ.pop("PREFECT_API_URL", None)
    story = Story()
    console.print(Panel.fit(
        "[bold]drflow demo[/]: three PostgreSQL protection groups (orders, payments, ledger), "
        "each a primary VM in datacenter [bold]prod[/] and a synchronous standby VM in [bold]dr[/].\n"
        "Everything runs on this machine: vCenter (vcsim), PostgreSQL, Route 53 (moto), a Slack "
        "stand-in, a guest agent per VM, and `drflow up` (gateway, runbooks, a local Prefect)."))
    story.say("bringing up the lab: vcsim, 3 PostgreSQL pairs, moto, Slack stand-in, 6 guest agents …")
    env = start_env(groups=3, replication="sync", gateway=False)
    writers: list[Writer] = []
    try:
        story.ok(f"lab up in {env.lab_dir} (details: lab.json; config: drflow.yaml)")
        story.say("starting `drflow up` (a local Prefect server, the gateway, the warm runner) …")
        prefect_port = procs.free_port()
        env.start_gateway("up", env={"PREFECT_API_URL": "", "DRFLOW_PREFECT_PORT": str(prefect_port)},
                          timeout=120)
        env.wait_all_heard(60)
        orchestrator = env.state["orchestrator"]["address"]  # at the DR site, as in production
        prefect_api = f"http://{orchestrator}:{prefect_port}/api"
        SlackLab(env.state["slack"]["url"].removesuffix("/api/")).set_request_url(
            env.gateway_url + "/slack/actions")
        story.ok(f"drflow up at the DR site: gateway {env.gateway_url}, "
                 f"Prefect UI http://{orchestrator}:{prefect_port}")
        for g in env.state["groups"]:
            writers.append(Writer(env, g["name"]).start())
        story.ok("a steady writer per group, through each group's DNS name")
        steps: list[Callable[[], None]] = [
            lambda: crash_repaired(story, env),
            lambda: host_loss(story, env, writers[1]),
            lambda: reprotect(story, env),
            lambda: failback(story, env, writers[1], prefect_api),
            lambda: drill(story, env),
            lambda: audit(story, env),
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:
                story.fail(f"{type(exc).__name__}: {exc}")
        slack_summary(story, env)
    finally:
        for w in writers:
            w.stop()
        story.say("cleaning up: drflow, the lab …")
        env.stop_gateway()
        if (env.lab_dir / "audit.db").exists():
            shutil.copy(env.lab_dir / "audit.db", KEPT_AUDIT)
        stop_env(env)
    table = Table(title="What drflow measured")
    for col in ("step", "figure", "value"):
        table.add_column(col)
    for row in story.figures:
        table.add_row(*row)
    console.print()
    console.print(table)
    console.print("In the Prefect UI (while it ran): the flow runs `failover-payments-1` and `drill`, "
                  "each with a markdown artifact of its steps and figures.")
    console.print(f"The audit trail is kept: .venv/bin/drflow audit show --url sqlite:///{KEPT_AUDIT}")
    if story.failures:
        console.print(f"[red bold]demo FAILED[/]: {len(story.failures)} step(s) did not hold")
        for f in story.failures:
            console.print(f"  [red]- {f}[/]")
        return 1
    console.print(f"[green bold]demo passed[/]: every step held, in {time.monotonic() - story.t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
