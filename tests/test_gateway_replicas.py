"""Two gateway replicas that keep separate state (so separate incident numbering and keys) see the
same dead primary at once: their failover runs queue on the group's `roles-<group>` lock, one
after the other, and the group is promoted once."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

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


def test_two_replicas_with_their_own_keys_fail_over_one_after_the_other(prefect_api: str) -> None:
    env = start_env(groups=1, replication="sync")
    second: Any = None
    try:
        g = env.state["groups"][0]
        port = procs.free_port()
        log = env.lab_dir / "logs" / "gateway-b.log"
        host = env.state["orchestrator"]["address"]
        second = procs.spawn([*env.orchestrator_prefix, DRFLOW, "gateway", "--config",
                              str(env.config), "--state-dir", str(env.lab_dir / "gateway-b"),
                              "--listen", f"{host}:{port}"], log, env={"PYTHONUNBUFFERED": "1"})
        procs.wait_port(port, 90, "the second gateway replica", second, log, host=host)
        urls = [env.gateway_url, f"http://{host}:{port}"]

        vcsim.power_off(env.si(), g["primary"]["vm"])
        answers: list[httpx.Response] = []

        def report(url: str) -> None:
            body, headers = _failure(env, g["primary"]["vm"], g["name"])
            answers.append(httpx.post(f"{url}/v1/events", content=body, headers=headers,
                                      timeout=10))

        threads = [threading.Thread(target=report, args=(u,)) for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
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
        promoted = [r for r in env.audit_records("failover.promote standby") if r.outcome == "ok"]
        assert [r.reason for r in promoted].count("promoted") == 1, [r.reason for r in promoted]
        with env.connect(g["standby"]["host"], g["standby"]["port"]) as c:
            row = c.execute("select count(*) from pg_ls_waldir() where name like '%.history'"
                            ).fetchone()
        assert row == (1,)  # one new timeline: one promotion
        assert env.writable(g["standby"]) and not env.writable(g["primary"])
        assert any(r.outcome == "ok" for r in finished), [(r.outcome, r.reason) for r in finished]
    finally:
        if second is not None:
            procs.stop_tree(second.pid, timeout=5)
            second.wait(15)
        stop_env(env)
