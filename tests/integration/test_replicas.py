"""Several brokers on one PostgreSQL act as one: each point is checked across two or three replicas."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jwt
import pytest

from broker._proto import broker_pb2 as pb
from broker.testing.clock import FakeClock
from tests.support.harness import (
    PLANNER,
    RESOURCE_SERVER_ID,
    WORKER,
    Harness,
    Material,
    RunningBroker,
    postgres_store,
    write_config,
)

REPO = "repo:org/app"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


def request(task_id: str = "task-1", actions=("repo:read",), **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=task_id, audience=RESOURCE_SERVER_ID, actions=list(actions), resource=REPO, **kw)


def _start(material: Material, tmp_path: Path, pg_dsn: str, names: str, extra: str = "") -> list[Harness]:
    clock = FakeClock()
    started: list[Harness] = []
    try:
        for name in names:
            folder = tmp_path / name
            folder.mkdir()
            config = write_config(material, folder, extra=postgres_store(pg_dsn, name) + extra)
            started.append(Harness(broker=RunningBroker(config, clock), material=material))
    except BaseException:
        _stop(started)
        raise
    return started


def _stop(started: list[Harness]) -> None:
    for harness in started:
        harness.close()
        harness.broker.stop()


@pytest.fixture
def replicas(material: Material, tmp_path: Path, pg_dsn: str) -> Iterator[list[Harness]]:
    started = _start(material, tmp_path, pg_dsn, "abc")
    yield started
    _stop(started)


def active(harness: Harness, token: str) -> bool:
    return harness.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token=token), timeout=5).active


def test_a_token_minted_by_one_replica_verifies_and_introspects_on_every_replica(replicas: list[Harness]) -> None:
    a, b, c = replicas
    resp = a.agent(PLANNER).Exchange(request(), timeout=5)
    assert all(active(h, resp.access_token) for h in replicas)
    for h in (b, c):
        jwks = json.loads(h.agent(RESOURCE_SERVER_ID).GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json)
        kid = jwt.get_unverified_header(resp.access_token)["kid"]
        key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
        claims = jwt.decode(resp.access_token, key, algorithms=["ES256"], audience=RESOURCE_SERVER_ID)
        assert claims["jti"] == resp.lease_id


def test_a_revocation_that_returned_on_one_replica_is_seen_on_every_other_at_once(replicas: list[Harness]) -> None:
    a, b, c = replicas
    parent = a.agent(PLANNER).Exchange(request(actions=("repo:read", "repo:write")), timeout=5)
    assert b.operator().Revoke(pb.RevokeRequest(lease_id=parent.lease_id), timeout=5).revoked_count == 1
    # No wait of any kind: the very next call on another replica must know.
    assert not active(c, parent.access_token) and not active(a, parent.access_token)
    with pytest.raises(grpc.RpcError) as renew:
        a.agent(PLANNER).Renew(pb.RenewRequest(lease_id=parent.lease_id), timeout=5)
    assert renew.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as delegate:
        c.agent(WORKER).Exchange(
            pb.ExchangeRequest(actions=["repo:read"], subject_token=parent.access_token, subject_token_type=ACCESS),
            timeout=5,
        )
    assert delegate.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_complete_task_on_one_replica_ends_the_task_everywhere(replicas: list[Harness]) -> None:
    a, b, _ = replicas
    resp = a.agent(PLANNER).Exchange(request(task_id="done"), timeout=5)
    assert b.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="done"), timeout=5).revoked_count == 1
    assert not active(a, resp.access_token)
    with pytest.raises(grpc.RpcError) as err:
        a.agent(PLANNER).Exchange(request(task_id="done"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


class _Watch:
    def __init__(self, harness: Harness, **kw) -> None:
        self.call = harness.agent(RESOURCE_SERVER_ID).WatchRevocations(pb.WatchRevocationsRequest(**kw), timeout=30)
        self.call.initial_metadata()
        self.events: list[pb.RevocationEvent] = []
        self.got = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                with self.got:
                    self.events.append(event)
                    self.got.notify_all()
        except grpc.RpcError:
            pass

    def wait(self, n: int, timeout: float = 10.0) -> list[pb.RevocationEvent]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.events) >= n, timeout), f"got {len(self.events)} of {n}"
            return list(self.events)

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(5)


def test_every_watcher_on_every_replica_gets_every_end_once_with_the_same_cursor(replicas: list[Harness]) -> None:
    a, b, c = replicas
    watches = [_Watch(h) for h in replicas]
    try:
        ids = [a.agent(PLANNER).Exchange(request(task_id=f"w{i}"), timeout=5).lease_id for i in range(3)]
        b.operator().Revoke(pb.RevokeRequest(lease_id=ids[0]), timeout=5)
        c.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="w1"), timeout=5)
        a.operator().Revoke(pb.RevokeRequest(task_id="w2"), timeout=5)
        seen = [[(e.lease_id, e.reason, e.cursor) for e in w.wait(3)] for w in watches]
        assert seen[0] == seen[1] == seen[2]
        assert [s[0] for s in seen[0]] == ids
        # A watcher may resume on any replica with a cursor another one handed out.
        resumed = _Watch(c, resume_after=seen[0][0][2])
        assert [e.lease_id for e in resumed.wait(2)] == ids[1:]
        resumed.close()
    finally:
        for w in watches:
            w.close()


def test_two_replicas_racing_to_open_one_task_give_exactly_one_owner(replicas: list[Harness]) -> None:
    a, b, _ = replicas
    planner, worker = a.agent(PLANNER), b.agent(WORKER)

    def claim(stub, task_id):
        try:
            return stub.Exchange(request(task_id=task_id), timeout=10).state
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(4) as pool:
        for i in range(8):
            answers = list(pool.map(claim, (planner, worker), (f"race-{i}",) * 2))
            assert sorted(map(str, answers)) == sorted(["ISSUED", str(grpc.StatusCode.PERMISSION_DENIED)])


def test_expiry_happens_once_and_is_audited_once_whatever_replicas_run(replicas: list[Harness]) -> None:
    a, b, _ = replicas
    resp = a.agent(PLANNER).Exchange(request(task_id="exp", ttl_seconds=60), timeout=5)
    watch = _Watch(b)
    try:
        a.clock.advance(61)  # one clock for all three: every reaper is due at once
        [event] = watch.wait(1)
        assert (event.lease_id, event.reason) == (resp.lease_id, "EXPIRED")
    finally:
        watch.close()
    for h in replicas:
        h.broker.settle()
    records = []
    for h in replicas:
        path = Path(h.broker.config_path).parent / "audit.jsonl"
        records += [json.loads(line) for line in path.read_text().splitlines()]
    expired = [r for r in records if r["kind"] == "lease.expired" and r["lease_id"] == resp.lease_id]
    assert len(expired) == 1


def test_revoke_all_on_one_replica_rotates_every_replicas_key(replicas: list[Harness]) -> None:
    a, b, c = replicas
    old = set()
    for h in replicas:
        jwks = json.loads(h.agent(RESOURCE_SERVER_ID).GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json)
        old |= {k["kid"] for k in jwks["keys"]}
    tokens = [h.agent(PLANNER).Exchange(request(task_id=f"all-{i}")).access_token for i, h in enumerate(replicas)]
    b.operator().Revoke(pb.RevokeRequest(all=True), timeout=5)
    assert not any(active(h, t) for h in replicas for t in tokens)
    fresh = c.agent(PLANNER).Exchange(request(task_id="after"), timeout=5)
    assert jwt.get_unverified_header(fresh.access_token)["kid"] not in old
    assert active(a, fresh.access_token)


def test_postgres_down_fails_closed_with_unavailable_and_health_not_serving(material: Material, tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from broker.testing.postgres import PostgresServer

    with PostgresServer() as server:
        dsn = server.create_database("down")
        harness = Harness(
            broker=RunningBroker(write_config(material, tmp_path, extra=postgres_store(dsn, "solo")), FakeClock()),
            material=material,
        )
        try:
            agent = harness.agent(PLANNER)
            health = health_pb2_grpc.HealthStub(harness.mtls_channel(PLANNER))
            resp = agent.Exchange(request(task_id="before"), timeout=5)
            server.stop("fast")
            for call in (
                lambda: agent.Exchange(request(task_id="during"), timeout=10),
                lambda: harness.agent(RESOURCE_SERVER_ID).Introspect(
                    pb.IntrospectRequest(token=resp.access_token), timeout=10
                ),
                lambda: agent.Renew(pb.RenewRequest(lease_id=resp.lease_id), timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert err.value.details() == "lease store unavailable: try again"
            serving = health_pb2.HealthCheckResponse.SERVING
            status = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # noqa: E731
            harness.broker.wait_until(lambda: status() != serving)
            server.start()
            harness.broker.wait_until(lambda: status() == serving, timeout=30)
            assert active(harness, resp.access_token)
            assert agent.Exchange(request(task_id="after"), timeout=10).state == "ISSUED"
            tasks = {lease.task_id for lease in harness.operator().ListLeases(pb.ListLeasesRequest(), timeout=5).leases}
            assert tasks == {"before", "after"}  # the refused call changed nothing
        finally:
            harness.close()
            harness.broker.stop()


def test_a_policy_reload_through_one_replica_reloads_every_replica_and_says_which(replicas: list[Harness]) -> None:
    a, b, c = replicas
    forbid = '\n@id("no-writes")\nforbid (principal, action == Action::"repo:write", resource);\n'
    for h in (b, c):
        policy = Path(h.broker.config_path).parent / "policy.cedar"
        policy.write_text(policy.read_text() + forbid)
    (Path(c.broker.config_path).parent / "policy.cedar").write_text("permit (principal, action resource);")
    answer = a.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=15)
    by_id = {r.replica_id: r for r in answer.replicas}
    assert set(by_id) == {"b", "c"}
    assert by_id["b"].reloaded and by_id["b"].policy_version and not by_id["b"].error
    assert not by_id["c"].reloaded and "does not parse" in by_id["c"].error
    with pytest.raises(grpc.RpcError) as err:
        b.agent(PLANNER).Exchange(request(task_id="w", actions=("repo:write",)), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert c.agent(PLANNER).Exchange(request(task_id="w2", actions=("repo:write",)), timeout=5).state == "ISSUED"


DEPLOY = "deploy:prod"


def _ask_approval(harness: Harness, task_id: str) -> str:
    resp = harness.agent(PLANNER).Exchange(
        pb.ExchangeRequest(task_id=task_id, audience=RESOURCE_SERVER_ID, actions=[DEPLOY], resource="service:app"),
        timeout=5,
    )
    assert resp.state == "PENDING_APPROVAL"
    return resp.approval_id


def _await(harness: Harness, approval_id: str):
    try:
        return harness.agent(PLANNER).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id), timeout=20)
    except grpc.RpcError as e:
        return e.code()


def _audit(harness: Harness) -> list[dict]:
    path = Path(harness.broker.config_path).parent / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_approval_asked_on_one_replica_is_decided_on_another_and_wakes_a_waiter_on_a_third(
    replicas: list[Harness],
) -> None:
    a, b, c = replicas
    approval_id = _ask_approval(a, "ship")
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(_await, c, approval_id)
        c.broker.until(lambda: c.broker.app.exchange.waiting(approval_id) == 1)
        # Listed through another replica at once, with what it binds.
        [listed] = b.operator().ListApprovals(pb.ListApprovalsRequest(), timeout=5).approvals
        assert (listed.approval_id, listed.state, listed.task_id, list(listed.actions)) == (
            approval_id, "PENDING", "ship", [DEPLOY]
        )
        decided = b.operator().Approve(pb.ApproveRequest(approval_id=approval_id, note="CHG-7"), timeout=5)
        assert decided.state == "APPROVED"
        issued = waiter.result(timeout=20)
    assert issued.state == "ISSUED" and active(a, issued.access_token)
    # Used once in all: no replica issues it again.
    for h in replicas:
        assert _await(h, approval_id) == grpc.StatusCode.FAILED_PRECONDITION
    states = {h.broker.config_path: [x.state for x in h.operator().ListApprovals(
        pb.ListApprovalsRequest(include_decided=True), timeout=5).approvals] for h in replicas}
    assert list(states.values()) == [["USED"]] * 3
    # Each step audited once, by the replica that took it.
    for h in replicas:
        h.broker.settle()
    kinds = {name: [r["kind"] for r in _audit(h) if r.get("approval_id") == approval_id]
             for name, h in zip("abc", replicas, strict=True)}
    assert kinds["a"] == ["approval.requested"]
    assert kinds["b"] == ["approval.approved"]
    assert [k for k in kinds["c"] if k.startswith("approval.")] == ["approval.used"]
    approved = next(r for r in _audit(b) if r["kind"] == "approval.approved")
    assert approved["note"] == "CHG-7"


def test_waiters_on_two_replicas_racing_for_one_approval_get_one_credential(replicas: list[Harness]) -> None:
    a, b, c = replicas
    for i in range(4):
        approval_id = _ask_approval(a, f"race-approval-{i}")
        with ThreadPoolExecutor(2) as pool:
            waiters = [pool.submit(_await, h, approval_id) for h in (b, c)]
            for h in (b, c):
                h.broker.until(lambda h=h, i=approval_id: h.broker.app.exchange.waiting(i) == 1)
            a.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5)
            answers = [w.result(timeout=20) for w in waiters]
        issued = [x for x in answers if not isinstance(x, grpc.StatusCode)]
        assert len(issued) == 1 and issued[0].state == "ISSUED", answers
        assert [x for x in answers if isinstance(x, grpc.StatusCode)] == [grpc.StatusCode.FAILED_PRECONDITION]
        leases = a.operator().ListLeases(pb.ListLeasesRequest(task_id=f"race-approval-{i}"), timeout=5).leases
        assert len(leases) == 1


def test_a_denial_on_one_replica_answers_a_waiter_on_another(replicas: list[Harness]) -> None:
    a, b, c = replicas
    approval_id = _ask_approval(a, "no")
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(_await, c, approval_id)
        c.broker.until(lambda: c.broker.app.exchange.waiting(approval_id) == 1)
        b.operator().Deny(pb.DenyRequest(approval_id=approval_id, note="freeze"), timeout=5)
        assert waiter.result(timeout=20) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as twice:
        c.operator().Approve(pb.ApproveRequest(approval_id=approval_id), timeout=5)
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_an_approval_expires_once_whatever_replicas_run(replicas: list[Harness]) -> None:
    a, b, _ = replicas
    approval_id = _ask_approval(a, "late")
    a.clock.advance(15 * 60 + 1)  # approvals.ttl's default; one clock for all three reapers
    def expired_here(h: Harness) -> bool:
        found = h.broker.app.approvals.get(approval_id)
        return found is not None and found.state.value == "EXPIRED"

    for h in replicas:
        h.broker.until(lambda h=h: expired_here(h))
        h.broker.settle()
    expired = [r for h in replicas for r in _audit(h) if r["kind"] == "approval.expired"]
    assert [r["approval_id"] for r in expired] == [approval_id]
    assert _await(b, approval_id) == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture
def small_windows(material: Material, tmp_path: Path, pg_dsn: str) -> Iterator[list[Harness]]:
    """Two replicas whose revocation feeds remember only the last 2 lease ends."""
    started = _start(material, tmp_path, pg_dsn, "ab", extra="\n[limits]\nwatch_buffer = 2\n")
    yield started
    _stop(started)


def test_a_watcher_resuming_before_the_window_is_served_from_the_log_on_another_replica(
    small_windows: list[Harness],
) -> None:
    a, b = small_windows
    leases = [a.agent(PLANNER).Exchange(request(task_id=f"w-{i}"), timeout=5).lease_id for i in range(7)]
    first = _Watch(a)
    try:
        a.operator().Revoke(pb.RevokeRequest(lease_id=leases[0]), timeout=5)
        [seen] = first.wait(1)
    finally:
        first.close()
    for lease_id in leases[1:6]:  # more than the window holds: the first three leave it
        a.operator().Revoke(pb.RevokeRequest(lease_id=lease_id), timeout=5)
    resumed = _Watch(b, resume_after=seen.cursor)
    try:
        got = resumed.wait(5)
        a.operator().Revoke(pb.RevokeRequest(lease_id=leases[6]), timeout=5)
        got = resumed.wait(6)
    finally:
        resumed.close()
    assert [e.lease_id for e in got] == leases[1:7]
    assert len({e.cursor for e in got}) == 6

