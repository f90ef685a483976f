"""Fixtures for the SDK tests: one mock issuer per session, a fresh in-process broker per test."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker._proto import broker_pb2_grpc as pb_grpc
from broker.testing.broker import InProcessBroker
from broker.testing.clock import FakeClock
from broker.testing.mock_issuer import MockIssuer

ASYNC_TEST_TIMEOUT = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests on a fresh event loop, each bounded in time."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), ASYNC_TEST_TIMEOUT))
    return True


TD = "spiffe://example.org"
PLANNER = f"{TD}/agent/planner"
WORKER = f"{TD}/agent/worker"
REPO = f"{TD}/service/repo"
TOOLS = f"{TD}/service/tools"
OPERATOR = f"{TD}/operator/alice"
APP = "repo:org/app"

POLICY = """\
@id("agents-use-repo")
@max_ttl("1800")
permit (principal in Team::"agents", action in [Action::"repo:read", Action::"repo:write"],
        resource == Resource::"repo:org/app");

@id("jwt-svid-reads")
permit (principal in Team::"agents", action == Action::"repo:read", resource == Resource::"repo:org/app")
when { context.auth == "jwt-svid" };

@id("deploy-needs-approval")
@approval("required")
permit (principal in Team::"agents", action == Action::"deploy:prod", resource == Resource::"service:app");

@id("worker-reads-for-planner")
forbid (principal, action, resource)
when { context.delegated && context.actor == "spiffe://example.org/agent/worker" && action != Action::"repo:read" };

@id("agents-use-read-tools")
permit (principal in Team::"agents", action in [Action::"mcp:connect", Action::"tool:read_file"],
        resource == Resource::"mcp:repo-tools");
"""


def entities() -> list[dict]:
    team = {"type": "Team", "id": "agents"}
    rows: list[dict] = [{"uid": team, "attrs": {}, "parents": []}]
    for agent in (PLANNER, WORKER):
        rows.append({"uid": {"type": "Workload", "id": agent}, "attrs": {}, "parents": [team]})
    return rows


@pytest.fixture(scope="session")
def sdk_issuer() -> Iterator[MockIssuer]:
    issuer = MockIssuer()
    try:
        yield issuer
    finally:
        issuer.close()


@pytest.fixture
def broker(sdk_issuer: MockIssuer, tmp_path: Path) -> Iterator[InProcessBroker]:
    with InProcessBroker(policy=POLICY, entities=entities(), issuer=sdk_issuer, folder=tmp_path / "broker") as running:
        yield running


@pytest.fixture
def clocked(sdk_issuer: MockIssuer, tmp_path: Path) -> Iterator[InProcessBroker]:
    """A broker on a fake clock (`broker.clock`), for renewal and staleness tests."""
    with InProcessBroker(policy=POLICY, entities=entities(), issuer=sdk_issuer, folder=tmp_path / "broker",
                         clock=FakeClock()) as running:
        yield running


def operator(broker: InProcessBroker) -> pb_grpc.BrokerAdminStub:
    """A plain gRPC admin stub for the operator's side of a test."""
    svid = broker.svid(OPERATOR)
    creds = grpc.ssl_channel_credentials(root_certificates=broker.roots_pem, private_key=svid.key_pem(),
                                         certificate_chain=svid.chain_pem())
    return pb_grpc.BrokerAdminStub(grpc.secure_channel(broker.mtls_address, creds))
