"""The MCP gate on the official SDK: per-tool credentials, 401/403 challenges, RFC 9728, revocation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer

from broker.client import PolicyDenied
from broker.mcp import ToolGate, connect
from broker.mcp.transport import client_context
from broker.testing.asgi import serve_asgi
from broker.testing.broker import InProcessBroker
from broker.verifier import TokenVerifier
from tests.sdk.conftest import PLANNER, TOOLS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
RESOURCE = "mcp:repo-tools"


@dataclass
class ToolServer:
    url: str = ""
    gate: ToolGate | None = None
    scopes_seen: list[list[str]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def tool_server(broker: InProcessBroker, folder: Path, actions: dict | None = None) -> AsyncIterator[ToolServer]:
    """An MCP server with `read_file` and `delete_repo`, over mutual TLS, gated by the broker."""
    running = ToolServer()
    cert, key = broker.issuer.ca("example.org").server_svid(TOOLS).write(folder, "tools")
    (folder / "bundle.pem").write_bytes(broker.roots_pem)
    async with broker.agent(TOOLS) as connection:
        verifier = TokenVerifier(issuer=broker.spiffe_id, audience=TOOLS, broker=connection, revocations="follow")

        def make(base_url: str):
            gate = ToolGate(verifier, resource_url=base_url + "/mcp", authorization_server=broker.http_url,
                            resource=RESOURCE, resource_name="repo tools", actions=actions)
            server = MCPServer("repo-tools", token_verifier=gate.token_verifier, auth=gate.auth_settings())

            @server.tool()
            def read_file(path: str) -> str:
                running.scopes_seen.append(get_access_token().scopes)
                return f"contents of {path}"

            @server.tool()
            def delete_repo(name: str) -> str:
                return f"deleted {name}"

            running.gate = gate
            return gate.wrap(server.streamable_http_app())

        async with serve_asgi(make, tls=(cert, key, folder / "bundle.pem")) as base_url:
            running.url = base_url + "/mcp"
            assert await verifier.wait_ready()
            yield running


def rpc(name: str, arguments: dict) -> dict:
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


def http(broker: InProcessBroker, spiffe_id: str = PLANNER) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(verify=client_context(broker.identity(spiffe_id).material()), timeout=10)


async def test_each_tool_call_carries_exactly_its_tools_credential(broker: InProcessBroker, tmp_path: Path) -> None:
    async with tool_server(broker, tmp_path) as tools, broker.agent(PLANNER) as planner, \
            planner.task("T-1") as task, connect(tools.url, task, audience=TOOLS, resource=RESOURCE) as session:
        result = await session.call_tool("read_file", {"path": "README.md"})
        with pytest.raises(PolicyDenied):
            await session.call_tool("delete_repo", {"name": "org/app"})
    assert result.content[0].text == "contents of README.md"
    assert tools.scopes_seen == [["tool:read_file"]]
    decisions = [(r.get("actions"), r.get("decision")) for r in broker.audit() if r["kind"] == "decision"]
    assert (["tool:read_file"], "allow") in decisions
    assert (["tool:delete_repo"], "deny") in decisions


async def test_a_token_without_the_tools_scope_is_403_naming_it(broker: InProcessBroker, tmp_path: Path) -> None:
    async with tool_server(broker, tmp_path) as tools, broker.agent(PLANNER) as planner, planner.task("T-1") as task:
        reader = await task.credential(audience=TOOLS, actions=["tool:read_file"], resource=RESOURCE)
        async with http(broker) as client:
            answer = await client.post(tools.url, json=rpc("delete_repo", {"name": "org/app"}),
                                       headers={"Authorization": f"Bearer {reader.token}",
                                                "Accept": "application/json, text/event-stream"})
    assert answer.status_code == 403
    challenge = answer.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="insufficient_scope"')
    assert 'scope="tool:delete_repo"' in challenge
    assert f'resource_metadata="{tools.gate.metadata_url}"' in challenge
    assert answer.json()["id"] == 7


async def test_no_or_a_bad_token_is_401_pointing_at_the_metadata(broker: InProcessBroker, tmp_path: Path) -> None:
    async with tool_server(broker, tmp_path) as tools, http(broker) as client:
        missing = await client.post(tools.url, json=rpc("read_file", {"path": "x"}))
        forged = await client.post(tools.url, json=rpc("read_file", {"path": "x"}),
                                   headers={"Authorization": "Bearer e30.e30.e30"})
        metadata = await client.get(tools.gate.metadata_url)
    for answer in (missing, forged):
        assert answer.status_code == 401
        assert f'resource_metadata="{tools.gate.metadata_url}"' in answer.headers["www-authenticate"]
    assert 'error="invalid_token"' in forged.headers["www-authenticate"]
    doc = metadata.json()
    assert doc["resource"] == tools.url and doc["authorization_servers"] == [broker.http_url]
    assert doc["bearer_methods_supported"] == ["header"]


async def test_after_the_task_completes_the_next_call_is_refused(broker: InProcessBroker, tmp_path: Path) -> None:
    async with tool_server(broker, tmp_path) as tools, broker.agent(PLANNER) as planner:
        async with planner.task("T-1") as task:
            reader = await task.credential(audience=TOOLS, actions=["tool:read_file"], resource=RESOURCE)
        follower = tools.gate.verifier.follower
        assert await follower.wait_for(lambda: reader.lease_id in follower.revoked, timeout=5)
        async with http(broker) as client:
            answer = await client.post(tools.url, json=rpc("read_file", {"path": "x"}),
                                       headers={"Authorization": f"Bearer {reader.token}"})
    assert answer.status_code == 401
    assert "revoked" in answer.headers["www-authenticate"]


async def test_a_bound_token_from_another_certificate_is_refused(broker: InProcessBroker, tmp_path: Path) -> None:
    async with tool_server(broker, tmp_path) as tools, broker.agent(PLANNER) as planner, planner.task("T-1") as task:
        reader = await task.credential(audience=TOOLS, actions=["tool:read_file"], resource=RESOURCE)
        async with http(broker, "spiffe://example.org/agent/worker") as client:
            answer = await client.post(tools.url, json=rpc("read_file", {"path": "x"}),
                                       headers={"Authorization": f"Bearer {reader.token}"})
    assert answer.status_code == 401
    assert "cnf mismatch" in answer.headers["www-authenticate"]


async def test_a_mapped_tool_needs_its_mapped_action(broker: InProcessBroker, tmp_path: Path) -> None:
    async with tool_server(broker, tmp_path, actions={"delete_repo": "repo:delete"}) as tools, \
            broker.agent(PLANNER) as planner, planner.task("T-1") as task:
        reader = await task.credential(audience=TOOLS, actions=["tool:read_file"], resource=RESOURCE)
        async with http(broker) as client:
            answer = await client.post(tools.url, json=rpc("delete_repo", {"name": "org/app"}),
                                       headers={"Authorization": f"Bearer {reader.token}"})
            metadata = (await client.get(tools.gate.metadata_url)).json()
    assert answer.status_code == 403 and 'scope="repo:delete"' in answer.headers["www-authenticate"]
    assert metadata["scopes_supported"] == ["repo:delete"]
