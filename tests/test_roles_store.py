"""The roles records in the gateway's SQLite state file: each change is one transaction."""

from __future__ import annotations

import threading
from pathlib import Path

from orchestrator.gateway.roles_decide import RolesRecord, RolesUpdate, apply_update
from orchestrator.gateway.roles_store import RolesStore


def test_change_stores_what_fn_makes_of_the_stored_record(tmp_path: Path) -> None:
    store = RolesStore(tmp_path / "gw.sqlite")
    given: list[RolesRecord | None] = []

    def nothing(current: RolesRecord | None) -> None:
        given.append(current)

    assert store.change("g", nothing) is None
    assert given == [None] and store.get("g") is None  # none yet, and none written
    first = RolesRecord(group="g", primary_site="prod")
    assert store.change("g", lambda _: first) == first
    assert store.get("g") == first
    assert store.change("g", lambda current: current) is None  # the record given: no change
    moved = store.change("g", lambda current: apply_update(
        current or first, RolesUpdate(primary_site="dr", protected=False), 2.0))
    assert moved is not None and (moved.primary_site, moved.protected, moved.seq) == ("dr", False, 1)
    assert store.get("g") == moved
    assert store.get("other") is None
    store.close()


def test_a_change_through_another_connection_waits_for_the_one_under_way(tmp_path: Path) -> None:
    # Two writers of one state file: the second one's change, started while the first is
    # between its read and its write, reads the record only once the first one is written.
    one, two = RolesStore(tmp_path / "gw.sqlite"), RolesStore(tmp_path / "gw.sqlite")
    one.change("g", lambda _: RolesRecord(group="g", primary_site="prod"))

    def begins_switchover(current: RolesRecord | None) -> RolesRecord:
        assert current is not None
        return apply_update(current, RolesUpdate(transition="switchover"), 3.0)

    other = threading.Thread(target=two.change, args=("g", begins_switchover))
    waited: list[bool] = []

    def loses_protection(current: RolesRecord | None) -> RolesRecord:
        assert current is not None
        other.start()
        other.join(0.3)
        waited.append(other.is_alive())
        return apply_update(current, RolesUpdate(protected=False), 2.0)

    one.change("g", loses_protection)
    other.join(10)
    assert waited == [True]
    rec = two.get("g")
    assert rec is not None
    assert (rec.protected, rec.seq, rec.transition) == (False, 1, "switchover")
    one.close()
    two.close()
