"""The PostgreSQL monitor keeps one session between checks (the agent's CPU), and still
judges the server as a fresh connection would: after a restart, when down, and every 10 s."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from agents.monitors.postgres import PostgresMonitor
from lab import postgres
from tests.harness import Pair, pg_pair

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with pg_pair("drflow-agent-pgmon-", "pgmon", sync=False) as p:
        yield p


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def monitor(inst: postgres.Instance, password: str, clock: Clock) -> PostgresMonitor:
    return PostgresMonitor("127.0.0.1", inst.port, "drflow", "postgres", SecretStr(password),
                           timeout_s=2, clock=clock)


def backends(inst: postgres.Instance) -> list[int]:
    with postgres.admin_conn(inst) as c:
        rows = c.execute("select pid from pg_stat_activity "
                         "where application_name = 'drflow-agent' order by pid").fetchall()
    return [r[0] for r in rows]


def test_checks_reuse_one_session_and_renew_it(pair: tuple[postgres.Instance, postgres.Instance,
                                                             str]) -> None:
    primary, standby, password = pair
    clock = Clock()
    m = monitor(primary, password, clock)
    try:
        first = m.check()
        assert first.ok and first.facts["role"] == "primary", first.detail
        seen = backends(primary)
        assert len(seen) == 1
        for _ in range(5):
            clock.now += 1
            assert m.check().ok
        assert backends(primary) == seen  # the same session: no new connection per check
        clock.now += m.reconnect_every_s
        assert m.check().ok
        renewed = backends(primary)
        assert len(renewed) == 1 and renewed != seen  # a fresh connection proven every 10 s
    finally:
        m.close()
    s = monitor(standby, password, clock)
    try:
        r = s.check()
        assert r.ok and r.facts["role"] == "standby" and "replay_lsn" in r.facts, r.detail
    finally:
        s.close()


def test_a_restart_between_checks_is_no_failure_and_down_is(
        pair: tuple[postgres.Instance, postgres.Instance, str]) -> None:
    primary, _standby, password = pair
    clock = Clock()
    m = monitor(primary, password, clock)
    try:
        assert m.check().ok
        postgres.stop(primary, "fast")
        postgres.start(primary)
        clock.now += 1
        again = m.check()  # the kept session died with the old server: judged afresh
        assert again.ok, again.detail
        postgres.stop(primary, "fast")
        try:
            clock.now += 1
            down = m.check()
            assert not down.ok and f"postgres 127.0.0.1:{primary.port}" in down.detail
        finally:
            postgres.start(primary)
    finally:
        m.close()
