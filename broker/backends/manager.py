"""The configured backends at work: provision for an issuance, revoke when a lease ends, reconcile.

`Backends` reads the batches this broker committed, like the audit log: a `LeaseEnded` with a
role queues the role for revocation, so with several replicas the one that committed the end
(the revoker, the reaper that expired it, the one that completed the task) drops the role, once.
The revocation itself runs later, in one worker per backend, so a slow or absent database never
holds the event loop, the lease table or another request. A failed attempt is retried with
backoff, for as long as it takes; the pending record says how it is going.

Reconciliation lists the roles a backend made and drops every one that nothing accounts for:
a live lease in the table (any replica's, read up to now after the listing), an issuance in
flight or a pending revocation here. After a crash of a broker on the memory store (which
forgets every lease) that is all of them. On a durable store another replica may be between
making a role and granting its lease, or between ending a lease and dropping its role, so a role
is no orphan until it was made, and its lease ended, more than `orphan_grace` ago; an issuance
that could not grant its lease within `PROVISION_DEADLINE_SECONDS` of making its role fails.
Whatever a replica that died left undone is then done by the others' reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

from broker.backends.base import Backend, BackendStatus, Leases, Secret
from broker.backends.pending import (
    BROKER_STOPPED,
    ISSUANCE_FAILED,
    ORPHAN,
    MemoryPendingStore,
    PendingRevocation,
    PendingStore,
)
from broker.domain.clock import Clock
from broker.domain.errors import BackendUnavailable, BrokerError, StoreUnavailable
from broker.leases.events import Event, Lease, LeaseEnded, LeaseGranted, LeaseState
from broker.ops.audit import AuditLog
from broker.ops.metrics import BACKEND_OPS

log = logging.getLogger(__name__)

RECONCILE_SECONDS = 60.0
DRAIN_SECONDS = 5.0
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0
# Revocations attempted at once per backend: the size of its admin pool.
BATCH = 4
# An issuance grants its lease within this long of making its role, or fails and drops the role;
# the grant's commit then takes at most COMMIT_SECONDS more (the store's statement timeout is
# 10 s). On a durable store a role younger than both (plus the replicas' clock skew) may still
# get its lease on another replica, and a lease ended that recently is its ender's to drop.
PROVISION_DEADLINE_SECONDS = 30.0
COMMIT_SECONDS = 30.0
ORPHAN_GRACE_SECONDS = PROVISION_DEADLINE_SECONDS + COMMIT_SECONDS

StatusListener = Callable[[str, BackendStatus], None]


def retry_delay(attempts: int) -> float:
    """Seconds before the next try after `attempts` failures: 1, 2, 4, ... capped at a minute."""
    return min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, attempts - 1))


class Backends:
    """Every configured backend by name and audience, with its issuances in flight and pending revocations."""

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        clock: Clock,
        audit: AuditLog,
        leases: Leases,
        store: PendingStore | None = None,
        reconcile_every: float = RECONCILE_SECONDS,
        clock_skew: float = 0.0,
    ) -> None:
        self._by_name = {b.name: b for b in backends}
        self._by_audience = {b.audience: b for b in backends}
        self._clock = clock
        self._audit = audit
        self._leases = leases
        self._store: PendingStore = store if store is not None else MemoryPendingStore()
        self._every = reconcile_every
        # One broker sees every issuance it makes: no other can be making a role meanwhile.
        self._grace = ORPHAN_GRACE_SECONDS + clock_skew if leases.durable else 0.0
        self._in_flight: dict[str, dict[str, float]] = {b.name: {} for b in backends}  # role -> made at
        self._dropped: dict[str, set[str]] = {b.name: set() for b in backends}  # since the last listing began
        self._wakes = {b.name: asyncio.Event() for b in backends}
        self._seen: dict[str, bool] = {}
        self._listeners: list[StatusListener] = []
        self._tasks: list[asyncio.Task] = []

    # ---- what the use cases ask ----

    def for_audience(self, audience: str) -> Backend | None:
        return self._by_audience.get(audience)

    def check_grants(self, audience: str, actions: tuple[str, ...]) -> None:
        """Raises: PermissionDenied when the audience's backend grants nothing for one of `actions`."""
        backend = self._by_audience.get(audience)
        if backend is not None:
            backend.groups_for(actions)

    async def provision(self, backend: Backend, actions: tuple[str, ...], expires_at: float) -> tuple[str, Secret]:
        """A new role for an issuance; it stays "in flight" until `committed` or `discard`.

        Raises:
            PermissionDenied: an action has no grants.
            BackendUnavailable: the role could not be created (nothing was left behind).
        """
        groups = backend.groups_for(actions)
        role = backend.new_role()
        made_at = self._clock.now()
        self._in_flight[backend.name][role] = made_at
        try:
            secret = await backend.provision(role, groups, expires_at, created_at=made_at)
        except BaseException as e:
            self._in_flight[backend.name].pop(role, None)
            self._count(backend, "provision", "error")
            if isinstance(e, asyncio.CancelledError):
                # The caller went away mid-statement: the role may exist, so drop it to be sure.
                self._enqueue(backend.name, role, lease_id="", task_id="", cause=ISSUANCE_FAILED)
            raise
        self._count(backend, "provision", "ok")
        return role, secret

    def check_in_time(self, backend: str, role: str) -> None:
        """For the grant's atomic step: the role is still young enough to be granted a lease.

        Raises:
            BackendUnavailable: the role was made more than `PROVISION_DEADLINE_SECONDS` ago (or
                is no longer in flight); another replica may take it for an orphan by now.
        """
        made_at = self._in_flight[backend].get(role)
        if made_at is None or self._clock.now() - made_at > PROVISION_DEADLINE_SECONDS:
            raise BackendUnavailable(f"backend {backend}: the issuance took too long, try again")

    def committed(self, backend: str, role: str) -> None:
        """The lease for `role` is granted: the lease accounts for it now."""
        self._in_flight[backend].pop(role, None)

    def discard(self, backend: str, role: str, *, lease_id: str, task_id: str) -> None:
        """The issuance failed after the role was made: drop the role."""
        self._in_flight[backend].pop(role, None)
        self._enqueue(backend, role, lease_id=lease_id, task_id=task_id, cause=ISSUANCE_FAILED)

    async def renew(self, lease: Lease, expires_at: float) -> Secret:
        """Move the lease's role's expiry; returns the secret without its password.

        Raises:
            BackendUnavailable: the backend is unreachable, unknown, or refused.
        """
        backend = self._backend_of(lease)
        try:
            await backend.renew(str(lease.role), expires_at)
        except BaseException:
            self._count(backend, "renew", "error")
            raise
        self._count(backend, "renew", "ok")
        return backend.view(str(lease.role), expires_at)

    def view(self, lease: Lease) -> Secret | None:
        """The lease's secret without its password, or None for a lease without one."""
        if lease.backend is None or lease.role is None or lease.backend not in self._by_name:
            return None
        return self._by_name[lease.backend].view(lease.role, lease.expires_at)

    def _backend_of(self, lease: Lease) -> Backend:
        backend = self._by_name.get(lease.backend or "")
        if backend is None or lease.role is None:
            raise BackendUnavailable(f"backend {lease.backend} is not configured")
        return backend

    # ---- what operators see ----

    @property
    def orphan_grace(self) -> float:
        """Seconds a role is spared by reconciliation after it was made or its lease ended."""
        return self._grace

    def pending_for(self, lease_id: str) -> PendingRevocation | None:
        return self._store.for_lease(lease_id)

    def pending(self, backend: str | None = None) -> list[PendingRevocation]:
        return sorted(self._store.all(backend), key=lambda r: (r.since, r.role))

    def statuses(self) -> dict[str, BackendStatus]:
        return {name: b.status for name, b in self._by_name.items()}

    def names(self) -> list[str]:
        return list(self._by_name)

    def on_status(self, listener: StatusListener) -> None:
        """Call `listener(name, status)` whenever a backend goes up or down."""
        self._listeners.append(listener)

    # ---- the lease table's events ----

    def on_event(self, event: Event) -> None:
        """Reader of committed batches: a granted role is the lease's; an ended lease's role is queued."""
        if isinstance(event, LeaseGranted):
            lease = event.lease
            if lease.backend in self._by_name and lease.role:
                self._in_flight[lease.backend].pop(lease.role, None)
        elif isinstance(event, LeaseEnded):
            lease = event.lease
            if lease.backend in self._by_name and lease.role:
                cause = lease.reason.value if lease.reason else "ended"
                self._enqueue(lease.backend, lease.role, lease_id=lease.id, task_id=lease.task_id, cause=cause)

    def _enqueue(self, backend: str, role: str, *, lease_id: str, task_id: str, cause: str) -> None:
        now = self._clock.now()
        record = PendingRevocation(
            backend=backend, role=role, lease_id=lease_id, task_id=task_id, cause=cause, since=now, next_attempt_at=now
        )
        if self._store.add(record):
            self._wakes[backend].set()

    # ---- the loops ----

    async def start(self) -> None:
        """Open every backend and start its revocation worker and reconciliation loop (the first pass now)."""
        for backend in self._by_name.values():
            await backend.open()
            self._tasks.append(asyncio.create_task(self._revoker(backend), name=f"revoker-{backend.name}"))
            self._tasks.append(asyncio.create_task(self._maintain(backend), name=f"reconcile-{backend.name}"))

    async def close(self, *, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Stop the loops and drop what is pending; on the memory store, the roles of every live lease too.

        With the memory store a stopped broker's leases are gone: no lease accounts for their
        roles any more, so they are dropped now. With a durable store the leases live on, served
        by the other replicas (or this one after a restart), and their ends drop the roles: they
        are left alone. One attempt each, within `drain_seconds`; what is left is dropped by a
        reconciliation (the next start's, or another replica's), or refused by PostgreSQL at its
        VALID UNTIL.
        """
        self._listeners.clear()  # the health service is shutting down too
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if not self._leases.durable:
            live = [lease for b in self._by_name.values() for lease in self._leases_of(b)]
            for lease in live:
                if lease.state is LeaseState.ACTIVE and lease.backend and lease.role:
                    self._enqueue(
                        lease.backend, lease.role, lease_id=lease.id, task_id=lease.task_id, cause=BROKER_STOPPED
                    )
        attempts = [self._attempt(self._by_name[r.backend], r) for r in self._store.all()]
        if attempts:
            try:
                await asyncio.wait_for(asyncio.gather(*attempts), drain_seconds)
            except TimeoutError:
                log.warning("roles left for the next start", extra={"pending": len(self._store.all())})
        for backend in self._by_name.values():
            await backend.close()

    async def reconcile(self, name: str) -> int:
        """Queue for revocation every role of backend `name` that nothing accounts for; returns how many.

        Raises:
            BackendUnavailable: the backend cannot be listed.
            StoreUnavailable: a durable store cannot be read up to now (no role is judged then).
        """
        backend = self._by_name[name]
        self._dropped[name].clear()
        started = self._clock.now()
        try:
            present = await backend.roles()
        except BaseException:
            self._count(backend, "reconcile", "error")
            raise
        finally:
            self._status_changed(backend)
        self._count(backend, "reconcile", "ok")
        if self._leases.durable:
            # After the listing: a lease granted (anywhere) for a listed role is in the table now.
            await self._leases.sync()
        # Computed after the last await, with no await until the queueing: nothing can slip in between.
        cutoff = started - self._grace
        keep = self._accounted(backend, ended_after=cutoff)
        orphans = sorted(role for role, made_at in present.items() if made_at <= cutoff and role not in keep)
        for role in orphans:
            log.warning("orphaned role found", extra={"backend": name, "role": role})
            self._audit.record("backend.orphan_found", backend=name, role=role)
            self._enqueue(name, role, lease_id="", task_id="", cause=ORPHAN)
        return len(orphans)

    def _leases_of(self, backend: Backend) -> list[Lease]:
        return [
            lease
            for lease in self._leases.table.list(audience=backend.audience, include_inactive=True)
            if lease.backend == backend.name
        ]

    def _accounted(self, backend: Backend, *, ended_after: float) -> set[str]:
        """The roles something accounts for: a live lease (any replica's), a lease that ended after
        `ended_after` (its ender drops the role), an issuance in flight or a pending revocation here."""
        name = backend.name
        keep = set(self._in_flight[name]) | {r.role for r in self._store.all(name)}
        keep |= self._dropped[name]  # listed while the revoker was dropping it: not an orphan
        for lease in self._leases_of(backend):
            if lease.role and (lease.state is LeaseState.ACTIVE or (lease.ended_at or 0.0) > ended_after):
                keep.add(lease.role)
        return keep

    async def _maintain(self, backend: Backend) -> None:
        while True:
            try:
                await self.reconcile(backend.name)
            except (BackendUnavailable, StoreUnavailable):
                pass  # logged where it failed, and health says so; the next pass tries again
            except Exception:
                log.exception("reconciliation failed", extra={"backend": backend.name})
            await self._clock.sleep_until(self._clock.now() + self._every)

    async def _revoker(self, backend: Backend) -> None:
        wake = self._wakes[backend.name]
        while True:
            wake.clear()  # before looking, so an enqueue from here on wakes the sleep below
            now = self._clock.now()
            records = self._store.all(backend.name)
            due = [r for r in records if r.next_attempt_at <= now]
            if due:
                await asyncio.gather(*(self._attempt(backend, r) for r in due[:BATCH]))
                continue
            await _sleep(self._clock, min((r.next_attempt_at for r in records), default=None), wake)

    async def _attempt(self, backend: Backend, record: PendingRevocation) -> None:
        try:
            existed = await backend.revoke(record.role)
        except Exception as e:  # never abandoned: whatever went wrong, the role is tried again later
            if not isinstance(e, BrokerError):
                log.exception("revocation failed unexpectedly", extra={"backend": backend.name, "role": record.role})
            self._failed(backend, record, e.reason if isinstance(e, BrokerError) else type(e).__name__)
            return
        self._store.remove(record.key)
        self._dropped[backend.name].add(record.role)
        if not existed:
            # Never made, or dropped meanwhile by another replica or by hand: not this one's change to record.
            log.info("role already gone", extra={"backend": backend.name, "role": record.role})
            self._status_changed(backend)
            return
        self._count(backend, "revoke", "ok")
        log.info("role revoked", extra={"backend": backend.name, "role": record.role, "lease_id": record.lease_id})
        self._audit.record(
            "backend.role_dropped",
            backend=backend.name,
            role=record.role,
            lease_id=record.lease_id or None,
            task_id=record.task_id or None,
            cause=record.cause,
            attempts=record.attempts + 1,
        )

    def _failed(self, backend: Backend, record: PendingRevocation, error: str) -> None:
        delay = retry_delay(record.attempts + 1)
        updated = record.failed(error, next_attempt_at=self._clock.now() + delay)
        self._store.update(updated)
        self._count(backend, "revoke", "error")
        fields = {"backend": backend.name, "role": record.role, "lease_id": record.lease_id or None}
        log.warning("revocation failed, will retry", extra={**fields, "attempts": updated.attempts, "error": error})
        self._audit.record("backend.revoke_failed", **fields, attempts=updated.attempts, error=error, retry_in=delay)

    def _status_changed(self, backend: Backend) -> None:
        status = backend.status
        if self._seen.get(backend.name) == status.up:
            return
        came_back = self._seen.get(backend.name) is False and status.up
        self._seen[backend.name] = status.up
        if came_back:
            # What waited for the database goes now rather than at its backoff's end.
            now = self._clock.now()
            for record in self._store.all(backend.name):
                self._store.update(dataclasses.replace(record, next_attempt_at=now))
            self._wakes[backend.name].set()
        for listener in self._listeners:
            listener(backend.name, status)

    def _count(self, backend: Backend, op: str, result: str) -> None:
        BACKEND_OPS.labels(backend.name, op, result).inc()
        self._status_changed(backend)


async def _sleep(clock: Clock, deadline: float | None, wake: asyncio.Event) -> None:
    """Until `deadline` by `clock` (or forever when None), or until `wake` is set."""
    waiters = [asyncio.ensure_future(wake.wait())]
    if deadline is not None:
        waiters.append(asyncio.ensure_future(clock.sleep_until(deadline)))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
