"""Full garbage collections whose pause does not grow with the lease table.

CPython's full collection scans every container object it tracks, and each lease record is one
(two with its policy context): with 46,000 leases a pass held `broker serve`'s event loop for
about 90 ms on 2 shared cores, and passes come round again each time the survivors grew by a
quarter. That pause is what a revocation's watchers and every call in flight then wait out.
Lease records hold no reference cycles (reference counting frees them), so the collector need
not look at them again and again: `FrozenSurvivors` moves what survived a full collection into
the permanent generation (`gc.freeze`), and the next one scans only what is newer. Something
frozen that later becomes part of a cycle would never be collected, so every `thaw_every`
seconds all is thawed (`gc.unfreeze`) and the next full collection looks at everything once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from enum import StrEnum

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
THAW_SECONDS = 900.0


class Step(StrEnum):
    IDLE = "idle"  # no full collection since the last step
    FROZEN = "frozen"  # the survivors of the last full collection are frozen
    THAWED = "thawed"  # all is thawed: the next full collection scans everything


def full_collections() -> int:
    """How many full (generation 2) collections this process has run."""
    return int(gc.get_stats()[2]["collections"])


class FrozenSurvivors:
    """Freezes the survivors of each full collection; thaws everything every `thaw_every` seconds."""

    def __init__(self, *, thaw_every: float = THAW_SECONDS, now: float | None = None) -> None:
        self._thaw_every = thaw_every
        self._seen = full_collections()
        self._thawed_at = time.monotonic() if now is None else now

    def step(self, now: float) -> Step:
        """Look once: freeze after a new full collection, or thaw when it is time."""
        done = full_collections()
        if done == self._seen:
            return Step.IDLE
        self._seen = done
        if now - self._thawed_at >= self._thaw_every:
            gc.unfreeze()
            self._thawed_at = now
            return Step.THAWED
        gc.collect(1)  # young cycles go first: only what is live is frozen
        gc.freeze()
        return Step.FROZEN

    async def run(self, *, every: float = CHECK_SECONDS) -> None:
        """Step every `every` seconds until cancelled."""
        while True:
            await asyncio.sleep(every)
            try:
                self.step(time.monotonic())
            except Exception:  # the server must outlive a fault here
                log.exception("collector step failed")
