"""Server side of the MCP gate: the SDK's token verifier, per-tool scopes, RFC 9728 metadata.

    gate = ToolGate(verifier, resource_url="http://127.0.0.1:9000/mcp",
                    authorization_server="https://broker.example", actions={"delete_repo": "repo:delete"})
    server = MCPServer("repo-tools", token_verifier=gate.token_verifier, auth=gate.auth_settings())
    app = gate.wrap(server.streamable_http_app())

`wrap` reads each POST to the MCP endpoint before the SDK does: a `tools/call` runs only when
the token's scope holds that tool's action (`tool:<name>` unless `actions` maps it), else the
answer is 403 with `WWW-Authenticate: Bearer error="insufficient_scope", scope="<action>"`.
A missing, bad, expired or revoked token is 401 naming the protected-resource metadata, which
`wrap` serves (RFC 9728) with the broker as the authorization server.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from broker.mcp.messages import tool_action, tool_calls
from broker.verifier.asgi import ASGIApp, bearer_token, peer_certificate, refuse, run_as, send_json
from broker.verifier.errors import TokenRejected
from broker.verifier.verifier import TokenVerifier, VerifiedToken

_MAX_BODY = 4 * 1024 * 1024
# The token the gate verified for this request, so the SDK's verifier does not verify it again.
_gated: contextvars.ContextVar[tuple[str, VerifiedToken] | None] = contextvars.ContextVar("mcp_gated", default=None)


def _access_token(token: str, verified: VerifiedToken) -> AccessToken:
    return AccessToken(
        token=token, client_id=verified.client_id or verified.subject, scopes=list(verified.scope),
        expires_at=int(verified.expires_at), resource=verified.audience[0] if verified.audience else None,
        subject=verified.subject, claims=dict(verified.claims),
    )


class BrokerTokenVerifier:
    """The MCP SDK's `TokenVerifier` protocol on `broker.verifier`: None for any refused token."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        gated = _gated.get()
        if gated is not None and gated[0] == token:
            return _access_token(token, gated[1])
        try:
            return _access_token(token, await self._verifier.verify(token))
        except TokenRejected:
            return None


class ToolGate:
    """Per-tool authorization for an MCP server on streamable HTTP (see the module docstring)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        resource_url: str,
        authorization_server: str,
        actions: Mapping[str, str] | None = None,
        action_for: Callable[[str], str] = tool_action,
        resource: str | None = None,
        resource_name: str | None = None,
    ) -> None:
        self.verifier = verifier
        self.resource_url = resource_url.rstrip("/")
        self.authorization_server = authorization_server
        self._actions = dict(actions or {})
        self._action_for = action_for
        self._resource = resource
        self._resource_name = resource_name
        parsed = urlparse(self.resource_url)
        self.path = parsed.path or "/"
        self.metadata_path = "/.well-known/oauth-protected-resource" + (parsed.path if parsed.path != "/" else "")
        self.metadata_url = f"{parsed.scheme}://{parsed.netloc}{self.metadata_path}"
        self.token_verifier = BrokerTokenVerifier(verifier)

    def action(self, tool: str) -> str:
        """The action `tool` needs."""
        return self._actions.get(tool) or self._action_for(tool)

    def auth_settings(self) -> AuthSettings:
        """`AuthSettings` for `MCPServer(auth=...)`: this resource, the broker as its authorization server."""
        return AuthSettings(issuer_url=self.authorization_server, resource_server_url=self.resource_url,
                            validate_token_resource=False)

    def metadata(self) -> dict[str, Any]:
        """The RFC 9728 protected-resource metadata document."""
        doc: dict[str, Any] = {
            "resource": self.resource_url,
            "authorization_servers": [self.authorization_server],
            "bearer_methods_supported": ["header"],
            "scopes_supported": sorted(set(self._actions.values())),
        }
        if self._resource_name:
            doc["resource_name"] = self._resource_name
        return doc

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """The MCP app behind the gate."""

        async def gated(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await app(scope, self._lifespan(receive), send)
            elif scope["type"] != "http":
                await app(scope, receive, send)
            elif scope["path"] == self.metadata_path and scope["method"] == "GET":
                await send_json(send, 200, self.metadata())
            elif scope["path"].rstrip("/") == self.path.rstrip("/"):
                await self._guard(app, scope, receive, send)
            else:
                await app(scope, receive, send)

        return gated

    def _lifespan(self, receive: Any) -> Any:
        """Start following revocations when the server starts, stop when it stops."""

        async def lifespan_receive() -> dict:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.verifier.start()
            elif message["type"] == "lifespan.shutdown":
                await self.verifier.close()
            return message

        return lifespan_receive

    async def _guard(self, app: ASGIApp, scope: Any, receive: Any, send: Any) -> None:
        body, receive = await _buffered(receive) if scope["method"] == "POST" else (b"", receive)
        if body is None:
            await send_json(send, 413, {"error": "request body too large"})
            return
        calls = tool_calls(body) if body else ([], None)
        names, request_id = calls if calls is not None else ([], None)
        token = bearer_token(scope)
        try:
            if token is None:
                raise TokenRejected("bearer token required")
            verified = await self.verifier.verify(token, actions=[self.action(n) for n in names],
                                                  resource=self._resource, peer_cert=peer_certificate(scope))
        except TokenRejected as e:
            error = None if token is None else e
            rpc_error = {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32001, "message": e.reason}}
            await refuse(send, error, resource_metadata=self.metadata_url,
                         body=rpc_error if request_id is not None else None)
            return
        reset = _gated.set((token, verified))
        try:
            await run_as(verified, app, scope, receive, send)
        finally:
            _gated.reset(reset)


async def _buffered(receive: Any) -> tuple[bytes | None, Any]:
    """Read the whole request body (bounded), and a `receive` that replays it first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), _replay([message], receive)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            return None, receive
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(first: list[dict], receive: Any) -> Any:
    pending = list(first)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed
