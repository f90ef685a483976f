"""An approval's request as data: the plan it becomes again is the plan it was made from, without a token."""

from __future__ import annotations

import json

import pytest

from broker.domain.identity import AuthKind, Identity
from broker.domain.intent import TOKEN_TYPE_ACCESS_TOKEN, Intent
from broker.leases.events import Lease
from broker.policy.engine import EntityRef
from broker.store.codec import _plain, _revive
from broker.usecases.issuance import UNDECIDED, Plan
from broker.usecases.plans import plan_data, plan_from

T0 = 1_750_000_000.0
TOKEN = "eyJhbGciOiJFUzI1NiJ9.secret-parent-token.sig"
PARENT = Lease(
    id="lse_parent", task_id="t-1", subject="spiffe://td/agent/planner", client_id="spiffe://td/agent/planner",
    audience="svc", scope=("deploy",), resource="service:app", issued_at=T0, expires_at=T0 + 300, token_exp=T0 + 300,
)


def _plan(*, delegated: bool) -> Plan:
    caller = Identity(
        principal="spiffe://td/agent/worker",
        kind=AuthKind.X509_SVID,
        expires_at=T0 + 3600,
        trust_domain="td",
        claims={"groups": ["a", "b"], "nested": {"k": [1, 2]}},
        x5t_s256="thumb",
    )
    intent = Intent(
        task_id="t-1", audience="svc", actions=("deploy",), resource="service:app", ttl_seconds=60,
        context={"ticket": "CHG-1"},
        subject_token=TOKEN if delegated else "",
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN if delegated else "",
    )
    context = {"task_id": "t-1", "claims": {"groups": ["a", "b"]}, "delegated": delegated, "delegation_depth": 1}
    if delegated:
        context["actor_entity"] = EntityRef("Workload", caller.principal)
    return Plan(
        intent=intent, subject=PARENT.subject if delegated else caller.principal, caller=caller, decision=UNDECIDED,
        context=context, parent=PARENT if delegated else None,
        actor_chain=(caller.principal,) if delegated else (), not_after=T0 + 200, not_after_name="subject_token",
    )


@pytest.mark.parametrize("delegated", [False, True], ids=["root", "delegated"])
def test_a_plan_rebuilt_from_its_data_through_the_log_is_the_same_plan_minus_the_token(delegated: bool) -> None:
    plan = _plan(delegated=delegated)
    data = plan_data(plan)
    text = json.dumps(_plain(data))
    assert TOKEN not in text and "secret-parent-token" not in text
    again = plan_from(_revive(json.loads(text)), PARENT if delegated else None)
    assert again.intent.subject_token == ""
    assert again.intent.subject_token_type == plan.intent.subject_token_type
    assert again.intent == plan.intent.__class__(**{**_fields(plan.intent), "subject_token": ""})
    assert (again.subject, again.parent, again.actor_chain) == (plan.subject, plan.parent, plan.actor_chain)
    assert (again.not_after, again.not_after_name) == (plan.not_after, plan.not_after_name)
    assert again.caller == plan.caller
    assert again.context == plan.context


def test_data_that_is_not_a_plan_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an approval's request"):
        plan_from({"intent": {}}, None)


def _fields(intent: Intent) -> dict:
    return {name: getattr(intent, name) for name in intent.__dataclass_fields__}


def test_a_claim_shaped_like_the_entity_tag_never_comes_back_from_the_log_as_an_entity() -> None:
    forged = {"__broker_entity__": ["Team", "admins"]}
    plan = _plan(delegated=False)
    plan = Plan(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__},
                   "context": {**plan.context, "claims": {"team": forged, "nested": [forged]}}})
    again = _revive(json.loads(json.dumps(_plain(plan_data(plan)))))
    claims = again["context"]["claims"]

    def entities(value: object) -> list[EntityRef]:
        if isinstance(value, EntityRef):
            return [value]
        if isinstance(value, dict):
            return [e for v in value.values() for e in entities(v)]
        if isinstance(value, list):
            return [e for v in value for e in entities(v)]
        return []

    assert entities(claims) == []
    assert claims["team"] == {} and claims["nested"] == [{}]
