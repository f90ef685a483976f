"""Delegation by token exchange (RFC 8693): sub-agents act for a parent, never beyond it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import jwt
import pytest

from broker._proto import broker_pb2 as pb
from tests.support.harness import (
    BROKER_ID,
    HELPER,
    OUTSIDER,
    PLANNER,
    RESOURCE_SERVER_ID,
    TD,
    WORKER,
    Harness,
    bearer,
)

REPO = "repo:org/app"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
READ_WRITE = ("repo:read", "repo:write")
ACTORS = (WORKER, HELPER, OUTSIDER)  # who acts at depth 1, 2 and 3


def request(task_id: str = "tree", actions=READ_WRITE, **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=task_id, audience=RESOURCE_SERVER_ID, actions=list(actions), resource=REPO, **kw)


def delegation(parent_token: str, actions=("repo:read",), **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(actions=list(actions), subject_token=parent_token, subject_token_type=ACCESS, **kw)


def verify_with_jwks(harness: Harness, token: str) -> dict:
    jwks = json.loads(harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json)
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return jwt.decode(
        token,
        key=key,
        algorithms=[header["alg"]],
        audience=RESOURCE_SERVER_ID,
        issuer=BROKER_ID,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )


def introspect(harness: Harness, token: str) -> pb.IntrospectResponse:
    return harness.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token=token), timeout=5)


def lease(harness: Harness, lease_id: str) -> pb.Lease:
    return harness.operator().GetLease(pb.GetLeaseRequest(lease_id=lease_id), timeout=5)


def chain(harness: Harness, depth: int, actions=("repo:read",)) -> list[pb.ExchangeResponse]:
    """A root token for PLANNER, then one delegation per level, each by the next actor."""
    responses = [harness.agent(PLANNER).Exchange(request(), timeout=5)]
    for actor in ACTORS[:depth]:
        parent = responses[-1].access_token
        responses.append(harness.agent(actor).Exchange(delegation(parent, actions), timeout=5))
    return responses


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_delegated_token_keeps_the_parents_subject_and_names_the_actor(harness: Harness) -> None:
    root, child = chain(harness, 1)
    claims = verify_with_jwks(harness, child.access_token)
    assert claims["sub"] == PLANNER and claims["client_id"] == WORKER
    assert claims["act"] == {"sub": WORKER}
    assert claims["scope"] == "repo:read" and list(child.scope) == ["repo:read"]
    assert claims["txn"] == "tree" and child.task_id == "tree"
    assert claims["aud"] == RESOURCE_SERVER_ID and claims["resource"] == REPO
    assert claims["jti"] == child.lease_id != root.lease_id


def test_delegated_lease_is_the_child_of_the_parent_lease(harness: Harness) -> None:
    root, child = chain(harness, 1)
    assert lease(harness, child.lease_id).parent == root.lease_id
    assert list(lease(harness, root.lease_id).children) == [child.lease_id]


def test_delegation_asking_for_more_than_the_parent_holds_is_permission_denied(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(actions=["repo:read"]), timeout=5)
    err = refused(lambda: harness.agent(WORKER).Exchange(delegation(root.access_token, READ_WRITE), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "repo:write" in err.details()
    assert list(lease(harness, root.lease_id).children) == []


def test_delegation_may_narrow_the_parents_scope(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token, ["repo:write"]), timeout=5)
    assert list(child.scope) == ["repo:write"]


def test_delegated_expiry_is_capped_at_the_parent_lease(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(ttl_seconds=120), timeout=5)
    harness.clock.advance(20)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token, ttl_seconds=600), timeout=5)
    assert child.ttl_capped_by == "parent_lease"
    assert child.expires_at.seconds == root.expires_at.seconds
    assert verify_with_jwks(harness, child.access_token)["exp"] == root.expires_at.seconds


def test_delegation_from_an_old_token_of_a_renewed_lease_ends_with_that_token(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    root = agent.Exchange(request(ttl_seconds=120), timeout=5)
    renewed = agent.Renew(pb.RenewRequest(lease_id=root.lease_id, ttl_seconds=1200), timeout=5)
    assert renewed.expires_at.seconds > root.expires_at.seconds
    child = harness.agent(WORKER).Exchange(delegation(root.access_token, ttl_seconds=600), timeout=5)
    assert child.ttl_capped_by == "subject_token"
    assert child.expires_at.seconds == root.expires_at.seconds


def test_delegated_lease_expires_with_its_parent(harness: Harness) -> None:
    root, child = chain(harness, 1)
    harness.clock.advance(root.expires_at.seconds - harness.clock.now())
    harness.broker.settle()
    assert not introspect(harness, child.access_token).active


@dataclass(frozen=True)
class ChainCase:
    name: str
    depth: int
    act: dict
    actor_chain: tuple[str, ...]


CHAIN_CASES = [
    ChainCase("depth_1", 1, {"sub": WORKER}, (WORKER,)),
    ChainCase("depth_2", 2, {"sub": HELPER, "act": {"sub": WORKER}}, (HELPER, WORKER)),
    ChainCase(
        "depth_3", 3, {"sub": OUTSIDER, "act": {"sub": HELPER, "act": {"sub": WORKER}}}, (OUTSIDER, HELPER, WORKER)
    ),
]


@pytest.mark.parametrize("case", CHAIN_CASES, ids=[c.name for c in CHAIN_CASES])
def test_act_chain_nests_earlier_actors_inside_the_current_one(harness: Harness, case: ChainCase) -> None:
    last = chain(harness, case.depth)[-1]
    claims = verify_with_jwks(harness, last.access_token)
    assert claims["sub"] == PLANNER and claims["client_id"] == case.actor_chain[0]
    assert claims["act"] == case.act
    info = introspect(harness, last.access_token)
    assert info.active and info.subject == PLANNER and tuple(info.actor_chain) == case.actor_chain
    assert tuple(lease(harness, last.lease_id).actor_chain) == case.actor_chain


def test_delegation_deeper_than_max_delegation_depth_is_refused(harness: Harness) -> None:
    deepest = chain(harness, 3)[-1]
    err = refused(lambda: harness.agent(WORKER).Exchange(delegation(deepest.access_token), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "max_delegation_depth" in err.details()
    assert list(lease(harness, deepest.lease_id).children) == []


def test_revoking_the_root_revokes_the_whole_tree(harness: Harness) -> None:
    root, child, grandchild, great = chain(harness, 3)
    sibling = harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(lease_id=root.lease_id, reason="incident"), timeout=5)
    descendants = (child, grandchild, great, sibling)
    assert not introspect(harness, root.access_token).active
    assert not any(introspect(harness, r.access_token).active for r in descendants)
    assert lease(harness, root.lease_id).reason == "OPERATOR"
    for r in descendants:
        record = lease(harness, r.lease_id)
        assert (record.state, record.reason) == ("REVOKED", "PARENT_REVOKED")


def test_revoking_a_delegated_lease_spares_its_parent_and_siblings(harness: Harness) -> None:
    root, child, grandchild = chain(harness, 2)
    sibling = harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(lease_id=child.lease_id), timeout=5)
    assert not introspect(harness, grandchild.access_token).active
    assert introspect(harness, root.access_token).active and introspect(harness, sibling.access_token).active


def test_completing_the_task_revokes_delegated_leases(harness: Harness) -> None:
    _root, child = chain(harness, 1)
    done = harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="tree"), timeout=5)
    assert done.revoked_count == 2 and not introspect(harness, child.access_token).active


@dataclass(frozen=True)
class ActorCase:
    name: str
    actor: str
    action: str
    allowed: bool


ACTOR_CASES = [
    ActorCase("helper_reads", HELPER, "repo:read", True),
    ActorCase("helper_may_not_write", HELPER, "repo:write", False),
    ActorCase("worker_writes", WORKER, "repo:write", True),
]


@pytest.mark.parametrize("case", ACTOR_CASES, ids=[c.name for c in ACTOR_CASES])
def test_policy_decides_on_the_acting_agent(harness: Harness, case: ActorCase) -> None:
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    req = delegation(root.access_token, [case.action])
    if case.allowed:
        assert harness.agent(case.actor).Exchange(req, timeout=5).state == "ISSUED"
        return
    err = refused(lambda: harness.agent(case.actor).Exchange(req, timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "helper-reads-only" in err.details()


def test_helper_acting_directly_is_not_bound_by_the_delegation_rule(harness: Harness) -> None:
    assert harness.agent(HELPER).Exchange(request(task_id="own"), timeout=5).state == "ISSUED"


def test_policy_sees_the_delegation_depth(harness: Harness, tmp_path) -> None:
    policy = tmp_path / "policy.cedar"
    shallow = (
        '\n@id("writes-stay-shallow")\nforbid (principal, action == Action::"repo:write", resource)\n'
        "when { context.delegated && context.delegation_depth >= 2 };\n"
    )
    policy.write_text(policy.read_text() + shallow)
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token, READ_WRITE), timeout=5)
    err = refused(lambda: harness.agent(OUTSIDER).Exchange(delegation(child.access_token, ["repo:write"]), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "writes-stay-shallow" in err.details()
    assert harness.agent(OUTSIDER).Exchange(delegation(child.access_token), timeout=5).state == "ISSUED"


def test_policy_sees_the_oidc_issuer_of_a_delegated_subject(harness: Harness, tmp_path) -> None:
    oidc = harness.issuer.oidc()
    policy = tmp_path / "policy.cedar"
    on_behalf = (
        '\n@id("agents-read-for-oidc-users")\npermit (principal, action == Action::"repo:read", resource)\n'
        f'when {{ context.delegated && context.issuer == "{oidc.issuer}" && context.claims has email }};\n'
    )
    policy.write_text(policy.read_text() + on_behalf)
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    id_token = oidc.id_token("user-9", BROKER_ID, claims={"email": "u9@example.org"}, now=harness.clock.now())
    root = harness.token_agent().Exchange(request(actions=["repo:read"]), timeout=5, metadata=bearer(id_token))
    child = harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5)
    claims = verify_with_jwks(harness, child.access_token)
    assert claims["sub"] == f"oidc:{oidc.issuer}#user-9" and claims["act"] == {"sub": WORKER}


def test_decision_audit_names_the_parent_lease(harness: Harness, tmp_path) -> None:
    root, _child = chain(harness, 1)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    decisions = [r for r in records if r["kind"] == "decision"]
    assert decisions[-1]["parent_lease_id"] == root.lease_id and decisions[-1]["client_id"] == WORKER
    assert "parent_lease_id" not in decisions[0]


@dataclass(frozen=True)
class EscapeCase:
    name: str
    task_id: str = ""
    audience: str = ""
    resource: str = ""


ESCAPES = [
    EscapeCase("other_task", task_id="elsewhere"),
    EscapeCase("other_audience", audience="spiffe://example.org/service/other"),
    EscapeCase("other_resource", resource="repo:org/docs"),
]


@pytest.mark.parametrize("case", ESCAPES, ids=[c.name for c in ESCAPES])
def test_delegated_token_cannot_leave_its_task_audience_or_resource(harness: Harness, case: EscapeCase) -> None:
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    req = delegation(root.access_token, task_id=case.task_id, audience=case.audience, resource=case.resource)
    err = refused(lambda: harness.agent(WORKER).Exchange(req, timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list(lease(harness, root.lease_id).children) == []


def test_delegation_naming_the_parents_own_task_audience_and_resource_is_allowed(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    req = delegation(root.access_token, task_id="tree", audience=RESOURCE_SERVER_ID, resource=REPO)
    assert harness.agent(WORKER).Exchange(req, timeout=5).task_id == "tree"


def test_revoked_parent_token_cannot_be_exchanged(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(lease_id=root.lease_id), timeout=5)
    err = refused(lambda: harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_expired_parent_token_cannot_be_exchanged(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(ttl_seconds=60), timeout=5)
    harness.clock.advance(61)
    err = refused(lambda: harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_completed_task_token_cannot_be_exchanged(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="tree"), timeout=5)
    err = refused(lambda: harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_forged_parent_token_cannot_be_exchanged(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(actions=["repo:read"]), timeout=5)
    head, body, sig = root.access_token.split(".")
    forged = f"{head}.{body}.{sig[:-4]}AAAA"
    err = refused(lambda: harness.agent(WORKER).Exchange(delegation(forged), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_re_exchanging_a_delegated_token_only_deepens_the_chain(harness: Harness) -> None:
    _root, child = chain(harness, 1)
    again = harness.agent(WORKER).Exchange(delegation(child.access_token), timeout=5)
    claims = verify_with_jwks(harness, again.access_token)
    assert claims["sub"] == PLANNER and claims["act"] == {"sub": WORKER, "act": {"sub": WORKER}}
    assert lease(harness, again.lease_id).parent == child.lease_id


def test_delegated_token_presented_as_another_token_type_is_unauthenticated(harness: Harness) -> None:
    _root, child = chain(harness, 1)
    req = request(actions=["repo:read"], subject_token=child.access_token, subject_token_type=TOKEN_TYPE_JWT)
    err = refused(lambda: harness.agent(WORKER).Exchange(req, timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sub_agent_may_authenticate_with_a_jwt_svid_bearer_for_an_unbound_parent(harness: Harness) -> None:
    planner_svid = harness.issuer.jwt(TD).jwt_svid(PLANNER, BROKER_ID, ttl=600, now=harness.clock.now())
    docs = pb.ExchangeRequest(
        task_id="tree", audience=RESOURCE_SERVER_ID, actions=["repo:read"], resource="repo:org/docs"
    )
    root = harness.token_agent().Exchange(docs, timeout=5, metadata=bearer(planner_svid))
    svid = harness.issuer.jwt(TD).jwt_svid(WORKER, BROKER_ID, ttl=600, now=harness.clock.now())
    child = harness.token_agent().Exchange(delegation(root.access_token), timeout=5, metadata=bearer(svid))
    claims = verify_with_jwks(harness, child.access_token)
    assert claims["sub"] == PLANNER and claims["act"] == {"sub": WORKER} and "cnf" not in claims


def test_certificate_bound_parent_cannot_be_delegated_over_a_bearer_token(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    svid = harness.issuer.jwt(TD).jwt_svid(WORKER, BROKER_ID, ttl=600, now=harness.clock.now())
    with pytest.raises(grpc.RpcError) as err:
        harness.token_agent().Exchange(delegation(root.access_token), timeout=5, metadata=bearer(svid))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "mTLS" in err.value.details()


def test_delegated_token_is_bound_to_the_sub_agents_certificate(harness: Harness) -> None:
    root, child = chain(harness, 1)
    parent_cnf = verify_with_jwks(harness, root.access_token)["cnf"]
    child_cnf = verify_with_jwks(harness, child.access_token)["cnf"]
    assert child_cnf != parent_cnf and child_cnf["x5t#S256"]


def test_sub_agent_renews_its_delegated_lease_within_the_parent(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(ttl_seconds=300), timeout=5)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token, ttl_seconds=60), timeout=5)
    renewed = harness.agent(WORKER).Renew(pb.RenewRequest(lease_id=child.lease_id, ttl_seconds=3000), timeout=5)
    assert renewed.ttl_capped_by == "parent_lease" and renewed.expires_at.seconds == root.expires_at.seconds
    assert verify_with_jwks(harness, renewed.access_token)["act"] == {"sub": WORKER}


def test_policy_can_require_the_actor_to_belong_to_a_group(harness: Harness, tmp_path) -> None:
    policy = tmp_path / "policy.cedar"
    policy.write_text(policy.read_text() + """
@id("only-agents-act")
forbid (principal, action, resource)
when { context.delegated && !(context.actor_entity in Team::"agents") };
""")
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    root = harness.agent(PLANNER).Exchange(request(), timeout=5)
    assert harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5).state == "ISSUED"
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(OUTSIDER).Exchange(delegation(root.access_token), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "only-agents-act" in err.value.details()



def test_check_policy_dry_run_sees_the_actor_entity(harness: Harness, tmp_path) -> None:
    policy = tmp_path / "policy.cedar"
    policy.write_text(policy.read_text() + """
@id("only-agents-act")
forbid (principal, action, resource)
when { context.delegated && !(context.actor_entity in Team::"agents") };
""")
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)

    def check(actor: str) -> str:
        req = pb.CheckPolicyRequest(principal=PLANNER, action="repo:read", resource=REPO,
                                    context={"delegated": "true", "actor": actor})
        return harness.operator().CheckPolicy(req, timeout=5).decision

    assert (check(WORKER), check(OUTSIDER)) == ("ALLOW", "DENY")
