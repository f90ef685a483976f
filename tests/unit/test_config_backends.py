"""`[[backends]]` in `broker.toml`: typed values, and every bad one names its key."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.config.backends import BackendConfig
from broker.config.settings import load_config
from broker.domain.errors import ConfigError
from tests.unit.test_config import FILES, MINIMAL, _toml

DSN = "host=127.0.0.1 port=5432 dbname=analytics user=broker_admin password=admin-secret-1"
BACKEND: dict[str, Any] = {
    "name": "analytics",
    "kind": "postgres",
    "audience": "postgres://analytics",
    "dsn_file": "analytics-admin.dsn",
    "grants": {"db:read": ["analytics_reader"], "db:write": ["analytics_reader", "analytics_writer"]},
}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def _write(folder: Path, backends: list[dict[str, Any]]) -> Path:
    text = _toml(MINIMAL)
    for table in backends:
        text += "\n[[backends]]\n" + "".join(f"{k} = {_value(v)}\n" for k, v in table.items())
    (folder / "analytics-admin.dsn").write_text(DSN + "\n")
    path = folder / "broker.toml"
    path.write_text(text)
    return path


def test_a_backend_loads_with_its_defaults(folder: Path) -> None:
    config = load_config(_write(folder, [BACKEND]))
    (b,) = config.backends
    assert (b.name, b.kind, b.audience, b.dsn) == ("analytics", "postgres", "postgres://analytics", DSN)
    assert dict(b.grants) == {"db:read": ("analytics_reader",), "db:write": ("analytics_reader", "analytics_writer")}
    assert (b.role_prefix, b.connection_limit) == ("brk_", 4)


def test_a_dsn_may_be_given_inline_and_options_set(folder: Path) -> None:
    table = {**BACKEND, "role_prefix": "agent_", "connection_limit": 2}
    del table["dsn_file"]
    table["dsn"] = "postgresql://broker_admin@db.internal:6432/analytics"
    (b,) = load_config(_write(folder, [table])).backends
    assert (b.dsn, b.role_prefix, b.connection_limit) == (table["dsn"], "agent_", 2)


def test_no_backends_is_the_default(folder: Path) -> None:
    assert load_config(_write(folder, [])).backends == ()


def test_the_dsn_stays_out_of_repr(folder: Path) -> None:
    (b,) = load_config(_write(folder, [BACKEND])).backends
    assert "admin-secret-1" not in repr(b) and isinstance(b, BackendConfig)


@dataclass(frozen=True, slots=True)
class Bad:
    id: str
    edit: dict[str, Any]  # keys to set; None deletes
    key: str
    second: bool = False  # apply to a second backend instead of the first


BAD = [
    Bad("unknown-key", {"pool_size": 3}, "backends[0].pool_size"),
    Bad("missing-name", {"name": None}, "backends[0].name"),
    Bad("bad-name", {"name": "Analytics DB"}, "backends[0].name"),
    Bad("unknown-kind", {"kind": "mysql"}, "backends[0].kind"),
    Bad("missing-audience", {"audience": None}, "backends[0].audience"),
    Bad("no-dsn", {"dsn_file": None}, "backends[0].dsn"),
    Bad("both-dsn-and-file", {"dsn": DSN}, "backends[0].dsn"),
    Bad("dsn-file-missing", {"dsn_file": "nope.dsn"}, "backends[0].dsn_file"),
    Bad("dsn-not-a-dsn", {"dsn_file": None, "dsn": "host=x password='unterminated"}, "backends[0].dsn"),
    Bad("missing-grants", {"grants": None}, "backends[0].grants"),
    Bad("grants-not-a-table", {"grants": ["analytics_reader"]}, "backends[0].grants"),
    Bad("grants-empty", {"grants": {}}, "backends[0].grants"),
    Bad("grant-not-a-list", {"grants": {"db:read": "analytics_reader"}}, 'backends[0].grants."db:read"'),
    Bad("grant-empty-list", {"grants": {"db:read": []}}, 'backends[0].grants."db:read"'),
    Bad("grant-empty-role", {"grants": {"db:read": [""]}}, 'backends[0].grants."db:read"'),
    Bad("grant-role-too-long", {"grants": {"db:read": ["r" * 64]}}, 'backends[0].grants."db:read"'),
    Bad("prefix-empty", {"role_prefix": ""}, "backends[0].role_prefix"),
    Bad("prefix-upper-case", {"role_prefix": "Brk_"}, "backends[0].role_prefix"),
    Bad("prefix-reserved", {"role_prefix": "pg_brk_"}, "backends[0].role_prefix"),
    Bad("prefix-quote", {"role_prefix": 'brk"'}, "backends[0].role_prefix"),
    Bad("connection-limit-zero", {"connection_limit": 0}, "backends[0].connection_limit"),
    Bad("connection-limit-string", {"connection_limit": "4"}, "backends[0].connection_limit"),
    Bad("duplicate-name", {"audience": "postgres://other"}, "backends[1].name", second=True),
    Bad("two-backends-for-one-audience", {"name": "other"}, "backends[1].audience", second=True),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_a_bad_backend_names_its_key(folder: Path, case: Bad) -> None:
    table = copy.deepcopy(BACKEND)
    for k, v in case.edit.items():
        if v is None:
            table.pop(k, None)
        else:
            table[k] = v
    backends = [BACKEND, table] if case.second else [table]
    with pytest.raises(ConfigError) as info:
        load_config(_write(folder, backends))
    assert info.value.key == case.key
    assert "admin-secret-1" not in str(info.value) and "unterminated" not in str(info.value)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", b"  \n"], ids=["not-text", "empty"])
def test_an_unusable_dsn_file_names_the_key(folder: Path, content: bytes) -> None:
    path = _write(folder, [BACKEND])
    (folder / "analytics-admin.dsn").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "backends[0].dsn_file"
