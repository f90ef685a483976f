"""The operators' use cases: inspect and revoke leases, dry-run and reload policy, decide approvals."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.approvals.store import Approval, ApprovalStore
from broker.backends.manager import Backends
from broker.backends.pending import PendingRevocation
from broker.domain.clock import Clock
from broker.domain.errors import InvalidRequest, LeaseNotFound, PermissionDenied
from broker.domain.identity import Identity
from broker.domain.intent import (
    Limits,
    check_actions,
    check_context,
    check_lease_id,
    check_principal,
    check_resource,
    check_task_id,
)
from broker.leases.events import LeaseState, state_for
from broker.leases.table import Lease, LeaseTable, Reason
from broker.ops.audit import AuditLog
from broker.policy.engine import Decision, EntityRef, PolicyEngine
from broker.tokens.minter import TokenMinter

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_ONE = Limits(max_actions=1)
_CONTEXT = Limits()


@dataclass(frozen=True, slots=True)
class LeaseFilter:
    task_id: str = ""
    subject: str = ""
    audience: str = ""
    include_inactive: bool = False
    # Only leases whose downstream role is still to be dropped (ended leases, so inactive ones too).
    revoke_pending: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    leases: tuple[Lease, ...]
    next_page_token: str


def _encode_token(lease: Lease, flt: LeaseFilter) -> str:
    raw = json.dumps([lease.issued_at, lease.id, list(_filter_key(flt))], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _filter_key(flt: LeaseFilter) -> tuple[str, str, str, bool, bool]:
    return (flt.task_id, flt.subject, flt.audience, flt.include_inactive, flt.revoke_pending)


def _decode_token(token: str, flt: LeaseFilter) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        issued_at, lease_id, key = json.loads(raw)
        position = (float(issued_at), str(lease_id))
        key = tuple(key)
    except (ValueError, TypeError, RecursionError, binascii.Error) as e:
        raise InvalidRequest("page_token is not one this broker issued") from e
    if key != _filter_key(flt):
        raise InvalidRequest("page_token belongs to a listing with other filters")
    return position


# Context keys an operator may set in a dry run; every other entry goes under `context.request`.
_DRY_RUN_KEYS = {
    "task_id": str,
    "audience": str,
    "ttl_seconds": int,
    "auth": str,
    "trust_domain": str,
    "issuer": str,
    "client_id": str,
    "delegated": bool,
    "delegation_depth": int,
    "actor": str,
}


def _typed(key: str, value: str) -> Any:
    kind = _DRY_RUN_KEYS[key]
    if kind is bool:
        if value not in ("true", "false"):
            raise InvalidRequest(f"context: {key} must be true or false")
        return value == "true"
    if kind is int:
        if not (value.isascii() and value.isdigit()):
            raise InvalidRequest(f"context: {key} must be a whole number")
        return int(value)
    return value


def dry_run_context(principal: str, context: Mapping[str, str]) -> dict[str, Any]:
    """The Cedar context of a real exchange, with defaults an operator's entries override.

    Defaults describe a direct (not delegated) X.509-SVID caller for a SPIFFE principal and an
    OIDC caller otherwise, so policies reading `context.auth` evaluate as they would for real.
    """
    spiffe = principal.startswith("spiffe://")
    ctx: dict[str, Any] = {
        "task_id": "",
        "audience": "",
        "ttl_seconds": 0,
        "auth": "x509-svid" if spiffe else "oidc",
        "trust_domain": principal[9:].split("/", 1)[0] if spiffe else "",
        "issuer": "",
        "client_id": principal,
        "delegated": False,
        "delegation_depth": 0,
        "actor": "",
        "claims": {},
        "request": {},
    }
    for key, value in context.items():
        if key in _DRY_RUN_KEYS:
            ctx[key] = _typed(key, value)
        else:
            ctx["request"][key] = value
    if ctx["actor"]:
        ctx["actor_entity"] = EntityRef("Workload", ctx["actor"])
    return ctx


def _pending_view(record: PendingRevocation) -> Lease:
    """What is left to show of a forgotten lease whose revocation is pending: never hidden, never abandoned."""
    reason = Reason(record.cause) if record.cause in Reason.__members__ else None
    return Lease(
        id=record.lease_id, task_id=record.task_id, subject="", client_id="", audience="", scope=(), resource="",
        issued_at=record.since, expires_at=record.since, token_exp=record.since,
        state=state_for(reason) if reason else LeaseState.REVOKED, ended_at=record.since, reason=reason,
        backend=record.backend, role=record.role,
    )  # fmt: skip


def _matches(lease: Lease, flt: LeaseFilter) -> bool:
    # A forgotten lease keeps only its task: a subject or audience filter cannot match it.
    return not flt.subject and not flt.audience and flt.task_id in ("", lease.task_id)


class Admin:
    """What `BrokerAdmin` does, minus gRPC. The caller is an already-checked operator."""

    def __init__(
        self,
        *,
        leases: LeaseTable,
        policy: PolicyEngine,
        approvals: ApprovalStore,
        minter: TokenMinter,
        audit: AuditLog,
        clock: Clock,
        backends: Backends | None = None,
    ) -> None:
        self._backends = backends
        self._leases = leases
        self._policy = policy
        self._approvals = approvals
        self._minter = minter
        self._audit = audit
        self._clock = clock

    def list_leases(self, flt: LeaseFilter, *, page_size: int, page_token: str) -> Page:
        """One page of leases in (issued_at, id) order; the token resumes after the last one.

        Raises:
            InvalidRequest: a bad page size or page token.
        """
        if page_size < 0:
            raise InvalidRequest("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        items = self._leases.list(
            task_id=flt.task_id or None,
            subject=flt.subject or None,
            audience=flt.audience or None,
            include_inactive=flt.include_inactive or flt.revoke_pending,
        )
        if flt.revoke_pending:
            items = [lease for lease in items if self.revocation(lease.id) is not None]
            items += [view for view in self._forgotten_pending() if _matches(view, flt)]
            items.sort(key=lambda lease: (lease.issued_at, lease.id))
        if page_token:
            after = _decode_token(page_token, flt)
            items = [lease for lease in items if (lease.issued_at, lease.id) > after]
        page = tuple(items[:size])
        more = len(items) > size
        return Page(leases=page, next_page_token=_encode_token(page[-1], flt) if more else "")

    def get_lease(self, lease_id: str) -> Lease:
        """Raises: LeaseNotFound."""
        lease = self._leases.get(lease_id)
        if lease is None:
            pending = self.revocation(lease_id)
            if pending is None:
                raise LeaseNotFound("no such lease")
            return _pending_view(pending)
        return lease

    def _forgotten_pending(self) -> list[Lease]:
        """Leases the table has forgotten (tombstone purged) whose role still waits to be dropped."""
        if self._backends is None:
            return []
        return [
            _pending_view(record)
            for record in self._backends.pending()
            if record.lease_id and self._leases.get(record.lease_id) is None
        ]

    def children(self, lease_id: str) -> tuple[str, ...]:
        return self._leases.children(lease_id)

    def revocation(self, lease_id: str) -> PendingRevocation | None:
        """The lease's downstream revocation still to do, if it has one."""
        return self._backends.pending_for(lease_id) if self._backends is not None else None

    def _revoked(self, operator: Identity, selector: str, value: str, note: str, changed: list[Lease]) -> int:
        self._audit.record(
            "operator.revoke",
            operator=operator.principal,
            selector=selector,
            value=value,
            note=note or None,
            revoked_count=len(changed),
        )
        return len(changed)

    def revoke_lease(self, operator: Identity, lease_id: str, note: str) -> int:
        """Raises: InvalidRequest for an ill-formed lease id, LeaseNotFound."""
        check_lease_id(lease_id)
        now = self._clock.now()
        changed = self._leases.revoke(lease_id, Reason.OPERATOR, now=now, initiator=operator.principal)
        return self._revoked(operator, "lease_id", lease_id, note, changed)

    def revoke_task(self, operator: Identity, task_id: str, note: str) -> int:
        """Raises: InvalidRequest for an ill-formed task id."""
        check_task_id(task_id)
        now = self._clock.now()
        changed = self._leases.revoke_task(task_id, Reason.OPERATOR, now=now, initiator=operator.principal)
        return self._revoked(operator, "task_id", task_id, note, changed)

    def revoke_subject(self, operator: Identity, subject: str, note: str) -> int:
        """Raises: InvalidRequest for a subject that is no well-formed principal id."""
        check_principal(subject, "subject")
        now = self._clock.now()
        changed = self._leases.revoke_subject(subject, Reason.OPERATOR, now=now, initiator=operator.principal)
        return self._revoked(operator, "subject", subject, note, changed)

    def revoke_all(self, operator: Identity, note: str) -> int:
        """Revoke every lease and rotate the signing key, so no earlier token verifies anywhere."""
        now = self._clock.now()
        changed = self._leases.revoke_all(Reason.OPERATOR, now=now, initiator=operator.principal)
        kid = self._minter.rotate(keep_previous_until=None)
        self._audit.record("signing_key.rotated", operator=operator.principal, kid=kid)
        return self._revoked(operator, "all", "true", note, changed)

    def check_policy(self, principal: str, action: str, resource: str, context: Mapping[str, str]) -> Decision:
        """A dry run of one decision; changes nothing.

        Raises:
            InvalidRequest: a missing or ill-formed principal, action or resource (the rules of
                Exchange), or a bad context.
        """
        check_principal(principal)
        check_actions([action], _ONE)
        check_resource(resource)
        return self._policy.decide(
            principal, action, resource, dry_run_context(principal, check_context(context, _CONTEXT))
        )

    def reload_policy(self, operator: Identity) -> str:
        """Raises: PolicyError, leaving the running policy in force."""
        try:
            version = self._policy.reload()
        except Exception as e:
            self._audit.record("policy.reload_failed", operator=operator.principal, reason=str(e)[:300])
            raise
        self._audit.record("policy.reloaded", operator=operator.principal, policy_version=version)
        return version

    def list_approvals(self, *, include_decided: bool) -> list[Approval]:
        return self._approvals.list(include_decided=include_decided)

    def approve(self, operator: Identity, approval_id: str, note: str) -> Approval:
        """Approve a pending request; the approval is on record before it takes effect.

        Raises:
            ApprovalNotFound, ApprovalExpired, ApprovalNotPending: not a pending approval.
            PermissionDenied: one's own request.
            AuditUnavailable: the approval cannot be recorded (audit.on_failure = "refuse").
        """
        now = self._clock.now()
        found = self._approvals.get(approval_id)
        if found is not None and operator.principal in (found.principal, found.client_id):
            raise PermissionDenied("an operator cannot approve their own request")
        pending = self._approvals.pending(approval_id, now=now)
        self._audit.require(
            "approval.approved",
            approval_id=pending.id,
            operator=operator.principal,
            note=note or None,
            principal=pending.principal,
            task_id=pending.task_id,
        )
        # No await between the record and the change: the approval cannot change meanwhile.
        return self._approvals.approve(approval_id, by=operator.principal, note=note, now=now)

    def deny(self, operator: Identity, approval_id: str, note: str) -> Approval:
        """Raises: ApprovalNotFound, ApprovalExpired, ApprovalNotPending."""
        approval = self._approvals.deny(approval_id, by=operator.principal, note=note, now=self._clock.now())
        return self._decided("approval.denied", approval)

    def _decided(self, kind: str, approval: Approval) -> Approval:
        self._audit.record(
            kind,
            approval_id=approval.id,
            operator=approval.decided_by,
            note=approval.note or None,
            principal=approval.principal,
            task_id=approval.task_id,
        )
        return approval
