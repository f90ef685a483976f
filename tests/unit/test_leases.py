"""The lease table: events, expiry with lazy deletion, cascades, tasks, replay, bounded memory."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import pytest

from broker.domain.errors import (
    BrokerError,
    InvalidTransition,
    LeaseInactive,
    LeaseNotFound,
    TaskConflict,
    TaskNotFound,
)
from broker.leases.table import (
    BROKER_INITIATOR,
    Event,
    Lease,
    LeaseEnded,
    LeaseGranted,
    LeaseRenewed,
    LeaseState,
    LeaseTable,
    Reason,
    TaskClosed,
    TaskOpened,
    TaskState,
)

T0 = 1_000.0
OWNER = "spiffe://example.org/agent/a"
OTHER = "spiffe://example.org/agent/b"
OPS = "spiffe://example.org/operator/ops"


def make_lease(
    lease_id: str,
    *,
    task_id: str = "task-1",
    subject: str = OWNER,
    audience: str = "repo",
    issued_at: float = T0,
    expires_at: float = T0 + 300,
    token_exp: float | None = None,
    parent_id: str | None = None,
) -> Lease:
    return Lease(
        id=lease_id,
        task_id=task_id,
        subject=subject,
        client_id=subject,
        audience=audience,
        scope=("repo:read",),
        resource="repo:org/app",
        issued_at=issued_at,
        expires_at=expires_at,
        token_exp=expires_at if token_exp is None else token_exp,
        parent_id=parent_id,
    )


def new_table(*task_ids: str, deadline: float = T0 + 3_600) -> LeaseTable:
    table = LeaseTable()
    for task_id in task_ids or ("task-1",):
        table.open_task(task_id, OWNER, now=T0, deadline=deadline)
    return table


def chain(table: LeaseTable, depth: int, *, expires_at: float = T0 + 300) -> list[str]:
    """Grant a delegation chain root -> d1 -> ... and return its ids, root first."""
    ids = [f"d{i}" for i in range(depth)]
    for i, lease_id in enumerate(ids):
        table.grant(make_lease(lease_id, expires_at=expires_at, parent_id=ids[i - 1] if i else None), now=T0)
    return ids


# -- expiry and lazy deletion ---------------------------------------------------------


def test_expire_due_ends_leases_in_expiry_order() -> None:
    table = new_table()
    for lease_id, ttl in (("c", 30), ("a", 20), ("b", 10)):
        table.grant(make_lease(lease_id, expires_at=T0 + ttl), now=T0)
    ended = table.expire_due(T0 + 60)
    assert [lease.id for lease in ended] == ["b", "a", "c"]
    assert {(lease.state, lease.reason, lease.initiator) for lease in ended} == {
        (LeaseState.EXPIRED, Reason.EXPIRED, BROKER_INITIATOR)
    }


def test_expire_due_breaks_ties_by_lease_id() -> None:
    table = new_table()
    for lease_id in ("z", "m", "a"):
        table.grant(make_lease(lease_id, expires_at=T0 + 10), now=T0)
    assert [lease.id for lease in table.expire_due(T0 + 10)] == ["a", "m", "z"]


def test_expire_due_leaves_leases_not_yet_due() -> None:
    table = new_table()
    table.grant(make_lease("early", expires_at=T0 + 10), now=T0)
    table.grant(make_lease("late", expires_at=T0 + 20), now=T0)
    table.expire_due(T0 + 15)
    assert table.get("late").state is LeaseState.ACTIVE


def test_expired_lease_records_its_expiry_time_as_ended_at() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 10, token_exp=T0 + 100), now=T0)
    table.expire_due(T0 + 25)
    assert table.get("l1").ended_at == T0 + 10


def test_renewed_lease_is_not_expired_at_its_old_time() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 10), now=T0)
    table.renew("l1", expires_at=T0 + 50, token_exp=T0 + 50, now=T0 + 5)
    assert table.expire_due(T0 + 10) == []
    assert table.get("l1").state is LeaseState.ACTIVE


def test_renewed_lease_expires_at_its_new_time() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 10), now=T0)
    table.renew("l1", expires_at=T0 + 50, token_exp=T0 + 50, now=T0 + 5)
    assert [lease.id for lease in table.expire_due(T0 + 50)] == ["l1"]


def test_renewal_to_an_earlier_time_expires_at_that_time() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 100), now=T0)
    table.renew("l1", expires_at=T0 + 20, token_exp=T0 + 20, now=T0 + 5)
    assert [lease.id for lease in table.expire_due(T0 + 20)] == ["l1"]


def test_revoked_lease_stale_heap_entry_is_skipped() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 10, token_exp=T0 + 60), now=T0)
    table.revoke("l1", Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert table.expire_due(T0 + 10) == []
    assert table.get("l1").reason is Reason.OPERATOR


def test_renew_keeps_the_latest_token_exp() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 100, token_exp=T0 + 100), now=T0)
    renewed = table.renew("l1", expires_at=T0 + 30, token_exp=T0 + 30, now=T0 + 10)
    assert (renewed.expires_at, renewed.token_exp) == (T0 + 30, T0 + 100)


def test_tombstone_is_kept_until_token_exp() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 10, token_exp=T0 + 60), now=T0)
    table.expire_due(T0 + 59)
    assert table.get("l1").state is LeaseState.EXPIRED


def test_tombstone_is_purged_once_token_exp_passes() -> None:
    table = new_table()
    table.grant(make_lease("l1", expires_at=T0 + 10, token_exp=T0 + 60), now=T0)
    table.revoke("l1", Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    table.expire_due(T0 + 60)
    assert table.get("l1") is None
    assert table.list(include_inactive=True) == []


def test_tombstone_grace_keeps_an_ended_lease_past_token_exp() -> None:
    table = LeaseTable(tombstone_grace=30)
    table.open_task("task-1", OWNER, now=T0, deadline=T0 + 3_600)
    table.grant(make_lease("l1", expires_at=T0 + 10), now=T0)
    table.expire_due(T0 + 39)
    kept = table.get("l1")
    table.expire_due(T0 + 40)
    assert (kept.state, table.get("l1")) == (LeaseState.EXPIRED, None)


def test_next_deadline_is_the_earliest_pending_time() -> None:
    table = new_table(deadline=T0 + 3_600)
    table.grant(make_lease("l1", expires_at=T0 + 40), now=T0)
    table.grant(make_lease("l2", expires_at=T0 + 20), now=T0)
    assert table.next_deadline() == T0 + 20


def test_next_deadline_is_none_for_an_empty_table() -> None:
    assert LeaseTable().next_deadline() is None


# -- revocation and cascades ----------------------------------------------------------


def test_revoke_twice_returns_nothing_the_second_time() -> None:
    table = new_table()
    table.grant(make_lease("l1"), now=T0)
    first = table.revoke("l1", Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    second = table.revoke("l1", Reason.OPERATOR, now=T0 + 2, initiator=OPS)
    assert ([lease.id for lease in first], second) == (["l1"], [])


def test_revoke_of_an_unknown_lease_is_lease_not_found() -> None:
    with pytest.raises(LeaseNotFound):
        new_table().revoke("nope", Reason.OPERATOR, now=T0, initiator=OPS)


def test_revoke_records_state_reason_time_and_initiator() -> None:
    table = new_table()
    table.grant(make_lease("l1"), now=T0)
    table.revoke("l1", Reason.RENEWAL_DENIED, now=T0 + 7, initiator=OPS)
    lease = table.get("l1")
    assert (lease.state, lease.reason, lease.ended_at, lease.initiator) == (
        LeaseState.REVOKED,
        Reason.RENEWAL_DENIED,
        T0 + 7,
        OPS,
    )


def test_revoke_cascades_three_levels_deep() -> None:
    table = new_table()
    ids = chain(table, 4)
    changed = table.revoke(ids[0], Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert [(lease.id, lease.reason) for lease in changed] == [
        ("d0", Reason.OPERATOR),
        ("d1", Reason.PARENT_REVOKED),
        ("d2", Reason.PARENT_REVOKED),
        ("d3", Reason.PARENT_REVOKED),
    ]


def test_revoke_of_a_middle_lease_spares_its_ancestors() -> None:
    table = new_table()
    ids = chain(table, 3)
    table.revoke(ids[1], Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert [table.get(i).state for i in ids] == [LeaseState.ACTIVE, LeaseState.REVOKED, LeaseState.REVOKED]


def test_revoke_cascade_handles_a_chain_deeper_than_the_recursion_limit() -> None:
    table = new_table()
    ids = chain(table, 5_000)
    changed = table.revoke(ids[0], Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert len(changed) == 5_000


def test_expiry_of_a_parent_revokes_its_children_as_parent_revoked() -> None:
    table = new_table()
    table.grant(make_lease("parent", expires_at=T0 + 10), now=T0)
    table.grant(make_lease("child", expires_at=T0 + 10, parent_id="parent"), now=T0)
    table.renew("child", expires_at=T0 + 8, token_exp=T0 + 8, now=T0 + 1)
    table.renew("parent", expires_at=T0 + 5, token_exp=T0 + 5, now=T0 + 1)
    changed = table.expire_due(T0 + 5)
    assert [(lease.id, lease.state, lease.reason) for lease in changed] == [
        ("parent", LeaseState.EXPIRED, Reason.EXPIRED),
        ("child", LeaseState.REVOKED, Reason.PARENT_REVOKED),
    ]


def test_revoke_task_ends_only_that_tasks_active_leases() -> None:
    table = new_table("task-1", "task-2")
    for lease_id, task_id in (("a", "task-1"), ("b", "task-1"), ("c", "task-2")):
        table.grant(make_lease(lease_id, task_id=task_id), now=T0)
    table.revoke("b", Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    changed = table.revoke_task("task-1", Reason.OPERATOR, now=T0 + 2, initiator=OPS)
    assert ([lease.id for lease in changed], table.counts()["active"]) == (["a"], 1)


def test_revoke_task_closes_the_task_until_its_deadline() -> None:
    table = new_table(deadline=T0 + 100)
    table.grant(make_lease("a", expires_at=T0 + 50), now=T0)
    changed = table.revoke_task("task-1", Reason.OPERATOR, now=T0 + 2, initiator=OPS)
    assert [lease.reason for lease in changed] == [Reason.OPERATOR]
    task = table.get_task("task-1")
    assert (task.state, task.reason) == (TaskState.REVOKED, Reason.OPERATOR)
    with pytest.raises(TaskConflict, match="closed"):
        table.open_task("task-1", OWNER, now=T0 + 3, deadline=T0 + 500)
    assert table.revoke_task("task-1", Reason.OPERATOR, now=T0 + 4, initiator=OPS) == []


def test_revoke_subject_ends_only_that_subjects_leases() -> None:
    table = new_table()
    for lease_id, subject in (("a", OWNER), ("b", OTHER), ("c", OWNER)):
        table.grant(make_lease(lease_id, subject=subject), now=T0)
    changed = table.revoke_subject(OWNER, Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert ([lease.id for lease in changed], table.counts()["active"]) == (["a", "c"], 1)


def test_revoke_all_ends_every_active_lease_with_the_given_reason() -> None:
    table = new_table("task-1", "task-2")
    table.grant(make_lease("a", task_id="task-1"), now=T0)
    table.grant(make_lease("b", task_id="task-2"), now=T0)
    table.grant(make_lease("c", task_id="task-2", parent_id="b"), now=T0)
    changed = table.revoke_all(Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert {(lease.id, lease.reason) for lease in changed} == {
        ("a", Reason.OPERATOR),
        ("b", Reason.OPERATOR),
        ("c", Reason.OPERATOR),
    }
    assert table.counts() == {"active": 0, "tombstones": 3, "tasks": 2}


# -- tasks ----------------------------------------------------------------------------


def test_complete_task_revokes_its_leases_as_task_completed() -> None:
    table = new_table()
    table.grant(make_lease("a"), now=T0)
    table.grant(make_lease("b", parent_id="a"), now=T0)
    changed = table.complete_task("task-1", owner=OWNER, now=T0 + 5, initiator=OWNER)
    assert {(lease.id, lease.reason) for lease in changed} == {
        ("a", Reason.TASK_COMPLETED),
        ("b", Reason.TASK_COMPLETED),
    }


def test_complete_task_closes_the_task() -> None:
    table = new_table()
    table.complete_task("task-1", owner=OWNER, now=T0 + 5, initiator=OWNER)
    task = table.get_task("task-1")
    assert (task.state, task.reason, task.ended_at) == (TaskState.COMPLETED, Reason.TASK_COMPLETED, T0 + 5)


def test_complete_task_twice_returns_nothing_the_second_time() -> None:
    table = new_table()
    table.grant(make_lease("a"), now=T0)
    table.complete_task("task-1", owner=OWNER, now=T0 + 5, initiator=OWNER)
    assert table.complete_task("task-1", owner=OWNER, now=T0 + 6, initiator=OWNER) == []


def test_complete_task_by_another_owner_is_refused() -> None:
    table = new_table()
    table.grant(make_lease("a"), now=T0)
    with pytest.raises(TaskConflict, match="not your task"):
        table.complete_task("task-1", owner=OTHER, now=T0 + 5, initiator=OTHER)
    assert table.get("a").state is LeaseState.ACTIVE


def test_complete_of_an_unknown_task_is_lease_not_found() -> None:
    with pytest.raises(TaskNotFound, match="no such task"):
        new_table().complete_task("nope", owner=OWNER, now=T0, initiator=OWNER)


def test_task_deadline_expires_its_leases_as_task_expired() -> None:
    table = new_table(deadline=T0 + 100)
    table.grant(make_lease("a", expires_at=T0 + 200), now=T0)
    changed = table.expire_due(T0 + 100)
    assert [(lease.id, lease.state, lease.reason) for lease in changed] == [
        ("a", LeaseState.EXPIRED, Reason.TASK_EXPIRED)
    ]


def test_task_deadline_closes_the_task_and_frees_its_id() -> None:
    table = new_table(deadline=T0 + 100)
    closed: list[Event] = []
    table.subscribe(lambda event: closed.append(event) if isinstance(event, TaskClosed) else None)
    table.expire_due(T0 + 100)
    assert [event.task.state for event in closed] == [TaskState.EXPIRED]
    assert table.get_task("task-1") is None


def test_lease_capped_at_the_task_deadline_ends_as_expired_not_task_expired() -> None:
    table = new_table(deadline=T0 + 100)
    table.grant(make_lease("a", expires_at=T0 + 100), now=T0)
    assert [lease.reason for lease in table.expire_due(T0 + 100)] == [Reason.EXPIRED]


def test_closed_task_id_cannot_be_reopened_before_its_deadline() -> None:
    table = new_table(deadline=T0 + 100)
    table.complete_task("task-1", owner=OWNER, now=T0 + 5, initiator=OWNER)
    table.expire_due(T0 + 99)
    with pytest.raises(TaskConflict, match="task task-1 is closed"):
        table.open_task("task-1", OWNER, now=T0 + 99, deadline=T0 + 500)


def test_expired_task_is_remembered_for_the_grace_then_forgotten() -> None:
    table = LeaseTable(tombstone_grace=60)
    table.open_task("task-1", OWNER, now=T0, deadline=T0 + 100)
    table.expire_due(T0 + 100)
    assert table.get_task("task-1").state is TaskState.EXPIRED
    with pytest.raises(TaskConflict, match="task task-1 is closed"):
        table.open_task("task-1", OWNER, now=T0 + 159, deadline=T0 + 500)
    table.expire_due(T0 + 160)
    assert table.get_task("task-1") is None


def test_closed_task_id_can_be_reopened_after_its_deadline() -> None:
    table = new_table(deadline=T0 + 100)
    table.complete_task("task-1", owner=OWNER, now=T0 + 5, initiator=OWNER)
    table.expire_due(T0 + 100)
    task = table.open_task("task-1", OTHER, now=T0 + 100, deadline=T0 + 500)
    assert (task.owner, task.state) == (OTHER, TaskState.OPEN)


def test_open_task_by_another_owner_is_refused() -> None:
    table = new_table()
    with pytest.raises(TaskConflict, match="not your task"):
        table.open_task("task-1", OTHER, now=T0 + 1, deadline=T0 + 500)


def test_open_task_by_its_owner_returns_the_existing_task() -> None:
    table = new_table(deadline=T0 + 100)
    task = table.open_task("task-1", OWNER, now=T0 + 1, deadline=T0 + 999)
    assert (task.created_at, task.deadline) == (T0, T0 + 100)


def test_open_task_with_a_past_deadline_is_invalid() -> None:
    with pytest.raises(InvalidTransition):
        LeaseTable().open_task("task-1", OWNER, now=T0, deadline=T0)


# -- grant and renew preconditions ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class GrantCase:
    name: str
    lease: Lease
    error: type[BrokerError]


def _grant_cases() -> list[GrantCase]:
    return [
        GrantCase("unknown-task", make_lease("new", task_id="nope"), TaskConflict),
        GrantCase("closed-task", make_lease("new", task_id="done"), TaskConflict),
        GrantCase("duplicate-id", make_lease("parent"), InvalidTransition),
        GrantCase("expiry-not-in-future", make_lease("new", expires_at=T0 + 1), InvalidTransition),
        GrantCase("not-active", dataclasses.replace(make_lease("new"), state=LeaseState.REVOKED), InvalidTransition),
        GrantCase("unknown-parent", make_lease("new", parent_id="nope"), LeaseNotFound),
        GrantCase("revoked-parent", make_lease("new", parent_id="revoked"), LeaseInactive),
        GrantCase("outlives-parent", make_lease("new", expires_at=T0 + 301, parent_id="parent"), InvalidTransition),
    ]


@pytest.mark.parametrize("case", _grant_cases(), ids=lambda case: case.name)
def test_grant_refuses(case: GrantCase) -> None:
    table = new_table("task-1", "done")
    table.grant(make_lease("parent", expires_at=T0 + 300), now=T0)
    table.grant(make_lease("revoked", expires_at=T0 + 300), now=T0)
    table.revoke("revoked", Reason.OPERATOR, now=T0, initiator=OPS)
    table.complete_task("done", owner=OWNER, now=T0, initiator=OWNER)
    with pytest.raises(case.error):
        table.grant(case.lease, now=T0 + 1)
    assert table.get("new") is None


def test_grant_refuses_under_a_parent_past_expiry_not_yet_reaped() -> None:
    table = new_table()
    table.grant(make_lease("parent", expires_at=T0 + 10), now=T0)
    with pytest.raises(LeaseInactive):
        table.grant(make_lease("child", expires_at=T0 + 10, parent_id="parent"), now=T0 + 10)


def test_grant_records_the_child_under_its_parent() -> None:
    table = new_table()
    chain(table, 2)
    table.grant(make_lease("d1b", parent_id="d0"), now=T0)
    assert (table.children("d0"), table.children("d1")) == (("d1", "d1b"), ())


@dataclass(frozen=True, slots=True)
class RenewCase:
    name: str
    lease_id: str
    expires_at: float
    now: float
    error: type[BrokerError]


@pytest.mark.parametrize(
    "case",
    [
        RenewCase("unknown", "nope", T0 + 50, T0 + 1, LeaseNotFound),
        RenewCase("revoked", "revoked", T0 + 50, T0 + 1, LeaseInactive),
        RenewCase("past-expiry-not-reaped", "live", T0 + 500, T0 + 300, LeaseInactive),
        RenewCase("new-expiry-not-in-future", "live", T0 + 1, T0 + 1, InvalidTransition),
    ],
    ids=lambda case: case.name,
)
def test_renew_refuses(case: RenewCase) -> None:
    table = new_table()
    table.grant(make_lease("live", expires_at=T0 + 300), now=T0)
    table.grant(make_lease("revoked"), now=T0)
    table.revoke("revoked", Reason.OPERATOR, now=T0, initiator=OPS)
    with pytest.raises(case.error):
        table.renew(case.lease_id, expires_at=case.expires_at, token_exp=case.expires_at, now=case.now)
    assert table.get("live").expires_at == T0 + 300


# -- queries --------------------------------------------------------------------------


def test_list_orders_by_issued_at_then_id() -> None:
    table = new_table()
    for lease_id, issued_at in (("b", T0 + 2), ("c", T0 + 1), ("a", T0 + 2)):
        table.grant(make_lease(lease_id, issued_at=issued_at), now=T0 + 2)
    assert [lease.id for lease in table.list()] == ["c", "a", "b"]


def test_list_combines_task_subject_and_audience_filters() -> None:
    table = new_table("task-1", "task-2")
    rows = [
        ("hit", "task-1", OWNER, "repo"),
        ("other-task", "task-2", OWNER, "repo"),
        ("other-subject", "task-1", OTHER, "repo"),
        ("other-audience", "task-1", OWNER, "db"),
    ]
    for lease_id, task_id, subject, audience in rows:
        table.grant(make_lease(lease_id, task_id=task_id, subject=subject, audience=audience), now=T0)
    found = table.list(task_id="task-1", subject=OWNER, audience="repo")
    assert [lease.id for lease in found] == ["hit"]


def test_list_hides_ended_leases_unless_asked() -> None:
    table = new_table()
    table.grant(make_lease("a"), now=T0)
    table.grant(make_lease("b"), now=T0)
    table.revoke("a", Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert [lease.id for lease in table.list(audience="repo")] == ["b"]
    assert [lease.id for lease in table.list(audience="repo", include_inactive=True)] == ["a", "b"]


def test_list_with_an_unknown_filter_value_is_empty() -> None:
    table = new_table()
    table.grant(make_lease("a"), now=T0)
    assert table.list(subject="nobody", include_inactive=True) == []


def test_counts_active_tombstones_and_tasks() -> None:
    table = new_table("task-1", "task-2")
    for lease_id in ("a", "b", "c"):
        table.grant(make_lease(lease_id), now=T0)
    table.revoke("a", Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert table.counts() == {"active": 2, "tombstones": 1, "tasks": 2}


def test_lease_ended_equals_dataclasses_replace() -> None:
    lease = dataclasses.replace(
        make_lease("a", parent_id="p"),
        actor_chain=("x", "y"),
        depth=2,
        cnf_x5t="th",
        context={"auth": "x509-svid"},
        not_after=T0 + 50,
        backend="analytics",
        role="brk_0a",
    )
    expected = dataclasses.replace(
        lease, state=LeaseState.EXPIRED, ended_at=T0 + 9, reason=Reason.TASK_EXPIRED, initiator="broker"
    )
    assert lease.ended(Reason.TASK_EXPIRED, at=T0 + 9, initiator="broker") == expected
    assert len(dataclasses.fields(Lease)) == 22, "a field was added: pass it on in Lease.ended too"


# -- events and subscribers -----------------------------------------------------------


def test_subscribers_receive_every_event_in_order() -> None:
    table = LeaseTable()
    seen: list[tuple[str, str]] = []
    table.subscribe(lambda event: seen.append(("first", type(event).__name__)))
    table.subscribe(lambda event: seen.append(("second", type(event).__name__)))
    table.open_task("task-1", OWNER, now=T0, deadline=T0 + 100)
    table.grant(make_lease("a", expires_at=T0 + 50), now=T0)
    table.renew("a", expires_at=T0 + 60, token_exp=T0 + 60, now=T0 + 1)
    table.complete_task("task-1", owner=OWNER, now=T0 + 2, initiator=OWNER)
    kinds = ["TaskOpened", "LeaseGranted", "LeaseRenewed", "LeaseEnded", "TaskClosed"]
    assert seen == [(who, kind) for kind in kinds for who in ("first", "second")]


def test_failing_subscriber_does_not_stop_the_table_or_other_subscribers(caplog: pytest.LogCaptureFixture) -> None:
    table = new_table()
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    table.subscribe(broken)
    table.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="broker.leases.table"):
        table.grant(make_lease("a"), now=T0)
    assert table.get("a") is not None and [type(event) for event in seen] == [LeaseGranted]
    assert [(r.message, r.exc_info is not None) for r in caplog.records] == [("lease event subscriber failed", True)]


def test_unsubscribed_function_receives_nothing_more() -> None:
    table = LeaseTable()
    seen: list[Event] = []
    unsubscribe = table.subscribe(seen.append)
    table.open_task("task-1", OWNER, now=T0, deadline=T0 + 100)
    unsubscribe()
    table.open_task("task-2", OWNER, now=T0, deadline=T0 + 100)
    assert [event.task.id for event in seen if isinstance(event, TaskOpened)] == ["task-1"]


def test_revoke_publishes_one_lease_ended_per_changed_lease() -> None:
    table = new_table()
    chain(table, 3)
    ended: list[str] = []
    table.subscribe(lambda event: ended.append(event.lease.id) if isinstance(event, LeaseEnded) else None)
    table.revoke("d0", Reason.OPERATOR, now=T0 + 1, initiator=OPS)
    assert ended == ["d0", "d1", "d2"]


def test_apply_refuses_something_that_is_not_an_event() -> None:
    with pytest.raises(TypeError):
        LeaseTable().apply("not an event")  # type: ignore[arg-type]


def _scenario(table: LeaseTable) -> float:
    """Grants, delegation, renewals, a cascade, a completion and expiries; returns the last time."""
    table.open_task("t1", OWNER, now=T0, deadline=T0 + 1_000)
    table.open_task("t2", OTHER, now=T0, deadline=T0 + 200)
    table.grant(make_lease("p", task_id="t1", expires_at=T0 + 300), now=T0)
    table.grant(make_lease("c1", task_id="t1", expires_at=T0 + 300, parent_id="p"), now=T0 + 1)
    table.grant(make_lease("g1", task_id="t1", expires_at=T0 + 250, parent_id="c1"), now=T0 + 2)
    table.grant(make_lease("q", task_id="t1", expires_at=T0 + 100, token_exp=T0 + 900), now=T0 + 3)
    table.grant(make_lease("x", task_id="t2", subject=OTHER, expires_at=T0 + 500), now=T0 + 4)
    table.grant(make_lease("y", task_id="t2", subject=OTHER, expires_at=T0 + 150), now=T0 + 4)
    table.renew("q", expires_at=T0 + 400, token_exp=T0 + 400, now=T0 + 50)
    table.renew("p", expires_at=T0 + 600, token_exp=T0 + 600, now=T0 + 60)
    table.revoke("c1", Reason.OPERATOR, now=T0 + 70, initiator=OPS)
    table.expire_due(T0 + 150)
    table.expire_due(T0 + 250)
    table.grant(make_lease("r", task_id="t1", expires_at=T0 + 700), now=T0 + 260)
    table.complete_task("t1", owner=OWNER, now=T0 + 300, initiator=OWNER)
    table.expire_due(T0 + 450)
    return T0 + 450


def _snapshot(table: LeaseTable) -> tuple[object, ...]:
    leases = table.list(include_inactive=True)
    tasks = [table.get_task(task_id) for task_id in ("t1", "t2")]
    return leases, tasks, {lease.id: table.children(lease.id) for lease in leases}, table.counts()


def test_replaying_the_events_of_a_table_yields_an_equal_table() -> None:
    original = LeaseTable()
    events: list[Event] = []
    original.subscribe(events.append)
    last = _scenario(original)
    replica = LeaseTable()
    for event in events:
        replica.apply(event)
    assert replica.expire_due(last) == []
    assert _snapshot(replica) == _snapshot(original)
    assert {type(event) for event in events} == {TaskOpened, LeaseGranted, LeaseRenewed, LeaseEnded, TaskClosed}


# -- scale and memory -----------------------------------------------------------------


def test_hundred_thousand_leases_are_granted_and_expired() -> None:
    n = 100_000
    table = new_table(deadline=T0 + 10_000)
    for i in range(n):
        expires_at = T0 + 1 + i % 997
        table.grant(Lease(f"l{i:06d}", "task-1", OWNER, OWNER, "repo", (), "r", T0, expires_at, expires_at), now=T0)
    ended = table.expire_due(T0 + 1_000)
    assert len(ended) == n and table.counts() == {"active": 0, "tombstones": 0, "tasks": 1}
    assert [lease.expires_at for lease in ended] == sorted(lease.expires_at for lease in ended)


def test_memory_is_bounded_after_churn() -> None:
    table = LeaseTable()
    now = T0
    for round_ in range(50):
        task_id = f"task-{round_}"
        table.open_task(task_id, OWNER, now=now, deadline=now + 120)
        ids = [f"{task_id}-l{i}" for i in range(40)]
        for i, lease_id in enumerate(ids):
            parent = ids[i - 1] if i % 4 else None
            table.grant(
                make_lease(
                    lease_id, task_id=task_id, issued_at=now, expires_at=now + 60, token_exp=now + 90, parent_id=parent
                ),
                now=now,
            )
        table.renew(ids[1], expires_at=now + 50, token_exp=now + 100, now=now + 1)
        table.revoke(ids[4], Reason.OPERATOR, now=now + 2, initiator=OPS)
        if round_ % 2:
            table.complete_task(task_id, owner=OWNER, now=now + 3, initiator=OWNER)
        now += 30
        table.expire_due(now)
    table.expire_due(now + 1_000)
    assert table.footprint() == {"leases": 0, "tasks": 0, "heap": 0, "index_keys": 0, "index_entries": 0}


def test_expire_due_with_a_limit_handles_at_most_that_many_entries() -> None:
    table = new_table()
    for i in range(5):
        table.grant(make_lease(f"l{i}", expires_at=T0 + 10), now=T0)
    first = table.expire_due(T0 + 10, limit=2)
    assert len(first) == 2 and table.has_due(T0 + 10)
    rest = table.expire_due(T0 + 10)
    assert len(rest) == 3 and not table.has_due(T0 + 10)


def test_tasks_are_counted_per_owner_until_purged() -> None:
    table = LeaseTable(tombstone_grace=10)
    table.open_task("a", OWNER, now=T0, deadline=T0 + 100)
    table.open_task("b", OWNER, now=T0, deadline=T0 + 200)
    table.open_task("c", OTHER, now=T0, deadline=T0 + 100)
    assert (table.tasks_of(OWNER), table.tasks_of(OTHER)) == (2, 1)
    table.complete_task("b", owner=OWNER, now=T0 + 1, initiator=OWNER)
    assert table.tasks_of(OWNER) == 2  # a completed task is remembered until its deadline
    table.expire_due(T0 + 110)
    assert (table.tasks_of(OWNER), table.tasks_of(OTHER)) == (1, 0)
    table.expire_due(T0 + 210)
    assert table.tasks_of(OWNER) == 0 and table.footprint()["index_keys"] == 0
