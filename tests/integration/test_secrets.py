"""Dynamic secrets against a real PostgreSQL: a login role per lease, gone when the lease ends."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg import sql

from broker._proto import broker_pb2 as pb
from broker.leases.events import Reason
from broker.testing.clock import FakeClock
from broker.testing.postgres import PostgresServer
from tests.support.harness import OPERATOR_ID, PLANNER, WORKER, Harness, Material
from tests.support.secrets import (
    AUDIENCE,
    BACKEND,
    Analytics,
    db_request,
    login,
    login_refused,
    make_analytics,
    running,
    start_broker,
    wait_until,
)

ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@pytest.fixture
def db(postgres: PostgresServer, pg_dsn: str) -> Analytics:
    return make_analytics(postgres, pg_dsn)


@pytest.fixture
def broker(material: Material, tmp_path, db: Analytics) -> Iterator[Harness]:
    yield from running(start_broker(material, tmp_path, db))


def gone(db: Analytics, role: str) -> Callable[[], bool]:
    return lambda: role not in db.roles()


# -- 1. the login does what its groups allow, and nothing else ------------------------------------


def test_exchange_answers_with_token_lease_and_a_working_database_login(broker: Harness, db: Analytics) -> None:
    resp = broker.agent(PLANNER).Exchange(db_request(), timeout=10)
    secret = resp.secret
    assert resp.access_token and resp.lease_id and resp.state == "ISSUED"
    assert secret.backend == BACKEND
    assert set(secret.fields) == {"username", "password", "host", "port", "dbname", "dsn"}
    assert secret.fields["username"].startswith(db.prefix) and secret.fields["dbname"] == db.dbname
    assert secret.fields["port"] == str(db.server.port) and secret.fields["host"] == "127.0.0.1"
    assert secret.expires_at == resp.expires_at
    with login(secret) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (secret.fields["username"],)
        assert conn.execute("SELECT sum(amount) FROM sales").fetchone() == (350,)


def test_a_read_login_is_refused_a_write_and_a_table_outside_its_groups(broker: Harness) -> None:
    secret = broker.agent(PLANNER).Exchange(db_request(), timeout=10).secret
    with login(secret) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("INSERT INTO sales VALUES (3, 1)")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM payroll")


def test_a_write_grant_joins_the_writer_group_too(broker: Harness, db: Analytics) -> None:
    secret = broker.agent(PLANNER).Exchange(db_request(actions=["db:write"]), timeout=10).secret
    with login(secret) as conn:
        conn.execute("INSERT INTO sales VALUES (3, 5)")
    assert db.sql("SELECT count(*) FROM sales") == [(3,)]


def test_an_action_without_grants_is_permission_denied_naming_it_and_nothing_is_made(
    broker: Harness, db: Analytics
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        broker.agent(PLANNER).Exchange(db_request(actions=["db:read", "db:admin"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "db:admin" in err.value.details() and BACKEND in err.value.details()
    assert db.roles() == set()
    assert list(broker.operator().ListLeases(pb.ListLeasesRequest(include_inactive=True), timeout=5).leases) == []


def test_group_roles_are_quoted_identifiers_never_sql_text(material: Material, tmp_path, db: Analytics) -> None:
    odd = 'we"ird; DROP ROLE postgres; --'
    db.sql(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(odd)).as_string(None))
    harness = start_broker(material, tmp_path, db, grants='{ "db:read" = ["we\\"ird; DROP ROLE postgres; --"] }')
    try:
        secret = harness.agent(PLANNER).Exchange(db_request(), timeout=10).secret
        member = db.sql(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s",
            (secret.fields["username"],),
        )
        assert member == [(odd,)]
        assert db.sql("SELECT 1 FROM pg_roles WHERE rolname = 'postgres'") == [(1,)]
    finally:
        harness.close()
        harness.broker.stop()


# -- 2. every end of the lease ends the login -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ending:
    name: str
    reason: str
    end: Callable[[Harness, pb.ExchangeResponse], None]
    delegated: bool = False


def _complete(h: Harness, r: pb.ExchangeResponse) -> None:
    h.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id=r.task_id), timeout=5)


def _expire(h: Harness, r: pb.ExchangeResponse) -> None:
    h.clock.advance(r.expires_in + 1)


def _revoke(**selector: object) -> Callable[[Harness, pb.ExchangeResponse], None]:
    def end(h: Harness, r: pb.ExchangeResponse) -> None:
        values = {k: (r.lease_id if v == "lease" else r.task_id if v == "task" else v) for k, v in selector.items()}
        h.operator().Revoke(pb.RevokeRequest(**values), timeout=5)

    return end


def _deny_renewal(h: Harness, r: pb.ExchangeResponse) -> None:
    policy = h.broker.config_path.parent / "policy.cedar"
    text = policy.read_text().replace('@id("agents-use-analytics")\npermit', '@id("agents-use-analytics")\nforbid')
    policy.write_text(text)
    h.operator().ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        h.agent(PLANNER).Renew(pb.RenewRequest(lease_id=r.lease_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


ENDINGS = [
    Ending("task-completed", "TASK_COMPLETED", _complete),
    Ending("ttl", "EXPIRED", _expire),
    Ending("operator-lease", "OPERATOR", _revoke(lease_id="lease")),
    Ending("operator-task", "OPERATOR", _revoke(task_id="task")),
    Ending("operator-subject", "OPERATOR", _revoke(subject=PLANNER)),
    Ending("operator-all", "OPERATOR", _revoke(all=True)),
    Ending("renewal-denied", "RENEWAL_DENIED", _deny_renewal),
    Ending("parent-revoked", "PARENT_REVOKED", _revoke(lease_id="lease"), delegated=True),
]


@pytest.mark.parametrize("case", ENDINGS, ids=[c.name for c in ENDINGS])
def test_when_the_lease_ends_the_role_is_dropped_and_its_open_session_cut_off(
    broker: Harness, db: Analytics, case: Ending
) -> None:
    parent = broker.agent(PLANNER).Exchange(db_request(ttl_seconds=120), timeout=10)
    held = parent
    if case.delegated:
        held = broker.agent(WORKER).Exchange(
            pb.ExchangeRequest(actions=["db:read"], subject_token=parent.access_token, subject_token_type=ACCESS),
            timeout=10,
        )
        assert held.secret.fields["username"] != parent.secret.fields["username"]
    role = held.secret.fields["username"]
    session = login(held.secret)
    assert session.execute("SELECT count(*) FROM sales").fetchone() == (2,)
    case.end(broker, parent)
    wait_until(gone(db, role), what="the role to be dropped")
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    assert login_refused(held.secret.fields["dsn"])
    lease = broker.operator().GetLease(pb.GetLeaseRequest(lease_id=held.lease_id), timeout=5)
    assert lease.reason == case.reason
    assert lease.revocation.state == "DONE"


def test_a_role_that_created_objects_is_dropped_and_its_objects_kept(broker: Harness, db: Analytics) -> None:
    resp = broker.agent(PLANNER).Exchange(db_request(actions=["db:write"]), timeout=10)
    with login(resp.secret) as conn:
        conn.execute("CREATE TABLE scratch.notes (line text)")
    broker.operator().Revoke(pb.RevokeRequest(lease_id=resp.lease_id), timeout=5)
    wait_until(gone(db, resp.secret.fields["username"]), what="the role to be dropped")
    owner = db.sql("SELECT tableowner FROM pg_tables WHERE schemaname = 'scratch' AND tablename = 'notes'")
    assert owner == [(db.server.user,)]


# -- 3. VALID UNTIL is the lease's expiry ---------------------------------------------------------


def test_valid_until_is_the_lease_expiry_and_renew_moves_it_without_the_password(
    broker: Harness, db: Analytics
) -> None:
    agent = broker.agent(PLANNER)
    first = agent.Exchange(db_request(ttl_seconds=120), timeout=10)
    role = first.secret.fields["username"]
    lease = broker.operator().GetLease(pb.GetLeaseRequest(lease_id=first.lease_id), timeout=5)
    assert db.valid_until(role) == pytest.approx(lease.expires_at.seconds + lease.expires_at.nanos / 1e9, abs=1e-3)
    broker.clock.advance(60)
    renewed = agent.Renew(pb.RenewRequest(lease_id=first.lease_id, ttl_seconds=600), timeout=10)
    assert renewed.secret.fields["username"] == role and renewed.secret.backend == BACKEND
    assert "password" not in renewed.secret.fields
    assert first.secret.fields["password"] not in renewed.secret.fields["dsn"]
    assert renewed.secret.expires_at == renewed.expires_at
    moved = renewed.expires_at.seconds + renewed.expires_at.nanos / 1e9
    assert db.valid_until(role) == pytest.approx(moved, abs=1e-3)
    assert moved > lease.expires_at.seconds + 400


def test_postgres_itself_refuses_the_login_once_valid_until_has_passed(
    material: Material, tmp_path, db: Analytics
) -> None:
    # The broker's clock runs an hour behind PostgreSQL's: the lease is live for the broker, yet
    # its VALID UNTIL is already past for the database, which is what holds if the broker is gone.
    clock = FakeClock(start=time.time() - 3600)
    harness = start_broker(material, tmp_path, db, clock=clock)
    svid = material.issuer.ca("example.org").x509_svid(PLANNER, ttl=7200, now=clock.now())
    try:
        resp = harness.agent(svid).Exchange(db_request(ttl_seconds=60), timeout=10)
        assert resp.secret.fields["username"] in db.roles()
        assert login_refused(resp.secret.fields["dsn"])
    finally:
        harness.close()
        harness.broker.stop()


# -- 4. all or nothing -----------------------------------------------------------------------------


def test_a_role_that_cannot_be_created_fails_the_exchange_unavailable_and_leaves_nothing(
    material: Material, tmp_path, db: Analytics
) -> None:
    harness = start_broker(material, tmp_path, db, grants='{ "db:read" = ["no_such_group_role"] }')
    try:
        with pytest.raises(grpc.RpcError) as err:
            harness.agent(PLANNER).Exchange(db_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert BACKEND in err.value.details() and "no_such_group_role" in err.value.details()
        assert db.roles() == set()
        leases = harness.operator().ListLeases(pb.ListLeasesRequest(include_inactive=True), timeout=5).leases
        assert list(leases) == []
    finally:
        harness.close()
        harness.broker.stop()


def test_a_role_made_for_an_exchange_that_then_fails_is_dropped(
    broker: Harness, db: Analytics, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = broker.agent(PLANNER)
    agent.Exchange(db_request(task_id="raced"), timeout=10)
    app = broker.broker.app
    backend = app.backends.for_audience(AUDIENCE)
    provision = backend.provision
    made: list[str] = []

    async def provision_then_lose_the_race(role, groups, expires_at, *, created_at):
        secret = await provision(role, groups, expires_at, created_at=created_at)
        made.append(role)
        # An operator closes the task while the database was answering.
        # Through the store, as an operator's Revoke goes: its readers (the backends) hear of it.
        app.store.run(lambda b: b.revoke_task("raced", Reason.OPERATOR, now=app.clock.now(), initiator=OPERATOR_ID))
        return secret

    monkeypatch.setattr(backend, "provision", provision_then_lose_the_race)
    with pytest.raises(grpc.RpcError) as err:
        agent.Exchange(db_request(task_id="raced"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(made) == 1
    wait_until(gone(db, made[0]), what="the orphaned role to be dropped")
    assert db.roles() == set()


# -- approvals, operators, audit ---------------------------------------------------------------------


def test_await_approval_returns_the_secret_like_exchange(broker: Harness) -> None:
    agent = broker.agent(PLANNER)
    pending = agent.Exchange(db_request(actions=["db:export"]), timeout=10)
    assert pending.state == "PENDING_APPROVAL" and not pending.HasField("secret")
    broker.operator().Approve(pb.ApproveRequest(approval_id=pending.approval_id), timeout=5)
    issued = agent.AwaitApproval(pb.AwaitApprovalRequest(approval_id=pending.approval_id), timeout=10)
    assert issued.secret.backend == BACKEND and issued.secret.fields["password"]
    with login(issued.secret) as conn:
        assert conn.execute("SELECT count(*) FROM sales").fetchone() == (2,)


def test_get_lease_shows_backend_role_and_revocation_state(broker: Harness) -> None:
    resp = broker.agent(PLANNER).Exchange(db_request(), timeout=10)
    operator = broker.operator()
    lease = operator.GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5)
    assert (lease.backend, lease.role, lease.revocation.state) == (BACKEND, resp.secret.fields["username"], "ACTIVE")
    plain = broker.agent(PLANNER).Exchange(
        pb.ExchangeRequest(task_id="t2", audience="spiffe://example.org/service/repo", actions=["repo:read"],
                           resource="repo:org/app"), timeout=5)
    other = operator.GetLease(pb.GetLeaseRequest(lease_id=plain.lease_id), timeout=5)
    assert (other.backend, other.role, other.HasField("revocation")) == ("", "", False)


def test_the_password_appears_in_no_log_audit_record_metric_or_answer_but_the_first(
    broker: Harness, db: Analytics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    agent = broker.agent(PLANNER)
    resp = agent.Exchange(db_request(ttl_seconds=120), timeout=10)
    password = resp.secret.fields["password"]
    renewed = agent.Renew(pb.RenewRequest(lease_id=resp.lease_id), timeout=10)
    lease = broker.operator().GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        agent.Exchange(db_request(actions=["db:admin"]), timeout=10)
    broker.operator().Revoke(pb.RevokeRequest(lease_id=resp.lease_id), timeout=5)
    wait_until(gone(db, resp.secret.fields["username"]), what="the role to be dropped")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{broker.broker.app.ports['http']}/metrics", timeout=5).read()
    audit = (broker.broker.config_path.parent / "audit.jsonl").read_text()
    assert len(password) >= 32
    for where, text in {
        "audit": audit,
        "logs": caplog.text,
        "metrics": metrics.decode(),
        "renewal": str(renewed),
        "lease": str(lease),
        "error": err.value.details(),
    }.items():
        assert password not in text, f"the password appears in the {where}"
    # the audit trail names the backend, the role and the lease instead
    assert '"kind":"backend.role_dropped"' in audit and resp.lease_id in audit and lease.role in audit


def test_the_audit_trail_names_backend_role_and_lease(broker: Harness, db: Analytics) -> None:
    resp = broker.agent(PLANNER).Exchange(db_request(), timeout=10)
    broker.agent(PLANNER).CompleteTask(pb.CompleteTaskRequest(task_id=resp.task_id), timeout=5)
    wait_until(gone(db, resp.secret.fields["username"]), what="the role to be dropped")
    records = [json.loads(line) for line in (broker.broker.config_path.parent / "audit.jsonl").read_text().splitlines()]
    granted = next(r for r in records if r["kind"] == "lease.granted")
    dropped = next(r for r in records if r["kind"] == "backend.role_dropped")
    role = resp.secret.fields["username"]
    assert (granted["backend"], granted["role"], granted["lease_id"]) == (BACKEND, role, resp.lease_id)
    assert (dropped["backend"], dropped["role"], dropped["lease_id"]) == (BACKEND, role, resp.lease_id)
    assert dropped["cause"] == "TASK_COMPLETED"


# -- 6. reconciliation --------------------------------------------------------------------------------


def test_reconcile_drops_the_roles_no_lease_accounts_for_and_only_those(broker: Harness, db: Analytics) -> None:
    live = broker.agent(PLANNER).Exchange(db_request(), timeout=10).secret.fields["username"]
    app = broker.broker.app
    backend = app.backends.for_audience(AUDIENCE)
    orphan = backend.new_role()
    broker.broker.call(backend.provision(orphan, (db.reader,), time.time() + 600, created_at=app.clock.now()))
    stranger = db.prefix + "made_by_hand"
    db.sql(f"CREATE ROLE {stranger} LOGIN")  # same prefix, not made by this backend: never touched
    assert broker.broker.call(app.backends.reconcile(BACKEND)) == 1
    wait_until(gone(db, orphan), what="the orphan to be dropped")
    assert db.roles() == {live, stranger}


def test_a_role_carries_its_creation_time_and_a_second_drop_is_no_change(broker: Harness, db: Analytics) -> None:
    app = broker.broker.app
    backend = app.backends.for_audience(AUDIENCE)
    made, legacy = backend.new_role(), backend.new_role()
    broker.broker.call(backend.provision(made, (db.reader,), time.time() + 600, created_at=1_700_000_123.25))
    db.sql(f"CREATE ROLE {legacy}")  # as a broker before the creation time marked its roles
    db.sql(f"COMMENT ON ROLE {legacy} IS 'managed by the credential broker: backend {BACKEND}'")
    assert broker.broker.call(backend.roles()) == {made: 1_700_000_123.25, legacy: 0.0}
    assert broker.broker.call(backend.revoke(made)) is True
    assert broker.broker.call(backend.revoke(made)) is False


def test_metrics_count_backend_operations(broker: Harness) -> None:
    broker.agent(PLANNER).Exchange(db_request(), timeout=10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{broker.broker.app.ports['http']}/metrics", timeout=5).read()
    text = text.decode()
    assert 'broker_backend_ops_total{backend="analytics",op="provision",result="ok"}' in text
    assert 'broker_backend_revoke_pending{backend="analytics"} 0.0' in text
    assert 'broker_backend_up{backend="analytics"} 1.0' in text


def test_a_broker_that_stops_drops_the_roles_of_its_leases(material: Material, tmp_path, db: Analytics) -> None:
    harness = start_broker(material, tmp_path, db)
    try:
        secret = harness.agent(PLANNER).Exchange(db_request(), timeout=10).secret
        assert secret.fields["username"] in db.roles()
    finally:
        harness.close()
        harness.broker.stop()
    assert db.roles() == set()
    assert login_refused(secret.fields["dsn"])
