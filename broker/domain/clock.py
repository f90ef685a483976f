"""Time, passed in.

Only `SystemClock` reads the wall clock. Times are POSIX seconds as floats; the core
compares and stores them as such, and converts at the edges.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time that can also be slept on."""

    def now(self) -> float:
        """The current time in POSIX seconds."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return at or after `deadline` (POSIX seconds) by this clock."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
