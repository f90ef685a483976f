"""Lease and task records, and the events that change them.

A `LeaseTable` is what applying these events in order yields. The events are plain
values so that the audit trail, `WatchRevocations` and, later, a replicated log can all
read the same sequence. This module holds only values: no state, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from broker.approvals.store import ApprovalChanged

BROKER_INITIATOR = "broker"
"""The initiator recorded on changes the broker makes by itself (expiry)."""

_NO_CONTEXT: Mapping[str, Any] = MappingProxyType({})


class LeaseState(StrEnum):
    """Where a lease is in its life; only `ACTIVE` carries authority."""

    ACTIVE = "ACTIVE"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"


class Reason(StrEnum):
    """Why a lease ended (or why a task closed)."""

    TASK_COMPLETED = "TASK_COMPLETED"
    EXPIRED = "EXPIRED"
    TASK_EXPIRED = "TASK_EXPIRED"
    OPERATOR = "OPERATOR"
    PARENT_REVOKED = "PARENT_REVOKED"
    RENEWAL_DENIED = "RENEWAL_DENIED"
    # Granted, but its token's audit record could not be written: the token was never handed out.
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"


class TaskState(StrEnum):
    """A task is open until completed by its owner, revoked by an operator, or past its deadline."""

    OPEN = "OPEN"
    COMPLETED = "COMPLETED"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"


def state_for(reason: Reason) -> LeaseState:
    """The state a lease ends in for `reason`: time-driven ends are EXPIRED, the rest REVOKED."""
    if reason is Reason.EXPIRED or reason is Reason.TASK_EXPIRED:
        return LeaseState.EXPIRED
    return LeaseState.REVOKED


@dataclass(frozen=True, slots=True)
class Lease:
    """One issued credential's record; kept as a tombstone after it ends until `token_exp`.

    `token_exp` is the latest `exp` of any token minted for this lease: until then a
    token may still be presented, so the ended record must stay to answer "inactive".
    `actor_chain` lists the current actor first; `depth` is the delegation depth.
    `context` is the policy context the lease was decided with (re-checked on renewal) and
    `not_after` the subject token's own expiry, a cap on renewals and on delegated leases;
    the table stores both and never reads them. `backend` and `role` name the downstream
    credential (a database login role) that lives and dies with the lease, when there is one.
    """

    id: str
    task_id: str
    subject: str
    client_id: str
    audience: str
    scope: tuple[str, ...]
    resource: str
    issued_at: float
    expires_at: float
    token_exp: float
    parent_id: str | None = None
    actor_chain: tuple[str, ...] = ()
    depth: int = 0
    cnf_x5t: str | None = None
    state: LeaseState = LeaseState.ACTIVE
    ended_at: float | None = None
    reason: Reason | None = None
    initiator: str | None = None
    context: Mapping[str, Any] = field(default_factory=lambda: _NO_CONTEXT, hash=False)
    not_after: float | None = None
    backend: str | None = None
    role: str | None = None

    def is_active(self, now: float) -> bool:
        """True while the lease is ACTIVE and `now` is before its expiry."""
        return self.state is LeaseState.ACTIVE and now < self.expires_at

    def ended(self, reason: Reason, *, at: float, initiator: str) -> Lease:
        """This record as ended by `reason` at `at` (state from `state_for(reason)`)."""
        # Positional on purpose: twice as fast as dataclasses.replace, and expiry of a large
        # table builds one of these per lease. A test checks it against replace().
        return Lease(
            self.id,
            self.task_id,
            self.subject,
            self.client_id,
            self.audience,
            self.scope,
            self.resource,
            self.issued_at,
            self.expires_at,
            self.token_exp,
            self.parent_id,
            self.actor_chain,
            self.depth,
            self.cnf_x5t,
            state_for(reason),
            at,
            reason,
            initiator,
            self.context,
            self.not_after,
            self.backend,
            self.role,
        )


@dataclass(frozen=True, slots=True)
class Task:
    """A unit of work `(id, owner)`; leases are granted under an OPEN task only."""

    id: str
    owner: str
    created_at: float
    deadline: float
    state: TaskState = TaskState.OPEN
    ended_at: float | None = None
    reason: Reason | None = None

    def is_open(self, now: float) -> bool:
        """True while the task is OPEN and `now` is before its deadline (even if not yet reaped)."""
        return self.state is TaskState.OPEN and now < self.deadline


@dataclass(frozen=True, slots=True)
class TaskOpened:
    """A task was created."""

    task: Task
    at: float


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """A lease was granted; `lease` is the record as stored."""

    lease: Lease
    at: float


@dataclass(frozen=True, slots=True)
class LeaseRenewed:
    """A lease got a new expiry; `token_exp` is the resulting value, not the minted token's."""

    lease_id: str
    expires_at: float
    token_exp: float
    at: float


@dataclass(frozen=True, slots=True)
class LeaseEnded:
    """A lease was revoked or expired; `lease` is the record after the change."""

    lease: Lease
    at: float


@dataclass(frozen=True, slots=True)
class TaskClosed:
    """A task was completed or expired; `task` is the record after the change."""

    task: Task
    at: float


Event = TaskOpened | LeaseGranted | LeaseRenewed | LeaseEnded | TaskClosed | ApprovalChanged
