"""The backend manager with a fake backend: events drive revocation, failures retry, reconcile spares the live."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from broker.backends.base import BackendStatus, Secret, frozen
from broker.backends.manager import (
    ORPHAN_GRACE_SECONDS,
    PROVISION_DEADLINE_SECONDS,
    RECONCILE_SECONDS,
    Backends,
    retry_delay,
)
from broker.backends.pending import MemoryPendingStore, PendingRevocation
from broker.backends.postgres import PostgresBackend
from broker.config.backends import BackendConfig
from broker.domain.errors import BackendUnavailable, PermissionDenied
from broker.leases.events import Lease, LeaseEnded, Reason
from broker.leases.table import LeaseTable
from broker.ops.audit import AuditLog
from broker.testing.clock import FakeClock

T0 = 1_700_000_000.0


@dataclass
class FakeBackend:
    """Roles in a set; `failures` makes the next revocations fail."""

    name: str = "analytics"
    audience: str = "postgres://analytics"
    status: BackendStatus = field(default_factory=lambda: BackendStatus(up=True))
    present: set[str] = field(default_factory=set)
    made_at: dict[str, float] = field(default_factory=dict)  # a role without an entry counts as old
    failures: int = 0
    revoked: list[str] = field(default_factory=list)
    counter: int = 0

    def groups_for(self, actions: tuple[str, ...]) -> tuple[str, ...]:
        if "db:admin" in actions:
            raise PermissionDenied("backend analytics grants no role for action db:admin")
        return ("reader",)

    def new_role(self) -> str:
        self.counter += 1
        return f"brk_{self.counter}"

    def view(self, role: str, expires_at: float) -> Secret:
        return Secret(backend=self.name, fields=frozen({"username": role}), expires_at=expires_at)

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def provision(self, role: str, groups: tuple[str, ...], expires_at: float, *, created_at: float) -> Secret:
        self.present.add(role)
        self.made_at[role] = created_at
        return Secret(backend=self.name, fields=frozen({"username": role, "password": "pw"}), expires_at=expires_at)

    async def renew(self, role: str, expires_at: float) -> None: ...

    async def revoke(self, role: str) -> bool:
        if self.failures:
            self.failures -= 1
            self.status = BackendStatus(up=False, error="connection refused")
            raise BackendUnavailable("backend analytics: connection refused")
        self.status = BackendStatus(up=True)
        if role not in self.present:
            return False
        self.present.discard(role)
        self.revoked.append(role)
        return True

    async def roles(self) -> dict[str, float]:
        self.status = BackendStatus(up=True)
        return {role: self.made_at.get(role, 0.0) for role in self.present}


@dataclass
class FakeLeases:
    """The lease store as the backends read it; `on_sync` runs at the read barrier (another
    replica's commit arriving)."""

    table: LeaseTable
    durable: bool = False
    on_sync: list = field(default_factory=list)

    async def sync(self) -> None:
        while self.on_sync:
            self.on_sync.pop(0)()


@dataclass
class Kit:
    clock: FakeClock
    backend: FakeBackend
    backends: Backends
    leases: LeaseTable
    audit: io.StringIO
    store: FakeLeases
    deafen: Callable[[], None]  # from then on, what the table applies was committed by another replica


def make_kit(*, durable: bool) -> Kit:
    clock = FakeClock(start=T0)
    sink = io.StringIO()
    backend = FakeBackend()
    store = FakeLeases(LeaseTable(), durable=durable)
    backends = Backends([backend], clock=clock, audit=AuditLog(sink, clock=clock), leases=store, clock_skew=30)
    deafen = store.table.subscribe(backends.on_event)
    return Kit(clock, backend, backends, store.table, sink, store, deafen)


@pytest.fixture
def kit() -> Kit:
    """One broker on the memory store: its table holds every lease there is."""
    return make_kit(durable=False)


@pytest.fixture
def shared() -> Kit:
    """One replica on a durable store (its table is fed by the others' commits too)."""
    return make_kit(durable=True)


def grant(kit: Kit, role: str, lease_id: str = "l1") -> Lease:
    now = kit.clock.now()
    if kit.leases.get_task("t") is None:
        kit.leases.open_task("t", "spiffe://example.org/a", now=now, deadline=now + 3600)
    lease = Lease(id=lease_id, task_id="t", subject="spiffe://example.org/a", client_id="spiffe://example.org/a",
                  audience=kit.backend.audience, scope=("db:read",), resource="db", issued_at=now,
                  expires_at=now + 60, token_exp=now + 60, backend=kit.backend.name, role=role)
    return kit.leases.grant(lease, now=now)


async def start_and_revoke(kit: Kit, *, failures: int) -> None:
    """Start the manager, grant a lease with role `brk_x`, revoke it; the next `failures` drops fail."""
    kit.backend.present.add("brk_x")
    kit.backend.failures = failures
    await kit.backends.start()
    grant(kit, "brk_x")
    kit.leases.revoke("l1", Reason.OPERATOR, now=kit.clock.now(), initiator="op")


async def settle(condition, *, rounds: int = 200) -> None:
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_retry_delay_doubles_from_one_second_up_to_a_minute() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4, 7, 8, 50)] == [1, 2, 4, 8, 60, 60, 60]


def test_a_pending_record_round_trips_through_plain_data() -> None:
    record = PendingRevocation(backend="a", role="brk_1", lease_id="l", task_id="t", cause="OPERATOR",
                               since=T0, next_attempt_at=T0 + 1, attempts=2, last_error="down")
    assert PendingRevocation.from_dict(record.to_dict()) == record


def test_the_store_keeps_one_record_per_role() -> None:
    store = MemoryPendingStore()
    record = PendingRevocation(backend="a", role="r", lease_id="l", task_id="t", cause="x", since=T0,
                               next_attempt_at=T0)
    assert store.add(record) and not store.add(record)
    assert store.for_lease("l") == record
    store.remove(record.key)
    assert store.all() == [] and store.for_lease("l") is None


def test_a_secret_never_shows_its_fields_in_repr() -> None:
    secret = Secret(backend="a", fields=frozen({"password": "hunter2-very-secret"}), expires_at=T0)
    assert "hunter2" not in repr(secret)


def test_groups_are_the_union_of_the_actions_grants_and_a_missing_action_is_named() -> None:
    config = BackendConfig(name="analytics", kind="postgres", audience="postgres://a", dsn="host=x dbname=d",
                           grants={"db:read": ("r",), "db:write": ("r", "w")})
    backend = PostgresBackend(config)
    assert backend.groups_for(("db:read", "db:write")) == ("r", "w")
    with pytest.raises(PermissionDenied, match=r"analytics.*db:drop"):
        backend.groups_for(("db:read", "db:drop"))


def test_an_ended_lease_queues_its_role_and_the_worker_drops_it(kit: Kit) -> None:
    async def run() -> None:
        await start_and_revoke(kit, failures=0)
        assert kit.backends.pending_for("l1") is not None  # queued in the same step as the end
        await settle(lambda: kit.backend.revoked == ["brk_x"])
        assert kit.backends.pending_for("l1") is None
        await kit.backends.close()

    asyncio.run(run())
    assert '"kind":"backend.role_dropped"' in kit.audit.getvalue()


def test_a_failing_revocation_is_retried_after_its_backoff_and_never_dropped(kit: Kit) -> None:
    async def run() -> None:
        await start_and_revoke(kit, failures=3)
        for attempts in (1, 2, 3):
            await settle(lambda n=attempts: (kit.backends.pending_for("l1") or _none()).attempts == n)
            record = kit.backends.pending_for("l1")
            assert record.last_error == "backend analytics: connection refused"
            assert record.next_attempt_at == kit.clock.now() + retry_delay(attempts)
            kit.clock.advance(retry_delay(attempts))
        await settle(lambda: kit.backend.revoked == ["brk_x"])
        assert kit.backends.pending() == []
        await kit.backends.close()

    asyncio.run(run())
    assert kit.audit.getvalue().count('"kind":"backend.revoke_failed"') == 3


def test_reconcile_spares_live_leases_and_issuances_in_flight(kit: Kit) -> None:
    async def run() -> None:
        kit.backend.present |= {"brk_live", "brk_orphan"}
        grant(kit, "brk_live")
        role, _ = await kit.backends.provision(kit.backend, ("db:read",), kit.clock.now() + 60)  # not yet granted
        assert await kit.backends.reconcile("analytics") == 1
        assert {r.role for r in kit.backends.pending()} == {"brk_orphan"}
        assert role in kit.backend.present

    asyncio.run(run())


def test_a_backend_that_comes_back_retries_its_pending_at_once(kit: Kit) -> None:
    async def run() -> None:
        await start_and_revoke(kit, failures=1)
        await settle(lambda: (kit.backends.pending_for("l1") or _none()).attempts == 1)
        await kit.backends.reconcile("analytics")  # the backend answers again: no need to wait for the backoff
        await settle(lambda: kit.backend.revoked == ["brk_x"])
        await kit.backends.close()

    asyncio.run(run())


def _none() -> PendingRevocation:
    return PendingRevocation(backend="", role="", lease_id="", task_id="", cause="", since=0, next_attempt_at=0)


def test_an_issuance_cancelled_while_the_role_was_being_made_queues_the_role_for_dropping(kit: Kit) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow_provision(role: str, groups: tuple[str, ...], expires_at: float, *, created_at: float) -> Secret:
        kit.backend.present.add(role)  # the statement reached the database...
        entered.set()
        await release.wait()  # ...and the caller goes away before it is confirmed
        raise AssertionError("not reached")

    kit.backend.provision = slow_provision  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.ensure_future(kit.backends.provision(kit.backend, ("db:read",), kit.clock.now() + 60))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert [(r.role, r.cause) for r in kit.backends.pending()] == [("brk_1", "issuance_failed")]


def test_closing_drops_the_roles_of_live_leases(kit: Kit) -> None:
    async def run() -> None:
        kit.backend.present.add("brk_live")
        await kit.backends.start()
        grant(kit, "brk_live")
        await kit.backends.close()

    asyncio.run(run())
    assert kit.backend.revoked == ["brk_live"]
    assert '"cause":"broker_stopped"' in kit.audit.getvalue()


def test_reconciliation_runs_at_start_and_again_every_interval(kit: Kit) -> None:
    async def run() -> None:
        kit.backend.present.add("brk_before")
        await kit.backends.start()
        await settle(lambda: "brk_before" in kit.backend.revoked)
        kit.backend.present.add("brk_later")  # appears behind the broker's back
        await asyncio.sleep(0)
        assert "brk_later" not in kit.backend.revoked
        kit.clock.advance(RECONCILE_SECONDS)
        await settle(lambda: "brk_later" in kit.backend.revoked)
        await kit.backends.close()

    asyncio.run(run())


# -- on a durable store, shared by replicas ----------------------------------------------------------


def test_closing_on_a_durable_store_leaves_the_roles_of_live_leases_and_drops_what_is_pending(shared: Kit) -> None:
    async def run() -> None:
        shared.backend.present |= {"brk_live", "brk_ended"}
        await shared.backends.start()
        grant(shared, "brk_live", "l1")
        grant(shared, "brk_ended", "l2")
        shared.leases.revoke("l2", Reason.OPERATOR, now=shared.clock.now(), initiator="op")
        await shared.backends.close()

    asyncio.run(run())
    assert shared.backend.revoked == ["brk_ended"] and "brk_live" in shared.backend.present
    assert '"cause":"broker_stopped"' not in shared.audit.getvalue()


def test_reconcile_reads_the_store_after_listing_so_a_lease_granted_meanwhile_keeps_its_role(shared: Kit) -> None:
    async def run() -> int:
        shared.backend.present.add("brk_other")  # made (long ago) by another replica...
        shared.store.on_sync.append(lambda: grant(shared, "brk_other"))  # ...whose grant arrives now
        return await shared.backends.reconcile("analytics")

    assert asyncio.run(run()) == 0
    assert shared.backends.pending() == []


def test_on_a_durable_store_a_role_is_no_orphan_until_older_than_the_grace(shared: Kit) -> None:
    async def run() -> list[int]:
        shared.backend.present.add("brk_young")
        shared.backend.made_at["brk_young"] = T0  # made just now, by another replica still granting
        found = [await shared.backends.reconcile("analytics")]
        shared.clock.advance(shared.backends.orphan_grace)
        found.append(await shared.backends.reconcile("analytics"))
        return found

    assert asyncio.run(run()) == [0, 1]
    assert shared.backends.orphan_grace == ORPHAN_GRACE_SECONDS + 30
    assert [r.role for r in shared.backends.pending()] == ["brk_young"]


def test_the_role_of_a_lease_ended_elsewhere_is_left_to_its_ender_for_the_grace(shared: Kit) -> None:
    async def run() -> list[int]:
        shared.backend.present.add("brk_x")
        # Another replica ended the lease (this one did not commit it, so queues nothing)...
        lease = grant(shared, "brk_x")
        shared.deafen()
        now = shared.clock.now()
        shared.leases.apply(LeaseEnded(lease.ended(Reason.OPERATOR, at=now, initiator="op"), at=now))
        found = [await shared.backends.reconcile("analytics")]  # ...and is dropping the role
        shared.clock.advance(shared.backends.orphan_grace + 1)  # it did not (it died): the role is an orphan
        found.append(await shared.backends.reconcile("analytics"))
        return found

    assert asyncio.run(run()) == [0, 1]


def test_a_memory_store_has_no_grace_every_unaccounted_role_is_an_orphan(kit: Kit) -> None:
    kit.backend.present.add("brk_new")
    kit.backend.made_at["brk_new"] = T0
    assert asyncio.run(kit.backends.reconcile("analytics")) == 1


def test_a_lease_may_be_granted_for_a_role_only_within_the_provisioning_deadline(shared: Kit) -> None:
    async def run() -> None:
        role, _ = await shared.backends.provision(shared.backend, ("db:read",), shared.clock.now() + 60)
        shared.clock.advance(PROVISION_DEADLINE_SECONDS)
        shared.backends.check_in_time("analytics", role)
        shared.clock.advance(1)
        with pytest.raises(BackendUnavailable, match="took too long"):
            shared.backends.check_in_time("analytics", role)

    asyncio.run(run())


def test_a_role_already_gone_is_not_recorded_as_dropped_by_this_replica(shared: Kit) -> None:
    async def run() -> None:
        await shared.backends.start()
        grant(shared, "brk_gone")  # never present: dropped meanwhile by another replica
        shared.leases.revoke("l1", Reason.OPERATOR, now=shared.clock.now(), initiator="op")
        await settle(lambda: shared.backends.pending() == [])
        await shared.backends.close()

    asyncio.run(run())
    assert "backend.role_dropped" not in shared.audit.getvalue()
