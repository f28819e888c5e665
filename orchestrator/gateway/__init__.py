"""The gateway: signed agent webhooks in, exactly one failover run per incident out.

HTTP API (loopback; POST bodies signed like agent events, `drflow.signing`):

- `POST /v1/events` — a HealthEvent. 202 `{status, event_id, action, reason, incident}`;
  413 oversized (checked before anything else), 401 unsigned / bad_signature / stale, 422
  malformed (`errors[].field`), 404 unknown group, 409 duplicate (event_id seen) or replayed
  (signature seen). Every refusal is `{detail, reason}`, changes nothing and is audited.
- `POST /v1/groups/{group}/incident/close` — `{idempotency_key, outcome?, reason?}`: the failover
  flow ends the group's open incident so the next one may open. 200, or 409 if that key is not
  the open incident. In-process: `app.state.gateway.close_incident(...)` (on the gateway's
  loop) or `close_incident_threadsafe(...)` (from any thread).
- `GET /healthz`, `GET /metrics` (Prometheus), `GET /v1/groups` (primary agent, heartbeat ages,
  open incident per group; `leases`: leader holder and sync standby, with etcd configured).
- `GET /v1/groups/{group}/roles?nonce=…` — which side serves, protected or not, both sides; an
  open read whose answer is signed and echoes the nonce (agents check it on boot).
  `POST /v1/groups/{group}/roles` — signed like events: a flow reports roles it changed. A
  failover closed as `failed_over` flips the record; an old primary's agent reporting in then
  starts one re-protect run (roles.py; `app.state.roles.starter`).
- `POST /slack/actions` — Slack's signed interactions (v0, 300 s): Approve / Reject of a failback
  resumes its paused run once, whatever the clicks (slack_actions.py).

Incidents: the group's current primary silent for `heartbeat_timeout_s`, its
`recovery_exhausted`, or its leader key gone from etcd (`lease_expired`, leases.py). Each gets
the key `failover:{group}:{epoch}`; the epoch advances only after the previous incident is
closed, so a group has at most one incident (one failover run) open.
"""

from orchestrator.gateway.app import CloseIncident, create_app, run, server
from orchestrator.gateway.contracts import Incident, IncidentKind
from orchestrator.gateway.decide import Action, Decision, Role, decide_incident
from orchestrator.gateway.service import GatewayService
from orchestrator.gateway.settings import GatewaySettings, GroupPolicy

__all__ = [
    "Action",
    "CloseIncident",
    "Decision",
    "GatewayService",
    "GatewaySettings",
    "GroupPolicy",
    "Incident",
    "IncidentKind",
    "Role",
    "create_app",
    "decide_incident",
    "run",
    "server",
]
