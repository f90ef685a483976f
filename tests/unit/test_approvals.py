"""Approvals: transitions planned in a batch and applied from events, expiry, retention, single use, order."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from broker.approvals.store import RETENTION_SECONDS, Approval, ApprovalState, ApprovalStore, Change, check
from broker.domain.errors import (
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalNotPending,
    BrokerError,
    PermissionDenied,
    QuotaExceeded,
)
from broker.jose.keys import SigningKey
from broker.leases.batch import Batch
from broker.leases.table import LeaseTable
from broker.store.base import MemoryStore
from broker.store.codec import decode, encode
from broker.tokens.minter import TokenMinter

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
        request={"intent": {"task_id": "task-1"}},
    )


class Book:
    """A lease table's approvals, changed only as the store changes them: plan a batch, apply its events."""

    def __init__(self) -> None:
        self.table = LeaseTable()
        self.store = MemoryStore(self.table, minter=TokenMinter("spiffe://example.org/broker", SigningKey.generate()))
        self.events: list = []
        self.table.subscribe(self.events.append)

    def run(self, plan: Callable[[Batch], object]) -> object:
        return self.store.run(plan)

    def create(self, approval: Approval, *, max_pending: int = 100) -> Approval:
        return self.run(lambda b: b.request_approval(approval, now=approval.requested_at, max_pending=max_pending))

    def approve(self, approval_id: str, *, by: str, note: str, now: float) -> Approval:
        return self.run(lambda b: b.decide_approval(approval_id, approve=True, by=by, note=note, now=now))

    def deny(self, approval_id: str, *, by: str, note: str, now: float) -> Approval:
        return self.run(lambda b: b.decide_approval(approval_id, approve=False, by=by, note=note, now=now))

    def consume(self, approval_id: str, *, now: float, lease_id: str = "lse_1") -> Approval:
        return self.run(lambda b: b.use_approval(approval_id, lease_id=lease_id, now=now))

    def release(self, approval_id: str, *, now: float) -> None:
        self.run(lambda b: b.release_approval(approval_id, now=now))

    def usable(self, approval_id: str, *, now: float) -> Approval:
        return check(self.get(approval_id), ApprovalState.APPROVED, now, before="it was used")

    def expire_due(self, now: float) -> list[Approval]:
        before = len(self.events)
        self.table.expire_due(now)
        return [e.approval for e in self.events[before:] if e.change is Change.EXPIRED]

    @property
    def approvals(self) -> ApprovalStore:
        return self.table.approvals

    def get(self, approval_id: str) -> Approval | None:
        return self.approvals.get(approval_id)

    def list(self, *, include_decided: bool = False) -> list[Approval]:
        return self.approvals.list(include_decided=include_decided)

    def next_deadline(self) -> float | None:
        return self.approvals.next_deadline()

    def pending_count(self, client_id: str) -> int:
        return self.approvals.pending_count(client_id)

    def subscribe(self, fn: Callable[[Approval], None]) -> Callable[[], None]:
        return self.approvals.subscribe(fn)


def store_with(*approvals: Approval) -> tuple[Book, list[Approval]]:
    store = Book()
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


def test_decisions_keep_the_bound_request() -> None:
    original = make_approval()
    store, _ = store_with(original)
    approved = store.approve("apr_1", by=OPS, note="", now=T0 + 1)
    used = store.consume("apr_1", now=T0 + 2, lease_id="lse_9")
    assert used.lease_id == "lse_9"
    for record in (approved, used):
        assert record.request == original.request
        assert (record.principal, record.task_id, record.actions, record.resource, record.ttl_seconds) == (
            original.principal, original.task_id, original.actions, original.resource, original.ttl_seconds
        )


def _approve(store: Book, now: float) -> Approval:
    return store.approve("apr_1", by=OPS, note="", now=now)


def _deny(store: Book, now: float) -> Approval:
    return store.deny("apr_1", by=OPS, note="", now=now)


def _consume(store: Book, now: float) -> Approval:
    return store.consume("apr_1", now=now)


@dataclass(frozen=True)
class Transition:
    name: str
    before: tuple[Callable[[Book, float], Approval], ...]
    step: Callable[[Book, float], Approval]
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
def test_unknown_approval_is_not_found(step: Callable[[Book, float], Approval]) -> None:
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
def test_deciding_at_expiry_is_expired_and_changes_nothing(step: Callable[[Book, float], Approval]) -> None:
    # The same answer as once the reaper has expired it; the expiry itself is the reaper's event.
    store, seen = store_with(make_approval())
    with pytest.raises(ApprovalExpired):
        step(store, T0 + TTL)
    assert state(store) is ApprovalState.PENDING and len(seen) == 1
    [expired] = store.expire_due(T0 + TTL)
    assert expired.state is ApprovalState.EXPIRED and seen[-1] == expired


@pytest.mark.parametrize("step", [_approve, _deny, _consume], ids=["approve", "deny", "consume"])
def test_already_expired_approval_answers_expired(step: Callable[[Book, float], Approval]) -> None:
    store, _ = store_with(make_approval())
    store.expire_due(T0 + TTL)
    with pytest.raises(ApprovalExpired):
        step(store, T0 + TTL + 1)


def test_approved_but_unused_approval_cannot_be_consumed_after_expiry() -> None:
    store, _ = store_with(make_approval())
    _approve(store, T0 + 1)
    with pytest.raises(ApprovalExpired):
        store.consume("apr_1", now=T0 + TTL)
    assert state(store) is ApprovalState.APPROVED


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
    store = Book()
    seen: list[Approval] = []
    unsubscribe = store.subscribe(seen.append)
    unsubscribe()
    unsubscribe()  # idempotent
    store.create(make_approval())
    assert seen == []


def test_failing_subscriber_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    store = Book()

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
    store = Book()
    first = store.create(replace(make_approval("a1"), client_id="c1"))
    store.create(replace(make_approval("a2"), client_id="c1"))
    store.create(replace(make_approval("a3"), client_id="c2"))
    assert (store.pending_count("c1"), store.pending_count("c2"), store.pending_count("c3")) == (2, 1, 0)
    store.approve(first.id, by="op", note="", now=T0)
    assert store.pending_count("c1") == 1


def test_an_operator_cannot_approve_their_own_request_and_nothing_changes() -> None:
    store, seen = store_with(make_approval())
    with pytest.raises(PermissionDenied, match="own request"):
        store.approve("apr_1", by=AGENT, note="", now=T0 + 1)
    assert state(store) is ApprovalState.PENDING and len(seen) == 1


def test_a_caller_at_its_pending_limit_is_refused_and_nothing_is_recorded() -> None:
    store = Book()
    store.create(make_approval("a1"), max_pending=2)
    store.create(make_approval("a2"), max_pending=2)
    with pytest.raises(QuotaExceeded, match="waiting on 2 approvals"):
        store.create(make_approval("a3"), max_pending=2)
    assert store.get("a3") is None and store.pending_count(AGENT) == 2


def test_two_requests_planned_in_one_batch_count_against_the_limit() -> None:
    store = Book()

    def both(batch: Batch) -> None:
        batch.request_approval(make_approval("a1"), now=T0, max_pending=1)
        batch.request_approval(make_approval("a2"), now=T0, max_pending=1)

    with pytest.raises(QuotaExceeded):
        store.run(both)
    assert store.list(include_decided=True) == []


def test_a_released_approval_is_usable_again_once() -> None:
    store, _ = store_with(make_approval())
    _approve(store, T0 + 1)
    _consume(store, T0 + 2)
    store.release("apr_1", now=T0 + 3)
    assert state(store) is ApprovalState.APPROVED and store.get("apr_1").lease_id == ""  # type: ignore[union-attr]
    assert store.consume("apr_1", now=T0 + 4).state is ApprovalState.USED
    with pytest.raises(ApprovalNotPending):
        _consume(store, T0 + 5)


def test_releasing_an_approval_that_is_not_used_changes_nothing() -> None:
    store, seen = store_with(make_approval())
    _approve(store, T0 + 1)
    store.release("apr_1", now=T0 + 2)
    store.release("apr_unknown", now=T0 + 2)
    assert state(store) is ApprovalState.APPROVED and len(seen) == 2


def test_every_approval_event_survives_the_log_codec() -> None:
    store, _ = store_with(make_approval(), make_approval("a1"), make_approval("a2"))
    _approve(store, T0 + 1)
    _consume(store, T0 + 2)
    store.release("apr_1", now=T0 + 3)
    store.deny("a1", by=OPS, note="no", now=T0 + 4)
    store.expire_due(T0 + TTL)
    events = [e for e in store.events if hasattr(e, "change")]
    assert {e.change for e in events} == set(Change)
    for event in events:
        kind, text = encode(event)
        again = decode(kind, json.loads(text))
        assert again == event and again.approval.request == event.approval.request


def test_a_table_replaying_the_events_holds_the_same_approvals() -> None:
    store, _ = store_with(make_approval(), make_approval("a1"), make_approval("a3", ttl=60))
    _approve(store, T0 + 1)
    store.deny("a1", by=OPS, note="", now=T0 + 2)
    store.expire_due(T0 + 60)
    replica = LeaseTable()
    for seq, event in enumerate(store.events, start=1):
        replica.apply_at(seq, event)
        replica.apply_at(seq, event)  # a replica that reads a row twice applies it once
    assert replica.approvals.list(include_decided=True) == store.list(include_decided=True)
    assert replica.approvals.pending_count(AGENT) == store.pending_count(AGENT)


def test_a_change_to_an_approval_this_table_has_forgotten_does_not_bring_it_back() -> None:
    store, _ = store_with(make_approval())
    _deny(store, T0 + 1)
    late = store.events[-1]
    store.expire_due(T0 + TTL + RETENTION_SECONDS)
    assert store.get("apr_1") is None
    store.table.apply(late)
    assert store.get("apr_1") is None and store.list(include_decided=True) == []
