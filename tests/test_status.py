"""`drflow status` and the per-group status the gateway serves: the protection verdict, the audit
digest, and the command on the lab's real databases (before/after a failover: test_distributed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from drflow.audit import open_store
from lab import postgres, procs
from orchestrator.gateway.status import (
    DEGRADED,
    PROTECTED,
    UNKNOWN,
    UNPROTECTED,
    AuditDigest,
    NodeState,
    Replica,
    assess,
    probe,
    summarize,
)
from tests.harness import DRFLOW, wait_for


def primary(site: str, *replicas: Replica) -> NodeState:
    return NodeState(site, f"db-{site}", f"{site}:5432", "primary", replicas=replicas)


def standby(site: str, receiver: str | None = "streaming") -> NodeState:
    return NodeState(site, f"db-{site}", f"{site}:5432", "standby", receiver=receiver)


def down(site: str) -> NodeState:
    return NodeState(site, f"db-{site}", f"{site}:5432", "down", error="Connection refused")


SYNC = Replica("db-dr", "streaming", "sync", 0, None)
ASYNC = Replica("db-dr", "streaming", "async", 1200, 0.4)


def verdict(nodes: list[NodeState], replication: str = "sync", budget: float = 5) -> tuple[str, str]:
    a = assess("orders", replication, budget, "prod", nodes)
    return a.protection, a.reason


def test_a_streaming_sync_standby_is_protected() -> None:
    a = assess("orders", "sync", 5, "prod", [primary("prod", SYNC), standby("dr")])
    assert a.protection == PROTECTED
    assert (a.replication_state, a.lag_bytes, a.lag_s) == ("sync", 0, 0.0)
    assert a.primary is not None and a.primary.site == "prod"
    # An async group with an async standby within its budget is protected too.
    assert verdict([primary("prod", ASYNC), standby("dr")], "async")[0] == PROTECTED


def test_roles_swapped_and_reprotected_is_protected_away_from_home() -> None:
    p, why = verdict([standby("prod"), primary("dr", SYNC)])
    assert p == PROTECTED and "away from home" in why


def test_after_failover_with_no_standby_is_unprotected() -> None:
    p, why = verdict([down("prod"), primary("dr")])
    assert p == UNPROTECTED
    assert "after failover" in why and "drflow reprotect orders" in why
    # The old primary back but not yet rewound into a standby: still unprotected.
    assert verdict([standby("prod", None), primary("dr")])[0] == UNPROTECTED


@pytest.mark.parametrize(("nodes", "replication", "budget", "why"), [
    ([primary("prod"), down("dr")], "sync", 5, "db-dr (dr) is down"),
    ([primary("prod"), standby("dr", "waiting")], "sync", 5, "not streaming (waiting)"),
    ([primary("prod", ASYNC), standby("dr")], "sync", 5, "asynchronously"),
    ([primary("prod", ASYNC), standby("dr")], "async", 0.1, "beyond the RPO budget"),
    ([primary("prod"), primary("dr")], "sync", 5, "two writable primaries"),
    ([down("prod"), standby("dr", None)], "sync", 5, "no writable primary"),
    ([down("prod"), down("dr")], "sync", 5, "no writable primary"),
    # Serving from DR with a standby streaming too slowly is degraded, not unprotected.
    ([standby("prod"), primary("dr", ASYNC)], "sync", 5, "asynchronously"),
])
def test_everything_else_is_degraded(nodes: list[NodeState], replication: str, budget: float,
                                     why: str) -> None:
    p, reason = verdict(nodes, replication, budget)
    assert p == DEGRADED
    assert why in reason


def test_a_node_that_will_not_answer_us_makes_the_group_unknown_not_degraded() -> None:
    refused = NodeState("dr", "db-dr", "dr:5432", "unknown", error="password authentication failed")
    p, why = verdict([primary("prod", SYNC), refused])
    assert p == UNKNOWN and "password authentication failed" in why


def test_the_audit_digest_reads_only_what_is_new_and_keeps_the_last(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        store.append("flow:drill/1", "drill.finish", "orders",
                     {"rto_s": 4.2, "rpo_s": 0.0, "rpo_bytes": 0}, "passed", "drill passed")
        store.append("flow:failover/2", "failover.finish", "orders",
                     {"rto_s": 6.1, "rpo_s": 0.0}, "ok", "failed over")
        digest = AuditDigest(store)
        digest.refresh()
        drill = summarize(digest.latest("drill.finish", "orders"), "drill")
        assert drill is not None and drill["outcome"] == "passed" and drill["rto_s"] == 4.2
        failover = summarize(digest.latest("failover.finish", "orders"), "failover")
        assert failover is not None and failover["outcome"] == "failed_over"
        assert digest.latest("drill.finish", "payments") is None
        seen = digest.seq
        store.append("flow:drill/3", "drill.finish", "orders", {"rto_s": None}, "failed",
                     "copy did not start")
        store.append("gateway", "incident.open", "orders",
                     {"idempotency_key": "failover:orders:2", "kind": "heartbeat_lost"},
                     "opened", "silent")
        digest.refresh()
        assert digest.seq == seen + 2
        drill = summarize(digest.latest("drill.finish", "orders"), "drill")
        assert drill is not None and drill["outcome"] == "failed" and "rto_s" not in drill
        inc = summarize(digest.latest("incident.open", "orders"), "incident")
        assert inc is not None and inc["key"] == "failover:orders:2"
        assert summarize(None, "drill") is None
    finally:
        store.close()


# -- on the lab's real databases ---------------------------------------------------------------


def _status(lab: dict[str, Any]) -> dict[str, Any]:
    cfg = Path(lab["dir"]) / "drflow.yaml"
    out = subprocess.run([DRFLOW, "status", "--config", str(cfg), "--json", "--gateway", ""],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout)["groups"])


@pytest.mark.lab
def test_status_sees_a_lost_standby_and_its_return(lab: dict[str, Any]) -> None:
    name = lab["groups"][0]["name"]
    pair = lab["postgres"][name]
    prim = postgres.Instance.from_dict(pair["primary"])
    stby = postgres.Instance.from_dict(pair["standby"])
    before = _status(lab)
    assert all(g["protection"] == PROTECTED for g in before.values()), before
    # A guest agent on the standby (if the lab has agents) would restart it at once: it is
    # held still meanwhile.
    agent = lab["processes"].get(f"agent:{name}-dr")
    if agent:
        os.kill(agent, signal.SIGSTOP)
    postgres.stop(stby, "fast")
    try:
        st = _status(lab)
        g = st[name]
        assert g["protection"] == DEGRADED
        assert f"{name}-dr (dr) is down" in g["protection_reason"]
        assert g["serving"]["site"] == "prod" and g["replication"]["state"] == "none"
        others = [v for k, v in st.items() if k != name]
        assert others and all(v["protection"] == PROTECTED for v in others)
    finally:
        postgres.start(stby)
        if agent:
            os.kill(agent, signal.SIGCONT)
        postgres.wait_streaming(prim, stby, sync=True)
    wait_for(lambda: _status(lab)[name]["protection"] == PROTECTED, 20, "protected again", 0.5)


@pytest.mark.lab
def test_probe_tells_down_from_refused_on_real_servers(lab: dict[str, Any]) -> None:
    g = lab["groups"][0]
    db = lab["database"]
    node = g["primary"]
    ok = probe("prod", node["vm"], node["host"], node["port"], db["name"], db["user"],
               SecretStr(db["password"]))
    assert ok.role == "primary" and ok.replicas and ok.replicas[0].state == "streaming"
    refused = probe("prod", node["vm"], node["host"], node["port"], db["name"], db["user"],
                    SecretStr("not-the-password"))
    assert refused.role == "unknown" and "password" in (refused.error or "")
    gone = probe("prod", node["vm"], "127.0.0.1", procs.free_port(), db["name"], db["user"],
                 SecretStr(db["password"]))
    assert gone.role == "down" and "refused" in (gone.error or "").lower()
    assert db["password"] not in repr([ok, refused, gone])
