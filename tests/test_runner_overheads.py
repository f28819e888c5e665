"""What a warm runner must not pay again for every run: TLS contexts, Prefect settings."""

from __future__ import annotations

import ssl

import pytest

import flows  # noqa: F401  (installs the shared context, as every runbook process does)
from flows import prefect_tls


def test_prefect_clients_build_their_tls_context_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never contacted
    from prefect.client.orchestration import get_client

    built: list[object] = []
    real = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        built.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    prefect_tls._context.cache_clear()
    for _ in range(5):
        get_client(sync_client=True)
        get_client()
    assert len(built) == 1, f"{len(built)} TLS contexts built for 10 Prefect clients"


def test_the_shared_context_still_verifies_servers() -> None:
    ctx = prefect_tls._create_default_context(cafile=None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert prefect_tls._create_default_context(cafile=None) is ctx
    assert prefect_tls._create_default_context(ssl.Purpose.CLIENT_AUTH) is not ctx


def test_runs_without_heartbeats_reuse_one_settings_object(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Settings

    from orchestrator.embedded import no_heartbeats

    copies: list[object] = []
    real = Settings.copy_with_update

    def counting(self: Settings, *args: object, **kwargs: object) -> Settings:
        copies.append(args)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Settings, "copy_with_update", counting)
    seen = set()
    for _ in range(5):
        with no_heartbeats():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
            import prefect.context
            seen.add(id(prefect.context.get_settings_context().settings))
    assert len(copies) <= 1 and len(seen) == 1
