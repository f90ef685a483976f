"""A clock that only moves when a test says so."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta


class FakeClock:
    """A controllable clock; `advance` wakes anything sleeping on it, from any thread."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()
        self._sleepers: list[tuple[float, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, delta: float | timedelta) -> float:
        """Move time forward by `delta` (seconds or a timedelta) and return the new time."""
        seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._now += seconds
            now = self._now
            due = [s for s in self._sleepers if s[0] <= now]
            self._sleepers = [s for s in self._sleepers if s[0] > now]
        for _, loop, fut in due:
            loop.call_soon_threadsafe(_resolve, fut)
        return now

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if deadline <= self._now:
                return
            entry = (deadline, loop, fut)
            self._sleepers.append(entry)
        try:
            await fut
        finally:
            with self._lock:
                if entry in self._sleepers:
                    self._sleepers.remove(entry)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
