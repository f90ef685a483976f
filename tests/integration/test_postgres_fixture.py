"""The suite's own PostgreSQL: real, password-checked on TCP, and stoppable for outage tests."""

from __future__ import annotations

import psycopg
import pytest

from broker.testing.postgres import PostgresServer, wheel_bindir


def test_the_session_server_answers_queries(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select current_database()").fetchone()[0].startswith("test_")


def test_a_wrong_password_is_refused(postgres: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.dsn(password="not-the-password"))


def test_a_stopped_server_refuses_then_serves_again_on_the_same_port() -> None:
    with PostgresServer() as server:
        port = server.port
        server.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn())
        server.start()
        assert server.port == port
        with psycopg.connect(server.dsn()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_pip_installed_server_stands_in_where_the_machine_has_none() -> None:
    bindir = wheel_bindir()
    assert bindir is not None, "pgserver is a test dependency: the suite needs it where no PostgreSQL is installed"
    with PostgresServer(bindir) as server, psycopg.connect(server.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
