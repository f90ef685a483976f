"""Human approval: a pending exchange, the operator's decision, and the single issuance it allows."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest

from broker._proto import broker_pb2 as pb
from tests.support.harness import (
    BROKER_ID,
    OPERATOR_ID,
    PLANNER,
    RESOURCE_SERVER_ID,
    WORKER,
    Harness,
    Material,
    run_harness,
)

SERVICE = "service:app"
DEPLOY = "deploy:prod"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
APPROVAL_TTL = 15 * 60


def deploy(task_id: str = "rollout", ttl_seconds: int = 300, **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=task_id, audience=RESOURCE_SERVER_ID, actions=[DEPLOY], resource=SERVICE,
                              ttl_seconds=ttl_seconds, **kw)


def pending(harness: Harness, agent: str = PLANNER, **kw) -> str:
    resp = harness.agent(agent).Exchange(deploy(**kw), timeout=5)
    assert resp.state == "PENDING_APPROVAL"
    return resp.approval_id


def await_approval(harness: Harness, approval_id: str, agent: str = PLANNER, timeout: float = 5):
    return harness.agent(agent).AwaitApproval(pb.AwaitApprovalRequest(approval_id=approval_id), timeout=timeout)


def approve(harness: Harness, approval_id: str, note: str = "") -> pb.Approval:
    return harness.operator().Approve(pb.ApproveRequest(approval_id=approval_id, note=note), timeout=5)


def deny(harness: Harness, approval_id: str, note: str = "") -> pb.Approval:
    return harness.operator().Deny(pb.DenyRequest(approval_id=approval_id, note=note), timeout=5)


def listed(harness: Harness, include_decided: bool = False) -> list[pb.Approval]:
    req = pb.ListApprovalsRequest(include_decided=include_decided)
    return list(harness.operator().ListApprovals(req, timeout=5).approvals)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def verify_with_jwks(harness: Harness, token: str) -> dict:
    jwks = json.loads(harness.token_agent().GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json)
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return jwt.decode(token, key=key, algorithms=[header["alg"]], audience=RESOURCE_SERVER_ID,
                      issuer=BROKER_ID, options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})


class Waiting:
    """An AwaitApproval call blocked on its own thread; `result()` gives its answer or its error."""

    def __init__(self, harness: Harness, approval_id: str, agent: str = PLANNER, timeout: float = 10) -> None:
        self._answers: queue.Queue = queue.Queue()
        stub = harness.agent(agent)
        req = pb.AwaitApprovalRequest(approval_id=approval_id)
        self._thread = threading.Thread(target=self._call, args=(stub, req, timeout), daemon=True)
        self._thread.start()

    def _call(self, stub, req, timeout: float) -> None:
        try:
            self._answers.put(stub.AwaitApproval(req, timeout=timeout))
        except grpc.RpcError as e:
            self._answers.put(e)

    def still_waiting(self, seconds: float = 0.3) -> bool:
        self._thread.join(seconds)
        return self._thread.is_alive()

    def result(self, timeout: float = 3):
        return self._answers.get(timeout=timeout)


def test_exchange_needing_approval_issues_nothing_and_names_an_approval(harness: Harness) -> None:
    resp = harness.agent(PLANNER).Exchange(deploy(), timeout=5)
    assert resp.state == "PENDING_APPROVAL" and resp.approval_id and resp.task_id == "rollout"
    assert resp.access_token == "" and resp.lease_id == ""
    leases = harness.operator().ListLeases(pb.ListLeasesRequest(include_inactive=True), timeout=5).leases
    assert list(leases) == []


def test_list_approvals_shows_the_exact_bound_request(harness: Harness) -> None:
    requested_at = harness.clock.now()
    approval_id = pending(harness, ttl_seconds=450, context={"ticket": "CHG-7"})
    [approval] = listed(harness)
    assert approval.approval_id == approval_id and approval.state == "PENDING"
    assert (approval.principal, approval.client_id, approval.task_id) == (PLANNER, PLANNER, "rollout")
    assert (approval.audience, list(approval.actions), approval.resource) == (RESOURCE_SERVER_ID, [DEPLOY], SERVICE)
    assert approval.ttl_seconds == 450 and dict(approval.context) == {"ticket": "CHG-7"}
    assert list(approval.policies) == ["deploy-needs-approval"]
    assert approval.expires_at.seconds == int(requested_at + APPROVAL_TTL)


@dataclass(frozen=True)
class ApprovedTtl:
    name: str
    ttl_seconds: int
    expected_ttl: int
    capped_by: str


APPROVED_TTLS = [
    ApprovedTtl("asked", 300, 300, "requested"),
    ApprovedTtl("policy_max_ttl", 3000, 600, "policy"),
]


@pytest.mark.parametrize("case", APPROVED_TTLS, ids=[c.name for c in APPROVED_TTLS])
def test_approved_request_is_issued_to_the_awaiting_agent(harness: Harness, case: ApprovedTtl) -> None:
    approval_id = pending(harness, ttl_seconds=case.ttl_seconds)
    harness.clock.advance(30)
    approve(harness, approval_id, note="change window open")
    resp = await_approval(harness, approval_id)
    assert resp.state == "ISSUED" and resp.lease_id
    assert resp.ttl_capped_by == case.capped_by
    claims = verify_with_jwks(harness, resp.access_token)
    assert claims["exp"] == int(harness.clock.now()) + case.expected_ttl == resp.expires_at.seconds
    assert (claims["sub"], claims["scope"], claims["resource"], claims["txn"]) == (PLANNER, DEPLOY, SERVICE, "rollout")


def test_blocked_await_returns_when_the_operator_approves(harness: Harness) -> None:
    approval_id = pending(harness)
    waiting = Waiting(harness, approval_id)
    assert waiting.still_waiting()
    approve(harness, approval_id)
    resp = waiting.result()  # answered by the approval itself: the fake clock never moved
    assert isinstance(resp, pb.ExchangeResponse) and resp.state == "ISSUED" and resp.lease_id


def test_blocked_await_returns_permission_denied_when_the_operator_denies(harness: Harness) -> None:
    approval_id = pending(harness)
    waiting = Waiting(harness, approval_id)
    assert waiting.still_waiting()
    deny(harness, approval_id, note="not during the freeze")
    err = waiting.result()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not during the freeze" in err.details()


def test_denied_approval_is_permission_denied_with_the_note(harness: Harness) -> None:
    approval_id = pending(harness)
    denied = deny(harness, approval_id, note="no deploys on friday")
    assert denied.state == "DENIED" and denied.decided_by == OPERATOR_ID
    err = refused(lambda: await_approval(harness, approval_id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "no deploys on friday" in err.details()


def test_approval_expires_when_nobody_decides(harness: Harness) -> None:
    approval_id = pending(harness)
    harness.clock.advance(APPROVAL_TTL + 1)
    harness.broker.settle()
    err = refused(lambda: await_approval(harness, approval_id))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "expired" in err.details()
    assert listed(harness) == [] and [a.state for a in listed(harness, include_decided=True)] == ["EXPIRED"]


def test_expired_approval_cannot_be_approved(harness: Harness) -> None:
    approval_id = pending(harness)
    harness.clock.advance(APPROVAL_TTL)
    harness.broker.settle()
    err = refused(lambda: approve(harness, approval_id))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "expired" in err.details()
    assert refused(lambda: await_approval(harness, approval_id)).code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_blocked_await_ends_when_the_approval_expires(harness: Harness) -> None:
    approval_id = pending(harness)
    waiting = Waiting(harness, approval_id)
    assert waiting.still_waiting()
    harness.clock.advance(APPROVAL_TTL + 1)
    err = waiting.result()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "expired" in err.details()


def test_approved_but_unused_approval_expires(harness: Harness) -> None:
    approval_id = pending(harness)
    approve(harness, approval_id)
    harness.clock.advance(APPROVAL_TTL + 1)
    harness.broker.settle()
    err = refused(lambda: await_approval(harness, approval_id))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "before it was used" in err.details()


def test_short_call_deadline_leaves_the_approval_pending(harness: Harness) -> None:
    approval_id = pending(harness)
    exchange = harness.broker.app.exchange
    call = harness.agent(PLANNER).AwaitApproval.future(pb.AwaitApprovalRequest(approval_id=approval_id), timeout=2)
    # The call reaches the broker and waits there before its deadline passes (so no late copy of it
    # can arrive afterwards), then the broker lets go of it: only then does the operator decide, so
    # the abandoned call cannot be the one the approval is issued to.
    harness.broker.until(lambda: exchange.waiting(approval_id) == 1 or call.done())
    assert not call.done(), "the call ended before it reached the broker"
    assert call.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    harness.broker.until(lambda: exchange.waiting(approval_id) == 0)
    assert [(a.approval_id, a.state) for a in listed(harness)] == [(approval_id, "PENDING")]
    approve(harness, approval_id)
    assert await_approval(harness, approval_id).state == "ISSUED"


def test_approval_is_single_use(harness: Harness) -> None:
    approval_id = pending(harness)
    approve(harness, approval_id)
    assert await_approval(harness, approval_id).state == "ISSUED"
    err = refused(lambda: await_approval(harness, approval_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    leases = harness.operator().ListLeases(pb.ListLeasesRequest(task_id="rollout"), timeout=5).leases
    assert len(leases) == 1


def test_approval_cannot_be_decided_twice(harness: Harness) -> None:
    approval_id = pending(harness)
    approve(harness, approval_id)
    assert refused(lambda: deny(harness, approval_id)).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused(lambda: approve(harness, approval_id)).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_another_principal_cannot_await_the_approval(harness: Harness) -> None:
    approval_id = pending(harness)
    approve(harness, approval_id)
    err = refused(lambda: await_approval(harness, approval_id, agent=WORKER))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert await_approval(harness, approval_id).state == "ISSUED"


def test_unknown_approval_is_not_found(harness: Harness) -> None:
    assert refused(lambda: await_approval(harness, "apr_nope")).code() == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: approve(harness, "apr_nope")).code() == grpc.StatusCode.NOT_FOUND


def test_missing_approval_id_is_invalid_argument(harness: Harness) -> None:
    assert refused(lambda: await_approval(harness, "")).code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rpc", ["Approve", "Deny", "ListApprovals"])
def test_non_admin_cannot_decide_or_list_approvals(harness: Harness, rpc: str) -> None:
    approval_id = pending(harness)
    stub = harness.operator(PLANNER)
    req = {
        "Approve": pb.ApproveRequest(approval_id=approval_id),
        "Deny": pb.DenyRequest(approval_id=approval_id),
        "ListApprovals": pb.ListApprovalsRequest(),
    }[rpc]
    err = refused(lambda: getattr(stub, rpc)(req, timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [a.state for a in listed(harness)] == ["PENDING"]


def test_each_approval_binds_its_own_request(harness: Harness) -> None:
    short = pending(harness, task_id="one", ttl_seconds=120)
    other = pending(harness, task_id="two", ttl_seconds=240)
    approve(harness, other)
    resp = await_approval(harness, other)
    assert resp.task_id == "two" and resp.expires_at.seconds == int(harness.clock.now()) + 240
    assert [(a.approval_id, a.state) for a in listed(harness)] == [(short, "PENDING")]


def test_policy_forbidding_the_request_meanwhile_wins_over_the_approval(harness: Harness, tmp_path) -> None:
    approval_id = pending(harness)
    policy = tmp_path / "policy.cedar"
    freeze = '\n@id("deploy-freeze")\nforbid (principal, action == Action::"deploy:prod", resource);\n'
    policy.write_text(policy.read_text() + freeze)
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    approve(harness, approval_id)
    err = refused(lambda: await_approval(harness, approval_id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "deploy-freeze" in err.details()
    assert list(harness.operator().ListLeases(pb.ListLeasesRequest(), timeout=5).leases) == []
    assert [a.state for a in listed(harness, include_decided=True)] == ["APPROVED"]


def test_audit_records_each_step_with_the_operator_and_note(harness: Harness, tmp_path) -> None:
    approval_id = pending(harness)
    approve(harness, approval_id, note="ticket CHG-12")
    resp = await_approval(harness, approval_id)
    records = audit(tmp_path)
    by_kind = {r["kind"]: r for r in records if r["kind"].startswith("approval.")}
    assert list(by_kind) == ["approval.requested", "approval.approved", "approval.used"]
    requested = by_kind["approval.requested"]
    assert (requested["approval_id"], requested["principal"], requested["task_id"]) == (approval_id, PLANNER, "rollout")
    assert requested["actions"] == [DEPLOY] and requested["policies"] == ["deploy-needs-approval"]
    approved = by_kind["approval.approved"]
    assert (approved["approval_id"], approved["operator"]) == (approval_id, OPERATOR_ID)
    assert approved["note"] == "ticket CHG-12"
    assert by_kind["approval.used"]["lease_id"] == resp.lease_id
    assert resp.access_token not in (tmp_path / "audit.jsonl").read_text()


def test_audit_records_denial_and_expiry(harness: Harness, tmp_path) -> None:
    denied = pending(harness, task_id="one")
    expired = pending(harness, task_id="two")
    deny(harness, denied, note="too risky")
    harness.clock.advance(APPROVAL_TTL + 1)
    harness.broker.settle()
    records = [r for r in audit(tmp_path) if r["kind"] in ("approval.denied", "approval.expired")]
    assert [(r["kind"], r["approval_id"]) for r in records] == [
        ("approval.denied", denied), ("approval.expired", expired)
    ]
    assert (records[0]["operator"], records[0]["note"]) == (OPERATOR_ID, "too risky")


def test_delegation_needing_approval_is_awaited_by_the_sub_agent(harness: Harness) -> None:
    root_approval = pending(harness)
    approve(harness, root_approval)
    root = await_approval(harness, root_approval)
    req = pb.ExchangeRequest(actions=[DEPLOY], subject_token=root.access_token, subject_token_type=ACCESS)
    held = harness.agent(WORKER).Exchange(req, timeout=5)
    assert held.state == "PENDING_APPROVAL"
    [approval] = listed(harness)
    assert (approval.principal, approval.client_id, approval.task_id) == (PLANNER, WORKER, "rollout")
    approve(harness, held.approval_id)
    assert refused(lambda: await_approval(harness, held.approval_id)).code() == grpc.StatusCode.NOT_FOUND
    child = await_approval(harness, held.approval_id, agent=WORKER)
    claims = verify_with_jwks(harness, child.access_token)
    assert claims["sub"] == PLANNER and claims["act"] == {"sub": WORKER}
    lease = harness.operator().GetLease(pb.GetLeaseRequest(lease_id=child.lease_id), timeout=5)
    assert lease.parent == root.lease_id


def test_approved_delegation_whose_parent_was_revoked_issues_nothing(harness: Harness) -> None:
    root_approval = pending(harness)
    approve(harness, root_approval)
    root = await_approval(harness, root_approval)
    req = pb.ExchangeRequest(actions=[DEPLOY], subject_token=root.access_token, subject_token_type=ACCESS)
    held = harness.agent(WORKER).Exchange(req, timeout=5)
    harness.operator().Revoke(pb.RevokeRequest(lease_id=root.lease_id), timeout=5)
    approve(harness, held.approval_id)
    err = refused(lambda: await_approval(harness, held.approval_id, agent=WORKER))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert list(harness.operator().GetLease(pb.GetLeaseRequest(lease_id=root.lease_id), timeout=5).children) == []


def test_failed_issuance_leaves_the_approval_unused(harness: Harness, tmp_path) -> None:
    harness.agent(PLANNER).Exchange(
        pb.ExchangeRequest(task_id="ship", audience=RESOURCE_SERVER_ID, actions=["repo:read"], resource="repo:org/app"),
        timeout=5,
    )
    approval_id = pending(harness, task_id="ship")
    approve(harness, approval_id)
    harness.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id="ship"), timeout=5)
    err = refused(lambda: await_approval(harness, approval_id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "closed" in err.details()
    assert [a.state for a in listed(harness, include_decided=True)] == ["APPROVED"]
    assert "approval.used" not in [r["kind"] for r in audit(tmp_path)]


@pytest.fixture
def short_approvals(material: Material, tmp_path: Path) -> Iterator[Harness]:
    yield from run_harness(material, tmp_path, extra='[approvals]\nttl = "2m"\n')


def test_approval_ttl_comes_from_the_config(short_approvals: Harness) -> None:
    harness = short_approvals
    requested_at = harness.clock.now()
    pending(harness)
    [approval] = listed(harness)
    assert approval.expires_at.seconds == int(requested_at + 120)
    harness.clock.advance(121)
    harness.broker.settle()
    assert [a.state for a in listed(harness, include_decided=True)] == ["EXPIRED"]


def test_approved_delegation_is_capped_by_the_parent_as_it_is_now(harness: Harness, tmp_path) -> None:
    policy = tmp_path / "policy.cedar"
    policy.write_text(policy.read_text() + """
@id("delegated-writes-need-approval")
@approval("required")
permit (principal in Team::"agents", action == Action::"repo:write", resource == Resource::"repo:org/app")
when { context.delegated };
""")
    harness.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    planner = harness.agent(PLANNER)
    root = planner.Exchange(
        pb.ExchangeRequest(task_id="w", audience=RESOURCE_SERVER_ID, actions=["repo:write"], resource="repo:org/app",
                           ttl_seconds=1200),
        timeout=5,
    )
    req = pb.ExchangeRequest(actions=["repo:write"], subject_token=root.access_token, subject_token_type=ACCESS)
    held = harness.agent(WORKER).Exchange(req, timeout=5)
    assert held.state == "PENDING_APPROVAL"
    shorter = planner.Renew(pb.RenewRequest(lease_id=root.lease_id, ttl_seconds=60), timeout=5)
    approve(harness, held.approval_id)
    child = await_approval(harness, held.approval_id, agent=WORKER)
    assert child.ttl_capped_by == "parent_lease" and child.expires_at.seconds == shorter.expires_at.seconds
