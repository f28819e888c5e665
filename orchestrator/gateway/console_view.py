"""What the console shows, decided from data alone: no HTTP, no I/O, no clock of its own.

Given `GET /v1/groups`' view of each group (the gateway's heartbeats, leases and open incident,
plus the status that status.py adds) and the audit trail's records, these functions build the
rows and labels the console's templates render and its JSON returns. console.py does the I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from drflow.audit.records import AuditRecord, count_records

# Runbooks whose `*.finish` records make a group's history.
RUNBOOKS = ("failover", "reprotect", "failback", "drill")
# A status older than this is shown as old: the status refresh runs every few seconds, so this
# much silence means it is stuck or the gateway cannot reach the databases.
STALE_AFTER_S = 10.0
# A heartbeat older than this is shown as late (the gateway's default heartbeat timeout is 3 s).
HEARTBEAT_LATE_S = 3.0
HISTORY_ROWS = 50  # rows in a group's history table (the charts keep every point)
APPROVAL_GRACE_S = 60.0  # past its timeout, a paused run is over (Prefect fails it)
_SLACK_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{6,}$")


# -- the audit trail, folded --------------------------------------------------------------------


@dataclass
class PendingApproval:
    """A runbook paused for a person's decision in Slack (failback approval, fence attestation)."""

    runbook: str
    run_id: str
    step: str
    since: str
    waiting_seq: int
    approvers: list[str] = field(default_factory=list)
    approvals_required: int | None = None
    message_ts: str | None = None
    timeout_s: float | None = None


@dataclass
class HistoryEntry:
    """One finished runbook run (its `*.finish` record)."""

    runbook: str
    at: str
    outcome: str
    run_id: str | None
    reason: str
    figures: dict[str, Any]
    duration_s: float | None


@dataclass
class GroupHistory:
    entries: list[HistoryEntry] = field(default_factory=list)
    # Paused runs by the seq of their `wait for …` started record, until its closing record.
    pending: dict[int, PendingApproval] = field(default_factory=dict)
    # The last Slack request of each run (actor), for the message's ts and who was asked.
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_id_of(actor: str) -> str | None:
    """`flow:failover/<uuid>` → the Prefect flow run id; None for a run outside Prefect."""
    if not actor.startswith("flow:") or "/" not in actor:
        return None
    run_id = actor.rsplit("/", 1)[1]
    return None if run_id in ("", "local") else run_id


def fold(history: dict[str, GroupHistory], records: Iterable[AuditRecord]) -> None:
    """Add new audit records (oldest first) to each group's history and pending approvals."""
    for rec in records:
        runbook, _, step = rec.action.partition(".")
        if runbook not in RUNBOOKS:
            continue
        h = history.setdefault(rec.target, GroupHistory())
        if step == "finish":
            h.entries.append(HistoryEntry(
                runbook, rec.time, rec.outcome, run_id_of(rec.actor), rec.reason,
                {k: v for k, v in rec.parameters.items() if isinstance(v, int | float | str)
                 and not isinstance(v, bool)}, rec.duration_s))
            # A run that finished waits for nobody, whatever its last step recorded.
            for seq in [s for s, p in h.pending.items() if p.run_id == run_id_of(rec.actor)]:
                del h.pending[seq]
            h.requests.pop(rec.actor, None)
        elif step.startswith("request") and "Slack" in step and rec.outcome != "started":
            h.requests[rec.actor] = rec.parameters
        elif step.startswith("wait for"):
            if rec.outcome == "started":
                req = h.requests.get(rec.actor, {})
                result = req.get("result") if isinstance(req.get("result"), dict) else {}
                approvers = req.get("approvers")
                required = req.get("approvals_required")
                timeout = rec.parameters.get("timeout_s")
                h.pending[rec.seq] = PendingApproval(
                    runbook, run_id_of(rec.actor) or rec.actor, step, rec.time, rec.seq,
                    [str(a) for a in approvers] if isinstance(approvers, list) else [],
                    required if isinstance(required, int) else None,
                    str(result["message_ts"]) if result and result.get("message_ts") else None,
                    float(timeout) if isinstance(timeout, int | float) else None)
            else:
                h.pending.pop(int(rec.parameters.get("started_seq") or 0), None)


# -- links --------------------------------------------------------------------------------------


def prefect_ui_url(env: Mapping[str, str]) -> str | None:
    """Prefect's UI: PREFECT_UI_URL, else the API's URL without `/api` (how Prefect's own
    server serves both); None when neither is known."""
    ui = env.get("PREFECT_UI_URL", "").strip()
    if ui:
        return ui.rstrip("/")
    api = env.get("PREFECT_API_URL", "").strip().rstrip("/")
    if not api:
        return None
    return api.removesuffix("/api")


def run_links(ui: str | None, run_id: str | None) -> dict[str, str]:
    """The run's page in Prefect's UI and its report (the run's markdown artifact)."""
    if not ui or not run_id:
        return {}
    page = f"{ui}/runs/flow-run/{run_id}"
    return {"run": page, "report": f"{page}?tab=Artifacts"}


def slack_link(channel: str | None, ts: str | None) -> str | None:
    """A message's permalink; only with a channel id (a `#name` has no stable link)."""
    if not channel or not ts or not _SLACK_CHANNEL_ID.match(channel):
        return None
    return f"https://slack.com/archives/{channel}/p{ts.replace('.', '')}"


# -- formatting ---------------------------------------------------------------------------------


def plain(headline: str) -> str:
    """A runbook's headline (written for Slack: an emoji first, `*bold*`) as plain text."""
    text = re.sub(r"^[^\w(*]+\s*", "", headline.strip())
    return re.sub(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])", r"\1", text)


def seconds(v: Any) -> str:
    """`0.42 s`, `12.3 s`, `4 min 5 s`; `—` when unknown."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "—"
    if v < 10:
        return f"{v:.2f} s"
    if v < 120:
        return f"{v:.1f} s"
    m, s = divmod(round(v), 60)
    return f"{m} min {s} s" if m < 120 else f"{m // 60} h {m % 60} min"


def size(v: Any) -> str:
    """`512 B`, `4.0 KiB`, `1.5 MiB`; `—` when unknown."""
    if not isinstance(v, int) or isinstance(v, bool):
        return "—"
    if abs(v) < 1024:
        return f"{v} B"
    n = float(v)
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def epoch(at: Any) -> float | None:
    """A time as seconds since the epoch: from a number, or from an ISO 8601 text."""
    if isinstance(at, int | float) and not isinstance(at, bool):
        return float(at)
    if isinstance(at, str) and at:
        try:
            return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def short_time(at: Any) -> str:
    t = epoch(at)
    if t is None:
        return "—"
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S")


# -- a group's card -----------------------------------------------------------------------------


def checked(status: Mapping[str, Any], now: float, stale_after_s: float = STALE_AFTER_S
            ) -> dict[str, Any]:
    """When the status was checked and whether that is old. Takes `age_s` and `stale` when the
    status gives them, else the age of `checked_at` (epoch seconds or ISO text)."""
    age = status.get("age_s")
    if not isinstance(age, int | float) or isinstance(age, bool):
        at = epoch(status.get("checked_at"))
        age = None if at is None else max(0.0, now - at)
    if age is None:
        return {"age_s": None, "label": "never checked", "stale": True}
    # status.py says itself when a status is old (a missed refresh); older statuses don't.
    given = status.get("stale")
    stale = given if isinstance(given, bool) else age > stale_after_s
    return {"age_s": round(float(age), 1), "stale": stale,
            "label": f"checked {seconds(age)} ago" + (" — OLD" if stale else ""),
            "at": short_time(status.get("checked_at"))}


def replication_row(rep: Mapping[str, Any] | None) -> dict[str, Any]:
    """`sync, 0.00 s behind (0 B), budget 5 s` and whether the lag is over the RPO budget."""
    if not rep:
        return {"label": "unknown", "over_budget": False}
    state, configured = rep.get("state") or "none", rep.get("configured") or "?"
    lag_s, budget = rep.get("lag_s"), rep.get("rpo_budget_s")
    over = isinstance(lag_s, int | float) and isinstance(budget, int | float) and lag_s > budget
    if state == "none":
        label = f"none (configured {configured})"
    else:
        lag = "caught up" if lag_s in (None, 0) and rep.get("lag_bytes") in (None, 0) else \
            f"{seconds(lag_s or 0.0)} behind ({size(rep.get('lag_bytes'))})"
        label = f"{state}" + ("" if state == configured else f" (configured {configured})") + \
            f", {lag}"
    return {"label": label, "over_budget": over, "state": state, "configured": configured,
            "lag_s": lag_s, "lag_bytes": rep.get("lag_bytes"),
            "budget": f"RPO budget {seconds(budget)}" if budget is not None else "",
            "budget_s": budget}


def heartbeat_rows(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for a in entry.get("agents") or []:
        age = a.get("heartbeat_age_s")
        late = not isinstance(age, int | float) or age > HEARTBEAT_LATE_S
        rows.append({"agent": a.get("agent_id", "?"), "role": a.get("role", "unknown"),
                     "age": "never" if age is None else f"{seconds(age)} ago", "late": late,
                     "primary": a.get("agent_id") == entry.get("primary")})
    return rows


def lease_row(leases: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The leader key's holder and the sync key's standby; None without etcd."""
    if not leases:
        return None
    sync = leases.get("sync") or {}
    standby = sync.get("standby") if isinstance(sync, dict) else None
    return {"holder": leases.get("leader_holder") or "—",
            "sync_standby": standby if standby else ("none" if isinstance(sync, dict) and sync
                                                     else "—"),
            "etcd": leases.get("etcd", "—"), "error": leases.get("etcd_error")}


def incident_row(inc: Mapping[str, Any] | None, ui: str | None) -> dict[str, Any] | None:
    if not inc:
        return None
    return {"kind": inc.get("kind", "?"), "status": inc.get("status", "?"),
            "reason": inc.get("reason") or "", "since": short_time(inc.get("first_failure_at")),
            "error": inc.get("error"), "key": inc.get("idempotency_key"),
            "links": run_links(ui, inc.get("run_id")), "run_id": inc.get("run_id")}


def approval_rows(h: GroupHistory | None, roster_approvers: list[str], roster_required: int,
                  ui: str | None, slack_channel: str | None, now: float | None = None
                  ) -> list[dict[str, Any]]:
    """Runs paused for a decision in Slack: who may give it, and where to."""
    if h is None:
        return []
    rows = []
    for p in sorted(h.pending.values(), key=lambda p: p.waiting_seq):
        since = epoch(p.since)
        # A run that died while paused never closes its step: past its timeout it waits for
        # nobody (the run is failed by Prefect then), so it is not shown as waiting.
        if now is not None and since is not None and p.timeout_s is not None and \
                now > since + p.timeout_s + APPROVAL_GRACE_S:
            continue
        approvers = p.approvers or roster_approvers
        required = p.approvals_required or roster_required
        what = ("failback approval" if p.runbook == "failback" else
                "fence attestation" if "attestation" in p.step else f"{p.runbook} decision")
        rows.append({"what": what, "runbook": p.runbook, "since": short_time(p.since),
                     "approvers": approvers, "required": required,
                     "who": (", ".join(approvers) or "nobody (no approvers configured)"),
                     "slack": slack_link(slack_channel, p.message_ts),
                     "message_ts": p.message_ts, "links": run_links(ui, p.run_id)})
    return rows


PROTECTION_WORDS = {"protected": "PROTECTED", "unprotected": "UNPROTECTED",
                    "degraded": "DEGRADED", "unknown": "UNKNOWN"}


def group_card(name: str, entry: Mapping[str, Any], h: GroupHistory | None, now: float, *,
               ui: str | None = None, approvers: list[str] | None = None,
               approvals_required: int = 1, slack_channel: str | None = None) -> dict[str, Any]:
    """Everything the console shows about one group at the top of its page."""
    status = entry.get("status") if isinstance(entry.get("status"), dict) else None
    if status is None or ("error" in status and "protection" not in status):
        why = (status or {}).get("error") or "no status yet (the gateway has not probed the " \
            "databases: it runs without a status provider, or the first probe is under way)"
        protection, reason = "unknown", str(why)
        serving, rep, when = None, None, {"age_s": None, "label": "never checked", "stale": True}
        notes: list[str] = []
    else:
        protection = str(status.get("protection") or "unknown")
        reason = str(status.get("protection_reason") or "")
        serving = status.get("serving")
        rep = status.get("replication")
        when = checked(status, now)
        notes = [str(n) for n in status.get("notes") or []]
    home = (status or {}).get("home_site")
    if serving:
        where = "home" if serving.get("site") == home else f"away from home ({home})"
        serving_label = f"{serving.get('vm')} at {serving.get('site')} ({where})"
    else:
        serving_label = "nobody (no writable primary)" if status and "protection" in status \
            else "unknown"
    roles = entry.get("roles") if isinstance(entry.get("roles"), dict) else None
    return {
        "group": name,
        "protection": protection,
        "protection_word": PROTECTION_WORDS.get(protection, protection.upper()),
        "reason": reason,
        "serving": serving_label,
        "roles": (status or {}).get("roles") or "",
        "replication": replication_row(rep),
        "heartbeats": heartbeat_rows(entry),
        "primary_agent": entry.get("primary"),
        "leases": lease_row(entry.get("leases") or (status or {}).get("leases")),
        "incident": incident_row(entry.get("open_incident"), ui),
        "approvals": approval_rows(h, approvers or [], approvals_required, ui, slack_channel,
                                   now),
        "checked": when,
        "transition": (roles or {}).get("transition"),
        "auto_failover": entry.get("auto_failover"),
        "notes": notes,
        "last": last_runs(h),
    }


def last_runs(h: GroupHistory | None) -> dict[str, str]:
    """`failover: ok 2026-… RTO 4.21 s` for each runbook's last run."""
    out: dict[str, str] = {}
    for e in reversed(h.entries if h else []):
        if e.runbook not in out:
            out[e.runbook] = f"{e.outcome}, {short_time(e.at)}" + "".join(
                f", {label} {seconds(e.figures[k])}" for k, label in FIGURES
                if isinstance(e.figures.get(k), int | float))
    return out


# -- a group's history --------------------------------------------------------------------------


FIGURES = (("rto_s", "RTO"), ("rpo_s", "RPO"), ("reprotect_s", "re-protect"),
           ("downtime_s", "write pause"))


def history_rows(h: GroupHistory | None, ui: str | None, limit: int = HISTORY_ROWS
                 ) -> list[dict[str, Any]]:
    """Newest first: what ran, how it ended, its figures, and links to its run and report."""
    rows = []
    for e in reversed((h.entries if h else [])[-limit:]):
        rows.append({"runbook": e.runbook, "at": short_time(e.at), "outcome": e.outcome,
                     "ok": e.outcome == "ok",
                     "figures": [f"{label} {seconds(e.figures[k])}" for k, label in FIGURES
                                 if isinstance(e.figures.get(k), int | float)]
                     + ([f"RPO {size(e.figures['rpo_bytes'])}"]
                        if isinstance(e.figures.get("rpo_bytes"), int) else []),
                     "reason": plain(e.reason), "duration": seconds(e.duration_s),
                     "links": run_links(ui, e.run_id)})
    return rows


def chart_series(h: GroupHistory | None) -> dict[str, list[float | None]]:
    """uPlot's columns: time (epoch s), then RTO and RPO of each failover and drill that has
    them. Failovers and drills share the axes: a drill measures the RTO a failover would have."""
    t: list[float | None] = []
    rto: list[float | None] = []
    rpo: list[float | None] = []
    kind: list[float | None] = []  # 1: failover, 0: drill (uPlot columns are numbers)
    for e in h.entries if h else []:
        if e.runbook not in ("failover", "drill"):
            continue
        at = epoch(e.at)
        r, p = e.figures.get("rto_s"), e.figures.get("rpo_s")
        if at is None or (not isinstance(r, int | float) and not isinstance(p, int | float)):
            continue
        t.append(at)
        rto.append(float(r) if isinstance(r, int | float) else None)
        rpo.append(float(p) if isinstance(p, int | float) else None)
        kind.append(1.0 if e.runbook == "failover" else 0.0)
    return {"t": t, "rto_s": rto, "rpo_s": rpo, "failover": kind}


def verify_row(result: Any, checked_at: float | None, now: float, error: str | None = None
               ) -> dict[str, Any]:
    """The audit trail's verification as a banner: ok / FAILED / not yet checked."""
    if error is not None:
        return {"state": "error", "label": f"audit trail not verified: {error}"}
    if result is None:
        return {"state": "pending", "label": "audit trail: verification under way"}
    age = "" if checked_at is None else f" (verified {seconds(max(0.0, now - checked_at))} ago)"
    if result.ok:
        return {"state": "ok", "label": f"audit trail intact: {count_records(result.checked)}, "
                f"head {str(result.head_hash)[:12]}…{age}", "checked": result.checked}
    return {"state": "failed", "label": f"AUDIT TRAIL DAMAGED: {result.summary()}{age}",
            "checked": result.checked}


def overview(cards: list[dict[str, Any]]) -> dict[str, int]:
    """How many groups are in each protection state, for the page's headline."""
    out: dict[str, int] = {}
    for c in cards:
        out[c["protection"]] = out.get(c["protection"], 0) + 1
    return out
