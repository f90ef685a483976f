"""Commands on the lease table, planned as one batch of events without changing the table.

A `Batch` reads a `LeaseTable` through an overlay of the changes it has planned so far, so a
command that ends a lease and then looks for what is still active (a cascade, a task close, an
expiry pass) sees its own earlier steps. Nothing is applied here: the store checks and appends
the whole batch atomically (one transaction in PostgreSQL), then the table applies it. A batch
whose command raised is dropped whole: a failed request changes no state.

Expiry is the one planner that touches the table: it pops due entries off the expiry heap and
purges what is past its grace (local housekeeping, not events). `restore()` pushes the popped
entries back when the batch could not be appended.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from operator import attrgetter
from typing import TYPE_CHECKING

from broker.approvals import store as approvals
from broker.approvals.store import Approval, ApprovalChanged, ApprovalState
from broker.domain.errors import (
    InvalidTransition,
    LeaseInactive,
    LeaseNotFound,
    PermissionDenied,
    QuotaExceeded,
    TaskConflict,
    TaskNotFound,
)
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
from broker.leases.index import LEASE_DUE, TASK_DUE, TASK_PURGE

if TYPE_CHECKING:
    from broker.leases.table import LeaseTable

_ACTIVE = LeaseState.ACTIVE
_ORDER = attrgetter("issued_at", "id")


class Batch:
    """The events one command would apply to `table`, planned against the table plus themselves."""

    def __init__(self, table: LeaseTable) -> None:
        self._t = table
        self.events: list[Event] = []
        self._leases: dict[str, Lease] = {}
        self._tasks: dict[str, Task] = {}
        self._popped: list[tuple[float, int, str]] = []
        self._approvals: dict[str, Approval] = {}
        self._popped_approvals: list[tuple[float, str]] = []

    # -- reading through the overlay

    def lease(self, lease_id: str) -> Lease | None:
        """The lease as it would be after this batch so far."""
        found = self._leases.get(lease_id)
        return found if found is not None else self._t.get(lease_id)

    def task(self, task_id: str) -> Task | None:
        """The task as it would be after this batch so far."""
        found = self._tasks.get(task_id)
        return found if found is not None else self._t.get_task(task_id)

    def _active_among(self, lease_ids: Iterable[str]) -> list[Lease]:
        found = (self.lease(i) for i in lease_ids)
        return sorted((lease for lease in found if lease is not None and lease.state is _ACTIVE), key=_ORDER)

    def _active_descendants(self, root_ids: list[str]) -> list[Lease]:
        # Breadth first and iterative: delegation chains may be deep. An ended lease never
        # has active descendants, so only active children are descended into.
        found: list[Lease] = []
        queue = deque(root_ids)
        while queue:
            for child_id in self._t.children(queue.popleft()):
                child = self.lease(child_id)
                if child is not None and child.state is _ACTIVE:
                    found.append(child)
                    queue.append(child_id)
        return found

    def _add(self, event: Event) -> None:
        self.events.append(event)
        match event:
            case LeaseGranted(lease=lease) | LeaseEnded(lease=lease):
                self._leases[lease.id] = lease
            case LeaseRenewed(lease_id=lease_id, expires_at=expires_at, token_exp=token_exp):
                current = self.lease(lease_id)
                assert current is not None
                self._leases[lease_id] = replace(current, expires_at=expires_at, token_exp=token_exp)
            case TaskOpened(task=task) | TaskClosed(task=task):
                self._tasks[task.id] = task
            case ApprovalChanged(approval=approval):
                self._approvals[approval.id] = approval

    # -- tasks

    def open_task(self, task_id: str, owner: str, *, now: float, deadline: float) -> Task:
        """Open a task, or return it when `owner` already has it open (`deadline` then ignored).

        A closed task keeps its id until its deadline has passed.

        Raises:
            TaskConflict: the task belongs to another owner, or is closed.
            InvalidTransition: `deadline` is not after `now`.
        """
        existing = self.task(task_id)
        if existing is not None:
            if existing.owner != owner:
                raise TaskConflict("not your task")
            if not existing.is_open(now):
                raise TaskConflict(f"task {task_id} is closed")
            return existing
        if deadline <= now:
            raise InvalidTransition("task deadline must be in the future")
        task = Task(id=task_id, owner=owner, created_at=now, deadline=deadline)
        self._add(TaskOpened(task=task, at=now))
        return task

    def complete_task(self, task_id: str, *, owner: str, now: float, initiator: str) -> list[Lease]:
        """Revoke the task's active leases (TASK_COMPLETED, descendants PARENT_REVOKED) and close it.

        Returns the leases that changed state; [] when the task is already closed.

        Raises:
            TaskNotFound: no such task.
            TaskConflict: the task belongs to another owner ("not your task").
        """
        task = self.task(task_id)
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
        roots = self._active_among(self._t.lease_ids_of_task(task.id))
        changed = self._end_all(roots, reason, ended_at, now, initiator)
        self._add(TaskClosed(task=replace(task, state=state, ended_at=ended_at, reason=reason), at=now))
        return changed

    # -- leases

    def grant(self, lease: Lease, *, now: float) -> Lease:
        """Record a new ACTIVE lease under an open task (and under its parent, if delegated).

        Raises:
            TaskConflict: the task does not exist or is not open.
            InvalidTransition: duplicate lease id, lease not ACTIVE, expiry not after `now`,
                or expiry later than the parent's.
            LeaseNotFound: the parent lease is unknown.
            LeaseInactive: the parent lease is revoked or expired.
        """
        task = self.task(lease.task_id)
        if task is None:
            raise TaskConflict(f"task {lease.task_id} is not open")
        if not task.is_open(now):
            raise TaskConflict(f"task {lease.task_id} is closed")
        if self.lease(lease.id) is not None:
            raise InvalidTransition("lease id already exists")
        if lease.state is not _ACTIVE:
            raise InvalidTransition("a granted lease must be active")
        if lease.parent_id is not None:
            self._check_parent(lease, now)
        if lease.expires_at <= now:
            raise InvalidTransition("lease expiry must be in the future")
        self._add(LeaseGranted(lease, now))
        return lease

    def _check_parent(self, lease: Lease, now: float) -> None:
        parent = self.lease(lease.parent_id or "")
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
        lease = self.lease(lease_id)
        if lease is None:
            raise LeaseNotFound("no such lease")
        if not lease.is_active(now):
            raise LeaseInactive("lease is not active")
        if expires_at <= now:
            raise InvalidTransition("lease expiry must be in the future")
        token_exp = max(lease.token_exp, token_exp)
        self._add(LeaseRenewed(lease_id=lease_id, expires_at=expires_at, token_exp=token_exp, at=now))
        return self._leases[lease_id]

    def revoke(self, lease_id: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """End one lease with `reason` and its active descendants with PARENT_REVOKED.

        Returns the leases that changed state, this one first; [] when it had already ended.

        Raises:
            LeaseNotFound: no such lease.
        """
        lease = self.lease(lease_id)
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
        task = self.task(task_id)
        if task is not None and task.state is TaskState.OPEN:
            return self._close_task(task, TaskState.REVOKED, reason, now, now, initiator)
        roots = self._active_among(self._t.lease_ids_of_task(task_id))
        return self._end_all(roots, reason, now, now, initiator)

    def revoke_subject(self, subject: str, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """End every active lease issued on behalf of `subject` or held by it, with `reason`.

        A compromised workload's authority is both what was issued for it and what it holds
        by delegation or subject-token exchange; descendants end PARENT_REVOKED.
        """
        roots = self._active_among(self._t.lease_ids_of_principal(subject))
        return self._end_all(roots, reason, now, now, initiator)

    def revoke_all(self, reason: Reason, *, now: float, initiator: str) -> list[Lease]:
        """End every active lease with `reason`."""
        roots = self._active_among(self._t.active_lease_ids())
        return self._end_all(roots, reason, now, now, initiator)

    def _end_all(self, roots: list[Lease], reason: Reason, ended_at: float, now: float, initiator: str) -> list[Lease]:
        # Roots first, all with `reason`; then whatever is still active below them.
        changed = [self._end(lease, reason, ended_at, now, initiator) for lease in roots]
        for lease in self._active_descendants([lease.id for lease in roots]):
            changed.append(self._end(lease, Reason.PARENT_REVOKED, ended_at, now, initiator))
        return changed

    def _end(self, lease: Lease, reason: Reason, ended_at: float, now: float, initiator: str) -> Lease:
        ended = lease.ended(reason, at=ended_at, initiator=initiator)
        self._add(LeaseEnded(ended, now))
        return ended

    # -- approvals

    def approval(self, approval_id: str) -> Approval | None:
        """The approval as it would be after this batch so far."""
        found = self._approvals.get(approval_id)
        return found if found is not None else self._t.approvals.get(approval_id)

    def request_approval(self, approval: Approval, *, now: float, max_pending: int) -> Approval:
        """Record a new pending approval, unless its caller already waits on `max_pending`.

        Raises:
            QuotaExceeded: the caller waits on `max_pending` approvals already.
            InvalidTransition: the id is taken, or the approval is not pending.
        """
        if self.approval(approval.id) is not None or approval.state is not ApprovalState.PENDING:
            raise InvalidTransition("a new approval needs a fresh id and must be pending")
        planned = [a for a in self._approvals.values() if a.client_id == approval.client_id]
        waiting = self._t.approvals.pending_count(approval.client_id) + sum(
            1 for a in planned if a.state is ApprovalState.PENDING
        )
        if waiting >= max_pending:
            raise QuotaExceeded(f"already waiting on {max_pending} approvals")
        self._add(ApprovalChanged(approval, approvals.Change.REQUESTED, now))
        return approval

    def decide_approval(self, approval_id: str, *, approve: bool, by: str, note: str, now: float) -> Approval:
        """Approve or deny a pending approval; nobody decides their own request.

        Raises:
            ApprovalNotFound, ApprovalExpired, ApprovalNotPending: not a pending approval.
            PermissionDenied: `by` asked for it (as principal or client).
        """
        found = self.approval(approval_id)
        if approve and found is not None and by in (found.principal, found.client_id):
            raise PermissionDenied("an operator cannot approve their own request")
        pending = approvals.check(found, ApprovalState.PENDING, now, before="a decision")
        event = approvals.decided(pending, approve=approve, by=by, note=note, now=now)
        self._add(event)
        return event.approval

    def use_approval(self, approval_id: str, *, lease_id: str, now: float) -> Approval:
        """Mark an approved approval used by the grant of `lease_id`: once, in all replicas.

        Raises:
            ApprovalNotFound, ApprovalExpired, ApprovalNotPending: not approved, or used already.
        """
        usable = approvals.check(self.approval(approval_id), ApprovalState.APPROVED, now, before="it was used")
        event = approvals.used(usable, lease_id=lease_id, now=now)
        self._add(event)
        return event.approval

    def release_approval(self, approval_id: str, *, now: float) -> None:
        """Give back a used approval whose token never left (its record could not be written)."""
        found = self.approval(approval_id)
        if found is not None and found.state is ApprovalState.USED:
            self._add(approvals.released(found, now=now))

    def _expire_approvals(self, now: float, budget: float) -> int:
        heap = self._t.approvals.heap
        handled = 0
        while heap and heap[0][0] <= now and handled < budget:
            handled += 1
            entry = heapq.heappop(heap)
            self._popped_approvals.append(entry)
            when, approval_id = entry
            found = self.approval(approval_id)
            if found is None:
                continue
            if approvals.is_live(found):
                if found.expires_at <= now:
                    self._add(approvals.expired(found, now=now))
            else:
                self._t.approvals.forget(approval_id, when)
        return handled

    # -- time

    def expire_due(self, now: float, *, limit: int | None = None) -> list[Lease]:
        """Plan the ends that are due at `now`, purging on the way what is past its grace.

        `limit` bounds how many heap entries are handled. Leases with expires_at <= now become
        EXPIRED (descendants PARENT_REVOKED); open tasks with deadline <= now get their active
        leases TASK_EXPIRED and become EXPIRED. Returns the leases that change state, in heap
        order `(time, kind, id)` with each lease's descendants right after it.
        """
        changed: list[Lease] = []
        heap = self._t.heap
        budget = float("inf") if limit is None else limit
        while heap and heap[0][0] <= now and budget > 0:
            budget -= 1
            entry = heapq.heappop(heap)
            self._popped.append(entry)
            when, kind, key = entry
            if kind == LEASE_DUE:
                changed.extend(self._expire_lease(key, when, now))
            elif kind == TASK_DUE:
                changed.extend(self._expire_task(key, when, now))
            elif kind == TASK_PURGE:
                self._t.purge_task(key, when)
            else:
                self._t.purge_lease(key, when)
        self._expire_approvals(now, budget)
        return changed

    @property
    def handled(self) -> int:
        """How many heap entries (leases' and approvals') `expire_due` has taken."""
        return len(self._popped) + len(self._popped_approvals)

    def restore(self) -> None:
        """Put back the heap entries this batch took: it was not appended, so they are still due."""
        for entry in self._popped:
            heapq.heappush(self._t.heap, entry)
        self._popped.clear()
        for approval_entry in self._popped_approvals:
            heapq.heappush(self._t.approvals.heap, approval_entry)
        self._popped_approvals.clear()

    def _expire_lease(self, lease_id: str, when: float, now: float) -> list[Lease]:
        lease = self.lease(lease_id)
        if lease is None or lease.state is not _ACTIVE or lease.expires_at != when:
            return []  # stale: the lease was renewed, ended or purged since this entry
        if not self._t.has_children(lease_id):  # the common case, kept cheap for large tables
            return [self._end(lease, Reason.EXPIRED, when, now, BROKER_INITIATOR)]
        return self._end_all([lease], Reason.EXPIRED, when, now, BROKER_INITIATOR)

    def _expire_task(self, task_id: str, when: float, now: float) -> list[Lease]:
        task = self.task(task_id)
        if task is None or task.deadline != when or task.state is not TaskState.OPEN:
            return []  # stale (purged, or a later task reused the id), or closed before its deadline
        return self._close_task(task, TaskState.EXPIRED, Reason.TASK_EXPIRED, when, now, BROKER_INITIATOR)
