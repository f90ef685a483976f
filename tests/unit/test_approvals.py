"""The approval store: transitions, expiry, retention, single use, ordering and subscribers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from broker.approvals.store import RETENTION_SECONDS, Approval, ApprovalState, ApprovalStore
from broker.domain.errors import ApprovalExpired, ApprovalNotFound, ApprovalNotPending, BrokerError

T0 = 1_000.0
TTL = 900.0
AGENT = "spiffe://example.org/agent/a"
OPS = "spiffe://example.org/operator/ops"


def make_approval(approval_id: str = "apr_1", *, requested_at: float = T0, ttl: float = TTL) -> Approval:
    return Approval(
        id=approval_id,
        principal=AGENT,
        client_id=AGENT,
        task_id="task-1",
        audience="spiffe://example.org/service/app",
        actions=("deploy:prod",),
        resource="service:app",
        ttl_seconds=300,
        requested_at=requested_at,
        expires_at=requested_at + ttl,
        context={"ticket": "CHG-1"},
        policies=("deploy-needs-approval",),
        plan=object(),
    )


def store_with(*approvals: Approval) -> tuple[ApprovalStore, list[Approval]]:
    store = ApprovalStore()
    seen: list[Approval] = []
    store.subscribe(seen.append)
    for approval in approvals:
        store.create(approval)
    return store, seen


def state(store: ApprovalStore, approval_id: str = "apr_1") -> ApprovalState | None:
    approval = store.get(approval_id)
    return approval.state if approval else None


def test_create_records_a_pending_approval_and_notifies() -> None:
    approval = make_approval()
    store, seen = store_with(approval)
    assert store.get("apr_1") == approval and approval.state is ApprovalState.PENDING
    assert seen == [approval]


def test_approve_records_the_operator_note_and_time() -> None:
    store, seen = store_with(make_approval())
    approved = store.approve("apr_1", by=OPS, note="window open", now=T0 + 10)
    assert approved.state is ApprovalState.APPROVED
    assert (approved.decided_by, approved.note, approved.decided_at) == (OPS, "window open", T0 + 10)
    assert store.get("apr_1") == approved and seen[-1] == approved


def test_deny_records_the_operator_note_and_time() -> None:
    store, seen = store_with(make_approval())
    denied = store.deny("apr_1", by=OPS, note="freeze", now=T0 + 10)
    assert denied.state is ApprovalState.DENIED
    assert (denied.decided_by, denied.note, denied.decided_at) == (OPS, "freeze", T0 + 10)
    assert seen[-1] == denied


def test_decisions_keep_the_bound_request_and_its_plan() -> None:
    original = make_approval()
    store, _ = store_with(original)
    approved = store.approve("apr_1", by=OPS, note="", now=T0 + 1)
    used = store.consume("apr_1", now=T0 + 2)
    for record in (approved, used):
        assert record.plan is original.plan
        assert (record.principal, record.task_id, record.actions, record.resource, record.ttl_seconds) == (
            original.principal, original.task_id, original.actions, original.resource, original.ttl_seconds
        )


def _approve(store: ApprovalStore, now: float) -> Approval:
    return store.approve("apr_1", by=OPS, note="", now=now)


def _deny(store: ApprovalStore, now: float) -> Approval:
    return store.deny("apr_1", by=OPS, note="", now=now)


def _consume(store: ApprovalStore, now: float) -> Approval:
    return store.consume("apr_1", now=now)


@dataclass(frozen=True)
class Transition:
    name: str
    before: tuple[Callable[[ApprovalStore, float], Approval], ...]
    step: Callable[[ApprovalStore, float], Approval]
    error: type[BrokerError]


TRANSITIONS = [
    Transition("approve_twice", (_approve,), _approve, ApprovalNotPending),
    Transition("deny_after_approve", (_approve,), _deny, ApprovalNotPending),
    Transition("approve_after_deny", (_deny,), _approve, ApprovalNotPending),
    Transition("deny_twice", (_deny,), _deny, ApprovalNotPending),
    Transition("consume_pending", (), _consume, ApprovalNotPending),
    Transition("consume_denied", (_deny,), _consume, ApprovalNotPending),
    Transition("consume_twice", (_approve, _consume), _consume, ApprovalNotPending),
    Transition("approve_used", (_approve, _consume), _approve, ApprovalNotPending),
]


@pytest.mark.parametrize("case", TRANSITIONS, ids=[c.name for c in TRANSITIONS])
def test_refused_transition_changes_nothing(case: Transition) -> None:
    store, seen = store_with(make_approval())
    for step in case.before:
        step(store, T0 + 1)
    before, published = store.get("apr_1"), len(seen)
    with pytest.raises(case.error):
        case.step(store, T0 + 2)
    assert store.get("apr_1") == before and len(seen) == published


@pytest.mark.parametrize("step", [_approve, _deny, _consume], ids=["approve", "deny", "consume"])
def test_unknown_approval_is_not_found(step: Callable[[ApprovalStore, float], Approval]) -> None:
    store, _ = store_with()
    with pytest.raises(ApprovalNotFound):
        step(store, T0)


def test_usable_answers_an_approved_approval_and_changes_nothing() -> None:
    store, seen = store_with(make_approval())
    approved = _approve(store, T0 + 1)
    assert store.usable("apr_1", now=T0 + 2) == approved
    assert store.get("apr_1") == approved and seen[-1] == approved


@pytest.mark.parametrize(
    ("steps", "error"),
    [((), ApprovalNotPending), ((_deny,), ApprovalNotPending), ((_approve, _consume), ApprovalNotPending)],
    ids=["pending", "denied", "used"],
)
def test_usable_refuses_what_consume_would_refuse(steps, error: type[BrokerError]) -> None:
    store, _ = store_with(make_approval())
    for step in steps:
        step(store, T0 + 1)
    with pytest.raises(error):
        store.usable("apr_1", now=T0 + 2)


def test_consume_marks_an_approved_approval_used_once() -> None:
    store, seen = store_with(make_approval())
    _approve(store, T0 + 1)
    used = store.consume("apr_1", now=T0 + 2)
    assert used.state is ApprovalState.USED and seen[-1] == used
    with pytest.raises(ApprovalNotPending):
        store.consume("apr_1", now=T0 + 3)


@pytest.mark.parametrize("step", [_approve, _deny], ids=["approve", "deny"])
def test_deciding_at_expiry_is_expired_and_expires_it(step: Callable[[ApprovalStore, float], Approval]) -> None:
    store, seen = store_with(make_approval())
    with pytest.raises(ApprovalExpired):
        step(store, T0 + TTL)
    assert state(store) is ApprovalState.EXPIRED and seen[-1].state is ApprovalState.EXPIRED


@pytest.mark.parametrize("step", [_approve, _deny, _consume], ids=["approve", "deny", "consume"])
def test_already_expired_approval_answers_expired(step: Callable[[ApprovalStore, float], Approval]) -> None:
    store, _ = store_with(make_approval())
    store.expire_due(T0 + TTL)
    with pytest.raises(ApprovalExpired):
        step(store, T0 + TTL + 1)


def test_approved_but_unused_approval_cannot_be_consumed_after_expiry() -> None:
    store, _ = store_with(make_approval())
    _approve(store, T0 + 1)
    with pytest.raises(ApprovalExpired):
        store.consume("apr_1", now=T0 + TTL)
    assert state(store) is ApprovalState.EXPIRED


def test_deciding_just_before_expiry_succeeds() -> None:
    store, _ = store_with(make_approval())
    assert _approve(store, T0 + TTL - 0.001).state is ApprovalState.APPROVED


@pytest.mark.parametrize("steps", [(), (_approve,)], ids=["pending", "approved"])
def test_expire_due_expires_undecided_and_unused_approvals(steps) -> None:
    store, seen = store_with(make_approval())
    for step in steps:
        step(store, T0 + 1)
    assert store.expire_due(T0 + TTL - 1) == []
    [expired] = store.expire_due(T0 + TTL)
    assert expired.state is ApprovalState.EXPIRED and expired.decided_at == T0 + TTL
    assert seen[-1] == expired and store.get("apr_1") == expired
    assert store.expire_due(T0 + TTL + 1) == []


@pytest.mark.parametrize("steps", [(_deny,), (_approve, _consume)], ids=["denied", "used"])
def test_expire_due_leaves_denied_and_used_approvals_alone(steps) -> None:
    store, _ = store_with(make_approval())
    for step in steps:
        step(store, T0 + 1)
    before = store.get("apr_1")
    assert store.expire_due(T0 + TTL) == []
    assert store.get("apr_1") == before


@pytest.mark.parametrize("steps", [(), (_deny,), (_approve, _consume)], ids=["expired", "denied", "used"])
def test_decided_approvals_are_forgotten_after_retention(steps) -> None:
    store, _ = store_with(make_approval())
    for step in steps:
        step(store, T0 + 1)
    store.expire_due(T0 + TTL)
    store.expire_due(T0 + TTL + RETENTION_SECONDS - 1)
    assert store.get("apr_1") is not None
    assert store.next_deadline() == T0 + TTL + RETENTION_SECONDS
    store.expire_due(T0 + TTL + RETENTION_SECONDS)
    assert store.get("apr_1") is None and store.next_deadline() is None
    assert store.list(include_decided=True) == []


def test_one_late_pass_expires_then_purges_after_retention() -> None:
    store, _ = store_with(make_approval())
    [expired] = store.expire_due(T0 + TTL + 5)
    assert expired.state is ApprovalState.EXPIRED and store.get("apr_1") is not None
    store.expire_due(T0 + TTL + RETENTION_SECONDS + 5)
    assert store.get("apr_1") is None


def test_next_deadline_is_the_earliest_expiry() -> None:
    store, _ = store_with()
    assert store.next_deadline() is None
    store.create(make_approval("apr_late", ttl=600))
    store.create(make_approval("apr_soon", ttl=60))
    assert store.next_deadline() == T0 + 60


def test_expire_due_only_touches_what_is_due() -> None:
    store, _ = store_with(make_approval("apr_soon", ttl=60), make_approval("apr_late", ttl=600))
    assert [a.id for a in store.expire_due(T0 + 60)] == ["apr_soon"]
    assert state(store, "apr_late") is ApprovalState.PENDING


def test_list_is_ordered_by_request_time_then_id_and_pending_only_by_default() -> None:
    store, _ = store_with(
        make_approval("apr_c", requested_at=T0 + 2),
        make_approval("apr_b", requested_at=T0),
        make_approval("apr_a", requested_at=T0),
        make_approval("apr_d", requested_at=T0 + 1),
    )
    store.deny("apr_d", by=OPS, note="", now=T0 + 3)
    assert [a.id for a in store.list()] == ["apr_a", "apr_b", "apr_c"]
    assert [a.id for a in store.list(include_decided=True)] == ["apr_a", "apr_b", "apr_d", "apr_c"]


def test_subscribers_see_every_change_in_order() -> None:
    store, seen = store_with(make_approval())
    _approve(store, T0 + 1)
    _consume(store, T0 + 2)
    assert [a.state for a in seen] == [ApprovalState.PENDING, ApprovalState.APPROVED, ApprovalState.USED]


def test_unsubscribed_function_is_not_called() -> None:
    store = ApprovalStore()
    seen: list[Approval] = []
    unsubscribe = store.subscribe(seen.append)
    unsubscribe()
    unsubscribe()  # idempotent
    store.create(make_approval())
    assert seen == []


def test_failing_subscriber_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    store = ApprovalStore()

    def broken(approval: Approval) -> None:
        raise RuntimeError("boom")

    seen: list[Approval] = []
    store.subscribe(broken)
    store.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="broker.approvals.store"):
        store.create(make_approval())
    assert [a.id for a in seen] == ["apr_1"] and state(store) is ApprovalState.PENDING
    assert any(r.message == "approval subscriber failed" for r in caplog.records)


def test_pending_count_follows_each_clients_undecided_approvals() -> None:
    from dataclasses import replace

    store = ApprovalStore()
    first = store.create(replace(make_approval("a1"), client_id="c1"))
    store.create(replace(make_approval("a2"), client_id="c1"))
    store.create(replace(make_approval("a3"), client_id="c2"))
    assert (store.pending_count("c1"), store.pending_count("c2"), store.pending_count("c3")) == (2, 1, 0)
    store.approve(first.id, by="op", note="", now=T0)
    assert store.pending_count("c1") == 1
