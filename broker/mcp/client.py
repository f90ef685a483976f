"""Client side of the MCP gate: every tool call carries a credential for exactly that tool.

    async with agent.task("T-42") as task:
        async with connect(url, task, audience="spiffe://example.org/service/tools") as tools:
            await tools.call_tool("read_file", {"path": "README.md"})

`BrokerAuth` (an `httpx2.Auth`) reads each outgoing MCP message: a `tools/call` is sent with the
task's credential for that tool's action (fetched, or reused while it lives), anything else
with the credential for `connect_actions`. So a stolen token opens one tool of one task, and
every tool the agent uses is a policy decision in the broker's audit trail.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.client.errors import BrokerClientError
from broker.client.task import Credential, Task
from broker.mcp.messages import tool_action, tool_calls
from broker.mcp.transport import client_context

CONNECT_ACTIONS = ("mcp:connect",)


class BrokerAuth(httpx2.Auth):
    """Per-message credentials for an MCP HTTP client, from one task."""

    requires_request_body = True

    def __init__(
        self,
        task: Task,
        *,
        audience: str,
        resource: str = "",
        action_for: Callable[[str], str] = tool_action,
        connect_actions: Sequence[str] = CONNECT_ACTIONS,
    ) -> None:
        self.task = task
        self.audience = audience
        self.resource = resource
        self.action_for = action_for
        self.connect_actions = tuple(connect_actions)

    async def credential(self, actions: Sequence[str]) -> Credential:
        """Raises: PolicyDenied and the other `broker.client` errors."""
        return await self.task.credential(audience=self.audience, actions=actions, resource=self.resource)

    def actions_for(self, body: bytes) -> list[str]:
        calls = tool_calls(body)
        names = calls[0] if calls is not None else []
        return [self.action_for(n) for n in names] if names else list(self.connect_actions)

    async def async_auth_flow(self, request: httpx2.Request) -> Any:
        await request.aread()
        try:
            credential = await self.credential(self.actions_for(request.content))
        except BrokerClientError:
            # No credential: the request goes without one, and the server's refusal answers it.
            yield request
            return
        request.headers["Authorization"] = f"Bearer {credential.token}"
        yield request


class ToolClient:
    """An MCP client session whose tool calls are each authorized by the broker first."""

    def __init__(self, client: Client, auth: BrokerAuth) -> None:
        self.session = client
        self.auth = auth

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Call `name`; raises PolicyDenied (and friends) when the broker refuses its credential."""
        await self.auth.credential([self.auth.action_for(name)])
        return await self.session.call_tool(name, arguments, **kw)

    async def list_tools(self) -> Any:
        return await self.session.list_tools()


@contextlib.asynccontextmanager
async def connect(
    url: str,
    task: Task,
    *,
    audience: str,
    resource: str = "",
    action_for: Callable[[str], str] = tool_action,
    connect_actions: Sequence[str] = CONNECT_ACTIONS,
    timeout: float = 30.0,
    server_roots_pem: bytes | None = None,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[ToolClient]:
    """An MCP session over streamable HTTP with per-tool broker credentials from `task`.

    For an `https://` URL the connection presents the agent's X.509-SVID (mutual TLS), so a
    certificate-bound credential can be checked by the server; `server_roots_pem` names the
    roots of the server's certificate when they are not the agent's own trust bundle.
    """
    auth = BrokerAuth(task, audience=audience, resource=resource, action_for=action_for,
                      connect_actions=connect_actions)
    if tls is None and url.startswith("https://"):
        tls = client_context(task.client.identity.material(), server_roots_pem=server_roots_pem)
    async with httpx2.AsyncClient(auth=auth, timeout=timeout, verify=tls or True) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        yield ToolClient(client, auth)
