"""Stand-ins for failing operating-system resources, shared by the fault tests."""

from __future__ import annotations

import errno
import io


class FullDisk:
    """A text sink that fails like a full disk (ENOSPC) while `full`, and writes through to `buffer` otherwise."""

    def __init__(self, *, full: bool = False) -> None:
        self.buffer = io.StringIO()
        self.full = full
        self.closed = False

    def write(self, text: str) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.buffer.write(text)

    def flush(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.closed = True
