"""The in-memory lease table.

Every change of a lease or task is an event value (see `broker.leases.events`), and the table is
what applying those events in order yields: `apply()` is the only place state changes, and
each applied event is then handed, in order, to every subscriber (audit, WatchRevocations,
later a replicated log). Commands check their preconditions, build events and apply them.

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

from broker.domain.errors import InvalidTransition, LeaseInactive, LeaseNotFound, TaskConflict, TaskNotFound
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
from broker.leases.index import LeaseIndex

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

# Heap entry kinds. At equal times a lease's own expiry pops before its task's deadline,
# so a lease whose TTL was capped by the task deadline ends EXPIRED rather than TASK_EXPIRED.
_LEASE_DUE = 0
_TASK_DUE = 1
_TOMBSTONE_DUE = 2
_TASK_PURGE = 3

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
        self._mutate(event)
        self._seq += 1
        for _, fn in self._subscribers:
            try:
                fn(event)
            except Exception:
                log.exception("lease event subscriber failed", extra={"event_kind": type(event).__name__})

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
                self._on_granted(lease)
            case LeaseEnded(lease=lease):
                if self._leases[lease.id].state is _ACTIVE:
                    self._active -= 1
                self._leases[lease.id] = lease
                heapq.heappush(self._heap, (lease.token_exp + self._grace, _TOMBSTONE_DUE, lease.id))
            case LeaseRenewed(lease_id=lease_id, expires_at=expires_at, token_exp=token_exp):
                lease = self._leases[lease_id]
                self._leases[lease_id] = replace(lease, expires_at=expires_at, token_exp=token_exp)
                heapq.heappush(self._heap, (expires_at, _LEASE_DUE, lease_id))
            case TaskOpened(task=task):
                self._tasks[task.id] = task
                self._tasks_by_owner[task.owner] = self._tasks_by_owner.get(task.owner, 0) + 1
                heapq.heappush(self._heap, (task.deadline, _TASK_DUE, task.id))
            case TaskClosed(task=task):
                self._tasks[task.id] = task
            case _:
                raise TypeError(f"not a lease table event: {type(event).__name__}")

    def _on_granted(self, lease: Lease) -> None:
        self._leases[lease.id] = lease
        self._index(lease)
        if lease.state is _ACTIVE:
            self._active += 1
            heapq.heappush(self._heap, (lease.expires_at, _LEASE_DUE, lease.id))
        else:
            heapq.heappush(self._heap, (lease.token_exp + self._grace, _TOMBSTONE_DUE, lease.id))

    def open_task(self, task_id: str, owner: str, *, now: float, deadline: float) -> Task:
        """Open a task, or return it when `owner` already has it open (`deadline` then ignored).

        A closed task keeps its id until its deadline has passed.

        Raises:
            TaskConflict: the task belongs to another owner, or is closed.
            InvalidTransition: `deadline` is not after `now`.
        """
        existing = self._tasks.get(task_id)
        if existing is not None:
            if existing.owner != owner:
                raise TaskConflict("not your task")
            if not existing.is_open(now):
                raise TaskConflict(f"task {task_id} is closed")
            return existing
        if deadline <= now:
            raise InvalidTransition("task deadline must be in the future")
        task = Task(id=task_id, owner=owner, created_at=now, deadline=deadline)
        self.apply(TaskOpened(task=task, at=now))
        return task

    def complete_task(self, task_id: str, *, owner: str, now: float, initiator: str) -> list[Lease]:
        """Revoke the task's active leases (TASK_COMPLETED, descendants PARENT_REVOKED) and close it.

        Returns the leases that changed state; [] when the task is already closed.

        Raises:
            TaskNotFound: no such task.
            TaskConflict: the task belongs to another owner ("not your task").
        """
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound("no such task")
        if task.owner != owner:
            raise TaskConflict("not your task")
        if task.state is not TaskState.OPEN:
            return []
        return self._close_task(task, TaskState.COMPLETED, Reason.TASK_COMPLETED, now, now, initiator)

    def _close_task(
        self, task: Task, state: TaskState, reason: Reason, ended_at: float, now: float, initiator: str
    ) -> list[Lease]:
        roots = self._active_among(self._by_task.get(task.id, ()))
        changed = self._end_all(roots, reason, ended_at, now, initiator)
        closed = replace(task, state=state, ended_at=ended_at, reason=reason)
        self.apply(TaskClosed(task=closed, at=now))
        return changed

    def grant(self, lease: Lease, *, now: float) -> Lease:
        """Record a new ACTIVE lease under an open task (and under its parent, if delegated).

        Raises:
            TaskConflict: the task does not exist or is not open.
            InvalidTransition: duplicate lease id, lease not ACTIVE, expiry not after `now`,
                or expiry later than the parent's.
            LeaseNotFound: the parent lease is unknown.
            LeaseInactive: the parent lease is revoked or expired.
        """
        task = self._tasks.get(lease.task_id)
        if task is None:
            raise TaskConflict(f"task {lease.task_id} is not open")
        if not task.is_open(now):
            raise TaskConflict(f"task {lease.task_id} is closed")
        if lease.id in self._leases:
            raise InvalidTransition("lease id already exists")
        if lease.state is not _ACTIVE:
            raise InvalidTransition("a granted lease must be active")
        if lease.parent_id is not None:
            self._check_parent(lease, now)
        if lease.expires_at <= now:
            raise InvalidTransition("lease expiry must be in the future")
        self.apply(LeaseGranted(lease, now))
        return lease

    def _check_parent(self, lease: Lease, now: float) -> None:
        parent = self._leases.get(lease.parent_id or "")
        if parent is None:
            raise LeaseNotFound("no such parent lease")
        if not parent.is_active(now):
            raise LeaseInactive("parent lease is not active")
        if lease.expires_at > parent.expires_at:
            # A delegated credential never outlives the authority it was delegated from.
            raise InvalidTransition("lease would outlive its parent")

    def renew(self, lease_id: str, *, expires_at: float, token_exp: float, now: float) -> Lease:
        """Give an active lease a new expiry (any time after `now`; the caller applies caps).

        `token_exp` only ever grows: the tombstone must outlive every token minted.

        Raises:
            LeaseNotFound: no such lease.
            LeaseInactive: the lease is revoked, expired, or past its expiry.
            InvalidTransition: `expires_at` is not after `now`.
        """
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound("no such lease")
        if not lease.is_active(now):
            raise LeaseInactive("lease is not active")
        if expires_at <= now:
            raise InvalidTransition("lease expiry must be in the future")
        token_exp = max(lease.token_exp, token_exp)
        self.apply(LeaseRenewed(lease_id=lease_id, expires_at=expires_at, token_exp=token_exp, at=now))
        return self._leases[lease_id]

    def revoke(self, lease_id: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """End one lease with `reason` and its active descendants with PARENT_REVOKED.

        Returns the leases that changed state, this one first; [] when it had already ended.

        Raises:
            LeaseNotFound: no such lease.
        """
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound("no such lease")
        if lease.state is not _ACTIVE:
            return []
        return self._end_all([lease], reason, now, now, initiator)

    def revoke_task(self, task_id: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """End every active lease of the task with `reason`, and close the task (REVOKED).

        A revoked task id cannot be used to mint again until its deadline has passed, as for
        a completed one: stopping a task means stopping it, not inviting a fresh exchange.
        """
        task = self._tasks.get(task_id)
        if task is not None and task.state is TaskState.OPEN:
            return self._close_task(task, TaskState.REVOKED, reason, now, now, initiator)
        roots = self._active_among(self._by_task.get(task_id, ()))
        return self._end_all(roots, reason, now, now, initiator)

    def revoke_subject(self, subject: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """End every active lease issued on behalf of `subject` or held by it, with `reason`.

        A compromised workload's authority is both what was issued for it and what it holds
        by delegation or subject-token exchange; descendants end PARENT_REVOKED.
        """
        held = self._by_client.get(subject, set())
        roots = self._active_among(self._by_subject.get(subject, set()) | held)
        return self._end_all(roots, reason, now, now, initiator)

    def revoke_all(self, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """End every active lease with `reason`."""
        roots = self._active_among(self._leases)
        return self._end_all(roots, reason, now, now, initiator)

    def _end_all(self, roots: list[Lease], reason: Reason, ended_at: float, now: float, initiator: str) -> list[Lease]:
        # Roots first, all with `reason`; then whatever is still active below them.
        changed = [self._end(lease, reason, ended_at, now, initiator) for lease in roots]
        for lease in self._active_descendants([lease.id for lease in roots]):
            changed.append(self._end(lease, Reason.PARENT_REVOKED, ended_at, now, initiator))
        return changed

    def _end(self, lease: Lease, reason: Reason, ended_at: float, now: float, initiator: str) -> Lease:
        ended = lease.ended(reason, at=ended_at, initiator=initiator)
        self.apply(LeaseEnded(ended, now))
        return ended

    def expire_due(self, now: float, *, limit: int | None = None) -> list[Lease]:
        """End what is due at `now` and purge what is no longer needed.

        `limit` bounds how many heap entries one call handles, so a burst of expiries can be
        spread over several passes; `has_due(now)` tells whether more is waiting.

        Leases with expires_at <= now become EXPIRED (descendants PARENT_REVOKED); open tasks
        with deadline <= now get their active leases TASK_EXPIRED and become EXPIRED. Ended
        leases whose token_exp + grace <= now and closed tasks whose deadline + grace <= now are purged
        (local housekeeping, not an event). Returns the leases that changed state, in heap
        order `(time, kind, id)` with each lease's descendants right after it.
        """
        changed: list[Lease] = []
        heap = self._heap
        budget = float("inf") if limit is None else limit
        while heap and heap[0][0] <= now and budget > 0:
            budget -= 1
            when, kind, key = heapq.heappop(heap)
            if kind == _LEASE_DUE:
                changed.extend(self._expire_lease(key, when, now))
            elif kind == _TASK_DUE:
                changed.extend(self._expire_task(key, when, now))
            elif kind == _TASK_PURGE:
                self._purge_task(key, when)
            else:
                self._purge_lease(key, when)
        return changed

    def _expire_lease(self, lease_id: str, when: float, now: float) -> list[Lease]:
        lease = self._leases.get(lease_id)
        if lease is None or lease.state is not _ACTIVE or lease.expires_at != when:
            return []  # stale: the lease was renewed, ended or purged since this entry
        if lease_id not in self._children:  # the common case, kept cheap for large tables
            return [self._end(lease, Reason.EXPIRED, when, now, BROKER_INITIATOR)]
        return self._end_all([lease], Reason.EXPIRED, when, now, BROKER_INITIATOR)

    def _expire_task(self, task_id: str, when: float, now: float) -> list[Lease]:
        task = self._tasks.get(task_id)
        if task is None or task.deadline != when:
            return []  # stale: purged, or a later task reused the id
        changed: list[Lease] = []
        if task.state is TaskState.OPEN:
            changed = self._close_task(task, TaskState.EXPIRED, Reason.TASK_EXPIRED, when, now, BROKER_INITIATOR)
        # Past its deadline (and the grace, during which callers are told why), the id is free again.
        if self._grace > 0:
            heapq.heappush(self._heap, (when + self._grace, _TASK_PURGE, task_id))
        else:
            self._drop_task(task)
        return changed

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
