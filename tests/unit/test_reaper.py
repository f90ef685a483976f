"""Reaper.run: the expiry loop, driven by a fake clock and the event loop, never by sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from broker.approvals.store import Approval, ApprovalState, ApprovalStore
from broker.jose.keys import SigningKey
from broker.leases.table import Lease, LeaseState, LeaseTable, Reason, TaskState
from broker.store.base import MemoryStore
from broker.testing.clock import FakeClock
from broker.tokens.minter import TokenMinter
from broker.usecases.reaper import HOUSEKEEPING_SECONDS, Reaper

T0 = 1_750_000_000.0
OWNER = "spiffe://example.org/agent/a"
OPS = "spiffe://example.org/operator/ops"
ISSUER = "spiffe://example.org/broker"
GRACE = 300.0  # ended leases stay readable well past every advance below


@dataclass
class Loop:
    """A reaper over a fresh table and approval store, running as a task on the current loop."""

    clock: FakeClock
    leases: LeaseTable
    approvals: ApprovalStore
    minter: TokenMinter
    reaper: Reaper
    store: MemoryStore
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.reaper.run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await settle()

    def lease(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        assert lease is not None
        return lease


async def settle(turns: int = 20) -> None:
    """Let every ready callback run: the reaper needs a few loop turns to wake and do a pass."""
    for _ in range(turns):
        await asyncio.sleep(0)


def _loop(*, task_deadline: float = T0 + 3600) -> Loop:
    clock = FakeClock(start=T0)
    leases = LeaseTable(tombstone_grace=GRACE)
    leases.open_task("task-1", OWNER, now=T0, deadline=task_deadline)
    minter = TokenMinter(ISSUER, SigningKey.generate())
    store = MemoryStore(leases, minter=minter)
    reaper = Reaper(store=store, minter=minter, clock=clock)
    return Loop(clock, leases, leases.approvals, minter, reaper, store)


def _grant(loop: Loop, lease_id: str, ttl: float, *, parent_id: str | None = None) -> Lease:
    now = loop.clock.now()
    lease = Lease(
        id=lease_id,
        task_id="task-1",
        subject=OWNER,
        client_id=OWNER,
        audience="repo",
        scope=("repo:read",),
        resource="repo:org/app",
        issued_at=now,
        expires_at=now + ttl,
        token_exp=now + ttl,
        parent_id=parent_id,
    )
    return loop.leases.grant(lease, now=now)


def _approval(approval_id: str, *, expires_at: float) -> Approval:
    return Approval(
        id=approval_id,
        principal=OWNER,
        client_id=OWNER,
        task_id="task-1",
        audience="repo",
        actions=("deploy",),
        resource="service:app",
        ttl_seconds=60,
        requested_at=T0,
        expires_at=expires_at,
    )


def _run(scenario: Callable[[Loop], Awaitable[None]], **kw: float) -> Loop:
    """Run `scenario` with a started reaper, then stop the reaper."""

    async def main() -> Loop:
        loop = _loop(**kw)
        loop.start()
        await settle()
        try:
            await scenario(loop)
        finally:
            await loop.stop()
        return loop

    return asyncio.run(main())


def test_lease_is_active_until_the_clock_reaches_its_expiry() -> None:
    async def scenario(loop: Loop) -> None:
        _grant(loop, "a", 60)
        await settle()
        await loop.advance(59)
        assert loop.lease("a").state is LeaseState.ACTIVE

    _run(scenario)


def test_lease_expires_when_the_clock_passes_its_expiry() -> None:
    async def scenario(loop: Loop) -> None:
        _grant(loop, "a", 60)
        await settle()
        await loop.advance(61)
        lease = loop.lease("a")
        assert (lease.state, lease.reason, lease.ended_at) == (LeaseState.EXPIRED, Reason.EXPIRED, T0 + 60)

    _run(scenario)


def test_leases_expire_one_after_another_as_time_passes() -> None:
    async def scenario(loop: Loop) -> None:
        for lease_id, ttl in (("a", 10), ("b", 20), ("c", 30)):
            _grant(loop, lease_id, ttl)
        await settle()
        states = []
        for _ in range(3):
            await loop.advance(10)
            states.append([loop.lease(i).state is LeaseState.EXPIRED for i in "abc"])
        assert states == [[True, False, False], [True, True, False], [True, True, True]]

    _run(scenario)


def test_earlier_deadline_added_while_sleeping_wakes_the_loop() -> None:
    async def scenario(loop: Loop) -> None:
        _grant(loop, "late", 600)
        await settle()  # the reaper now sleeps towards its housekeeping time
        _grant(loop, "early", 10)
        await settle()
        await loop.advance(11)  # before the housekeeping time: only a poke can have re-armed it
        assert loop.lease("early").state is LeaseState.EXPIRED
        assert loop.lease("late").state is LeaseState.ACTIVE

    assert HOUSEKEEPING_SECONDS > 11
    _run(scenario)


def test_poke_with_an_earlier_deadline_runs_a_pass_now() -> None:
    async def scenario(loop: Loop) -> None:
        # A key rotation publishes no event, so the reaper sleeps on towards its housekeeping time.
        old = loop.minter.current_kid
        loop.minter.rotate(keep_previous_until=T0 + 5)
        await loop.advance(6)
        assert old in _kids(loop)
        loop.reaper.poke(T0 + 6)
        await settle()
        assert old not in _kids(loop)

    assert HOUSEKEEPING_SECONDS > 6
    _run(scenario)


def test_poke_with_a_later_deadline_does_not_wake_the_loop() -> None:
    async def scenario(loop: Loop) -> None:
        old = loop.minter.current_kid
        loop.minter.rotate(keep_previous_until=T0 + 5)
        await loop.advance(6)
        loop.reaper.poke(T0 + HOUSEKEEPING_SECONDS + 60)
        await settle()
        assert old in _kids(loop)

    _run(scenario)


def test_renewed_lease_outlives_its_first_expiry() -> None:
    async def scenario(loop: Loop) -> None:
        _grant(loop, "a", 10)
        await settle()
        loop.leases.renew("a", expires_at=T0 + 100, token_exp=T0 + 100, now=T0)
        await settle()
        await loop.advance(50)
        assert loop.lease("a").state is LeaseState.ACTIVE
        await loop.advance(51)
        assert loop.lease("a").state is LeaseState.EXPIRED

    _run(scenario)


def test_expiry_cascades_to_delegated_leases() -> None:
    async def scenario(loop: Loop) -> None:
        _grant(loop, "a", 30)
        _grant(loop, "b", 30, parent_id="a")
        loop.leases.renew("a", expires_at=T0 + 10, token_exp=T0 + 10, now=T0)
        await settle()
        await loop.advance(11)
        assert [loop.lease(i).reason for i in "ab"] == [Reason.EXPIRED, Reason.PARENT_REVOKED]

    _run(scenario)


def test_task_deadline_expires_the_task_and_its_leases() -> None:
    async def scenario(loop: Loop) -> None:
        _grant(loop, "a", 300)
        await settle()
        await loop.advance(120)
        task = loop.leases.get_task("task-1")
        assert task is not None
        assert task.state is TaskState.EXPIRED
        assert loop.lease("a").reason is Reason.TASK_EXPIRED

    _run(scenario, task_deadline=T0 + 100)


def test_approval_expires_at_its_deadline() -> None:
    async def scenario(loop: Loop) -> None:
        loop.store.run(lambda b: b.request_approval(_approval("apr_1", expires_at=T0 + 20), now=T0, max_pending=9))
        await settle()
        await loop.advance(19)
        assert loop.approvals.get("apr_1").state is ApprovalState.PENDING  # type: ignore[union-attr]
        await loop.advance(2)
        assert loop.approvals.get("apr_1").state is ApprovalState.EXPIRED  # type: ignore[union-attr]

    _run(scenario)


def test_decided_approval_is_not_expired() -> None:
    async def scenario(loop: Loop) -> None:
        loop.store.run(lambda b: b.request_approval(_approval("apr_1", expires_at=T0 + 20), now=T0, max_pending=9))
        loop.store.run(lambda b: b.decide_approval("apr_1", approve=False, by=OPS, note="no", now=T0))
        await settle()
        await loop.advance(21)
        assert loop.approvals.get("apr_1").state is ApprovalState.DENIED  # type: ignore[union-attr]

    _run(scenario)


def test_housekeeping_drops_retired_signing_keys_without_a_poke() -> None:
    async def scenario(loop: Loop) -> None:
        old = loop.minter.current_kid
        loop.minter.rotate(keep_previous_until=T0 + 5)
        await loop.advance(6)
        assert old in _kids(loop)  # nothing woke the reaper yet
        await loop.advance(HOUSEKEEPING_SECONDS)
        assert old not in _kids(loop)

    _run(scenario)


def _kids(loop: Loop) -> set[str]:
    return {key["kid"] for key in loop.minter.jwks()["keys"]}


def test_cancellation_stops_the_loop_cleanly() -> None:
    async def main() -> tuple[bool, set[asyncio.Task], LeaseState]:
        loop = _loop()
        loop.start()
        await settle()
        await loop.stop()
        assert loop.task is not None
        left = asyncio.all_tasks() - {asyncio.current_task()}
        _grant(loop, "a", 5)  # a stopped reaper no longer expires anything
        loop.clock.advance(10)
        await settle()
        return loop.task.cancelled(), left, loop.lease("a").state

    cancelled, left, state = asyncio.run(main())
    assert cancelled is True
    assert left == set()
    assert state is LeaseState.ACTIVE


def test_one_pass_expires_what_is_due_and_counts_it() -> None:
    loop = _loop()
    _grant(loop, "a", 10)
    _grant(loop, "b", 20)
    loop.clock.advance(15)
    assert asyncio.run(loop.reaper.expire()) == 1
    assert [loop.lease(i).state for i in "ab"] == [LeaseState.EXPIRED, LeaseState.ACTIVE]


def test_an_unreachable_store_is_retried_with_backoff_not_in_a_spin() -> None:
    from broker.domain.errors import StoreUnavailable

    class DownStore(MemoryStore):
        passes = 0

        async def expire(self, now: float, *, limit: int) -> list[Lease]:
            DownStore.passes += 1
            raise StoreUnavailable("lease store unavailable: try again")

    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 6:
            raise asyncio.CancelledError

    async def main() -> None:
        clock = FakeClock(start=T0)
        leases = LeaseTable(tombstone_grace=GRACE)
        minter = TokenMinter(ISSUER, SigningKey.generate())
        reaper = Reaper(store=DownStore(leases, minter=minter), minter=minter, clock=clock)
        with pytest.raises(asyncio.CancelledError):
            await reaper.run(pause=pause)

    asyncio.run(main())
    assert pauses == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert DownStore.passes == 6
