"""Who may decide a failback, and when a decision is final: pure functions, stdlib only.

A failback request needs `required` (1 or 2) approvals from distinct users on the group's
approver list; a Reject by any approver ends it at once. Clicks by anyone else, repeated clicks
and clicks after the decision change nothing. Every click gets a `ClickOutcome` whose `reason`
is audited and told to the clicker as it is.

The gateway decides clicks (it sees them all, in order, under one lock per request) and resumes
the paused flow run once with the final answer plus a `proof`: an HMAC with the webhook secret,
so that the flow can tell the gateway's verified decision from input typed into the Prefect UI.
This module imports neither Prefect nor the gateway, so both sides can use it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal

APPROVE = "approve"
REJECT = "reject"
ACTION_IDS = {"drflow_failback_approve": APPROVE, "drflow_failback_reject": REJECT}

Choice = Literal["approve", "reject"]


class Verdict(StrEnum):
    REFUSED = "refused"  # not an approver: nothing changes
    DUPLICATE = "duplicate"  # this approver already approved: nothing changes
    RECORDED = "recorded"  # an approval counted, more are needed
    APPROVED = "approved"  # the last approval needed: resume with approved=True
    REJECTED = "rejected"  # an approver said no: resume with approved=False
    CLOSED = "closed"  # already decided, expired or no longer waiting: nothing changes


@dataclass(frozen=True)
class Ledger:
    """What a request has gathered so far."""

    approvals: tuple[str, ...] = ()
    decided: Literal["approved", "rejected"] | None = None
    decided_by: tuple[str, ...] = ()
    comment: str = ""


@dataclass(frozen=True)
class ClickOutcome:
    verdict: Verdict
    reason: str
    ledger: Ledger

    @property
    def resumes(self) -> bool:
        """The click decides the request: the paused run is resumed with `answer()`."""
        return self.verdict in (Verdict.APPROVED, Verdict.REJECTED)

    @property
    def changes(self) -> bool:
        return self.verdict in (Verdict.RECORDED, Verdict.APPROVED, Verdict.REJECTED)


def decide_click(ledger: Ledger, user_id: str, choice: Choice, *, approvers: list[str],
                 required: int, waiting: bool, waiting_detail: str = "",
                 comment: str = "") -> ClickOutcome:
    """What one click means for a request, given everything before it."""
    if required not in (1, 2):
        raise ValueError(f"approvals_required must be 1 or 2, not {required}")
    if user_id not in approvers:
        return ClickOutcome(Verdict.REFUSED, f"<@{user_id}> is not an approver of this group "
                            f"(approvers: {_users(approvers) or 'none configured'}): "
                            "nothing changed", ledger)
    if ledger.decided is not None:
        return ClickOutcome(Verdict.CLOSED, f"already {ledger.decided} by "
                            f"{_users(ledger.decided_by)}: nothing changed", ledger)
    if not waiting:
        return ClickOutcome(Verdict.CLOSED, "this failback request is no longer waiting for a "
                            f"decision ({waiting_detail or 'expired or finished'}): nothing "
                            "changed", ledger)
    if choice == REJECT:
        done = replace(ledger, decided="rejected", decided_by=(user_id,), comment=comment)
        return ClickOutcome(Verdict.REJECTED, f"rejected by <@{user_id}>: no failback", done)
    if user_id in ledger.approvals:
        return ClickOutcome(Verdict.DUPLICATE, f"<@{user_id}> already approved; "
                            f"{required} distinct approvers are needed: nothing changed", ledger)
    approvals = (*ledger.approvals, user_id)
    if len(approvals) < required:
        return ClickOutcome(Verdict.RECORDED, f"approval {len(approvals)} of {required} by "
                            f"<@{user_id}>; waiting for another approver",
                            replace(ledger, approvals=approvals))
    done = replace(ledger, approvals=approvals, decided="approved", decided_by=approvals,
                   comment=comment)
    return ClickOutcome(Verdict.APPROVED, f"approved by {_users(approvals)}: failing back", done)


def answer(ledger: Ledger, run_id: str, secret: bytes) -> dict[str, Any]:
    """The run input that resumes the paused failback: `{approved, approver, comment, …}`."""
    if ledger.decided is None:
        raise ValueError("the request is not decided yet")
    approved = ledger.decided == "approved"
    who = list(ledger.decided_by)
    return {"approved": approved, "approver": ", ".join(who), "comment": ledger.comment,
            "approvers": who, "proof": proof(secret, run_id, approved, who)}


def proof(secret: bytes, run_id: str, approved: bool, approvers: list[str]) -> str:
    """HMAC over what was decided for which run: only the gateway (and the flow) can make it."""
    msg = f"drflow-failback-approval\n{run_id}\n{int(approved)}\n{','.join(approvers)}"
    return hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class InputCheck:
    proceed: bool
    reason: str


def check_answer(*, run_id: str, approved: bool, approvers: list[str], given_proof: str,
                 secret: bytes, allowed: list[str], required: int) -> InputCheck:
    """The flow's own check of the input it was resumed with (defence in depth)."""
    if not hmac.compare_digest(proof(secret, run_id, approved, approvers), given_proof or ""):
        return InputCheck(False, "resumed without a verified Slack decision (no valid proof, "
                                 "e.g. from the Prefect UI): treated as no approval, nothing "
                                 "changed")
    strangers = [u for u in approvers if u not in allowed]
    if strangers:
        return InputCheck(False, f"{_users(strangers)} not on the approver list: nothing changed")
    if not approved:
        return InputCheck(False, f"rejected by {_users(approvers)}: no failback")
    if len(set(approvers)) < required:
        return InputCheck(False, f"{len(set(approvers))} distinct approval(s), {required} "
                                 "required: nothing changed")
    return InputCheck(True, f"approved by {_users(approvers)}")


def _users(ids: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"<@{u}>" for u in ids)
