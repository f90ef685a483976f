"""The operators' use cases: inspect and revoke leases, dry-run and reload policy, decide approvals."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.approvals.store import Approval, ApprovalChanged
from broker.backends.manager import Backends
from broker.backends.pending import PendingRevocation
from broker.domain.clock import Clock
from broker.domain.errors import InvalidRequest, LeaseNotFound
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
from broker.leases.batch import Batch
from broker.leases.events import LeaseState, state_for
from broker.leases.table import Lease, Reason
from broker.ops.audit import AuditLog
from broker.policy.engine import Decision, EntityRef, PolicyEngine
from broker.store.base import LeaseStore, ReplicaReload
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
        store: LeaseStore,
        policy: PolicyEngine,
        minter: TokenMinter,
        audit: AuditLog,
        clock: Clock,
        backends: Backends | None = None,
    ) -> None:
        self._backends = backends
        self._store = store
        self._leases = store.table
        self._policy = policy
        self._approvals = store.table.approvals
        self._minter = minter
        self._audit = audit
        self._clock = clock

    async def list_leases(self, flt: LeaseFilter, *, page_size: int, page_token: str) -> Page:
        """One page of leases in (issued_at, id) order; the token resumes after the last one.

        Raises:
            InvalidRequest: a bad page size or page token.
        """
        if page_size < 0:
            raise InvalidRequest("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        await self._store.sync()
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

    async def get_lease(self, lease_id: str) -> Lease:
        """Raises: LeaseNotFound."""
        await self._store.sync()
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

    async def revoke_lease(self, operator: Identity, lease_id: str, note: str) -> int:
        """Raises: InvalidRequest for an ill-formed lease id, LeaseNotFound."""
        check_lease_id(lease_id)
        now = self._clock.now()
        changed = await self._store.execute(
            lambda b: b.revoke(lease_id, Reason.OPERATOR, now=now, initiator=operator.principal)
        )
        return self._revoked(operator, "lease_id", lease_id, note, changed)

    async def revoke_task(self, operator: Identity, task_id: str, note: str) -> int:
        """Raises: InvalidRequest for an ill-formed task id."""
        check_task_id(task_id)
        now = self._clock.now()
        changed = await self._store.execute(
            lambda b: b.revoke_task(task_id, Reason.OPERATOR, now=now, initiator=operator.principal)
        )
        return self._revoked(operator, "task_id", task_id, note, changed)

    async def revoke_subject(self, operator: Identity, subject: str, note: str) -> int:
        """Raises: InvalidRequest for a subject that is no well-formed principal id."""
        check_principal(subject, "subject")
        now = self._clock.now()
        changed = await self._store.execute(
            lambda b: b.revoke_subject(subject, Reason.OPERATOR, now=now, initiator=operator.principal)
        )
        return self._revoked(operator, "subject", subject, note, changed)

    async def revoke_all(self, operator: Identity, note: str) -> int:
        """Revoke every lease and rotate the signing key, so no earlier token verifies anywhere."""
        now = self._clock.now()
        changed = await self._store.execute(
            lambda b: b.revoke_all(Reason.OPERATOR, now=now, initiator=operator.principal)
        )
        kid = await self._store.rotate_keys()
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

    async def reload_policy(self, operator: Identity) -> tuple[str, list[ReplicaReload]]:
        """Reload this replica's policy, then ask every other replica to reload its own.

        Returns this replica's policy version and what each other replica answered.

        Raises:
            PolicyError: this replica's file does not parse (the running policy stays; the
                others are not asked).
        """
        try:
            version = self._policy.reload()
        except Exception as e:
            self._audit.record("policy.reload_failed", operator=operator.principal, reason=str(e)[:300])
            raise
        self._audit.record("policy.reloaded", operator=operator.principal, policy_version=version)
        return version, await self._store.reload_everywhere()

    async def list_approvals(self, *, include_decided: bool) -> list[Approval]:
        """Approvals asked for through any replica (read after the store's barrier).

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        await self._store.sync()
        return self._approvals.list(include_decided=include_decided)

    async def approve(self, operator: Identity, approval_id: str, note: str) -> Approval:
        """Approve a pending request, through any replica; it is on record before it takes effect.

        Raises:
            ApprovalNotFound, ApprovalExpired, ApprovalNotPending: not a pending approval.
            PermissionDenied: one's own request.
            AuditUnavailable: the approval cannot be recorded (audit.on_failure = "refuse").
            StoreUnavailable: the store cannot be reached; nothing was decided.
        """
        return await self._decide(operator, approval_id, note, approve=True)

    async def deny(self, operator: Identity, approval_id: str, note: str) -> Approval:
        """Raises: ApprovalNotFound, ApprovalExpired, ApprovalNotPending, StoreUnavailable."""
        return await self._decide(operator, approval_id, note, approve=False)

    async def _decide(self, operator: Identity, approval_id: str, note: str, *, approve: bool) -> Approval:
        now = self._clock.now()

        def plan(batch: Batch) -> Approval:
            decided = batch.decide_approval(approval_id, approve=approve, by=operator.principal, note=note, now=now)
            event = batch.events[-1]
            assert isinstance(event, ApprovalChanged)
            self._audit.ahead(event)  # inside the batch: an approval that cannot be recorded never commits
            return decided

        return await self._store.execute(plan)
