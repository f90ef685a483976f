"""An ASGI middleware that verifies the broker token of every HTTP request (RFC 6750 challenges).

No or a bad token: 401 with `WWW-Authenticate: Bearer error="invalid_token"` (and
`resource_metadata` when given, as RFC 9728 says). A good token without the action the request
needs: 403 with `error="insufficient_scope", scope="..."`. The app reads the verified token
with `broker.verifier.current_token()` or `scope["state"]["broker_token"]`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from broker.verifier.errors import InsufficientScope, TokenRejected
from broker.verifier.verifier import TokenVerifier, VerifiedToken, _current

Scope = Mapping[str, Any]
# Where a server that terminates TLS itself puts the client's certificate (DER) for this request.
PEER_CERT_STATE = "broker.peer_cert"
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def _quoted(text: str) -> str:
    return text.replace("\\", "/").replace('"', "'")


def challenge(error: str | None, description: str | None = None, *, scope: Sequence[str] = (),
              resource_metadata: str | None = None) -> str:
    """A `WWW-Authenticate: Bearer ...` value (RFC 6750 section 3, RFC 9728 section 5.1)."""
    parts = []
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{_quoted(description)}"')
    if scope:
        parts.append(f'scope="{_quoted(" ".join(scope))}"')
    if resource_metadata:
        parts.append(f'resource_metadata="{resource_metadata}"')
    return "Bearer " + ", ".join(parts) if parts else "Bearer"


async def send_json(send: Callable[[dict], Awaitable[None]], status: int, body: Any,
                    headers: Sequence[tuple[str, str]] = ()) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
           (b"cache-control", b"no-store"), *((k.encode(), v.encode()) for k, v in headers)]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def header(scope: Scope, name: bytes) -> str | None:
    values = [v for k, v in scope.get("headers", ()) if k.lower() == name]
    return values[0].decode("latin-1") if len(values) == 1 else None


def bearer_token(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def peer_certificate(scope: Scope) -> bytes | None:
    """The client's leaf certificate: from the ASGI TLS extension, or the request state (PEM or DER)."""
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain") or []
    if chain:
        return chain[0].encode()
    der = (scope.get("state") or {}).get(PEER_CERT_STATE)
    return der if isinstance(der, bytes) else None


async def refuse(send: Callable[[dict], Awaitable[None]], error: TokenRejected | None, *,
                 resource_metadata: str | None, body: Any = None) -> None:
    """Answer 401 (no or bad token) or 403 (insufficient scope) with the matching challenge."""
    if isinstance(error, InsufficientScope):
        value = challenge("insufficient_scope", error.reason, scope=error.required, resource_metadata=resource_metadata)
        status = 403
    else:
        reason = error.reason if error else "bearer token required"
        value = challenge("invalid_token" if error else None, reason, resource_metadata=resource_metadata)
        status = 401
    default = {"error": getattr(error, "error", "invalid_token"), "error_description": error.reason if error else
               "bearer token required"}
    await send_json(send, status, body if body is not None else default, [("www-authenticate", value)])


class TokenMiddleware:
    """Guards an ASGI app: `actions(scope)` names what a request needs (default: nothing extra)."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        *,
        actions: Callable[[Scope], Sequence[str]] | Sequence[str] = (),
        resource: str | None = None,
        resource_metadata: str | None = None,
    ) -> None:
        self.app = app
        self._verifier = verifier
        self._actions = actions
        self._resource = resource
        self._metadata = resource_metadata

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None:
            await refuse(send, None, resource_metadata=self._metadata)
            return
        needed = self._actions(scope) if callable(self._actions) else self._actions
        try:
            verified = await self._verifier.verify(token, actions=needed, resource=self._resource,
                                                   peer_cert=peer_certificate(scope))
        except TokenRejected as e:
            await refuse(send, e, resource_metadata=self._metadata)
            return
        await run_as(verified, self.app, scope, receive, send)


async def run_as(verified: VerifiedToken, app: ASGIApp, scope: Any, receive: Any, send: Any) -> None:
    scope.setdefault("state", {})["broker_token"] = verified
    reset = _current.set(verified)
    try:
        await app(scope, receive, send)
    finally:
        _current.reset(reset)
