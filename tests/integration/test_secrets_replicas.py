"""Dynamic secrets with replicas on one postgres store: a role lives exactly as long as its lease,
whichever replica made it, ended it, stopped or died."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.backends.manager import PROVISION_DEADLINE_SECONDS
from broker.testing.clock import FakeClock
from broker.testing.postgres import PostgresServer
from tests.support.harness import INTROSPECTOR_ID, OPERATOR_ID, PLANNER, Harness, Material, postgres_store
from tests.support.secrets import (
    AUDIENCE,
    BACKEND,
    Analytics,
    audit_records,
    db_request,
    login,
    make_analytics,
    start_broker,
    stop,
    wait_until,
)


@pytest.fixture
def db(postgres: PostgresServer, pg_dsn: str) -> Analytics:
    return make_analytics(postgres, pg_dsn)


@pytest.fixture
def pair(material: Material, tmp_path: Path, db: Analytics, pg_dsn: str) -> Iterator[tuple[Harness, Harness]]:
    """Replicas a and b on one clock and one store, each with the backend `analytics` (no HTTP:
    its metrics registry is the process's)."""
    clock = FakeClock()
    started: list[Harness] = []
    try:
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            started.append(start_broker(
                material, folder, db, clock=clock, store=postgres_store(pg_dsn, name), http=False
            ))
        yield started[0], started[1]
    finally:
        for harness in started:
            stop(harness)


def gone(db: Analytics, role: str) -> Callable[[], bool]:
    return lambda: role not in db.roles()


def reconcile(harness: Harness) -> int:
    return harness.broker.call(harness.broker.app.backends.reconcile(BACKEND))


def works(secret: pb.Secret) -> bool:
    with login(secret) as conn:
        return conn.execute("SELECT sum(amount) FROM sales").fetchone() == (350,)


def active(harness: Harness, token: str) -> bool:
    return harness.agent(INTROSPECTOR_ID).Introspect(pb.IntrospectRequest(token=token), timeout=5).active


def dropped(harness: Harness, role: str) -> list[dict]:
    return [r for r in audit_records(harness, "backend.role_dropped") if r["role"] == role]


def test_a_replica_that_stops_leaves_the_roles_of_leases_the_others_still_serve(
    pair: tuple[Harness, Harness], db: Analytics
) -> None:
    a, b = pair
    resp = a.agent(PLANNER).Exchange(db_request(), timeout=10)
    role = resp.secret.fields["username"]
    stop(a)
    assert role in db.roles() and works(resp.secret)
    assert active(b, resp.access_token)
    # The lease lives on, and its end, wherever it is committed, drops the role.
    b.operator(OPERATOR_ID).Revoke(pb.RevokeRequest(lease_id=resp.lease_id), timeout=5)
    wait_until(gone(db, role), what="the role to be dropped by the replica that ended the lease")
    assert not dropped(a, role) and len(dropped(b, role)) == 1


def test_a_role_of_a_lease_granted_on_one_replica_is_no_orphan_to_another(
    pair: tuple[Harness, Harness], db: Analytics
) -> None:
    a, b = pair
    resp = a.agent(PLANNER).Exchange(db_request(), timeout=10)
    assert reconcile(b) == 0
    assert resp.secret.fields["username"] in db.roles() and works(resp.secret)
    assert not audit_records(b, "backend.orphan_found")


def test_a_role_being_made_on_one_replica_is_no_orphan_to_another_until_past_the_provisioning_deadline(
    pair: tuple[Harness, Harness], db: Analytics
) -> None:
    a, b = pair
    backends = b.broker.app.backends
    backend = backends.for_audience(AUDIENCE)
    # B made the role and has not granted its lease yet (CREATE ROLE comes first): only B knows it.
    role, _ = b.broker.call(backends.provision(backend, ("db:read",), b.clock.now() + 600))
    assert reconcile(a) == 0 and role in db.roles()
    # Past the grace the issuance can no longer be granted: the role is an orphan to anyone.
    b.clock.advance(a.broker.app.backends.orphan_grace + 1)
    reconcile(a)  # its own loop may have queued it already
    wait_until(gone(db, role), what="the orphan to be dropped")
    assert [r["role"] for r in audit_records(a, "backend.orphan_found")] == [role]
    assert len(dropped(a, role)) == 1


def test_an_exchange_that_cannot_grant_its_lease_within_the_provisioning_deadline_fails_and_drops_the_role(
    pair: tuple[Harness, Harness], db: Analytics, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = pair
    backend = a.broker.app.backends.for_audience(AUDIENCE)
    provision = backend.provision
    made: list[str] = []

    async def provision_slowly(role, groups, expires_at, *, created_at):
        secret = await provision(role, groups, expires_at, created_at=created_at)
        made.append(role)
        a.clock.advance(PROVISION_DEADLINE_SECONDS + 1)  # the database took that long to answer
        return secret

    monkeypatch.setattr(backend, "provision", provision_slowly)
    with pytest.raises(grpc.RpcError) as err:
        a.agent(PLANNER).Exchange(db_request(task_id="slow"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "took too long" in (err.value.details() or "")
    wait_until(gone(db, made[0]), what="the role to be dropped")
    listed = a.operator(OPERATOR_ID).ListLeases(pb.ListLeasesRequest(page_size=100), timeout=5)
    assert [lease.id for lease in listed.leases] == []


def test_a_lease_ended_on_one_replica_has_its_role_dropped_and_audited_once_by_that_replica(
    pair: tuple[Harness, Harness], db: Analytics
) -> None:
    a, b = pair
    resp = a.agent(PLANNER).Exchange(db_request(), timeout=10)
    role = resp.secret.fields["username"]
    b.operator(OPERATOR_ID).Revoke(pb.RevokeRequest(lease_id=resp.lease_id), timeout=5)
    wait_until(gone(db, role), what="the role to be dropped")
    assert reconcile(a) == 0 and reconcile(b) == 0
    stop(a)
    stop(b)
    assert not dropped(a, role)
    [record] = dropped(b, role)
    assert (record["lease_id"], record["cause"]) == (resp.lease_id, "OPERATOR")
    assert not audit_records(a, "backend.orphan_found") and not audit_records(b, "backend.orphan_found")


def test_the_role_of_a_replica_that_died_lives_until_its_lease_expires_then_a_live_replica_drops_it(
    pair: tuple[Harness, Harness], db: Analytics
) -> None:
    a, b = pair
    resp = a.agent(PLANNER).Exchange(db_request(ttl_seconds=120), timeout=10)
    role = resp.secret.fields["username"]
    a.broker.kill()
    assert reconcile(b) == 0
    assert role in db.roles() and works(resp.secret) and active(b, resp.access_token)
    b.clock.advance(resp.expires_in + 1)
    wait_until(gone(db, role), what="the expired lease's role to be dropped by the survivor")
    assert not active(b, resp.access_token)
    [record] = dropped(b, role)
    assert (record["lease_id"], record["cause"]) == (resp.lease_id, "EXPIRED")
