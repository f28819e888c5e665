"""Warm runners against a real Prefect server and a real etcd: runs pushed through etcd are taken
without waiting for a poll, runs nobody pushed are found by the poll, and two runners serving
one pool execute every run exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import Abort
from prefect.runtime import flow_run

from drflow import liveness
from drflow.etcd import Client, EtcdError
from flows.locks import ensure_limit, exclusive
from orchestrator.warm_runner import WarmRunner, dispatch, dispatch_key, run_id_of
from tests.harness import wait_for
from tests.test_gateway_leases import Etcd, shared_etcd  # noqa: F401  (a module fixture)

executed: list[str] = []
_lock = threading.Lock()
_n = iter(range(1, 10_000))


@flow(name="wr-noop", persist_result=False)
def noop(i: int) -> int:
    with _lock:
        executed.append(str(flow_run.get_id()))
    return i


hang = threading.Event()  # the first attempt of wr-hang waits on it: a runner frozen mid-run
lost_on_thaw: list[str | None] = []


@flow(name="wr-hang", persist_result=False)
def hangs_first(lock: str) -> int:
    with _lock:
        executed.append(str(flow_run.get_id()))
        attempt = executed.count(str(flow_run.get_id()))
    with exclusive(lock):  # held by the frozen attempt, as a failover holds roles-<group>
        if attempt == 1:
            hang.wait(120)
            # Thawed: a runbook's next step asks first whether the run is still its own.
            lost = liveness.lost_reason()
            lost_on_thaw.append(lost)
            if lost is not None:
                raise Abort(lost)
    return attempt


def _deployment(pool: str, flow_name: str = "wr-noop") -> UUID:
    async def make() -> UUID:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow_id = await client.create_flow_from_name(flow_name)
            return await client.create_deployment(
                flow_id=flow_id, name=pool, work_pool_name=pool,
                entrypoint="tests/test_warm_runner.py:noop")
    return asyncio.run(make())


def _runs(deployment: UUID, count: int, **params: Any) -> list[UUID]:
    async def make() -> list[UUID]:
        async with get_client() as client:
            return [(await client.create_flow_run_from_deployment(
                deployment, parameters=params or {"i": i})).id for i in range(count)]
    return asyncio.run(make())


def _states(ids: list[UUID]) -> dict[UUID, str]:
    async def read() -> dict[UUID, str]:
        async with get_client() as client:
            return {i: (await client.read_flow_run(i)).state_type.value  # type: ignore[union-attr]
                    for i in ids}
    return asyncio.run(read())


def _runner(pool: str, etcd: Client | None, poll_s: float) -> tuple[WarmRunner, threading.Thread]:
    wr = WarmRunner("unused.yaml", pool, etcd, poll_s=poll_s, name=f"{pool}-{next(_n)}")
    wr.flows = {"wr-noop": noop, "wr-hang": hangs_first}
    t = threading.Thread(target=wr.serve, daemon=True)
    t.start()
    return wr, t


@pytest.fixture
def pool(prefect_api: str) -> Iterator[tuple[str, UUID]]:
    name = f"wr-pool-{next(_n)}"
    yield name, _deployment(name)


def test_dispatch_keys_name_the_run() -> None:
    rid = UUID("12345678-1234-5678-1234-567812345678")
    assert run_id_of(dispatch_key("drflow-dr", str(rid))) == rid
    assert run_id_of("/drflow/dispatch/drflow-dr/not-a-run") is None


def test_two_runners_take_pushed_runs_at_once_and_each_run_once(
        pool: tuple[str, UUID], shared_etcd: Etcd) -> None:  # noqa: F811
    name, deployment = pool
    claimed: dict[UUID, float] = {}
    runners = [_runner(name, shared_etcd.client(), poll_s=300) for _ in range(2)]
    for wr, _ in runners:
        wr.on_claimed = lambda rid: claimed.__setitem__(rid, time.time())
    try:
        time.sleep(1.0)  # both have polled once (nothing yet) and watch etcd
        ids = _runs(deployment, 12)
        pushed_at = {}
        for rid in ids:
            pushed_at[rid] = time.time()
            dispatch(shared_etcd.client(), name, str(rid), "wr-noop/" + name, f"k{rid}")
        wait_for(lambda: set(_states(ids).values()) == {"COMPLETED"}, 60,
                 "every pushed run completed", 0.2)
        # The next poll is five minutes away: only the push through etcd can have brought them.
        # How fast a push is taken is measured by benchmarks/failover.py, not asserted here.
        assert set(claimed) == set(ids)
        waits = sorted(claimed[r] - pushed_at[r] for r in ids)
        assert waits[-1] < 60.0, waits
        counts = Counter(executed)
        assert all(counts[str(r)] == 1 for r in ids), counts
        # A run's thread ends just after its COMPLETED state is written.
        wait_for(lambda: all(not wr.running() for wr, _ in runners), 10,
                 "the runners' run threads ended", 0.1)
    finally:
        for wr, t in runners:
            wr.stop()
            t.join(10)
            wr.close()


def test_the_run_of_a_runner_that_is_gone_is_run_again_by_another_with_its_slot(
        prefect_api: str, shared_etcd: Etcd) -> None:  # noqa: F811
    name = f"wr-pool-{next(_n)}"
    deployment = _deployment(name, "wr-hang")
    lock = f"wr-lock-{next(_n)}"
    ensure_limit(lock)
    runners = [_runner(name, shared_etcd.client(), poll_s=300) for _ in range(2)]
    hang.clear()
    try:
        time.sleep(1.0)
        (rid,) = _runs(deployment, 1, lock=lock)
        dispatch(shared_etcd.client(), name, str(rid), "wr-hang/" + name, "k")
        first = wait_for(lambda: next((r for r in runners if rid in r[0].running()), None), 30,
                         "a runner executing the run")
        wait_for(lambda: Counter(executed)[str(rid)] == 1, 30, "the first attempt started")
        time.sleep(1.0)  # inside its lock
        other = next(r for r in runners if r is not first)
        # The executing runner is lost: it renews nothing, takes nothing, its thread is stuck.
        first[0].stop()
        assert first[0].liveness is not None
        first[0].liveness.stop()
        t_lost = time.monotonic()
        wait_for(lambda: _states([rid])[rid] == "COMPLETED", 60, "the run completed elsewhere")
        took = time.monotonic() - t_lost
        assert Counter(executed)[str(rid)] == 2  # the frozen attempt, and the re-run
        wait_for(lambda: not other[0].running(), 10, "the re-run's thread done")
        # The frozen runner thaws: it finds the run taken over, stops, and leaves its state.
        hang.set()
        wait_for(lambda: not first[0].running(), 10, "the frozen attempt's thread done")
        assert lost_on_thaw and lost_on_thaw[-1] is not None and "taken it over" in \
            lost_on_thaw[-1], lost_on_thaw
        assert _states([rid])[rid] == "COMPLETED"
        # Not the 60-70 s of the dead holder's slot lease running out: released at once.
        assert took < 20, took
    finally:
        hang.set()
        for wr, t in runners:
            wr.stop()
            t.join(10)
            wr.close()


def test_an_adoption_cut_short_by_an_api_error_is_tried_again_not_left_marked(
        prefect_api: str, shared_etcd: Etcd) -> None:  # noqa: F811
    # The survivor marks the lost runner's run, then Prefect fails to set it SCHEDULED (an API
    # replica restarting: produced here by one failing call). Its mark must not stay on a run it
    # does not execute: every runner would take the run as someone's, and nobody would run it.
    name = f"wr-pool-{next(_n)}"
    deployment = _deployment(name, "wr-hang")
    lock = f"wr-lock-{next(_n)}"
    ensure_limit(lock)
    first = _runner(name, shared_etcd.client(), poll_s=300)
    other = _runner(name, shared_etcd.client(), poll_s=1.0)
    hang.clear()
    failed: list[str] = []
    real_client = other[0]._client

    @contextmanager
    def flaky() -> Iterator[Any]:
        with real_client() as client:
            real_set = client.set_flow_run_state

            def set_state(*args: Any, **kwargs: Any) -> Any:
                if not failed:
                    failed.append("once")
                    raise httpx.ConnectError("the API replica went away")
                return real_set(*args, **kwargs)
            client.set_flow_run_state = set_state  # type: ignore[method-assign]
            yield client
    try:
        time.sleep(1.0)
        (rid,) = _runs(deployment, 1, lock=lock)
        assert first[0].take(rid)
        wait_for(lambda: Counter(executed)[str(rid)] == 1, 30, "the first attempt started")
        other[0]._client = flaky  # type: ignore[method-assign]
        first[0].stop()
        assert first[0].liveness is not None
        first[0].liveness.stop()  # lost: its mark lapses with its lease
        wait_for(lambda: _states([rid])[rid] == "COMPLETED", 40, "the run completed elsewhere")
        assert failed == ["once"], "the adoption never met the failing call"
        assert Counter(executed)[str(rid)] == 2
    finally:
        hang.set()
        for wr, t in (first, other):
            wr.stop()
            t.join(10)
            wr.close()


def test_a_runners_own_mark_on_a_run_it_does_not_execute_does_not_keep_the_run_from_it(
        pool: tuple[str, UUID], shared_etcd: Etcd) -> None:  # noqa: F811
    # An adoption that died between its mark and its run (the runner's thread, not the
    # runner) leaves this runner's mark on a RUNNING run nobody executes: its poll must see the
    # run as unmarked and adopt it, not take the mark for someone's.
    from prefect.states import Running

    from drflow.liveness import Liveness
    from orchestrator.warm_runner import PID_PREFIX, RUNNERS_PREFIX, UNMARKED_GRACE_S

    name, deployment = pool
    (rid,) = _runs(deployment, 1)

    async def orphan() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(rid, Running(), force=True)
            await client.update_flow_run(rid, infrastructure_pid=f"{PID_PREFIX}gone:1")
    asyncio.run(orphan())
    wr = WarmRunner("unused.yaml", name, shared_etcd.client(), poll_s=300,
                    name=f"{name}-{next(_n)}")
    wr.flows = {"wr-noop": noop}
    wr.liveness = Liveness(shared_etcd.client(), RUNNERS_PREFIX + wr.name, 3, name).start()
    try:
        assert wr._mark(rid)  # the half-done adoption's mark
        time.sleep(UNMARKED_GRACE_S + 0.5)
        with wr._client() as client:
            assert wr._unmarked(client) == [rid]
        assert wr.adopt(rid)
        wait_for(lambda: _states([rid])[rid] == "COMPLETED", 30, "the run completed")
        assert Counter(executed)[str(rid)] == 1
    finally:
        wr.join(10)
        wr.close()


def test_a_runner_that_read_a_run_before_another_ran_it_does_not_run_it_again(
        pool: tuple[str, UUID], shared_etcd: Etcd) -> None:  # noqa: F811
    # Prefect takes PENDING even on a COMPLETED run: B reads the run as SCHEDULED, A claims,
    # runs and completes it, then B's claim arrives. B must not run it a second time.
    name, deployment = pool
    (a, ta), (b, tb) = [_runner(name, shared_etcd.client(), poll_s=300) for _ in range(2)]
    try:
        time.sleep(1.0)
        (rid,) = _runs(deployment, 1)
        done = threading.Event()
        a.on_claimed = lambda _rid: threading.Thread(
            target=lambda: (wait_for(lambda: _states([rid])[rid] == "COMPLETED", 30, "done"),
                            done.set()), daemon=True).start()
        b._prefetch = lambda *_: done.wait(5)  # type: ignore[method-assign]
        tb_take = threading.Thread(target=b.take, args=(rid,))
        tb_take.start()
        time.sleep(0.3)  # B has read the run
        a.take(rid)
        tb_take.join(30)
        wait_for(lambda: _states([rid])[rid] == "COMPLETED" and not a.running()
                 and not b.running(), 30, "the run done")
        assert Counter(executed)[str(rid)] == 1, Counter(executed)[str(rid)]
    finally:
        for wr, t in ((a, ta), (b, tb)):
            wr.stop()
            t.join(10)
            wr.close()


def test_a_run_nobody_pushed_is_found_by_the_poll(pool: tuple[str, UUID]) -> None:
    name, deployment = pool
    wr, t = _runner(name, None, poll_s=0.3)
    try:
        ids = _runs(deployment, 2)
        wait_for(lambda: set(_states(ids).values()) == {"COMPLETED"}, 60,
                 "the runs completed after a poll", 0.2)
        assert all(Counter(executed)[str(r)] == 1 for r in ids)
    finally:
        wr.stop()
        t.join(10)


def test_a_run_of_a_flow_the_runner_does_not_know_is_left_alone(
        pool: tuple[str, UUID]) -> None:
    name, deployment = pool
    wr, t = _runner(name, None, poll_s=0.3)
    wr.flows = {}
    try:
        ids = _runs(deployment, 1)
        time.sleep(1.5)
        assert _states(ids) == {ids[0]: "SCHEDULED"}
    finally:
        wr.stop()
        t.join(10)


def test_watch_gives_each_change_and_returns_when_quiet(shared_etcd: Etcd) -> None:  # noqa: F811
    c = shared_etcd.client()
    prefix = f"/wr-watch-{next(_n)}/"
    rev = c.put(prefix + "before", "0")
    seen: list[tuple[str, str]] = []

    def later() -> None:
        time.sleep(0.3)
        c.put(prefix + "a", "1")
        c.delete(prefix + "a")
    threading.Thread(target=later).start()
    t0 = time.monotonic()
    for _, events in c.watch(prefix, rev, idle_s=1.0):
        seen += [(kind, kv.key.removeprefix(prefix)) for kind, kv in events]
    assert seen == [("PUT", "before"), ("PUT", "a"), ("DELETE", "a")]
    assert 1.0 <= time.monotonic() - t0 < 5


def test_watch_of_a_compacted_revision_says_so(shared_etcd: Etcd) -> None:  # noqa: F811
    c = shared_etcd.client()
    prefix = f"/wr-watch-{next(_n)}/"
    old = c.put(prefix + "x", "1")
    new = c.put(prefix + "x", "2")
    c.call("/kv/compaction", {"revision": str(new)})
    with pytest.raises(EtcdError, match="cancelled"):
        for _ in c.watch(prefix, old, idle_s=1.0):
            pass


def test_watch_without_a_member_fails_fast() -> None:
    c = Client("http://127.0.0.1:9", timeout=0.5)
    with pytest.raises(EtcdError, match="did not take a watch"):
        next(iter(c.watch("/x/", 1, idle_s=0.5)))


def test_an_answer_that_is_no_etcd_object_is_an_etcd_error() -> None:
    # A proxy or something else on the port: JSON, but not etcd's objects.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Odd(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            code = 404 if self.path.endswith("/kv/put") else 200
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"[1, 2]")

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = Client(f"http://127.0.0.1:{server.server_address[1]}", timeout=2)
        with pytest.raises(EtcdError, match="refused /kv/put: HTTP 404"):
            c.put("/x", "1")
        with pytest.raises(EtcdError, match="no object"):
            c.get("/x")
    finally:
        server.shutdown()


def test_a_warm_start_leaves_no_warm_up_run_and_runs_start_named(prefect_api: str) -> None:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterName

    from orchestrator.embedded import WARM_STEP, run_labelled, warm_prefect

    warm_prefect()
    warm_prefect()  # each start warms again: none of them is left
    time.sleep(1.0)  # a task run's events recorded late would show by now
    with get_client(sync_client=True) as client:
        assert client.read_flow_runs(flow_filter=FlowFilter(
            name=FlowFilterName(any_=["warm-up"]))) == []
        assert client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(any_=[WARM_STEP]))) == []

    # The warm path's runs are created with their name and tags (no rename after).
    assert run_labelled(noop, {"i": 7}, "failover orders failover:orders:9",
                        ["drflow", "group:orders"]) == 7
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["wr-noop"])))
    named = [r for r in runs if r.name == "failover orders failover:orders:9"]
    assert len(named) == 1 and set(named[0].tags) == {"drflow", "group:orders"}
    assert named[0].state is not None and named[0].state.is_completed()
