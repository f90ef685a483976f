"""Issuing a decided request: the TTL rule, the lease grant and the token, in one atomic step."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from broker.backends.base import Backend, Secret
from broker.backends.manager import Backends
from broker.domain.clock import Clock
from broker.domain.errors import AuditUnavailable, CredentialRejected, LifetimeExhausted
from broker.domain.identity import Identity
from broker.domain.intent import Intent, Lifetime, Limits, cap_ttl
from broker.jose.jws import token_hash
from broker.leases.batch import Batch
from broker.leases.table import BROKER_INITIATOR, Lease, Reason
from broker.ops.audit import AuditLog
from broker.policy.engine import Decision
from broker.store.base import LeaseStore
from broker.tokens.minter import TokenMinter

ISSUED = "ISSUED"
UNKNOWN_KID = "broker token: unknown kid"
PENDING_APPROVAL = "PENDING_APPROVAL"


@dataclass(frozen=True, slots=True)
class Settings:
    """The `[tokens]`, `[approvals]` and `[limits]` settings the use cases need."""

    issuer: str
    default_ttl: float = 300
    max_ttl: float = 3600
    max_task_lifetime: float = 8 * 3600
    max_delegation_depth: int = 3
    approval_ttl: float = 900
    # A caller waiting on more approvals than this is told to wait for a decision first.
    max_pending_approvals: int = 16
    # Tasks one principal may own at once (open, or closed but remembered until their deadline).
    max_tasks_per_principal: int = 1000
    introspectors: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class Issued:
    """The answer to Exchange, Renew and AwaitApproval."""

    state: str
    task_id: str
    access_token: str = ""
    lease: Lease | None = None
    ttl_capped_by: str = ""
    approval_id: str = ""
    secret: Secret | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything decided about a request, ready to issue (now, or after approval)."""

    intent: Intent
    subject: str
    caller: Identity
    decision: Decision
    context: Mapping[str, Any]
    parent: Lease | None = None
    actor_chain: tuple[str, ...] = ()
    not_after: float | None = None
    not_after_name: str = "subject_token"


def actor_claim(chain: tuple[str, ...]) -> dict[str, Any] | None:
    """RFC 8693 `act`: the current actor outermost, earlier actors nested inside."""
    claim: dict[str, Any] | None = None
    for actor in reversed(chain):
        claim = {"sub": actor} if claim is None else {"sub": actor, "act": claim}
    return claim


@dataclass(frozen=True, slots=True)
class _Prepared:
    lease: Lease
    deadline: float
    capped_by: str


UNDECIDED = Decision(allowed=False, policies=(), max_ttl=None, approval_required=False, errors=(), reason="")


class Issuer:
    """Grants leases and mints their tokens under the TTL rule, with a backend's secret where one serves."""

    def __init__(
        self,
        *,
        store: LeaseStore,
        minter: TokenMinter,
        audit: AuditLog,
        clock: Clock,
        settings: Settings,
        backends: Backends | None = None,
    ) -> None:
        self._store = store
        self._leases = store.table
        self._minter = minter
        self._audit = audit
        self._clock = clock
        self._settings = settings
        self._backends = backends

    def lifetime(self, plan: Plan, now: float, *, deadline: float, caller: Identity) -> Lifetime:
        """The TTL rule: the smallest cap wins, and the answer names it.

        Raises:
            LifetimeExhausted: no whole second of lifetime is left under some cap.
        """
        s = self._settings
        asked = plan.intent.ttl_seconds
        first = ("requested", float(asked)) if asked else ("default", float(s.default_ttl))
        caps: list[tuple[str, float | None]] = [
            ("max_ttl", float(s.max_ttl)),
            ("policy", float(plan.decision.max_ttl) if plan.decision.max_ttl else None),
            ("task_deadline", deadline - now),
            ("parent_lease", plan.parent.expires_at - now if plan.parent else None),
            (plan.not_after_name, plan.not_after - now if plan.not_after is not None else None),
            ("caller_credential", caller.expires_at - now),
        ]
        lifetime = cap_ttl(now, first, caps)
        if lifetime.expires_at - now < 1:
            raise LifetimeExhausted(f"no lifetime left under the {lifetime.capped_by} cap")
        return lifetime

    async def issue(self, plan: Plan, *, approval_id: str = "") -> Issued:
        """Open the task if new, grant the lease, mint its token; for a backend's audience, first its role.

        `approval_id`, when given, is used in the grant's own atomic step, so an approval is used
        at most once whichever replicas its waiters call, and only by an issuance that happens.
        All or nothing: a role made for an issuance that then fails is queued to be dropped.

        Raises:
            LifetimeExhausted: no lifetime left.
            LeaseInactive: the parent lease died meanwhile.
            TaskConflict: the task was closed or taken meanwhile (by any replica).
            StoreUnavailable: the store cannot be reached; nothing was issued.
            PermissionDenied: the backend grants nothing for an action.
            BackendUnavailable: the backend could not create the role, or the lease could not be
                granted within the provisioning deadline (the role is then dropped).
            AuditUnavailable: the token's record cannot be written; the lease is ended at once
                (AUDIT_UNAVAILABLE) and the token never leaves.
        """
        backend = self._backends.for_audience(plan.intent.audience) if self._backends else None
        if backend is None:
            return await self._commit(plan, self._prepare(plan), approval_id=approval_id)
        return await self._issue_with_secret(plan, backend, approval_id)

    async def _issue_with_secret(self, plan: Plan, backend: Backend, approval_id: str) -> Issued:
        assert self._backends is not None
        prepared = self._prepare(plan)
        role, secret = await self._backends.provision(backend, plan.intent.actions, prepared.lease.expires_at)
        prepared = replace(prepared, lease=replace(prepared.lease, backend=backend.name, role=role))
        try:
            issued = await self._commit(plan, prepared, approval_id=approval_id)
        except BaseException:
            self._backends.discard(backend.name, role, lease_id=prepared.lease.id, task_id=prepared.lease.task_id)
            raise
        self._backends.committed(backend.name, role)
        return replace(issued, secret=secret)

    def _prepare(self, plan: Plan) -> _Prepared:
        """The lease to grant, under the TTL rule as of now; checked again when granted."""
        now = self._clock.now()
        intent = plan.intent
        task = self._leases.get_task(intent.task_id)
        deadline = task.deadline if task is not None else now + self._settings.max_task_lifetime
        lifetime = self.lifetime(plan, now, deadline=deadline, caller=plan.caller)
        lease = Lease(
            id="lse_" + secrets.token_urlsafe(18),
            task_id=intent.task_id,
            subject=plan.subject,
            client_id=plan.caller.principal,
            audience=intent.audience,
            scope=intent.actions,
            resource=intent.resource,
            issued_at=now,
            expires_at=lifetime.expires_at,
            token_exp=lifetime.expires_at,
            parent_id=plan.parent.id if plan.parent else None,
            actor_chain=plan.actor_chain,
            depth=len(plan.actor_chain),
            cnf_x5t=plan.caller.x5t_s256,
            context=plan.context,
            # Only a presented subject token caps renewals: a caller who is its own subject
            # re-proves itself on each Renew and is capped by that credential then. (The type
            # says a token was presented; a plan rebuilt from its approval keeps no token.)
            not_after=plan.not_after if plan.intent.subject_token_type else None,
        )
        return _Prepared(lease=lease, deadline=deadline, capped_by=lifetime.capped_by)

    async def _commit(self, plan: Plan, prepared: _Prepared, *, approval_id: str) -> Issued:
        lease, capped_by = await self._store.execute(lambda batch: self._grant(batch, plan, prepared, approval_id))
        try:
            return self.deliver(
                lease, now=self._clock.now(), cnf=plan.caller.x5t_s256, capped_by=capped_by, approval_id=approval_id
            )
        except AuditUnavailable:
            # The decision was recorded just before; the disk failed in between. No authority
            # may exist that the trail does not show, so the new lease ends here (and the
            # approval it used, if any, is usable again: its token never left).
            now = self._clock.now()

            def withdraw(batch: Batch) -> None:
                batch.revoke(lease.id, Reason.AUDIT_UNAVAILABLE, now=now, initiator=BROKER_INITIATOR)
                if approval_id:
                    batch.release_approval(approval_id, now=now)

            await self._store.execute(withdraw)
            raise

    def _grant(self, batch: Batch, plan: Plan, prepared: _Prepared, approval_id: str) -> tuple[Lease, str]:
        # Planned against the store's current state: the task's owner and deadline, the parent,
        # whether the approval is still unused.
        now = self._clock.now()
        lease, capped_by = prepared.lease, prepared.capped_by
        if lease.backend and lease.role and self._backends is not None:
            # Past the provisioning deadline another replica may take the role for an orphan.
            self._backends.check_in_time(lease.backend, lease.role)
        if approval_id:
            batch.use_approval(approval_id, lease_id=prepared.lease.id, now=now)
        task = batch.task(plan.intent.task_id)
        if task is not None and task.deadline != prepared.deadline:
            # Another replica opened the task meanwhile: its deadline caps this lease.
            lifetime = self.lifetime(plan, now, deadline=task.deadline, caller=plan.caller)
            lease = replace(lease, expires_at=lifetime.expires_at, token_exp=lifetime.expires_at)
            capped_by = lifetime.capped_by
        if plan.parent is None:
            batch.open_task(plan.intent.task_id, plan.subject, now=now, deadline=prepared.deadline)
        return batch.grant(lease, now=now), capped_by

    async def verify_token(self, token: str, *, now: float) -> dict[str, Any]:
        """Verify a broker token minted by any replica: an unknown kid sends for the published keys once.

        Raises:
            CredentialRejected: "broker token: <rule>".
            StoreUnavailable: the store cannot be reached to learn the keys.
        """
        try:
            return self._minter.verify(token, now=now)
        except CredentialRejected as e:
            if e.reason != UNKNOWN_KID:
                raise
        await self._store.refresh_keys()
        return self._minter.verify(token, now=now)

    def deliver(
        self, lease: Lease, *, now: float, cnf: str | None, capped_by: str, renewal: bool = False, approval_id: str = ""
    ) -> Issued:
        """Mint the token for a granted or renewed lease, and audit it by hash before handing it out.

        Raises:
            AuditUnavailable: the record cannot be written (audit.on_failure = "refuse").
        """
        token = self.mint(lease, now=now, cnf=cnf)
        self._audit.require(
            "token.issued",
            lease_id=lease.id,
            task_id=lease.task_id,
            token_sha256=token_hash(token),
            expires_at=lease.expires_at,
            ttl_capped_by=capped_by,
            renewal=renewal or None,
            approval_id=approval_id or None,
        )
        return Issued(state=ISSUED, task_id=lease.task_id, access_token=token, lease=lease, ttl_capped_by=capped_by)

    def mint(self, lease: Lease, *, now: float, cnf: str | None) -> str:
        """The RFC 9068 access token for `lease`; `cnf` binds it to the caller's certificate."""
        iat = int(now)
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "sub": lease.subject,
            "aud": lease.audience,
            "exp": int(lease.expires_at),
            "iat": iat,
            "nbf": iat,
            "jti": lease.id,
            "client_id": lease.client_id,
            "scope": " ".join(lease.scope),
            "resource": lease.resource,
            "txn": lease.task_id,
        }
        act = actor_claim(lease.actor_chain)
        if act is not None:
            claims["act"] = act
        if cnf:
            claims["cnf"] = {"x5t#S256": cnf}
        return self._minter.mint(claims)
