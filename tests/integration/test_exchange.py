"""Exchange over real TLS for each identity kind: the token, its claims, the TTL rule, tasks, policy."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from broker._proto import broker_pb2 as pb
from broker.testing.clock import FakeClock
from tests.support.harness import (
    BROKER_ID,
    PLANNER,
    RESOURCE_SERVER_ID,
    TD,
    WORKER,
    Harness,
    Material,
    RunningBroker,
    bearer,
    write_config,
)

REPO = "repo:org/app"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


def request(task_id: str = "task-1", actions=("repo:read",), resource: str = REPO, **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=task_id, audience=RESOURCE_SERVER_ID, actions=list(actions),
                              resource=resource, **kw)


def verify_with_jwks(harness: Harness, token: str) -> dict:
    jwks = json.loads(harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json)
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return jwt.decode(token, key=key, algorithms=[header["alg"]], audience=RESOURCE_SERVER_ID,
                      issuer=BROKER_ID, options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})


def x5t(harness: Harness, spiffe_id: str) -> str:
    der = harness.material.svid(spiffe_id).cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def test_mtls_exchange_issues_a_token_that_verifies_against_get_jwks(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(actions=["repo:read", "repo:write"]), timeout=5)
    assert resp.state == "ISSUED" and resp.token_type == "Bearer"
    assert resp.issued_token_type == "urn:ietf:params:oauth:token-type:access_token"
    claims = verify_with_jwks(harness, resp.access_token)
    assert jwt.get_unverified_header(resp.access_token)["typ"] == "at+jwt"
    assert claims["sub"] == PLANNER and claims["client_id"] == PLANNER
    assert claims["aud"] == RESOURCE_SERVER_ID and claims["iss"] == BROKER_ID
    assert claims["scope"] == "repo:read repo:write" and list(resp.scope) == ["repo:read", "repo:write"]
    assert claims["resource"] == REPO and claims["txn"] == "task-1"
    assert claims["jti"] == resp.lease_id and resp.task_id == "task-1"
    assert claims["exp"] == resp.expires_at.seconds and claims["nbf"] == claims["iat"]
    assert "act" not in claims


def test_mtls_token_is_bound_to_the_client_certificate(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    assert verify_with_jwks(harness, resp.access_token)["cnf"] == {"x5t#S256": x5t(harness, PLANNER)}


def test_jwt_svid_bearer_exchange_on_token_listener(harness: Harness) -> None:
    svid = harness.issuer.jwt(TD).jwt_svid(WORKER, BROKER_ID, ttl=600)
    resp = harness.token_agent().Exchange(request(resource="repo:org/docs"), timeout=5, metadata=bearer(svid))
    claims = verify_with_jwks(harness, resp.access_token)
    assert claims["sub"] == WORKER and claims["client_id"] == WORKER
    assert "cnf" not in claims


def test_oidc_bearer_exchange_maps_the_principal_with_the_template(harness: Harness) -> None:
    oidc = harness.issuer.oidc()
    token = oidc.id_token("user-42", BROKER_ID, claims={"email": "dev@example.org"})
    resp = harness.token_agent().Exchange(request(), timeout=5, metadata=bearer(token))
    claims = verify_with_jwks(harness, resp.access_token)
    assert claims["sub"] == f"oidc:{oidc.issuer}#user-42"


def test_oidc_token_without_the_claim_policy_needs_is_denied(harness: Harness) -> None:
    token = harness.issuer.oidc().id_token("user-43", BROKER_ID)
    with pytest.raises(grpc.RpcError) as err:
        harness.token_agent().Exchange(request(), timeout=5, metadata=bearer(token))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_subject_token_names_the_subject_and_the_caller_is_client_id(harness: Harness) -> None:
    oidc = harness.issuer.oidc()
    subject = oidc.id_token("user-7", BROKER_ID, claims={"email": "u7@example.org"})
    resp = harness.agent(PLANNER).Exchange(
        request(subject_token=subject, subject_token_type=TOKEN_TYPE_ID_TOKEN), timeout=5
    )
    claims = verify_with_jwks(harness, resp.access_token)
    assert claims["sub"] == f"oidc:{oidc.issuer}#user-7" and claims["client_id"] == PLANNER


def test_jwt_svid_subject_token(harness: Harness) -> None:
    subject = harness.issuer.jwt(TD).jwt_svid(WORKER, BROKER_ID)
    resp = harness.agent(PLANNER).Exchange(
        request(resource="repo:org/docs", subject_token=subject, subject_token_type=TOKEN_TYPE_JWT), timeout=5
    )
    assert verify_with_jwks(harness, resp.access_token)["sub"] == WORKER


def test_forged_subject_token_is_unauthenticated(harness: Harness) -> None:
    forged = harness.issuer.jwt("other.org").jwt_svid(WORKER, BROKER_ID)
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).Exchange(request(subject_token=forged, subject_token_type=TOKEN_TYPE_JWT), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class TtlCase:
    name: str
    ttl_seconds: int
    actions: tuple[str, ...]
    expected_ttl: int
    capped_by: str


TTL_CASES = [
    TtlCase("default", 0, ("repo:read",), 300, "default"),
    TtlCase("requested", 120, ("repo:read",), 120, "requested"),
    TtlCase("policy_cap", 3000, ("repo:read",), 1800, "policy"),
    TtlCase("admin_policy_cap", 7200, ("repo:admin",), 60, "policy"),
    TtlCase("tightest_policy_of_two", 900, ("repo:read", "repo:admin"), 60, "policy"),
]


@pytest.mark.parametrize("case", TTL_CASES, ids=[c.name for c in TTL_CASES])
def test_ttl_rule(harness: Harness, case: TtlCase) -> None:
    now = harness.clock.now()
    resp = harness.agent(PLANNER).Exchange(request(actions=case.actions, ttl_seconds=case.ttl_seconds), timeout=5)
    assert resp.ttl_capped_by == case.capped_by
    assert resp.expires_at.seconds == int(now + case.expected_ttl)


def test_ttl_capped_by_config_max_ttl(harness: Harness) -> None:
    now = harness.clock.now()
    resp = harness.agent(PLANNER).Exchange(
        request(actions=["db:migrate"], resource="db:prod", ttl_seconds=7200, context={"ticket": "CHG-1"}),
        timeout=5,
    )
    assert resp.ttl_capped_by == "max_ttl" and resp.expires_at.seconds == int(now + 3600)


def test_ttl_capped_by_task_deadline(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    start = harness.clock.now()
    agent.Exchange(request(task_id="deadline"), timeout=5)
    harness.clock.advance(2 * 3600 - 100)  # max_task_lifetime is 2h
    resp = agent.Exchange(request(task_id="deadline"), timeout=5)
    assert resp.ttl_capped_by == "task_deadline"
    assert resp.expires_at.seconds == int(start + 2 * 3600)


def test_ttl_capped_by_subject_token_lifetime(harness: Harness) -> None:
    svid = harness.issuer.jwt(TD).jwt_svid(WORKER, BROKER_ID, ttl=90, now=harness.clock.now())
    resp = harness.token_agent().Exchange(request(resource="repo:org/docs"), timeout=5, metadata=bearer(svid))
    assert resp.ttl_capped_by == "subject_token"
    assert resp.expires_at.seconds == jwt.decode(svid, options={"verify_signature": False})["exp"]


def test_another_principal_cannot_use_a_task_id(harness: Harness) -> None:
    harness.agent(PLANNER).Exchange(request(task_id="mine"), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(WORKER).Exchange(request(task_id="mine"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "another principal" in err.value.details()


def test_denied_request_creates_no_task(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).Exchange(request(task_id="denied", actions=["repo:delete"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    resp = harness.agent(WORKER).Exchange(request(task_id="denied"), timeout=5)
    assert resp.state == "ISSUED"


@dataclass(frozen=True)
class PolicyCase:
    name: str
    actions: tuple[str, ...]
    resource: str
    context: tuple[tuple[str, str], ...]
    allowed: bool


POLICY_CASES = [
    PolicyCase("permitted", ("repo:write",), REPO, (), True),
    PolicyCase("default_deny", ("repo:delete",), REPO, (), False),
    PolicyCase("forbid_wins_on_secret", ("repo:read",), "vault:prod", (), False),
    PolicyCase("ticket_present", ("db:migrate",), "db:prod", (("ticket", "CHG-9"),), True),
    PolicyCase("ticket_missing", ("db:migrate",), "db:prod", (), False),
    PolicyCase("one_action_denied_denies_all", ("repo:read", "repo:delete"), REPO, (), False),
]


@pytest.mark.parametrize("case", POLICY_CASES, ids=[c.name for c in POLICY_CASES])
def test_policy_decides_each_request(harness: Harness, case: PolicyCase) -> None:
    req = request(actions=case.actions, resource=case.resource, context=dict(case.context))
    if case.allowed:
        assert harness.agent(PLANNER).Exchange(req, timeout=5).state == "ISSUED"
        return
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).Exchange(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class BadRequest:
    name: str
    req: pb.ExchangeRequest
    field: str


BAD_REQUESTS = [
    BadRequest("no_task", request(task_id=""), "task_id"),
    BadRequest("bad_task", request(task_id="a b"), "task_id"),
    BadRequest("no_audience", pb.ExchangeRequest(task_id="t", actions=["repo:read"], resource=REPO), "audience"),
    BadRequest("no_actions", request(actions=()), "actions"),
    BadRequest("bad_action", request(actions=("repo read",)), "actions"),
    BadRequest("repeated_action", request(actions=("repo:read", "repo:read")), "actions"),
    BadRequest("too_many_actions", request(actions=tuple(f"a{i}" for i in range(17))), "actions"),
    BadRequest("no_resource", request(resource=""), "resource"),
    BadRequest("negative_ttl", request(ttl_seconds=-1), "ttl_seconds"),
    BadRequest("context_too_big", request(context={f"k{i}": "v" * 200 for i in range(30)}), "context"),
    BadRequest("context_bad_key", request(context={"bad key": "v"}), "context"),
    BadRequest("token_type_without_token", request(subject_token_type=TOKEN_TYPE_JWT), "subject_token_type"),
    BadRequest("unknown_token_type", request(subject_token="x", subject_token_type="urn:x"), "subject_token_type"),
]


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[b.name for b in BAD_REQUESTS])
def test_malformed_request_is_invalid_argument_naming_the_field(harness: Harness, bad: BadRequest) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).Exchange(bad.req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.field in err.value.details()


def test_oversized_request_is_refused_by_the_transport(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).Exchange(request(context={"blob": "x" * 100_000}), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_introspect_active_token_for_its_audience(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    info = harness.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token=resp.access_token), timeout=5)
    assert info.active and info.lease_id == resp.lease_id and info.subject == PLANNER
    assert info.client_id == PLANNER and list(info.scope) == ["repo:read"] and info.task_id == "task-1"
    assert info.expires_at.seconds == resp.expires_at.seconds and info.audience == RESOURCE_SERVER_ID


def test_introspect_expired_token_is_inactive(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(ttl_seconds=60), timeout=5)
    harness.clock.advance(61)
    info = harness.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token=resp.access_token), timeout=5)
    assert not info.active and info.lease_id == ""


def test_introspect_forged_token_is_inactive(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    head, body, sig = resp.access_token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "==="))
    claims["scope"] = "repo:read repo:admin"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    info = harness.agent(RESOURCE_SERVER_ID).Introspect(
        pb.IntrospectRequest(token=f"{head}.{forged_body}.{sig}"), timeout=5
    )
    assert not info.active


def test_introspect_unknown_token_is_inactive(harness: Harness) -> None:
    info = harness.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token="a.b.c"), timeout=5)
    assert not info.active


def test_introspect_by_someone_else_is_permission_denied(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(WORKER).Introspect(pb.IntrospectRequest(token=resp.access_token), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_introspect_by_configured_introspector(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    info = harness.agent("spiffe://example.org/service/gateway").Introspect(
        pb.IntrospectRequest(token=resp.access_token), timeout=5
    )
    assert info.active


def test_audit_records_decisions_and_issuance_without_tokens(harness: Harness, tmp_path) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    with pytest.raises(grpc.RpcError):
        harness.agent(PLANNER).Exchange(request(actions=["repo:delete"]), timeout=5)
    text = (tmp_path / "audit.jsonl").read_text()
    assert resp.access_token not in text
    records = [json.loads(line) for line in text.splitlines()]
    kinds = [r["kind"] for r in records]
    assert "decision" in kinds and "token.issued" in kinds and "lease.granted" in kinds
    decisions = [r for r in records if r["kind"] == "decision"]
    assert [d["decision"] for d in decisions] == ["allow", "deny"]
    assert decisions[0]["policies"] == ["agents-use-repo"]
    issued = next(r for r in records if r["kind"] == "token.issued")
    assert issued["lease_id"] == resp.lease_id and issued["token_sha256"].startswith("sha256:")


@pytest.fixture
def limited(material, tmp_path):
    from tests.support.harness import run_harness

    yield from run_harness(material, tmp_path, extra="[limits]\nrate_per_second = 1\nrate_burst = 2\n")


def test_exchanges_over_the_rate_limit_are_resource_exhausted(limited: Harness) -> None:
    agent = limited.agent(PLANNER)
    for _ in range(2):
        agent.Exchange(request(), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        agent.Exchange(request(), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.value.details()
    assert limited.agent(WORKER).Exchange(request(task_id="other"), timeout=5).state == "ISSUED"
    limited.clock.advance(1)
    assert agent.Exchange(request(), timeout=5).state == "ISSUED"


def test_unreachable_oidc_issuer_is_unavailable_not_a_crash(harness: Harness) -> None:
    oidc = harness.issuer.oidc()
    token = oidc.id_token("user-9", BROKER_ID, claims={"email": "u9@example.org"})
    oidc.set_available(False)
    try:
        with pytest.raises(grpc.RpcError) as err:
            harness.token_agent().Exchange(request(), timeout=10, metadata=bearer(token))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "unreachable" in err.value.details()
    finally:
        oidc.set_available(True)
    harness.clock.advance(5)   # past the fetcher's first backoff
    assert harness.token_agent().Exchange(request(), timeout=10, metadata=bearer(token)).state == "ISSUED"


def test_refusals_before_policy_are_audited_too(harness: Harness, tmp_path) -> None:
    harness.agent(PLANNER).Exchange(request(task_id="owned"), timeout=5)
    with pytest.raises(grpc.RpcError):
        harness.agent(WORKER).Exchange(request(task_id="owned"), timeout=5)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    denied = [r for r in records if r["kind"] == "decision" and r["decision"] == "deny"]
    assert [(d["client_id"], d["task_id"]) for d in denied] == [(WORKER, "owned")]
    assert "another principal" in denied[0]["reason"]


def _quota_request(task_id: str) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(
        task_id=task_id, audience=RESOURCE_SERVER_ID, actions=["repo:read"], resource="repo:org/app"
    )


def test_the_task_quota_comes_from_the_config(material: Material, tmp_path: Path) -> None:
    harness = Harness(
        broker=RunningBroker(
            write_config(material, tmp_path, extra="\n[limits]\nmax_tasks_per_principal = 2\n"), FakeClock()
        ),
        material=material,
    )
    try:
        for task_id in ("q-1", "q-2"):
            harness.agent(PLANNER).Exchange(_quota_request(task_id), timeout=5)
        harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="q-1"), timeout=5)
        with pytest.raises(grpc.RpcError) as err:  # a completed task still counts until its deadline
            harness.agent(PLANNER).Exchange(_quota_request("q-3"), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "already has 2 tasks" in err.value.details()
        assert harness.agent(WORKER).Exchange(_quota_request("q-3"), timeout=5).state == "ISSUED"  # per principal
    finally:
        harness.close()
        harness.broker.stop()
