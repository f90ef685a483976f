"""The call guard's rate-limited log: one line a window, with how many events it stands for."""

from __future__ import annotations

import logging

import pytest

from broker.api.guard import WindowedLog


def test_a_windowed_log_writes_once_a_window_and_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    windowed = WindowedLog("malformed requests refused", window=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="broker.api.guard")
    for _ in range(500):
        windowed.event(method="/m")
    now[0] += 59
    windowed.event(method="/m")
    assert [r.count for r in caplog.records] == [1]   # type: ignore[attr-defined]
    now[0] += 1
    windowed.event(method="/m")
    assert [r.count for r in caplog.records] == [1, 501]   # type: ignore[attr-defined]
