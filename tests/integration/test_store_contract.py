"""One contract for every lease store: the memory store and the PostgreSQL store behave alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from broker.domain.errors import TaskConflict
from broker.jose.keys import SigningKey
from broker.leases.events import Event, Lease, LeaseEnded, LeaseGranted, LeaseState, Reason, TaskOpened
from broker.leases.table import LeaseTable
from broker.store.base import LeaseStore, MemoryStore
from broker.store.postgres import PostgresStore
from broker.testing.clock import FakeClock
from broker.tokens.minter import TokenMinter

T0 = 1_750_000_000.0
OWNER = "spiffe://example.org/agent/a"
OTHER = "spiffe://example.org/agent/b"


def lease(lease_id: str, *, task_id: str = "t1", ttl: float = 60, parent_id: str | None = None) -> Lease:
    return Lease(
        id=lease_id,
        task_id=task_id,
        subject=OWNER,
        client_id=OWNER,
        audience="spiffe://example.org/service/repo",
        scope=("repo:read",),
        resource="repo:org/app",
        issued_at=T0,
        expires_at=T0 + ttl,
        token_exp=T0 + ttl,
        parent_id=parent_id,
        context={"request": {"ticket": "T-1"}, "claims": {"n": 1.5}},
    )




def make_store(backend: str, dsn: str, clock: FakeClock, replica: str = "r1") -> LeaseStore:
    table = LeaseTable(tombstone_grace=30)
    minter = TokenMinter("spiffe://example.org/broker", SigningKey.generate())
    if backend == "memory":
        return MemoryStore(table, minter=minter)
    return PostgresStore(
        table, dsn=dsn, replica_id=replica, minter=minter, clock=clock, key_lifetime=3700, event_retention=40000
    )


@pytest.fixture(params=["memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def dsn(backend: str, request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_dsn") if backend == "postgres" else ""


def run(backend: str, dsn: str, scenario: Callable[[LeaseStore, FakeClock], object]) -> object:
    async def main() -> object:
        clock = FakeClock(start=T0)
        store = make_store(backend, dsn, clock)
        await store.start()
        try:
            return await scenario(store, clock)  # type: ignore[misc]
        finally:
            await store.close()

    return asyncio.run(main())


async def _open_and_grant(store: LeaseStore, *ids: str) -> None:
    def plan(batch):  # task open plus grants: one atomic batch
        batch.open_task("t1", OWNER, now=T0, deadline=T0 + 600)
        for lease_id in ids:
            batch.grant(lease(lease_id), now=T0)

    await store.execute(plan)


def test_a_batch_is_applied_whole_and_told_once_per_event(backend: str, dsn: str) -> None:
    async def scenario(store: LeaseStore, clock: FakeClock) -> tuple[list[type], int]:
        told: list[Event] = []
        store.on_committed(told.append)
        start = store.table.seq
        await _open_and_grant(store, "a", "b")
        return [type(e) for e in told], store.table.seq - start

    kinds, advanced = run(backend, dsn, scenario)
    assert kinds == [TaskOpened, LeaseGranted, LeaseGranted]
    assert advanced >= 3


def test_a_plan_that_raises_appends_nothing(backend: str, dsn: str) -> None:
    async def scenario(store: LeaseStore, clock: FakeClock) -> tuple[object, int, int]:
        await _open_and_grant(store, "a")
        seq = store.table.seq

        def plan(batch):
            batch.revoke("a", Reason.OPERATOR, now=T0, initiator="op")
            batch.open_task("t1", OTHER, now=T0, deadline=T0 + 600)  # refused: not theirs

        with pytest.raises(TaskConflict):
            await store.execute(plan)
        await store.sync()
        return store.table.get("a").state, seq, store.table.seq

    state, before, after = run(backend, dsn, scenario)
    assert state is LeaseState.ACTIVE and before == after


def test_a_cascade_ends_parent_then_child(backend: str, dsn: str) -> None:
    async def scenario(store: LeaseStore, clock: FakeClock) -> list[tuple[str, Reason]]:
        await _open_and_grant(store, "p")
        await store.execute(lambda b: b.grant(lease("c", ttl=30, parent_id="p"), now=T0))
        ended = await store.execute(lambda b: b.revoke("p", Reason.OPERATOR, now=T0 + 1, initiator="op"))
        return [(x.id, x.reason) for x in ended]

    assert run(backend, dsn, scenario) == [("p", Reason.OPERATOR), ("c", Reason.PARENT_REVOKED)]


def test_expiry_ends_what_is_due_once(backend: str, dsn: str) -> None:
    async def scenario(store: LeaseStore, clock: FakeClock) -> tuple[list[str], list[str], int]:
        ends: list[str] = []
        store.on_committed(lambda e: ends.append(e.lease.id) if isinstance(e, LeaseEnded) else None)
        await _open_and_grant(store, "a")
        first = await store.expire(T0 + 61, limit=100)
        second = await store.expire(T0 + 61, limit=100)
        return [x.id for x in first], [x.id for x in second], len(ends)

    first, second, told = run(backend, dsn, scenario)
    assert (first, second, told) == (["a"], [], 1)


def test_lease_context_survives_the_store(backend: str, dsn: str) -> None:
    async def scenario(store: LeaseStore, clock: FakeClock) -> Lease:
        await _open_and_grant(store, "a")
        return store.table.get("a")

    assert dict(run(backend, dsn, scenario).context) == {"request": {"ticket": "T-1"}, "claims": {"n": 1.5}}
