"""The PostgreSQL backend: one login role per lease, in the group roles its actions are granted.

Every statement is composed with `psycopg.sql`: identifiers through `sql.Identifier`, values as
parameters, or as `sql.Literal` where PostgreSQL takes no parameter (CREATE/ALTER ROLE). The
password never reaches the server: the broker computes its SCRAM-SHA-256 verifier (in a worker
thread: PBKDF2 releases the interpreter lock, the event loop does not wait), and the verifier is
what `CREATE ROLE ... PASSWORD` stores. Each role carries a comment naming its
backend and its creation time, so reconciliation only ever drops roles this backend made, and
none that another replica may still be granting a lease for.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from broker.backends.base import BackendStatus, Secret, frozen
from broker.config.backends import BackendConfig
from broker.domain.errors import BackendUnavailable, PermissionDenied

log = logging.getLogger(__name__)

POOL_SIZE = 4
CONNECT_TIMEOUT = 5
# pg_terminate_backend waits this long (ms) for each session to be gone before the drop.
TERMINATE_WAIT_MS = 5000
MAX_ERROR = 160
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)

_CREATE = sql.SQL(
    "CREATE ROLE {role} WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    " CONNECTION LIMIT {limit} PASSWORD {verifier} VALID UNTIL {until}"
)
_GRANT = sql.SQL("GRANT {groups} TO {role}")
_COMMENT = sql.SQL("COMMENT ON ROLE {role} IS {marker}")
_VALID_UNTIL = sql.SQL("ALTER ROLE {role} VALID UNTIL {until}")
_NOLOGIN = sql.SQL("ALTER ROLE {role} NOLOGIN")
_TERMINATE = "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()"
_REASSIGN = sql.SQL("REASSIGN OWNED BY {role} TO CURRENT_USER")
_DROP_OWNED = sql.SQL("DROP OWNED BY {role}")
_DROP = sql.SQL("DROP ROLE IF EXISTS {role}")
_EXISTS = "SELECT 1 FROM pg_roles WHERE rolname = %s"
# The comment is the marker, then "; created <unix seconds>" (a broker before that wrote the marker alone).
_CREATED = "; created "
_MANAGED = (
    "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE starts_with(rolname, %s)"
    " AND (shobj_description(oid, 'pg_authid') = %s OR starts_with(shobj_description(oid, 'pg_authid'), %s))"
)


def _until(expires_at: float) -> sql.Literal:
    return sql.Literal(datetime.fromtimestamp(expires_at, tz=UTC).isoformat())


def creation_time(comment: str, marker: str) -> float:
    """The creation time a role's comment carries after `marker`; 0 when it carries none."""
    try:
        at = float(comment.removeprefix(marker + _CREATED)) if comment.startswith(marker + _CREATED) else 0.0
    except ValueError:
        return 0.0
    return at if math.isfinite(at) else 0.0


def scram_verifier(password: str, *, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802 and 7677, PostgreSQL's format).

    The password is ASCII (from `secrets.token_urlsafe`), so SASLprep leaves it as it is.
    """
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def short_error(e: BaseException) -> str:
    """A one-line reason from a psycopg error: its SQLSTATE and primary message, or libpq's first line."""
    diag = getattr(e, "diag", None)
    primary = diag.message_primary if diag is not None else None
    sqlstate = getattr(e, "sqlstate", None)
    if primary:
        text = f"{sqlstate}: {primary}" if sqlstate else primary
    elif isinstance(e, PoolTimeout):
        text = "no connection within the timeout"
    else:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        text = lines[0] if lines else type(e).__name__
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


class PostgresBackend:
    """Login roles on one PostgreSQL database, through a small pool of admin connections."""

    kind = "postgres"

    def __init__(self, config: BackendConfig, *, pool_timeout: float = 5.0) -> None:
        self.name = config.name
        self.audience = config.audience
        self.status = BackendStatus(up=False, error="not contacted yet")
        self._config = config
        self._pool_timeout = pool_timeout
        self._marker = f"managed by the credential broker: backend {config.name}"
        params = conninfo_to_dict(config.dsn)
        self._where = {k: str(params[k]) for k in ("host", "port", "dbname", "sslmode") if params.get(k)}
        self._where.setdefault("port", "5432")
        self._where.setdefault("dbname", str(params.get("user") or "postgres"))
        self._pool: AsyncConnectionPool | None = None
        self._probing = asyncio.Lock()
        self._probes = 0

    def groups_for(self, actions: tuple[str, ...]) -> tuple[str, ...]:
        groups: dict[str, None] = {}
        for action in actions:
            roles = self._config.groups_for(action)
            if roles is None:
                raise PermissionDenied(f"backend {self.name} grants no role for action {action}")
            groups.update(dict.fromkeys(roles))
        return tuple(groups)

    def new_role(self) -> str:
        return self._config.role_prefix + secrets.token_hex(10)

    def view(self, role: str, expires_at: float) -> Secret:
        return self._secret(role, expires_at, password=None)

    def _secret(self, role: str, expires_at: float, *, password: str | None) -> Secret:
        where = self._where
        fields = {"username": role, "host": where.get("host", ""), "port": where["port"], "dbname": where["dbname"]}
        login = {k: v for k, v in where.items() if v}
        if password is not None:
            fields["password"] = password
            login["password"] = password
        fields["dsn"] = make_conninfo("", user=role, **login)
        return Secret(backend=self.name, fields=frozen(fields), expires_at=expires_at)

    # ---- connections ----

    async def open(self) -> None:
        """Nothing to do yet: the first operation connects (the pool is made on first contact)."""

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=1.0)

    async def _new_pool(self) -> None:
        pool = AsyncConnectionPool(
            self._config.dsn,
            min_size=0,
            max_size=POOL_SIZE,
            open=False,
            name=f"backend-{self.name}",
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=60.0,
        )
        await pool.open(wait=False)
        self._pool = pool

    async def _probe(self) -> None:
        """While the backend is known down, one direct connection decides, quickly, whether it is back."""
        seen = self._probes
        async with self._probing:
            if self._probes != seen:  # another operation probed while this one waited: take its answer
                if self.status.up and self._pool is not None:
                    return
                raise BackendUnavailable(f"backend {self.name} is unavailable: {self.status.error}")
            try:
                await self._reconnect()
            finally:
                self._probes += 1

    async def _reconnect(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(self._config.dsn, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as e:
            self._mark_down(e)
            raise BackendUnavailable(f"backend {self.name} is unavailable: {self.status.error}") from e
        await conn.close()
        # The old pool may be deep in its reconnection backoff: a fresh one serves at once.
        await self.close()
        await self._new_pool()
        self._mark_up()

    def _mark_down(self, e: BaseException) -> None:
        error = short_error(e)
        if self.status.up or self.status.error != error:
            log.warning("backend unavailable", extra={"backend": self.name, "error": error})
        self.status = BackendStatus(up=False, error=error)

    def _mark_up(self) -> None:
        if not self.status.up:
            log.info("backend reachable", extra={"backend": self.name})
        self.status = BackendStatus(up=True)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """An admin connection; every psycopg failure becomes `BackendUnavailable` naming the backend."""
        if not self.status.up or self._pool is None:
            await self._probe()
        assert self._pool is not None
        try:
            async with self._pool.connection(timeout=self._pool_timeout) as conn:
                self._mark_up()
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            if isinstance(e, PoolTimeout) or e.sqlstate is None or e.sqlstate[:2] in ("08", "57"):
                self._mark_down(e)
                await self.close()  # stop its reconnection attempts; the next operation probes first
            raise BackendUnavailable(f"backend {self.name}: {short_error(e)}") from e
        except psycopg.Error as e:
            raise BackendUnavailable(f"backend {self.name}: {short_error(e)}") from e

    # ---- the operations ----

    async def provision(self, role: str, groups: tuple[str, ...], expires_at: float, *, created_at: float) -> Secret:
        password = secrets.token_urlsafe(24)
        verifier = await asyncio.to_thread(scram_verifier, password)
        ident = sql.Identifier(role)
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                _CREATE.format(
                    role=ident,
                    limit=sql.Literal(self._config.connection_limit),
                    verifier=sql.Literal(verifier),
                    until=_until(expires_at),
                )
            )
            if groups:
                members = sql.SQL(", ").join(sql.Identifier(group) for group in groups)
                await conn.execute(_GRANT.format(groups=members, role=ident))
            comment = f"{self._marker}{_CREATED}{created_at!r}"  # repr: read back exactly
            await conn.execute(_COMMENT.format(role=ident, marker=sql.Literal(comment)))
        return self._secret(role, expires_at, password=password)

    async def renew(self, role: str, expires_at: float) -> None:
        async with self._connection() as conn:
            await conn.execute(_VALID_UNTIL.format(role=sql.Identifier(role), until=_until(expires_at)))

    async def revoke(self, role: str) -> bool:
        ident = sql.Identifier(role)
        async with self._connection() as conn:
            if await (await conn.execute(_EXISTS, [role])).fetchone() is None:
                return False
            try:
                # Disabled first and on its own, so no new session starts while the old ones are ended.
                await conn.execute(_NOLOGIN.format(role=ident))
                await conn.execute(_TERMINATE, [TERMINATE_WAIT_MS, role])
                async with conn.transaction():
                    # Whatever the role created is kept, owned by the admin, so the drop cannot fail on it.
                    await conn.execute(_REASSIGN.format(role=ident))
                    await conn.execute(_DROP_OWNED.format(role=ident))
                    await conn.execute(_DROP.format(role=ident))
            except psycopg.errors.UndefinedObject:
                return False  # dropped meanwhile, by another replica: not this one's change
        return True

    async def roles(self) -> dict[str, float]:
        params = [self._config.role_prefix, self._marker, self._marker + _CREATED]
        async with self._connection() as conn:
            rows = await (await conn.execute(_MANAGED, params)).fetchall()
        return {name: creation_time(comment or "", self._marker) for name, comment in rows}
