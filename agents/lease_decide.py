"""Pure decisions of the leader lease (docs/fencing.md rules 1-5): what was observed → what to do
and why. No I/O here; agents/lease.py observes, acts, and puts the "why" into its reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from drflow.leader_keys import Leader, SyncState

SYNC_STATES = ("sync", "quorum")


@dataclass(frozen=True)
class Standby:
    """One row of the primary's pg_stat_replication."""

    application_name: str
    state: str
    sync_state: str
    reply_age_s: float | None  # now() - reply_time on the primary's clock
    caught_up: bool  # flush_lsn = sent_lsn


@dataclass(frozen=True)
class PgView:
    """The local PostgreSQL as the observer last saw it."""

    role: str  # primary, standby, down
    synchronous_standby_names: str = ""
    standbys: tuple[Standby, ...] = field(default_factory=tuple)

    def streaming(self) -> list[Standby]:
        return [s for s in self.standbys if s.state == "streaming"]


@dataclass(frozen=True)
class Decision:
    action: str
    why: str
    standby: str | None = None  # the agent id the sync key should name


# -- rule 1: acquiring or adopting the key ----------------------------------------------------



def on_leader_key(raw: str | None, me: str, primary_running: bool) -> Decision:
    """What to do about the leader key read as `raw` (None: absent) while this node may hold it."""
    if raw is None:
        return Decision("create", "the leader key is absent: create it (create-if-absent)")
    try:
        holder = Leader.decode(raw)
    except (KeyError, ValueError) as exc:
        return Decision("wait", f"the leader key holds something unreadable ({exc}); not "
                                "touching it, asking again")
    if holder.agent_id == me:
        return Decision("adopt", f"the leader key names this agent (by {holder.by}"
                                 f"{', incident ' + holder.incident if holder.incident else ''}"
                                 "): replacing it with this agent's own lease")
    if primary_running:
        return Decision("fence", f"the leader key names {holder.agent_id} (by {holder.by}), yet "
                                 "PostgreSQL here serves as a primary the group no longer has: "
                                 "fencing it")
    return Decision("hold", f"the leader key names {holder.agent_id} (by {holder.by}): this "
                            "node stays down until re-protect rewinds it")


# -- rule 3: the deadline -----------------------------------------------------------------------


def failsafe(view: PgView | None, view_age_s: float, replication: str,
             lease_s: float) -> Decision:
    """At the deadline with no renewal: keep serving (failsafe) or fence, and why."""
    if replication != "sync":
        return Decision("fence", "no lease renewal before the deadline and the group is async "
                                 "(no failsafe): fencing")
    if view is None or view.role != "primary":
        return Decision("fence", "no lease renewal before the deadline and the local "
                                 "PostgreSQL gave no fresh view of its standby: fencing")
    fresh = lease_s / 2
    for s in view.standbys:
        if s.sync_state in SYNC_STATES and s.state == "streaming" and s.reply_age_s is not None \
                and s.reply_age_s + view_age_s < fresh:
            return Decision("failsafe", f"etcd not renewed, but synchronous standby "
                                        f"{s.application_name} streams (reply "
                                        f"{s.reply_age_s + view_age_s:.2f} s ago): keep serving")
    seen = ", ".join(f"{s.application_name} {s.state}/{s.sync_state}" for s in view.standbys)
    return Decision("fence", "no lease renewal before the deadline and no synchronous standby "
                             f"streams with a reply younger than {fresh:g} s ({seen or 'none'}): "
                             "fencing")


# -- rule 4: after a fence ----------------------------------------------------------------------


def after_fence(raw: str | None, me: str) -> Decision:
    """A fenced node reads the key: re-acquire when absent, stay held when another holds it."""
    if raw is None:
        return Decision("reacquire", "the leader key is absent (nobody took over): "
                                     "re-acquiring it, then restarting PostgreSQL as primary")
    try:
        holder = Leader.decode(raw)
    except (KeyError, ValueError) as exc:
        return Decision("wait", f"the leader key holds something unreadable ({exc})")
    if holder.agent_id == me:
        return Decision("wait", "the leader key still names this agent (its old lease has not "
                                "expired yet): waiting for it to go, never re-using it")
    return Decision("hold", f"the leader key names {holder.agent_id} (by {holder.by}): the group "
                            "failed over; held down for re-protect")


# -- rule 5: the sync key -----------------------------------------------------------------------


def sync_step(view: PgView, key: SyncState | None, me: str, names: dict[str, str],
              relaxed_saved: bool, no_stream_for_s: float, lease_s: float) -> Decision:
    """The one sync-key or synchronous_standby_names change due now (or "none")."""
    if view.role != "primary":
        return Decision("none", "PostgreSQL is not a primary")
    for s in view.streaming():
        if s.sync_state in SYNC_STATES:
            agent = names.get(s.application_name, s.application_name)
            if key is None or key.standby != agent or key.primary != me:
                return Decision("write_standby", f"{agent} streams as the {s.sync_state} "
                                                 "standby: the sync key names it", agent)
            return Decision("none", f"the sync key names {agent}, which streams")
    if view.synchronous_standby_names:
        if no_stream_for_s >= lease_s:
            return Decision("relax", f"no standby has streamed for {no_stream_for_s:.1f} s: "
                                     "writing the sync key with no standby, then relaxing "
                                     "synchronous_standby_names so writes go on")
        return Decision("none", "no standby streams now; waiting lease_s before relaxing")
    if relaxed_saved:
        for s in view.streaming():
            if s.caught_up:
                return Decision("restore", f"{s.application_name} streams again and caught up: "
                                           "restoring synchronous_standby_names")
    return Decision("none", "nothing to change")
