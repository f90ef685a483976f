"""The agent SDK against a live broker: credentials, caching, renewal, completion, approval, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.client import (
    AgentClient,
    ApprovalDenied,
    ApprovalTimeout,
    BearerIdentity,
    FileIdentity,
    PolicyDenied,
    SyncAgentClient,
    Unauthenticated,
    Unavailable,
)
from broker.testing.broker import InProcessBroker
from tests.sdk.conftest import APP, PLANNER, REPO, WORKER, operator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


async def active(broker: InProcessBroker, token: str) -> bool:
    async with broker.agent(REPO) as repo:
        return (await repo.introspect(token)).active


async def test_credential_carries_its_lease_and_caps(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as agent, agent.task("T-1") as task:
        cred = await task.credential(audience=REPO, actions=["repo:read", "repo:write"], resource=APP, ttl=3600,
                                     context={"reason": "test"})
        assert cred.lease_id.startswith("lse_")
        assert set(cred.scope) == {"repo:read", "repo:write"}
        assert cred.ttl_capped_by == "policy"
        assert cred.expires_at > broker.app.clock.now()
        assert cred.secret is None  # no dynamic-secret backend issued one
        assert await active(broker, cred.token)


async def test_the_same_intent_reuses_the_credential(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as agent, agent.task("T-1") as task:
        first = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
        again = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
        other = await task.credential(audience=REPO, actions=["repo:write"], resource=APP)
    assert again is first
    assert other.lease_id != first.lease_id


async def test_credential_is_renewed_before_expiry(clocked: InProcessBroker) -> None:
    clock = clocked.clock
    async with clocked.agent(PLANNER, renew_jitter=0) as agent, agent.task("T-1") as task:
        cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP, ttl=60)
        first_token, first_expiry = cred.token, cred.expires_at
        clock.advance(50)  # past the renewal point (60 s lifetime, a quarter kept in reserve), before expiry
        assert await cred.wait_renewed(1, timeout=10)
        assert cred.token != first_token
        assert cred.expires_at >= first_expiry + 49
        clock.advance(30)  # the first token's expiry has passed; the lease lives on
        assert await active(clocked, cred.token)


async def test_task_is_completed_when_the_body_raises(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as agent:
        with pytest.raises(RuntimeError, match="agent failed"):
            async with agent.task("T-1") as task:
                cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
                raise RuntimeError("agent failed")
        assert task.completed == 1
        assert not await active(broker, cred.token)


async def test_task_is_completed_when_the_agent_is_cancelled(broker: InProcessBroker) -> None:
    holder: dict = {}
    started = asyncio.Event()

    async def body(agent: AgentClient) -> None:
        async with agent.task("T-1") as task:
            holder["task"] = task
            holder["cred"] = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
            started.set()
            await asyncio.Event().wait()

    async with broker.agent(PLANNER) as agent:
        running = asyncio.create_task(body(agent))
        await asyncio.wait_for(started.wait(), 10)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert holder["task"].completed == 1
        assert not await active(broker, holder["cred"].token)


async def test_pending_approval_waits_and_tells_the_agent(broker: InProcessBroker) -> None:
    admin = operator(broker)
    told: list[str] = []

    async def on_approval(approval_id: str, request: dict) -> None:
        told.append(approval_id)
        assert request["actions"] == ["deploy:prod"]
        await asyncio.to_thread(admin.Approve, pb.ApproveRequest(approval_id=approval_id, note="ok"), timeout=10)

    async with broker.agent(PLANNER) as agent, agent.task("T-1", on_approval=on_approval) as task:
        cred = await task.credential(audience="spiffe://example.org/service/deployer", actions=["deploy:prod"],
                                     resource="service:app")
    assert len(told) == 1
    assert cred.scope == ("deploy:prod",)


async def test_denied_approval_is_approval_denied(broker: InProcessBroker) -> None:
    admin = operator(broker)

    async def on_approval(approval_id: str, request: dict) -> None:
        await asyncio.to_thread(admin.Deny, pb.DenyRequest(approval_id=approval_id, note="no"), timeout=10)

    async with broker.agent(PLANNER) as agent, agent.task("T-1", on_approval=on_approval) as task:
        with pytest.raises(ApprovalDenied):
            await task.credential(audience="spiffe://example.org/service/deployer", actions=["deploy:prod"],
                                  resource="service:app")


async def test_unanswered_approval_times_out(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as agent, agent.task("T-1", approval_timeout=0.3) as task:
        with pytest.raises(ApprovalTimeout):
            await task.credential(audience="spiffe://example.org/service/deployer", actions=["deploy:prod"],
                                  resource="service:app")


async def test_sub_agent_delegation_narrows_and_keeps_the_subject(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, planner.task("T-1") as task:
        parent = await task.credential(audience=REPO, actions=["repo:read", "repo:write"], resource=APP)
        async with broker.agent(WORKER) as worker:
            async with worker.task("T-1") as sub:
                child = await sub.credential(actions=["repo:read"], subject_token=parent.token)
                with pytest.raises(PolicyDenied):
                    await sub.credential(actions=["repo:write"], subject_token=parent.token)
            assert sub.completed is None  # a sub-agent does not complete its parent's task
            async with broker.agent(REPO) as repo:
                info = await repo.introspect(child.token)
        assert child.delegated and child.scope == ("repo:read",)
        assert info.active and info.subject == PLANNER and list(info.actor_chain) == [WORKER]
        assert child.expires_at <= parent.expires_at


async def test_policy_refusal_is_policy_denied(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as agent, agent.task("T-1") as task:
        with pytest.raises(PolicyDenied) as refused:
            await task.credential(audience=REPO, actions=["repo:admin"], resource=APP)
    assert refused.value.code == "PERMISSION_DENIED"
    assert not isinstance(refused.value, grpc.RpcError)


async def test_bearer_identity_on_the_token_listener(broker: InProcessBroker) -> None:
    token = broker.issuer.jwt_svid(PLANNER, broker.spiffe_id)
    identity = BearerIdentity(lambda: token, broker.roots_pem)
    async with AgentClient(broker.token_address, identity) as agent, agent.task("T-1") as task:
        cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
    assert cred.scope == ("repo:read",)


async def test_a_bad_bearer_token_is_unauthenticated(broker: InProcessBroker) -> None:
    forged = broker.issuer.jwt_svid(PLANNER, "spiffe://example.org/someone-else")
    async with AgentClient(broker.token_address, BearerIdentity(lambda: forged, broker.roots_pem)) as agent:
        with pytest.raises(Unauthenticated):
            await agent.task("T-1", complete_on_exit=False).credential(audience=REPO, actions=["repo:read"],
                                                                       resource=APP)


async def test_file_identity_follows_rewritten_files(broker: InProcessBroker, tmp_path: Path) -> None:
    cert, key = broker.svid(PLANNER).write(tmp_path, "agent")
    (tmp_path / "bundle.pem").write_bytes(broker.roots_pem)
    identity = FileIdentity(cert, key, tmp_path / "bundle.pem")
    async with AgentClient(broker.mtls_address, identity) as agent:
        first = await agent.exchange(task_id="T-1", audience=REPO, actions=["repo:read"], resource=APP)
        broker.svid(WORKER).write(tmp_path, "agent")
        second = await agent.exchange(task_id="T-2", audience=REPO, actions=["repo:read"], resource=APP)
        async with broker.agent(REPO) as repo:
            assert (await repo.introspect(first.access_token)).subject == PLANNER
            assert (await repo.introspect(second.access_token)).subject == WORKER


def test_sync_client_has_the_same_shape(broker: InProcessBroker) -> None:
    with SyncAgentClient(broker.mtls_address, broker.identity(PLANNER)) as agent, \
            SyncAgentClient(broker.mtls_address, broker.identity(REPO)) as repo:
        with agent.task("T-1") as task:
            cred = task.credential(audience=REPO, actions=["repo:read"], resource=APP)
            assert repo.introspect(cred.token).active
        assert task.completed == 1
        assert not repo.introspect(cred.token).active


class _Unreachable(pb_grpc.CredentialBrokerServicer):
    """A broker that answers every call UNAVAILABLE, and counts them."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def _refuse(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")

    async def Exchange(self, request, context):
        await self._refuse("Exchange", context)

    async def Renew(self, request, context):
        await self._refuse("Renew", context)


async def test_only_calls_safe_to_repeat_are_retried(broker: InProcessBroker) -> None:
    fake = _Unreachable()
    server = grpc.aio.server()
    pb_grpc.add_CredentialBrokerServicer_to_server(fake, server)
    creds = grpc.ssl_server_credentials([((broker.folder / "broker-key.pem").read_bytes(),
                                          (broker.folder / "broker.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        async with AgentClient(f"127.0.0.1:{port}", broker.identity(PLANNER), retries=2, backoff=0.01) as agent:
            with pytest.raises(Unavailable):
                await agent.exchange(task_id="T-1", audience=REPO, actions=["repo:read"], resource=APP)
            with pytest.raises(Unavailable):
                await agent.renew("lse_x")
    finally:
        await server.stop(0)
    assert fake.calls == {"Exchange": 1, "Renew": 3}
