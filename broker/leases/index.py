"""The lease table's state and the read-only queries over it.

`LeaseIndex` holds the lease and task records, the secondary indexes that find leases (by
task, subject, audience, holding client and parent), the expiry heap and the active count,
and answers every query. It decides nothing: `broker.leases.LeaseTable` inherits it and is
the only writer, through `apply()` and the purge of entries past their grace. The indexes
are declared, maintained (`_index`, `_unindex`) and read here, so adding one touches one
module. Methods are plain `def`s, so each call is atomic on the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from operator import attrgetter

from broker.leases.events import Lease, LeaseState, Task

_ACTIVE = LeaseState.ACTIVE
_ORDER = attrgetter("issued_at", "id")

# Heap entry kinds. At equal times a lease's own expiry pops before its task's deadline,
# so a lease whose TTL was capped by the task deadline ends EXPIRED rather than TASK_EXPIRED.
LEASE_DUE = 0
TASK_DUE = 1
TOMBSTONE_DUE = 2
TASK_PURGE = 3


def _index_add(index: dict[str, set[str]], key: str, lease_id: str) -> None:
    ids = index.get(key)
    if ids is None:
        index[key] = {lease_id}
    else:
        ids.add(lease_id)


def _index_discard(index: dict[str, set[str]], key: str, lease_id: str) -> None:
    # Empty sets are dropped so that memory stays bounded under churn.
    ids = index.get(key)
    if ids is not None:
        ids.discard(lease_id)
        if not ids:
            del index[key]


class LeaseIndex:
    """Leases (active and tombstones) and tasks as kept, with their indexes; queries only."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._tasks: dict[str, Task] = {}
        self._tasks_by_owner: dict[str, int] = {}  # kept tasks (open or closed) per owner
        self._by_task: dict[str, set[str]] = {}
        self._by_subject: dict[str, set[str]] = {}
        self._by_audience: dict[str, set[str]] = {}
        # Leases held by a client other than their subject (delegations, subject-token exchanges).
        self._by_client: dict[str, set[str]] = {}
        self._children: dict[str, set[str]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._active = 0

    def _index(self, lease: Lease) -> None:
        _index_add(self._by_task, lease.task_id, lease.id)
        _index_add(self._by_subject, lease.subject, lease.id)
        _index_add(self._by_audience, lease.audience, lease.id)
        if lease.client_id != lease.subject:
            _index_add(self._by_client, lease.client_id, lease.id)
        if lease.parent_id is not None:
            _index_add(self._children, lease.parent_id, lease.id)

    def _unindex(self, lease: Lease) -> None:
        _index_discard(self._by_task, lease.task_id, lease.id)
        _index_discard(self._by_subject, lease.subject, lease.id)
        _index_discard(self._by_audience, lease.audience, lease.id)
        if lease.client_id != lease.subject:
            _index_discard(self._by_client, lease.client_id, lease.id)
        if lease.parent_id is not None:
            _index_discard(self._children, lease.parent_id, lease.id)
        self._children.pop(lease.id, None)

    def _active_among(self, lease_ids: Iterable[str]) -> list[Lease]:
        leases = self._leases
        return sorted((leases[i] for i in lease_ids if leases[i].state is _ACTIVE), key=_ORDER)

    def _active_descendants(self, root_ids: list[str]) -> list[Lease]:
        # Breadth first and iterative: delegation chains may be deep. An ended lease never
        # has active descendants, so only active children are descended into.
        found: list[Lease] = []
        queue = deque(root_ids)
        while queue:
            for child_id in sorted(self._children.get(queue.popleft(), ())):
                child = self._leases[child_id]
                if child.state is _ACTIVE:
                    found.append(child)
                    queue.append(child_id)
        return found

    @property
    def heap(self) -> list[tuple[float, int, str]]:
        """The expiry heap of `(time, kind, id)`; only expiry planning pops it (`broker.leases.batch`)."""
        return self._heap

    def lease_ids_of_task(self, task_id: str) -> set[str]:
        """Ids of the kept leases of a task."""
        return self._by_task.get(task_id, set())

    def lease_ids_of_principal(self, principal: str) -> set[str]:
        """Ids of the kept leases issued on behalf of `principal` or held by it."""
        return self._by_subject.get(principal, set()) | self._by_client.get(principal, set())

    def active_lease_ids(self) -> list[str]:
        """Ids of every active lease."""
        return [i for i, lease in self._leases.items() if lease.state is _ACTIVE]

    def has_children(self, lease_id: str) -> bool:
        """True when some kept lease was delegated from this one."""
        return lease_id in self._children

    def has_due(self, now: float) -> bool:
        """True when some heap entry is due at `now` (possibly a stale one)."""
        return bool(self._heap) and self._heap[0][0] <= now

    def next_deadline(self) -> float | None:
        """The earliest pending heap time, or None; it may belong to a stale entry (harmless)."""
        return self._heap[0][0] if self._heap else None

    def get(self, lease_id: str) -> Lease | None:
        """The lease, active or a tombstone, or None."""
        return self._leases.get(lease_id)

    def get_task(self, task_id: str) -> Task | None:
        """The task, open or closed-but-kept, or None."""
        return self._tasks.get(task_id)

    def tasks_of(self, owner: str) -> int:
        """How many tasks (open, or closed but kept) `owner` has."""
        return self._tasks_by_owner.get(owner, 0)

    def children(self, lease_id: str) -> tuple[str, ...]:
        """Ids of the leases delegated from this one that are still kept, sorted."""
        return tuple(sorted(self._children.get(lease_id, ())))

    def counts(self) -> dict[str, int]:
        """Numbers of active leases, tombstones and kept tasks."""
        return {"active": self._active, "tombstones": len(self._leases) - self._active, "tasks": len(self._tasks)}

    def footprint(self) -> dict[str, int]:
        """Sizes of every internal structure, for tests and metrics (walks the indexes)."""
        indexes = (self._by_task, self._by_subject, self._by_audience, self._by_client, self._children)
        return {
            "leases": len(self._leases),
            "tasks": len(self._tasks),
            "heap": len(self._heap),
            "index_keys": sum(len(index) for index in indexes) + len(self._tasks_by_owner),
            "index_entries": sum(len(ids) for index in indexes for ids in index.values()),
        }

    def list(
        self,
        *,
        task_id: str | None = None,
        subject: str | None = None,
        audience: str | None = None,
        include_inactive: bool = False,
    ) -> list[Lease]:
        """Leases matching every given filter, ordered by (issued_at, id); active only by default."""
        filters = ((task_id, self._by_task), (subject, self._by_subject), (audience, self._by_audience))
        sets = [index.get(key, set()) for key, index in filters if key is not None]
        candidates = (self._leases[i] for i in min(sets, key=len)) if sets else self._leases.values()
        found = [
            lease
            for lease in candidates
            if (include_inactive or lease.state is _ACTIVE)
            and (task_id is None or lease.task_id == task_id)
            and (subject is None or lease.subject == subject)
            and (audience is None or lease.audience == audience)
        ]
        found.sort(key=_ORDER)
        return found
