"""Pointing a group's DNS name at its new primary and proving a write through it."""

from __future__ import annotations

import uuid

from drflow.config import GroupConfig, NodeConfig
from drflow.dns import resolve_endpoint
from flows.run import RunbookRun
from flows.runtime import Runtime
from tasks import dns as dns_tasks
from tasks import postgres as pg


def point_dns_and_verify(run: RunbookRun, rt: Runtime, g: GroupConfig, node: NodeConfig,
                         step: str) -> float:
    """Two audited steps, `step` (DNS to `node`) then a write through DNS; when it was taken."""
    with run.step(step, g.dns.record, {"host": node.host, "port": node.port}) as s:
        s.reason = dns_tasks.point_dns(rt.route53, g.dns.zone_id, g.dns.record, node.host,
                                       node.port, g.dns.ttl,
                                       f"drflow {run.runbook} of {g.name} ({run.run_id})")
    with run.step("verify a write through DNS", g.dns.record) as s:
        host, port = resolve_endpoint(rt.route53, g.dns.zone_id, g.dns.record)
        acked = pg.verify_write(rt.db(g, node, host=host, port=port),
                                f"{run.runbook}-{run.run_id}-{uuid.uuid4().hex[:8]}")
        s.reason = f"{g.dns.record} → {host}:{port} took a write"
    return acked
