"""The Prefect server drflow runs retries, inside the server, the requests it answers 503."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from orchestrator.prefect_server import RetryUnavailable


class Busy(Exception):
    pass


def _app(busy_times: int, seen: list[Any]) -> Starlette:
    """A mounted API (as Prefect's is, under /api) whose endpoint is busy `busy_times` times,
    answered 503 by an exception handler that re-raises, as Prefect's server does."""

    async def create(request: Request) -> JSONResponse:
        seen.append(await request.json())
        if len(seen) <= busy_times:
            raise Busy("database is locked")
        return JSONResponse({"created": seen[-1]}, status_code=201)

    async def busy(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"exception_message": "Service Unavailable"}, status_code=503)

    api = Starlette(routes=[Route("/flow_runs/", create, methods=["POST"])],
                    exception_handlers={Busy: busy})
    return Starlette(routes=[Mount("/api", app=api)])


def _post(app: Any, body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://prefect") as c:
            return await c.post("/api/flow_runs/", json=body)
    return asyncio.run(go())


def test_a_busy_request_is_sent_again_with_the_same_body_and_succeeds() -> None:
    seen: list[Any] = []
    app = RetryUnavailable(_app(3, seen), pause_s=(0.0, 0.01))
    t0 = time.monotonic()
    r = _post(app, {"name": "failover-orders", "parameters": {"group": "orders"}})
    assert r.status_code == 201, r.text
    assert r.json() == {"created": {"name": "failover-orders", "parameters": {"group": "orders"}}}
    assert seen == [{"name": "failover-orders", "parameters": {"group": "orders"}}] * 4
    assert app.retries == 3 and app.passed_on == 0
    assert time.monotonic() - t0 < 1.0  # not the client's 2 s + 4 s + 8 s


def test_a_request_still_busy_after_the_budget_gets_its_503() -> None:
    seen: list[Any] = []
    app = RetryUnavailable(_app(10_000, seen), budget_s=0.3, pause_s=(0.02, 0.05))
    t0 = time.monotonic()
    r = _post(app, {"n": 1})
    assert r.status_code == 503  # the client's own back-off takes over from here
    assert r.json() == {"exception_message": "Service Unavailable"}
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert app.passed_on == 1 and len(seen) >= 3


def test_other_answers_pass_through_untouched() -> None:
    seen: list[Any] = []
    app = RetryUnavailable(_app(0, seen))
    assert _post(app, {"n": 2}).status_code == 201

    async def missing() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://prefect") as c:
            return await c.get("/api/nothing")
    assert asyncio.run(missing()).status_code == 404
    assert app.retries == 0 and len(seen) == 1


@pytest.mark.lab
def test_concurrent_flow_starts_on_sqlite_are_not_held_for_seconds(prefect_api: str) -> None:
    """Eight flows started together on the suite's SQLite server: without the retry inside the
    server, some wait 2 s (then 4 s) for the client's retry of a 503."""
    import threading

    from prefect import flow

    from orchestrator.embedded import no_heartbeats

    started: dict[int, float] = {}

    @flow(name="start-probe", persist_result=False)
    def probe(i: int, t0: float) -> None:
        started[i] = time.monotonic() - t0

    def call(i: int, t0: float) -> None:
        with no_heartbeats():
            probe(i, t0)

    call(-1, time.monotonic())
    worst = []
    for _ in range(3):
        started.clear()
        t0 = time.monotonic()
        threads = [threading.Thread(target=call, args=(i, t0)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(started) == 8
        worst.append(max(started.values()))
    assert min(worst) < 1.9, f"slowest start per round: {worst}"
