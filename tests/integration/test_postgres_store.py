"""The PostgreSQL store with several replicas on one real database: convergence, races, outages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import pytest

from broker.domain.errors import ConfigError, CursorTooOld, StoreUnavailable, TaskConflict
from broker.leases.events import LeaseEnded, LeaseState, Reason
from broker.store.postgres import PostgresStore
from broker.store.schema import VERSION
from broker.testing.clock import FakeClock
from broker.testing.postgres import PostgresServer
from tests.integration.test_store_contract import OTHER, OWNER, T0, lease, make_store


def replicas(dsn: str, n: int, scenario: Callable[..., Awaitable[object]]) -> object:
    async def main() -> object:
        clock = FakeClock(start=T0)
        stores = [make_store("postgres", dsn, clock, replica=f"r{i}") for i in range(n)]
        for store in stores:
            await store.start()
        try:
            return await scenario(clock, *stores)
        finally:
            for store in stores:
                await store.close()

    return asyncio.run(main())


async def _open(store: PostgresStore, *ids: str, owner: str = OWNER) -> None:
    def plan(batch):
        batch.open_task("t1", owner, now=T0, deadline=T0 + 600)
        for lease_id in ids:
            batch.grant(lease(lease_id), now=T0)

    await store.execute(plan)


def test_every_replica_converges_on_the_same_table(pg_dsn: str) -> None:
    async def scenario(clock, a, b):
        await _open(a, "x", "y")
        await b.execute(lambda batch: batch.revoke("x", Reason.OPERATOR, now=T0 + 1, initiator="op"))
        await a.sync()
        late = make_store("postgres", pg_dsn, clock, replica="late")
        await late.start()  # rebuilt from the log
        try:
            return [[(i, s.table.get(i).state) for i in ("x", "y")] for s in (a, b, late)], {a.table.seq, b.table.seq}
        finally:
            await late.close()

    views, seqs = replicas(pg_dsn, 2, scenario)
    assert views[0] == views[1] == views[2] == [("x", LeaseState.REVOKED), ("y", LeaseState.ACTIVE)]
    assert len(seqs) == 1


def test_two_replicas_racing_for_one_task_id_give_exactly_one_owner(pg_dsn: str) -> None:
    async def scenario(clock, a, b):
        results = []
        for i in range(10):
            task = f"race-{i}"
            got = await asyncio.gather(
                *(
                    s.execute(lambda batch, o=o, t=task: batch.open_task(t, o, now=T0, deadline=T0 + 600))
                    for s, o in ((a, OWNER), (b, OTHER))
                ),
                return_exceptions=True,
            )
            await a.sync()
            await b.sync()
            results.append((got, a.table.get_task(task).owner, b.table.get_task(task).owner))
        return results

    for got, owner_a, owner_b in replicas(pg_dsn, 2, scenario):
        wins = [r for r in got if not isinstance(r, BaseException)]
        losses = [r for r in got if isinstance(r, BaseException)]
        assert len(wins) == 1 and len(losses) == 1 and isinstance(losses[0], TaskConflict)
        assert owner_a == owner_b == wins[0].owner


def test_expiry_on_several_replicas_happens_once_and_is_told_once(pg_dsn: str) -> None:
    async def scenario(clock, a, b, c):
        told = []

        def teller(store):
            return lambda e: told.append((store.replica_id, e.lease.id)) if isinstance(e, LeaseEnded) else None

        for store in (a, b, c):
            store.on_committed(teller(store))
        await _open(a, "e1", "e2")
        for store in (b, c):
            await store.sync()
        results = await asyncio.gather(*(s.expire(T0 + 61, limit=100) for s in (a, b, c)))
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            rows = await (await conn.execute("SELECT count(*) FROM broker_events WHERE kind = 'LeaseEnded'")).fetchone()
        return results, told, rows[0]

    results, told, rows = replicas(pg_dsn, 3, scenario)
    assert sorted(x.id for r in results for x in r) == ["e1", "e2"]
    assert rows == 2 and len(told) == 2 and len({r for r, _ in told}) == 1


def test_notifications_carry_only_a_sequence_number(pg_dsn: str) -> None:
    async def scenario(clock, a):
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute("LISTEN broker_events")
            await _open(a, "n1")
            await a.execute(lambda batch: batch.revoke("n1", Reason.OPERATOR, now=T0 + 1, initiator="op"))
            payloads = [n.payload async for n in conn.notifies(timeout=2, stop_after=2)]
        return payloads

    payloads = replicas(pg_dsn, 1, scenario)
    assert payloads and all(p.isdigit() for p in payloads)


def test_a_token_minted_by_one_replica_verifies_on_another_and_revoke_all_rotates_both(pg_dsn: str) -> None:
    async def scenario(clock, a, b):
        token = a._minter.mint({"iss": "spiffe://example.org/broker", "sub": OWNER, "aud": "x", "exp": T0 + 60,
                                "iat": T0, "nbf": T0, "jti": "j"})
        await b.refresh_keys()
        verified = b._minter.verify(token, now=T0)["jti"]
        old_a, old_b = a._minter.current_kid, b._minter.current_kid
        await a.rotate_keys()
        await b.sync()
        await asyncio.sleep(0)
        for _ in range(50):  # b publishes its new key in the background
            await b.refresh_keys()
            await a.refresh_keys()
            if len(a._minter.jwks()["keys"]) == 2 and len(b._minter.jwks()["keys"]) == 2:
                break
            await asyncio.sleep(0.05)
        kids_a = {k["kid"] for k in a._minter.jwks()["keys"]}
        kids_b = {k["kid"] for k in b._minter.jwks()["keys"]}
        return verified, old_a, old_b, kids_a, kids_b, a._minter.current_kid, b._minter.current_kid

    verified, old_a, old_b, kids_a, kids_b, new_a, new_b = replicas(pg_dsn, 2, scenario)
    assert verified == "j"
    assert new_a != old_a and new_b != old_b
    assert kids_a == kids_b == {new_a, new_b}


def test_a_schema_newer_than_the_code_is_a_config_error(pg_dsn: str) -> None:
    async def main():
        store = make_store("postgres", pg_dsn, FakeClock(start=T0))
        await store.start()
        await store.close()
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute("INSERT INTO broker_schema (version) VALUES (%s)", (VERSION + 1,))
        again = make_store("postgres", pg_dsn, FakeClock(start=T0))
        with pytest.raises(ConfigError, match="newer than this broker"):
            await again.start()

    asyncio.run(main())


def test_postgres_down_fails_closed_and_the_replica_catches_up_by_itself() -> None:
    with PostgresServer() as server:
        dsn = server.create_database("outage")

        async def main():
            clock = FakeClock(start=T0)
            a = make_store("postgres", dsn, clock, replica="a")
            b = make_store("postgres", dsn, clock, replica="b")
            await a.start()
            await b.start()
            health = []
            a.on_health(health.append)
            try:
                await _open(a, "o1", "o2")
                await b.sync()
                server.stop("fast")  # the test server runs without fsync: an immediate stop loses data
                with pytest.raises(StoreUnavailable, match="unavailable"):
                    await a.execute(lambda batch: batch.revoke("o1", Reason.OPERATOR, now=T0 + 1, initiator="op"))
                for store in (a, b, b):  # each failed call puts the pool's own reconnects further off
                    with pytest.raises(StoreUnavailable):
                        await store.sync()
                down = (a.healthy, a.table.get("o1").state)
                server.start()
                # The first call once the server is back succeeds: no waiting out the pool's backoff.
                await b.execute(lambda batch: batch.revoke("o2", Reason.OPERATOR, now=T0 + 2, initiator="op"))
                for _ in range(200):  # the tailer reconnects and reads what it missed, untold
                    if a.healthy and a.table.get("o2").state is LeaseState.REVOKED:
                        break
                    await asyncio.sleep(0.05)
                return down, health, a.healthy, a.table.get("o2").state
            finally:
                await a.close()
                await b.close()

        down, health, healthy, state = asyncio.run(main())
    assert down == (False, LeaseState.ACTIVE)
    assert health[:1] == [False] and healthy is True and state is LeaseState.REVOKED


def test_the_log_serves_old_lease_ends_until_housekeeping_deletes_them(pg_dsn: str) -> None:
    async def scenario(clock, a, b):
        await _open(a, "x", "y", "z")
        for lease_id in ("x", "y"):
            await a.execute(lambda batch, i=lease_id: batch.revoke(i, Reason.OPERATOR, now=T0 + 1, initiator="op"))
        await b.sync()
        served = await b.ended_after(0, b.table.seq, 10)
        paged = await b.ended_after(0, b.table.seq, 1)
        b._retention = -60.0  # every committed event is now past retention
        async with b._connection() as conn:
            await b._housekeeping(conn)
        with pytest.raises(CursorTooOld, match="older than the events the store keeps"):
            await a.ended_after(served[0][0], a.table.seq, 10)
        after_all = await a.ended_after(a.table.seq, a.table.seq, 10)
        return served, paged, after_all

    served, paged, after_all = replicas(pg_dsn, 2, scenario)
    assert [(lease.id, lease.reason) for _, lease in served] == [("x", Reason.OPERATOR), ("y", Reason.OPERATOR)]
    assert served[0][0] < served[1][0] and [s for s, _ in paged] == [served[0][0]]
    assert after_all == []


def test_a_second_outage_before_the_store_was_seen_healthy_again_still_recovers_at_once() -> None:
    with PostgresServer() as server:
        dsn = server.create_database("twice")

        async def main() -> list[bool]:
            a = make_store("postgres", dsn, FakeClock(start=T0), replica="a")
            await a.start()
            assert a._tailer is not None
            a._tailer.cancel()  # nobody else marks the store healthy between the outages
            await asyncio.gather(a._tailer, return_exceptions=True)
            renews_next: list[bool] = []
            try:
                for _ in range(2):
                    server.stop("fast")
                    with pytest.raises(StoreUnavailable):
                        await a.sync()
                    # Down again while still marked down: the next call must still renew the pool,
                    # not wait out the old one's backoff.
                    renews_next.append(a._pool_stale)
                    server.start()
                    await a.sync()  # the first call after the restart answers
                return renews_next
            finally:
                await a.close()

        assert asyncio.run(main()) == [True, True]


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (psycopg.errors.SerializationFailure("could not serialize access"), False),
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
        (psycopg.errors.ConnectionFailure("connection failure"), True),
        (psycopg.OperationalError("connection failed: Connection refused"), True),
        (OSError("Connection reset by peer"), True),
    ],
    ids=["statement-timeout", "serialization", "admin-shutdown", "class-08", "refused", "reset"],
)
def test_only_a_lost_server_marks_the_store_down(error: BaseException, lost: bool) -> None:
    store = make_store("postgres", "host=127.0.0.1 port=1 dbname=none", FakeClock(start=T0))
    store._healthy = True
    with pytest.raises(StoreUnavailable):
        raise store._unavailable(error)
    assert (store.healthy, store._pool_stale) == (not lost, lost)


def test_waiters_of_a_retired_pool_do_not_mark_the_new_one_stale() -> None:
    from psycopg_pool import PoolClosed

    store = make_store("postgres", "host=127.0.0.1 port=1 dbname=none", FakeClock(start=T0))
    store._healthy = True
    store._unavailable(PoolClosed("the pool is closed"))
    assert (store.healthy, store._pool_stale) == (True, False)


def test_upgrading_a_version_1_log_records_how_far_it_was_already_deleted(pg_dsn: str) -> None:
    from broker.store.schema import MIGRATIONS, ensure_schema

    async def main() -> tuple[str, str]:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute("CREATE TABLE broker_schema (version integer NOT NULL)")
            await conn.execute(MIGRATIONS[0])
            await conn.execute("INSERT INTO broker_schema (version) VALUES (1)")
            for kind in ("a", "b", "c"):
                await conn.execute("INSERT INTO broker_events (replica, kind, body) VALUES ('old', %s, '{}')", (kind,))
            await conn.execute("DELETE FROM broker_events WHERE kind = 'a'")  # pruned by a version-1 broker
            assert await ensure_schema(conn) == 1
            first = await (await conn.execute("SELECT min(seq) FROM broker_events")).fetchone()
            row = await (await conn.execute("SELECT value FROM broker_meta WHERE name = 'pruned_through'")).fetchone()
            return str(first[0] - 1), row[0]

    expected, pruned = asyncio.run(main())
    assert pruned == expected
