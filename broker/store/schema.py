"""The PostgreSQL schema of the shared store: plain versioned SQL, applied at start under a lock.

Each entry of `MIGRATIONS` moves the schema one version up and runs in one transaction with the
version row. Replicas starting together take a session advisory lock first, so exactly one
applies a step and the others find it done. A database whose schema is newer than this code
(a newer broker already upgraded it) is refused: this broker would misread its rows.
"""

from __future__ import annotations

import psycopg

from broker.domain.errors import ConfigError

# pg_advisory_lock key of schema changes: "broker" in ASCII, as one bigint.
SCHEMA_LOCK = 0x62726F6B6572
# pg_advisory_xact_lock key of appends: one writer at a time keeps `seq` in commit order,
# so a replica that has read up to `seq` has seen every batch committed before it.
APPEND_LOCK = 0x62726F6B6573
CHANNEL = "broker_events"

MIGRATIONS: tuple[str, ...] = (
    # 1: the event log, the replicas' public keys, and this store's name (the cursor epoch)
    """
    CREATE TABLE broker_events (
        seq bigserial PRIMARY KEY,
        replica text NOT NULL,
        kind text NOT NULL,
        body text NOT NULL,  -- JSON as text: jsonb refuses NUL characters, which a claim may hold
        committed_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE broker_keys (
        kid text PRIMARY KEY,
        replica text NOT NULL,
        jwk jsonb NOT NULL,
        alive_at double precision NOT NULL
    );
    CREATE TABLE broker_meta (
        name text PRIMARY KEY,
        value text NOT NULL
    );
    INSERT INTO broker_meta (name, value) VALUES ('epoch', substr(md5(random()::text), 1, 8));
    """,
    # 2: how far housekeeping has deleted the log (watchers resume from it only after this),
    # counted from what a database of version 1 still holds
    """
    INSERT INTO broker_meta (name, value)
    SELECT 'pruned_through', COALESCE(
        (SELECT min(seq) - 1 FROM broker_events),
        (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM broker_events_seq_seq)
    )::text
    ON CONFLICT (name) DO NOTHING;
    """,
)
VERSION = len(MIGRATIONS)


async def ensure_schema(conn: psycopg.AsyncConnection) -> int:
    """Create or upgrade the schema to `VERSION`; return the version found before.

    Raises:
        ConfigError: the database's schema is newer than this broker knows.
    """
    await conn.set_autocommit(True)
    await conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS broker_schema (version integer NOT NULL)")
        row = await (await conn.execute("SELECT max(version) FROM broker_schema")).fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > VERSION:
            raise ConfigError(
                "store.dsn", f"the database has schema version {found}, newer than this broker's {VERSION}: upgrade it"
            )
        for version in range(found + 1, VERSION + 1):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[version - 1])
                await conn.execute("INSERT INTO broker_schema (version) VALUES (%s)", (version,))
        return found
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
