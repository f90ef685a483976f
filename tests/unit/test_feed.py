"""RevocationFeed: ended leases fanned out to watchers, filtered by audience, bounded per watcher."""

from __future__ import annotations

import asyncio

import pytest

from broker.domain.errors import QuotaExceeded, WatcherTooSlow
from broker.leases.feed import RevocationFeed, Subscription
from broker.leases.table import Lease, LeaseState, LeaseTable, Reason

T0 = 1_750_000_000.0
OWNER = "spiffe://example.org/agent/a"
OPS = "spiffe://example.org/operator/ops"
REPO = "spiffe://example.org/service/repo"
CI = "spiffe://example.org/service/ci"


def _table() -> LeaseTable:
    table = LeaseTable()
    table.open_task("task-1", OWNER, now=T0, deadline=T0 + 3600)
    return table


def _grant(table: LeaseTable, lease_id: str, *, audience: str = REPO, parent_id: str | None = None) -> Lease:
    lease = Lease(
        id=lease_id,
        task_id="task-1",
        subject=OWNER,
        client_id=OWNER,
        audience=audience,
        scope=("repo:read",),
        resource="repo:org/app",
        issued_at=T0,
        expires_at=T0 + 300,
        token_exp=T0 + 300,
        parent_id=parent_id,
    )
    return table.grant(lease, now=T0)


def _revoke(table: LeaseTable, lease_id: str) -> None:
    table.revoke(lease_id, Reason.OPERATOR, now=T0 + 1, initiator=OPS)


def _drain(sub: Subscription) -> list[Lease]:
    leases = []
    while not sub.queue.empty():
        leases.append(sub.queue.get_nowait())
    return leases


def test_grant_renew_and_task_events_are_not_delivered() -> None:
    async def scenario() -> list[Lease]:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        table.renew("a", expires_at=T0 + 600, token_exp=T0 + 600, now=T0 + 1)
        table.open_task("task-2", OWNER, now=T0, deadline=T0 + 60)
        return _drain(sub)

    assert asyncio.run(scenario()) == []


def test_revocation_is_delivered_as_the_ended_lease() -> None:
    async def scenario() -> Lease:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        _revoke(table, "a")
        return await feed.next(sub)

    lease = asyncio.run(scenario())
    assert (lease.id, lease.state, lease.reason, lease.initiator) == ("a", LeaseState.REVOKED, Reason.OPERATOR, OPS)


def test_expiry_is_delivered() -> None:
    async def scenario() -> Lease:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        table.expire_due(T0 + 300)
        return await feed.next(sub)

    lease = asyncio.run(scenario())
    assert (lease.id, lease.state, lease.reason) == ("a", LeaseState.EXPIRED, Reason.EXPIRED)


def test_cascade_is_delivered_parent_first() -> None:
    async def scenario() -> list[Lease]:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        _grant(table, "b", parent_id="a")
        _revoke(table, "a")
        return [await feed.next(sub), await feed.next(sub)]

    leases = asyncio.run(scenario())
    assert [(lease.id, lease.reason) for lease in leases] == [("a", Reason.OPERATOR), ("b", Reason.PARENT_REVOKED)]


def test_next_waits_for_the_next_revocation() -> None:
    async def scenario() -> str:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        waiter = asyncio.create_task(feed.next(sub))
        await asyncio.sleep(0)
        assert not waiter.done()
        _revoke(table, "a")
        return (await waiter).id

    assert asyncio.run(scenario()) == "a"


def test_audience_filter_delivers_only_that_audience() -> None:
    async def scenario() -> list[Lease]:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(REPO)
        _grant(table, "a", audience=REPO)
        _grant(table, "b", audience=CI)
        _grant(table, "c", audience=REPO)
        for lease_id in ("a", "b", "c"):
            _revoke(table, lease_id)
        return _drain(sub)

    assert [lease.id for lease in asyncio.run(scenario())] == ["a", "c"]


def test_admin_watcher_without_filter_sees_every_audience() -> None:
    async def scenario() -> list[Lease]:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a", audience=REPO)
        _grant(table, "b", audience=CI)
        _revoke(table, "a")
        _revoke(table, "b")
        return _drain(sub)

    assert [lease.id for lease in asyncio.run(scenario())] == ["a", "b"]


def test_each_watcher_gets_its_own_copy() -> None:
    async def scenario() -> tuple[list[Lease], list[Lease]]:
        table = _table()
        feed = RevocationFeed(table)
        first, second = feed.subscribe(None), feed.subscribe(REPO)
        _grant(table, "a")
        _revoke(table, "a")
        return _drain(first), _drain(second)

    first, second = asyncio.run(scenario())
    assert [lease.id for lease in first] == [lease.id for lease in second] == ["a"]


def test_overflowing_watcher_drains_its_buffer_then_is_rate_limited() -> None:
    async def scenario() -> tuple[list[str], RevocationFeed, Subscription]:
        table = _table()
        feed = RevocationFeed(table, buffer=2)
        sub = feed.subscribe(None)
        for lease_id in ("a", "b", "c"):
            _grant(table, lease_id)
            _revoke(table, lease_id)
        drained = [(await feed.next(sub)).id, (await feed.next(sub)).id]
        with pytest.raises(WatcherTooSlow, match="fell more than 2 events behind"):
            await feed.next(sub)
        return drained, feed, sub

    drained, feed, sub = asyncio.run(scenario())
    assert drained == ["a", "b"]
    assert sub.overflowed is True
    assert len(feed) == 0


def test_overflowed_watcher_gets_nothing_more() -> None:
    async def scenario() -> list[str]:
        table = _table()
        feed = RevocationFeed(table, buffer=1)
        sub = feed.subscribe(None)
        for lease_id in ("a", "b", "c"):
            _grant(table, lease_id)
            _revoke(table, lease_id)
        return [lease.id for lease in _drain(sub)]

    assert asyncio.run(scenario()) == ["a"]


def test_overflow_of_one_watcher_does_not_cut_off_another() -> None:
    async def scenario() -> list[str]:
        table = _table()
        feed = RevocationFeed(table, buffer=2)
        slow, other = feed.subscribe(None), feed.subscribe(REPO)
        for lease_id in ("a", "b", "c"):
            _grant(table, lease_id)
            _revoke(table, lease_id)
            _drain(other)
        _grant(table, "d")
        _revoke(table, "d")
        assert slow.overflowed
        return [(await feed.next(other)).id]

    assert asyncio.run(scenario()) == ["d"]


def test_unsubscribe_stops_delivery() -> None:
    async def scenario() -> tuple[list[Lease], int]:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        feed.unsubscribe(sub)
        _revoke(table, "a")
        return _drain(sub), len(feed)

    delivered, watchers = asyncio.run(scenario())
    assert delivered == []
    assert watchers == 0


def test_unsubscribe_twice_is_harmless() -> None:
    async def scenario() -> int:
        feed = RevocationFeed(_table())
        sub = feed.subscribe(None)
        feed.unsubscribe(sub)
        feed.unsubscribe(sub)
        return len(feed)

    assert asyncio.run(scenario()) == 0


def test_a_watcher_may_hold_only_a_bounded_number_of_streams() -> None:
    from broker.leases.feed import MAX_STREAMS_PER_WATCHER, RevocationFeed
    from broker.leases.table import LeaseTable

    async def scenario() -> None:
        feed = RevocationFeed(LeaseTable())
        subs = [feed.subscribe(None, watcher="w") for _ in range(MAX_STREAMS_PER_WATCHER)]
        with pytest.raises(QuotaExceeded, match="revocation streams"):
            feed.subscribe(None, watcher="w")
        feed.subscribe(None, watcher="other")
        feed.unsubscribe(subs[0])
        feed.subscribe(None, watcher="w")

    asyncio.run(scenario())
