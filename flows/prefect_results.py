"""Where the runbooks' flows would keep their results, named so that no run asks for it.

The runbooks do not persist results (`persist_result=False`), yet Prefect's engine resolves a
result storage for every flow run, and unless the flow names one it asks the server for its
default: one more round trip before the first step. Twenty failovers starting together on a
loaded server wait seconds for it. A local path costs nothing to resolve and is never written.
"""

from __future__ import annotations

from pathlib import Path

from prefect.settings import get_current_settings

RESULTS = Path(get_current_settings().results.local_storage_path)
