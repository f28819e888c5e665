"""HTTP surface of the gateway (FastAPI) and helpers to serve it with uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from drflow.etcd import EtcdError
from orchestrator.gateway.console import register_console
from orchestrator.gateway.contracts import Alerter, AuditSink, IncidentStarter
from orchestrator.gateway.http_server import BodyReadTimeout, server_config
from orchestrator.gateway.intake import (
    JsonLimits,
    Rejection,
    authenticate,
    check_member,
    parse_event,
    parse_model,
    read_body,
    require_json,
)
from orchestrator.gateway.roles import RolesService, register_roles
from orchestrator.gateway.service import GatewayService
from orchestrator.gateway.settings import GatewaySettings
from orchestrator.gateway.slack_actions import register_slack_actions
from orchestrator.gateway.status import start_status, with_status

log = logging.getLogger("drflow.gateway")


class CloseIncident(BaseModel):
    """Body of `POST /v1/groups/{group}/incident/close` (signed like an event)."""

    model_config = ConfigDict(extra="forbid")

    idempotency_key: str = Field(min_length=1, max_length=300)
    outcome: str = Field(default="closed", min_length=1, max_length=100)
    reason: str = Field(default="", max_length=2000)


def create_app(
    settings: GatewaySettings,
    starter: IncidentStarter,
    audit: AuditSink | None = None,
    alerter: Alerter | None = None,
) -> FastAPI:
    """The gateway app. Its GatewayService is `app.state.gateway` (started by the lifespan)."""
    service = GatewayService(settings, starter, audit, alerter)
    secret = settings.secret_bytes()
    # Roles record and re-protect trigger (roles.py); set `app.state.roles.starter` to let the
    # gateway start re-protect runs itself.
    roles = RolesService(settings, service, audit)
    service.event_hooks.append(roles.on_event)
    service.close_hooks.append(roles.on_close)

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        # The groups' status refreshed in the background, when a provider is installed.
        group_status = await start_status(app_, service)
        try:
            yield
        finally:
            if group_status is not None:
                await group_status.stop()
            await service.stop()
            roles.close()
            slack.close()

    app = FastAPI(
        title="drflow gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = service
    app.state.roles = roles
    app.add_middleware(BodyReadTimeout, timeout_s=settings.body_timeout_s)
    register_roles(app, roles, settings)
    slack = register_slack_actions(app, settings, service, audit)
    app.state.slack_actions = slack
    register_console(app, service, audit, alerter)  # GET /console: read-only pages
    limits = JsonLimits(settings.max_json_depth, settings.max_json_elements)

    def refused(rejection: Rejection, request: Request) -> JSONResponse:
        service.refuse(rejection, request.url.path, request.client.host if request.client else None)
        return JSONResponse(rejection.body(), status_code=rejection.status,
                            headers=rejection.headers())

    @app.exception_handler(EtcdError)
    async def state_unavailable(request: Request, exc: EtcdError) -> JSONResponse:
        # Shared state (state_in_etcd) out of reach mid-request: the request did not complete
        # (an event is not kept as seen: accept()); the agent's outbox keeps the event and tries
        # again, or gives it to another replica. The cause names etcd's addresses: it goes to
        # the gateway's log, not to the client.
        log.warning("%s %s: the shared state in etcd failed: %s", request.method,
                    request.url.path, exc)
        return refused(Rejection(503, "state_unavailable", "the gateway's shared state in etcd "
                                 "is out of reach; the request was not completed: try again"),
                       request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 (query and path parameters) would echo the input, whatever its size.
        errors = [{"field": ".".join(str(p)[:64] for p in e.get("loc", ()))[:200],
                   "message": str(e.get("msg", ""))[:200]} for e in exc.errors()[:20]]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return refused(Rejection(422, "malformed", f"invalid request: {summary}", errors), request)

    @app.post("/v1/events")
    async def post_event(request: Request) -> JSONResponse:
        """A signed agent webhook: 202 accepted, or a 4xx that changes nothing."""
        try:
            body = await read_body(request, settings.max_body_bytes)
            sig = authenticate(secret, request.headers, body, settings.signature_window_s)
            require_json(request.headers)
            event = parse_event(body, limits)
            check_member(settings, event.group, event.agent_id)
            accepted = await service.accept_event(event, sig)
        except Rejection as rejection:
            return refused(rejection, request)
        return JSONResponse(accepted.body(), status_code=202)

    @app.post("/v1/groups/{group}/incident/close")
    async def close_incident(group: str, request: Request) -> JSONResponse:
        """Signed call from the failover flow: the incident is over, the next one may open."""
        try:
            body = await read_body(request, settings.max_body_bytes)
            authenticate(secret, request.headers, body, settings.signature_window_s)
            req: CloseIncident = parse_model(CloseIncident, body, "close request", limits)
            rec = await service.close_incident(group, req.idempotency_key, req.outcome, req.reason)
        except Rejection as rejection:
            return refused(rejection, request)
        return JSONResponse(
            {"closed": rec.incident.idempotency_key, "outcome": req.outcome, "run_id": rec.run_id}
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/groups")
    async def groups() -> JSONResponse:
        # With `app.state.group_status` set, plus each group's status and roles (status.py).
        return JSONResponse(await with_status(app, await service.groups()))

    return app


def server(
    settings: GatewaySettings,
    starter: IncidentStarter,
    host: str = "127.0.0.1",
    port: int = 8088,
    audit: AuditSink | None = None,
    alerter: Alerter | None = None,
    log_level: str = "info",
) -> uvicorn.Server:
    """The gateway's server: `.run()` blocks until SIGINT/SIGTERM, `await .serve()` runs it in
    an event loop that is already running (embedded mode)."""
    app = create_app(settings, starter, audit, alerter)
    return uvicorn.Server(server_config(app, settings, host, port, log_level))


def run(settings: GatewaySettings, starter: IncidentStarter, **options: Any) -> None:
    """Serve the gateway until SIGINT/SIGTERM (blocking); `options` as for `server`."""
    server(settings, starter, **options).run()


__all__ = ["CloseIncident", "create_app", "run", "server"]
