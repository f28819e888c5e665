"""What `drflow protect` plans for a database VM, or why it refuses (orchestrator/protect_plan)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestrator.protect_plan import STEPS, Ask, DrSite, Known, Primary, plan

PRIMARY = Primary(vm="crm-prod", site="prod", role="primary", address="198.18.0.22", port=5432,
                  datadir="/var/lib/postgresql/15/main", version="15.8", data_bytes=10**9,
                  wal_log_hints=True, data_checksums=False, cpus=4, memory_mb=8192)
DR = DrSite(site="dr", template_found=True, host_found=True, free_bytes=50 * 10**9,
            vm_exists=False, vm_is_ours=False)
ASK = Ask(group="crm", standby_vm="crm-dr", standby_address="198.18.1.22", replication="sync",
          dns_record="crm.db.example.com.")


def test_a_protectable_primary_gets_every_step_in_order() -> None:
    p = plan(PRIMARY, DR, ASK, Known())
    assert p.ok and not p.refusals
    assert [s.name for s in p.steps] == list(STEPS)
    create = p.steps[2].does
    assert "clone crm-dr at dr" in create and "4 vCPU and 8192 MB" in create
    assert "198.18.1.22" in create
    assert "synchronous_standby_names" in p.steps[3].does
    assert "1.0 GB" in p.steps[3].does


def test_a_rerun_finishes_the_standby_it_made() -> None:
    p = plan(PRIMARY, replace(DR, vm_exists=True, vm_is_ours=True), ASK, Known())
    assert p.ok and p.steps[2].does.startswith("finish crm-dr")


def test_async_names_no_synchronous_standby() -> None:
    p = plan(PRIMARY, DR, replace(ASK, replication="async"), Known())
    assert "synchronous_standby_names" not in p.steps[3].does and "stream async" in p.steps[3].does


@pytest.mark.parametrize(("change", "known", "says"), [
    ({"primary": {"role": "standby"}}, Known(), "is a standby, not a primary"),
    ({"primary": {"wal_log_hints": False}}, Known(), "set `wal_log_hints = on`"),
    ({"primary": {"site": "dr"}}, Known(), "protect to another site"),
    ({}, Known(groups=frozenset({"crm"})), "`drflow unprotect crm` first"),
    ({}, Known(vms=frozenset({"crm-prod"})), "already in a protection group"),
    ({}, Known(records=frozenset({"crm.db.example.com."})), "already belongs"),
    ({"dr": {"template_found": False}}, Known(), "`--template`"),
    ({"dr": {"host_found": False}}, Known(), "`--standby-host`"),
    ({"dr": {"vm_exists": True}}, Known(), "was not made by this protection"),
    ({"dr": {"free_bytes": 10**9}}, Known(), "1.0 GB free, 1.3 GB needed"),
    ({"ask": {"replication": "semi"}}, Known(), "sync or async"),
])
def test_what_cannot_be_protected_is_refused_with_what_to_do(
        change: dict[str, dict[str, object]], known: Known, says: str) -> None:
    p = plan(replace(PRIMARY, **change.get("primary", {})), replace(DR, **change.get("dr", {})),
             replace(ASK, **change.get("ask", {})), known)
    assert not p.ok and p.steps == []
    assert any(says in r for r in p.refusals), p.refusals


def test_data_checksums_alone_allow_a_rewind() -> None:
    assert plan(replace(PRIMARY, wal_log_hints=False, data_checksums=True), DR, ASK, Known()).ok


def test_every_refusal_is_told_at_once() -> None:
    p = plan(replace(PRIMARY, role="standby", wal_log_hints=False),
             replace(DR, template_found=False), ASK, Known(groups=frozenset({"crm"})))
    assert len(p.refusals) == 4
