"""Proto <-> domain conversions. No decisions here."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto import broker_pb2 as pb
from broker.approvals.store import Approval
from broker.backends.base import Secret
from broker.backends.pending import PendingRevocation
from broker.domain.intent import TOKEN_TYPE_ACCESS_TOKEN, Intent, Limits
from broker.leases.table import Lease, LeaseState
from broker.policy.engine import Decision
from broker.usecases.issuance import Issued
from broker.usecases.lifecycle import Introspection
from broker.usecases.operations import LeaseFilter


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def intent(request: pb.ExchangeRequest, limits: Limits) -> Intent:
    """Raises: InvalidRequest naming the bad field."""
    return Intent.parse(
        task_id=request.task_id,
        audience=request.audience,
        actions=list(request.actions),
        resource=request.resource,
        ttl_seconds=request.ttl_seconds,
        context=dict(request.context),
        subject_token=request.subject_token,
        subject_token_type=request.subject_token_type,
        limits=limits,
    )


def exchange_response(issued: Issued, *, now: float) -> pb.ExchangeResponse:
    if issued.lease is None:
        return pb.ExchangeResponse(state=issued.state, task_id=issued.task_id, approval_id=issued.approval_id)
    lease = issued.lease
    return pb.ExchangeResponse(
        access_token=issued.access_token,
        issued_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        token_type="Bearer",
        expires_in=max(0, int(lease.expires_at - now)),
        expires_at=timestamp(lease.expires_at),
        lease_id=lease.id,
        task_id=lease.task_id,
        scope=list(lease.scope),
        ttl_capped_by=issued.ttl_capped_by,
        state=issued.state,
        approval_id=issued.approval_id,
        secret=secret(issued.secret),
    )


def secret(value: Secret | None) -> pb.Secret | None:
    if value is None:
        return None
    return pb.Secret(backend=value.backend, fields=dict(value.fields), expires_at=timestamp(value.expires_at))


def backend_revocation(record: Lease, pending: PendingRevocation | None) -> pb.BackendRevocation | None:
    """ACTIVE while the lease lives, PENDING while its role waits to be dropped, DONE after."""
    if record.role is None:
        return None
    if pending is not None:
        return pb.BackendRevocation(
            state="PENDING",
            attempts=pending.attempts,
            last_error=pending.last_error,
            next_attempt_at=timestamp(pending.next_attempt_at),
        )
    return pb.BackendRevocation(state="ACTIVE" if record.state is LeaseState.ACTIVE else "DONE")


def introspect_response(result: Introspection) -> pb.IntrospectResponse:
    if not result.active or result.lease is None:
        return pb.IntrospectResponse(active=False)
    lease = result.lease
    return pb.IntrospectResponse(
        active=True,
        lease_id=lease.id,
        task_id=lease.task_id,
        subject=lease.subject,
        client_id=lease.client_id,
        audience=lease.audience,
        scope=list(lease.scope),
        expires_at=timestamp(result.expires_at),
        actor_chain=list(lease.actor_chain),
    )


def revocation_event(lease: Lease, cursor: str = "") -> pb.RevocationEvent:
    return pb.RevocationEvent(
        cursor=cursor,
        lease_id=lease.id,
        task_id=lease.task_id,
        subject=lease.subject,
        audience=lease.audience,
        reason=lease.reason.value if lease.reason else "",
        revoked_at=timestamp(lease.ended_at),
        initiator=lease.initiator or "",
    )


def lease(record: Lease, children: tuple[str, ...], pending: PendingRevocation | None = None) -> pb.Lease:
    ended = record.state is not LeaseState.ACTIVE
    return pb.Lease(
        id=record.id,
        task_id=record.task_id,
        subject=record.subject,
        client_id=record.client_id,
        audience=record.audience,
        scope=list(record.scope),
        resource=record.resource,
        state=record.state.value,
        issued_at=timestamp(record.issued_at),
        expires_at=timestamp(record.expires_at),
        revoked_at=timestamp(record.ended_at) if ended else None,
        reason=record.reason.value if record.reason else "",
        parent=record.parent_id or "",
        children=list(children),
        actor_chain=list(record.actor_chain),
        backend=record.backend or "",
        role=record.role or "",
        revocation=backend_revocation(record, pending),
    )


def lease_filter(request: pb.ListLeasesRequest) -> LeaseFilter:
    return LeaseFilter(
        task_id=request.task_id,
        subject=request.subject,
        audience=request.audience,
        include_inactive=request.include_inactive,
        revoke_pending=request.revoke_pending,
    )


def check_policy_response(decision: Decision) -> pb.CheckPolicyResponse:
    return pb.CheckPolicyResponse(
        decision="ALLOW" if decision.allowed else "DENY",
        policies=list(decision.policies),
        max_ttl_seconds=int(decision.max_ttl or 0),
        approval_required=decision.approval_required,
        errors=list(decision.errors),
    )


def approval(record: Approval) -> pb.Approval:
    return pb.Approval(
        approval_id=record.id,
        state=record.state.value,
        principal=record.principal,
        client_id=record.client_id,
        task_id=record.task_id,
        audience=record.audience,
        actions=list(record.actions),
        resource=record.resource,
        ttl_seconds=record.ttl_seconds,
        context=dict(record.context),
        requested_at=timestamp(record.requested_at),
        expires_at=timestamp(record.expires_at),
        decided_by=record.decided_by,
        note=record.note,
        policies=list(record.policies),
    )
