"""The roles record: which side of each protection group serves, and whether it is protected.

Agents ask it on boot before starting PostgreSQL (`GET /v1/groups/{group}/roles?nonce=…`): the
read is open (it holds no secret; hosts and ports are in DNS anyway) but the answer is signed
with the webhook secret and echoes the caller's nonce, so an agent acts only on a fresh answer
from the gateway. Flows report what they changed (`POST /v1/groups/{group}/roles`, signed like
events). Every failover reports the move itself, whatever started it (the gateway, `drflow
failover`, a worker): `primary_site` = the promoted node's side, unprotected. The close hook of a
gateway incident that ends `failed_over` applies the same absolute move again (for a run that
could not reach this replica): both are idempotent, so the order does not matter.

The record also drives re-protect: when the old primary's agent reports in (its boot report, or
a heartbeat once its side is known) while the group runs unprotected on the other side, the
gateway starts one re-protect run per protection generation (`reprotect:{group}:{seq}`); a
second primary reported at boot is fenced first, then re-protected (a run that is already under
way for the generation fences any writable node it finds anyway).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from drflow.events import HealthEvent
from drflow.signing import sign_headers
from orchestrator.gateway.contracts import AuditSink, append_or_log
from orchestrator.gateway.intake import Rejection, authenticate, parse_model, read_body
from orchestrator.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from orchestrator.gateway.service import GatewayService
from orchestrator.gateway.roles_decide import (
    ProtectAction,
    ProtectDecision,
    RolesRecord,
    RolesUpdate,
    after_failover,
    after_reprotect_failed,
    apply_update,
    decide_protection,
    other_site,
    stale_record,
)
from orchestrator.gateway.state import RolesState, open_roles_state

log = logging.getLogger("drflow.gateway.roles")



# -- the service --------------------------------------------------------------------------------


class ProtectStarter(Protocol):
    """Starts a re-protect run; idempotent on `key` (the same key gives back the same run)."""

    async def start_reprotect(self, group: str, key: str, fence_first: bool, reason: str) -> str:
        ...


class RolesService:
    """Keeps the roles record, answers agents, and starts re-protect runs when one is due."""

    def __init__(self, settings: GatewaySettings, gateway: GatewayService,
                 audit: AuditSink | None = None, starter: ProtectStarter | None = None) -> None:
        self.settings = settings
        self.gateway = gateway
        self.audit = audit
        self.starter = starter
        self._store: RolesState | None = None
        self._store_lock = threading.Lock()

    @property
    def store(self) -> RolesState:
        with self._store_lock:
            if self._store is None:
                self._store = open_roles_state(self.settings)
            return self._store

    def close(self) -> None:
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def record(self, group: str) -> RolesRecord:
        rec = self.store.get(group)
        return rec if rec is not None else self._initial(group)

    def _initial(self, group: str) -> RolesRecord:
        """The record of a group none was stored for: the configured primary serves."""
        policy = self.settings.roster(group)
        home = policy.primary.site if policy.primary else "primary"
        return RolesRecord(group=group, primary_site=home, changed_at=time.time())

    def _change(self, group: str, compute: Callable[[RolesRecord], RolesRecord | None]
                ) -> tuple[RolesRecord, RolesRecord | None]:
        """Store what `compute` makes of the group's record as it is when written (the initial
        record when none is stored): replicas sharing the state each change the record they
        read, and the store calls `compute` again on the newer record when another one wrote
        between the read and the write, so neither change is lost. (The record `compute` was
        last given, the one written or None when it returned None or that record.)"""
        given: list[RolesRecord] = []

        def fn(current: RolesRecord | None) -> RolesRecord | None:
            base = current if current is not None else self._initial(group)
            given[:] = [base]  # the store's last call is the one whose result counts
            return compute(base)

        written = self.store.change(group, fn)
        return given[0], written

    def view(self, group: str, nonce: str) -> dict[str, Any]:
        """The signed answer to an agent or a flow: roles, both sides, and whether in motion."""
        rec = self.record(group)
        policy = self.settings.roster(group)
        nodes = {n.site: n.model_dump() for n in (policy.primary, policy.standby) if n}
        incident = self.gateway.store.open_incident(group)
        return {"group": group, "nonce": nonce, "at": time.time(), **rec.model_dump(),
                "home_site": policy.primary.site if policy.primary else None,
                "standby_site": other_site(policy, rec.primary_site),
                "nodes": nodes,
                "incident_open": incident is not None,
                "in_transition": incident is not None or rec.transition is not None}

    def update(self, group: str, upd: RolesUpdate, actor: str = "flow") -> RolesRecord:
        policy = self.settings.roster(group)
        known = {n.site for n in (policy.primary, policy.standby) if n}
        if upd.primary_site is not None and known and upd.primary_site not in known:
            raise Rejection(422, "malformed", f"primary_site {upd.primary_site!r} is not a side "
                            f"of group {group} ({', '.join(sorted(known))})")
        before, after = self._change(group, lambda rec: apply_update(rec, upd, time.time()))
        assert after is not None, "apply_update always returns a new record"
        self._audit("roles.update", group, {"actor": actor, "before": _brief(before),
                                            "after": _brief(after)}, "ok", after.reason)
        log.warning("group %s roles: %s", group, _brief(after))
        return after

    def evidence(self, group: str, agent_id: str, nonce: str) -> dict[str, Any]:
        """What `agent_id`'s heartbeats last said about replication (for a manual failover)."""
        ev, heard = self.gateway.replication_evidence(group, agent_id)
        return {"group": group, "agent_id": agent_id, "nonce": nonce, "at": time.time(),
                "evidence": {**ev, "agent_id": agent_id, "last_heard_at": heard}}

    # -- hooks from the gateway service (on its state thread) --------------------------------

    def on_close(self, group: str, key: str, outcome: str, reason: str) -> None:
        """A failover incident closed: `failed_over` means the group serves from the side that
        is not the failed agent's (absolute, so applying it after the flow's own report, or
        twice, changes nothing)."""
        if outcome != "failed_over":
            return
        incident = self.gateway.store.incident(key)
        failed = incident.incident.evidence.get("agent_id") if incident else None
        failed_site = self._site_by_vm(group, failed) if isinstance(failed, str) else None
        if isinstance(failed, str) and failed_site is None:
            failed_site = self.store.agent_site(group, failed)
        new_site = other_site(self.settings.roster(group), failed_site) if failed_site else None
        if new_site is None:
            # Never toggle blindly: the flow reports the move itself.
            log.error("group %s failed over (%s) but the failed agent's side is unknown: the "
                      "roles record is left to the flow's report", group, key)
            return
        why = f"failover {key}: {reason or outcome}"
        before, after = self._change(
            group, lambda rec: after_failover(rec, new_site, why, time.time()))
        if after is None:
            return
        self._audit("roles.update", group, {"actor": "gateway", "incident": key,
                                            "before": _brief(before), "after": _brief(after)},
                    "ok", after.reason)

    def on_event(self, event: HealthEvent) -> None:
        group = event.group
        if group not in self.settings.groups:
            return
        report = event.details.get("drflow_boot")
        report = report if isinstance(report, str) else None
        site = event.details.get("site") if report else None
        if isinstance(site, str) and site:
            if self.store.agent_site(group, event.agent_id) != site:
                self.store.set_agent_site(group, event.agent_id, site)
        else:
            site = self.store.agent_site(group, event.agent_id) or self._site_by_vm(
                group, event.agent_id)
        policy = self.settings.roster(group)
        peer_writable = bool(event.details.get("peer_writable")
                             or event.details.get("leader_elsewhere"))
        incident_open = self.gateway.store.open_incident(group) is not None
        # What the store's last call of `compute` decided: the call whose record was written.
        decided: dict[str, Any] = {}

        def compute(rec: RolesRecord) -> RolesRecord | None:
            """The stale record corrected, then protection lost and the re-protect run of the
            generation claimed if this report calls for one: decided on, and written as, one
            record, so that replicas taking reports at once claim each run once."""
            corrected = stale_record(rec, policy, agent_site=site, report=report,
                                     peer_writable=peer_writable)
            now_rec = corrected or rec
            decision = decide_protection(now_rec, agent_id=event.agent_id, agent_site=site,
                                         report=report, incident_open=incident_open,
                                         now=time.time())
            decided.update(decision=decision, claimed=False)
            if decision.action is ProtectAction.NONE or decision.key is None:
                return corrected
            if now_rec.protected:
                now_rec = apply_update(now_rec, RolesUpdate(protected=False,
                                                            reason=decision.reason), time.time())
            if now_rec.reprotect_key == decision.key:
                # Started already (decide_protection does not look, for a second primary).
                return corrected
            decided["claimed"] = True
            return now_rec.model_copy(update={"reprotect_key": decision.key})

        before, written = self._change(group, compute)
        decision: ProtectDecision = decided["decision"]
        if written is not None and _brief(written) != _brief(before):
            self._audit("roles.update", group, {"actor": f"agent:{event.agent_id}",
                                                "before": _brief(before),
                                                "after": _brief(written)},
                        "ok", written.reason)
        if report:
            self._audit("roles.boot_report", group,
                        {"agent_id": event.agent_id, "site": site, "report": report,
                         "decision": decision.action.value}, "recorded", decision.reason)
        if not decided["claimed"] or decision.key is None:
            return
        self._audit("roles.reprotect", group, {"idempotency_key": decision.key,
                                               "agent_id": event.agent_id,
                                               "action": decision.action.value},
                    "started" if self.starter else "no_starter", decision.reason)
        if self.starter is None:
            log.warning("%s; no re-protect starter configured: run `drflow reprotect %s`",
                        decision.reason, group)
            return
        self.gateway.spawn(self._start(group, decision))

    def reprotect_finished(self, group: str, key: str, outcome: str, reason: str) -> None:
        """A re-protect run ended (any thread). One that did not protect the group frees the
        generation for another attempt after a back-off, started by the old primary's agent's
        next report: the group must not stay unprotected because one attempt failed."""
        if outcome == "protected":
            return
        _, rec = self._change(group,
                              lambda r: after_reprotect_failed(r, key, outcome, time.time()))
        if rec is not None:
            self._audit("roles.reprotect", group,
                        {"idempotency_key": key, "failures": rec.reprotect_failures},
                        "retry_later", f"{rec.reason} ({reason[:300]})")

    def _site_by_vm(self, group: str, agent_id: str) -> str | None:
        """Agents commonly take their VM's name as agent id (the lab's do)."""
        roster = self.settings.roster(group)
        return next((n.site for n in (roster.primary, roster.standby)
                     if n is not None and n.vm == agent_id), None)

    async def _start(self, group: str, decision: ProtectDecision) -> None:
        assert self.starter is not None and decision.key is not None
        try:
            run = await self.starter.start_reprotect(
                group, decision.key, decision.action is ProtectAction.FENCE_AND_REPROTECT,
                decision.reason)
            log.warning("group %s: re-protect %s started (%s)", group, decision.key, run)
        except Exception as exc:
            log.exception("starting re-protect %s failed", decision.key)
            self._audit("roles.reprotect", group, {"idempotency_key": decision.key}, "failed",
                        f"{type(exc).__name__}: {exc}"[:500])

    def _audit(self, action: str, target: str, params: dict[str, Any], outcome: str,
               reason: str) -> None:
        append_or_log(self.audit, action, target, params, outcome, reason)


def _brief(rec: RolesRecord) -> dict[str, Any]:
    return {"primary_site": rec.primary_site, "protected": rec.protected, "seq": rec.seq,
            "transition": rec.transition}


# -- HTTP ---------------------------------------------------------------------------------------


def register_roles(app: FastAPI, roles: RolesService, settings: GatewaySettings) -> None:
    """Add `GET` and `POST /v1/groups/{group}/roles` to the gateway app."""
    secret = settings.secret_bytes()
    service = roles.gateway

    @app.get("/v1/groups/{group}/roles")
    async def get_roles(group: str, request: Request,
                        nonce: str = Query(default="", max_length=100)) -> Response:
        """Open read, signed answer (echoes `nonce`): what an agent checks on boot."""
        if group not in settings.groups:
            rejection = Rejection(404, "unknown_group", f"unknown protection group {group!r}")
            service.refuse(rejection, request.url.path,
                           request.client.host if request.client else None)
            return JSONResponse(rejection.body(), status_code=404)
        body = json.dumps(await service.in_state(roles.view, group, nonce)).encode()
        return Response(body, media_type="application/json", headers=sign_headers(secret, body))

    @app.get("/v1/groups/{group}/evidence")
    async def get_evidence(group: str, request: Request,
                           agent_id: str = Query(default="", max_length=200),
                           nonce: str = Query(default="", max_length=100)) -> Response:
        """Signed read for a runbook (signed answer, echoes `nonce`): the failed primary's last
        replication reports, which only the gateway holds."""
        try:
            authenticate(secret, request.headers, b"", settings.signature_window_s)
            if group not in settings.groups:
                raise Rejection(404, "unknown_group", f"unknown protection group {group!r}")
            if not agent_id:
                raise Rejection(422, "malformed", "agent_id is required")
        except Rejection as rejection:
            service.refuse(rejection, request.url.path,
                           request.client.host if request.client else None)
            return JSONResponse(rejection.body(), status_code=rejection.status)
        body = json.dumps(await service.in_state(roles.evidence, group, agent_id, nonce)).encode()
        return Response(body, media_type="application/json", headers=sign_headers(secret, body))

    @app.post("/v1/groups/{group}/roles")
    async def post_roles(group: str, request: Request) -> JSONResponse:
        """Signed call from a flow: the roles it changed."""
        try:
            body = await read_body(request, settings.max_body_bytes)
            authenticate(secret, request.headers, body, settings.signature_window_s)
            if group not in settings.groups:
                raise Rejection(404, "unknown_group", f"unknown protection group {group!r}")
            upd: RolesUpdate = parse_model(RolesUpdate, body, "roles update")
            rec = await service.in_state(roles.update, group, upd)
        except Rejection as rejection:
            service.refuse(rejection, request.url.path,
                           request.client.host if request.client else None)
            return JSONResponse(rejection.body(), status_code=rejection.status)
        return JSONResponse(rec.model_dump())

__all__ = ["ProtectStarter", "RolesService", "register_roles"]
