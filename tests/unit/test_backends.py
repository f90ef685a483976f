"""The backend manager with a fake backend: events drive revocation, failures retry, reconcile spares the live."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field

import pytest

from broker.backends.base import BackendStatus, Secret, frozen
from broker.backends.manager import RECONCILE_SECONDS, Backends, retry_delay
from broker.backends.pending import MemoryPendingStore, PendingRevocation
from broker.backends.postgres import PostgresBackend
from broker.config.backends import BackendConfig
from broker.domain.errors import BackendUnavailable, PermissionDenied
from broker.leases.events import Lease, Reason
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

    async def provision(self, role: str, groups: tuple[str, ...], expires_at: float) -> Secret:
        self.present.add(role)
        return Secret(backend=self.name, fields=frozen({"username": role, "password": "pw"}), expires_at=expires_at)

    async def renew(self, role: str, expires_at: float) -> None: ...

    async def revoke(self, role: str) -> None:
        if self.failures:
            self.failures -= 1
            self.status = BackendStatus(up=False, error="connection refused")
            raise BackendUnavailable("backend analytics: connection refused")
        self.status = BackendStatus(up=True)
        self.present.discard(role)
        self.revoked.append(role)

    async def roles(self) -> set[str]:
        self.status = BackendStatus(up=True)
        return set(self.present)


@dataclass
class Kit:
    clock: FakeClock
    backend: FakeBackend
    backends: Backends
    leases: LeaseTable
    audit: io.StringIO


@pytest.fixture
def kit() -> Kit:
    clock = FakeClock(start=T0)
    sink = io.StringIO()
    backend = FakeBackend()
    backends = Backends([backend], clock=clock, audit=AuditLog(sink, clock=clock))
    leases = LeaseTable()
    leases.subscribe(backends.on_event)
    return Kit(clock, backend, backends, leases, sink)


def grant(kit: Kit, role: str, lease_id: str = "l1") -> Lease:
    now = kit.clock.now()
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

    async def slow_provision(role: str, groups: tuple[str, ...], expires_at: float) -> Secret:
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
