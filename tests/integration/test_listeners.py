"""Both listeners over real TLS: health, reflection, and refusal of identities that fail the SPIFFE rules."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from tests.support.harness import BROKER_ID, OTHER_TD, PLANNER, TD, Harness, bearer


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _reflected_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return {s.name for r in responses for s in r.list_services_response.service}


# Every RPC with a minimal request: a refused identity must be refused on each of them.
CALLS = [
    ("CredentialBroker", "Exchange", pb.ExchangeRequest(task_id="t", audience="a", actions=["x"], resource="r")),
    ("CredentialBroker", "Renew", pb.RenewRequest(lease_id="l")),
    ("CredentialBroker", "CompleteTask", pb.CompleteTaskRequest(task_id="t")),
    ("CredentialBroker", "Introspect", pb.IntrospectRequest(token="x")),
    ("CredentialBroker", "AwaitApproval", pb.AwaitApprovalRequest(approval_id="a")),
    ("CredentialBroker", "GetJWKS", pb.GetJWKSRequest()),
    ("BrokerAdmin", "ListLeases", pb.ListLeasesRequest()),
    ("BrokerAdmin", "GetLease", pb.GetLeaseRequest(lease_id="l")),
    ("BrokerAdmin", "Revoke", pb.RevokeRequest(lease_id="l")),
    ("BrokerAdmin", "CheckPolicy", pb.CheckPolicyRequest(principal="p", action="a", resource="r")),
    ("BrokerAdmin", "ReloadPolicy", pb.ReloadPolicyRequest()),
    ("BrokerAdmin", "ListApprovals", pb.ListApprovalsRequest()),
    ("BrokerAdmin", "Approve", pb.ApproveRequest(approval_id="a")),
    ("BrokerAdmin", "Deny", pb.DenyRequest(approval_id="a")),
]
CALL_IDS = [c[1] for c in CALLS]


def _call(channel: grpc.Channel, service: str, method: str, request, metadata=()) -> None:
    stub = pb_grpc.CredentialBrokerStub(channel) if service == "CredentialBroker" else pb_grpc.BrokerAdminStub(channel)
    getattr(stub, method)(request, timeout=5, metadata=metadata)


def _watch(channel: grpc.Channel, metadata=()) -> None:
    stream = pb_grpc.CredentialBrokerStub(channel).WatchRevocations(
        pb.WatchRevocationsRequest(), timeout=5, metadata=metadata
    )
    next(iter(stream))


def test_health_serving_on_mtls_listener(harness: Harness) -> None:
    assert _health(harness.mtls_channel(PLANNER)) == health_pb2.HealthCheckResponse.SERVING


def test_health_serving_on_token_listener_without_client_certificate(harness: Harness) -> None:
    assert _health(harness.token_channel()) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_both_services(harness: Harness) -> None:
    services = _reflected_services(harness.token_channel())
    assert {"broker.v1.CredentialBroker", "broker.v1.BrokerAdmin", "grpc.health.v1.Health"} <= services


def test_mtls_listener_refuses_a_client_without_certificate(harness: Harness) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=harness.material.roots_pem)
    channel = grpc.secure_channel(
        f"127.0.0.1:{harness.broker.mtls_port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    harness.channels.append(channel)
    with pytest.raises(grpc.RpcError) as err:
        _health(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class BadChain:
    name: str
    rule: str

    def svid(self, harness: Harness):
        issuer = harness.issuer
        if self.name == "other_domain_signs_this_one":
            return issuer.ca(OTHER_TD).x509_svid(f"spiffe://{TD}/agent/forged")
        flaw = {"ca_leaf": "ca_leaf", "two_uri_sans": "two_uri_sans", "key_cert_sign": "key_cert_sign"}[self.name]
        return issuer.ca(TD).x509_svid(f"spiffe://{TD}/agent/flawed-{flaw}", flaw=flaw)


BAD_CHAINS = [
    BadChain("other_domain_signs_this_one", "bundle of example.org"),
    BadChain("ca_leaf", "ca"),
    BadChain("two_uri_sans", "uri san"),
    BadChain("key_cert_sign", "keycertsign"),
]


@pytest.mark.parametrize("bad", BAD_CHAINS, ids=[b.name for b in BAD_CHAINS])
def test_chain_accepted_by_tls_but_refused_by_spiffe_rules_on_every_rpc(harness: Harness, bad: BadChain) -> None:
    channel = harness.mtls_channel(bad.svid(harness))
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING  # the TLS layer let it in
    for service, method, request in CALLS:
        with pytest.raises(grpc.RpcError) as err:
            _call(channel, service, method, request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        assert bad.rule in err.value.details().lower(), (method, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        _watch(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class BadToken:
    name: str

    def token(self, harness: Harness) -> str:
        jwt = harness.issuer.jwt(TD)
        if self.name == "garbage":
            return "not-a-jwt"
        if self.name == "expired":
            return jwt.jwt_svid(PLANNER, BROKER_ID, now=harness.clock.now() - 3600, ttl=60)
        if self.name == "wrong_audience":
            return jwt.jwt_svid(PLANNER, "spiffe://example.org/someone-else")
        if self.name == "alg_none":
            return jwt.jwt_svid(PLANNER, BROKER_ID, alg="none")
        if self.name == "other_domain_key":
            return harness.issuer.jwt(OTHER_TD).jwt_svid(PLANNER, BROKER_ID)
        raise AssertionError(self.name)


BAD_TOKENS = [BadToken(n) for n in ("garbage", "expired", "wrong_audience", "alg_none", "other_domain_key")]


@pytest.mark.parametrize("bad", BAD_TOKENS, ids=[b.name for b in BAD_TOKENS])
def test_bearer_token_failing_verification_is_refused_on_every_rpc(harness: Harness, bad: BadToken) -> None:
    channel = harness.token_channel()
    metadata = bearer(bad.token(harness))
    for service, method, request in CALLS:
        with pytest.raises(grpc.RpcError) as err:
            _call(channel, service, method, request, metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    with pytest.raises(grpc.RpcError) as err:
        _watch(channel, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_listener_without_token_is_unauthenticated(harness: Harness) -> None:
    stub = harness.token_agent()
    with pytest.raises(grpc.RpcError) as err:
        stub.Exchange(pb.ExchangeRequest(task_id="t", audience="a", actions=["x"], resource="r"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token required" in err.value.details()


def test_get_jwks_needs_no_credential_on_token_listener(harness: Harness) -> None:
    jwks = harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json
    assert '"keys"' in jwks and '"d"' not in jwks


def test_non_bearer_authorization_is_refused(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5, metadata=(("authorization", "Basic abc"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
