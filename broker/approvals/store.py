"""Human approvals: what applying the approval events yields, and the rules for changing one.

An approval binds the exact request it was made for, kept as plain data (`request`, never a
token), so any replica can list it, decide it, and re-plan it when it is used. Every change is
an `ApprovalChanged` event in the lease store's log, planned by `broker.leases.batch` with the
pure transitions below and applied here: replicas that read the same log hold the same
approvals, and a waiter on any of them is woken by the event that decides its approval.
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


class Change(StrEnum):
    """What an `ApprovalChanged` event did; the audit record is `approval.<change>`."""

    REQUESTED = "requested"
    APPROVED = "approved"
    DENIED = "denied"
    USED = "used"
    RELEASED = "released"  # used by an issuance whose token could not be recorded: usable again
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Approval:
    """One request waiting for (or past) a human decision.

    `request` is the decided request as plain data (see `broker.usecases.exchange`); `lease_id`
    names the lease its use granted.
    """

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
    lease_id: str = ""
    request: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ApprovalChanged:
    """An approval was requested, decided, used, released or expired; `approval` is the record after."""

    approval: Approval
    change: Change
    at: float


# -- the rules, as pure functions of a record


def check(approval: Approval | None, state: ApprovalState, now: float, *, before: str) -> Approval:
    """`approval` if it is in `state` and not past its expiry; changes nothing.

    Raises:
        ApprovalNotFound: there is no such approval.
        ApprovalExpired: it expired (or is past its expiry) before `before`.
        ApprovalNotPending: it is in another state.
    """
    if approval is None:
        raise ApprovalNotFound("no such approval")
    # The same answer whether or not the reaper got there first.
    expired = approval.state is ApprovalState.EXPIRED or (approval.state is state and approval.expires_at <= now)
    if expired:
        raise ApprovalExpired(f"approval expired before {before}")
    if approval.state is not state:
        raise ApprovalNotPending(f"approval is {approval.state.value.lower()}, not {state.value.lower()}")
    return approval


def decided(approval: Approval, *, approve: bool, by: str, note: str, now: float) -> ApprovalChanged:
    """The event that approves or denies the pending `approval` (checked with `check` first)."""
    state, change = (ApprovalState.APPROVED, Change.APPROVED) if approve else (ApprovalState.DENIED, Change.DENIED)
    return ApprovalChanged(replace(approval, state=state, decided_by=by, note=note, decided_at=now), change, now)


def used(approval: Approval, *, lease_id: str, now: float) -> ApprovalChanged:
    """The event that uses the approved `approval` for the grant of `lease_id`."""
    return ApprovalChanged(replace(approval, state=ApprovalState.USED, lease_id=lease_id), Change.USED, now)


def released(approval: Approval, *, now: float) -> ApprovalChanged:
    """The event that gives back a used approval whose token never left: approved again."""
    return ApprovalChanged(replace(approval, state=ApprovalState.APPROVED, lease_id=""), Change.RELEASED, now)


def expired(approval: Approval, *, now: float) -> ApprovalChanged:
    """The event that expires an undecided or unused approval."""
    return ApprovalChanged(replace(approval, state=ApprovalState.EXPIRED, decided_at=now), Change.EXPIRED, now)


def is_live(approval: Approval) -> bool:
    """True while the approval can still be decided or used, so its expiry is still to come."""
    return approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED)


class ApprovalStore:
    """Every approval the broker remembers, as the approval events built them, with one expiry heap.

    `apply` is the only place state changes; the heap holds `(time, id)` entries: an approval's
    expiry while it is live, and the time it is forgotten once it is not. Entries are checked
    against the record when popped (lazy deletion), as the lease table's are.
    """

    def __init__(self) -> None:
        self._approvals: dict[str, Approval] = {}
        self._heap: list[tuple[float, str]] = []
        self._subscribers: list[Callable[[Approval], None]] = []
        self._pending_by_client: dict[str, set[str]] = {}

    @property
    def heap(self) -> list[tuple[float, str]]:
        """The expiry heap; only expiry planning pops it (`broker.leases.batch`)."""
        return self._heap

    def pending_count(self, client_id: str) -> int:
        """How many approvals `client_id` is waiting on."""
        return len(self._pending_by_client.get(client_id, ()))

    def subscribe(self, fn: Callable[[Approval], None]) -> Callable[[], None]:
        """Call `fn` with each approval after it changes; returns the unsubscribe function."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def apply(self, event: ApprovalChanged) -> None:
        """Apply one approval event; an approval already forgotten here is not brought back."""
        approval = event.approval
        known = self._approvals.get(approval.id)
        if known is None and event.change is not Change.REQUESTED:
            return
        self._approvals[approval.id] = approval
        pending = self._pending_by_client.setdefault(approval.client_id, set())
        if approval.state is ApprovalState.PENDING:
            pending.add(approval.id)
        else:
            pending.discard(approval.id)
        if not pending:
            del self._pending_by_client[approval.client_id]
        if event.change is Change.REQUESTED:
            heapq.heappush(self._heap, (approval.expires_at, approval.id))
        elif not is_live(approval):
            heapq.heappush(self._heap, (approval.expires_at + RETENTION_SECONDS, approval.id))
        for fn in list(self._subscribers):
            try:
                fn(approval)
            except Exception:
                log.exception("approval subscriber failed", extra={"approval_id": approval.id})

    def forget(self, approval_id: str, when: float) -> None:
        """Drop a decided approval whose retention entry `when` has come (local housekeeping)."""
        approval = self._approvals.get(approval_id)
        if approval is not None and not is_live(approval) and when >= approval.expires_at + RETENTION_SECONDS:
            del self._approvals[approval_id]

    def get(self, approval_id: str) -> Approval | None:
        return self._approvals.get(approval_id)

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def has_due(self, now: float) -> bool:
        return bool(self._heap) and self._heap[0][0] <= now

    def __len__(self) -> int:
        return len(self._approvals)

    def list(self, *, include_decided: bool = False) -> list[Approval]:
        """Approvals ordered by request time; pending only unless `include_decided`."""
        items = [a for a in self._approvals.values() if include_decided or a.state is ApprovalState.PENDING]
        return sorted(items, key=lambda a: (a.requested_at, a.id))
