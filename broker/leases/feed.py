"""The revocation feed: every lease that stops being active, in one shared window read by cursor.

Each ended lease enters a bounded window of recent end events under the sequence number of its
event. A watcher holds only a position (the last sequence number it has read), so a burst of
revocations costs one window entry per lease, not one buffer entry per watcher: a watcher that
keeps reading gets the whole burst. A watcher is cut off only when it really falls behind, that
is when events it has not read yet have left the window. A watcher that reconnects resumes after
the cursor of the last event it read, and gets exactly what it missed while the window still
holds it; with a store that keeps its log (`history`, the PostgreSQL store), also what is older
than the window, read from the log in pages until the window takes over.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from broker.domain.errors import CursorTooOld, InvalidRequest, QuotaExceeded, WatcherTooSlow
from broker.leases.table import Lease, LeaseEnded, LeaseTable

DEFAULT_WINDOW = 65536
# Open streams one watcher principal may hold at once (`limits.max_streams_per_watcher`).
DEFAULT_STREAMS_PER_WATCHER = 8
# End events read from the store's log per page, for a watcher resuming before the window.
HISTORY_PAGE = 1000
# (after, until, limit) -> the lease ends with sequence numbers in (after, until], oldest first.
History = Callable[[int, int, int], Awaitable[list[tuple[int, Lease]]]]


@dataclass(eq=False, slots=True)
class Subscription:
    """One watcher: an audience filter (None = all) and the last sequence number it has passed."""

    audience: str | None
    watcher: str = ""
    position: int = 0
    closed: bool = False
    # Resuming before the window: what was read from the log so far, and up to where.
    backlog: deque[tuple[int, Lease]] = field(default_factory=deque)
    read_to: int | None = None


def new_epoch() -> str:
    """A fresh name for one run of a store: cursors of another run are refused, not misread."""
    return secrets.token_hex(4)


class RevocationFeed:
    """Keeps the last `window` end events in sequence order and hands them to watchers by position.

    `epoch` names the store run the sequence numbers belong to; cursors carry it.
    """

    def __init__(
        self,
        leases: LeaseTable,
        *,
        window: int = DEFAULT_WINDOW,
        max_streams_per_watcher: int = DEFAULT_STREAMS_PER_WATCHER,
        epoch: str | None = None,
        history: History | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("the window must hold at least one event")
        self._leases = leases
        self._window = window
        self._max_streams = max_streams_per_watcher
        self._history = history
        self.epoch = epoch or new_epoch()
        self._subs: set[Subscription] = set()
        # Parallel lists from `_head` on; compacted when the dead prefix is as long as the window.
        self._seqs: list[int] = []
        self._ended: list[Lease] = []
        self._head = 0
        # Every end event with a sequence number up to `_floor` may be gone from the window.
        self._floor = leases.seq
        self._wake: asyncio.Event | None = None
        leases.subscribe(self._on_event)

    def __len__(self) -> int:
        return len(self._subs)

    @property
    def floor(self) -> int:
        """Events after this sequence number are all still in the window."""
        return self._floor

    def cursor(self, seq: int) -> str:
        """The opaque cursor a watcher resumes after: the store run and the sequence number."""
        return f"{self.epoch}-{seq}"

    def parse_cursor(self, cursor: str) -> int:
        """The sequence number in `cursor`.

        Raises:
            InvalidRequest: not a cursor this broker hands out, or one ahead of this broker.
            CursorTooOld: a cursor of an earlier run of the broker (its events are gone).
        """
        epoch, sep, digits = cursor.partition("-")
        if not sep or not (digits.isascii() and digits.isdigit()) or len(digits) > 19 or len(epoch) != 8:
            raise InvalidRequest("resume_after is not a cursor this broker issued")
        if epoch != self.epoch:
            raise CursorTooOld("resume_after is from an earlier run of the broker: its events are gone")
        seq = int(digits)
        if seq > self._leases.seq:
            raise InvalidRequest("resume_after is ahead of this broker")
        return seq

    def subscribe(self, audience: str | None, *, watcher: str = "", resume_after: int | None = None) -> Subscription:
        """Start delivering ended leases of `audience` (None = all): new ones, or those after `resume_after`.

        Raises:
            QuotaExceeded: `watcher` already holds `max_streams_per_watcher` streams.
            CursorTooOld: events after `resume_after` have already left the window, and the store
                keeps no log to read them from (the memory store).
        """
        if watcher and sum(1 for s in self._subs if s.watcher == watcher) >= self._max_streams:
            raise QuotaExceeded(f"at most {self._max_streams} open revocation streams per watcher")
        read_to = None
        if resume_after is None:
            position = self._leases.seq
        elif resume_after < self._floor and self._history is None:
            raise CursorTooOld(
                f"resume_after is older than the {self._window} most recent end events the broker keeps: "
                "list leases to resynchronise"
            )
        else:
            position = resume_after
            read_to = resume_after if resume_after < self._floor else None
        sub = Subscription(audience=audience, watcher=watcher, position=position, read_to=read_to)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        self._subs.discard(sub)

    def _on_event(self, event: object) -> None:
        if not isinstance(event, LeaseEnded):
            return
        self._seqs.append(self._leases.seq)
        self._ended.append(event.lease)
        if len(self._seqs) - self._head > self._window:
            self._floor = self._seqs[self._head]
            self._ended[self._head] = None  # type: ignore[call-overload]  # let the record go
            self._head += 1
            if self._head >= self._window:
                del self._seqs[: self._head]
                del self._ended[: self._head]
                self._head = 0
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def _pending(self, sub: Subscription) -> tuple[int, Lease] | None:
        """The next event for `sub` after its position; passes over other audiences' events."""
        if sub.closed:
            return None
        if sub.position < self._floor:
            self._subs.discard(sub)
            raise WatcherTooSlow(f"watcher fell more than {self._window} events behind and was cut off")
        seqs = self._seqs
        i = bisect.bisect_right(seqs, sub.position, lo=self._head)
        while i < len(seqs):
            lease = self._ended[i]
            if sub.audience is None or lease.audience == sub.audience:
                return seqs[i], lease
            sub.position = seqs[i]
            i += 1
        sub.position = self._leases.seq  # nothing for it up to here
        return None

    async def _older(self, sub: Subscription) -> tuple[int, Lease] | None:
        # Pages of the log until the window holds everything after what was read; None then.
        assert self._history is not None and sub.read_to is not None
        while not sub.backlog:
            start, until = sub.read_to, self._floor
            if start >= until:
                sub.position, sub.read_to = max(sub.position, start), None
                return None
            page = await self._history(start, until, HISTORY_PAGE)
            sub.read_to = page[-1][0] if len(page) >= HISTORY_PAGE else until
            sub.backlog.extend(e for e in page if sub.audience is None or e[1].audience == sub.audience)
        return sub.backlog.popleft()

    async def next(self, sub: Subscription) -> tuple[int, Lease]:
        """The next ended lease for `sub` and its sequence number; waits for one.

        Raises:
            WatcherTooSlow: events the subscriber had not read left the window; it is cut off.
            CursorTooOld: resuming before the window, the log no longer holds what followed.
            StoreUnavailable: resuming before the window, the store's log cannot be read.
        """
        while not sub.closed:
            if sub.read_to is not None:
                older = await self._older(sub)
                if older is not None:
                    sub.position = older[0]
                    return older
                continue
            found = self._pending(sub)
            if found is not None:
                sub.position = found[0]
                return found
            if self._wake is None:
                self._wake = asyncio.Event()
            await self._wake.wait()
        raise RuntimeError("the subscription was closed")
