"""Faults found by testing the broker as an attacker and as a foreign client (issue 11)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import REGISTRY

from broker._proto import broker_pb2 as pb
from tests.support.faults import FullDisk
from tests.support.harness import BROKER_ID, PLANNER, RESOURCE_SERVER_ID, Harness, bearer, run_harness

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


# ---- item 5: a request that is no protobuf is INVALID_ARGUMENT, on every RPC of both listeners ------------------

GARBAGE = b"\xff\xff\xff\xff\x0f"   # a field tag whose varint never ends: no message parses from it


@dataclass(frozen=True)
class Method:
    path: str
    kind: str   # "unary", "stream" (server streaming) or "bidi"


METHODS = [
    Method("/broker.v1.CredentialBroker/Exchange", "unary"),
    Method("/broker.v1.CredentialBroker/Introspect", "unary"),
    Method("/broker.v1.CredentialBroker/AwaitApproval", "unary"),
    Method("/broker.v1.CredentialBroker/WatchRevocations", "stream"),
    Method("/broker.v1.BrokerAdmin/Revoke", "unary"),
    Method("/grpc.health.v1.Health/Check", "unary"),
    Method("/grpc.health.v1.Health/Watch", "stream"),
    Method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi"),
]


def _send_garbage(channel: grpc.Channel, method: Method) -> grpc.RpcError:
    # No serializers: the bytes go on the wire as they are.
    if method.kind == "unary":
        return refused(lambda: channel.unary_unary(method.path)(GARBAGE, timeout=5))
    if method.kind == "stream":
        return refused(lambda: list(channel.unary_stream(method.path)(GARBAGE, timeout=5)))
    return refused(lambda: list(channel.stream_stream(method.path)(iter([GARBAGE]), timeout=5)))


def _malformed_count(method: str) -> float:
    return REGISTRY.get_sample_value("broker_rpc_malformed_total", {"method": method}) or 0.0


@pytest.mark.parametrize("listener", ["mtls", "token"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.path.rsplit("/", 1)[1])
def test_garbage_bytes_are_invalid_argument(harness: Harness, listener: str, method: Method) -> None:
    channel = harness.mtls_channel(PLANNER) if listener == "mtls" else harness.token_channel()
    before = _malformed_count(method.path)
    err = _send_garbage(channel, method)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
    assert _malformed_count(method.path) == before + 1


def test_a_flood_of_garbage_leaves_one_log_line(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    channel, token_channel = harness.mtls_channel(PLANNER), harness.token_channel()
    _send_garbage(channel, METHODS[0])   # the connection is up before the log is watched
    caplog.clear()
    caplog.set_level(logging.INFO)
    for i in range(200):
        err = _send_garbage(channel if i % 2 else token_channel, METHODS[i % 2])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    text = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1
    assert "Traceback" not in caplog.text and "DecodeError" not in text and len(caplog.text) < 2000


def test_a_well_formed_request_after_garbage_still_works(harness: Harness) -> None:
    channel = harness.mtls_channel(PLANNER)
    _send_garbage(channel, METHODS[0])
    assert _exchange(harness, "after-garbage").state == "ISSUED"


# ---- item 8: overload is RESOURCE_EXHAUSTED with a reason, counted ------------------------------------------


@pytest.fixture
def small_limit(material, tmp_path) -> Iterator[Harness]:
    yield from run_harness(material, tmp_path, extra="[limits]\nmax_concurrent_rpcs = 4\n")


def _overloaded() -> float:
    return REGISTRY.get_sample_value("broker_rpc_overloaded_total", {"method": "Exchange"}) or 0.0


def test_calls_over_the_concurrency_limit_are_resource_exhausted(small_limit: Harness) -> None:
    oidc = small_limit.issuer.oidc()
    token = oidc.id_token("alice", BROKER_ID, claims={"email": "alice@example.org"})
    agent = small_limit.token_agent()
    before = _overloaded()
    done = threading.Semaphore(0)
    oidc.hold()   # the issuer's keys do not arrive: every admitted exchange waits on the one fetch
    try:
        calls = [
            agent.Exchange.future(
                pb.ExchangeRequest(task_id=f"t{i}", audience=RESOURCE_SERVER_ID, actions=["repo:read"], resource=REPO),
                timeout=20, metadata=bearer(token),
            )
            for i in range(40)
        ]
        for call in calls:
            call.add_done_callback(lambda _: done.release())
        # Four calls hold every slot until the keys come; the other 36 are answered meanwhile.
        assert all(done.acquire(timeout=20) for _ in range(36))
    finally:
        oidc.release()
    codes = [c.exception(timeout=20).code() if c.exception(timeout=20) else grpc.StatusCode.OK for c in calls]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 30
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) >= 4
    exhausted = [c.exception() for c in calls if c.exception() is not None]
    assert all("overloaded" in e.details() for e in exhausted)
    assert _overloaded() - before == len(exhausted)



# ---- item 10: audit.on_failure = "refuse": no issuance that cannot be recorded -----------------------------


@pytest.fixture
def full_disk(material, tmp_path) -> Iterator[Harness]:
    # /dev/full accepts the open and fails every write with ENOSPC: a full disk, for real.
    yield from run_harness(material, tmp_path, audit_path="/dev/full")


def test_exchange_while_the_audit_disk_is_full_is_unavailable(full_disk: Harness) -> None:
    err = refused(lambda: _exchange(full_disk, "full"))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "audit unavailable")
    assert list(full_disk.operator().ListLeases(pb.ListLeasesRequest(include_inactive=True), timeout=5).leases) == []


def test_revoke_proceeds_while_audit_fails(harness: Harness) -> None:
    lease_id = _exchange(harness, "rv").lease_id
    _break_audit(harness)
    out = harness.operator().Revoke(pb.RevokeRequest(lease_id=lease_id, reason="incident"), timeout=5)
    assert out.revoked_count == 1
    assert harness.operator().GetLease(pb.GetLeaseRequest(lease_id=lease_id), timeout=5).state == "REVOKED"


def test_approve_while_audit_fails_is_unavailable_and_leaves_it_pending(harness: Harness) -> None:
    pending = harness.agent(PLANNER).Exchange(
        pb.ExchangeRequest(task_id="dep", audience="service:app", actions=["deploy:prod"], resource="service:app"),
        timeout=5,
    )
    assert pending.state == "PENDING_APPROVAL"
    _break_audit(harness)
    err = refused(lambda: harness.operator().Approve(pb.ApproveRequest(approval_id=pending.approval_id), timeout=5))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "audit unavailable")
    listed = harness.operator().ListApprovals(pb.ListApprovalsRequest(), timeout=5).approvals
    assert [a.approval_id for a in listed] == [pending.approval_id]


def test_issuance_recovers_once_audit_writes_succeed(harness: Harness) -> None:
    sink = _break_audit(harness)
    assert refused(lambda: _exchange(harness, "rec")).code() == grpc.StatusCode.UNAVAILABLE
    sink.full = False
    assert _exchange(harness, "rec").state == "ISSUED"
    assert '"kind":"token.issued"' in sink.buffer.getvalue()


def _break_audit(harness: Harness) -> FullDisk:
    sink = FullDisk(full=True)
    harness.broker.sync(setattr, harness.broker.app.audit, "_sink", sink)   # the OS edge: the file under the log
    return sink


def test_calls_waiting_for_an_approval_hold_no_slot(small_limit: Harness) -> None:
    agent = small_limit.agent(PLANNER)
    deploy = pb.ExchangeRequest(task_id="dep", audience="service:app", actions=["deploy:prod"], resource="service:app")
    ids = [agent.Exchange(deploy, timeout=5).approval_id for _ in range(5)]
    waiting = [agent.AwaitApproval.future(pb.AwaitApprovalRequest(approval_id=i), timeout=30) for i in ids]
    exchange = small_limit.broker.app.exchange
    small_limit.broker.until(lambda: all(exchange.waiting(i) == 1 for i in ids))
    try:
        assert _exchange(small_limit, "meanwhile").state == "ISSUED"   # five waiters, a limit of four
    finally:
        for call in waiting:
            call.cancel()
