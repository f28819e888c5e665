"""The console for the person on call: `GET /console`, one page per group, served by the gateway.

Read-only. It shows what `GET /v1/groups` knows (the same functions: `service.groups()` and
`status.with_status`), each group's runbook history from the audit trail with RTO/RPO charts, and
whether the audit trail verifies. Pages are rendered on the server (Jinja2) and refresh
themselves by polling a small JSON endpoint every second; the one chart library (uPlot, MIT) is
vendored in console_static/, so the console works with no internet and no build step.
What to show is decided in console_view.py; this module does the HTTP and the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from orchestrator.gateway import console_view as view
from orchestrator.gateway.console_view import GroupHistory
from orchestrator.gateway.contracts import Alerter, AuditSink
from orchestrator.gateway.service import GatewayService
from orchestrator.gateway.status import with_status

log = logging.getLogger("drflow.gateway.console")

HERE = Path(__file__).parent
STATIC = HERE / "console_static"
# Only these files are served: a path parameter never reaches the file system unchecked.
STATIC_FILES = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
VERIFY_EVERY_S = 30.0  # verification reads the whole trail: often enough, not on every poll
HISTORY_EVERY_S = 0.5  # new audit records are read at most this often, whatever the pollers
# The page must never be framed or fed scripts from elsewhere: it is served beside the API.
HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                      "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"}


class Console:
    """The console's state: the audit trail folded into each group's history, and the last
    verification of the trail. Both are read off the event loop (the store's calls block)."""

    def __init__(self, app: FastAPI, service: GatewayService, audit: AuditSink | None,
                 alerter: Alerter | None) -> None:
        self.app = app
        self.service = service
        # The gateway is handed an AuditSink; reading history and verifying need the store
        # itself (drflow.audit.AuditStore). A sink that cannot be read gives no history.
        self.store: Any = audit if hasattr(audit, "iter_records") else None
        self.can_verify = self.store is not None and hasattr(self.store, "verify")
        # Slack's channel (the alerter's target): with a channel id, approval requests link to
        # their message in Slack.
        target = getattr(alerter, "target", None)
        self.slack_channel: str | None = getattr(target, "channel", None)
        self.history: dict[str, GroupHistory] = {}
        self.seq = 0
        self.read_at = float("-inf")
        self.history_error: str | None = None
        self._read_lock = asyncio.Lock()
        self.verified: Any = None
        self.verified_at: float | None = None
        self.verify_error: str | None = None
        self._verify_task: asyncio.Task[None] | None = None
        self.templates = Environment(loader=FileSystemLoader(HERE / "console_templates"),
                                     autoescape=select_autoescape(["html"]),
                                     trim_blocks=True, lstrip_blocks=True)

    # -- reading the audit trail -----------------------------------------------------------

    async def refresh(self) -> None:
        """Fold the audit records added since the last read (at most every HISTORY_EVERY_S);
        start a verification when the last one is old."""
        if self.store is None:
            return
        self._maybe_verify()
        async with self._read_lock:
            if time.monotonic() - self.read_at < HISTORY_EVERY_S:
                return
            try:
                await asyncio.to_thread(self._read_new)
                self.history_error = None
            except Exception as exc:  # the page still shows the live status
                self.history_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("console: reading the audit trail failed: %s", self.history_error)
            self.read_at = time.monotonic()

    def _read_new(self) -> None:
        # Records are folded as they stream: a long trail is never held in memory at once.
        def new() -> Any:
            for rec in self.store.iter_records(self.seq):
                self.seq = rec.seq
                yield rec

        view.fold(self.history, new())

    def _maybe_verify(self) -> None:
        if not self.can_verify or (self._verify_task and not self._verify_task.done()):
            return
        if self.verified_at is not None and time.time() - self.verified_at < VERIFY_EVERY_S:
            return
        self._verify_task = asyncio.get_running_loop().create_task(self._verify())

    async def _verify(self) -> None:
        try:
            self.verified = await asyncio.to_thread(self.store.verify)
            self.verify_error = None
        except Exception as exc:
            self.verify_error = f"{type(exc).__name__}: {exc}"[:300]
        self.verified_at = time.time()

    # -- what the pages show ----------------------------------------------------------------

    def audit_row(self) -> dict[str, Any]:
        if self.store is None:
            return {"state": "none", "label": "no audit trail is readable here: no history, "
                    "no verification"}
        row = view.verify_row(self.verified, self.verified_at, time.time(), self.verify_error)
        if self.history_error:
            row = {**row, "history_error": f"history unavailable: {self.history_error}"}
        return row

    async def cards(self) -> list[dict[str, Any]]:
        await self.refresh()
        groups = await with_status(self.app, await self.service.groups())
        rosters = self.service.settings.rosters
        ui = view.prefect_ui_url(os.environ)
        now = time.time()
        out = []
        for name in sorted(groups):
            roster = rosters.get(name)
            out.append(view.group_card(
                name, groups[name], self.history.get(name), now, ui=ui,
                approvers=list(roster.approvers) if roster else [],
                approvals_required=roster.approvals_required if roster else 1,
                slack_channel=self.slack_channel))
        return out

    async def overview(self) -> dict[str, Any]:
        cards = await self.cards()
        data = {"generated_at": time.time(), "audit": self.audit_row(),
                "counts": view.overview(cards), "groups": cards}
        data["html"] = self.render("_overview_body.html", **data)
        return data

    async def group(self, name: str) -> dict[str, Any]:
        card = next((c for c in await self.cards() if c["group"] == name), None)
        if card is None:
            raise HTTPException(404, f"no group {name!r} in this gateway's configuration")
        h = self.history.get(name)
        ui = view.prefect_ui_url(os.environ)
        data = {"generated_at": time.time(), "audit": self.audit_row(), "card": card,
                "history": view.history_rows(h, ui), "chart": view.chart_series(h)}
        data["html"] = self.render("_group_body.html", **data)
        data["history_html"] = self.render("_history.html", **data)
        return data

    def render(self, template: str, **context: Any) -> str:
        return self.templates.get_template(template).render(**context, fmt=view)


def register_console(app: FastAPI, service: GatewayService, audit: AuditSink | None = None,
                     alerter: Alerter | None = None) -> Console:
    """Add the console's routes to the gateway's app; `app.state.console` is its state."""
    console = Console(app, service, audit, alerter)
    app.state.console = console

    def page(template: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(console.render(template, **context), headers=HEADERS)

    @app.get("/console", response_class=HTMLResponse)
    async def console_page() -> HTMLResponse:
        return page("overview.html", **await console.overview())

    @app.get("/console/groups/{group}", response_class=HTMLResponse)
    async def console_group(group: str) -> HTMLResponse:
        return page("group.html", **await console.group(group))

    @app.get("/console/api/groups")
    async def console_data() -> JSONResponse:
        return JSONResponse(await console.overview(), headers=HEADERS)

    @app.get("/console/api/groups/{group}")
    async def console_group_data(group: str) -> JSONResponse:
        return JSONResponse(await console.group(group), headers=HEADERS)

    @app.get("/console/static/{name}")
    async def console_static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise HTTPException(404, "no such file")
        # Vendored files change only with the package: let the browser keep them a while.
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name],
                            headers={"Cache-Control": "max-age=300"})

    return console


__all__ = ["Console", "register_console"]
