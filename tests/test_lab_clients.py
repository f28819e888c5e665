"""The lab's application-like writers: what their records show (made-up records), how their
settings bound a connect to a silent address, and a writer run inside a site."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lab import clients
from lab.clients import Ack

A, B = ("198.18.0.20", 5432), ("198.18.1.20", 5432)


def acks(*spec: tuple[tuple[str, int], float]) -> list[Ack]:
    return [Ack(f"w{i}", node, at) for i, (node, at) in enumerate(spec)]


def test_rto_is_fault_to_first_ack_of_the_new_primary() -> None:
    recs = acks((A, 9.0), (A, 10.5), (B, 11.0), (B, 14.0), (B, 15.0))
    assert clients.rto_s(10.0, recs, B) == pytest.approx(1.0)
    assert clients.rto_s(12.0, recs, B) == pytest.approx(2.0)
    assert clients.rto_s(10.0, recs, None) is None
    assert clients.rto_s(16.0, recs, B) is None  # nothing after the fault
    assert clients.rto_s(10.0, recs, ("198.18.1.21", 5432)) is None


def test_acked_lost_are_the_acked_ids_the_node_lacks() -> None:
    recs = acks((A, 1.0), (A, 2.0), (B, 3.0))
    assert [a.id for a in clients.acked_lost(recs, {"w0", "w2", "other"})] == ["w1"]
    assert clients.acked_lost(recs, {"w0", "w1", "w2"}) == []


@pytest.mark.parametrize(("spec", "expected"), [
    ([(A, 1.0), (A, 2.0), (B, 5.0), (B, 6.0)], False),          # clean failover, with a gap
    ([(A, 1.0), (A, 2.0), (B, 2.0), (B, 3.0)], False),          # switch at the same instant
    ([(A, 1.0), (A, 2.0)], False),                              # one node only
    ([], False),
    ([(A, 1.0), (B, 2.0), (A, 3.0), (B, 4.0)], True),           # interleaved
    ([(A, 1.0), (A, 2.0), (B, 3.0), (A, 3.5), (B, 4.0)], True),  # old primary acked after the switch
    ([(A, 1.0), (B, 2.0), (B, 3.0), (A, 4.0)], True),           # old primary came back writable
    ([(A, 1.0), (A, 5.0), (B, 3.0)], True),                     # a single ack inside A's span
])
def test_two_writers(spec: list[tuple[tuple[str, int], float]], expected: bool) -> None:
    assert clients.two_writers(acks(*spec)) is expected


def test_two_writers_merges_every_writers_records() -> None:
    dns = [Ack("d1", A, 1.0, "dns"), Ack("d2", B, 4.0, "dns"), Ack("d3", B, 5.0, "dns")]
    in_site = [Ack("s1", A, 4.5, "site")]  # the cut-off primary still acknowledging locally
    assert clients.two_writers(dns) is False
    assert clients.two_writers(dns + in_site) is True


def test_longest_gap() -> None:
    recs = acks((A, 1.0), (A, 2.0), (B, 7.0), (B, 8.0))
    assert clients.longest_gap_s(recs, 1.5, 9.0) == pytest.approx(5.0)
    assert clients.longest_gap_s([], 1.0, 4.0) == pytest.approx(3.0)


def test_site_writer_records_survive_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "acks.jsonl"
    out.write_text(json.dumps({"type": "ack", "id": "x", "node": list(A), "at": 1.5,
                               "writer": "s"}) + "\n"
                   + json.dumps({"type": "error", "at": 2.0, "node": list(A),
                                 "what": "write: OperationalError", "writer": "s"}) + "\n"
                   + '{"type": "ack", "id": "y", "no')
    got, errs = clients.read_records(out)
    assert got == [Ack("x", A, 1.5, "s")]
    assert [e.what for e in errs] == ["write: OperationalError"]


def test_cached_resolver_reuses_an_answer_for_its_ttl() -> None:
    calls: list[int] = []

    def resolve() -> tuple[str, int]:
        calls.append(1)
        return A

    r = clients.CachedResolver(resolve, cache_s=0.3)
    assert r() == A and r() == A and len(calls) == 1
    time.sleep(0.35)
    r()
    assert len(calls) == 2


# --- on the lab ----------------------------------------------------------------------------------

def _answering_address(lab: dict[str, Any]) -> tuple[Any, tuple[str, int]]:
    """A standby's PostgreSQL: it answers at once until blackholed (no writer uses it)."""
    from lab import manager

    topo = manager.topology(lab)
    if topo is None or not topo.enabled:
        pytest.skip("the lab runs on loopback: no address can be made silent")
    node = lab["groups"][-1]["standby"]
    return topo, (node["host"], int(node["port"]))


def test_follow_bounds_a_connect_to_a_silent_address_libpq_defaults_do_not(
        lab: dict[str, Any]) -> None:
    from lab import netns

    topo, (silent, port) = _answering_address(lab)
    db = lab["database"]
    netns.blackhole(topo, silent)
    try:
        pending: list[BaseException | None] = []

        def defaults() -> None:
            try:
                clients.connect((silent, port), db, clients.LIBPQ_DEFAULTS).close()
                pending.append(None)
            except BaseException as exc:  # recorded for the assertion
                pending.append(exc)

        threading.Thread(target=defaults, daemon=True).start()
        t = time.monotonic()
        with pytest.raises(Exception, match=r"timeout|timed out"):
            clients.connect((silent, port), db, clients.FOLLOW)
        took = time.monotonic() - t
        assert 1.5 <= took <= 3.5, f"FOLLOW gave up after {took:.2f} s, not ~2 s"
        time.sleep(max(0.0, 4.0 - (time.monotonic() - t)))
        assert pending == [], f"libpq defaults ended within 4 s: {pending}"
    finally:
        netns.unblackhole(topo, silent)


def test_writer_inside_a_site_writes_straight_to_its_node(lab: dict[str, Any],
                                                          tmp_path: Path) -> None:
    from lab import manager

    topo = manager.topology(lab)
    g = lab["groups"][0]
    node = (g["primary"]["host"], int(g["primary"]["port"]))
    db = lab["database"]
    clients.ensure_table(node, db)
    out = tmp_path / "site.jsonl"
    prefix = topo.exec_prefix("prod") if topo else []
    argv = clients.site_writer_argv(prefix, "in-prod", node, db, out)
    assert db["password"] not in " ".join(argv)
    argv += ["--seconds", "1.5"]
    root = Path(__file__).resolve().parent.parent
    subprocess.run(argv, env={**os.environ, "PGPASSWORD": db["password"]}, cwd=root,
                   check=True, timeout=30, capture_output=True)
    got, errs = clients.read_records(out)
    assert len(got) > 10, errs
    assert {a.node for a in got} == {node} and {a.writer for a in got} == {"in-prod"}
    assert clients.acked_lost(got, clients.present_ids(node, db)) == []


def test_the_prober_writes_again_as_soon_as_the_name_points_somewhere_that_answers(
        lab: dict[str, Any]) -> None:
    # A long-lived client stuck on a silent address waits for its timeouts; the prober's new
    # clients follow the name within its interval (plus a connect), however many hang meanwhile.
    from lab import netns

    topo, silent = _answering_address(lab)
    db = lab["database"]
    primary = lab["groups"][0]["primary"]
    good = (primary["host"], int(primary["port"]))
    clients.ensure_table(good, db)
    target = [silent]
    netns.blackhole(topo, silent[0])
    try:
        p = clients.Prober("probe-test", lambda: target[0], db).start()
        try:
            time.sleep(1.0)
            assert p.acks == []  # every probe so far hangs on the silent address
            switched = time.time()
            target[0] = good
            deadline = time.monotonic() + 5
            while not p.acks and time.monotonic() < deadline:
                time.sleep(0.02)
            assert p.acks and p.acks[0].node == good
            assert p.acks[0].at - switched < 0.5, p.acks[0].at - switched
        finally:
            p.stop()
    finally:
        netns.unblackhole(topo, silent[0])
