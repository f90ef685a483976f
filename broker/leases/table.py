"""The in-memory lease table.

Every change of a lease or task is an event value (see `broker.leases.events`), and the table is
what applying those events in order yields: `apply()` is the only place state changes, and
each applied event is then handed, in order, to every subscriber (WatchRevocations, the reaper,
secret backends). Commands are planned as a batch of events (`broker.leases.batch`) against the
table; the store appends the batch and the table applies it. The command methods here do both
at once, for a table that is its own store.

Time is passed in. Methods are plain `def`s, so on the event loop each call is atomic and
no lock is needed. Expiry uses one min-heap of `(time, kind, id)` with lazy deletion: an
entry whose record has changed since it was pushed (renewed, ended, purged) is skipped
when popped, never searched for. Subscribers must not call the table's commands.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from broker.approvals.store import ApprovalChanged, ApprovalStore
from broker.leases.batch import Batch
from broker.leases.events import (
    BROKER_INITIATOR,
    Event,
    Lease,
    LeaseEnded,
    LeaseGranted,
    LeaseRenewed,
    LeaseState,
    Reason,
    Task,
    TaskClosed,
    TaskOpened,
    TaskState,
)
from broker.leases.index import LEASE_DUE, TASK_DUE, TASK_PURGE, TOMBSTONE_DUE, LeaseIndex

__all__ = [
    "BROKER_INITIATOR",
    "Event",
    "Lease",
    "LeaseEnded",
    "LeaseGranted",
    "LeaseRenewed",
    "LeaseState",
    "LeaseTable",
    "Reason",
    "Subscriber",
    "Task",
    "TaskClosed",
    "TaskOpened",
    "TaskState",
]

log = logging.getLogger(__name__)

Subscriber = Callable[[Event], None]
T = TypeVar("T")

_ACTIVE = LeaseState.ACTIVE


class LeaseTable(LeaseIndex):
    """Leases and tasks in memory, changed only by applying events.

    The queries (`get`, `list`, `children`, `counts`, ...) and the state they read come from
    `LeaseIndex`; this class holds every rule about how that state changes.

    An ended lease is kept as a tombstone until `token_exp + tombstone_grace`: the grace
    (e.g. the clock skew resource servers allow) lets a late Renew or Introspect still see
    "expired" rather than "unknown". Replicas must use the same grace to purge alike.
    """

    def __init__(self, *, tombstone_grace: float = 0.0) -> None:
        if tombstone_grace < 0:
            raise ValueError("tombstone grace must not be negative")
        super().__init__()
        self._grace = tombstone_grace
        self._seq = 0
        self._subscribers: tuple[tuple[object, Subscriber], ...] = ()
        self.approvals = ApprovalStore()

    @property
    def seq(self) -> int:
        """The sequence number of the last applied event (0 before any).

        Strictly increasing, one per event; while a subscriber runs it is that event's number,
        so readers such as the revocation feed can use it as a cursor.
        """
        return self._seq

    def apply(self, event: Event) -> None:
        """Apply one event, then hand it to every subscriber in subscription order.

        Deterministic: applying one table's event sequence to a new table yields an equal
        table. A subscriber that raises is logged and skipped; the others still run.

        Raises:
            TypeError: `event` is not a lease table event.
        """
        self.apply_at(self._seq + 1, event)

    def apply_at(self, seq: int, event: Event) -> None:
        """Apply `event` as number `seq` of the store's sequence; an event already applied is skipped.

        Applying is harmless for records this table no longer keeps (an end or renewal of a
        purged lease changes nothing), so a replica that catches up late converges.

        Raises:
            TypeError: `event` is not a lease table event.
        """
        if seq <= self._seq:
            return
        self._mutate(event)
        self._seq = seq
        for _, fn in self._subscribers:
            try:
                fn(event)
            except Exception:
                log.exception("lease event subscriber failed", extra={"event_kind": type(event).__name__})

    def apply_batch(self, events: list[Event]) -> None:
        """Apply a planned batch in order (a table that is its own store)."""
        for event in events:
            self.apply(event)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call `fn(event)` after each applied event; returns a function that unsubscribes."""
        token = object()
        self._subscribers = (*self._subscribers, (token, fn))

        def unsubscribe() -> None:
            self._subscribers = tuple(s for s in self._subscribers if s[0] is not token)

        return unsubscribe

    def _mutate(self, event: Event) -> None:
        match event:
            case LeaseGranted(lease=lease):
                if lease.id not in self._leases:
                    self._on_granted(lease)
            case LeaseEnded(lease=lease):
                self._on_ended(lease)
            case LeaseRenewed(lease_id=lease_id, expires_at=expires_at, token_exp=token_exp):
                lease = self._leases.get(lease_id)
                if lease is not None:
                    self._leases[lease_id] = replace(lease, expires_at=expires_at, token_exp=token_exp)
                    heapq.heappush(self._heap, (expires_at, LEASE_DUE, lease_id))
            case TaskOpened(task=task):
                self._on_opened(task)
            case TaskClosed(task=task):
                if task.id in self._tasks:
                    self._tasks[task.id] = task
                    # Past its deadline (and the grace, during which callers are told why), the id is free again.
                    heapq.heappush(self._heap, (task.deadline + self._grace, TASK_PURGE, task.id))
            case ApprovalChanged():
                self.approvals.apply(event)
            case _:
                raise TypeError(f"not a lease table event: {type(event).__name__}")

    def _on_granted(self, lease: Lease) -> None:
        self._leases[lease.id] = lease
        self._index(lease)
        if lease.state is _ACTIVE:
            self._active += 1
            heapq.heappush(self._heap, (lease.expires_at, LEASE_DUE, lease.id))
        else:
            heapq.heappush(self._heap, (lease.token_exp + self._grace, TOMBSTONE_DUE, lease.id))

    def _on_ended(self, lease: Lease) -> None:
        kept = self._leases.get(lease.id)
        if kept is None:
            return  # already purged here
        if kept.state is _ACTIVE:
            self._active -= 1
        self._leases[lease.id] = lease
        heapq.heappush(self._heap, (lease.token_exp + self._grace, TOMBSTONE_DUE, lease.id))

    def _on_opened(self, task: Task) -> None:
        if task.id in self._tasks:
            self._drop_task(self._tasks[task.id])  # a replica behind on purging: the id was reused
        self._tasks[task.id] = task
        self._tasks_by_owner[task.owner] = self._tasks_by_owner.get(task.owner, 0) + 1
        heapq.heappush(self._heap, (task.deadline, TASK_DUE, task.id))

    def _run(self, plan: Callable[[Batch], T]) -> T:
        batch = Batch(self)
        result = plan(batch)
        self.apply_batch(batch.events)
        return result

    def open_task(self, task_id: str, owner: str, *, now: float, deadline: float) -> Task:
        """`Batch.open_task`, applied. Raises: TaskConflict, InvalidTransition."""
        return self._run(lambda b: b.open_task(task_id, owner, now=now, deadline=deadline))

    def complete_task(self, task_id: str, *, owner: str, now: float, initiator: str) -> list[Lease]:
        """`Batch.complete_task`, applied. Raises: TaskNotFound, TaskConflict."""
        return self._run(lambda b: b.complete_task(task_id, owner=owner, now=now, initiator=initiator))

    def grant(self, lease: Lease, *, now: float) -> Lease:
        """`Batch.grant`, applied. Raises: TaskConflict, InvalidTransition, LeaseNotFound, LeaseInactive."""
        return self._run(lambda b: b.grant(lease, now=now))

    def renew(self, lease_id: str, *, expires_at: float, token_exp: float, now: float) -> Lease:
        """`Batch.renew`, applied. Raises: LeaseNotFound, LeaseInactive, InvalidTransition."""
        return self._run(lambda b: b.renew(lease_id, expires_at=expires_at, token_exp=token_exp, now=now))

    def revoke(self, lease_id: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """`Batch.revoke`, applied. Raises: LeaseNotFound."""
        return self._run(lambda b: b.revoke(lease_id, reason, now=now, initiator=initiator))

    def revoke_task(self, task_id: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """`Batch.revoke_task`, applied."""
        return self._run(lambda b: b.revoke_task(task_id, reason, now=now, initiator=initiator))

    def revoke_subject(self, subject: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """`Batch.revoke_subject`, applied."""
        return self._run(lambda b: b.revoke_subject(subject, reason, now=now, initiator=initiator))

    def revoke_all(self, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """`Batch.revoke_all`, applied."""
        return self._run(lambda b: b.revoke_all(reason, now=now, initiator=initiator))

    def expire_due(self, now: float, *, limit: int | None = None) -> list[Lease]:
        """End what is due at `now` and purge what is no longer needed (`Batch.expire_due`, applied).

        `limit` bounds how many heap entries one call handles, so a burst of expiries can be
        spread over several passes; `has_due(now)` tells whether more is waiting. Ended leases
        whose token_exp + grace <= now and closed tasks whose deadline + grace <= now are purged
        (local housekeeping, not an event).
        """
        changed: list[Lease] = []
        budget = limit
        while self.has_due(now) and (budget is None or budget > 0):
            batch = Batch(self)
            changed.extend(batch.expire_due(now, limit=budget))
            self.apply_batch(batch.events)
            if budget is not None:
                budget -= batch.handled
        return changed

    def has_due(self, now: float) -> bool:
        """True when some lease, task or approval entry is due at `now` (possibly a stale one)."""
        return super().has_due(now) or self.approvals.has_due(now)

    def next_deadline(self) -> float | None:
        """The earliest pending lease, task or approval time, or None; it may be a stale entry."""
        times = [t for t in (super().next_deadline(), self.approvals.next_deadline()) if t is not None]
        return min(times) if times else None

    def purge_task(self, task_id: str, when: float) -> None:
        """Forget a closed task whose purge entry (deadline + grace) is `when`."""
        self._purge_task(task_id, when)

    def purge_lease(self, lease_id: str, when: float) -> None:
        """Forget an ended lease whose tombstone entry (token_exp + grace) is `when`."""
        self._purge_lease(lease_id, when)

    def _purge_task(self, task_id: str, when: float) -> None:
        task = self._tasks.get(task_id)
        if task is not None and task.state is not TaskState.OPEN and task.deadline + self._grace == when:
            self._drop_task(task)

    def _drop_task(self, task: Task) -> None:
        del self._tasks[task.id]
        left = self._tasks_by_owner[task.owner] - 1
        if left:
            self._tasks_by_owner[task.owner] = left
        else:
            del self._tasks_by_owner[task.owner]

    def _purge_lease(self, lease_id: str, when: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None or lease.state is _ACTIVE or lease.token_exp + self._grace != when:
            return
        del self._leases[lease_id]
        self._unindex(lease)
