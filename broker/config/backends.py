"""`[[backends]]`: the dynamic-secret targets, one table each.

A backend turns an Exchange for its `audience` into a real downstream login (for PostgreSQL, a
role created for the lease and dropped with it). Every error names its key, as elsewhere in
`broker.toml`; a DSN is never echoed in an error, since it may hold the admin's password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from psycopg.conninfo import conninfo_to_dict

from broker.config.reader import Table
from broker.domain.errors import ConfigError

KINDS = ("postgres",)
DEFAULT_ROLE_PREFIX = "brk_"
DEFAULT_CONNECTION_LIMIT = 4
MAX_CONNECTION_LIMIT = 100
# PostgreSQL truncates identifiers at 63 bytes; a prefix leaves room for the random part.
MAX_PREFIX = 32
MAX_IDENTIFIER = 63
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Lower case so the roles read the same in psql unquoted; never `pg_`, which PostgreSQL reserves.
_PREFIX = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One `[[backends]]` table. `dsn` is the admin login and is kept out of `repr`."""

    name: str
    kind: str
    audience: str
    dsn: str = field(repr=False)
    grants: Mapping[str, tuple[str, ...]]
    role_prefix: str = DEFAULT_ROLE_PREFIX
    connection_limit: int = DEFAULT_CONNECTION_LIMIT

    def groups_for(self, action: str) -> tuple[str, ...] | None:
        """The group roles `action` grants, or None when the config grants nothing for it."""
        return self.grants.get(action)


def backend(t: Table) -> BackendConfig:
    """Raises: ConfigError naming the key."""
    t.allow("name", "kind", "audience", "dsn", "dsn_file", "grants", "role_prefix", "connection_limit")
    name = t.string("name")
    if not _NAME.fullmatch(name):
        raise ConfigError(t.sub("name"), "must be lower-case letters, digits, '-' or '_' (at most 63)")
    kind = t.string("kind")
    if kind not in KINDS:
        raise ConfigError(t.sub("kind"), f"must be one of {', '.join(KINDS)}, not {kind!r}")
    return BackendConfig(
        name=name,
        kind=kind,
        audience=t.string("audience"),
        dsn=_dsn(t),
        grants=_grants(t),
        role_prefix=_prefix(t),
        connection_limit=t.integer("connection_limit", DEFAULT_CONNECTION_LIMIT, 1, MAX_CONNECTION_LIMIT),
    )


def _dsn(t: Table) -> str:
    if ("dsn" in t.data) == ("dsn_file" in t.data):
        raise ConfigError(t.sub("dsn"), "set exactly one of dsn and dsn_file")
    key = t.sub("dsn") if "dsn" in t.data else t.sub("dsn_file")
    if "dsn" in t.data:
        text = t.string("dsn")
    else:
        path = t.path("dsn_file")
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(key, f"cannot read {path}: {getattr(e, 'strerror', None) or 'not text'}") from e
        if not text:
            raise ConfigError(key, f"{path} is empty")
    try:
        conninfo_to_dict(text)
    except Exception as e:  # psycopg raises ProgrammingError; its message may quote the text
        raise ConfigError(key, "not a libpq connection string (key=value pairs or a postgresql:// url)") from e
    return text


def _grants(t: Table) -> Mapping[str, tuple[str, ...]]:
    raw = t.raw("grants")
    key = t.sub("grants")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(key, 'must be a table of action = ["group_role", ...], e.g. { "db:read" = ["reader"] }')
    grants: dict[str, tuple[str, ...]] = {}
    for action, roles in raw.items():
        where = f'{key}."{action}"'
        if not action:
            raise ConfigError(where, "an action must be a non-empty string")
        ok = isinstance(roles, list) and roles and all(isinstance(r, str) and r for r in roles)
        if not ok:
            raise ConfigError(where, "must be a non-empty list of group role names")
        for role in roles:
            if len(role.encode()) > MAX_IDENTIFIER or "\x00" in role:
                raise ConfigError(where, f"a role name has at most {MAX_IDENTIFIER} bytes and no NUL")
        grants[action] = tuple(dict.fromkeys(roles))
    return MappingProxyType(grants)


def _prefix(t: Table) -> str:
    prefix = t.string("role_prefix", DEFAULT_ROLE_PREFIX)
    if not _PREFIX.fullmatch(prefix) or len(prefix) > MAX_PREFIX or prefix.startswith("pg_"):
        raise ConfigError(
            t.sub("role_prefix"), f"must be [a-z_][a-z0-9_]* of at most {MAX_PREFIX} characters, not starting pg_"
        )
    return prefix


def check_backends(backends: list[BackendConfig]) -> None:
    """Names are unique, and an audience has at most one backend.

    Raises:
        ConfigError: naming the second occurrence.
    """
    names: set[str] = set()
    audiences: set[str] = set()
    for i, b in enumerate(backends):
        if b.name in names:
            raise ConfigError(f"backends[{i}].name", f"duplicate {b.name!r}")
        if b.audience in audiences:
            raise ConfigError(f"backends[{i}].audience", f"another backend already serves {b.audience!r}")
        names.add(b.name)
        audiences.add(b.audience)
