"""A decided request as plain data, kept in its approval, and the plan it becomes again when used.

An approval may be used through any replica, so what it binds is written down as data: the
intent (never the subject token itself: only whether one was presented), the subject, the
caller's proven identity, the policy context and the delegation it extends. When the approval
is used the plan is rebuilt from this, the parent lease read afresh, and policy asked again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.domain.identity import AuthKind, Identity
from broker.domain.intent import Intent
from broker.leases.events import Lease
from broker.usecases.issuance import UNDECIDED, Plan


def plan_data(plan: Plan) -> dict[str, Any]:
    """`plan` as plain data (maps, lists, strings, numbers), without any token."""
    intent, caller = plan.intent, plan.caller
    return {
        "intent": {
            "task_id": intent.task_id,
            "audience": intent.audience,
            "actions": list(intent.actions),
            "resource": intent.resource,
            "ttl_seconds": intent.ttl_seconds,
            "context": dict(intent.context),
            "subject_token_type": intent.subject_token_type,
        },
        "subject": plan.subject,
        "caller": {
            "principal": caller.principal,
            "kind": caller.kind.value,
            "expires_at": caller.expires_at,
            "trust_domain": caller.trust_domain,
            "issuer": caller.issuer,
            "claims": _thaw(caller.claims),
            "x5t_s256": caller.x5t_s256,
        },
        "context": _thaw(plan.context),
        "parent_id": plan.parent.id if plan.parent is not None else None,
        "actor_chain": list(plan.actor_chain),
        "not_after": plan.not_after,
        "not_after_name": plan.not_after_name,
    }


def plan_from(data: Mapping[str, Any], parent: Lease | None) -> Plan:
    """The undecided plan `data` describes, extending `parent` (read afresh) when it is a delegation.

    Raises:
        ValueError: `data` is not what `plan_data` wrote.
    """
    try:
        i, c = data["intent"], data["caller"]
        intent = Intent(
            task_id=str(i["task_id"]),
            audience=str(i["audience"]),
            actions=tuple(str(a) for a in i["actions"]),
            resource=str(i["resource"]),
            ttl_seconds=int(i["ttl_seconds"]),
            context={str(k): str(v) for k, v in i["context"].items()},
            subject_token_type=str(i["subject_token_type"]),
        )
        caller = Identity(
            principal=str(c["principal"]),
            kind=AuthKind(c["kind"]),
            expires_at=float(c["expires_at"]),
            trust_domain=c["trust_domain"],
            issuer=c["issuer"],
            claims=dict(c["claims"]),
            x5t_s256=c["x5t_s256"],
        )
        return Plan(
            intent=intent,
            subject=str(data["subject"]),
            caller=caller,
            decision=UNDECIDED,
            context=dict(data["context"]),
            parent=parent,
            actor_chain=tuple(str(a) for a in data["actor_chain"]),
            not_after=None if data["not_after"] is None else float(data["not_after"]),
            not_after_name=str(data["not_after_name"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not an approval's request: {e}") from e


def _thaw(value: Any) -> Any:
    # Identities freeze their claims (read-only maps, tuples); data for the log is plain.
    if isinstance(value, Mapping):
        return {str(k): _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value
