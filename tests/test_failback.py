"""Failback end to end: real agents, a real gateway process, vcsim, PostgreSQL, moto, the Slack
stand-in and Prefect. Host loss → failover → the old VM back → re-protect started by the gateway
→ failback requested in Slack: refused clicks, reject, timeout, then approved under write load."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from drflow.dns import resolve_endpoint
from flows.failback import home_ready, replay_complete
from lab import vcsim
from lab.harness import takes_write
from lab.slack_standin import SlackLab
from tasks.replication import Replica
from tests.harness import Env, Writer, lab_secret_values, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab

APPROVE, REJECT = "drflow_failback_approve", "drflow_failback_reject"


# -- pure decisions ---------------------------------------------------------------------------


def test_home_ready_and_replay_complete() -> None:
    from pathlib import Path

    from drflow.config import load_config

    home = load_config(Path(__file__).parents[1] / "examples" / "drflow.yaml").groups[0].primary
    sync = Replica("h", "streaming", "sync", 100, 100)
    assert home_ready("sync", sync, 100, home, "h").decision.proceed
    assert not home_ready("sync", None, 100, home, "h").decision.proceed
    potential = Replica("h", "streaming", "potential", 100, 90)
    assert not home_ready("sync", potential, 100, home, "h").decision.proceed
    assert home_ready("async", potential, 100, home, "h").lag_bytes == 10
    assert not home_ready("async", Replica("h", "catchup", "async", 1, 1), 100, home,
                          "h").decision.proceed
    assert replay_complete(100, 120, 120).proceed
    assert not replay_complete(100, 90, 90).proceed
    assert not replay_complete(100, 120, 110).proceed


# -- on the lab -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(prefect_api: str) -> Iterator[Env]:
    e = start_env(groups=1, replication="sync")
    try:
        SlackLab(e.state["slack"]["url"]).set_request_url(e.gateway_url + "/slack/actions")
        yield e
    finally:
        stop_env(e)


def _slack(env: Env) -> SlackLab:
    return SlackLab(env.state["slack"]["url"])


def _roles(env: Env) -> dict[str, Any]:
    return dict(httpx.get(f"{env.gateway_url}/v1/groups/orders/roles", timeout=5).json())


def _dns(env: Env) -> tuple[str, int]:
    g = env.group("orders")
    return resolve_endpoint(env.route53(), g["dns"]["zone_id"], g["dns"]["record"])


def _endpoint(node: dict[str, Any]) -> tuple[str, int]:
    return node["host"], int(node["port"])


def _replica_state(env: Env, primary: dict[str, Any], name: str) -> Any:
    with env.connect(primary["host"], primary["port"]) as c:
        return c.execute("select state, sync_state from pg_stat_replication "
                         "where application_name = %s", (name,)).fetchone()


def _writable(env: Env, node: dict[str, Any]) -> bool:
    try:
        with env.connect(node["host"], node["port"], timeout=1) as c:
            c.execute("create table if not exists probe_writes (at timestamptz)")
            c.execute("insert into probe_writes values (now())")
            return True
    except Exception:
        return False


class FailbackRun:
    """The failback flow in a thread of this process; approvals arrive through the gateway."""

    def __init__(self, env: Env, timeout_s: float | None = None,
                 config: Path | None = None) -> None:
        self.env, self.timeout_s = env, timeout_s
        self.config = config or env.config
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.request = _slack(env).wait_for_message(
            lambda m: m.get("text") == "Failback of orders: approval needed"
            and float(m["ts"]) >= self.t0 - 1 and _has_buttons(m), 60)
        self.run_id = json.loads(self.request["blocks"][-1]["elements"][0]["value"])["run"]
        _wait_paused(self.run_id)

    def _run(self) -> None:
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows.failback import failback

        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            try:
                self.result = failback("orders", requested_by="test",
                                       approval_timeout_s=self.timeout_s,
                                       config_path=str(self.config))
            except BaseException as exc:
                self.error = exc

    def click(self, action: str, user: str, **kw: Any) -> tuple[int, str]:
        return _slack(self.env).click(self.request["ts"], action, user, **kw)

    def wait(self, timeout: float = 120) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "failback did not finish"
        assert self.result is not None, repr(self.error)
        return self.result


def _has_buttons(m: dict[str, Any]) -> bool:
    return any(b.get("type") == "actions" for b in m.get("blocks", []))


def _wait_paused(run_id: str) -> None:
    import uuid

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        wait_for(lambda: (s := c.read_flow_run(uuid.UUID(run_id)).state) is not None
                 and s.is_paused(), 30, "failback paused for approval", 0.1)


def _verdict(body: str) -> str:
    return str(json.loads(body)["verdict"])


# -- the console, in a real browser (Debian's Chromium, driven by Playwright) -----------------

ARTIFACTS = Path(__file__).parents[1] / "test-artifacts" / "console"
CHROMIUM = "/usr/bin/chromium"
# No sandbox (tests run as root); nothing that phones home or updates itself.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


class Console:
    """The group's console page, open in one browser tab for the whole module, never reloaded:
    what it shows, it learnt by polling the gateway itself."""

    def __init__(self, page: Any, url: str) -> None:
        self.page, self.url = page, url
        self.card = page.locator("#group-orders")

    def shows(self, protection: str, within_s: float) -> None:
        from playwright.sync_api import expect

        expect(self.card).to_have_attribute("data-protection", protection,
                                            timeout=within_s * 1000)

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _lower_priority(name: str = "chromium") -> None:
    """The browser's processes at the lowest CPU priority (its renderers, forked later, inherit
    it): rendering the page must never delay the lab's agents, whose heartbeats the gateway
    expects every second (3 s of silence opens an incident)."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if name in " ".join(proc.cmdline()[:1]):
                proc.nice(19)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Started before the lab (tests list `console` before `env`), at low priority: a browser
    starting takes both cores for a while."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        _lower_priority()
        try:
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.goto("about:blank")
            _lower_priority()  # the renderer it started
            yield page
        finally:
            b.close()


@pytest.fixture(scope="module")
def console(browser: Any, env: Env) -> Iterator[Console]:
    errors: list[str] = []
    browser.on("pageerror", lambda e: errors.append(str(e)))
    c = Console(browser, f"{env.gateway_url}/console/groups/orders")
    browser.goto(c.url)
    _lower_priority()  # a renderer for the gateway's site
    c.shows("protected", 10)
    c.shot("00-protected-at-start")
    yield c
    assert errors == [], f"the console's script failed: {errors}"


def test_host_loss_then_return_is_reprotected_by_the_gateway(console: Console, env: Env) -> None:
    from playwright.sync_api import expect

    g = env.group("orders")
    prod, dr = g["primary"], g["standby"]
    writer = Writer(env, "orders").start()
    vcsim.power_off(env.si(), prod["vm"])
    failover = wait_for(lambda: [r for r in env.audit_records("failover.finish", "orders")
                                 if r.outcome == "ok"], 60, "failover finished")[-1]
    # The console turns unprotected on its own, with the failover's RTO and RPO (on the card
    # and in the history, with its Prefect run) and a point on each chart.
    console.shows("unprotected", 2)
    card = console.card
    expect(card.locator("[data-role=reason]")).to_contain_text("after failover")
    expect(card.locator("[data-role=serving]")).to_contain_text(f"{dr['vm']} at dr")
    rto = f"RTO {failover.parameters['rto_s']:.2f} s"
    expect(card.locator("[data-role=last-failover]")).to_contain_text(rto, timeout=2000)
    expect(card.locator("[data-role=last-failover]")).to_contain_text("RPO")
    row = console.page.locator("#history tr[data-runbook=failover]").first
    expect(row.locator("[data-role=figures]")).to_contain_text(rto)
    expect(row.locator("a", has_text="run")).to_have_attribute(
        "href", re.compile(r"/runs/flow-run/[0-9a-f-]{36}$"))
    for chart in ("#chart-rto", "#chart-rpo"):
        expect(console.page.locator(chart)).not_to_have_attribute("data-points", "0")
    expect(console.page.locator("#chart-rto canvas")).to_be_visible()
    console.shot("01-unprotected-after-failover")
    roles = wait_for(lambda: (r := _roles(env))["primary_site"] == "dr" and r, 10,
                     "roles flipped by the failover's close")
    assert roles["protected"] is False and roles["seq"] == 1
    vcsim.power_on(env.si(), prod["vm"])
    # The gateway hears the old primary's agent and starts re-protect on its own.
    rec = wait_for(lambda: [r for r in env.audit_records("reprotect.finish", "orders")
                            if r.outcome == "ok"], 90, "re-protect finished")[-1]
    assert rec.parameters["standby"] == prod["vm"] and rec.parameters["primary"] == dr["vm"]
    assert _replica_state(env, dr, prod["vm"]) == ("streaming", "sync")
    wait_for(lambda: _roles(env)["protected"], 10, "roles: protected")
    console.shows("protected", 5)
    expect(console.card.locator("[data-role=last-reprotect]")).to_contain_text("re-protect")
    console.shot("02-protected-after-reprotect")
    assert len({r.parameters["trigger"]["idempotency_key"]
                for r in env.audit_records("reprotect.start", "orders")}) == 1
    writer.stop()
    assert writer.lost(*_endpoint(dr)) == []


def test_refused_clicks_and_a_reject_change_nothing(console: Console, env: Env) -> None:
    from playwright.sync_api import expect

    from lab.labconfig import LAB_APPROVERS

    dr = env.group("orders")["standby"]
    run = FailbackRun(env)
    # The console says what the group waits for and who may give it (the config's approvers).
    approval = console.card.locator("[data-role=approval]")
    expect(approval).to_contain_text("failback approval", timeout=3000)
    for user in LAB_APPROVERS:
        expect(approval.locator("[data-role=approvers]")).to_contain_text(user)
    expect(approval.locator("a", has_text="Prefect run")).to_have_attribute(
        "href", re.compile(f"/runs/flow-run/{run.run_id}$"))
    console.shot("03-failback-awaiting-approval")
    status, body = run.click(APPROVE, "U0STRANGER")
    assert status == 200 and _verdict(body) == "refused"
    assert run.click(APPROVE, "U0ONCALL1", wrong_secret=True)[0] == 401
    assert run.click(APPROVE, "U0ONCALL1", stale_by_s=600)[0] == 401
    time.sleep(1.5)  # the flow polls every second: a resume would show by now
    assert run.thread.is_alive()
    status, body = run.click(REJECT, "U0ONCALL2")
    assert (status, _verdict(body)) == (200, "rejected")
    result = run.wait()
    assert result["outcome"] == "rejected" and "nothing was changed" in result["reason"]
    expect(approval).to_have_count(0, timeout=3000)  # nothing waits any more
    assert _dns(env) == _endpoint(dr) and _writable(env, dr)
    assert _roles(env)["primary_site"] == "dr"
    clicks = [r for r in env.audit_records("slack.approval", "orders")
              if r.parameters["flow_run_id"] == run.run_id]
    assert [r.outcome for r in clicks] == ["refused", "rejected"]
    refusals = [r for r in env.audit_records("request.refuse", "/slack/actions")]
    assert {r.parameters["reason"] for r in refusals} >= {"bad_signature", "stale"}


def test_no_answer_within_the_timeout_changes_nothing(env: Env) -> None:
    dr = env.group("orders")["standby"]
    run = FailbackRun(env, timeout_s=3)
    result = run.wait(60)
    assert result["outcome"] == "expired"
    assert _dns(env) == _endpoint(dr)
    msg = next(m for m in _slack(env).messages() if m["ts"] == run.request["ts"])
    # The buttons are gone; a click from a stale client is refused (test_slack_actions.py).
    assert "expired" in msg["text"] and not _has_buttons(msg)


def _resume(run: FailbackRun, answer: dict[str, Any]) -> None:
    """Resume the paused run directly, as anyone with access to Prefect's API or UI can."""
    import uuid

    from prefect.flow_runs import resume_flow_run

    # _sync: the module's browser (Playwright's sync API) runs an event loop on this thread,
    # from which Prefect would hand back its coroutine instead.
    resume_flow_run(uuid.UUID(run.run_id), run_input=answer, _sync=True)  # type: ignore[call-arg]


def _wait_step(env: Env, run: FailbackRun) -> Any:
    recs = [r for r in env.audit_records("failback.wait for approval", "orders")
            if r.actor.endswith(run.run_id) and r.outcome != "started"]
    assert len(recs) == 1, recs
    return recs[0]


def _two_approvers_config(env: Env) -> Path:
    doc = yaml.safe_load(env.config.read_text())
    doc["groups"][0]["policy"]["approvals_required"] = 2
    path = env.lab_dir / "drflow-two-approvers.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_the_paused_run_refuses_input_without_the_gateways_proof(env: Env) -> None:
    """The real failback, resumed through Prefect's API with an approval the gateway never gave:
    nothing switches over, and the refusal is audited."""
    dr = env.group("orders")["standby"]
    run = FailbackRun(env)
    _resume(run, {"approved": True, "approver": "U0ONCALL1", "approvers": ["U0ONCALL1"]})
    result = run.wait()
    assert result["outcome"] == "rejected", result
    assert "without a verified Slack decision" in result["reason"]
    assert _dns(env) == _endpoint(dr) and _writable(env, dr)
    assert _roles(env)["primary_site"] == "dr"
    rec = _wait_step(env, run)
    assert rec.outcome == "refused" and "without a verified Slack decision" in rec.reason
    assert not [r for r in env.audit_records("failback.stop writes on the DR primary")
                if r.actor.endswith(run.run_id)]


def test_the_paused_run_refuses_one_approver_where_two_are_required(env: Env) -> None:
    """A proven answer (signed with the webhook secret, as the gateway signs) that carries one
    approver while the flow's policy needs two: refused by the flow itself."""
    from drflow.approval import proof

    dr = env.group("orders")["standby"]
    run = FailbackRun(env, config=_two_approvers_config(env))
    secret = env.state["secrets"]["webhook"].encode()
    _resume(run, {"approved": True, "approver": "U0ONCALL1", "approvers": ["U0ONCALL1"],
                  "proof": proof(secret, run.run_id, True, ["U0ONCALL1"])})
    result = run.wait()
    assert result["outcome"] == "rejected", result
    assert "1 distinct approval(s), 2 required" in result["reason"]
    assert _dns(env) == _endpoint(dr) and _writable(env, dr)
    rec = _wait_step(env, run)
    assert rec.outcome == "refused" and "2 required" in rec.reason


def test_approved_failback_under_load_loses_nothing(env: Env) -> None:
    g = env.group("orders")
    prod, dr = g["primary"], g["standby"]
    writer = Writer(env, "orders").start()
    run = FailbackRun(env)
    # A double click and a second approver racing it: exactly one decides.
    clicks = [("U0ONCALL1", APPROVE)] * 3 + [("U0ONCALL2", APPROVE)] * 2
    with ThreadPoolExecutor(len(clicks)) as pool:
        answers = list(pool.map(lambda c: run.click(c[1], c[0]), clicks))
    verdicts = [_verdict(b) for s, b in answers]
    assert sorted(verdicts).count("approved") == 1, verdicts
    assert all(v in ("approved", "closed") for v in verdicts), verdicts
    result = run.wait()
    time.sleep(1.0)
    writer.stop()
    assert result["outcome"] == "failed_back", result
    assert _dns(env) == _endpoint(prod) and _writable(env, prod)
    assert _replica_state(env, prod, dr["vm"]) == ("streaming", "sync")
    assert writer.lost(*_endpoint(prod)) == []
    roles = _roles(env)
    assert (roles["primary_site"], roles["protected"], roles["transition"]) == ("prod", True, None)
    # Write unavailability, as the writer saw it: the longest gap between acknowledgements.
    gaps = [b - a for a, b in itertools.pairwise(writer.ack_times)]
    pause = max(gaps)
    print(f"failback: flow-measured write pause {result['downtime_s']} s, writer's longest "
          f"gap {pause:.3f} s, {len(writer.acked)} acked, {len(writer.unknown)} unknown")
    assert pause < 5.0 and result["downtime_s"] < 5.0
    # The thread says who approved and the measured downtime.
    approver = result["approver"]
    assert approver in ("U0ONCALL1", "U0ONCALL2")
    head = wait_for(lambda: [m for m in _slack(env).messages()
                             if "is home on" in m.get("text", "") and "write pause" in m["text"]
                             and approver in m["text"]], 10, "the thread's headline")
    assert head
    steps = [r.action for r in env.audit_records(target=None)
             if r.action.startswith("failback.") and r.outcome == "ok"]
    for step in ("failback.stop writes on the DR primary", "failback.promote home",
                 "failback.point DNS home", "failback.wait until home replayed the last LSN"):
        assert step in steps


def test_audit_verifies_and_holds_no_secret(env: Env) -> None:
    from drflow.audit import open_store

    store = open_store(env.audit_url, create=False)
    try:
        assert store.verify().ok
        dumped = json.dumps([r.model_dump(mode="json") for r in store.records()])
    finally:
        store.close()
    slack = json.dumps(_slack(env).messages())
    for secret in lab_secret_values(env.state):
        assert secret not in dumped and secret not in slack


def _bridge_starts_postgres(env: Env, vm: str) -> bool:
    site = "prod" if vm.endswith("-prod") else "dr"
    bridge = json.loads((env.lab_dir / f"bridge-{site}.json").read_text())
    return any("pg_ctl" in " ".join(s["start"]) for s in bridge["services"].get(vm, []))


def test_a_returning_old_primary_never_accepts_a_write(env: Env) -> None:
    g = env.group("orders")
    prod, dr = g["primary"], g["standby"]
    # On power-on the bridge starts the agent only; the agent asks the gateway first.
    assert not _bridge_starts_postgres(env, prod["vm"])
    vcsim.power_off(env.si(), prod["vm"])
    before = len(env.audit_records("failover.finish", "orders"))
    wait_for(lambda: len(env.audit_records("failover.finish", "orders")) > before, 60,
             "second failover finished")
    seen_writable: list[float] = []
    polls: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        # Bounded (connect and statement timeouts); a primary whose commit hangs waiting for a
        # synchronous standby took the write all the same: it counts, it is not "safe".
        while not stop.is_set():
            polls.append(time.time())
            if takes_write(env, prod):
                seen_writable.append(time.time())
            time.sleep(0.05)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    done_before = len([r for r in env.audit_records("reprotect.finish", "orders")
                       if r.outcome == "ok"])
    wait_for(lambda: polls, 5, "the first probe")
    t_on = time.time()
    vcsim.power_on(env.si(), prod["vm"])
    try:
        wait_for(lambda: len([r for r in env.audit_records("reprotect.finish", "orders")
                              if r.outcome == "ok"]) > done_before and
                 _replica_state(env, dr, prod["vm"]) == ("streaming", "sync"), 90,
                 "old primary re-protected")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{env.explain('orders', [prod['vm'], dr['vm']])}") from None
    t_done = time.time()
    stop.set()
    t.join(5)
    assert not t.is_alive(), "the probe hung: its silence proves nothing"
    # The probe watched the whole window, often: from before the power-on to re-protected.
    during = [p for p in polls if t_on <= p <= t_done]
    assert polls[0] <= t_on and polls[-1] >= t_done - 1.0 and len(during) >= 5, \
        f"{len(during)} probes in the {t_done - t_on:.1f} s window"
    assert seen_writable == [], "the returning old primary took a write"
