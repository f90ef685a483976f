"""Faults found by testing the broker as an attacker and as a foreign client (issue 11)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from tests.support.harness import PLANNER, RESOURCE_SERVER_ID, Harness

REPO = "repo:org/app"


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _exchange(harness: Harness, task: str = "t1") -> pb.ExchangeResponse:
    return harness.agent(PLANNER).Exchange(
        pb.ExchangeRequest(task_id=task, audience=RESOURCE_SERVER_ID, actions=["repo:read"], resource=REPO), timeout=5
    )


# ---- item 9: operator requests obey the same field rules as Exchange ----------------------------------------


@pytest.mark.parametrize("subject", [
    "not a spiffe\x00",
    "spiffe://Example.org/agent",        # a SPIFFE ID with an upper-case trust domain is no SPIFFE ID
    "spiffe://example.org/agent/../x",
    "oidc:https://issuer.test#alice\n",
    "x" * 3000,
], ids=["nul-and-space", "bad-trust-domain", "dot-segment", "newline", "oversized"])
def test_revoke_by_an_ill_formed_subject_is_invalid_argument(harness: Harness, subject: str) -> None:
    err = refused(lambda: harness.operator().Revoke(pb.RevokeRequest(subject=subject), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subject" in err.details()


def test_revoke_by_an_oidc_principal_is_accepted(harness: Harness) -> None:
    out = harness.operator().Revoke(pb.RevokeRequest(subject="oidc:https://issuer.test#alice"), timeout=5)
    assert out.revoked_count == 0


def test_revoke_by_an_oversized_lease_id_is_invalid_argument(harness: Harness) -> None:
    err = refused(lambda: harness.operator().Revoke(pb.RevokeRequest(lease_id="l" * 60_000), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("field,value", [
    ("principal", "p" * 60_000),
    ("principal", "spiffe://example.org/agent\x00"),
    ("principal", "spiffe://EXAMPLE.org/agent"),
    ("resource", "r" * 60_000),
    ("resource", "repo:org/app with spaces"),
    ("action", "a" * 60_000),
    ("action", "repo:*"),
], ids=["principal-60kb", "principal-nul", "principal-bad-spiffe", "resource-60kb", "resource-spaces",
        "action-60kb", "action-wildcard"])
def test_check_policy_applies_the_exchange_field_rules(harness: Harness, field: str, value: str) -> None:
    fields = {"principal": PLANNER, "action": "repo:read", "resource": REPO, field: value}
    err = refused(lambda: harness.operator().CheckPolicy(pb.CheckPolicyRequest(**fields), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details() and len(err.details()) < 300


def test_check_policy_refuses_an_oversized_context(harness: Harness) -> None:
    req = pb.CheckPolicyRequest(principal=PLANNER, action="repo:read", resource=REPO, context={"k": "v" * 5000})
    err = refused(lambda: harness.operator().CheckPolicy(req, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.details()
