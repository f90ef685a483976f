"""The PostgreSQL store: replicas that share one durable event log, and so act as one broker.

Every command appends its batch in one transaction that first takes the append lock
(`pg_advisory_xact_lock`), reads what other replicas appended since this replica last looked,
plans the command against that current state, and inserts its events (`seq` from a bigserial).
The lock makes commit order equal `seq` order, so checks such as "this task id is free" or "the
parent lease is active" are decided once, against the truth, whichever replica asks.

Each replica's table is rebuilt from the log at start and tailed afterwards: LISTEN on its own
connection (with TCP keepalives) is only the wake-up, NOTIFY carries nothing but a sequence
number, and a poll catches up whatever a lost notification did not announce. `sync()` is the
read barrier of Introspect, Renew and delegation: one query for rows after the last one seen.

Public signing keys are rows (`broker_keys`), refreshed on start, on an unknown kid and on a
timer; each replica heartbeats its own, and a key is kept until no token it signed can still be
valid. `Revoke all` deletes every key row and appends `KeysRevoked`, and each replica that
reads it replaces its own key. When PostgreSQL cannot be reached every command and barrier
raises `StoreUnavailable` (fail closed), health goes NOT_SERVING, and the tailer reconnects and
catches up by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from broker.domain.clock import Clock
from broker.domain.errors import BrokerError, CursorTooOld, StoreUnavailable
from broker.leases.batch import Batch
from broker.leases.events import Event, Lease, LeaseEnded
from broker.leases.table import LeaseTable
from broker.store.base import Committed, HealthListener, Reloader, ReplicaReload
from broker.store.codec import decode, encode
from broker.store.schema import APPEND_LOCK, CHANNEL, ensure_schema
from broker.tokens.minter import TokenMinter

log = logging.getLogger(__name__)

T = TypeVar("T")
KEYS_REVOKED = "KeysRevoked"
KEY_PUBLISHED = "KeyPublished"
POLICY_RELOAD = "PolicyReload"
POLICY_RELOADED = "PolicyReloaded"
RELOAD_WAIT_SECONDS = 5.0
# How often the tailer looks even without a notification, heartbeats its key and prunes.
POLL_SECONDS = 1.0
HOUSEKEEPING_SECONDS = 10.0
POOL_TIMEOUT = 2.0
READ_BATCH = 5000
_CONNECT: dict[str, Any] = {
    "connect_timeout": 3,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "options": "-c statement_timeout=10000",
}
# The server shut down or is starting or stopping (SQLSTATE class 57P): as good as unreachable.
_SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})
# Unreachable or failing in transit: the store is unavailable. Other database errors are bugs.
_DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError)


class PostgresStore:
    """A replica's view of the shared store; `table` is its local copy of the log's state."""

    durable = True

    def __init__(
        self,
        table: LeaseTable,
        *,
        dsn: str,
        replica_id: str,
        minter: TokenMinter,
        clock: Clock,
        key_lifetime: float,
        event_retention: float,
    ) -> None:
        self.table = table
        self.replica_id = replica_id
        self.epoch = ""
        self._dsn = dsn
        self._minter = minter
        self._clock = clock
        self._key_lifetime = key_lifetime
        self._retention = event_retention
        self._pool: AsyncConnectionPool | None = None
        self._applied = 0  # the last log row this replica has read (lease events or not)
        self._writer = asyncio.Lock()
        self._committed: list[Committed] = []
        self._health: list[HealthListener] = []
        self._healthy = False
        self._tailer: asyncio.Task | None = None
        self._refreshing: asyncio.Task | None = None
        self._publish_pending = False
        self._background: set[asyncio.Task] = set()
        self._pool_stale = False
        self._connect_errors = 0  # the pool's failed connection attempts seen so far
        self._renewing = asyncio.Lock()
        self._retired: list[AsyncConnectionPool] = []
        self._reloader: Reloader | None = None
        self._answers: dict[int, dict[str, ReplicaReload]] = {}

    @property
    def healthy(self) -> bool:
        return self._healthy

    def on_committed(self, fn: Committed) -> None:
        self._committed.append(fn)

    def on_health(self, fn: HealthListener) -> None:
        self._health.append(fn)

    def _set_healthy(self, healthy: bool) -> None:
        if not healthy:
            self._pool_stale = True  # every failure, even while already down: the pool may be backing off again
        if healthy == self._healthy:
            return
        self._healthy = healthy
        message = "lease store reachable" if healthy else "lease store unreachable"
        log.warning(message, extra={"replica": self.replica_id})
        for fn in self._health:
            fn(healthy)

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        # Every failure fails the call closed; only a lost server marks the store down (health,
        # and a fresh pool on the next call). A statement timeout, a busy pool or a retired
        # pool's waiters are not an outage, and replacing the pool for them would make one.
        if self._connection_lost(error):
            self._set_healthy(False)
        log.warning("lease store call failed", extra={"error": type(error).__name__})
        return StoreUnavailable("lease store unavailable: try again")

    def _connection_lost(self, error: BaseException) -> bool:
        if isinstance(error, PoolClosed):
            return False
        if isinstance(error, PoolTimeout):
            # Waited for a connection: an outage when the pool's attempts to connect have been
            # failing meanwhile, not when its connections were all busy.
            if self._pool is None:
                return True
            failed = int(self._pool.get_stats().get("connections_errors", 0))
            grew, self._connect_errors = failed > self._connect_errors, failed
            return grew
        if isinstance(error, psycopg.Error) and error.sqlstate is not None:
            return error.sqlstate.startswith("08") or error.sqlstate in _SERVER_GONE
        return True  # no SQLSTATE: the connection itself failed (refused, reset, timed out)

    # -- start and stop

    async def start(self) -> None:
        """Create or upgrade the schema, read the whole log, publish this replica's key, tail.

        Raises:
            ConfigError: the schema is newer than this broker.
            StoreUnavailable: PostgreSQL cannot be reached.
        """
        try:
            async with await psycopg.AsyncConnection.connect(self._dsn, **_CONNECT) as conn:
                await ensure_schema(conn)
                row = await (await conn.execute("SELECT value FROM broker_meta WHERE name = 'epoch'")).fetchone()
                self.epoch = str(row[0]) if row else ""
            self._pool = self._new_pool()
            await self._pool.open(wait=True, timeout=10)
            await self.sync()
            await self._publish_key()
            await self.refresh_keys()
        except _DB_ERRORS as e:
            await self.close()
            raise StoreUnavailable(f"lease store unreachable at start: {type(e).__name__}") from e
        self._set_healthy(True)
        self._tailer = asyncio.create_task(self._tail(), name="store-tailer")

    async def close(self) -> None:
        # Bounded: a stop must not wait on a connection stuck in the network.
        tasks = [t for t in (self._tailer, self._refreshing, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3.0)
        self._tailer = None
        pools = [p for p in (self._pool, *self._retired) if p is not None]
        self._pool = None
        self._retired.clear()
        for pool in pools:
            await pool.close(timeout=3.0)

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            self._dsn,
            kwargs={**_CONNECT, "application_name": "broker"},
            min_size=1,
            max_size=8,
            open=False,
            timeout=POOL_TIMEOUT,
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=float("inf"),
        )

    async def _renew_pool(self) -> None:
        """After an outage, answer from a fresh pool as soon as PostgreSQL is back.

        The pool's own reconnects back off without bound (1 s, 2 s, 4 s, ...), so after a long
        outage it could keep failing calls long after the server returned. While the store is
        marked down, each call first tries one direct connection: refused at once while the
        server is down (the call fails fast), and when it succeeds the old pool is replaced.
        """
        async with self._renewing:
            if not self._pool_stale:
                return
            probe = await psycopg.AsyncConnection.connect(self._dsn, **_CONNECT)
            await probe.close()
            pool = self._new_pool()
            try:
                await pool.open(wait=True, timeout=POOL_TIMEOUT)
            except BaseException:
                await pool.close(timeout=0)
                raise
            old, self._pool, self._pool_stale, self._connect_errors = self._pool, pool, False, 0
            if old is not None:
                self._retired.append(old)
                self._spawn(self._retire(old))

    async def _retire(self, pool: AsyncConnectionPool) -> None:
        await pool.close(timeout=3.0)
        with contextlib.suppress(ValueError):
            self._retired.remove(pool)

    # -- commands

    async def execute(self, plan: Callable[[Batch], T]) -> T:
        async with self._writer:
            batch: Batch | None = None
            try:
                # Pipelined: BEGIN, the lock and the read go out together and are answered in one
                # round trip; the insert, the notification and COMMIT in a second.
                async with self._connection() as conn, conn.pipeline(), conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
                    await self._read_new(conn)
                    batch = Batch(self.table)
                    result = plan(batch)
                    appended = await self._append(conn, batch.events) if batch.events else None
                    if self._publish_pending:
                        await self._insert_key(conn)
                seqs = sorted(row[0] for row in await appended.fetchall()) if appended is not None else []
            except _DB_ERRORS as e:
                if batch is not None:
                    batch.restore()
                raise self._unavailable(e) from e
            except BaseException:
                if batch is not None:
                    batch.restore()
                raise
        self._publish_pending = False
        for seq, event in zip(seqs, batch.events, strict=True):
            self.table.apply_at(seq, event)
            self._applied = max(self._applied, seq)
        self._tell(batch.events)
        return result

    def _tell(self, events: list[Event]) -> None:
        for event in events:
            for fn in self._committed:
                fn(event)

    async def _append(self, conn: psycopg.AsyncConnection, events: list[Event]) -> psycopg.AsyncCursor[Any]:
        """Queue the batch's insert and its wake-up; the cursor answers the new `seq`s once synced."""
        kinds, bodies = zip(*(encode(e) for e in events), strict=True)
        cur = await conn.execute(
            "INSERT INTO broker_events (replica, kind, body) "
            "SELECT %s, k, b FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(k, b, n) ORDER BY n "
            "RETURNING seq",
            (self.replica_id, list(kinds), list(bodies)),
        )
        # The payload is only a wake-up: a sequence number (this session's last), never a lease's content.
        await conn.execute("SELECT pg_notify(%s, currval(pg_get_serial_sequence('broker_events', 'seq'))::text)",
                           (CHANNEL,))
        return cur

    async def expire(self, now: float, *, limit: int) -> list[Lease]:
        # Probe locally first: most due entries are stale here (another replica ended the lease,
        # or it was renewed), and a pass that would append nothing needs no transaction.
        probe = Batch(self.table)
        probe.expire_due(now, limit=limit)
        if not probe.events:
            return []
        probe.restore()
        return await self.execute(lambda b: b.expire_due(now, limit=limit))

    # -- reading the log

    @contextlib.asynccontextmanager
    async def _connection(self):  # type: ignore[no-untyped-def]
        if self._pool is None:
            raise StoreUnavailable("lease store is not started")
        if self._pool_stale:
            # Bounded like a pool checkout: a server that does not answer fails the call in 2 s
            # (TimeoutError is an OSError, so the caller's handler turns it into UNAVAILABLE).
            await asyncio.wait_for(self._renew_pool(), POOL_TIMEOUT)
        async with self._pool.connection(timeout=POOL_TIMEOUT) as conn:
            yield conn

    async def sync(self) -> None:
        try:
            async with self._connection() as conn:
                await self._read_new(conn)
        except _DB_ERRORS as e:
            raise self._unavailable(e) from e

    async def _read_new(self, conn: psycopg.AsyncConnection) -> None:
        while True:
            cur = await conn.execute(
                "SELECT seq, kind, body FROM broker_events WHERE seq > %s ORDER BY seq LIMIT %s",
                (self._applied, READ_BATCH),
            )
            rows = await cur.fetchall()
            self._apply_rows(rows)
            if len(rows) < READ_BATCH:
                return

    async def ended_after(self, after: int, until: int, limit: int) -> list[tuple[int, Lease]]:
        """Lease ends in (after, until] from the log, for a watcher resuming before the feed's window.

        Raises:
            CursorTooOld: housekeeping has deleted events after `after`.
            StoreUnavailable: PostgreSQL cannot be reached.
        """
        try:
            async with self._connection() as conn:
                cur = await conn.execute(
                    "SELECT seq, body FROM broker_events WHERE kind = 'LeaseEnded' AND seq > %s AND seq <= %s"
                    " ORDER BY seq LIMIT %s",
                    (after, until, limit),
                )
                rows = await cur.fetchall()
                # Read after the rows: a deletion that raced the read shows here, never as a silent gap.
                cur = await conn.execute("SELECT value FROM broker_meta WHERE name = 'pruned_through'")
                pruned = await cur.fetchone()
        except _DB_ERRORS as e:
            raise self._unavailable(e) from e
        # Without the row (written since schema version 2) how far the log was deleted is unknown.
        if pruned is None or after < int(pruned[0]):
            raise CursorTooOld("resume_after is older than the events the store keeps: list leases to resynchronise")
        ended: list[tuple[int, Lease]] = []
        for seq, text in rows:
            try:
                event = decode("LeaseEnded", json.loads(text))
            except ValueError:  # as when tailing: one unreadable row must not end every resume
                log.error("unreadable event in the log skipped", extra={"seq": seq, "kind": "LeaseEnded"})
                continue
            assert isinstance(event, LeaseEnded)
            ended.append((int(seq), event.lease))
        return ended

    def _apply_rows(self, rows: list[tuple[int, str, Any]]) -> None:
        # No await in here: rows are applied in seq order, each once, whoever fetched them.
        for seq, kind, text in rows:
            if seq <= self._applied:
                continue
            self._applied = seq
            if kind == KEYS_REVOKED:
                self._on_keys_revoked(seq)
            elif kind == KEY_PUBLISHED:
                self._spawn(self.refresh_keys())
            elif kind in (POLICY_RELOAD, POLICY_RELOADED):
                self._on_reload_row(seq, kind, json.loads(text))
            else:
                try:
                    event = decode(kind, json.loads(text))
                except ValueError:
                    log.error("unreadable event in the log skipped", extra={"seq": seq, "kind": kind})
                    continue
                self.table.apply_at(seq, event)

    # -- policy reloads through one replica

    def on_reload(self, fn: Reloader) -> None:
        self._reloader = fn

    def _on_reload_row(self, seq: int, kind: str, body: Any) -> None:
        if kind == POLICY_RELOADED:
            waiting = self._answers.get(int(body.get("request", 0)))
            if waiting is not None:
                replica = str(body.get("replica", ""))
                waiting[replica] = ReplicaReload(replica, bool(body.get("ok")), str(body.get("detail", "")))
        elif body.get("replica") != self.replica_id and self._reloader is not None:
            ok, detail = self._reloader()
            answer = {"request": seq, "replica": self.replica_id, "ok": ok, "detail": detail[:300]}
            self._spawn(self._append_row(POLICY_RELOADED, answer))

    async def _append_row(self, kind: str, body: dict[str, Any]) -> int:
        async with self._writer:
            try:
                async with self._connection() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
                    cur = await conn.execute(
                        "INSERT INTO broker_events (replica, kind, body) VALUES (%s, %s, %s) RETURNING seq",
                        (self.replica_id, kind, json.dumps(body)),
                    )
                    row = await cur.fetchone()
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(row[0] if row else 0)))
            except _DB_ERRORS as e:
                raise self._unavailable(e) from e
        return int(row[0]) if row else 0

    async def reload_everywhere(self) -> list[ReplicaReload]:
        """Append a reload request; collect the answers of the other live replicas for a few seconds.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        now = self._clock.now()
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT DISTINCT replica FROM broker_keys WHERE alive_at > %s AND replica <> %s",
                (now - 3 * HOUSEKEEPING_SECONDS, self.replica_id),
            )
            live = sorted(str(r[0]) for r in await cur.fetchall())
        request = await self._append_row(POLICY_RELOAD, {"replica": self.replica_id})
        answers: dict[str, ReplicaReload] = {}
        self._answers[request] = answers
        try:
            deadline = asyncio.get_running_loop().time() + RELOAD_WAIT_SECONDS
            while not set(live) <= set(answers) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                with contextlib.suppress(StoreUnavailable):
                    await self.sync()
        finally:
            self._answers.pop(request, None)
        missing = [ReplicaReload(r, False, "no answer") for r in live if r not in answers]
        return sorted([*answers.values(), *missing], key=lambda a: a.replica_id)

    # -- keys

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_keys_revoked(self, seq: int) -> None:
        # Every replica replaces its own key and forgets the others'; the new keys follow.
        kid = self._minter.rotate(keep_previous_until=None)
        log.info("signing key replaced after revoke all", extra={"kid": kid, "seq": seq})
        self._publish_pending = True
        self._spawn(self._publish_later())

    async def _publish_later(self) -> None:
        with contextlib.suppress(BrokerError):
            await self.execute(lambda batch: None)  # appends the pending key in a transaction

    async def rotate_keys(self) -> str:
        """Revoke all: delete every published key and tell every replica to replace its own.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        at = self._clock.now()
        body = json.dumps({"replica": self.replica_id, "at": at})
        async with self._writer:
            try:
                async with self._connection() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
                    await self._read_new(conn)
                    await conn.execute("DELETE FROM broker_keys")
                    kid = self._minter.rotate(keep_previous_until=None)
                    cur = await conn.execute(
                        "INSERT INTO broker_events (replica, kind, body) VALUES (%s, %s, %s) RETURNING seq",
                        (self.replica_id, KEYS_REVOKED, body),
                    )
                    row = await cur.fetchone()
                    await self._insert_key(conn)
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(row[0] if row else 0)))
            except _DB_ERRORS as e:
                raise self._unavailable(e) from e
        self._applied = max(self._applied, int(row[0])) if row else self._applied
        return kid

    async def _publish_key(self) -> None:
        async with self._writer, self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
            await self._insert_key(conn)

    async def _insert_key(self, conn: psycopg.AsyncConnection) -> None:
        jwk = self._minter.public_jwk()
        await conn.execute(
            "INSERT INTO broker_keys (kid, replica, jwk, alive_at) VALUES (%s, %s, %s::jsonb, %s) "
            "ON CONFLICT (kid) DO UPDATE SET alive_at = EXCLUDED.alive_at",
            (jwk["kid"], self.replica_id, json.dumps(jwk), self._clock.now()),
        )
        await conn.execute(
            "INSERT INTO broker_events (replica, kind, body) VALUES (%s, %s, %s)",
            (self.replica_id, KEY_PUBLISHED, json.dumps({"kid": jwk["kid"]})),
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, "key"))
        self._publish_pending = False

    async def refresh_keys(self) -> None:
        """Learn the live public keys of every replica; concurrent callers share one query.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._load_keys())
        try:
            await asyncio.shield(self._refreshing)
        except _DB_ERRORS as e:
            raise self._unavailable(e) from e

    async def _load_keys(self) -> None:
        oldest = self._clock.now() - self._key_lifetime
        async with self._connection() as conn:
            cur = await conn.execute("SELECT jwk, alive_at FROM broker_keys WHERE alive_at > %s", (oldest,))
            rows = await cur.fetchall()
        self._minter.set_peers([(jwk, float(alive) + self._key_lifetime) for jwk, alive in rows])

    async def _housekeeping(self, conn: psycopg.AsyncConnection) -> None:
        now = self._clock.now()
        await conn.execute(
            "UPDATE broker_keys SET alive_at = %s WHERE kid = %s", (now, self._minter.current_kid)
        )
        await conn.execute("DELETE FROM broker_keys WHERE alive_at < %s", (now - self._key_lifetime,))
        # Events older than any task's life plus the tombstone grace describe only forgotten state.
        # One statement deletes them and records how far the log now starts, for resuming watchers.
        await conn.execute(
            "WITH gone AS (DELETE FROM broker_events WHERE committed_at < now() - make_interval(secs => %s)"
            " RETURNING seq)"
            " INSERT INTO broker_meta (name, value) SELECT 'pruned_through', max(seq)::text FROM gone"
            " HAVING max(seq) IS NOT NULL"
            " ON CONFLICT (name) DO UPDATE"
            " SET value = GREATEST(broker_meta.value::bigint, EXCLUDED.value::bigint)::text",
            (self._retention,),
        )
        await self._load_keys()

    # -- tailing

    async def _tail(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, **_CONNECT) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await self._read_new(conn)  # whatever was missed while not listening
                    await self._renew_pool()
                    self._set_healthy(True)
                    backoff = 0.2
                    await self._follow(conn)
            except asyncio.CancelledError:
                raise
            except _DB_ERRORS as e:
                self._set_healthy(False)
                log.warning("lease store tailer lost its connection", extra={"error": type(e).__name__})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _follow(self, conn: psycopg.AsyncConnection) -> None:
        loop = asyncio.get_running_loop()
        next_housekeeping = loop.time()
        while True:
            async for _ in conn.notifies(timeout=POLL_SECONDS, stop_after=1):
                pass
            await self._read_new(conn)
            self._set_healthy(True)
            if loop.time() >= next_housekeeping:
                await self._housekeeping(conn)
                next_housekeeping = loop.time() + HOUSEKEEPING_SECONDS
