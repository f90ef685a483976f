"""How a verifier learns that a lease died before its token's `exp`.

`Follower` keeps a set of revoked lease ids fed by `WatchRevocations`, reconnecting with
backoff whenever the stream breaks. Its view is complete only from the moment a subscription
was established (`synced_since`): a token issued before that (or before a gap the broker could
not replay) is introspected once, since its revocation may have been missed. When the broker's
stream can resume after a cursor (`WatchRevocationsRequest.resume_after`), a reconnect resumes
after the last event read and leaves no gap; a cursor the broker no longer holds (it restarted)
is dropped and the view starts over. `staleness` says how long the view has been unfed, for strict mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import grpc

from broker._proto import broker_pb2 as pb
from broker.client.agent import AgentClient
from broker.client.errors import BrokerClientError, Unavailable
from broker.domain.clock import Clock

log = logging.getLogger(__name__)

CAN_RESUME = ("resume_after" in pb.WatchRevocationsRequest.DESCRIPTOR.fields_by_name
              and "cursor" in pb.RevocationEvent.DESCRIPTOR.fields_by_name)
_BACKOFF_START, _BACKOFF_MAX = 0.1, 5.0
# A cursor the broker no longer holds: start over (and treat the gap conservatively).
_CURSOR_REFUSED = {grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT}


class StreamRefused(Exception):
    """The broker ended the stream before any event, with this status."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


class Follower:
    """The revocation set of one audience, kept by following the broker's stream."""

    def __init__(self, broker: AgentClient, audience: str, clock: Clock, *, remember: float = 2 * 3600) -> None:
        self._broker = broker
        self._audience = audience
        self._clock = clock
        self._remember = remember
        self.revoked: dict[str, float] = {}  # lease id -> when we learned it
        self.connected = False
        self.synced_since: float | None = None  # the view is complete for tokens issued after this
        self._disconnected_at: float | None = None
        self._cursor: object | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._checked: dict[str, float] = {}  # lease ids introspected active since the gap -> token exp

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="revocation follower")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.connected:
            self.connected = False
            self._disconnected_at = self._clock.now()

    def staleness(self, now: float) -> float:
        """Seconds the view has gone unfed: 0 while subscribed, infinite before the first subscription."""
        if self.connected:
            return 0.0
        return math.inf if self._disconnected_at is None else now - self._disconnected_at

    def needs_check(self, lease_id: str, issued_at: float) -> bool:
        """Whether a live-looking lease may have died unseen (issued before the view was complete)."""
        synced = self.synced_since
        return (synced is None or issued_at < synced) and lease_id not in self._checked

    def checked(self, lease_id: str, exp: float) -> None:
        self._checked[lease_id] = exp

    async def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until `predicate()` holds (re-checked on every change of the view)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except TimeoutError:
                return False
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        backoff = _BACKOFF_START
        while True:
            try:
                await self._follow()
            except (BrokerClientError, grpc.RpcError, StreamRefused) as e:
                code = e.code() if isinstance(e, grpc.RpcError) else getattr(e, "code", None)
                if code in _CURSOR_REFUSED and self._cursor is not None:
                    self._cursor = None
                log.info("revocation stream broken", extra={"code": getattr(code, "name", str(e))})
            except Exception:  # the follower must outlive any surprise; strict mode sees it as staleness
                log.exception("revocation stream failed")
            if self.connected:
                backoff = _BACKOFF_START
            self.connected = False
            self._disconnected_at = self._clock.now()
            await self._notify()
            await asyncio.sleep(backoff)
            backoff = min(_BACKOFF_MAX, backoff * 2)

    async def _follow(self) -> None:
        request = pb.WatchRevocationsRequest(audience=self._audience)
        resuming = CAN_RESUME and self._cursor is not None
        if resuming:
            request.resume_after = self._cursor  # type: ignore[attr-defined]
        call = await self._broker.watch_revocations(request)
        try:
            await call.initial_metadata()
            if call.done():  # refused at once (a cursor too old, a quota): the status says why
                raise StreamRefused(await call.code())
            self._on_connected(resumed=resuming)
            await self._notify()
            async for event in call:
                self._apply(event)
                await self._notify()
        finally:
            call.cancel()

    def _on_connected(self, *, resumed: bool) -> None:
        now = self._clock.now()
        if not resumed:
            # Whatever happened before this subscription was not seen: start the view here.
            self.synced_since = now
            self._checked.clear()
        self.connected = True
        log.info("revocation stream following", extra={"audience": self._audience, "resumed": resumed})

    def _apply(self, event: pb.RevocationEvent) -> None:
        now = self._clock.now()
        self.revoked[event.lease_id] = now
        self._checked.pop(event.lease_id, None)
        if CAN_RESUME:
            self._cursor = event.cursor  # type: ignore[attr-defined]
        if len(self.revoked) % 1024 == 0:
            self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self._remember
        self.revoked = {k: v for k, v in self.revoked.items() if v >= horizon}
        self._checked = {k: v for k, v in self._checked.items() if v > now}


async def introspect_active(broker: AgentClient, token: str) -> bool | None:
    """The broker's word on `token`: active or not; None when the broker cannot be asked."""
    try:
        return bool((await broker.introspect(token)).active)
    except Unavailable:
        return None
