"""The one map from domain errors to gRPC status codes, and the decorator every RPC wears.

Domain errors map through `STATUS` (the most specific class wins); cancellations pass
through; anything else is a bug: the caller gets `INTERNAL` with a request id, and the
traceback goes to the log only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from broker.domain import errors
from broker.ops.metrics import RPC_LATENCY, RPCS

log = logging.getLogger(__name__)

STATUS: dict[type[errors.BrokerError], grpc.StatusCode] = {
    errors.BrokerError: grpc.StatusCode.INTERNAL,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidSpiffeId: grpc.StatusCode.INVALID_ARGUMENT,
    errors.CredentialRejected: grpc.StatusCode.UNAUTHENTICATED,
    errors.IssuerUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.AuditUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.PolicyDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.TaskConflict: grpc.StatusCode.PERMISSION_DENIED,
    errors.LeaseNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LeaseInactive: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TaskNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LifetimeExhausted: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidTransition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ApprovalNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ApprovalDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ApprovalExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ApprovalNotPending: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.WatcherTooSlow: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.CursorTooOld: grpc.StatusCode.OUT_OF_RANGE,
    errors.PolicyError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}

MAX_REASON = 300


def status_for(error: errors.BrokerError) -> grpc.StatusCode:
    """The status of the most specific mapped class in `error`'s MRO."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _reason(error: errors.BrokerError) -> str:
    text = " ".join(str(error.reason).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


async def _abort_for(exc: BaseException, context: aio.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.BrokerError):
        code = status_for(exc)
        log.info("rpc refused", extra={"method": method, "code": code.name, "reason": _reason(exc)})
        await context.abort(code, _reason(exc))
    request_id = secrets.token_hex(8)
    log.error("rpc failed", extra={"method": method, "request_id": request_id}, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


T = TypeVar("T")
Handler = Callable[[Any, Any, aio.ServicerContext], Awaitable[T]]


def rpc(fn: Handler[T]) -> Handler[T]:
    """Wrap a unary servicer method: map domain errors once, hide tracebacks."""

    method = fn.__name__
    latency = RPC_LATENCY.labels(method)
    counted: dict[str, Any] = {}  # code -> its counter child: `labels()` takes a lock and builds a key

    def count(code: str) -> None:
        child = counted.get(code)
        if child is None:
            child = counted[code] = RPCS.labels(method, code)
        child.inc()

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext) -> T:
        code = "OK"
        started = time.perf_counter()
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except aio.AbortError:
            code = "ABORTED"
            raise
        except Exception as exc:  # the one place a broad catch is right: nothing escapes unmapped
            code = status_for(exc).name if isinstance(exc, errors.BrokerError) else "INTERNAL"
            await _abort_for(exc, context, method)
            raise AssertionError("unreachable") from exc  # abort always raises
        finally:
            latency.observe(time.perf_counter() - started)
            count(code)

    return wrapper


StreamHandler = Callable[[Any, Any, aio.ServicerContext], AsyncIterator[T]]


def rpc_stream(fn: StreamHandler[T]) -> StreamHandler[T]:
    """Wrap a server-streaming servicer method the same way as `rpc`."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for item in fn(self, request, context):
                yield item
        except (asyncio.CancelledError, aio.AbortError, GeneratorExit):
            raise
        except Exception as exc:
            await _abort_for(exc, context, fn.__name__)

    return wrapper
