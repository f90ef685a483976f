"""Shared fixtures: session-wide certificates and a real broker per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
