"""The optional plain-HTTP listener: JWKS, discovery, metrics and health."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import jwt
import pytest

from broker._proto import broker_pb2 as pb
from tests.support.harness import BROKER_ID, PLANNER, RESOURCE_SERVER_ID, WORKER, Harness, run_harness


@pytest.fixture
def web(material, tmp_path):
    yield from run_harness(material, tmp_path, http=True)


def _get(harness: Harness, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{harness.broker.app.ports['http']}{path}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def test_jwks_over_http_matches_get_jwks(web: Harness) -> None:
    status, body = _get(web, "/.well-known/jwks.json")
    grpc_jwks = web.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json
    assert status == 200 and json.loads(body) == json.loads(grpc_jwks)


ISSUER_URL = "https://broker.example.org/tenant-1"


@pytest.fixture
def web_issuer(material, tmp_path):
    yield from run_harness(material, tmp_path, http=True, tokens_extra=f'issuer = "{ISSUER_URL}"')


def _status(harness: Harness, path: str) -> int:
    try:
        return _get(harness, path)[0]
    except urllib.error.HTTPError as e:
        return e.code


def test_without_tokens_issuer_no_discovery_document_is_served(web: Harness) -> None:
    # A SPIFFE ID is no https issuer: a document naming one would not be OIDC discovery.
    assert _status(web, "/.well-known/openid-configuration") == 404
    assert _status(web, "/.well-known/jwks.json") == 200


def test_without_tokens_issuer_tokens_name_the_spiffe_id(web: Harness) -> None:
    token = web.agent(PLANNER).Exchange(_request("plain"), timeout=5).access_token
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == BROKER_ID


def test_discovery_document_has_every_required_field(web_issuer: Harness) -> None:
    doc = json.loads(_get(web_issuer, "/.well-known/openid-configuration")[1])
    assert doc["issuer"] == ISSUER_URL
    assert doc["jwks_uri"] == ISSUER_URL + "/.well-known/jwks.json"
    assert doc["response_types_supported"] and doc["subject_types_supported"] == ["public"]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert "token_endpoint" not in doc   # exchange is gRPC, not an OAuth HTTP endpoint


def test_discovery_and_jwks_are_served_under_the_issuer_path(web_issuer: Harness) -> None:
    # A proxy at the issuer URL may pass its path through: both spellings answer.
    doc = json.loads(_get(web_issuer, "/tenant-1/.well-known/openid-configuration")[1])
    assert doc["issuer"] == ISSUER_URL
    keys = json.loads(_get(web_issuer, "/tenant-1/.well-known/jwks.json")[1])
    assert keys == json.loads(_get(web_issuer, "/.well-known/jwks.json")[1])


def test_tokens_issuer_is_the_iss_of_minted_tokens_and_what_verification_expects(web_issuer: Harness) -> None:
    resp = web_issuer.agent(PLANNER).Exchange(_request("iss"), timeout=5)
    claims = jwt.decode(resp.access_token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER_URL
    seen = web_issuer.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token=resp.access_token), timeout=5)
    assert seen.active and seen.lease_id == resp.lease_id
    child = web_issuer.agent(WORKER).Exchange(
        pb.ExchangeRequest(actions=["repo:read"], subject_token=resp.access_token,
                           subject_token_type="urn:ietf:params:oauth:token-type:access_token"), timeout=5)
    assert jwt.decode(child.access_token, options={"verify_signature": False})["iss"] == ISSUER_URL


def _request(task: str) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=task, audience=RESOURCE_SERVER_ID, actions=["repo:read"], resource="repo:org/app")


def test_metrics_count_rpcs_and_leases(web: Harness) -> None:
    web.agent(PLANNER).Exchange(
        pb.ExchangeRequest(task_id="m", audience=RESOURCE_SERVER_ID, actions=["repo:read"], resource="repo:org/app"),
        timeout=5,
    )
    body = _get(web, "/metrics")[1]
    assert 'broker_rpc_total{code="OK",method="Exchange"}' in body
    assert 'broker_leases{kind="active"} 1.0' in body


def test_healthz(web: Harness) -> None:
    assert _get(web, "/healthz") == (200, "ok\n")


def test_unknown_path_is_404(web: Harness) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(web, "/nope")
    assert err.value.code == 404
