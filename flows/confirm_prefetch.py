"""The failover's first look at the failed primary, started by the warm runner with the flow.

Starting a flow run costs Prefect round trips: about a second when five groups fail together on a
small machine. The confirm step's two reads (vCenter's view of the VM, a query to the database)
take up to `VM_READ_S` against a site that has gone silent. Both only read, so the runner that
starts the run starts the reads too, and the confirm step takes their answers if they are fresh
(`FRESH_S`): the same observations, a second earlier. They decide nothing alone: the fence is
still the lease's expiry or a power-off proven later in the run.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tasks import postgres as pg
from tasks import vsphere

FRESH_S = 3.0  # older than this, the confirm step looks again
_pool = ThreadPoolExecutor(8, thread_name_prefix="confirm-prefetch")
_lock = threading.Lock()
_pending: dict[str, Prefetch] = {}


@dataclass(frozen=True)
class Prefetch:
    started: float  # monotonic
    vm: Future[vsphere.VmState]
    app: Future[pg.AppCheck]


@dataclass(frozen=True)
class Looks:
    vm: vsphere.VmState
    app: pg.AppCheck
    age_s: float  # since the reads started


def start(key: str, vc: vsphere.VCenter, vm: str, db: pg.Db, vm_read_s: float,
          app_check_s: float) -> None:
    """Start both reads for the run of incident `key` (once per key)."""
    with _lock:
        if key in _pending:
            return
        _pending[key] = Prefetch(time.monotonic(),
                                 _pool.submit(vsphere.read_vm_state, vc, vm, vm_read_s),
                                 _pool.submit(pg.check_primary_within, db, app_check_s))


def take(key: str) -> Looks | None:
    """The reads started for `key`, waited for, if they started less than FRESH_S ago; else
    None (never started here, or too old: look again)."""
    with _lock:
        p = _pending.pop(key, None)
        for k in [k for k, v in _pending.items() if time.monotonic() - v.started > 60]:
            del _pending[k]  # runs that never came for theirs
    if p is None or time.monotonic() - p.started > FRESH_S:
        return None
    vm, app = p.vm.result(), p.app.result()
    return Looks(vm, app, time.monotonic() - p.started)
