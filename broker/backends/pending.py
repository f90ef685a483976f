"""Pending revocations: a small record per downstream role still to drop, and the store that holds them.

A record is plain data (`to_dict` / `from_dict`), so the store can move from memory to a shared
table without changing the revoker: any replica could then finish what another began.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

ISSUANCE_FAILED = "issuance_failed"
ORPHAN = "orphan"
BROKER_STOPPED = "broker_stopped"


@dataclass(frozen=True, slots=True)
class PendingRevocation:
    """A role to drop: why (`cause`: the lease's end reason, `issuance_failed`, `orphan` or
    `broker_stopped`), and how it is going.

    `lease_id` is empty for an orphan found by reconciliation. `last_error` is a short reason
    from the backend, never a password.
    """

    backend: str
    role: str
    lease_id: str
    task_id: str
    cause: str
    since: float
    next_attempt_at: float
    attempts: int = 0
    last_error: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.backend, self.role)

    def failed(self, error: str, *, next_attempt_at: float) -> PendingRevocation:
        return replace(self, attempts=self.attempts + 1, last_error=error, next_attempt_at=next_attempt_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PendingRevocation:
        return cls(**data)


class PendingStore(Protocol):
    """Where pending revocations live until their role is dropped."""

    def add(self, record: PendingRevocation) -> bool:
        """Keep `record` unless its role is already pending; True when it was added."""
        ...

    def update(self, record: PendingRevocation) -> None: ...

    def remove(self, key: tuple[str, str]) -> None: ...

    def for_lease(self, lease_id: str) -> PendingRevocation | None: ...

    def all(self, backend: str | None = None) -> list[PendingRevocation]: ...


class MemoryPendingStore:
    """Pending revocations in memory (they die with the process; a start's reconciliation covers that)."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], PendingRevocation] = {}
        self._by_lease: dict[str, tuple[str, str]] = {}

    def add(self, record: PendingRevocation) -> bool:
        if record.key in self._records:
            return False
        self._records[record.key] = record
        if record.lease_id:
            self._by_lease[record.lease_id] = record.key
        return True

    def update(self, record: PendingRevocation) -> None:
        if record.key in self._records:
            self._records[record.key] = record

    def remove(self, key: tuple[str, str]) -> None:
        record = self._records.pop(key, None)
        if record is not None and record.lease_id:
            self._by_lease.pop(record.lease_id, None)

    def for_lease(self, lease_id: str) -> PendingRevocation | None:
        key = self._by_lease.get(lease_id)
        return self._records.get(key) if key is not None else None

    def all(self, backend: str | None = None) -> list[PendingRevocation]:
        return [r for r in self._records.values() if backend is None or r.backend == backend]
