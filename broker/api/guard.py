"""What every call passes before any servicer runs: a request that parses, and a free slot.

`CallGuard` is a server interceptor that wraps each registered method handler once (the
wrapped handler is cached per method, so the cost per call is two checks):

- **Malformed requests.** gRPC's own deserialization failure answers `UNKNOWN` with the
  parser's internals in the details and logs a traceback per call, before any authentication.
  Here the deserializer turns a `DecodeError` into a marker, and the call is answered
  `INVALID_ARGUMENT` "malformed request": counted per method, logged at most once a window.
- **Overload.** At most `max_concurrent` unary-response calls run at once, across the listeners
  sharing the guard; one more is answered `RESOURCE_EXHAUSTED` at once with the reason, and
  counted, instead of waiting in the transport until it is dropped as `CANCELLED`. Calls that
  wait by design (server streams, `AwaitApproval`) are not counted: each has its own quota.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
from grpc import aio

from broker.ops.metrics import RPC_MALFORMED, RPC_OVERLOADED

log = logging.getLogger(__name__)

MALFORMED_DETAILS = "malformed request"
# Methods that wait for something by design (a human's decision) rather than for the broker.
WAITING_METHODS = frozenset({"/broker.v1.CredentialBroker/AwaitApproval"})


class _Malformed:
    """Stands in for a request that did not parse; the wrapped behaviour refuses it."""

    __slots__ = ()


MALFORMED = _Malformed()


class WindowedLog:
    """Logs an event at most once per `window` seconds, with how many happened since the last line."""

    def __init__(self, message: str, *, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._message = message
        self._window = window
        self._clock = clock
        self._next = float("-inf")
        self._unlogged = 0

    def event(self, **fields: Any) -> None:
        self._unlogged += 1
        now = self._clock()
        if now < self._next:
            return
        log.warning(self._message, extra={**fields, "count": self._unlogged, "window_seconds": self._window})
        self._unlogged = 0
        self._next = now + self._window


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, and whatever else a parser raises on hostile bytes
            return MALFORMED

    return deserialize


class Slots:
    """The concurrency limit the listeners share: calls running now, and how many may."""

    def __init__(self, limit: int, *, window: float = 60.0) -> None:
        if limit < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self.malformed_log = WindowedLog("malformed requests refused", window=window)
        self.overload_log = WindowedLog("calls refused: too many in flight", window=window)


class CallGuard(aio.ServerInterceptor):
    """Refuses malformed requests and calls beyond the concurrency limit, before any servicer runs.

    One guard per server (its cache holds that server's handlers); the `Slots` are shared.
    """

    def __init__(self, slots: Slots, *, waiting: Collection[str] = WAITING_METHODS) -> None:
        self._slots = slots
        self._waiting = frozenset(waiting)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED, and nothing is cached for it
        wrapped = self._wrap(handler, method)
        self._handlers[method] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        limited = not handler.response_streaming and method not in self._waiting
        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        inner = getattr(handler, kind)
        behaviour = self._streamed_requests(inner, method) if handler.request_streaming else inner
        behaviour = self._guarded(behaviour, method, limited=limited, unary_request=not handler.request_streaming)
        return handler._replace(
            request_deserializer=_safe(handler.request_deserializer), **{kind: behaviour}
        )

    def _guarded(self, inner: Callable, method: str, *, limited: bool, unary_request: bool) -> Callable:
        guard, slots = self, self._slots

        async def check(request: Any, context: aio.ServicerContext) -> None:
            if unary_request and request is MALFORMED:
                await guard._refuse_malformed(context, method)
            if limited and slots.in_flight >= slots.limit:
                await guard._refuse_overload(context, method)

        if inspect.isasyncgenfunction(inner):

            @functools.wraps(inner)
            async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                await check(request, context)
                async for item in inner(request, context):
                    yield item

            return stream

        @functools.wraps(inner)
        async def call(request: Any, context: aio.ServicerContext) -> Any:
            await check(request, context)
            if not limited:
                return await _result(inner(request, context))
            slots.in_flight += 1
            try:
                return await _result(inner(request, context))
            finally:
                slots.in_flight -= 1

        return call

    def _streamed_requests(self, inner: Callable, method: str) -> Callable:
        guard = self

        async def checked(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                if request is MALFORMED:
                    await guard._refuse_malformed(context, method)
                yield request

        def with_checked_requests(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            return inner(checked(requests, context), context)

        if inspect.isasyncgenfunction(inner):

            async def stream(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in with_checked_requests(requests, context):
                    yield item

            return stream

        async def call(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            return await _result(with_checked_requests(requests, context))

        return call

    async def _refuse_malformed(self, context: aio.ServicerContext, method: str) -> None:
        RPC_MALFORMED.labels(method).inc()
        self._slots.malformed_log.event(method=method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)

    async def _refuse_overload(self, context: aio.ServicerContext, method: str) -> None:
        RPC_OVERLOADED.labels(method.rsplit("/", 1)[-1]).inc()
        self._slots.overload_log.event(method=method, limit=self._slots.limit)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"broker overloaded: {self._slots.limit} calls in flight (limits.max_concurrent_rpcs), retry with backoff",
        )


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
