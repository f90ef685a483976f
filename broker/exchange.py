"""The use cases of agents and resource servers: exchange, renew, complete, introspect, await.

An exchange: verify the subject, check the task, decide with policy, then (in one block with
no `await`, so atomic on the event loop) open the task, grant the lease and mint the token.
A request that fails at any step changes no state.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from broker.approvals import Approval, ApprovalState, ApprovalStore
from broker.audit import AuditLog
from broker.clock import Clock
from broker.errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalNotPending,
    CredentialRejected,
    LeaseInactive,
    LeaseNotFound,
    PermissionDenied,
    PolicyDenied,
    TaskConflict,
)
from broker.identity import AuthKind, Identity
from broker.intent import Intent, Lifetime, Limits, cap_ttl, check_task_id
from broker.leases import Lease, LeaseState, LeaseTable, Reason, TaskState
from broker.policy import Decision, PolicyEngine
from broker.tokens import TokenMinter, token_hash
from broker.verify import Verifiers

ISSUED = "ISSUED"
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


@dataclass(frozen=True, slots=True)
class Introspection:
    """RFC 7662 meaning: only `active` is set for an inactive token."""

    active: bool
    lease: Lease | None = None
    expires_at: float = 0


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


class Exchange:
    """Exchange, renew, complete, introspect and await approval."""

    def __init__(
        self,
        *,
        verifiers: Verifiers,
        policy: PolicyEngine,
        leases: LeaseTable,
        minter: TokenMinter,
        approvals: ApprovalStore,
        audit: AuditLog,
        clock: Clock,
        settings: Settings,
    ) -> None:
        self._verifiers = verifiers
        self._policy = policy
        self._leases = leases
        self._minter = minter
        self._approvals = approvals
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
            LeaseInactive: no lifetime is left under the caps.
        """
        plan = await self._plan(caller, intent)
        self._check_task(plan)
        decision = self._decide(plan)
        plan = replace(plan, decision=decision)
        if decision.approval_required:
            return self._hold_for_approval(plan)
        return self._issue(plan)

    async def _plan(self, caller: Identity, intent: Intent) -> Plan:
        now = self._clock.now()
        if intent.delegated:
            return self._delegation_plan(caller, intent, now)
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
            decision=_UNDECIDED,
            context=context,
            not_after=not_after,
            not_after_name=name,
        )

    def _delegation_plan(self, caller: Identity, intent: Intent, now: float) -> Plan:
        claims = self._minter.verify(intent.subject_token, now=now)
        parent = self._leases.get(str(claims.get("jti", "")))
        if parent is None or not parent.is_active(now):
            raise CredentialRejected("broker token: its lease is not active")
        depth = parent.depth + 1
        if depth > self._settings.max_delegation_depth:
            raise PermissionDenied(
                f"delegation depth {depth} exceeds max_delegation_depth {self._settings.max_delegation_depth}"
            )
        intent = _inherit(intent, parent)
        missing = [a for a in intent.actions if a not in parent.scope]
        if missing:
            raise PolicyDenied(f"delegation cannot widen scope: {missing[0]} is not held by the parent lease")
        chain = (caller.principal, *parent.actor_chain)
        subject = Identity(
            principal=parent.subject,
            kind=caller.kind,
            expires_at=parent.expires_at,
            trust_domain=parent.context.get("trust_domain") or None,
            claims=parent.context.get("claims") or {},
        )
        context = self._context(intent, subject=subject, caller=caller, depth=depth, actor=caller.principal)
        return Plan(
            intent=intent,
            subject=parent.subject,
            caller=caller,
            decision=_UNDECIDED,
            context=context,
            parent=parent,
            actor_chain=chain,
            not_after=parent.not_after,
            not_after_name="subject_token",
        )

    def _context(self, intent: Intent, *, subject: Identity, caller: Identity, depth: int, actor: str) -> dict:
        return {
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

    def _check_task(self, plan: Plan) -> None:
        task = self._leases.get_task(plan.intent.task_id)
        if plan.parent is not None:
            if task is None or task.state is not TaskState.OPEN:
                raise TaskConflict("the parent lease's task is closed")
            return
        if task is None:
            return
        if task.owner != plan.subject:
            raise TaskConflict("task id belongs to another principal")
        if task.state is not TaskState.OPEN:
            raise TaskConflict(f"task is {task.state.value.lower()}")

    def _decide(self, plan: Plan) -> Decision:
        intent = plan.intent
        decision = self._policy.decide_all(plan.subject, intent.actions, intent.resource, plan.context)
        self._audit.record(
            "decision",
            principal=plan.subject,
            client_id=plan.caller.principal,
            auth=plan.context["auth"],
            task_id=intent.task_id,
            actions=list(intent.actions),
            resource=intent.resource,
            audience=intent.audience,
            decision="allow" if decision.allowed else "deny",
            policies=list(decision.policies),
            reason=decision.reason,
            approval_required=decision.approval_required or None,
            parent_lease_id=plan.parent.id if plan.parent else None,
        )
        if not decision.allowed:
            raise PolicyDenied(decision.reason, decision.policies)
        return decision

    def _hold_for_approval(self, plan: Plan) -> Issued:
        now = self._clock.now()
        intent = plan.intent
        approval = self._approvals.create(
            Approval(
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
                plan=plan,
            )
        )
        self._audit.record(
            "approval.requested",
            approval_id=approval.id,
            principal=plan.subject,
            client_id=plan.caller.principal,
            task_id=intent.task_id,
            actions=list(intent.actions),
            resource=intent.resource,
            audience=intent.audience,
            policies=list(approval.policies),
        )
        return Issued(state=PENDING_APPROVAL, task_id=intent.task_id, approval_id=approval.id)

    def _lifetime(self, plan: Plan, now: float, *, deadline: float, caller: Identity) -> Lifetime:
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
        if lifetime.expires_at <= now:
            raise LeaseInactive(f"no lifetime left under the {lifetime.capped_by} cap")
        return lifetime

    def _issue(self, plan: Plan) -> Issued:
        # No await from here on: the checks and the grant are one atomic step on the event loop.
        now = self._clock.now()
        intent = plan.intent
        task = self._leases.get_task(intent.task_id)
        deadline = task.deadline if task is not None else now + self._settings.max_task_lifetime
        lifetime = self._lifetime(plan, now, deadline=deadline, caller=plan.caller)
        if plan.parent is None:
            self._leases.open_task(intent.task_id, plan.subject, now=now, deadline=deadline)
        lease = self._leases.grant(
            Lease(
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
                not_after=plan.not_after if plan.not_after_name == "subject_token" else None,
            ),
            now=now,
        )
        token = self._mint(lease, now=now, cnf=plan.caller.x5t_s256)
        self._audit.record(
            "token.issued",
            lease_id=lease.id,
            task_id=lease.task_id,
            token_sha256=token_hash(token),
            expires_at=lease.expires_at,
            ttl_capped_by=lifetime.capped_by,
        )
        return Issued(
            state=ISSUED, task_id=lease.task_id, access_token=token, lease=lease, ttl_capped_by=lifetime.capped_by
        )

    def _mint(self, lease: Lease, *, now: float, cnf: str | None) -> str:
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

    def renew(self, caller: Identity, lease_id: str, ttl_seconds: int) -> Issued:
        """A fresh token for the caller's lease, with policy re-checked.

        Raises:
            LeaseNotFound: no such lease held by the caller.
            LeaseInactive: the lease is revoked or expired.
            PolicyDenied: policy now refuses it (the lease is then revoked, RENEWAL_DENIED),
                or it needs a fresh human approval.
        """
        now = self._clock.now()
        lease = self._leases.get(lease_id)
        if lease is None or lease.client_id != caller.principal:
            raise LeaseNotFound("no such lease")
        if not lease.is_active(now):
            raise LeaseInactive(f"lease is {_state_word(lease, now)}")
        intent = Intent(
            task_id=lease.task_id,
            audience=lease.audience,
            actions=lease.scope,
            resource=lease.resource,
            ttl_seconds=ttl_seconds,
        )
        context = {**lease.context, "ttl_seconds": int(ttl_seconds or self._settings.default_ttl)}
        decision = self._policy.decide_all(lease.subject, lease.scope, lease.resource, context)
        self._audit.record(
            "decision",
            principal=lease.subject,
            client_id=caller.principal,
            lease_id=lease.id,
            task_id=lease.task_id,
            actions=list(lease.scope),
            resource=lease.resource,
            audience=lease.audience,
            decision="allow" if decision.allowed else "deny",
            policies=list(decision.policies),
            reason=decision.reason,
            renewal=True,
        )
        if not decision.allowed:
            self._leases.revoke(lease.id, Reason.RENEWAL_DENIED, now=now, initiator=caller.principal)
            raise PolicyDenied(f"renewal denied: {decision.reason}", decision.policies)
        if decision.approval_required:
            raise PolicyDenied("renewal needs a fresh approval: exchange again", decision.policies)
        parent = self._leases.get(lease.parent_id) if lease.parent_id else None
        plan = Plan(
            intent=intent,
            subject=lease.subject,
            caller=caller,
            decision=decision,
            context=context,
            parent=parent,
            actor_chain=lease.actor_chain,
            not_after=lease.not_after,
        )
        task = self._leases.get_task(lease.task_id)
        lifetime = self._lifetime(plan, now, deadline=task.deadline if task else now, caller=caller)
        renewed = self._leases.renew(lease.id, expires_at=lifetime.expires_at, token_exp=lifetime.expires_at, now=now)
        token = self._mint(renewed, now=now, cnf=caller.x5t_s256)
        self._audit.record(
            "token.issued",
            lease_id=lease.id,
            task_id=lease.task_id,
            token_sha256=token_hash(token),
            expires_at=renewed.expires_at,
            ttl_capped_by=lifetime.capped_by,
            renewal=True,
        )
        return Issued(
            state=ISSUED, task_id=lease.task_id, access_token=token, lease=renewed, ttl_capped_by=lifetime.capped_by
        )

    def complete_task(self, caller: Identity, task_id: str) -> int:
        """Revoke every lease of the caller's task and close it; returns how many changed.

        Raises:
            InvalidRequest: the task id is ill-formed.
            LeaseNotFound: no such task.
            TaskConflict: the caller does not own the task.
        """
        check_task_id(task_id)
        now = self._clock.now()
        return len(self._leases.complete_task(task_id, owner=caller.principal, now=now, initiator=caller.principal))

    def introspect(self, caller: Identity, token: str) -> Introspection:
        """RFC 7662: is this broker token active, and what does it grant?

        Raises:
            PermissionDenied: the caller is neither the token's audience nor an introspector.
        """
        now = self._clock.now()
        introspector = caller.principal in self._settings.introspectors
        try:
            claims = self._minter.verify(token, now=now)
        except CredentialRejected:
            return Introspection(active=False)
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if not introspector and caller.principal not in audiences:
            raise PermissionDenied("only the token's audience or a configured introspector may introspect it")
        lease = self._leases.get(str(claims.get("jti")))
        if lease is None or not lease.is_active(now):
            return Introspection(active=False)
        return Introspection(active=True, lease=lease, expires_at=float(claims["exp"]))

    async def await_approval(self, caller: Identity, approval_id: str) -> Issued:
        """Wait for an operator's decision, then issue exactly what was approved, once.

        Raises:
            ApprovalNotFound: no such approval asked for by the caller.
            ApprovalDenied: an operator said no.
            ApprovalExpired: nobody decided in time.
            ApprovalNotPending: it was already used.
        """
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
                raise ApprovalExpired("approval expired before an operator decided")
            if approval.state is ApprovalState.USED:
                raise ApprovalNotPending("approval already used")
            used = self._approvals.consume(approval_id, now=self._clock.now())
            issued = self._issue(used.plan)
            self._audit.record("approval.used", approval_id=approval_id, lease_id=issued.lease.id)
            return issued

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
        for fut in self._waiters.pop(approval.id, []):
            if not fut.done():
                fut.set_result(None)


_UNDECIDED = Decision(allowed=False, policies=(), max_ttl=None, approval_required=False, errors=(), reason="")


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


def _state_word(lease: Lease, now: float) -> str:
    if lease.state is LeaseState.ACTIVE:
        return "expired"
    return lease.state.value.lower()
