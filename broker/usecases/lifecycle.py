"""What agents and resource servers do with a lease after it is issued: renew, complete, introspect."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from broker.backends.manager import Backends
from broker.domain.clock import Clock
from broker.domain.errors import CredentialRejected, LeaseInactive, LeaseNotFound, PermissionDenied, PolicyDenied
from broker.domain.identity import Identity, matches_any
from broker.domain.intent import Intent, check_task_id
from broker.leases.batch import Batch
from broker.leases.table import Lease, LeaseState, Reason
from broker.ops.audit import AuditLog, Decided
from broker.policy.engine import Decision, PolicyEngine
from broker.store.base import LeaseStore
from broker.tokens.minter import TokenMinter
from broker.usecases.issuance import Issued, Issuer, Plan, Settings


@dataclass(frozen=True, slots=True)
class Introspection:
    """RFC 7662 meaning: only `active` is set for an inactive token."""

    active: bool
    lease: Lease | None = None
    expires_at: float = 0


class Leasing:
    """Renew, complete and introspect."""

    def __init__(
        self,
        *,
        policy: PolicyEngine,
        store: LeaseStore,
        minter: TokenMinter,
        issuer: Issuer,
        audit: AuditLog,
        clock: Clock,
        settings: Settings,
        backends: Backends | None = None,
    ) -> None:
        self._backends = backends
        self._policy = policy
        self._store = store
        self._leases = store.table
        self._minter = minter
        self._issuer = issuer
        self._audit = audit
        self._clock = clock
        self._settings = settings

    async def barrier(self) -> None:
        """Bring this broker up to every change any replica has committed (a resumed watch).

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        await self._store.sync()

    async def renew(self, caller: Identity, lease_id: str, ttl_seconds: int) -> Issued:
        """A fresh token for the caller's lease, with policy re-checked, and its secret's expiry moved.

        Raises:
            LeaseNotFound: no such lease held by the caller.
            LeaseInactive: the lease is revoked or expired.
            PolicyDenied: policy now refuses it (the lease is then revoked, RENEWAL_DENIED),
                or it needs a fresh human approval.
            AuditUnavailable: the decision or the token cannot be recorded; the lease is unchanged
                unless the token's record failed after the decision's was written.
            BackendUnavailable: the lease's backend could not move its role's expiry (the lease
                keeps its old expiry).
            StoreUnavailable: the store cannot be reached; nothing changed.
        """
        await self._store.sync()
        now = self._clock.now()
        lease = self._held_lease(caller, lease_id, now)
        context = {**lease.context, "ttl_seconds": int(ttl_seconds or self._settings.default_ttl)}
        decision = await self._recheck(caller, lease, context, now)
        plan = Plan(
            intent=_renewal_intent(lease, ttl_seconds),
            subject=lease.subject,
            caller=caller,
            decision=decision,
            context=context,
            parent=self._leases.get(lease.parent_id) if lease.parent_id else None,
            actor_chain=lease.actor_chain,
            not_after=lease.not_after,
        )
        task = self._leases.get_task(lease.task_id)
        lifetime = self._issuer.lifetime(plan, now, deadline=task.deadline if task else now, caller=caller)
        secret = None
        if lease.role is not None and self._backends is not None:
            # The role's own expiry moves first: a failure leaves both halves as they were.
            secret = await self._backends.renew(lease, lifetime.expires_at)
            now = self._clock.now()
            self._held_lease(caller, lease_id, now)  # it may have ended while the database answered
        expires_at = lifetime.expires_at
        renewed = await self._store.execute(
            lambda batch: batch.renew(lease.id, expires_at=expires_at, token_exp=expires_at, now=self._clock.now())
        )
        issued = self._issuer.deliver(renewed, now=now, cnf=caller.x5t_s256, capped_by=lifetime.capped_by, renewal=True)
        return replace(issued, secret=secret)

    def _held_lease(self, caller: Identity, lease_id: str, now: float) -> Lease:
        """The caller's active lease, renewable over this credential.

        Raises:
            LeaseNotFound: no such lease held by the caller, or a certificate-bound lease
                presented without a certificate.
            LeaseInactive: the lease is revoked or expired.
        """
        lease = self._leases.get(lease_id)
        if lease is None or lease.client_id != caller.principal:
            raise LeaseNotFound("no such lease")
        # A certificate-bound lease is renewed only by a certificate holder (possibly a rotated
        # SVID of the same id): a replayable bearer token must not turn it into a bearer lease.
        if lease.cnf_x5t is not None and caller.x5t_s256 is None:
            raise LeaseNotFound("no such lease held by this credential: renew it over mTLS")
        if not lease.is_active(now):
            raise LeaseInactive(f"lease is {_state_word(lease)}")
        return lease

    async def _recheck(self, caller: Identity, lease: Lease, context: dict[str, Any], now: float) -> Decision:
        """Decide the lease's scope again under today's policy, and audit the decision.

        Raises:
            PolicyDenied: policy now refuses it (the lease is then revoked, RENEWAL_DENIED),
                or it needs a fresh human approval.
        """
        decision = self._policy.decide_all(lease.subject, lease.scope, lease.resource, context)
        # A renewal needs its decision on record first; a refusal (and its revocation) goes ahead regardless.
        renews = decision.allowed and not decision.approval_required
        decided = Decided(
            principal=lease.subject,
            client_id=caller.principal,
            lease_id=lease.id,
            task_id=lease.task_id,
            actions=lease.scope,
            resource=lease.resource,
            audience=lease.audience,
            allowed=decision.allowed,
            policies=decision.policies,
            reason=decision.reason,
            renewal=True,
        )
        self._audit.decision(decided, required=renews)
        if not decision.allowed:
            await self._store.execute(
                lambda batch: batch.revoke(lease.id, Reason.RENEWAL_DENIED, now=now, initiator=caller.principal)
            )
            raise PolicyDenied(f"renewal denied: {decision.reason}", decision.policies)
        if decision.approval_required:
            raise PolicyDenied("renewal needs a fresh approval: exchange again", decision.policies)
        return decision

    async def complete_task(self, caller: Identity, task_id: str) -> int:
        """Revoke every lease of the caller's task and close it; returns how many changed.

        The task's owner may complete it, and so may a client that obtained a root lease in it
        on the owner's behalf (an agent that exchanged its user's token): ending authority early
        is never a risk.

        Raises:
            InvalidRequest: the task id is ill-formed.
            TaskNotFound: no such task.
            TaskConflict: the caller neither owns the task nor obtained a root lease in it.
            StoreUnavailable: the store cannot be reached; nothing changed.
        """
        check_task_id(task_id)
        now = self._clock.now()
        return len(await self._store.execute(lambda batch: self._complete(batch, caller, task_id, now)))

    def _complete(self, batch: Batch, caller: Identity, task_id: str, now: float) -> list[Lease]:
        task = batch.task(task_id)
        owner = caller.principal
        if task is not None and task.owner != owner and self._opened_for(batch, task_id, caller.principal):
            owner = task.owner
        return batch.complete_task(task_id, owner=owner, now=now, initiator=caller.principal)

    def _opened_for(self, batch: Batch, task_id: str, client_id: str) -> bool:
        leases = (batch.lease(i) for i in self._leases.lease_ids_of_task(task_id))
        return any(lease is not None and lease.client_id == client_id and lease.parent_id is None for lease in leases)

    async def introspect(self, caller: Identity, token: str) -> Introspection:
        """RFC 7662: is this broker token active, and what does it grant?

        Answered after the store's barrier: a revocation that returned on any replica is seen.

        Raises:
            PermissionDenied: the caller is neither the token's audience nor an introspector.
            StoreUnavailable: the store cannot be reached (never a stale "active").
        """
        introspector = matches_any(caller.principal, self._settings.introspectors)
        try:
            claims = await self._issuer.verify_token(token, now=self._clock.now())
        except CredentialRejected:
            return Introspection(active=False)
        await self._store.sync()
        now = self._clock.now()
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if not introspector and caller.principal not in audiences:
            raise PermissionDenied("only the token's audience or a configured introspector may introspect it")
        lease = self._leases.get(str(claims.get("jti")))
        if lease is None or not lease.is_active(now):
            return Introspection(active=False)
        # A renewal may have shortened the lease below this token's own exp.
        return Introspection(active=True, lease=lease, expires_at=min(float(claims["exp"]), lease.expires_at))


def _renewal_intent(lease: Lease, ttl_seconds: int) -> Intent:
    """The request a renewal stands for: the lease's own task, audience, scope and resource."""
    return Intent(
        task_id=lease.task_id,
        audience=lease.audience,
        actions=lease.scope,
        resource=lease.resource,
        ttl_seconds=ttl_seconds,
    )


def _state_word(lease: Lease) -> str:
    return "expired" if lease.state is LeaseState.ACTIVE else lease.state.value.lower()
