"""The roles record of a protection group, and the pure decisions made from it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.gateway.settings import GroupRoster

if TYPE_CHECKING:
    pass

# What an agent's boot check reports in `details.drflow_boot` (see agents/boot.py).
BOOT_HELD = "held_for_reprotect"
BOOT_SECOND_PRIMARY = "second_primary"



class RolesRecord(BaseModel):
    """One group's roles as the gateway knows them."""

    model_config = ConfigDict(extra="forbid")

    group: str
    primary_site: str
    protected: bool = True
    seq: int = Field(default=0, description="protection generation: +1 whenever it is lost")
    transition: str | None = Field(default=None, description="a runbook moving roles now")
    changed_at: float = 0.0
    reason: str = "initial: the configured primary serves"
    reprotect_key: str | None = Field(default=None, description="re-protect run started for seq")
    reprotect_failures: int = Field(default=0, description="runs of this generation that failed")
    reprotect_retry_at: float = Field(default=0.0, description="no new attempt before (epoch s)")


class RolesUpdate(BaseModel):
    """Body of `POST /v1/groups/{group}/roles`: what a flow changed (fields left out stay)."""

    model_config = ConfigDict(extra="forbid")

    primary_site: str | None = Field(default=None, max_length=100)
    protected: bool | None = None
    transition: str | None = Field(default=None, max_length=100,
                                   description="a runbook's name; 'none' clears it")
    reason: str = Field(default="", max_length=2000)



# -- pure decisions ---------------------------------------------------------------------------


def other_site(policy: GroupRoster, site: str) -> str | None:
    sites = [n.site for n in (policy.primary, policy.standby) if n is not None]
    others = [s for s in sites if s != site]
    return others[0] if others else None


# A new protection generation starts with no re-protect run and no failed attempt.
NEW_GENERATION: dict[str, Any] = {"reprotect_key": None, "reprotect_failures": 0,
                                  "reprotect_retry_at": 0.0}
RETRY_FIRST_S = 30.0  # after a failed re-protect run; doubled per failure, up to RETRY_MAX_S
RETRY_MAX_S = 600.0


def reprotect_key(group: str, seq: int, failures: int) -> str:
    """One key per attempt: `reprotect:{group}:{seq}`, then `…:{seq}.{n}` after n failures."""
    return f"reprotect:{group}:{seq}" + (f".{failures}" if failures else "")


def after_reprotect_failed(rec: RolesRecord, key: str, outcome: str, now: float
                           ) -> RolesRecord | None:
    """The run `key` ended without protecting the group: the record with the next attempt
    allowed after a back-off, or None when the run is not the generation's current one (an
    older attempt, or protection restored or lost again since)."""
    if rec.protected or rec.reprotect_key != key:
        return None
    failures = rec.reprotect_failures + 1
    wait = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
    return rec.model_copy(update={
        "reprotect_failures": failures, "reprotect_retry_at": now + wait,
        "reason": f"re-protect {key} ended {outcome}: next attempt when the old primary's "
                  f"agent reports in after {wait:g} s"})


def after_failover(rec: RolesRecord, new_primary_site: str, reason: str, now: float) -> RolesRecord:
    """The group now serves from `new_primary_site` with no standby: a new protection generation.
    Idempotent: a record that already says so is returned as it is."""
    if rec.primary_site == new_primary_site and not rec.protected and rec.transition is None:
        return rec
    return rec.model_copy(update={
        "primary_site": new_primary_site, "protected": False, "seq": rec.seq + 1,
        "transition": None, "changed_at": now, "reason": reason, **NEW_GENERATION})


def apply_update(rec: RolesRecord, upd: RolesUpdate, now: float) -> RolesRecord:
    changes: dict[str, Any] = {"changed_at": now, "reason": upd.reason or rec.reason}
    moved = upd.primary_site is not None and upd.primary_site != rec.primary_site
    if moved:
        changes["primary_site"] = upd.primary_site
    if upd.protected is not None:
        changes["protected"] = upd.protected
    # Losing protection, or moving while unprotected (a failover back before any re-protect),
    # starts a new generation: the old side needs a re-protect run of its own.
    if (upd.protected is False and rec.protected) or \
            (moved and not (upd.protected if upd.protected is not None else rec.protected)):
        changes.update(seq=rec.seq + 1, **NEW_GENERATION)
    if upd.transition is not None:
        changes["transition"] = None if upd.transition == "none" else upd.transition
    return rec.model_copy(update=changes)


def stale_record(rec: RolesRecord, policy: GroupRoster, *, agent_site: str | None,
                 report: str | None, peer_writable: bool) -> RolesRecord | None:
    """An agent of the side the record calls serving was held at boot because the other node
    answers as a writable primary, or etcd's leader key names the other node (`peer_writable`
    covers both): the record is stale (a failover this gateway never heard of,
    or its state lost). The corrected record, or None. Re-protect then checks the real roles
    (writable nodes and DNS) before it touches anything, so a wrong report cannot do harm."""
    if report != BOOT_HELD or not peer_writable or agent_site != rec.primary_site:
        return None
    other = other_site(policy, agent_site)
    if other is None:
        return None
    return apply_update(rec, RolesUpdate(
        primary_site=other, protected=False,
        reason=f"the agent on {agent_site} found the node on {other} serving (a writable "
               "primary, or the leader key in etcd names it) at boot: the record was stale"),
        time.time())


class ProtectAction(StrEnum):
    NONE = "none"
    REPROTECT = "reprotect"
    FENCE_AND_REPROTECT = "fence_and_reprotect"


@dataclass(frozen=True)
class ProtectDecision:
    action: ProtectAction
    reason: str
    key: str | None = None


def decide_protection(rec: RolesRecord, *, agent_id: str, agent_site: str | None,
                      report: str | None, incident_open: bool, now: float = 0.0
                      ) -> ProtectDecision:
    """Does this report from an agent call for a re-protect run of its group, and which one?"""
    g = rec.group
    if agent_site is None:
        return ProtectDecision(ProtectAction.NONE, f"{agent_id}: its side is unknown until it "
                               "reports at boot")
    if agent_site == rec.primary_site:
        return ProtectDecision(ProtectAction.NONE, f"{agent_id} is on {g}'s serving side "
                               f"({agent_site})")
    if report == BOOT_SECOND_PRIMARY:  # urgent: no back-off after a failed attempt
        seq = rec.seq + 1 if rec.protected else rec.seq
        return ProtectDecision(
            ProtectAction.FENCE_AND_REPROTECT,
            f"{agent_id} ({agent_site}) found its PostgreSQL running as a primary while {g} is "
            f"served from {rec.primary_site}: a second primary; fence it, then re-protect",
            reprotect_key(g, seq, 0 if rec.protected else rec.reprotect_failures))
    if incident_open or rec.transition:
        what = "a failover incident is open" if incident_open else f"{rec.transition} running"
        return ProtectDecision(ProtectAction.NONE, f"{g}: {what}; re-protect waits for it")
    if rec.protected and report != BOOT_HELD:
        return ProtectDecision(ProtectAction.NONE, f"{g} is protected: {agent_id} is its standby")
    # A node held at boot would come up as a primary: it is no standby, whatever the record said.
    seq = rec.seq + 1 if rec.protected else rec.seq
    failures = 0 if rec.protected else rec.reprotect_failures
    key = reprotect_key(g, seq, failures)
    if rec.reprotect_key == key:
        return ProtectDecision(ProtectAction.NONE, f"{g}: re-protect {key} already started")
    if failures and now < rec.reprotect_retry_at:
        return ProtectDecision(ProtectAction.NONE, f"{g}: re-protect failed {failures} time(s); "
                               f"next attempt in {rec.reprotect_retry_at - now:.0f} s")
    why = "reported at boot, held for re-protect" if report == BOOT_HELD else "reports in"
    return ProtectDecision(ProtectAction.REPROTECT,
                           f"{g} runs unprotected on {rec.primary_site}; the old primary's agent "
                           f"{agent_id} ({agent_site}) {why}: re-protect it", key)

