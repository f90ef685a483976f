"""`broker serve` runs on uvloop when it is installed, and on asyncio's loop when told to."""

from __future__ import annotations

import asyncio

import pytest

from broker.cli.serve import run


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_serve_runs_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_EVENT_LOOP", raising=False)
    assert run(_loop_module()).startswith("uvloop")


def test_broker_event_loop_asyncio_selects_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_EVENT_LOOP", "asyncio")
    assert run(_loop_module()).startswith("asyncio")
