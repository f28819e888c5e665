"""Where the gateway keeps what it decides with: this replica's SQLite file, or etcd (shared)."""

from __future__ import annotations

from drflow.etcd import Client
from orchestrator.gateway.etcd_state import EtcdGatewayStore, EtcdLedgerStore, EtcdRolesStore
from orchestrator.gateway.ledger_store import LedgerStore
from orchestrator.gateway.roles_store import RolesStore
from orchestrator.gateway.settings import GatewaySettings
from orchestrator.gateway.store import GatewayStore

IncidentState = GatewayStore | EtcdGatewayStore
RolesState = RolesStore | EtcdRolesStore
LedgerState = LedgerStore | EtcdLedgerStore


def _client(settings: GatewaySettings) -> Client:
    return Client(settings.etcd_endpoints, settings.etcd_timeout_s)


def open_incident_state(settings: GatewaySettings) -> IncidentState:
    if settings.state_in_etcd:
        return EtcdGatewayStore(_client(settings), settings.dedupe_retention_s,
                                settings.signature_window_s + 60, settings.incident_hold_down_s)
    return GatewayStore(settings.state_path)


def open_roles_state(settings: GatewaySettings) -> RolesState:
    return EtcdRolesStore(_client(settings)) if settings.state_in_etcd else RolesStore(
        settings.state_path)


def open_ledger_state(settings: GatewaySettings) -> LedgerState:
    return EtcdLedgerStore(_client(settings)) if settings.state_in_etcd else LedgerStore(
        settings.state_path)
