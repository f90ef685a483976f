"""Dynamic secrets while the database is down: fail closed, retry revocations, recover by itself."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto import broker_pb2 as pb
from broker.testing.postgres import PostgresServer
from tests.support.harness import INTROSPECTOR_ID, PLANNER, RESOURCE_SERVER_ID, Harness, Material
from tests.support.secrets import BACKEND, Analytics, db_request, make_analytics, running, start_broker, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of this module's own, so stopping it leaves the session's alone."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def db(own_server: PostgresServer) -> Iterator[Analytics]:
    if not own_server.is_running():
        own_server.start()
    name = f"outage_{os.getpid()}_{len(own_server.psql('SELECT datname FROM pg_database').split())}"
    yield make_analytics(own_server, own_server.create_database(name))
    if not own_server.is_running():
        own_server.start()


def http_get(harness: Harness, path: str) -> str:
    url = f"http://127.0.0.1:{harness.broker.app.ports['http']}{path}"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def backend_health(harness: Harness) -> int:
    stub = health_pb2_grpc.HealthStub(harness.mtls_channel(PLANNER))
    return stub.Check(health_pb2.HealthCheckRequest(service=f"backend:{BACKEND}"), timeout=5).status


def test_a_backend_down_at_start_fails_its_exchanges_closed_until_it_returns(
    material: Material, tmp_path: Path, db: Analytics
) -> None:
    db.server.stop()
    with running_broker(material, tmp_path, db) as harness:
        agent = harness.agent(PLANNER)
        with pytest.raises(grpc.RpcError) as err:
            agent.Exchange(db_request(), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and BACKEND in err.value.details()
        # the rest of the broker serves
        agent.Exchange(pb.ExchangeRequest(task_id="repo", audience=RESOURCE_SERVER_ID, actions=["repo:read"],
                                          resource="repo:org/app"), timeout=5)
        assert backend_health(harness) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert f'broker_backend_up{{backend="{BACKEND}"}} 0.0' in http_get(harness, "/metrics")
        assert f"backend {BACKEND}: down" in http_get(harness, "/healthz")
        assert list(harness.operator().ListLeases(pb.ListLeasesRequest(audience="postgres://analytics",
                                                                       include_inactive=True), timeout=5).leases) == []
        db.server.start()
        resp = agent.Exchange(db_request(), timeout=20)
        assert resp.secret.fields["username"] in db.roles()
        wait_until(lambda: backend_health(harness) == health_pb2.HealthCheckResponse.SERVING, what="health SERVING")
        assert f"backend {BACKEND}: up" in http_get(harness, "/healthz")


def test_a_failed_revocation_is_retried_until_the_database_returns(
    material: Material, tmp_path: Path, db: Analytics
) -> None:
    with running_broker(material, tmp_path, db) as harness:
        agent = harness.agent(PLANNER)
        resp = agent.Exchange(db_request(), timeout=10)
        role = resp.secret.fields["username"]
        operator = harness.operator()
        db.server.stop()
        # a Renew the database cannot follow fails, and the lease keeps its expiry
        with pytest.raises(grpc.RpcError) as err:
            agent.Renew(pb.RenewRequest(lease_id=resp.lease_id, ttl_seconds=900), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and BACKEND in err.value.details()
        assert operator.GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5).expires_at == resp.expires_at
        operator.Revoke(pb.RevokeRequest(lease_id=resp.lease_id), timeout=5)
        # the token side is revoked at once, whatever the database does
        introspect = harness.agent(INTROSPECTOR_ID).Introspect(pb.IntrospectRequest(token=resp.access_token),
                                                                  timeout=5)
        assert not introspect.active

        def pending() -> pb.BackendRevocation:
            return operator.GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5).revocation

        wait_until(lambda: pending().attempts >= 1, what="a failed attempt")
        first = pending()
        harness.clock.advance(first.next_attempt_at.seconds + 1 - harness.clock.now())
        wait_until(lambda: pending().attempts >= 2, what="the retry after the backoff")
        state = pending()
        assert state.next_attempt_at.seconds > first.next_attempt_at.seconds
        assert state.state == "PENDING" and state.last_error
        listed = operator.ListLeases(pb.ListLeasesRequest(revoke_pending=True), timeout=5).leases
        assert [lease.id for lease in listed] == [resp.lease_id]
        metrics = http_get(harness, "/metrics")
        assert f'broker_backend_revoke_pending{{backend="{BACKEND}"}} 1.0' in metrics
        assert f'broker_backend_ops_total{{backend="{BACKEND}",op="revoke",result="error"}}' in metrics
        ctl = brokerctl(harness, tmp_path, "leases", "show", resp.lease_id)
        assert "PENDING" in ctl.stdout and role in ctl.stdout and resp.secret.fields["password"] not in ctl.stdout
        ctl = brokerctl(harness, tmp_path, "leases", "list", "--revoke-pending")
        assert resp.lease_id in ctl.stdout

        # Long after the lease's tombstone is purged, the pending revocation is still shown.
        harness.clock.advance(900)
        wait_until(lambda: harness.broker.sync(harness.broker.app.leases.get, resp.lease_id) is None,
                   what="the tombstone to be purged")
        forgotten = operator.GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5)
        assert (forgotten.role, forgotten.reason, forgotten.revocation.state) == (role, "OPERATOR", "PENDING")
        listed = operator.ListLeases(pb.ListLeasesRequest(revoke_pending=True), timeout=5).leases
        assert [lease.id for lease in listed] == [resp.lease_id]

        db.server.start()
        harness.clock.advance(120)  # past the backoff, whichever attempt it is at
        wait_until(lambda: role not in db.roles(), what="the revocation to complete")
        wait_until(lambda: not harness.broker.sync(harness.broker.app.backends.pending), what="nothing pending")
        assert f'broker_backend_revoke_pending{{backend="{BACKEND}"}} 0.0' in http_get(harness, "/metrics")
        assert list(operator.ListLeases(pb.ListLeasesRequest(revoke_pending=True), timeout=5).leases) == []


@contextlib.contextmanager
def running_broker(material: Material, folder: Path, db: Analytics) -> Iterator[Harness]:
    """The broker, stopped on the way out."""
    yield from running(start_broker(material, folder, db))


def brokerctl(harness: Harness, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cert, key = harness.material.svid("spiffe://example.org/operator/alice").write(folder, "operator")
    ca = folder / "roots.pem"
    ca.write_bytes(harness.material.roots_pem)
    flags = ["--addr", f"127.0.0.1:{harness.broker.mtls_port}", "--cert", str(cert), "--key", str(key), "--ca", str(ca)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERCTL_")}
    result = subprocess.run([sys.executable, "-m", "broker.cli.brokerctl", *flags, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result


def test_a_database_that_hangs_holds_no_other_request(material: Material, tmp_path: Path, db: Analytics) -> None:
    # A listener that accepts and never answers: the admin login waits out its connect timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        dsn = f"host=127.0.0.1 port={silent.getsockname()[1]} dbname=x user=x sslmode=disable"
        with contextlib.closing(_Stopping(start_broker(material, tmp_path, db, dsn=dsn))) as harness:
            agent = harness.h.agent(PLANNER)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                stuck = pool.submit(agent.Exchange, db_request(), timeout=30)
                silent.settimeout(20)
                accepted = [silent.accept()[0]]  # a probe is waiting on the database now
                plain = agent.Exchange(pb.ExchangeRequest(task_id="repo", audience=RESOURCE_SERVER_ID,
                                                          actions=["repo:read"], resource="repo:org/app"), timeout=5)
                assert plain.access_token and not stuck.done()
                with pytest.raises(grpc.RpcError) as err:
                    stuck.result()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and BACKEND in err.value.details()
            for conn in accepted:
                conn.close()


class _Stopping:
    def __init__(self, h: Harness) -> None:
        self.h = h

    def close(self) -> None:
        self.h.close()
        self.h.broker.stop()
