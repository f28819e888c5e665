"""One TLS context for every Prefect client of this process, instead of one per client.

Prefect 3.9 builds a new `ssl.SSLContext` (loading the whole CA bundle, 50-60 ms of CPU) each
time it creates an API client, and it creates several per flow run: the run itself, each
concurrency-slot service, each release. Five failovers starting together paid for about twenty of
them while the DR site waited. A context is safe to share between clients and threads once
configured, and Prefect configures it the same way every time for the same settings, so the
context is built once per set of arguments and handed back after that.
"""

from __future__ import annotations

import functools
import ssl
import threading
import types
from typing import Any

_installed = False
_lock = threading.Lock()


@functools.cache
def _context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile, capath=capath)


def _create_default_context(purpose: Any = ssl.Purpose.SERVER_AUTH, *, cafile: str | None = None,
                            capath: str | None = None, cadata: Any = None) -> ssl.SSLContext:
    if purpose is not ssl.Purpose.SERVER_AUTH or cadata is not None:
        return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
    return _context(cafile, capath)


def install() -> None:
    """Make Prefect's client module build its TLS context once per arguments (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        from prefect.client import orchestration

        shim = types.ModuleType("ssl")
        shim.__dict__.update(ssl.__dict__)
        shim.create_default_context = _create_default_context  # type: ignore[attr-defined]
        orchestration.ssl = shim  # type: ignore[attr-defined]
        _installed = True
