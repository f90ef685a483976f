"""Human approvals: a pending exchange waits for an operator's yes or no.

Pure core, like the lease table: plain `def`s, time passed in, every change published to
subscribers (the await path and the audit log). An approval binds the exact request it was
made for; the `plan` it carries is opaque here and is what gets issued, unchanged.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from broker.domain.errors import ApprovalExpired, ApprovalNotFound, ApprovalNotPending

log = logging.getLogger(__name__)

# Decided approvals stay visible this long after their expiry, then are forgotten.
RETENTION_SECONDS = 900.0


class ApprovalState(StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    DENIED = "DENIED"
    EXPIRED = "EXPIRED"
    USED = "USED"


@dataclass(frozen=True, slots=True)
class Approval:
    """One request waiting for (or past) a human decision."""

    id: str
    principal: str
    client_id: str
    task_id: str
    audience: str
    actions: tuple[str, ...]
    resource: str
    ttl_seconds: int
    requested_at: float
    expires_at: float
    context: Mapping[str, str] = field(default_factory=dict)
    policies: tuple[str, ...] = ()
    state: ApprovalState = ApprovalState.PENDING
    decided_by: str = ""
    note: str = ""
    decided_at: float | None = None
    plan: Any = field(default=None, compare=False, repr=False)


class ApprovalStore:
    """Every approval the broker remembers, with one expiry heap."""

    def __init__(self) -> None:
        self._approvals: dict[str, Approval] = {}
        self._heap: list[tuple[float, str]] = []
        self._subscribers: list[Callable[[Approval], None]] = []
        self._pending_by_client: dict[str, set[str]] = {}

    def pending_count(self, client_id: str) -> int:
        """How many approvals `client_id` is waiting on."""
        return len(self._pending_by_client.get(client_id, ()))

    def subscribe(self, fn: Callable[[Approval], None]) -> Callable[[], None]:
        """Call `fn` with each approval after it changes; returns the unsubscribe function."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def _put(self, approval: Approval) -> Approval:
        self._approvals[approval.id] = approval
        pending = self._pending_by_client.setdefault(approval.client_id, set())
        if approval.state is ApprovalState.PENDING:
            pending.add(approval.id)
        else:
            pending.discard(approval.id)
        if not pending:
            del self._pending_by_client[approval.client_id]
        for fn in list(self._subscribers):
            try:
                fn(approval)
            except Exception:
                log.exception("approval subscriber failed", extra={"approval_id": approval.id})
        return approval

    def create(self, approval: Approval) -> Approval:
        """Record a new pending approval."""
        heapq.heappush(self._heap, (approval.expires_at, approval.id))
        return self._put(approval)

    def get(self, approval_id: str) -> Approval | None:
        return self._approvals.get(approval_id)

    def _expect(self, approval_id: str, state: ApprovalState, now: float, *, before: str) -> Approval:
        approval = self._approvals.get(approval_id)
        if approval is None:
            raise ApprovalNotFound("no such approval")
        if approval.state is state and approval.expires_at <= now:
            self.expire_due(now)
            raise ApprovalExpired(f"approval expired before {before}")
        # The same answer whether or not the reaper got there first.
        if approval.state is ApprovalState.EXPIRED:
            raise ApprovalExpired(f"approval expired before {before}")
        if approval.state is not state:
            raise ApprovalNotPending(f"approval is {approval.state.value.lower()}, not {state.value.lower()}")
        return approval

    def pending(self, approval_id: str, *, now: float) -> Approval:
        """The undecided, unexpired approval `approval_id`; changes nothing but expiry.

        Raises: ApprovalNotFound, ApprovalExpired, ApprovalNotPending.
        """
        return self._expect(approval_id, ApprovalState.PENDING, now, before="a decision")

    def approve(self, approval_id: str, *, by: str, note: str, now: float) -> Approval:
        """Raises: ApprovalNotFound, ApprovalExpired, ApprovalNotPending."""
        approval = self._expect(approval_id, ApprovalState.PENDING, now, before="a decision")
        return self._put(replace(approval, state=ApprovalState.APPROVED, decided_by=by, note=note, decided_at=now))

    def deny(self, approval_id: str, *, by: str, note: str, now: float) -> Approval:
        """Raises: ApprovalNotFound, ApprovalExpired, ApprovalNotPending."""
        approval = self._expect(approval_id, ApprovalState.PENDING, now, before="a decision")
        return self._put(replace(approval, state=ApprovalState.DENIED, decided_by=by, note=note, decided_at=now))

    def usable(self, approval_id: str, *, now: float) -> Approval:
        """The approved, unused, unexpired approval `approval_id`; changes nothing but expiry.

        Raises:
            ApprovalNotFound: unknown id.
            ApprovalExpired: it expired before it was used.
            ApprovalNotPending: it is not approved, or already used.
        """
        return self._expect(approval_id, ApprovalState.APPROVED, now, before="it was used")

    def consume(self, approval_id: str, *, now: float) -> Approval:
        """Mark an approved approval used, once.

        Raises:
            ApprovalNotFound: unknown id.
            ApprovalExpired: it expired before it was used.
            ApprovalNotPending: it is not approved, or already used.
        """
        return self._put(replace(self.usable(approval_id, now=now), state=ApprovalState.USED))

    def expire_due(self, now: float) -> list[Approval]:
        """Expire undecided or unused approvals past their expiry; forget old decided ones."""
        changed: list[Approval] = []
        while self._heap and self._heap[0][0] <= now:
            when, approval_id = heapq.heappop(self._heap)
            approval = self._approvals.get(approval_id)
            if approval is None:
                continue
            if approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED):
                changed.append(self._put(replace(approval, state=ApprovalState.EXPIRED, decided_at=now)))
                heapq.heappush(self._heap, (when + RETENTION_SECONDS, approval_id))
            elif when >= approval.expires_at + RETENTION_SECONDS:
                del self._approvals[approval_id]
            else:
                heapq.heappush(self._heap, (approval.expires_at + RETENTION_SECONDS, approval_id))
        return changed

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def list(self, *, include_decided: bool = False) -> list[Approval]:
        """Approvals ordered by request time; pending only unless `include_decided`."""
        items = [a for a in self._approvals.values() if include_decided or a.state is ApprovalState.PENDING]
        return sorted(items, key=lambda a: (a.requested_at, a.id))
