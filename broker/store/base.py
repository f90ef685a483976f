"""The seam between the use cases and the lease table: `LeaseStore`, and the memory store.

A command is a pure planner (`Batch -> result`, see `broker.leases.batch`). The store runs it
against the current state, appends the batch it planned atomically, applies it to the local
table, and tells the committed-batch readers (the audit log) about it, on the replica that made
the change only. A planner that raises changes nothing.

`sync()` is the read barrier of the linearizable paths (Introspect, Renew, delegation): when it
returns, the local table holds every batch any replica had committed when it was called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from broker.domain.errors import CursorTooOld
from broker.leases.batch import Batch
from broker.leases.events import Event, Lease
from broker.leases.feed import new_epoch
from broker.leases.table import LeaseTable
from broker.tokens.minter import TokenMinter

T = TypeVar("T")
Committed = Callable[[Event], None]
HealthListener = Callable[[bool], None]
# Reload this replica's policy: (reloaded, policy version or why not).
Reloader = Callable[[], tuple[bool, str]]


@dataclass(frozen=True, slots=True)
class ReplicaReload:
    """What one other replica answered to a policy reload."""

    replica_id: str
    reloaded: bool
    detail: str  # the policy version, or why not


class LeaseStore(Protocol):
    """Where commands are checked and appended; the local `table` is what they build."""

    table: LeaseTable
    epoch: str
    replica_id: str
    # True when leases outlive this process (other replicas serve them after it stops), and the
    # log of lease ends does too (`ended_after` reads further back than the feed's window).
    durable: bool

    @property
    def healthy(self) -> bool:
        """False while the store cannot be reached (commands and barriers then fail closed)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, plan: Callable[[Batch], T]) -> T:
        """Run `plan` on the current state and append the batch it planned, atomically.

        Raises:
            StoreUnavailable: the store cannot be reached; nothing was appended.
            BrokerError: whatever `plan` raised; nothing was appended.
        """
        ...

    async def expire(self, now: float, *, limit: int) -> list[Lease]:
        """One expiry pass of at most `limit` heap entries; returns the leases that ended."""
        ...

    async def sync(self) -> None:
        """Bring the local table up to what the store holds now.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        ...

    async def ended_after(self, after: int, until: int, limit: int) -> list[tuple[int, Lease]]:
        """The lease ends with sequence numbers in (after, until], oldest first, at most `limit` (`durable` stores).

        Raises:
            CursorTooOld: the store no longer holds some of them.
            StoreUnavailable: the store cannot be reached.
        """
        ...

    async def rotate_keys(self) -> str:
        """Replace every replica's signing key (Revoke all); returns this replica's new kid."""
        ...

    async def refresh_keys(self) -> None:
        """Learn the public keys other replicas published (a token with an unknown kid)."""
        ...

    def on_committed(self, fn: Committed) -> None:
        """Call `fn(event)` for each event of each batch this replica appended."""
        ...

    def on_reload(self, fn: Reloader) -> None:
        """How this replica reloads its policy when another replica asks."""
        ...

    async def reload_everywhere(self) -> list[ReplicaReload]:
        """Ask every other live replica to reload its policy; what each answered."""
        ...

    def on_health(self, fn: HealthListener) -> None:
        """Call `fn(healthy)` when reachability changes."""
        ...


class MemoryStore:
    """A single broker's store: the table is the truth; nothing awaits, so a command is atomic."""

    durable = False

    def __init__(self, table: LeaseTable, *, minter: TokenMinter, replica_id: str = "memory") -> None:
        self.table = table
        self.epoch = new_epoch()
        self.replica_id = replica_id
        self._minter = minter
        self._committed: list[Committed] = []

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def execute(self, plan: Callable[[Batch], T]) -> T:
        return self.run(plan)

    def run(self, plan: Callable[[Batch], T]) -> T:
        """`execute` without the coroutine: for callers on the loop that cannot await."""
        batch = Batch(self.table)
        try:
            result = plan(batch)
        except BaseException:
            batch.restore()
            raise
        self.table.apply_batch(batch.events)
        self._tell(batch.events)
        return result

    def _tell(self, events: list[Event]) -> None:
        for event in events:
            for fn in self._committed:
                fn(event)

    async def expire(self, now: float, *, limit: int) -> list[Lease]:
        # Passes until nothing is due or the budget is spent: ends applied in one pass push the
        # tombstone and purge entries that may already be due too.
        changed: list[Lease] = []
        budget = limit
        while budget > 0 and self.table.has_due(now):
            handled: list[int] = []

            def plan(batch: Batch, left: int = budget, out: list[int] = handled) -> list[Lease]:
                ended = batch.expire_due(now, limit=left)
                out.append(batch.handled)
                return ended

            changed.extend(self.run(plan))
            budget -= handled[0]
        return changed

    async def sync(self) -> None:
        return None

    async def ended_after(self, after: int, until: int, limit: int) -> list[tuple[int, Lease]]:
        raise CursorTooOld("resume_after is older than the end events the broker keeps: list leases to resynchronise")

    async def rotate_keys(self) -> str:
        return self._minter.rotate(keep_previous_until=None)

    async def refresh_keys(self) -> None:
        return None

    def on_committed(self, fn: Committed) -> None:
        self._committed.append(fn)

    def on_health(self, fn: HealthListener) -> None:
        return None

    def on_reload(self, fn: Reloader) -> None:
        return None

    async def reload_everywhere(self) -> list[ReplicaReload]:
        return []
