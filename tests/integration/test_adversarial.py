"""An attacker's view of a real broker: every refusal is the right code, leaks nothing and changes nothing."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.testing.clock import FakeClock
from broker.testing.x509_ca import X509Svid
from tests.support.harness import (
    BROKER_ID,
    HELPER,
    INTROSPECTOR_ID,
    OPERATOR_ID,
    OTHER_TD,
    OUTSIDER,
    PLANNER,
    RESOURCE_SERVER_ID,
    TD,
    WORKER,
    Harness,
    Material,
    RunningBroker,
    bearer,
    run_harness,
    write_config,
)

REPO = "repo:org/app"
OTHER_AUDIENCE = f"spiffe://{TD}/service/other"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
CLEAN_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)


def request(task_id: str = "task-1", actions=("repo:read",), resource: str = REPO, **kw) -> pb.ExchangeRequest:
    kw.setdefault("audience", RESOURCE_SERVER_ID)
    return pb.ExchangeRequest(task_id=task_id, actions=list(actions), resource=resource, **kw)


def delegation(parent_token: str, actions=("repo:read",), **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(actions=list(actions), subject_token=parent_token, subject_token_type=ACCESS, **kw)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def svid(harness: Harness, spiffe_id: str, audience: str | list[str] = BROKER_ID, **kw) -> str:
    domain = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
    kw.setdefault("now", harness.clock.now())
    kw.setdefault("ttl", 600)
    return harness.issuer.jwt(domain).jwt_svid(spiffe_id, audience, **kw)


def introspect(harness: Harness, token: str) -> pb.IntrospectResponse:
    return harness.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token=token), timeout=5)


def all_leases(harness: Harness) -> list[pb.Lease]:
    return list(harness.operator().ListLeases(pb.ListLeasesRequest(include_inactive=True), timeout=5).leases)


def lease(harness: Harness, lease_id: str) -> pb.Lease:
    return harness.operator().GetLease(pb.GetLeaseRequest(lease_id=lease_id), timeout=5)


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def add_policy(harness: Harness, folder: Path, text: str) -> None:
    policy = folder / "policy.cedar"
    policy.write_text(policy.read_text() + "\n" + text + "\n")
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)


def assert_no_leak(err: grpc.RpcError, *secrets: str) -> None:
    details = err.details() or ""
    assert err.code() not in NEVER, details
    assert "Traceback" not in details and 'File "' not in details, details
    for secret in secrets:
        assert secret not in details
        assert secret.rsplit(".", 1)[-1] not in details  # not even the signature part


# ---- who is calling: only a workload credential proves an identity ---------------------------------------


@dataclass(frozen=True)
class Impostor:
    """A token that must not authenticate anyone on the token listener."""

    name: str
    make: Callable[[Harness], str]


def _broker_token_for_the_broker(harness: Harness) -> str:
    # The broker's own access token, even one minted for the broker's own audience, is not an identity.
    return harness.agent(PLANNER).Exchange(request(task_id="own-aud", audience=BROKER_ID), timeout=5).access_token


def _embedded_jwk(harness: Harness) -> str:
    attacker = harness.issuer.jwt("evil.test")
    attacker_jwk = attacker.jwks()["keys"][0]
    kid = harness.issuer.jwt(TD).current_kid
    return attacker.jwt_svid(PLANNER, BROKER_ID, now=harness.clock.now(), headers={"kid": kid, "jwk": attacker_jwk})


IMPOSTORS = [
    Impostor("broker_access_token", lambda h: h.agent(PLANNER).Exchange(request(), timeout=5).access_token),
    Impostor("broker_access_token_for_broker_audience", _broker_token_for_the_broker),
    Impostor("jwt_svid_for_another_audience", lambda h: svid(h, PLANNER, RESOURCE_SERVER_ID)),
    Impostor("jwt_svid_hs256_keyed_with_public_key", lambda h: svid(h, PLANNER, alg="HS256")),
    Impostor("jwt_svid_with_embedded_attacker_jwk", _embedded_jwk),
    Impostor("jwt_svid_without_exp", lambda h: svid(h, PLANNER, drop=("exp",))),
    Impostor("oidc_token_for_another_audience", lambda h: h.issuer.oidc().id_token("u1", RESOURCE_SERVER_ID)),
    Impostor("oidc_token_of_unconfigured_issuer", lambda h: h.issuer.oidc().id_token(
        "u1", BROKER_ID, claims={"iss": "https://evil.test", "email": "e@x"})),
    Impostor("jwt_svid_claiming_the_oidc_issuer", lambda h: svid(h, PLANNER, claims={"iss": h.issuer.oidc().issuer})),
]


@pytest.mark.parametrize("impostor", IMPOSTORS, ids=[i.name for i in IMPOSTORS])
def test_impostor_bearer_is_unauthenticated_and_changes_nothing(harness: Harness, impostor: Impostor) -> None:
    token = impostor.make(harness)
    before = all_leases(harness)
    err = refused(lambda: harness.token_agent().Exchange(request(task_id="grab"), timeout=5, metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_no_leak(err, token)
    assert all_leases(harness) == before


@dataclass(frozen=True)
class Confusion:
    name: str
    make: Callable[[Harness], str]
    token_type: str


CONFUSIONS = [
    Confusion("broker_token_as_jwt_svid", lambda h: h.agent(PLANNER).Exchange(request(), timeout=5).access_token,
              JWT_TYPE),
    Confusion("broker_token_as_id_token", lambda h: h.agent(PLANNER).Exchange(request(), timeout=5).access_token,
              ID_TOKEN),
    Confusion("jwt_svid_as_id_token", lambda h: svid(h, WORKER), ID_TOKEN),
    Confusion("jwt_svid_as_access_token", lambda h: svid(h, WORKER), ACCESS),
    Confusion("id_token_as_jwt_svid", lambda h: h.issuer.oidc().id_token(
        "u2", BROKER_ID, claims={"email": "u2@x"}), JWT_TYPE),
    Confusion("id_token_as_access_token", lambda h: h.issuer.oidc().id_token(
        "u2", BROKER_ID, claims={"email": "u2@x"}), ACCESS),
    Confusion("jwt_svid_for_another_audience", lambda h: svid(h, WORKER, RESOURCE_SERVER_ID), JWT_TYPE),
]


@pytest.mark.parametrize("case", CONFUSIONS, ids=[c.name for c in CONFUSIONS])
def test_subject_token_of_the_wrong_type_is_unauthenticated(harness: Harness, case: Confusion) -> None:
    token = case.make(harness)
    before = all_leases(harness)
    req = request(task_id="confused", subject_token=token, subject_token_type=case.token_type)
    err = refused(lambda: harness.agent(OUTSIDER).Exchange(req, timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_no_leak(err, token)
    assert all_leases(harness) == before


def test_bearer_header_on_the_mtls_listener_does_not_change_the_caller(harness: Harness) -> None:
    stub = harness.agent(PLANNER)
    resp = stub.Exchange(request(), timeout=5, metadata=bearer(svid(harness, WORKER)))
    assert claims_of(resp.access_token)["sub"] == PLANNER and claims_of(resp.access_token)["client_id"] == PLANNER


ADMIN_CALLS = [
    ("ListLeases", pb.ListLeasesRequest(include_inactive=True)),
    ("GetLease", pb.GetLeaseRequest(lease_id="lse_x")),
    ("Revoke", pb.RevokeRequest(all=True)),
    ("CheckPolicy", pb.CheckPolicyRequest(principal=PLANNER, action="repo:read", resource=REPO)),
    ("ReloadPolicy", pb.ReloadPolicyRequest()),
    ("ListApprovals", pb.ListApprovalsRequest(include_decided=True)),
    ("Approve", pb.ApproveRequest(approval_id="apr_x")),
    ("Deny", pb.DenyRequest(approval_id="apr_x")),
]


@pytest.mark.parametrize("method,req", ADMIN_CALLS, ids=[c[0] for c in ADMIN_CALLS])
def test_operator_jwt_svid_on_the_token_listener_is_not_an_operator(harness: Harness, method: str, req) -> None:
    live = harness.agent(PLANNER).Exchange(request(), timeout=5)
    stub = pb_grpc.BrokerAdminStub(harness.token_channel())
    err = refused(lambda: getattr(stub, method)(req, timeout=5, metadata=bearer(svid(harness, OPERATOR_ID))))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "mtls" in err.details().lower()
    assert introspect(harness, live.access_token).active  # Revoke all did not happen


def test_operator_jwt_svid_cannot_watch_every_audience(harness: Harness) -> None:
    stream = harness.token_agent().WatchRevocations(
        pb.WatchRevocationsRequest(audience=RESOURCE_SERVER_ID), timeout=5, metadata=bearer(svid(harness, OPERATOR_ID))
    )
    err = refused(lambda: next(iter(stream)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_operator_id_in_a_certificate_of_another_trust_domain_is_unauthenticated(harness: Harness) -> None:
    forged = harness.issuer.ca(OTHER_TD).x509_svid(OPERATOR_ID, ttl=86400)
    stub = pb_grpc.BrokerAdminStub(harness.mtls_channel(forged))
    err = refused(lambda: stub.Revoke(pb.RevokeRequest(all=True), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def _signed_by_a_workload_leaf(harness: Harness, spiffe_id: str) -> X509Svid:
    """A well-formed SVID for `spiffe_id` whose issuer is PLANNER's own (non-CA) leaf."""
    planner = harness.material.svid(PLANNER)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
        .issuer_name(planner.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(planner.key, hashes.SHA256())
    )
    return X509Svid(cert=cert, key=key, intermediates=(planner.cert, *planner.intermediates))


def test_an_operator_certificate_signed_by_a_workload_leaf_is_refused(harness: Harness) -> None:
    stub = pb_grpc.BrokerAdminStub(harness.mtls_channel(_signed_by_a_workload_leaf(harness, OPERATOR_ID)))
    err = refused(lambda: stub.Revoke(pb.RevokeRequest(all=True), timeout=5))
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_operator_id_below_the_admin_glob_in_another_trust_domain_is_not_admin(harness: Harness) -> None:
    stub = harness.operator(f"spiffe://{OTHER_TD}/operator/alice")
    err = refused(lambda: stub.ListLeases(pb.ListLeasesRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- leases, tasks and approvals that are not yours --------------------------------------------------------


@pytest.mark.parametrize("state", ["active", "revoked", "expired"])
def test_renewing_another_callers_lease_is_not_found_whatever_its_state(harness: Harness, state: str) -> None:
    resp = harness.agent(PLANNER).Exchange(request(ttl_seconds=60), timeout=5)
    if state == "revoked":
        harness.operator().Revoke(pb.RevokeRequest(lease_id=resp.lease_id), timeout=5)
    elif state == "expired":
        harness.clock.advance(61)
    before = lease(harness, resp.lease_id)
    err = refused(lambda: harness.agent(WORKER).Renew(pb.RenewRequest(lease_id=resp.lease_id), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert lease(harness, resp.lease_id) == before
    unknown = refused(lambda: harness.agent(WORKER).Renew(pb.RenewRequest(lease_id="lse_nope"), timeout=5))
    assert (unknown.code(), unknown.details()) == (err.code(), err.details())


def test_sub_agent_cannot_renew_its_parents_lease_or_complete_its_task(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(task_id="tree"), timeout=5)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5)
    err = refused(lambda: harness.agent(WORKER).Renew(pb.RenewRequest(lease_id=root.lease_id), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = refused(lambda: harness.agent(WORKER).CompleteTask(pb.CompleteTaskRequest(task_id="tree"), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert introspect(harness, root.access_token).active and introspect(harness, child.access_token).active


def test_parent_cannot_renew_its_sub_agents_lease(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(task_id="tree"), timeout=5)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5)
    err = refused(lambda: harness.agent(PLANNER).Renew(pb.RenewRequest(lease_id=child.lease_id), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_completing_another_owners_task_changes_nothing(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(task_id="mine"), timeout=5)
    err = refused(lambda: harness.agent(WORKER).CompleteTask(pb.CompleteTaskRequest(task_id="mine"), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert introspect(harness, resp.access_token).active
    assert harness.agent(PLANNER).Exchange(request(task_id="mine"), timeout=5).state == "ISSUED"


def _pending_deploy(harness: Harness, task_id: str = "ship") -> str:
    req = request(task_id=task_id, actions=["deploy:prod"], resource="service:app")
    resp = harness.agent(PLANNER).Exchange(req, timeout=5)
    assert resp.state == "PENDING_APPROVAL"
    return resp.approval_id


def test_awaiting_another_principals_approval_is_not_found_and_leaves_it_pending(harness: Harness) -> None:
    approval_id = _pending_deploy(harness)
    harness.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5)
    err = refused(lambda: harness.agent(WORKER).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id),
                                                              timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    issued = harness.agent(PLANNER).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id), timeout=5)
    assert issued.state == "ISSUED" and claims_of(issued.access_token)["client_id"] == PLANNER


def test_an_approval_issues_once(harness: Harness) -> None:
    approval_id = _pending_deploy(harness)
    harness.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5)
    agent = harness.agent(PLANNER)
    agent.AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id), timeout=5)
    err = refused(lambda: agent.AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id), timeout=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len([x for x in all_leases(harness) if x.task_id == "ship"]) == 1


def test_approving_twice_is_refused(harness: Harness) -> None:
    approval_id = _pending_deploy(harness)
    harness.operator().Deny(pb.DenyRequest(approval_id=approval_id), timeout=5)
    err = refused(lambda: harness.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = refused(lambda: harness.agent(PLANNER).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id),
                                                               timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_approval_is_not_spent_by_a_failed_issuance(harness: Harness) -> None:
    harness.agent(PLANNER).Exchange(request(task_id="ship"), timeout=5)
    approval_id = _pending_deploy(harness, "ship")
    harness.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5)
    harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="ship"), timeout=5)
    err = refused(lambda: harness.agent(PLANNER).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id),
                                                               timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "closed" in err.details()
    approvals = harness.operator().ListApprovals(pb.ListApprovalsRequest(include_decided=True), timeout=5).approvals
    assert [a.state for a in approvals] == ["APPROVED"]


FREEZE = """@id("deploy-freeze")
forbid (principal, action == Action::"deploy:prod", resource);"""


def test_an_approval_never_outranks_a_forbid_added_since(harness: Harness, tmp_path: Path) -> None:
    approval_id = _pending_deploy(harness)
    add_policy(harness, tmp_path, FREEZE)
    harness.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5)
    err = refused(lambda: harness.agent(PLANNER).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id),
                                                               timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "deploy-freeze" in err.details()
    assert all_leases(harness) == []


@pytest.mark.parametrize("state", ["active", "revoked"])
def test_introspection_by_a_non_audience_reveals_nothing_whatever_the_lease_state(harness: Harness, state: str) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    if state == "revoked":
        harness.operator().Revoke(pb.RevokeRequest(lease_id=resp.lease_id), timeout=5)
    for snoop in (PLANNER, WORKER):  # neither the token's holder nor a stranger is its audience
        err = refused(lambda s=snoop: harness.agent(s).Introspect(pb.IntrospectRequest(token=resp.access_token),
                                                                  timeout=5))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert_no_leak(err, resp.access_token)


def test_introspection_by_a_non_audience_on_the_token_listener_is_refused(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    req = pb.IntrospectRequest(token=resp.access_token)
    err = refused(lambda: harness.token_agent().Introspect(req, timeout=5, metadata=bearer(svid(harness, WORKER))))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    info = harness.token_agent().Introspect(req, timeout=5, metadata=bearer(svid(harness, INTROSPECTOR_ID)))
    assert info.active


def test_watching_another_audience_on_the_token_listener_is_refused(harness: Harness) -> None:
    stream = harness.token_agent().WatchRevocations(
        pb.WatchRevocationsRequest(audience=RESOURCE_SERVER_ID), timeout=5, metadata=bearer(svid(harness, WORKER))
    )
    err = refused(lambda: next(iter(stream)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_watcher_never_sees_events_of_another_audience(harness: Harness) -> None:
    stream = harness.agent(RESOURCE_SERVER_ID).WatchRevocations(pb.WatchRevocationsRequest(), timeout=10)
    stream.initial_metadata()
    agent = harness.agent(PLANNER)
    hidden = agent.Exchange(request(task_id="hidden", audience=OTHER_AUDIENCE), timeout=5)
    seen = agent.Exchange(request(task_id="seen"), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(lease_id=hidden.lease_id), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(lease_id=seen.lease_id), timeout=5)
    try:
        first = next(iter(stream))
    finally:
        stream.cancel()
    assert first.lease_id == seen.lease_id and first.audience == RESOURCE_SERVER_ID


# ---- delegation is decided by the presented token -----------------------------------------------------------


def test_failed_delegations_change_no_state(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(task_id="tree"), timeout=5)
    before = all_leases(harness)
    bad = [
        delegation(root.access_token, ["repo:write"]),  # wider than the parent
        delegation(root.access_token, audience=OTHER_AUDIENCE),
        delegation(root.access_token, resource="repo:org/docs"),
        delegation(root.access_token, task_id="elsewhere"),
        delegation(root.access_token, ttl_seconds=-5),
        delegation(root.access_token[:-6] + "AAAAAA"),
    ]
    for req in bad:
        err = refused(lambda r=req: harness.agent(WORKER).Exchange(r, timeout=5))
        assert_no_leak(err, root.access_token)
    assert all_leases(harness) == before
    assert harness.agent(WORKER).Exchange(request(task_id="elsewhere"), timeout=5).state == "ISSUED"


# ---- policy input is data, never code -----------------------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    name: str
    actions: tuple[str, ...] = ("repo:read",)
    resource: str = REPO
    context: tuple[tuple[str, str], ...] = ()


INJECTIONS = [
    Injection("quote_in_resource", resource='vault:prod" || true'),
    Injection("cedar_in_resource", resource="repo:org/app)||(true"),
    Injection("backslash_in_resource", resource="vault:prod\\"),
    Injection("newline_in_resource", resource="repo:org/app\nforbid"),
    Injection("zero_width_in_resource", resource="vault:prod\u200b"),
    Injection("bidi_override_in_resource", resource="repo:org/app\u202e"),
    Injection("nul_in_resource", resource="repo:org/app\x00"),
    Injection("wildcard_action", actions=("repo:*",)),
    Injection("star_action", actions=("*",)),
    Injection("entity_escape_in_context_key", actions=("db:migrate",), resource="db:prod",
              context=(("__entity", '{"type":"Team","id":"agents"}'),)),
    Injection("cedar_in_context_value", actions=("db:migrate",), resource="db:prod",
              context=(("reason", '" } ; permit(principal,action,resource); //'),)),
]


@pytest.mark.parametrize("case", INJECTIONS, ids=[c.name for c in INJECTIONS])
def test_cedar_syntax_in_a_request_never_widens_a_grant(harness: Harness, case: Injection) -> None:
    req = request(task_id="inject", actions=case.actions, resource=case.resource, context=dict(case.context))
    err = refused(lambda: harness.agent(PLANNER).Exchange(req, timeout=5))
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), err.details()
    assert all_leases(harness) == []


ROLE_POLICY = """@id("role-claim")
permit (principal, action == Action::"repo:admin", resource == Resource::"repo:org/app")
when { context.claims has role && context.claims.role == Team::"agents" };"""


@pytest.mark.parametrize("escape", ["__entity", "__extn"])
def test_a_token_claim_cannot_forge_a_cedar_entity(harness: Harness, tmp_path: Path, escape: str) -> None:
    add_policy(harness, tmp_path, ROLE_POLICY)
    role = {escape: {"type": "Team", "id": "agents"}} if escape == "__entity" else {escape: {"fn": "ip", "arg": "1"}}
    token = harness.issuer.oidc().id_token("mallory", BROKER_ID, claims={"email": "m@x", "role": role})
    req = request(task_id="forge", actions=["repo:admin"])
    err = refused(lambda: harness.token_agent().Exchange(req, timeout=5, metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_odd_claims_fail_closed_without_an_internal_error(harness: Harness) -> None:
    claims = {"email": "e@x", "n": 2**80, "f": 1.5, "deep": {"a": [{"b": [[[{"c": None}]]]}]}, "mix": [1, "a", True]}
    token = harness.issuer.oidc().id_token("odd\u202esub", BROKER_ID, claims=claims)
    resp = harness.token_agent().Exchange(request(task_id="odd"), timeout=5, metadata=bearer(token))
    assert resp.state == "ISSUED"


def test_lone_surrogates_in_an_id_token_fail_closed(harness: Harness) -> None:
    token = harness.issuer.oidc().id_token("a\ud800b", BROKER_ID, claims={"email": "x\udfff"})
    err = refused(lambda: harness.token_agent().Exchange(request(task_id="sur"), timeout=5, metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert all_leases(harness) == []


def test_check_policy_takes_any_principal_text_as_data(harness: Harness) -> None:
    for principal in ['x" || true', "a b", "\u202e", 'Team::"agents"']:
        out = harness.operator().CheckPolicy(
            pb.CheckPolicyRequest(principal=principal, action="repo:read", resource=REPO), timeout=5
        )
        assert out.decision == "DENY"


# ---- malformed and oversized input ---------------------------------------------------------------------------


def test_oversized_authorization_metadata_is_refused_cleanly(harness: Harness) -> None:
    huge = "e" * (40 * 1024)
    err = refused(lambda: harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5, metadata=bearer(huge)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json  # the listener still serves


def test_bearer_token_over_16_kib_is_unauthenticated(harness: Harness) -> None:
    big = svid(harness, PLANNER, claims={"pad": "p" * (17 * 1024)})
    err = refused(lambda: harness.token_agent().Exchange(request(), timeout=5, metadata=bearer(big)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "16384" in err.details()


def test_subject_token_over_16_kib_is_unauthenticated(harness: Harness) -> None:
    big = svid(harness, WORKER, claims={"pad": "p" * (17 * 1024)})
    req = request(subject_token=big, subject_token_type=JWT_TYPE)
    err = refused(lambda: harness.agent(PLANNER).Exchange(req, timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_no_leak(err, big)


def test_oversized_introspection_token_is_inactive(harness: Harness) -> None:
    info = introspect(harness, "a" * 60_000)
    assert not info.active


def test_repeated_authorization_headers_are_unauthenticated(harness: Harness) -> None:
    good = svid(harness, PLANNER)
    metadata = (("authorization", f"Bearer {good}"), ("authorization", f"Bearer {svid(harness, WORKER)}"))
    err = refused(lambda: harness.token_agent().Exchange(request(), timeout=5, metadata=metadata))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_no_leak(err, good)


@dataclass(frozen=True)
class OddId:
    name: str
    value: str
    printable: bool  # a printable audience is just a name nobody serves: the exchange may succeed


ODD_IDS = [
    OddId("control", "lse_\x00\x01\x7f", False),
    OddId("newline", "lse_a\nb", False),
    OddId("bidi", "lse_\u202eabc", False),
    OddId("emoji", "lse_\U0001f600", True),
    OddId("long", "l" * 5000, False),
    OddId("traversal", "../../etc/passwd", True),
]


@pytest.mark.parametrize("odd", ODD_IDS, ids=[o.name for o in ODD_IDS])
def test_odd_ids_are_refused_cleanly_on_every_rpc(harness: Harness, odd: OddId) -> None:
    agent, operator = harness.agent(PLANNER), harness.operator()
    calls = [
        lambda: agent.Renew(pb.RenewRequest(lease_id=odd.value), timeout=5),
        lambda: agent.CompleteTask(pb.CompleteTaskRequest(task_id=odd.value), timeout=5),
        lambda: agent.AwaitApproval(pb.AwaitApprovalRequest(approval_id=odd.value), timeout=5),
        lambda: agent.Exchange(request(task_id=odd.value), timeout=5),
        lambda: agent.Exchange(request(resource=odd.value), timeout=5),
        lambda: agent.Exchange(request(actions=[odd.value]), timeout=5),
        lambda: operator.GetLease(pb.GetLeaseRequest(lease_id=odd.value), timeout=5),
        lambda: operator.Revoke(pb.RevokeRequest(lease_id=odd.value), timeout=5),
        lambda: operator.Revoke(pb.RevokeRequest(task_id=odd.value), timeout=5),
        lambda: operator.Approve(pb.ApproveRequest(approval_id=odd.value), timeout=5),
    ]
    if not odd.printable:
        calls.append(lambda: agent.Exchange(request(audience=odd.value), timeout=5))
    for call in calls:
        err = refused(call)
        assert err.code() in CLEAN_REFUSALS, err.details()
        assert_no_leak(err)
    assert all_leases(harness) == []


@pytest.mark.parametrize("ttl", [-1, -(2**63), 366 * 24 * 3600 + 1, 2**63 - 1])
def test_exchange_ttl_out_of_range_is_invalid_argument(harness: Harness, ttl: int) -> None:
    err = refused(lambda: harness.agent(PLANNER).Exchange(request(ttl_seconds=ttl), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl_seconds" in err.details()
    assert all_leases(harness) == []


def test_renew_ttl_is_capped_or_refused_never_overflowing(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    resp = agent.Exchange(request(), timeout=5)
    renewed = agent.Renew(pb.RenewRequest(lease_id=resp.lease_id, ttl_seconds=2**63 - 1), timeout=5)
    assert renewed.ttl_capped_by == "policy"
    assert renewed.expires_at.seconds == int(harness.clock.now() + 1800)  # the agents-use-repo cap
    err = refused(lambda: agent.Renew(pb.RenewRequest(lease_id=resp.lease_id, ttl_seconds=-(2**63)), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_leases_page_size_is_bounded(harness: Harness) -> None:
    err = refused(lambda: harness.operator().ListLeases(pb.ListLeasesRequest(page_size=-1), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    page = harness.operator().ListLeases(pb.ListLeasesRequest(page_size=2**31 - 1), timeout=5)
    assert list(page.leases) == [] and page.next_page_token == ""


def test_revoke_with_no_selector_is_invalid_argument(harness: Harness) -> None:
    for req in (pb.RevokeRequest(), pb.RevokeRequest(all=False), pb.RevokeRequest(subject="")):
        err = refused(lambda r=req: harness.operator().Revoke(r, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- a refused exchange changes nothing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    name: str
    req: pb.ExchangeRequest
    code: grpc.StatusCode


REFUSALS = [
    Refusal("policy_deny", request(task_id="t-deny", actions=["repo:delete"]), grpc.StatusCode.PERMISSION_DENIED),
    Refusal("forbid_wins", request(task_id="t-forbid", resource="vault:prod"), grpc.StatusCode.PERMISSION_DENIED),
    Refusal("one_action_denied", request(task_id="t-mixed", actions=["repo:read", "repo:delete"]),
            grpc.StatusCode.PERMISSION_DENIED),
    Refusal("bad_ttl", request(task_id="t-ttl", ttl_seconds=-3), grpc.StatusCode.INVALID_ARGUMENT),
    Refusal("forged_subject", request(task_id="t-forged", subject_token="a.b.c", subject_token_type=JWT_TYPE),
            grpc.StatusCode.UNAUTHENTICATED),
    Refusal("garbage_parent", delegation("eyJhbGciOiJFUzI1NiJ9.e30.AAAA", task_id="t-garbage"),
            grpc.StatusCode.UNAUTHENTICATED),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.name for c in REFUSALS])
def test_a_refused_exchange_opens_no_task_grants_no_lease_and_holds_no_approval(harness: Harness,
                                                                                case: Refusal) -> None:
    err = refused(lambda: harness.agent(PLANNER).Exchange(case.req, timeout=5))
    assert err.code() == case.code
    assert all_leases(harness) == []
    assert list(harness.operator().ListApprovals(pb.ListApprovalsRequest(include_decided=True),
                                                 timeout=5).approvals) == []
    task_id = case.req.task_id
    assert harness.agent(WORKER).Exchange(request(task_id=task_id), timeout=5).state == "ISSUED"  # id still free


# ---- secrets never leave in errors or in the audit trail ------------------------------------------------------


def test_errors_never_echo_a_presented_token(harness: Harness) -> None:
    token = harness.agent(PLANNER).Exchange(request(), timeout=5).access_token
    agent = harness.agent(WORKER)
    calls = [
        lambda: harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5,
                                              metadata=(("authorization", f"Basic {token}"),)),
        lambda: harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5, metadata=bearer(token + "x")),
        lambda: agent.Exchange(request(subject_token=token, subject_token_type="urn:x"), timeout=5),
        lambda: agent.Exchange(request(subject_token=token, subject_token_type=JWT_TYPE), timeout=5),
        lambda: agent.Exchange(request(task_id=token), timeout=5),
        lambda: agent.Exchange(request(actions=[token]), timeout=5),
        lambda: agent.Exchange(request(audience=token), timeout=5),
        lambda: agent.Exchange(request(context={token[:60].replace(".", "_"): token}, actions=["repo:delete"]),
                               timeout=5),
        lambda: agent.Renew(pb.RenewRequest(lease_id=token), timeout=5),
        lambda: agent.AwaitApproval(pb.AwaitApprovalRequest(approval_id=token), timeout=5),
        lambda: agent.CompleteTask(pb.CompleteTaskRequest(task_id=token), timeout=5),
        lambda: agent.Introspect(pb.IntrospectRequest(token=token), timeout=5),
        lambda: harness.operator().ListLeases(pb.ListLeasesRequest(page_token=token), timeout=5),
    ]
    for call in calls:
        assert_no_leak(refused(call), token)


def test_audit_trail_never_holds_a_token(harness: Harness, tmp_path: Path) -> None:
    agent = harness.agent(PLANNER)
    root = agent.Exchange(request(task_id="tree", actions=["repo:read", "repo:write"]), timeout=5)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5)
    renewed = agent.Renew(pb.RenewRequest(lease_id=root.lease_id), timeout=5)
    subject = svid(harness, WORKER)
    tokens = [root.access_token, child.access_token, renewed.access_token, subject]
    agent.Exchange(request(task_id="ctx", context={"note": root.access_token, "ticket": subject}), timeout=5)
    agent.Exchange(request(task_id="aud", audience=f"aud:{subject}"), timeout=5)
    approval_id = _pending_deploy(harness)
    harness.operator().Deny(pb.DenyRequest(approval_id=approval_id, note=f"leaked {child.access_token}"), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(lease_id=root.lease_id, reason=renewed.access_token), timeout=5)
    with contextlib.suppress(grpc.RpcError):
        agent.Exchange(request(task_id="deny", actions=["repo:delete"], context={"t": subject}), timeout=5)
    text = (tmp_path / "audit.jsonl").read_text()
    assert text.count("\n") > 10
    for token in tokens:
        assert token not in text
        assert token.rsplit(".", 1)[-1] not in text


# ---- taking authority back: revoke all and restarts -----------------------------------------------------------


def _verify(token: str, jwks_json: str) -> dict:
    jwks = jwt.PyJWKSet.from_dict(json.loads(jwks_json))
    header = jwt.get_unverified_header(token)
    keys = [k for k in jwks.keys if k.key_id == header["kid"]]
    if not keys:
        raise jwt.InvalidKeyError("kid not in jwks")
    return jwt.decode(token, key=keys[0], algorithms=[header["alg"]], audience=RESOURCE_SERVER_ID,
                      options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})


def test_revoke_all_leaves_no_earlier_token_usable_anywhere(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    old = agent.Exchange(request(task_id="before"), timeout=5)
    old_child = harness.agent(WORKER).Exchange(delegation(old.access_token), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(all=True, reason="incident"), timeout=5)
    jwks = harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json
    for token in (old.access_token, old_child.access_token):
        with pytest.raises(jwt.PyJWTError):
            _verify(token, jwks)
        assert not introspect(harness, token).active
    err = refused(lambda: harness.agent(HELPER).Exchange(delegation(old.access_token), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = refused(lambda: agent.Renew(pb.RenewRequest(lease_id=old.lease_id), timeout=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    fresh = agent.Exchange(request(task_id="after"), timeout=5)
    assert _verify(fresh.access_token, jwks)["jti"] == fresh.lease_id


@contextlib.contextmanager
def _broker(material: Material, folder: Path, config_text: Callable[[str], str] = lambda t: t) -> Iterator[Harness]:
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(material, folder)
    config.write_text(config_text(config.read_text()))
    broker = RunningBroker(config, FakeClock())
    harness = Harness(broker=broker, material=material)
    try:
        yield harness
    finally:
        harness.close()
        broker.stop()


def _with_signing_key(folder: Path) -> Callable[[str], str]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / "signing-key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return lambda text: text.replace("[tokens]\n", f'[tokens]\nsigning_key = "{path}"\n', 1)


@pytest.mark.parametrize("key", ["ephemeral", "persistent"])
def test_a_restarted_broker_never_resurrects_earlier_authority(material: Material, tmp_path: Path, key: str) -> None:
    tweak = _with_signing_key(tmp_path) if key == "persistent" else (lambda t: t)
    with _broker(material, tmp_path / "first", tweak) as first:
        old = first.agent(PLANNER).Exchange(request(task_id="survivor"), timeout=5)
        first_jwks = first.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json
    with _broker(material, tmp_path / "second", tweak) as second:
        assert not introspect(second, old.access_token).active
        err = refused(lambda: second.agent(WORKER).Exchange(delegation(old.access_token), timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = refused(lambda: second.agent(PLANNER).Renew(pb.RenewRequest(lease_id=old.lease_id), timeout=5))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        second_jwks = second.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json
        assert (first_jwks == second_jwks) == (key == "persistent")


# ---- findings of the security review, fixed: each guards its fix ----


def x5t(harness: Harness, spiffe_id: str) -> str:
    der = harness.material.svid(spiffe_id).cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


X509_ONLY = """@id("push-needs-x509")
permit (principal in Team::"agents", action == Action::"repo:push", resource == Resource::"repo:org/app")
when { context.auth == "x509-svid" };"""


def test_renewal_rechecks_policy_with_the_renewing_callers_credential(harness: Harness, tmp_path: Path) -> None:
    add_policy(harness, tmp_path, X509_ONLY)
    push = request(task_id="push", actions=["repo:push"])
    lease_id = harness.agent(PLANNER).Exchange(push, timeout=5).lease_id
    bearer_only = bearer(svid(harness, PLANNER))
    err = refused(lambda: harness.token_agent().Exchange(push, timeout=5, metadata=bearer_only))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # policy: a JWT-SVID may not push
    err = refused(lambda: harness.token_agent().Renew(pb.RenewRequest(lease_id=lease_id), timeout=5,
                                                      metadata=bearer_only))
    assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


def test_renewal_over_a_bearer_token_never_drops_the_certificate_binding(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    try:
        renewed = harness.token_agent().Renew(pb.RenewRequest(lease_id=resp.lease_id), timeout=5,
                                              metadata=bearer(svid(harness, PLANNER)))
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
        return
    assert claims_of(renewed.access_token).get("cnf") == {"x5t#S256": x5t(harness, PLANNER)}


def test_a_stolen_bound_token_is_not_authority_for_a_stranger(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(task_id="tree", actions=["repo:read", "repo:write"]), timeout=5)
    mallory = bearer(harness.issuer.oidc().id_token("mallory", BROKER_ID))  # no claim any policy permits
    err = refused(lambda: harness.token_agent().Exchange(delegation(root.access_token, ["repo:write"]), timeout=5,
                                                         metadata=mallory))
    assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def test_operator_cannot_approve_their_own_request(harness: Harness, tmp_path: Path) -> None:
    add_policy(harness, tmp_path, """@id("ops-deploy")
@approval("required")
permit (principal == Workload::"spiffe://example.org/operator/alice", action == Action::"deploy:prod",
        resource == Resource::"service:app");""")
    resp = harness.agent(OPERATOR_ID).Exchange(
        request(task_id="self", actions=["deploy:prod"], resource="service:app"), timeout=5)
    assert resp.state == "PENDING_APPROVAL"
    err = refused(lambda: harness.operator().Approve(pb.ApproveRequest(approval_id=resp.approval_id), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_discovery_does_not_take_its_jwks_uri_from_the_host_header(material: Material, tmp_path: Path) -> None:
    issuer = 'issuer = "https://broker.example.org"'
    with contextlib.contextmanager(run_harness)(material, tmp_path, http=True, tokens_extra=issuer) as harness:
        conn = http.client.HTTPConnection("127.0.0.1", harness.broker.app.ports["http"], timeout=5)
        conn.request("GET", "/.well-known/openid-configuration", headers={"Host": "evil.example"})
        doc = json.loads(conn.getresponse().read())
        conn.close()
    assert doc["jwks_uri"] == "https://broker.example.org/.well-known/jwks.json"


def test_audit_trail_never_holds_a_jwt_svid_glued_to_a_word(harness: Harness, tmp_path: Path) -> None:
    subject = svid(harness, WORKER)
    harness.agent(PLANNER).Exchange(request(task_id="aud", audience=f"aud-{subject}"), timeout=5)
    assert subject not in (tmp_path / "audit.jsonl").read_text()


def test_revoking_a_subject_revokes_what_it_holds_by_delegation(harness: Harness) -> None:
    root = harness.agent(PLANNER).Exchange(request(task_id="tree"), timeout=5)
    child = harness.agent(WORKER).Exchange(delegation(root.access_token), timeout=5)
    out = harness.operator().Revoke(pb.RevokeRequest(subject=WORKER, reason="worker compromised"), timeout=5)
    assert out.revoked_count == 1 and not introspect(harness, child.access_token).active


def test_malformed_page_token_is_invalid_argument(harness: Harness) -> None:
    token = base64.urlsafe_b64encode(b'[0,"x",0]').decode().rstrip("=")
    err = refused(lambda: harness.operator().ListLeases(pb.ListLeasesRequest(page_token=token), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())


def test_approval_is_not_spent_by_a_failed_issuance_again(harness: Harness) -> None:
    harness.agent(PLANNER).Exchange(request(task_id="ship"), timeout=5)
    approval_id = _pending_deploy(harness, "ship")
    harness.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5)
    harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="ship"), timeout=5)
    refused(lambda: harness.agent(PLANNER).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id), timeout=5))
    approvals = harness.operator().ListApprovals(pb.ListApprovalsRequest(include_decided=True), timeout=5).approvals
    assert [a.state for a in approvals] == ["APPROVED"]


def test_introspection_never_reports_an_expiry_after_the_lease_ends(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    first = agent.Exchange(request(ttl_seconds=1200), timeout=5)
    renewed = agent.Renew(pb.RenewRequest(lease_id=first.lease_id, ttl_seconds=60), timeout=5)
    info = introspect(harness, first.access_token)
    assert info.active and info.expires_at.seconds <= renewed.expires_at.seconds
