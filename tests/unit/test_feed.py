"""RevocationFeed: ended leases fanned out to watchers, filtered by audience, bounded per watcher."""

from __future__ import annotations

import asyncio

import pytest

from broker.domain.errors import CursorTooOld, InvalidRequest, QuotaExceeded, WatcherTooSlow
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


def _drain(feed: RevocationFeed, sub: Subscription) -> list[Lease]:
    """Everything `sub` can read now without waiting."""
    leases = []
    while True:
        found = feed._pending(sub)
        if found is None:
            return leases
        sub.position = found[0]
        leases.append(found[1])


def test_grant_renew_and_task_events_are_not_delivered() -> None:
    async def scenario() -> list[Lease]:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        table.renew("a", expires_at=T0 + 600, token_exp=T0 + 600, now=T0 + 1)
        table.open_task("task-2", OWNER, now=T0, deadline=T0 + 60)
        return _drain(feed, sub)

    assert asyncio.run(scenario()) == []


def test_revocation_is_delivered_as_the_ended_lease() -> None:
    async def scenario() -> Lease:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        _revoke(table, "a")
        return (await feed.next(sub))[1]

    lease = asyncio.run(scenario())
    assert (lease.id, lease.state, lease.reason, lease.initiator) == ("a", LeaseState.REVOKED, Reason.OPERATOR, OPS)


def test_expiry_is_delivered() -> None:
    async def scenario() -> Lease:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        table.expire_due(T0 + 300)
        return (await feed.next(sub))[1]

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
        return [(await feed.next(sub))[1], (await feed.next(sub))[1]]

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
        return (await waiter)[1].id

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
        return _drain(feed, sub)

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
        return _drain(feed, sub)

    assert [lease.id for lease in asyncio.run(scenario())] == ["a", "b"]


def test_each_watcher_gets_its_own_copy() -> None:
    async def scenario() -> tuple[list[Lease], list[Lease]]:
        table = _table()
        feed = RevocationFeed(table)
        first, second = feed.subscribe(None), feed.subscribe(REPO)
        _grant(table, "a")
        _revoke(table, "a")
        return _drain(feed, first), _drain(feed, second)

    first, second = asyncio.run(scenario())
    assert [lease.id for lease in first] == [lease.id for lease in second] == ["a"]


def test_a_burst_larger_than_any_buffer_reaches_a_reading_watcher_whole() -> None:
    async def scenario() -> list[str]:
        table = _table()
        feed = RevocationFeed(table, window=2000)
        sub = feed.subscribe(None)
        for i in range(1100):
            _grant(table, f"l{i:04}")
        table.revoke_task("task-1", Reason.OPERATOR, now=T0 + 1, initiator=OPS)  # 1,100 events at once
        return [(await feed.next(sub))[1].id for _ in range(1100)]

    assert asyncio.run(scenario()) == [f"l{i:04}" for i in range(1100)]


def test_a_watcher_that_stops_reading_is_cut_off_once_its_events_leave_the_window() -> None:
    async def scenario() -> tuple[list[str], int]:
        table = _table()
        feed = RevocationFeed(table, window=2)
        slow = feed.subscribe(None)
        for lease_id in ("a", "b", "c"):
            _grant(table, lease_id)
            _revoke(table, lease_id)
        with pytest.raises(WatcherTooSlow, match="fell more than 2 events behind"):
            await feed.next(slow)
        return [lease.id for lease in _drain(feed, feed.subscribe(None, resume_after=feed.floor))], len(feed)

    resumed, watchers = asyncio.run(scenario())
    assert resumed == ["b", "c"]
    assert watchers == 1  # the slow one is gone


def test_a_watcher_that_keeps_up_is_never_cut_off_by_a_small_window() -> None:
    async def scenario() -> list[str]:
        table = _table()
        feed = RevocationFeed(table, window=1)
        sub = feed.subscribe(None)
        got = []
        for lease_id in ("a", "b", "c", "d"):
            _grant(table, lease_id)
            _revoke(table, lease_id)
            got.append((await feed.next(sub))[1].id)
        return got

    assert asyncio.run(scenario()) == ["a", "b", "c", "d"]


def test_an_idle_filtered_watcher_is_not_cut_off_by_other_audiences_traffic() -> None:
    async def scenario() -> str:
        table = _table()
        feed = RevocationFeed(table, window=2)
        sub = feed.subscribe(REPO)
        waiter = asyncio.create_task(feed.next(sub))
        for i in range(5):
            _grant(table, f"ci{i}", audience=CI)
            _revoke(table, f"ci{i}")
            await asyncio.sleep(0)
        _grant(table, "mine", audience=REPO)
        _revoke(table, "mine")
        return (await waiter)[1].id

    assert asyncio.run(scenario()) == "mine"


def test_resume_after_a_cursor_gets_exactly_the_events_after_it_once() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        table = _table()
        feed = RevocationFeed(table)
        first = feed.subscribe(None)
        for lease_id in ("a", "b", "c"):
            _grant(table, lease_id)
        _revoke(table, "a")
        seq, _ = await feed.next(first)
        cursor = feed.cursor(seq)
        feed.unsubscribe(first)
        _revoke(table, "b")
        _revoke(table, "c")
        resumed = feed.subscribe(None, resume_after=feed.parse_cursor(cursor))
        again = feed.subscribe(None, resume_after=feed.parse_cursor(cursor))
        return _drain(feed, resumed), _drain(feed, again)

    resumed, again = asyncio.run(scenario())
    assert [lease.id for lease in resumed] == ["b", "c"]
    assert [lease.id for lease in again] == ["b", "c"]  # a cursor may be used again


def test_resume_after_events_that_left_the_window_is_refused() -> None:
    async def scenario() -> None:
        table = _table()
        feed = RevocationFeed(table, window=1)
        sub = feed.subscribe(None)
        _grant(table, "a")
        _grant(table, "b")
        _revoke(table, "a")
        cursor = feed.cursor((await feed.next(sub))[0])
        _revoke(table, "b")
        _grant(table, "c")
        _revoke(table, "c")
        with pytest.raises(CursorTooOld, match="older than the 1 most recent end events"):
            feed.subscribe(None, resume_after=feed.parse_cursor(cursor))

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "cursor",
    ["", "abc", "zzzzzzzz-", "zzzzzzzz-1x", "zzzzzzzz--1", "zzzzzzzz-" + "9" * 20],
    ids=["empty", "no-dash", "no-seq", "junk-seq", "negative", "huge"],
)
def test_a_cursor_that_is_not_ours_is_invalid(cursor: str) -> None:
    feed = RevocationFeed(_table(), epoch="zzzzzzzz")
    with pytest.raises(InvalidRequest):
        feed.parse_cursor(cursor)


def test_a_cursor_ahead_of_the_broker_is_invalid() -> None:
    table = _table()
    feed = RevocationFeed(table)
    with pytest.raises(InvalidRequest, match="ahead"):
        feed.parse_cursor(feed.cursor(table.seq + 1))


def test_a_cursor_of_an_earlier_run_is_out_of_range() -> None:
    table = _table()
    earlier = RevocationFeed(LeaseTable())
    with pytest.raises(CursorTooOld, match="earlier run"):
        RevocationFeed(table).parse_cursor(earlier.cursor(0))


def test_unsubscribe_stops_delivery() -> None:
    async def scenario() -> tuple[list[Lease], int]:
        table = _table()
        feed = RevocationFeed(table)
        sub = feed.subscribe(None)
        _grant(table, "a")
        feed.unsubscribe(sub)
        _revoke(table, "a")
        return _drain(feed, sub), len(feed)

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
    async def scenario() -> None:
        feed = RevocationFeed(LeaseTable(), max_streams_per_watcher=3)
        subs = [feed.subscribe(None, watcher="w") for _ in range(3)]
        with pytest.raises(QuotaExceeded, match="at most 3 open revocation streams"):
            feed.subscribe(None, watcher="w")
        feed.subscribe(None, watcher="other")
        feed.unsubscribe(subs[0])
        feed.subscribe(None, watcher="w")

    asyncio.run(scenario())


class Log:
    """A store's durable log of lease ends, as `history` reads it; records every page asked for."""

    def __init__(self, table: LeaseTable) -> None:
        self.ends: list[tuple[int, Lease]] = []
        self.pages: list[tuple[int, int, int]] = []
        self.gone_through = 0
        table.subscribe(lambda e: self.ends.append((table.seq, e.lease)) if type(e).__name__ == "LeaseEnded" else None)

    async def read(self, after: int, until: int, limit: int) -> list[tuple[int, Lease]]:
        self.pages.append((after, until, limit))
        if after < self.gone_through:
            raise CursorTooOld("resume_after is older than the events the store keeps")
        await asyncio.sleep(0)  # a real read awaits: the window may move meanwhile
        return [(s, lease) for s, lease in self.ends if after < s <= until][:limit]


async def _read_ids(feed: RevocationFeed, sub: Subscription, n: int) -> list[str]:
    return [(await asyncio.wait_for(feed.next(sub), 5))[1].id for _ in range(n)]


def test_resuming_before_the_window_reads_the_log_then_the_window_each_end_once_in_order() -> None:
    async def scenario() -> list[str]:
        table = _table()
        log = Log(table)
        feed = RevocationFeed(table, window=2, history=log.read)
        for lease_id in "abcdefg":
            _grant(table, lease_id)
        _revoke(table, "a")
        cursor = log.ends[0][0]
        for lease_id in "bcdef":
            _revoke(table, lease_id)
        assert feed.floor > cursor  # b, c, d have left the window
        sub = feed.subscribe(None, resume_after=cursor)
        got = await _read_ids(feed, sub, 5)
        assert log.pages and log.pages[0][0] == cursor
        _revoke(table, "g")  # live again, from the window
        return got + await _read_ids(feed, sub, 1)

    assert asyncio.run(scenario()) == ["b", "c", "d", "e", "f", "g"]


def test_history_is_read_in_pages_and_filtered_by_audience(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.leases.feed.HISTORY_PAGE", 2)

    async def scenario() -> tuple[list[str], int]:
        table = _table()
        log = Log(table)
        feed = RevocationFeed(table, window=1, history=log.read)
        ids = [f"l{i}" for i in range(8)]
        for i, lease_id in enumerate(ids):
            _grant(table, lease_id, audience=REPO if i % 2 else CI)
        for lease_id in ids:
            _revoke(table, lease_id)
        sub = feed.subscribe(REPO, resume_after=0)
        return await _read_ids(feed, sub, 4), len(log.pages)

    got, pages = asyncio.run(scenario())
    assert got == ["l1", "l3", "l5", "l7"]
    assert pages >= 4  # 7 old ends, 2 per page


def test_resuming_where_the_log_is_gone_too_is_out_of_range() -> None:
    async def scenario() -> None:
        table = _table()
        log = Log(table)
        feed = RevocationFeed(table, window=1, history=log.read)
        for lease_id in "abc":
            _grant(table, lease_id)
            _revoke(table, lease_id)
        log.gone_through = log.ends[1][0]
        sub = feed.subscribe(None, resume_after=log.ends[0][0])
        with pytest.raises(CursorTooOld):
            await feed.next(sub)

    asyncio.run(scenario())


def test_a_cursor_inside_the_window_never_reads_the_log() -> None:
    async def scenario() -> list[str]:
        table = _table()
        log = Log(table)
        feed = RevocationFeed(table, window=8, history=log.read)
        for lease_id in "ab":
            _grant(table, lease_id)
            _revoke(table, lease_id)
        sub = feed.subscribe(None, resume_after=log.ends[0][0])
        got = await _read_ids(feed, sub, 1)
        assert log.pages == []
        return got

    assert asyncio.run(scenario()) == ["b"]
