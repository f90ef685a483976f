"""`CredentialBroker`: thin handlers that authenticate, convert, call one use case, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.api import convert
from broker.api.auth import Authenticator
from broker.api.status import rpc, rpc_stream
from broker.domain.clock import Clock
from broker.domain.errors import InvalidRequest, PermissionDenied
from broker.domain.intent import Limits
from broker.leases.feed import RevocationFeed
from broker.leases.table import Lease
from broker.tokens.minter import TokenMinter
from broker.usecases.exchange import Exchange
from broker.usecases.lifecycle import Leasing

MAX_ID = 256
_EVENTS_KEPT = 1024


def _id(value: str, name: str) -> str:
    if not value:
        raise InvalidRequest(f"{name} is required")
    if len(value) > MAX_ID:
        raise InvalidRequest(f"{name} is longer than {MAX_ID} characters")
    return value


class CredentialBrokerServicer(pb_grpc.CredentialBrokerServicer):
    """The workload- and resource-server-facing service."""

    def __init__(
        self,
        *,
        auth: Authenticator,
        exchange: Exchange,
        leasing: Leasing,
        minter: TokenMinter,
        feed: RevocationFeed,
        clock: Clock,
        limits: Limits,
    ) -> None:
        self._auth = auth
        self._exchange = exchange
        self._leasing = leasing
        self._minter = minter
        self._feed = feed
        self._clock = clock
        self._limits = limits
        # One message per end event, shared by every stream that sends it (they only read it).
        self._events: dict[int, pb.RevocationEvent] = {}

    def _event(self, seq: int, lease: Lease) -> pb.RevocationEvent:
        event = self._events.get(seq)
        if event is None:
            if len(self._events) >= _EVENTS_KEPT:
                self._events.clear()
            event = self._events[seq] = convert.revocation_event(lease, self._feed.cursor(seq))
        return event

    @rpc
    async def Exchange(self, request: pb.ExchangeRequest, context: aio.ServicerContext) -> pb.ExchangeResponse:
        caller = await self._auth.issuing_caller(context)
        issued = await self._exchange.exchange(caller, convert.intent(request, self._limits))
        return convert.exchange_response(issued, now=self._clock.now())

    @rpc
    async def Renew(self, request: pb.RenewRequest, context: aio.ServicerContext) -> pb.ExchangeResponse:
        caller = await self._auth.issuing_caller(context)
        if request.ttl_seconds < 0:
            raise InvalidRequest("ttl_seconds must not be negative")
        issued = await self._leasing.renew(caller, _id(request.lease_id, "lease_id"), request.ttl_seconds)
        return convert.exchange_response(issued, now=self._clock.now())

    @rpc
    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: aio.ServicerContext
    ) -> pb.CompleteTaskResponse:
        caller = await self._auth.caller(context)
        return pb.CompleteTaskResponse(revoked_count=await self._leasing.complete_task(caller, request.task_id))

    @rpc
    async def Introspect(self, request: pb.IntrospectRequest, context: aio.ServicerContext) -> pb.IntrospectResponse:
        caller = await self._auth.caller(context)
        if not request.token:
            raise InvalidRequest("token is required")
        return convert.introspect_response(await self._leasing.introspect(caller, request.token))

    @rpc
    async def AwaitApproval(
        self, request: pb.AwaitApprovalRequest, context: aio.ServicerContext
    ) -> pb.ExchangeResponse:
        caller = await self._auth.caller(context)
        issued = await self._exchange.await_approval(caller, _id(request.approval_id, "approval_id"))
        return convert.exchange_response(issued, now=self._clock.now())

    @rpc
    async def GetJWKS(self, request: pb.GetJWKSRequest, context: aio.ServicerContext) -> pb.GetJWKSResponse:
        await self._auth.optional_caller(context)
        return pb.GetJWKSResponse(jwks_json=self._minter.jwks_json())

    @rpc_stream
    async def WatchRevocations(
        self, request: pb.WatchRevocationsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.RevocationEvent]:
        caller = await self._auth.caller(context)
        audience: str | None = request.audience or None
        if not self._auth.is_admin(caller):
            if audience not in (None, caller.principal):
                raise PermissionDenied("a watcher may only watch its own audience")
            audience = caller.principal
        if len(request.resume_after) > MAX_ID:
            raise InvalidRequest(f"resume_after is longer than {MAX_ID} characters")
        resume_after = None
        if request.resume_after:
            await self._leasing.barrier()  # a cursor handed out by another replica may be ahead of this one
            resume_after = self._feed.parse_cursor(request.resume_after)
        sub = self._feed.subscribe(audience, watcher=caller.principal, resume_after=resume_after)
        try:
            await context.send_initial_metadata(())
            while True:
                seq, lease = await self._feed.next(sub)
                yield self._event(seq, lease)
        finally:
            self._feed.unsubscribe(sub)
