"""The verifier SDK against a live broker: claims, scope, binding, revocation, strict mode."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from broker.client import AgentClient
from broker.testing.broker import InProcessBroker
from broker.testing.clock import FakeClock
from broker.verifier import InsufficientScope, TokenRejected, TokenVerifier, current_token
from broker.verifier.asgi import TokenMiddleware
from broker.verifier.interceptor import TokenInterceptor
from broker.verifier.keys import KeyCache
from tests.sdk.conftest import APP, PLANNER, REPO, WORKER

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def verifier(broker: InProcessBroker, repo: AgentClient, **kw) -> TokenVerifier:
    kw.setdefault("clock", broker.clock)
    return TokenVerifier(issuer=broker.spiffe_id, audience=REPO, broker=repo, **kw)


async def test_a_good_token_yields_its_facts(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, broker.agent(WORKER) as worker, broker.agent(REPO) as repo, \
            verifier(broker, repo) as v, planner.task("T-1") as task:
        assert await v.wait_ready()
        parent = await task.credential(audience=REPO, actions=["repo:read", "repo:write"], resource=APP)
        child = await worker.task("T-1").credential(actions=["repo:read"], subject_token=parent.token)
        facts = await v.verify(child.token, actions=["repo:read"], resource=APP,
                               peer_cert=broker.svid(WORKER).cert_pem())
    assert facts.subject == PLANNER and facts.client_id == WORKER
    assert facts.scope == ("repo:read",) and facts.task_id == "T-1" and facts.lease_id == child.lease_id
    assert facts.actor_chain == (WORKER,) and facts.expires_at == child.expires_at and facts.bound


async def test_a_revoked_token_is_refused_before_exp(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, broker.agent(REPO) as repo, verifier(broker, repo) as v:
        assert await v.wait_ready()
        async with planner.task("T-1") as task:
            cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
            peer = broker.svid(PLANNER).cert_pem()
            await v.verify(cred.token, actions=["repo:read"], peer_cert=peer)
        assert await v.follower.wait_for(lambda: cred.lease_id in v.follower.revoked, timeout=10)
        with pytest.raises(TokenRejected, match="token revoked"):
            await v.verify(cred.token, actions=["repo:read"], peer_cert=peer)
    assert cred.expires_at > broker.app.clock.now()


async def test_introspect_mode_refuses_a_revoked_token(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, broker.agent(REPO) as repo, \
            verifier(broker, repo, revocations="introspect") as v:
        async with planner.task("T-1") as task:
            cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
            peer = broker.svid(PLANNER).cert_pem()
            assert (await v.verify(cred.token, peer_cert=peer)).lease_id == cred.lease_id
        with pytest.raises(TokenRejected, match="revoked"):
            await v.verify(cred.token, peer_cert=peer)


async def test_a_revocation_before_the_verifier_started_is_not_missed(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, broker.agent(REPO) as repo:
        async with planner.task("T-1") as task:
            cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
        async with verifier(broker, repo) as v:  # its stream starts after the revocation happened
            assert await v.wait_ready()
            with pytest.raises(TokenRejected, match="revoked"):
                await v.verify(cred.token, peer_cert=broker.svid(PLANNER).cert_pem())


async def test_strict_mode_fails_closed_while_the_broker_is_away(clocked: InProcessBroker) -> None:
    clock: FakeClock = clocked.clock
    async with clocked.agent(PLANNER) as planner, clocked.agent(REPO) as repo, \
            verifier(clocked, repo, max_staleness=5, jwks_min_interval=1) as v:
        assert await v.wait_ready()
        peer = clocked.svid(PLANNER).cert_pem()
        before = await planner.task("T-1", complete_on_exit=False).credential(
            audience=REPO, actions=["repo:read"], resource=APP)
        await v.verify(before.token, peer_cert=peer)
        ended = await planner.task("T-0").credential(audience=REPO, actions=["repo:read"], resource=APP)
        await planner.complete_task("T-0")  # an event, so the follower holds a cursor of this broker run
        assert await v.follower.wait_for(lambda: ended.lease_id in v.follower.revoked, timeout=10)
        clocked.stop()
        assert await v.follower.wait_for(lambda: not v.follower.connected, timeout=10)
        clock.advance(6)
        with pytest.raises(TokenRejected, match="stale"):
            await v.verify(before.token, peer_cert=peer)
        clocked.start()
        assert await v.wait_ready(timeout=20)
        after = await planner.task("T-2").credential(audience=REPO, actions=["repo:read"], resource=APP)
        assert (await v.verify(after.token, peer_cert=peer)).lease_id == after.lease_id


async def test_a_bound_token_needs_its_own_certificate(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, broker.agent(REPO) as repo, \
            verifier(broker, repo, revocations="none") as v, planner.task("T-1") as task:
        cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
        with pytest.raises(TokenRejected, match="cnf mismatch"):
            await v.verify(cred.token, peer_cert=broker.svid(WORKER).cert_pem())
        with pytest.raises(TokenRejected, match="bound"):
            await v.verify(cred.token)
        assert (await v.verify(cred.token, peer_cert=broker.svid(PLANNER).cert)).bound


async def test_scope_resource_audience_and_expiry_are_checked(clocked: InProcessBroker) -> None:
    async with clocked.agent(PLANNER) as planner, clocked.agent(REPO) as repo, planner.task("T-1") as task:
        cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP, ttl=60)
        peer = clocked.svid(PLANNER).cert_pem()
        v = verifier(clocked, repo, revocations="none")
        with pytest.raises(InsufficientScope) as short:
            await v.verify(cred.token, actions=["repo:write"], peer_cert=peer)
        assert short.value.required == ("repo:write",)
        with pytest.raises(TokenRejected, match="resource mismatch"):
            await v.verify(cred.token, resource="repo:org/other", peer_cert=peer)
        other = TokenVerifier(issuer=clocked.spiffe_id, audience="spiffe://example.org/service/other", broker=repo,
                              revocations="none", clock=clocked.clock)
        with pytest.raises(TokenRejected, match="audience"):
            await other.verify(cred.token, peer_cert=peer)
        with pytest.raises(TokenRejected, match="issuer"):
            await TokenVerifier(issuer="spiffe://example.org/impostor", audience=REPO, broker=repo,
                                revocations="none", clock=clocked.clock).verify(cred.token, peer_cert=peer)
        with pytest.raises(TokenRejected, match="typ"):
            await v.verify(clocked.issuer.jwt_svid(PLANNER, REPO), peer_cert=peer)
        clocked.clock.advance(120)
        with pytest.raises(TokenRejected, match="expired"):
            await v.verify(cred.token, peer_cert=peer)


async def test_verifier_fetches_keys_from_a_jwks_url(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, planner.task("T-1") as task:
        cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
        v = TokenVerifier(issuer=broker.spiffe_id, audience=REPO, jwks_url=broker.jwks_url, revocations="none")
        facts = await v.verify(cred.token, peer_cert=broker.svid(PLANNER).cert_pem())
    assert facts.subject == PLANNER


async def test_unknown_kids_refetch_the_keys_at_most_once_per_interval() -> None:
    clock = FakeClock()
    fetches: list[float] = []

    async def fetch() -> str:
        fetches.append(clock.now())
        return json.dumps({"keys": []})

    cache = KeyCache(fetch, clock, min_interval=30)
    for _ in range(5):
        await cache.keys_for("forged-kid")
    clock.advance(31)
    await cache.keys_for("forged-kid")
    assert len(fetches) == 2


# --- the gRPC interceptor and the ASGI middleware ----------------------------------------------

CHECK = "/grpc.health.v1.Health/Check"


async def test_grpc_interceptor_guards_each_method(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, broker.agent(REPO) as repo, planner.task("T-1") as task:
        reader = (await task.credential(audience=REPO, actions=["repo:read"], resource=APP)).token
        writer = (await task.credential(audience=REPO, actions=["repo:write"], resource=APP)).token
        v = verifier(broker, repo, revocations="none")
        server = grpc.aio.server(interceptors=[TokenInterceptor(v, actions={CHECK: ["repo:read"]})])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        svid = broker.issuer.ca("example.org").server_svid(REPO)
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(svid.key_pem(), svid.chain_pem())], root_certificates=broker.roots_pem, require_client_auth=True))
        await server.start()
        me = broker.svid(PLANNER)
        creds = grpc.ssl_channel_credentials(broker.roots_pem, me.key_pem(), me.chain_pem())
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                request = health_pb2.HealthCheckRequest()
                ok = await stub.Check(request, metadata=(("authorization", f"Bearer {reader}"),), timeout=10)
                assert ok.status == health_pb2.HealthCheckResponse.SERVING
                codes = []
                for metadata in ((), (("authorization", f"Bearer {writer}"),), (("authorization", "Bearer x.y.z"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.Check(request, metadata=metadata, timeout=10)
                    codes.append(refused.value.code())
                watch = stub.Watch(request, metadata=(("authorization", f"Bearer {reader}"),), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as unmapped:
                    await watch.read()
        finally:
            await server.stop(0)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.UNAUTHENTICATED]
    assert unmapped.value.code() == grpc.StatusCode.PERMISSION_DENIED  # a method nobody mapped is closed


async def _asgi(app, headers: list[tuple[bytes, bytes]], extensions: dict | None = None) -> tuple[int, dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/files", "headers": headers, "extensions": extensions or {}}
    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0].get("headers", []))


async def test_asgi_middleware_answers_with_rfc6750_challenges(broker: InProcessBroker) -> None:
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(current_token())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async with broker.agent(PLANNER) as planner, broker.agent(REPO) as repo, planner.task("T-1") as task:
        token = (await task.credential(audience=REPO, actions=["repo:read"], resource=APP)).token
        v = verifier(broker, repo, revocations="none")
        guarded = TokenMiddleware(app, v, actions=["repo:read"], resource_metadata="http://rs/.well-known/x")
        scoped = TokenMiddleware(app, v, actions=["repo:write"])
        authorization = [(b"authorization", f"Bearer {token}".encode())]
        tls = {"tls": {"client_cert_chain": [broker.svid(PLANNER).cert_pem().decode()]}}
        missing = await _asgi(guarded, [])
        ok = await _asgi(guarded, authorization, tls)
        short = await _asgi(scoped, authorization, tls)
        unbound = await _asgi(guarded, authorization)
    assert missing[0] == 401 and b'resource_metadata="http://rs/.well-known/x"' in missing[1][b"www-authenticate"]
    assert ok[0] == 200 and len(seen) == 1 and seen[0].subject == PLANNER
    assert short[0] == 403
    assert short[1][b"www-authenticate"].startswith(b'Bearer error="insufficient_scope"')
    assert b'scope="repo:write"' in short[1][b"www-authenticate"]
    assert unbound[0] == 401 and b'error="invalid_token"' in unbound[1][b"www-authenticate"]


async def test_a_reconnecting_follower_resumes_after_its_last_event(broker: InProcessBroker) -> None:
    async with broker.agent(PLANNER) as planner, broker.agent(REPO) as repo, verifier(broker, repo) as v:
        assert await v.wait_ready()
        first = await planner.task("T-1").credential(audience=REPO, actions=["repo:read"], resource=APP)
        second = await planner.task("T-2").credential(audience=REPO, actions=["repo:read"], resource=APP)
        await planner.complete_task("T-1")
        follower = v.follower
        assert await follower.wait_for(lambda: first.lease_id in follower.revoked, timeout=10)
        await follower.close()  # the stream is gone; meanwhile the second lease dies
        await planner.complete_task("T-2")
        follower.start()
        # Replayed after the cursor: an event that happened while no stream was open.
        assert await follower.wait_for(lambda: second.lease_id in follower.revoked, timeout=10)


async def test_without_strict_a_stale_view_still_verifies(clocked: InProcessBroker) -> None:
    async with clocked.agent(PLANNER) as planner, clocked.agent(REPO) as repo, \
            verifier(clocked, repo, strict=False, max_staleness=5) as v:
        assert await v.wait_ready()
        cred = await planner.task("T-1", complete_on_exit=False).credential(
            audience=REPO, actions=["repo:read"], resource=APP)
        peer = clocked.svid(PLANNER).cert_pem()
        await v.verify(cred.token, peer_cert=peer)  # the broker's keys are now cached
        clocked.stop()
        assert await v.follower.wait_for(lambda: not v.follower.connected, timeout=10)
        clocked.clock.advance(6)
        facts = await v.verify(cred.token, peer_cert=peer)
    assert facts.lease_id == cred.lease_id


async def test_a_verifier_on_a_broker_channel_built_elsewhere(broker: InProcessBroker) -> None:
    svid = broker.svid(REPO)
    creds = grpc.ssl_channel_credentials(broker.roots_pem, svid.key_pem(), svid.chain_pem())
    async with grpc.aio.secure_channel(broker.mtls_address, creds) as channel, broker.agent(PLANNER) as planner:
        v = TokenVerifier(issuer=broker.spiffe_id, audience=REPO, broker=channel, revocations="introspect")
        async with planner.task("T-1") as task:
            cred = await task.credential(audience=REPO, actions=["repo:read"], resource=APP)
            peer = broker.svid(PLANNER).cert_pem()
            assert (await v.verify(cred.token, peer_cert=peer)).subject == PLANNER
        with pytest.raises(TokenRejected, match="revoked"):
            await v.verify(cred.token, peer_cert=peer)
