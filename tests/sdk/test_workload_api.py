"""The mock Workload API speaks the real protocol: py-spiffe's client works against it."""

from __future__ import annotations

import base64
import json
import threading

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2 as wl
from spiffe._proto import workload_pb2_grpc as wl_grpc

from broker.client import AgentClient, BearerIdentity, IdentityUnavailable, WorkloadApiIdentity, workload_api_jwt_svid
from broker.testing.broker import InProcessBroker
from broker.testing.mock_issuer import MockIssuer
from broker.testing.workload_api import MockWorkloadApi
from broker.verifier.verifier import thumbprint
from tests.sdk.conftest import APP, PLANNER, REPO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def api(sdk_issuer: MockIssuer):
    with MockWorkloadApi.for_issuer(sdk_issuer, PLANNER) as running:
        yield running


def test_py_spiffe_fetches_the_svid_and_bundles(api: MockWorkloadApi, sdk_issuer: MockIssuer) -> None:
    with WorkloadApiClient(socket_path=api.address, default_timeout=10) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        jwt_bundles = client.fetch_jwt_bundles()
    assert str(svid.spiffe_id) == PLANNER
    assert svid.leaf.serial_number == api.svid.cert.serial_number
    (bundle,) = bundles.bundles
    assert sdk_issuer.ca("example.org").root in bundle.x509_authorities
    assert [str(b.trust_domain) for b in jwt_bundles.bundles] == ["example.org"]


def test_py_spiffe_fetches_and_validates_a_jwt_svid(api: MockWorkloadApi) -> None:
    with WorkloadApiClient(socket_path=api.address, default_timeout=10) as client:
        svid = client.fetch_jwt_svid(audience={"spiffe://example.org/broker"})
        validated = client.validate_jwt_svid(svid.token, "spiffe://example.org/broker")
    assert str(svid.spiffe_id) == PLANNER
    assert str(validated.spiffe_id) == PLANNER


def test_a_call_without_the_security_header_is_invalid_argument(api: MockWorkloadApi) -> None:
    with grpc.insecure_channel(f"unix:{api.socket_path}") as channel:
        stub = wl_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.FetchX509SVID(wl.X509SVIDRequest(), timeout=10))
        with pytest.raises(grpc.RpcError) as refused_jwt:
            stub.FetchJWTSVID(wl.JWTSVIDRequest(audience=["x"]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused_jwt.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rotation_pushes_a_new_svid_down_the_stream(api: MockWorkloadApi) -> None:
    updated = threading.Event()
    source = X509Source(socket_path=api.address, timeout_in_seconds=10)
    try:
        before = source.get_x509_context().default_svid.leaf.serial_number
        source.subscribe_for_updates(updated.set)
        rotated = api.rotate()
        assert updated.wait(10)
        after = source.get_x509_context().default_svid.leaf.serial_number
    finally:
        source.close()
    assert after != before
    assert after == rotated.cert.serial_number


async def test_agent_follows_svid_rotation_through_the_workload_api(broker: InProcessBroker) -> None:
    with broker.workload_api(PLANNER) as api:
        identity = WorkloadApiIdentity(api.address)
        async with AgentClient(broker.mtls_address, identity) as agent, agent.task("T-1") as task:
            assert identity.spiffe_id == PLANNER
            first = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
            rotated = api.rotate()
            assert identity.rotated.wait(10)
            second = await task.credential(audience=REPO, actions=["repo:write"], resource=APP)
    # Each credential is bound to the certificate the agent presented when it was issued.
    assert first.token != second.token
    assert _cnf(second.token) == thumbprint(rotated.cert.public_bytes(_DER))
    assert _cnf(first.token) != _cnf(second.token)


async def test_jwt_svid_provider_from_the_workload_api(broker: InProcessBroker) -> None:
    with broker.workload_api(PLANNER) as api:
        provider = workload_api_jwt_svid(broker.spiffe_id, socket=api.address)
        async with AgentClient(broker.token_address, BearerIdentity(provider, broker.roots_pem)) as agent, \
                agent.task("T-1") as task:
            cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
    assert cred.scope == ("repo:read",)


_DER = Encoding.DER


def _cnf(token: str) -> str:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["cnf"]["x5t#S256"]


async def test_no_workload_api_is_identity_unavailable(tmp_path) -> None:
    identity = WorkloadApiIdentity(f"unix://{tmp_path}/absent.sock", timeout=1)
    with pytest.raises(IdentityUnavailable, match="workload api"):
        await identity.start()
