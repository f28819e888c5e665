"""Two gateway replicas see the same dead primary at once. Sharing their state in etcd
(`gateway.shared_state`), they open one incident and start one run. Keeping separate state (their own incident
numbering and keys), their failover runs queue on the group's `roles-<group>` lock, one after
the other. Either way the group is promoted once."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import yaml

from drflow.signing import sign_headers
from lab import procs, vcsim
from tests.harness import DRFLOW, Env, start_env, stop_env, wait_for

pytestmark = pytest.mark.lab


def _failure(env: Env, agent: str, group: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({
        "event_id": str(uuid.uuid4()), "agent_id": agent, "group": group,
        "kind": "recovery_exhausted", "resource": "postgres",
        "observed_at": datetime.now(UTC).isoformat(), "details": {"role": "primary"},
    }).encode()
    headers = {"Content-Type": "application/json",
               **sign_headers(env.state["secrets"]["webhook"].encode(), body)}
    return body, headers


def _restart_gateway_with(env: Env, shared_state: bool) -> None:
    cfg = yaml.safe_load(env.config.read_text())
    cfg["gateway"]["shared_state"] = shared_state
    env.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env.stop_gateway()
    env.start_gateway()
    env.wait_all_heard()


def _second_replica(env: Env) -> tuple[Any, str]:
    port = procs.free_port()
    log = env.lab_dir / "logs" / "gateway-b.log"
    host = env.state["orchestrator"]["address"]
    second = procs.spawn([*env.orchestrator_prefix, DRFLOW, "gateway", "--config",
                          str(env.config), "--state-dir", str(env.lab_dir / "gateway-b"),
                          "--listen", f"{host}:{port}"], log, env={"PYTHONUNBUFFERED": "1"})
    procs.wait_port(port, 90, "the second gateway replica", second, log, host=host)
    return second, f"http://{host}:{port}"


def _report_to_both(env: Env, urls: list[str], group: str, agent: str) -> list[httpx.Response]:
    answers: list[httpx.Response] = []

    def report(url: str) -> None:
        body, headers = _failure(env, agent, group)
        answers.append(httpx.post(f"{url}/v1/events", content=body, headers=headers,
                                  timeout=10))

    threads = [threading.Thread(target=report, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    return answers


def _promoted_once(env: Env, g: dict[str, Any]) -> None:
    promoted = [r for r in env.audit_records("failover.promote standby") if r.outcome == "ok"]
    assert [r.reason for r in promoted].count("promoted") == 1, [r.reason for r in promoted]
    with env.connect(g["standby"]["host"], g["standby"]["port"]) as c:
        row = c.execute("select count(*) from pg_ls_waldir() where name like '%.history'"
                        ).fetchone()
    assert row == (1,)  # one new timeline: one promotion
    assert env.writable(g["standby"]) and not env.writable(g["primary"])


@contextmanager
def _both_told_of_a_dead_primary(shared_state: bool) -> Iterator[
        tuple[Env, dict[str, Any], list[httpx.Response]]]:
    """A lab whose gateway and a second replica (sharing their state or not) both receive the
    primary's failure report at once, the primary powered off; yields their answers."""
    env = start_env(groups=1, replication="sync")
    second: Any = None
    try:
        g = env.state["groups"][0]
        _restart_gateway_with(env, shared_state=shared_state)
        second, url = _second_replica(env)
        vcsim.power_off(env.si(), g["primary"]["vm"])
        answers = _report_to_both(env, [env.gateway_url, url], g["name"], g["primary"]["vm"])
        assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
        yield env, g, answers
    finally:
        if second is not None:
            procs.stop_tree(second.pid, timeout=5)
            second.wait(15)
        stop_env(env)


def test_two_replicas_sharing_their_state_open_one_incident_and_start_one_run(
        prefect_api: str) -> None:
    with _both_told_of_a_dead_primary(shared_state=True) as (env, g, answers):
        keys = {a.json()["incident"] for a in answers}
        assert keys == {f"failover:{g['name']}:1"}, [a.text for a in answers]
        assert sorted(a.json()["action"] for a in answers) == ["failover", "none"], \
            [a.text for a in answers]
        finished = wait_for(lambda: env.audit_records("failover.finish", g["name"]) or None, 180,
                            "the failover run to finish")
        time.sleep(3)  # a second run, if any, would have started by now
        starts = env.audit_records("failover.start", g["name"])
        assert len(starts) == 1, [(r.seq, r.outcome, r.reason) for r in starts]
        assert [r.outcome for r in finished] == ["ok"], [(r.outcome, r.reason) for r in finished]
        _promoted_once(env, g)


def test_two_replicas_with_their_own_keys_fail_over_one_after_the_other(prefect_api: str) -> None:
    # Each replica with its own SQLite state: the layout without `gateway.shared_state`.
    with _both_told_of_a_dead_primary(shared_state=False) as (env, g, answers):
        assert all(a.json()["action"] == "failover" for a in answers), [a.text for a in answers]

        def both_finished() -> list[Any] | None:
            fin = env.audit_records("failover.finish", g["name"])
            return fin if len(fin) >= 2 else None

        finished = wait_for(both_finished, 180, "both replicas' failover runs to finish")
        runs = [r for r in env.audit_records() if r.action in ("failover.start", "failover.finish")
                and r.target == g["name"]]
        # Serialised: every run finishes before the next one starts.
        assert [r.action for r in runs] == ["failover.start", "failover.finish"] * 2, \
            [(r.seq, r.action, r.outcome) for r in runs]
        _promoted_once(env, g)
        assert any(r.outcome == "ok" for r in finished), [(r.outcome, r.reason) for r in finished]
