"""The expiry loop: sleeps until the next deadline, wakes early when an earlier one appears."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from broker.approvals.store import ApprovalChanged
from broker.domain.clock import Clock
from broker.domain.errors import StoreUnavailable
from broker.leases.table import LeaseGranted, LeaseRenewed, TaskOpened
from broker.store.base import LeaseStore
from broker.tokens.minter import TokenMinter

log = logging.getLogger(__name__)

# Even with nothing due, look again this often (prunes rotated keys, bounds clock drift).
HOUSEKEEPING_SECONDS = 30.0
# At most this many heap entries per pass: a burst of expiries (a task deadline, a clock jump)
# is spread over several passes with the event loop free in between.
BATCH = 1000
# Real seconds between passes while the store cannot be reached.
RETRY_FIRST = 0.2
RETRY_MAX = 2.0


class Reaper:
    """Expires leases, tasks and approvals at their deadlines, driven by one heap each."""

    def __init__(self, *, store: LeaseStore, minter: TokenMinter, clock: Clock) -> None:
        self._store = store
        self._leases = leases = store.table
        self._minter = minter
        self._clock = clock
        self._target = float("inf")
        self._wake = asyncio.Event()
        leases.subscribe(self._on_event)

    def poke(self, deadline: float) -> None:
        """Wake the loop if `deadline` is earlier than the one it sleeps towards."""
        if deadline < self._target:
            self._target = deadline
            self._wake.set()

    def _on_event(self, event: object) -> None:
        if isinstance(event, LeaseGranted):
            self.poke(event.lease.expires_at)
        elif isinstance(event, LeaseRenewed):
            self.poke(event.expires_at)
        elif isinstance(event, TaskOpened):
            self.poke(event.task.deadline)
        elif isinstance(event, ApprovalChanged):
            self.poke(event.approval.expires_at)

    async def expire(self, *, limit: int = BATCH) -> int:
        """One pass over what is due by now (at most `limit` lease-table entries).

        Returns how many leases changed state.
        """
        now = self._clock.now()
        changed = await self._store.expire(now, limit=limit)
        self._minter.prune(now=now)
        return len(changed)

    def _next(self) -> float:
        now = self._clock.now()
        candidates = [now + HOUSEKEEPING_SECONDS]
        deadline = self._leases.next_deadline()
        if deadline is not None:
            candidates.append(deadline)
        return min(candidates)

    async def run(self, *, pause: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Loop until cancelled; while the store is unreachable, retry after `pause` (0.2 s doubling to 2 s)."""
        backoff = 0.0
        while True:
            try:
                await self.expire(limit=BATCH)
                backoff = 0.0
            except StoreUnavailable:
                # The store logged it. What was due is still due: retry once it may be back, not in a spin.
                backoff = min(max(backoff * 2, RETRY_FIRST), RETRY_MAX)
                await pause(backoff)
                continue
            except Exception:  # the loop must outlive a bug in one pass
                log.exception("expiry pass failed")
            if self._leases.has_due(self._clock.now()):
                await asyncio.sleep(0)  # more is due: let the RPCs waiting behind this batch run first
                continue
            self._target = self._next()
            self._wake.clear()
            sleeper = asyncio.ensure_future(self._clock.sleep_until(self._target))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, waker):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
