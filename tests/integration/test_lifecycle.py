"""Renew, complete, revoke, expire and watch, over real mTLS with the fake clock driving expiry."""

from __future__ import annotations

import json
import queue
import threading

import grpc
import jwt
import pytest

from broker._proto import broker_pb2 as pb
from tests.support.harness import OPERATOR_ID, PLANNER, RESOURCE_SERVER_ID, WORKER, Harness

REPO = "repo:org/app"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


def request(task_id: str = "task-1", actions=("repo:read",), **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=task_id, audience=RESOURCE_SERVER_ID, actions=list(actions), resource=REPO, **kw)


def active(harness: Harness, token: str) -> bool:
    return harness.agent(RESOURCE_SERVER_ID).Introspect(pb.IntrospectRequest(token=token), timeout=5).active


class Watcher:
    """A WatchRevocations stream read on a thread into a queue."""

    def __init__(self, stub, audience: str = "") -> None:
        self.events: queue.Queue = queue.Queue()
        self.call = stub.WatchRevocations(pb.WatchRevocationsRequest(audience=audience), timeout=30)
        self.error: list[grpc.RpcError] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as e:
            self.error.append(e)

    def wait_ready(self) -> None:
        self.call.initial_metadata()

    def take(self, n: int, timeout: float = 5.0) -> list[pb.RevocationEvent]:
        return [self.events.get(timeout=timeout) for _ in range(n)]

    def wait_end(self) -> None:
        self._thread.join(5)

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(5)


def test_renew_gives_a_fresh_token_for_the_same_lease(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    first = agent.Exchange(request(ttl_seconds=120), timeout=5)
    harness.clock.advance(60)
    renewed = agent.Renew(pb.RenewRequest(lease_id=first.lease_id, ttl_seconds=300), timeout=5)
    assert renewed.lease_id == first.lease_id and renewed.access_token != first.access_token
    assert renewed.expires_at.seconds == int(harness.clock.now()) + 300
    assert active(harness, renewed.access_token)


def test_renew_stays_within_the_policy_cap(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    first = agent.Exchange(request(actions=["repo:admin"]), timeout=5)
    renewed = agent.Renew(pb.RenewRequest(lease_id=first.lease_id, ttl_seconds=3000), timeout=5)
    assert renewed.ttl_capped_by == "policy"
    assert renewed.expires_at.seconds == int(harness.clock.now()) + 60


def test_renew_of_someone_elses_lease_is_not_found(harness: Harness) -> None:
    lease = harness.agent(PLANNER).Exchange(request(), timeout=5).lease_id
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(WORKER).Renew(pb.RenewRequest(lease_id=lease), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_renew_after_revoke_is_failed_precondition(harness: Harness) -> None:
    lease = harness.agent(PLANNER).Exchange(request(), timeout=5).lease_id
    harness.operator().Revoke(pb.RevokeRequest(lease_id=lease), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).Renew(pb.RenewRequest(lease_id=lease), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_renew_after_expiry_is_failed_precondition(harness: Harness) -> None:
    lease = harness.agent(PLANNER).Exchange(request(ttl_seconds=30), timeout=5).lease_id
    harness.clock.advance(31)
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).Renew(pb.RenewRequest(lease_id=lease), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_renew_refused_by_new_policy_revokes_with_renewal_denied(harness: Harness, tmp_path) -> None:
    agent = harness.agent(PLANNER)
    resp = agent.Exchange(request(), timeout=5)
    policy = tmp_path / "policy.cedar"
    frozen = '\n@id("repo-frozen")\nforbid (principal, action, resource == Resource::"repo:org/app");\n'
    policy.write_text(policy.read_text() + frozen)
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        agent.Renew(pb.RenewRequest(lease_id=resp.lease_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    lease = harness.operator().GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5)
    assert lease.state == "REVOKED" and lease.reason == "RENEWAL_DENIED"
    assert not active(harness, resp.access_token)


def test_complete_task_revokes_its_leases_and_closes_it(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    tokens = [agent.Exchange(request(task_id="job"), timeout=5).access_token for _ in range(3)]
    done = agent.CompleteTask(pb.CompleteTaskRequest(task_id="job"), timeout=5)
    assert done.revoked_count == 3
    assert not any(active(harness, t) for t in tokens)
    with pytest.raises(grpc.RpcError) as err:
        agent.Exchange(request(task_id="job"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "completed" in err.value.details()


def test_complete_task_of_another_owner_is_permission_denied(harness: Harness) -> None:
    harness.agent(PLANNER).Exchange(request(task_id="job"), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(WORKER).CompleteTask(pb.CompleteTaskRequest(task_id="job"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_complete_unknown_task_is_not_found(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_watcher_sees_completed_expired_operator_and_parent_revoked(harness: Harness) -> None:
    watcher = Watcher(harness.agent(RESOURCE_SERVER_ID))
    try:
        watcher.wait_ready()
        planner = harness.agent(PLANNER)
        planner.Exchange(request(task_id="done"), timeout=5)
        planner.CompleteTask(pb.CompleteTaskRequest(task_id="done"), timeout=5)
        assert watcher.take(1)[0].reason == "TASK_COMPLETED"

        planner.Exchange(request(task_id="short", ttl_seconds=10), timeout=5)
        harness.clock.advance(11)
        event = watcher.take(1)[0]
        assert event.reason == "EXPIRED" and event.initiator == "broker"

        parent = planner.Exchange(request(task_id="tree", actions=["repo:read", "repo:write"]), timeout=5)
        harness.agent(WORKER).Exchange(
            pb.ExchangeRequest(actions=["repo:read"], subject_token=parent.access_token, subject_token_type=ACCESS),
            timeout=5,
        )
        harness.operator().Revoke(pb.RevokeRequest(lease_id=parent.lease_id, reason="incident"), timeout=5)
        events = watcher.take(2)
        assert sorted(e.reason for e in events) == ["OPERATOR", "PARENT_REVOKED"]
        assert all(e.audience == RESOURCE_SERVER_ID for e in events)
    finally:
        watcher.close()


def test_watcher_only_sees_its_own_audience(harness: Harness) -> None:
    watcher = Watcher(harness.agent(WORKER), audience=RESOURCE_SERVER_ID)
    watcher.wait_end()
    assert watcher.error and watcher.error[0].code() == grpc.StatusCode.PERMISSION_DENIED


def test_admin_watcher_sees_every_audience(harness: Harness) -> None:
    watcher = Watcher(harness.agent(OPERATOR_ID))
    try:
        watcher.wait_ready()
        lease = harness.agent(PLANNER).Exchange(request(), timeout=5).lease_id
        harness.operator().Revoke(pb.RevokeRequest(lease_id=lease), timeout=5)
        assert watcher.take(1)[0].lease_id == lease
    finally:
        watcher.close()


def test_expired_lease_is_reported_without_further_calls(harness: Harness) -> None:
    watcher = Watcher(harness.agent(RESOURCE_SERVER_ID))
    try:
        watcher.wait_ready()
        resp = harness.agent(PLANNER).Exchange(request(ttl_seconds=5), timeout=5)
        harness.clock.advance(5)
        [event] = watcher.take(1, timeout=1.0)  # the reaper reports within one second
        assert event.lease_id == resp.lease_id and event.reason == "EXPIRED"
    finally:
        watcher.close()


def test_task_deadline_expires_its_leases_and_closes_the_task(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    agent.Exchange(request(task_id="long"), timeout=5)
    harness.clock.advance(2 * 3600 - 60)  # max_task_lifetime is 2h
    resp = agent.Exchange(request(task_id="long", ttl_seconds=600), timeout=5)
    assert resp.ttl_capped_by == "task_deadline"
    harness.clock.advance(60)
    harness.broker.settle()
    lease = harness.operator().GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5)
    assert lease.state == "EXPIRED" and lease.reason in ("EXPIRED", "TASK_EXPIRED")
    with pytest.raises(grpc.RpcError) as err:
        agent.Exchange(request(task_id="long"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "expired" in err.value.details()


@pytest.mark.parametrize("selector", ["lease_id", "task_id", "subject", "all"])
def test_operator_revoke_by_each_selector_makes_tokens_inactive_at_once(harness: Harness, selector: str) -> None:
    resp = harness.agent(PLANNER).Exchange(request(task_id="sel"), timeout=5)
    value = {"lease_id": resp.lease_id, "task_id": "sel", "subject": PLANNER, "all": True}[selector]
    out = harness.operator().Revoke(pb.RevokeRequest(**{selector: value}), timeout=5)
    assert out.revoked_count == 1
    assert not active(harness, resp.access_token)
    again = harness.operator().Revoke(pb.RevokeRequest(**{selector: value}), timeout=5)
    assert again.revoked_count == 0


def test_revoke_all_rotates_the_signing_key(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(request(), timeout=5)
    before = harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json
    harness.operator().Revoke(pb.RevokeRequest(all=True), timeout=5)
    after = harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json
    kid = jwt.get_unverified_header(resp.access_token)["kid"]
    assert kid in before and kid not in after and json.loads(after)["keys"]


def test_non_admin_calling_broker_admin_is_refused(harness: Harness) -> None:
    stub = harness.operator(PLANNER)
    with pytest.raises(grpc.RpcError) as err:
        stub.ListLeases(pb.ListLeasesRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_pagination_returns_every_lease_exactly_once(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    ids = {agent.Exchange(request(task_id="many"), timeout=5).lease_id for _ in range(23)}
    seen: list[str] = []
    token = ""
    while True:
        page = harness.operator().ListLeases(pb.ListLeasesRequest(page_size=5, page_token=token), timeout=5)
        seen += [lease.id for lease in page.leases]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 23 and set(seen) == ids


def test_bad_page_token_is_invalid_argument(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.operator().ListLeases(pb.ListLeasesRequest(page_token="garbage!"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_check_policy_explains_the_decision(harness: Harness) -> None:
    allow = harness.operator().CheckPolicy(
        pb.CheckPolicyRequest(principal=PLANNER, action="repo:admin", resource=REPO), timeout=5
    )
    assert allow.decision == "ALLOW" and list(allow.policies) == ["admin-is-short"] and allow.max_ttl_seconds == 60
    deny = harness.operator().CheckPolicy(
        pb.CheckPolicyRequest(principal=PLANNER, action="repo:read", resource="vault:prod"), timeout=5
    )
    assert deny.decision == "DENY" and "no-secrets" in deny.policies


def test_reload_of_a_bad_policy_keeps_the_old_one(harness: Harness, tmp_path) -> None:
    version = harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5).policy_version
    (tmp_path / "policy.cedar").write_text("permit (principal, action resource);")
    with pytest.raises(grpc.RpcError) as err:
        harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert harness.agent(PLANNER).Exchange(request(), timeout=5).state == "ISSUED"
    assert version


def test_disconnected_watchers_are_cleaned_up(harness: Harness) -> None:
    watcher = Watcher(harness.agent(RESOURCE_SERVER_ID))
    watcher.wait_ready()
    assert harness.broker.sync(len, harness.broker.app.feed) == 1
    watcher.close()
    for _ in range(50):
        if harness.broker.sync(len, harness.broker.app.feed) == 0:
            break
        harness.broker.settle()
    assert harness.broker.sync(len, harness.broker.app.feed) == 0


@pytest.fixture
def tiny_buffer(material, tmp_path):
    from tests.support.harness import run_harness

    yield from run_harness(material, tmp_path, extra="[limits]\nwatch_buffer = 2\n")


def test_a_burst_larger_than_the_window_cuts_a_watcher_off_with_resource_exhausted(tiny_buffer: Harness) -> None:
    harness = tiny_buffer
    call = harness.agent(OPERATOR_ID).WatchRevocations(pb.WatchRevocationsRequest(), timeout=30)
    call.initial_metadata()
    agent = harness.agent(PLANNER)
    for i in range(4):
        agent.Exchange(request(task_id=f"t{i}"), timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(all=True), timeout=5)  # four events at once, window of two
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "cut off" in err.value.details()


@pytest.fixture
def roomy(material, tmp_path):
    from tests.support.harness import run_harness

    yield from run_harness(material, tmp_path, extra="[limits]\nrate_per_second = 100000\nrate_burst = 100000\n")


def _exchange_many(harness: Harness, task_id: str, n: int) -> list[str]:
    agent = harness.agent(PLANNER)
    futures = [agent.Exchange.future(request(task_id=task_id), timeout=60) for _ in range(n)]
    return [f.result().lease_id for f in futures]


def test_revoking_a_task_of_1100_leases_reaches_a_reading_watcher_whole(roomy: Harness) -> None:
    harness = roomy
    lease_ids = _exchange_many(harness, "bulk", 1100)
    watcher = Watcher(harness.agent(RESOURCE_SERVER_ID))
    try:
        watcher.wait_ready()
        assert harness.operator().Revoke(pb.RevokeRequest(task_id="bulk"), timeout=10).revoked_count == 1100
        events = watcher.take(1100, timeout=20)
        assert sorted(e.lease_id for e in events) == sorted(lease_ids)
        assert len({e.cursor for e in events}) == 1100 and not watcher.error
    finally:
        watcher.close()


def test_a_watcher_that_reconnects_gets_exactly_what_it_missed_once(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    ids = [agent.Exchange(request(task_id=f"r{i}"), timeout=5).lease_id for i in range(4)]
    operator = harness.operator()
    watcher = Watcher(harness.agent(RESOURCE_SERVER_ID))
    watcher.wait_ready()
    operator.Revoke(pb.RevokeRequest(lease_id=ids[0]), timeout=5)
    [first] = watcher.take(1)
    watcher.close()
    operator.Revoke(pb.RevokeRequest(lease_id=ids[1]), timeout=5)
    operator.Revoke(pb.RevokeRequest(lease_id=ids[2]), timeout=5)
    call = harness.agent(RESOURCE_SERVER_ID).WatchRevocations(
        pb.WatchRevocationsRequest(resume_after=first.cursor), timeout=30
    )
    call.initial_metadata()
    missed = [next(call).lease_id, next(call).lease_id]
    operator.Revoke(pb.RevokeRequest(lease_id=ids[3]), timeout=5)
    assert [*missed, next(call).lease_id] == ids[1:]
    call.cancel()


def test_resuming_after_events_the_broker_no_longer_keeps_is_out_of_range(tiny_buffer: Harness) -> None:
    harness = tiny_buffer
    agent = harness.agent(PLANNER)
    ids = [agent.Exchange(request(task_id=f"o{i}"), timeout=5).lease_id for i in range(4)]
    watcher = Watcher(harness.agent(RESOURCE_SERVER_ID))
    watcher.wait_ready()
    harness.operator().Revoke(pb.RevokeRequest(lease_id=ids[0]), timeout=5)
    [first] = watcher.take(1)
    watcher.close()
    for lease_id in ids[1:]:
        harness.operator().Revoke(pb.RevokeRequest(lease_id=lease_id), timeout=5)
    call = harness.agent(RESOURCE_SERVER_ID).WatchRevocations(
        pb.WatchRevocationsRequest(resume_after=first.cursor), timeout=10
    )
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "older than" in err.value.details()


@pytest.mark.parametrize("cursor", ["not-a-cursor", "x" * 300], ids=["junk", "too-long"])
def test_a_malformed_resume_cursor_is_invalid_argument(harness: Harness, cursor: str) -> None:
    call = harness.agent(RESOURCE_SERVER_ID).WatchRevocations(
        pb.WatchRevocationsRequest(resume_after=cursor), timeout=10
    )
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_operator_revoking_a_task_stops_it_being_used_again(harness: Harness) -> None:
    agent = harness.agent(PLANNER)
    agent.Exchange(request(task_id="incident"), timeout=5)
    assert harness.operator().Revoke(pb.RevokeRequest(task_id="incident"), timeout=5).revoked_count == 1
    with pytest.raises(grpc.RpcError) as err:
        agent.Exchange(request(task_id="incident"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()


def test_an_agent_acting_for_a_user_may_complete_the_users_task(harness: Harness) -> None:
    user = harness.issuer.oidc().id_token("user-5", "spiffe://example.org/broker", claims={"email": "u5@example.org"})
    req = request(
        task_id="for-user", subject_token=user, subject_token_type="urn:ietf:params:oauth:token-type:id_token"
    )
    resp = harness.agent(PLANNER).Exchange(req, timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        harness.agent(WORKER).CompleteTask(pb.CompleteTaskRequest(task_id="for-user"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    done = harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="for-user"), timeout=5)
    assert done.revoked_count == 1 and not active(harness, resp.access_token)
