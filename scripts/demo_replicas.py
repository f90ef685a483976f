"""`./scripts/demo --replicas N`: the story on N broker replicas sharing one PostgreSQL.

Starts a throwaway PostgreSQL in a temporary folder, writes the dev material once, starts N
`broker serve` processes on loopback ports with `[store] backend = "postgres"`, then shows a
token minted by replica A verified and introspected on replica B, revoked through A, the
revocation arriving on a watcher of B, and B answering inactive at once. Everything it started
is stopped on the way out, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker._proto import broker_pb2 as pb  # noqa: E402
from broker._proto import broker_pb2_grpc as pb_grpc  # noqa: E402
from broker.cli.dev import DevPorts, _dev_config, write_dev_setup  # noqa: E402
from broker.testing.postgres import PostgresServer  # noqa: E402

AUDIENCE = "spiffe://example.org/service/repo"
DEPLOYER = "spiffe://example.org/service/deployer"


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def start_replica(folder: Path, name: str, dsn: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    config = folder / f"broker-{name}.toml"
    text = _dev_config(DevPorts(0, 0, 0)).replace('path = "audit.jsonl"', f'path = "audit-{name}.jsonl"')
    (folder / f"store-{name}.dsn").write_text(dsn + "\n")
    os.chmod(folder / f"store-{name}.dsn", 0o600)
    config.write_text(text + f'\n[store]\nbackend = "postgres"\ndsn_file = "store-{name}.dsn"\nreplica_id = "{name}"\n')
    log = (folder / f"broker-{name}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, stdout=subprocess.PIPE, stderr=log,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("broker ready: "):
            return proc, json.loads(line.removeprefix("broker ready: "))
        if not line and proc.poll() is not None:
            break
    raise SystemExit(f"replica {name} did not start: see {folder / f'broker-{name}.log'}")


def channel(folder: Path, port: int, who: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(folder / "example.org.bundle.pem").read_bytes(),
        private_key=(folder / f"{who}-key.pem").read_bytes(),
        certificate_chain=(folder / f"{who}.pem").read_bytes(),
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


def story(folder: Path, ports: list[dict[str, int]]) -> None:
    a, b = ports[0]["mtls"], ports[1]["mtls"]
    planner = pb_grpc.CredentialBrokerStub(channel(folder, a, "planner"))
    repo_on_b = pb_grpc.CredentialBrokerStub(channel(folder, b, "repo"))
    operator_on_a = pb_grpc.BrokerAdminStub(channel(folder, a, "operator"))

    step("the planner exchanges its SVID for a repo token on replica A")
    resp = planner.Exchange(
        pb.ExchangeRequest(task_id="fix-bug-42", audience=AUDIENCE, actions=["repo:read"], resource="repo:org/app"),
        timeout=10,
    )
    say(f"lease {resp.lease_id}, expires in {resp.expires_in}s (capped by {resp.ttl_capped_by})")

    step("replica B knows A's key and the lease")
    jwks = json.loads(repo_on_b.GetJWKS(pb.GetJWKSRequest(), timeout=10).jwks_json)
    say(f"B's JWKS holds {len(jwks['keys'])} keys, one per replica")
    answer = repo_on_b.Introspect(pb.IntrospectRequest(token=resp.access_token), timeout=10)
    say(f"Introspect on B: active={answer.active} lease={answer.lease_id}")

    step("the repo service watches revocations on B; an operator revokes through A")
    events: list[pb.RevocationEvent] = []
    got = threading.Event()
    call = repo_on_b.WatchRevocations(pb.WatchRevocationsRequest(), timeout=30)
    call.initial_metadata()

    def read() -> None:
        try:
            for event in call:
                events.append(event)
                got.set()
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    started = time.monotonic()
    count = operator_on_a.Revoke(pb.RevokeRequest(lease_id=resp.lease_id, reason="demo"), timeout=10).revoked_count
    say(f"Revoke on A: {count} lease revoked")
    answer = repo_on_b.Introspect(pb.IntrospectRequest(token=resp.access_token), timeout=10)
    say(f"Introspect on B right after: active={answer.active}")
    if not got.wait(10):
        raise SystemExit("the watcher on B got no event")
    ms = (time.monotonic() - started) * 1000
    event = events[0]
    say(f"watcher on B: {event.lease_id} {event.reason} by {event.initiator} (cursor {event.cursor}, {ms:.0f} ms)")
    call.cancel()

    step("a deploy asked for on A waits on B; an operator approves it through A; B issues it, once")
    planner_on_b = pb_grpc.CredentialBrokerStub(channel(folder, b, "planner"))
    held = planner.Exchange(
        pb.ExchangeRequest(task_id="ship-42", audience=DEPLOYER, actions=["deploy:prod"], resource="service:app",
                           context={"ticket": "CHG-42"}),
        timeout=10,
    )
    say(f"Exchange on A: {held.state} {held.approval_id}")
    waiting = planner_on_b.AwaitApproval.future(pb.AwaitApprovalRequest(approval_id=held.approval_id), timeout=30)
    decided = operator_on_a.Approve(pb.ApproveRequest(approval_id=held.approval_id, note="CHG-42"), timeout=10)
    say(f"Approve on A: {decided.state} by {decided.decided_by}")
    issued = waiting.result(timeout=30)
    say(f"AwaitApproval on B: {issued.state}, lease {issued.lease_id} scope={list(issued.scope)}")
    try:
        planner.AwaitApproval(pb.AwaitApprovalRequest(approval_id=held.approval_id), timeout=10)
        raise SystemExit("an approval was used twice")
    except grpc.RpcError as e:
        say(f"AwaitApproval again on A: {e.code().name} ({e.details()})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    if args.replicas < 2:
        parser.error("--replicas needs at least 2")
    folder = Path(tempfile.mkdtemp(prefix="broker-replicas-"))
    procs: list[subprocess.Popen[str]] = []
    step(f"starting PostgreSQL and {args.replicas} replicas (files in {folder})")
    try:
        with PostgresServer() as server:
            dsn = server.create_database("broker")
            write_dev_setup(folder, DevPorts(0, 0, 0))
            ports = []
            for i in range(args.replicas):
                name = chr(ord("a") + i)
                proc, bound = start_replica(folder, name, dsn)
                procs.append(proc)
                ports.append(bound)
                say(f"replica {name}: mTLS on 127.0.0.1:{bound['mtls']}")
            story(folder, ports)
            step("stopping the replicas and PostgreSQL")
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(20)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
