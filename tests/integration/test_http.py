"""The optional plain-HTTP listener: JWKS, discovery, metrics and health."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from broker._proto import broker_pb2 as pb
from tests.support.harness import BROKER_ID, PLANNER, RESOURCE_SERVER_ID, Harness, run_harness


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


def test_discovery_names_the_issuer_and_jwks_uri(web: Harness) -> None:
    doc = json.loads(_get(web, "/.well-known/openid-configuration")[1])
    assert doc["issuer"] == BROKER_ID and doc["jwks_uri"].endswith("/.well-known/jwks.json")


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
