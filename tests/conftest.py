"""Shared fixtures: session-wide certificates and a real broker per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.testing.postgres import PostgresServer
from tests.support.harness import Harness, Material, make_material, run_harness


@pytest.fixture(scope="session")
def material(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Material]:
    m = make_material(tmp_path_factory.mktemp("material"))
    try:
        yield m
    finally:
        m.issuer.close()


@pytest.fixture
def harness(material: Material, tmp_path: Path) -> Iterator[Harness]:
    yield from run_harness(material, tmp_path)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session, started in a temporary folder; never skipped."""
    with PostgresServer() as server:
        yield server


_databases = itertools.count()


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's server; its superuser DSN."""
    return postgres.create_database(f"test_{os.getpid()}_{next(_databases)}")
