"""How long the gateway could not hear: the stalls of its event loop, summed.

Heartbeats are read on the event loop. While it stalls (its VM stunned by a snapshot, a busy
machine, a GC pause, embedded runbooks holding the GIL), every agent looks silent at once, though
it is the gateway that is not listening. Silence is judged on the time the gateway could hear:
the heartbeat tracker deducts the stalls since each agent's last heartbeat. A real failure
during a stall is noticed that much later by heartbeats; the leader lease in etcd, which does not
depend on the gateway listening, is not delayed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("drflow.gateway.blind_time")

TICK_S = 0.1
SLACK_S = 0.2  # a tick later than this is a stall; shorter hiccups are not counted


class BlindClock:
    """Seconds the loop was stalled, the stall in progress included. `tick` runs on the loop;
    `now` may be called from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, tick_s: float = TICK_S,
                 slack_s: float = SLACK_S) -> None:
        self._clock = clock
        self.tick_s = tick_s
        self.slack_s = slack_s
        self._lock = threading.Lock()
        self._total = 0.0
        self._last_tick = clock()
        # Nothing counts before the loop runs the clock: the gateway's warm-up (seconds) is no
        # stall, and counting it, then dropping it at the start, would run the clock backwards.
        self._running = False

    def _late(self, now: float) -> float:
        if not self._running:
            return 0.0
        late = now - self._last_tick - self.tick_s
        return late if late > self.slack_s else 0.0

    def now(self) -> float:
        with self._lock:
            return self._total + self._late(self._clock())

    def tick(self) -> float:
        """Note a tick of the loop; the stall that just ended, if any (seconds)."""
        with self._lock:
            now = self._clock()
            late = self._late(now)
            self._total += late
            self._last_tick = now
        if late >= 1.0:
            log.warning("the gateway could not listen for %.1f s (its event loop stalled): "
                        "agents' silences are judged without that time", late)
        return late

    async def run(self) -> None:
        with self._lock:
            self._last_tick = self._clock()  # the time before the loop ran is no stall
            self._running = True
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()
