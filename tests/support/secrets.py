"""Dynamic-secret test kit: a database with group roles and tables, and a broker whose backend serves it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from broker._proto import broker_pb2 as pb
from broker.testing.clock import FakeClock
from broker.testing.postgres import PostgresServer
from tests.support.harness import Harness, Material, RunningBroker, write_config

AUDIENCE = "postgres://analytics"
RESOURCE = "db:analytics"
BACKEND = "analytics"

SECRET_POLICY = """
@id("agents-use-analytics")
permit (principal in Team::"agents", action in [Action::"db:read", Action::"db:write", Action::"db:admin"],
        resource == Resource::"db:analytics");

@id("analytics-export-needs-approval")
@approval("required")
permit (principal in Team::"agents", action == Action::"db:export", resource == Resource::"db:analytics");
"""


@dataclass(frozen=True, slots=True)
class Analytics:
    """One test's database: group roles (cluster-wide, so named after the database) and a role prefix."""

    server: PostgresServer
    dsn: str
    dbname: str
    reader: str
    writer: str
    prefix: str

    def sql(self, statement: str, params: tuple = ()) -> list[tuple]:
        """Run one statement as the superuser in this database."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def roles(self) -> set[str]:
        """Every role with this test's prefix that exists now."""
        rows = self.sql("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (self.prefix,))
        return {row[0] for row in rows}

    def valid_until(self, role: str) -> float | None:
        rows = self.sql("SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (role,))
        return rows[0][0].timestamp() if rows and rows[0][0] is not None else None

    def backend_toml(self, dsn_file: Path, *, grants: str = "", extra: str = "") -> str:
        grants = grants or f'{{ "db:read" = ["{self.reader}"], "db:write" = ["{self.reader}", "{self.writer}"], ' \
                           f'"db:export" = ["{self.reader}"] }}'
        return f"""
[[backends]]
name = "{BACKEND}"
kind = "postgres"
audience = "{AUDIENCE}"
dsn_file = "{dsn_file}"
grants = {grants}
role_prefix = "{self.prefix}"
{extra}
"""


def make_analytics(server: PostgresServer, dsn: str) -> Analytics:
    dbname = str(conninfo_to_dict(dsn)["dbname"])
    db = Analytics(server=server, dsn=dsn, dbname=dbname, reader=f"{dbname}_reader", writer=f"{dbname}_writer",
                   prefix=f"brk_{dbname.removeprefix('test_')}_")
    for statement in (
        f"CREATE ROLE {db.reader} NOLOGIN",
        f"CREATE ROLE {db.writer} NOLOGIN",
        "CREATE TABLE sales (id int, amount int)",
        "INSERT INTO sales VALUES (1, 100), (2, 250)",
        "CREATE TABLE payroll (id int, salary int)",
        f"GRANT SELECT ON sales TO {db.reader}",
        f"GRANT INSERT ON sales TO {db.writer}",
        "CREATE SCHEMA scratch",
        f"GRANT USAGE, CREATE ON SCHEMA scratch TO {db.writer}",
    ):
        db.sql(statement)
    return db


def start_broker(material: Material, folder: Path, db: Analytics, *, clock: FakeClock | None = None,
                 dsn: str | None = None, grants: str = "", store: str = "", http: bool = True) -> Harness:
    """A broker (audit in `folder/audit.jsonl`, HTTP on unless told) whose backend `analytics` serves `db`;
    `store` is an optional `[store]` section (a replica sharing a postgres store)."""
    dsn_file = folder / "analytics-admin.dsn"
    dsn_file.write_text((dsn or db.dsn) + "\n")
    config = write_config(material, folder, extra=db.backend_toml(dsn_file, grants=grants) + store, http=http)
    with (folder / "policy.cedar").open("a") as f:
        f.write(SECRET_POLICY)
    return Harness(broker=RunningBroker(config, clock or FakeClock()), material=material)


def stop(harness: Harness) -> None:
    harness.close()
    harness.broker.stop()


def running(harness: Harness) -> Iterator[Harness]:
    try:
        yield harness
    finally:
        stop(harness)


def audit_records(harness: Harness, kind: str) -> list[dict]:
    """The records of `kind` in the broker's audit log, in order."""
    lines = (harness.broker.config_path.parent / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def db_request(task_id: str = "task-db", actions=("db:read",), **kw) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=task_id, audience=AUDIENCE, actions=list(actions), resource=RESOURCE, **kw)


def wait_until(predicate: Callable[[], object], *, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def login(secret: pb.Secret, **kw) -> psycopg.Connection:
    """A connection as the agent would open it, from the secret's own dsn."""
    return psycopg.connect(secret.fields["dsn"], autocommit=True, **kw)


def login_refused(dsn: str) -> bool:
    """True when PostgreSQL refuses a new login with `dsn`."""
    try:
        psycopg.connect(dsn, autocommit=True, connect_timeout=5).close()
    except psycopg.OperationalError:
        return True
    return False
