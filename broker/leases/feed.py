"""The revocation feed: every lease that stops being active, fanned out to subscribers.

Each subscriber has a bounded buffer; one that falls behind is cut off rather than allowed to
slow the broker or grow without bound.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from broker.domain.errors import QuotaExceeded, WatcherTooSlow
from broker.leases.table import Lease, LeaseEnded, LeaseTable

DEFAULT_BUFFER = 1024
# Open streams one watcher principal may hold at once.
MAX_STREAMS_PER_WATCHER = 8


@dataclass(eq=False, slots=True)
class Subscription:
    """One watcher: an audience filter (None = all) and its buffer."""

    audience: str | None
    watcher: str = ""
    queue: asyncio.Queue[Lease] = field(default_factory=lambda: asyncio.Queue(DEFAULT_BUFFER))
    overflowed: bool = False


class RevocationFeed:
    """Fans `LeaseEnded` events out to subscribers."""

    def __init__(self, leases: LeaseTable, *, buffer: int = DEFAULT_BUFFER) -> None:
        self._subs: set[Subscription] = set()
        self._buffer = buffer
        leases.subscribe(self._on_event)

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, audience: str | None, *, watcher: str = "") -> Subscription:
        """Start delivering ended leases of `audience` (None = all) to a new subscription.

        Raises:
            QuotaExceeded: `watcher` already holds MAX_STREAMS_PER_WATCHER streams.
        """
        if watcher and sum(1 for s in self._subs if s.watcher == watcher) >= MAX_STREAMS_PER_WATCHER:
            raise QuotaExceeded(f"at most {MAX_STREAMS_PER_WATCHER} open revocation streams per watcher")
        sub = Subscription(audience=audience, watcher=watcher, queue=asyncio.Queue(self._buffer))
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def _on_event(self, event: object) -> None:
        if not isinstance(event, LeaseEnded):
            return
        lease = event.lease
        for sub in list(self._subs):
            if sub.overflowed or (sub.audience is not None and sub.audience != lease.audience):
                continue
            try:
                sub.queue.put_nowait(lease)
            except asyncio.QueueFull:
                # A full queue means its reader is not waiting, so it will see the flag
                # once it has drained what is buffered.
                sub.overflowed = True
                self._subs.discard(sub)

    async def next(self, sub: Subscription) -> Lease:
        """The next ended lease for `sub`.

        Raises:
            WatcherTooSlow: the subscriber fell more than its buffer behind and was cut off.
        """
        if sub.overflowed and sub.queue.empty():
            raise WatcherTooSlow(f"watcher fell more than {self._buffer} events behind and was cut off")
        if sub.overflowed:
            return sub.queue.get_nowait()
        return await sub.queue.get()
