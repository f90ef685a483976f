"""The exchange use case: from a proven identity and an intent to a credential, or an approval to await.

An exchange: verify the subject, check the task, decide with policy, then (in one block with
no `await`, so atomic on the event loop) open the task, grant the lease and mint the token.
A request that fails at any step changes no state.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace

from broker.approvals.store import Approval, ApprovalState, check
from broker.backends.manager import Backends
from broker.domain.clock import Clock
from broker.domain.errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalNotPending,
    BrokerError,
    CredentialRejected,
    LeaseInactive,
    PermissionDenied,
    PolicyDenied,
    QuotaExceeded,
    TaskConflict,
)
from broker.domain.identity import AuthKind, Identity
from broker.domain.intent import Intent
from broker.leases.table import Lease, TaskState
from broker.ops.audit import AuditLog, Decided
from broker.policy.engine import Decision, EntityRef, PolicyEngine
from broker.store.base import LeaseStore
from broker.tokens.minter import TokenMinter
from broker.usecases.issuance import PENDING_APPROVAL, UNDECIDED, Issued, Issuer, Plan, Settings
from broker.usecases.plans import plan_data, plan_from
from broker.verify import Verifiers


class Exchange:
    """Exchange, renew, complete, introspect and await approval."""

    def __init__(
        self,
        *,
        verifiers: Verifiers,
        policy: PolicyEngine,
        store: LeaseStore,
        minter: TokenMinter,
        issuer: Issuer,
        audit: AuditLog,
        clock: Clock,
        settings: Settings,
        backends: Backends | None = None,
    ) -> None:
        self._issuer = issuer
        self._backends = backends
        self._verifiers = verifiers
        self._policy = policy
        self._store = store
        self._leases = store.table
        self._minter = minter
        self._approvals = approvals = store.table.approvals
        self._audit = audit
        self._clock = clock
        self._settings = settings
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        approvals.subscribe(self._on_approval)

    async def exchange(self, caller: Identity, intent: Intent) -> Issued:
        """Decide on `intent` for `caller` and issue a credential or a pending approval.

        Raises:
            CredentialRejected: the subject token does not verify, or its lease is dead.
            IssuerUnavailable: an OIDC issuer's keys cannot be fetched.
            TaskConflict: the task belongs to someone else, is closed, or a delegation leaves it.
            PolicyDenied: policy says no, or a delegation asks for more than its parent holds.
            PermissionDenied: the delegation chain would be deeper than allowed.
            LifetimeExhausted: no lifetime is left under the caps.
            AuditUnavailable: the decision or the token cannot be recorded (audit.on_failure = "refuse").
            BackendUnavailable: the audience's backend could not create the login.
        """
        try:
            plan = await self._plan(caller, intent)
            self._check_task(plan)
            if self._backends is not None:
                # Decided before anything is provisioned, and before an approval is asked for.
                self._backends.check_grants(plan.intent.audience, plan.intent.actions)
        except BrokerError as e:
            # Refused before policy ran (bad subject token, task conflict, delegation limits):
            # still a decision, so still an audit record.
            self._audit_refusal(caller, intent, e)
            raise
        decision = self._decide(plan)
        plan = replace(plan, decision=decision)
        if decision.approval_required:
            return await self._hold_for_approval(plan)
        return await self._issuer.issue(plan)

    def _audit_refusal(self, caller: Identity, intent: Intent, error: BrokerError) -> None:
        refused = Decided(
            client_id=caller.principal,
            auth=caller.kind.value,
            task_id=intent.task_id,
            actions=intent.actions,
            resource=intent.resource or None,
            audience=intent.audience or None,
            delegated=intent.delegated,
            allowed=False,
            reason=error.reason,
        )
        self._audit.decision(refused, required=False)

    async def _plan(self, caller: Identity, intent: Intent) -> Plan:
        now = self._clock.now()
        if intent.delegated:
            parent, token_exp = await self._live_parent(intent.subject_token, now)
            return self._delegation_plan(caller, intent, parent, token_exp)
        if intent.subject_token:
            subject = await self._verifiers.verify_token(
                intent.subject_token, now=now, token_type=intent.subject_token_type
            )
            return self._root_plan(caller, subject, intent, not_after=subject.expires_at, name="subject_token")
        name = "subject_svid" if caller.kind is AuthKind.X509_SVID else "subject_token"
        return self._root_plan(caller, caller, intent, not_after=caller.expires_at, name=name)

    def _root_plan(self, caller: Identity, subject: Identity, intent: Intent, *, not_after: float, name: str) -> Plan:
        context = self._context(intent, subject=subject, caller=caller, depth=0, actor="")
        return Plan(
            intent=intent,
            subject=subject.principal,
            caller=caller,
            decision=UNDECIDED,
            context=context,
            not_after=not_after,
            not_after_name=name,
        )

    def _delegation_plan(self, caller: Identity, intent: Intent, parent: Lease, token_exp: float) -> Plan:
        if parent.cnf_x5t is not None and caller.x5t_s256 is None:
            # A child is bound to its presenter's certificate; a bound parent never yields an unbound child.
            raise PermissionDenied("a certificate-bound token can only be delegated over mTLS")
        depth = parent.depth + 1
        if depth > self._settings.max_delegation_depth:
            raise PermissionDenied(
                f"delegation depth {depth} exceeds max_delegation_depth {self._settings.max_delegation_depth}"
            )
        intent = _inherit(intent, parent)
        missing = [a for a in intent.actions if a not in parent.scope]
        if missing:
            raise PolicyDenied(f"delegation cannot widen scope: {missing[0]} is not held by the parent lease")
        subject = _parent_subject(parent, caller)
        context = self._context(intent, subject=subject, caller=caller, depth=depth, actor=caller.principal)
        return Plan(
            intent=intent,
            subject=parent.subject,
            caller=caller,
            decision=UNDECIDED,
            context=context,
            parent=parent,
            actor_chain=(caller.principal, *parent.actor_chain),
            # The presented token may be an older one of a since-renewed lease: the delegation
            # must not outlive the token that was handed over, only the lease behind it.
            not_after=token_exp if parent.not_after is None else min(parent.not_after, token_exp),
            not_after_name="subject_token",
        )

    async def _live_parent(self, token: str, now: float) -> tuple[Lease, float]:
        """The live lease a presented broker token stands for, and that token's own `exp`.

        Read after the store's barrier: a revocation that returned on any replica is seen.
        """
        claims = await self._issuer.verify_token(token, now=now)
        await self._store.sync()
        parent = self._leases.get(str(claims.get("jti", "")))
        if parent is None or not parent.is_active(now):
            raise CredentialRejected("broker token: its lease is not active")
        return parent, float(claims["exp"])

    def _context(self, intent: Intent, *, subject: Identity, caller: Identity, depth: int, actor: str) -> dict:
        context = {
            "task_id": intent.task_id,
            "audience": intent.audience,
            "ttl_seconds": int(intent.ttl_seconds or self._settings.default_ttl),
            "auth": caller.kind.value if depth else subject.kind.value,
            "trust_domain": subject.trust_domain or "",
            "issuer": subject.issuer or "",
            "client_id": caller.principal,
            "delegated": depth > 0,
            "delegation_depth": depth,
            "actor": actor,
            "claims": dict(subject.claims),
            "request": dict(intent.context),
        }
        if actor:
            # The acting agent as an entity, so policy can test its groups: `context.actor_entity in Team::"x"`.
            context["actor_entity"] = EntityRef("Workload", actor)
        return context

    def _check_task(self, plan: Plan) -> None:
        task = self._leases.get_task(plan.intent.task_id)
        if plan.parent is not None:
            if task is None or task.state is not TaskState.OPEN:
                raise TaskConflict("the parent lease's task is closed")
            return
        if task is None:
            limit = self._settings.max_tasks_per_principal
            if self._leases.tasks_of(plan.subject) >= limit:
                raise QuotaExceeded(f"{plan.subject} already has {limit} tasks: complete some, or reuse one")
            return
        if task.owner != plan.subject:
            raise TaskConflict("task id belongs to another principal")
        if task.state is not TaskState.OPEN:
            raise TaskConflict(f"task is {task.state.value.lower()}")

    def _decide(self, plan: Plan) -> Decision:
        intent = plan.intent
        decision = self._policy.decide_all(plan.subject, intent.actions, intent.resource, plan.context)
        decided = Decided(
            principal=plan.subject,
            client_id=plan.caller.principal,
            auth=plan.context["auth"],
            task_id=intent.task_id,
            actions=intent.actions,
            resource=intent.resource,
            audience=intent.audience,
            allowed=decision.allowed,
            policies=decision.policies,
            reason=decision.reason,
            approval_required=decision.approval_required,
            parent_lease_id=plan.parent.id if plan.parent else None,
        )
        # A grant (or a held approval) needs its decision on record first; a refusal goes out regardless.
        self._audit.decision(decided, required=decision.allowed)
        if not decision.allowed:
            raise PolicyDenied(decision.reason, decision.policies)
        return decision

    async def _hold_for_approval(self, plan: Plan) -> Issued:
        now = self._clock.now()
        intent = plan.intent
        approval = Approval(
            id="apr_" + secrets.token_urlsafe(12),
            principal=plan.subject,
            client_id=plan.caller.principal,
            task_id=intent.task_id,
            audience=intent.audience,
            actions=intent.actions,
            resource=intent.resource,
            ttl_seconds=intent.ttl_seconds,
            requested_at=now,
            expires_at=now + self._settings.approval_ttl,
            context=intent.context,
            policies=plan.decision.policies,
            request=plan_data(plan),
        )
        limit = self._settings.max_pending_approvals
        await self._store.execute(lambda batch: batch.request_approval(approval, now=now, max_pending=limit))
        return Issued(state=PENDING_APPROVAL, task_id=intent.task_id, approval_id=approval.id)

    async def await_approval(self, caller: Identity, approval_id: str) -> Issued:
        """Wait for an operator's decision, then issue exactly what was approved, once.

        Raises:
            ApprovalNotFound: no such approval asked for by the caller.
            ApprovalDenied: an operator said no.
            ApprovalExpired: nobody decided in time.
            ApprovalNotPending: it was already used.
            PolicyDenied: the policy in force now refuses the approved request.
            LeaseInactive: the parent lease of an approved delegation died meanwhile.
            TaskConflict: the task was closed or taken meanwhile.
        """
        await self._store.sync()  # an approval asked for, or decided, through another replica is seen
        while True:
            approval = self._approvals.get(approval_id)
            if approval is None or approval.client_id != caller.principal:
                raise ApprovalNotFound("no such approval")
            if approval.state is ApprovalState.PENDING:
                await self._wait_for_change(approval_id)
                continue
            if approval.state is ApprovalState.DENIED:
                raise ApprovalDenied(f"denied by an operator: {approval.note}" if approval.note else "denied")
            if approval.state is ApprovalState.EXPIRED:
                unused = "it was used" if approval.decided_by else "an operator decided"
                raise ApprovalExpired(f"approval expired before {unused}")
            if approval.state is ApprovalState.USED:
                raise ApprovalNotPending("approval already used")
            return await self._issue_approved(approval)

    async def _issue_approved(self, approval: Approval) -> Issued:
        # The approval is used by the issuance it allows, in the grant's own atomic step (so two
        # waiters, on any replicas, cannot both use it), and stays unused when that fails (a new
        # forbid, the task closed or the parent revoked meanwhile, the store down).
        await self._store.sync()
        now = self._clock.now()
        check(self._approvals.get(approval.id), ApprovalState.APPROVED, now, before="it was used")
        parent = None
        parent_id = approval.request.get("parent_id")
        if parent_id:
            # The parent may have been renewed (shorter) or ended while the approval waited.
            parent = self._leases.get(str(parent_id))
            if parent is None or not parent.is_active(now):
                raise LeaseInactive("the parent lease ended while the approval was pending")
        try:
            plan = plan_from(approval.request, parent)
        except ValueError as e:  # written by another version of the broker: refused, never guessed at
            raise ApprovalNotPending("the approved request cannot be read by this broker: exchange again") from e
        # An approval vouches for the request, not for the policy: a forbid added since still wins.
        plan = replace(plan, decision=self._decide(plan))
        return await self._issuer.issue(plan, approval_id=approval.id)

    def waiting(self, approval_id: str) -> int:
        """How many AwaitApproval calls are waiting on `approval_id` right now."""
        return len(self._waiters.get(approval_id, ()))

    async def _wait_for_change(self, approval_id: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(approval_id, []).append(fut)
        try:
            await fut
        finally:
            waiters = self._waiters.get(approval_id, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiters.pop(approval_id, None)

    def _on_approval(self, approval: Approval) -> None:
        # Every change wakes its waiters, whichever replica made it (they look again).
        for fut in self._waiters.pop(approval.id, []):
            if not fut.done():
                fut.set_result(None)


def _parent_subject(parent: Lease, caller: Identity) -> Identity:
    """The subject a delegation acts for: the parent lease's principal and what proved it.

    `kind` stays the acting caller's, so the policy's `context.auth` is how the actor signed in.
    """
    return Identity(
        principal=parent.subject,
        kind=caller.kind,
        expires_at=parent.expires_at,
        trust_domain=parent.context.get("trust_domain") or None,
        issuer=parent.context.get("issuer") or None,
        claims=parent.context.get("claims") or {},
    )


def _inherit(intent: Intent, parent: Lease) -> Intent:
    """A delegation lives in its parent's task, audience and resource; it can only narrow scope."""
    for name, value, parent_value in (
        ("task_id", intent.task_id, parent.task_id),
        ("audience", intent.audience, parent.audience),
        ("resource", intent.resource, parent.resource),
    ):
        if value and value != parent_value:
            if name == "task_id":
                raise TaskConflict("a delegated token cannot leave its task")
            raise PolicyDenied(f"delegation cannot change {name}")
    return replace(intent, task_id=parent.task_id, audience=parent.audience, resource=parent.resource)
