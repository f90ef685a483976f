"""The integration suite runs once per lease store: the memory store and the PostgreSQL store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import Harness, Material, postgres_store, run_harness


@pytest.fixture(params=["memory", "postgres"])
def harness(request: pytest.FixtureRequest, material: Material, tmp_path: Path) -> Iterator[Harness]:
    extra = postgres_store(request.getfixturevalue("pg_dsn"), "solo") if request.param == "postgres" else ""
    yield from run_harness(material, tmp_path, extra=extra)
