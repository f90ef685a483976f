"""Replicas as real `broker serve` processes on one PostgreSQL: one is SIGKILLed under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.cli.dev import DevPorts, _dev_config, write_dev_setup

ROOT = Path(__file__).resolve().parents[2]
AUDIENCE = "spiffe://example.org/service/repo"


class Replica:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> Replica:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(self.folder / f"broker-{self.name}.toml")],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
            stdout=subprocess.PIPE, stderr=(self.folder / f"{self.name}.log").open("a"),
        )  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("broker ready: "):
                self.port = json.loads(line.removeprefix("broker ready: "))["mtls"]
                return self
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"replica {self.name} did not start: {(self.folder / f'{self.name}.log').read_text()}")

    def stub(self, who: str, admin: bool = False):
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.folder / "example.org.bundle.pem").read_bytes(),
            private_key=(self.folder / f"{who}-key.pem").read_bytes(),
            certificate_chain=(self.folder / f"{who}.pem").read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        ch = grpc.secure_channel(f"127.0.0.1:{self.port}", creds, options=options)
        return (pb_grpc.BrokerAdminStub if admin else pb_grpc.CredentialBrokerStub)(ch), ch

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)


@pytest.fixture
def replica_pair(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[Replica, Replica]]:
    write_dev_setup(tmp_path, DevPorts(0, 0, 0))
    (tmp_path / "store.dsn").write_text(pg_dsn + "\n")
    for name in ("a", "b"):
        text = _dev_config(DevPorts(0, 0, 0)).replace('path = "audit.jsonl"', f'path = "audit-{name}.jsonl"')
        store = f'\n[store]\nbackend = "postgres"\ndsn_file = "store.dsn"\nreplica_id = "{name}"\n'
        (tmp_path / f"broker-{name}.toml").write_text(text + store)
    pair = (Replica(tmp_path, "a").start(), Replica(tmp_path, "b").start())
    try:
        yield pair
    finally:
        for replica in pair:
            replica.stop(signal.SIGKILL)


def _exchange(stub, task_id: str, ttl: int = 0) -> pb.ExchangeResponse:
    req = pb.ExchangeRequest(task_id=task_id, audience=AUDIENCE, actions=["repo:read"], resource="repo:org/app",
                             ttl_seconds=ttl)  # fmt: skip
    return stub.Exchange(req, timeout=10)


def test_a_replica_killed_under_load_loses_nothing_and_resurrects_nothing(replica_pair) -> None:
    a, b = replica_pair
    planner_a, _ = a.stub("planner")
    repo_b, _ = b.stub("repo")
    operator_b, _ = b.stub("operator", admin=True)
    kept = _exchange(planner_a, "kept")
    revoked = _exchange(planner_a, "revoked")
    short = _exchange(planner_a, "short", ttl=2)
    operator_b.Revoke(pb.RevokeRequest(lease_id=revoked.lease_id), timeout=10)

    watch = repo_b.WatchRevocations(pb.WatchRevocationsRequest(), timeout=60)
    watch.initial_metadata()
    ended: list[pb.RevocationEvent] = []
    expired = threading.Event()

    def read() -> None:
        try:
            for event in watch:
                ended.append(event)
                if event.lease_id == short.lease_id:
                    expired.set()
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    acknowledged: list[str] = []
    stop = threading.Event()

    def load() -> None:  # bounded: stops at the flag or after 400 calls
        for i in range(400):
            if stop.is_set():
                return
            try:
                acknowledged.append(_exchange(planner_a, f"load-{i % 20}").lease_id)
            except grpc.RpcError:
                return  # the replica is gone

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    while len(acknowledged) < 20 and loader.is_alive():
        time.sleep(0.01)
    a.stop(signal.SIGKILL)
    stop.set()
    loader.join(20)

    # The survivor serves A's tokens, knows every lease A acknowledged, and expires A's leases.
    assert repo_b.Introspect(pb.IntrospectRequest(token=kept.access_token), timeout=10).active
    operator_b_list = operator_b.ListLeases(pb.ListLeasesRequest(page_size=1000), timeout=10)
    known = {lease.id for lease in operator_b_list.leases}
    assert set(acknowledged) <= known and acknowledged
    assert expired.wait(30), "a lease of the killed replica did not expire on the survivor"
    assert [e.reason for e in ended if e.lease_id == short.lease_id] == ["EXPIRED"]

    # A restarted replica rebuilds from the log: what was revoked stays revoked.
    a.start()
    repo_a, _ = a.stub("repo")
    assert not repo_a.Introspect(pb.IntrospectRequest(token=revoked.access_token), timeout=10).active
    assert repo_a.Introspect(pb.IntrospectRequest(token=kept.access_token), timeout=10).active
    health = health_pb2_grpc.HealthStub(a.stub("repo")[1]).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_an_approval_asked_of_a_replica_that_dies_is_decided_and_used_through_the_survivor(replica_pair) -> None:
    a, b = replica_pair
    planner_a, _ = a.stub("planner")
    deploy = pb.ExchangeRequest(
        task_id="ship", audience="spiffe://example.org/service/deployer", actions=["deploy:prod"],
        resource="service:app", context={"ticket": "CHG-1"},
    )  # fmt: skip
    held = planner_a.Exchange(deploy, timeout=10)
    assert held.state == "PENDING_APPROVAL"
    a.stop(signal.SIGKILL)
    operator_b, _ = b.stub("operator", admin=True)
    [listed] = operator_b.ListApprovals(pb.ListApprovalsRequest(), timeout=10).approvals
    assert (listed.approval_id, listed.task_id) == (held.approval_id, "ship")
    operator_b.Approve(pb.ApproveRequest(approval_id=held.approval_id, note="ok"), timeout=10)
    planner_b, _ = b.stub("planner")
    issued = planner_b.AwaitApproval(pb.AwaitApprovalRequest(approval_id=held.approval_id), timeout=10)
    assert issued.state == "ISSUED" and issued.lease_id
    with pytest.raises(grpc.RpcError) as again:
        planner_b.AwaitApproval(pb.AwaitApprovalRequest(approval_id=held.approval_id), timeout=10)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
