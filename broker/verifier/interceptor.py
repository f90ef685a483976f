"""A gRPC (asyncio) server interceptor that verifies the broker token on every call.

Each method needs the actions `actions` maps it to (full method name, e.g.
"/repo.v1.Repo/Merge"); a method not in the map is refused, so a new RPC is closed until
someone says what it needs. The caller's certificate (mTLS) is checked against a bound
token's `cnf`. The handler reads the verified token with `broker.verifier.current_token()`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

from broker.verifier.errors import InsufficientScope, TokenRejected
from broker.verifier.verifier import TokenVerifier, VerifiedToken, _current


def bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    values = [str(v) for k, v in (metadata or ()) if k == "authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class TokenInterceptor(aio.ServerInterceptor):
    """Refuses calls without a good token: UNAUTHENTICATED, or PERMISSION_DENIED for missing scope."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        actions: Mapping[str, Sequence[str]],
        resource: str | None = None,
        public: Sequence[str] = (),
    ) -> None:
        self._verifier = verifier
        self._actions = dict(actions)
        self._resource = resource
        self._public = frozenset(public)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method in self._public:
            return handler
        return self._wrap(handler, details.method)

    async def _check(self, context: aio.ServicerContext, method: str) -> VerifiedToken:
        if method not in self._actions:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no action is required of this method: refused")
        token = bearer(context.invocation_metadata())
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bearer token required")
        leaves = (context.auth_context() or {}).get("x509_pem_cert") or []
        try:
            return await self._verifier.verify(token, actions=self._actions[method], resource=self._resource,
                                               peer_cert=leaves[0] if leaves else None)
        except InsufficientScope as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, e.reason)
        except TokenRejected as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, e.reason)
        raise AssertionError("unreachable")  # abort raises

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        check = self._check
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                reset = _current.set(await check(context, method))
                try:
                    return await inner(request, context)
                finally:
                    _current.reset(reset)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> Any:
                reset = _current.set(await check(context, method))
                try:
                    async for item in stream(request, context):
                        yield item
                finally:
                    _current.reset(reset)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)
        return self._wrap_client_streams(handler, method, codec)

    def _wrap_client_streams(self, handler: grpc.RpcMethodHandler, method: str, codec: dict) -> grpc.RpcMethodHandler:
        check = self._check
        if handler.stream_unary is not None:
            inner = handler.stream_unary

            async def stream_unary(requests: Any, context: aio.ServicerContext) -> Any:
                reset = _current.set(await check(context, method))
                try:
                    return await inner(requests, context)
                finally:
                    _current.reset(reset)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)
        streams = handler.stream_stream

        async def stream_stream(requests: Any, context: aio.ServicerContext) -> Any:
            reset = _current.set(await check(context, method))
            try:
                async for item in streams(requests, context):
                    yield item
            finally:
                _current.reset(reset)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)
