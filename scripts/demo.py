#!/usr/bin/env python3
"""The broker's main job, end to end, against a running dev broker (`scripts/demo` starts one).

Agents here are separate identities with their own X.509-SVIDs, talking to the broker over mTLS
exactly as an agent runtime would. Tokens are never printed: only their claims.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker._proto import broker_pb2 as pb  # noqa: E402
from broker._proto import broker_pb2_grpc as pb_grpc  # noqa: E402

TD = "spiffe://example.org"
PLANNER, WORKER, REPO, DEPLOYER = (f"{TD}/agent/planner", f"{TD}/agent/worker", f"{TD}/service/repo",
                                   f"{TD}/service/deployer")
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TASK = "release-42"


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def claims_of(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


class Demo:
    def __init__(self, folder: Path, addr: str) -> None:
        self.folder = folder
        self.addr = addr
        self.ca = (folder / "example.org.bundle.pem").read_bytes()

    def channel(self, name: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=(self.folder / f"{name}-key.pem").read_bytes(),
            certificate_chain=(self.folder / f"{name}.pem").read_bytes(),
        )
        return grpc.secure_channel(self.addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])

    def agent(self, name: str) -> pb_grpc.CredentialBrokerStub:
        return pb_grpc.CredentialBrokerStub(self.channel(name))

    def brokerctl(self, *args: str) -> str:
        env = {**os.environ, "BROKERCTL_ADDR": self.addr, "BROKERCTL_CERT": str(self.folder / "operator.pem"),
               "BROKERCTL_KEY": str(self.folder / "operator-key.pem"),
               "BROKERCTL_CA": str(self.folder / "example.org.bundle.pem")}
        out = subprocess.run([str(ROOT / "scripts" / "brokerctl"), *args], env=env, capture_output=True, text=True,
                             timeout=30, check=False)
        print("   $ brokerctl " + " ".join(args))
        for line in (out.stdout + out.stderr).rstrip().splitlines():
            print("     " + line)
        if out.returncode != 0:
            raise SystemExit(f"brokerctl exited {out.returncode}")
        return out.stdout


def watch(demo: Demo, events: queue.Queue, ready: threading.Event) -> grpc.Future:
    call = demo.agent("operator").WatchRevocations(pb.WatchRevocationsRequest(), timeout=120)

    def read() -> None:
        try:
            call.initial_metadata()
            ready.set()
            for event in call:
                events.put(event)
        except grpc.RpcError:
            ready.set()

    threading.Thread(target=read, daemon=True).start()
    return call


def run(demo: Demo) -> None:
    planner, worker, repo = demo.agent("planner"), demo.agent("worker"), demo.agent("repo")
    events: queue.Queue = queue.Queue()
    ready = threading.Event()
    watcher = watch(demo, events, ready)
    ready.wait(10)

    step("1. The planner agent proves its SPIFFE identity over mTLS and asks for one task's authority")
    grant = planner.Exchange(pb.ExchangeRequest(
        task_id=TASK, audience=REPO, actions=["repo:read", "repo:write"], resource="repo:org/app",
        ttl_seconds=1800, context={"reason": "prepare release 42"}), timeout=10)
    c = claims_of(grant.access_token)
    say(f"lease {grant.lease_id}  scope={list(grant.scope)}  expires in {grant.expires_in}s "
        f"(asked 1800s, capped by: {grant.ttl_capped_by})")
    say(f"token claims: sub={c['sub']} aud={c['aud']} txn={c['txn']} cnf={list(c['cnf'])} typ=at+jwt")

    step("2. The repo service introspects the token it was handed")
    info = repo.Introspect(pb.IntrospectRequest(token=grant.access_token), timeout=10)
    say(f"active={info.active} subject={info.subject} scope={list(info.scope)}")

    step("3. The planner hands a read-only slice to a worker agent (RFC 8693 delegation)")
    child = worker.Exchange(pb.ExchangeRequest(actions=["repo:read"], subject_token=grant.access_token,
                                               subject_token_type=ACCESS_TOKEN), timeout=10)
    cc = claims_of(child.access_token)
    say(f"lease {child.lease_id}  sub={cc['sub']}  act={json.dumps(cc['act'])}  scope={cc['scope']}")
    say(f"expires no later than its parent: {child.expires_at.seconds} <= {grant.expires_at.seconds}")
    try:
        worker.Exchange(pb.ExchangeRequest(actions=["repo:write"], subject_token=grant.access_token,
                                           subject_token_type=ACCESS_TOKEN), timeout=10)
    except grpc.RpcError as e:
        say(f"the worker asking for repo:write is refused: {e.code().name}: {e.details()}")

    step("4. A production deploy needs a human: the exchange waits for an operator's approval")
    pending = planner.Exchange(pb.ExchangeRequest(
        task_id=TASK, audience=DEPLOYER, actions=["deploy:prod"], resource="service:app",
        context={"ticket": "CHG-1234"}), timeout=10)
    say(f"state={pending.state} approval_id={pending.approval_id}")
    result: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: result.put(
        planner.AwaitApproval(pb.AwaitApprovalRequest(approval_id=pending.approval_id), timeout=60)),
        daemon=True).start()
    time.sleep(0.5)
    demo.brokerctl("approvals", "list")
    demo.brokerctl("approvals", "approve", pending.approval_id, "--note", "CHG-1234 reviewed")
    deploy = result.get(timeout=30)
    say(f"AwaitApproval returned: lease {deploy.lease_id} scope={list(deploy.scope)} "
        f"expires in {deploy.expires_in}s (capped by: {deploy.ttl_capped_by})")

    step("5. The operator sees every live credential of the task")
    demo.brokerctl("leases", "list", "--task", TASK)

    step("6. The task completes: every credential of it dies at once")
    done = planner.CompleteTask(pb.CompleteTaskRequest(task_id=TASK), timeout=10)
    say(f"revoked_count={done.revoked_count}")
    for _ in range(done.revoked_count):
        e = events.get(timeout=10)
        say(f"watch: lease {e.lease_id} {e.reason} (audience {e.audience}, by {e.initiator})")
    for name, token in (("planner", grant.access_token), ("worker", child.access_token)):
        active = repo.Introspect(pb.IntrospectRequest(token=token), timeout=10).active
        say(f"introspect {name}'s token: active={active}")
    watcher.cancel()

    step("7. The audit trail: every decision and change, with hashes, never tokens")
    audit = [json.loads(line) for line in (demo.folder / "audit.jsonl").read_text().splitlines()]
    kinds: dict[str, int] = {}
    for record in audit:
        kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
    say(", ".join(f"{k} x{n}" for k, n in kinds.items()))
    text = (demo.folder / "audit.jsonl").read_text()
    leaked = any(t in text for t in (grant.access_token, child.access_token, deploy.access_token))
    say(f"tokens in the audit log: {'YES (bug!)' if leaked else 'none'}")
    if leaked:
        raise SystemExit("a token leaked into the audit log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the folder `broker serve --dev` wrote")
    parser.add_argument("--addr", required=True, help="the broker's mTLS address")
    args = parser.parse_args()
    run(Demo(args.dir, args.addr))
    print("\n\033[1mdemo complete\033[0m")
    return 0


if __name__ == "__main__":
    sys.exit(main())
