#!/usr/bin/env python3
"""The broker's main job, end to end, against a running dev broker (`scripts/demo` starts one).

Agents are separate identities talking to the broker through the agent SDK (`broker.client`):
the planner gets its X.509-SVID from a SPIFFE Workload API (the test kit's mock, on a unix
socket), the worker and the repo service read theirs from files. The repo service also runs an
MCP tool server (the official SDK, streamable HTTP over mutual TLS on loopback) gated by
`broker.mcp`. Tokens are never printed: only their claims.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx2
from mcp.server.mcpserver import MCPServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker._proto import broker_pb2 as pb  # noqa: E402
from broker._proto import broker_pb2_grpc as pb_grpc  # noqa: E402
from broker.client import AgentClient, FileIdentity, PolicyDenied, WorkloadApiIdentity  # noqa: E402
from broker.mcp import ToolGate, connect  # noqa: E402
from broker.mcp.transport import client_context  # noqa: E402
from broker.pki.x509_ca import SpiffeCA  # noqa: E402
from broker.testing.asgi import serve_asgi  # noqa: E402
from broker.testing.workload_api import MockWorkloadApi, load_svid  # noqa: E402
from broker.verifier import TokenVerifier  # noqa: E402

TD = "spiffe://example.org"
BROKER, REPO, DEPLOYER = f"{TD}/broker", f"{TD}/service/repo", f"{TD}/service/deployer"
TASK = "release-42"
TOOLS = "mcp:repo-tools"


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def claims_of(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


class Demo:
    def __init__(self, folder: Path, addr: str, http: str, revocation_wait: float = 1.0) -> None:
        self.revocation_wait = revocation_wait
        self.folder = folder
        self.addr = addr
        self.http = http
        self.bundle = folder / "example.org.bundle.pem"
        self.tokens: list[str] = []  # every token handed out, to check the audit log for leaks

    def files(self, name: str) -> FileIdentity:
        return FileIdentity(self.folder / f"{name}.pem", self.folder / f"{name}-key.pem", self.bundle)

    def agent(self, name: str) -> AgentClient:
        return AgentClient(self.addr, self.files(name))

    def brokerctl(self, *args: str) -> str:
        env = {**os.environ, "BROKERCTL_ADDR": self.addr, "BROKERCTL_CERT": str(self.folder / "operator.pem"),
               "BROKERCTL_KEY": str(self.folder / "operator-key.pem"), "BROKERCTL_CA": str(self.bundle)}
        out = subprocess.run([str(ROOT / "scripts" / "brokerctl"), *args], env=env, capture_output=True, text=True,
                             timeout=30, check=False)
        print("   $ brokerctl " + " ".join(args))
        for line in (out.stdout + out.stderr).rstrip().splitlines():
            print("     " + line)
        if out.returncode != 0:
            raise SystemExit(f"brokerctl exited {out.returncode}")
        return out.stdout


def watch(demo: Demo, events: queue.Queue) -> grpc.Future:
    """The operator's view of the revocation stream, on a thread of its own."""
    creds = grpc.ssl_channel_credentials(demo.bundle.read_bytes(), (demo.folder / "operator-key.pem").read_bytes(),
                                         (demo.folder / "operator.pem").read_bytes())
    channel = grpc.secure_channel(demo.addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])
    call = pb_grpc.CredentialBrokerStub(channel).WatchRevocations(pb.WatchRevocationsRequest(), timeout=300)
    ready = threading.Event()

    def read() -> None:
        try:
            call.initial_metadata()
            ready.set()
            for event in call:
                events.put(event)
        except grpc.RpcError:
            ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(10)
    return call


def tool_server_app(demo: Demo, verifier: TokenVerifier, holder: dict):
    """The repo service's MCP server: `read_file` and `delete_repo`, every call gated by the broker."""

    def make(base_url: str):
        gate = ToolGate(verifier, resource_url=base_url + "/mcp", authorization_server=demo.http, resource=TOOLS,
                        resource_name="repo tools")
        server = MCPServer("repo-tools", token_verifier=gate.token_verifier, auth=gate.auth_settings(),
                           log_level="WARNING")

        @server.tool()
        def read_file(path: str) -> str:
            return f"# {path}\nrelease notes for 42"

        @server.tool()
        def delete_repo(name: str) -> str:
            return f"deleted {name}"

        holder["gate"] = gate
        return gate.wrap(server.streamable_http_app())

    return make


def tool_server_tls(demo: Demo) -> tuple[tuple[Path, Path, Path], bytes]:
    """A certificate for the tool server from a CA of its own; it requires clients of example.org."""
    ca = SpiffeCA("tools.demo")
    cert, key = ca.server_svid("spiffe://tools.demo/mcp/repo-tools").write(demo.folder, "repo-tools")
    return (cert, key, demo.bundle), ca.bundle_pem()


async def grant_and_delegate(demo: Demo, task) -> tuple:
    step("1. The planner proves its identity (an X.509-SVID from the Workload API) and asks for one task's authority")
    grant = await task.credential(audience=REPO, actions=["repo:read", "repo:write"], resource="repo:org/app",
                                  ttl=1800, context={"reason": "prepare release 42"})
    c = claims_of(grant.token)
    say(f"lease {grant.lease_id}  scope={list(grant.scope)}  expires in {int(grant.expires_at - time.time())}s "
        f"(asked 1800s, capped by: {grant.ttl_capped_by})")
    say(f"token claims: sub={c['sub']} aud={c['aud']} txn={c['txn']} cnf={list(c['cnf'])} typ=at+jwt")

    step("2. The repo service introspects the token it was handed")
    async with demo.agent("repo") as repo:
        info = await repo.introspect(grant.token)
    say(f"active={info.active} subject={info.subject} scope={list(info.scope)}")

    step("3. The planner hands a read-only slice to a worker agent (RFC 8693 delegation)")
    async with demo.agent("worker") as worker, worker.task(TASK) as sub:
        child = await sub.credential(actions=["repo:read"], subject_token=grant.token)
        cc = claims_of(child.token)
        say(f"lease {child.lease_id}  sub={cc['sub']}  act={json.dumps(cc['act'])}  scope={cc['scope']}")
        say(f"expires no later than its parent: {int(child.expires_at)} <= {int(grant.expires_at)}")
        try:
            await sub.credential(actions=["repo:write"], subject_token=grant.token)
        except PolicyDenied as e:
            say(f"the worker asking for repo:write is refused: {e}")
    demo.tokens += [grant.token, child.token]
    return grant, child


def operator_approves(demo: Demo):
    """The agent's approval callback: it tells its user, and here the operator answers with brokerctl."""

    async def tell_the_user(approval_id: str, request: dict) -> None:
        say(f"state=PENDING_APPROVAL approval_id={approval_id} (the agent tells its user, and waits)")
        await asyncio.to_thread(demo.brokerctl, "approvals", "list")
        await asyncio.to_thread(demo.brokerctl, "approvals", "approve", approval_id, "--note", "CHG-1234 reviewed")

    return tell_the_user


async def approval(demo: Demo, task) -> None:
    step("4. A production deploy needs a human: the SDK waits in AwaitApproval, the operator approves")
    deploy = await task.credential(audience=DEPLOYER, actions=["deploy:prod"], resource="service:app",
                                   context={"ticket": "CHG-1234"})
    say(f"approved: lease {deploy.lease_id} scope={list(deploy.scope)} (capped by: {deploy.ttl_capped_by})")
    demo.tokens.append(deploy.token)


async def mcp_tools(demo: Demo, task, url: str, server_roots: bytes) -> str:
    step("6. MCP: each tool call carries a credential for exactly that tool, and policy decides each one")
    async with connect(url, task, audience=REPO, resource=TOOLS, server_roots_pem=server_roots) as tools:
        listed = await tools.list_tools()
        say(f"tools offered: {[t.name for t in listed.tools]}")
        result = await tools.call_tool("read_file", {"path": "RELEASE.md"})
        say(f"read_file -> {result.content[0].text.splitlines()[0]!r}")
        try:
            await tools.call_tool("delete_repo", {"name": "org/app"})
        except PolicyDenied as e:
            say(f"delete_repo refused by policy: {e}")
    reader = await task.credential(audience=REPO, actions=["tool:read_file"], resource=TOOLS)
    say(f"the read_file credential: lease {reader.lease_id} scope={list(reader.scope)}")
    async with httpx2.AsyncClient(verify=client_context(task.client.identity.material(),
                                                        server_roots_pem=server_roots)) as http:
        answer = await http.post(url, json=_call("delete_repo", {"name": "org/app"}),
                                 headers={"Authorization": f"Bearer {reader.token}"})
    challenge = answer.headers.get("www-authenticate", "")
    say(f"that credential presented for delete_repo: HTTP {answer.status_code}, WWW-Authenticate: "
        f"{challenge.split(', error_description')[0]}, scope={_param(challenge, 'scope')!r}")
    demo.tokens.append(reader.token)
    return reader.token


def _param(challenge: str, name: str) -> str:
    found = re.search(rf'{name}="([^"]*)"', challenge)
    return found.group(1) if found else ""


def _description(answer: httpx2.Response) -> str:
    return _param(answer.headers.get("www-authenticate", ""), "error_description")


def _call(name: str, arguments: dict) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


async def after_completion(demo: Demo, url: str, server_roots: bytes, material, reader: str, events: queue.Queue,
                           done_at: float, gate: ToolGate, count: int) -> None:
    for _ in range(count):
        e = await asyncio.to_thread(events.get, True, 10)
        say(f"watch: lease {e.lease_id} {e.reason} (audience {e.audience}, by {e.initiator})")
    follower = gate.verifier.follower
    await follower.wait_for(lambda: claims_of(reader)["jti"] in follower.revoked, timeout=demo.revocation_wait)
    async with httpx2.AsyncClient(verify=client_context(material, server_roots_pem=server_roots)) as http:
        answer = await http.post(url, json=_call("read_file", {"path": "RELEASE.md"}),
                                 headers={"Authorization": f"Bearer {reader}"})
    elapsed = time.monotonic() - done_at
    say(f"the next read_file call with the held token: HTTP {answer.status_code} "
        f"({_description(answer)}), {elapsed * 1000:.0f} ms after completion")
    if answer.status_code != 401:
        raise SystemExit(f"the tool call after completion was not refused within {demo.revocation_wait}s")
    async with demo.agent("repo") as repo:
        for name, token in (("planner", demo.tokens[0]), ("worker", demo.tokens[1])):
            say(f"introspect {name}'s token: active={(await repo.introspect(token)).active}")


def audit_summary(demo: Demo) -> None:
    step("8. The audit trail: every decision and change, with hashes, never tokens")
    text = (demo.folder / "audit.jsonl").read_text()
    audit = [json.loads(line) for line in text.splitlines()]
    kinds: dict[str, int] = {}
    for record in audit:
        kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
    say(", ".join(f"{k} x{n}" for k, n in kinds.items()))
    for record in audit:
        if record["kind"] == "decision" and any(a.startswith("tool:") for a in record.get("actions", [])):
            say(f"decision: {record.get('decision')} {record.get('actions')} for {record.get('principal')}")
    leaked = any(t in text for t in demo.tokens)
    say(f"tokens in the audit log: {'YES (bug!)' if leaked else 'none'}")
    if leaked:
        raise SystemExit("a token leaked into the audit log")


async def run(demo: Demo) -> None:
    events: queue.Queue = queue.Queue()
    watcher = watch(demo, events)
    planner_svid = load_svid((demo.folder / "planner.pem").read_bytes(), (demo.folder / "planner-key.pem").read_bytes())
    tls, server_roots = tool_server_tls(demo)
    holder: dict = {}
    with MockWorkloadApi.for_svid(planner_svid, demo.bundle.read_bytes()) as workload_api:
        async with demo.agent("repo") as repo_connection, \
                AgentClient(demo.addr, WorkloadApiIdentity(workload_api.address)) as planner:
            verifier = TokenVerifier(issuer=BROKER, audience=REPO, broker=repo_connection, revocations="follow")
            async with serve_asgi(tool_server_app(demo, verifier, holder), tls=tls) as base_url:
                await verifier.wait_ready()
                url = base_url + "/mcp"
                task = planner.task(TASK, on_approval=operator_approves(demo))
                async with task:
                    await grant_and_delegate(demo, task)
                    await approval(demo, task)
                    step("5. The operator sees every live credential of the task")
                    await asyncio.to_thread(demo.brokerctl, "leases", "list", "--task", TASK)
                    reader = await mcp_tools(demo, task, url, server_roots)
                    step("7. The task completes: every credential of it dies at once, tool servers included")
                done_at = time.monotonic()
                say(f"revoked_count={task.completed}")
                await after_completion(demo, url, server_roots, planner.identity.material(), reader, events,
                                       done_at, holder["gate"], task.completed or 0)
    watcher.cancel()
    audit_summary(demo)


def main() -> int:
    for name in ("httpx2", "mcp", "spiffe", "uvicorn"):
        logging.getLogger(name).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the folder `broker serve --dev` wrote")
    parser.add_argument("--addr", required=True, help="the broker's mTLS address")
    parser.add_argument("--http", required=True, help="the broker's HTTP listener URL (its authorization server)")
    parser.add_argument("--revocation-wait", type=float, default=1.0,
                        help="how long the tool server may take to learn of the revocation (default 1 s)")
    args = parser.parse_args()
    asyncio.run(run(Demo(args.dir, args.addr, args.http, args.revocation_wait)))
    print("\n\033[1mdemo complete\033[0m")
    return 0


if __name__ == "__main__":
    sys.exit(main())
