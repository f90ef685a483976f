"""A task scope and its credentials: cached per intent, renewed before expiry, completed on exit.

A `Credential` is a live handle: renewal swaps in a fresh token for the same lease, so code
holding it always reads the current `token`. When renewal is refused (the lease was revoked, or
policy now says no) the handle is dropped from the cache and the next `credential(...)` call
asks the broker again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from broker._proto import broker_pb2 as pb
from broker.client.errors import (
    BrokerClientError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)

if TYPE_CHECKING:
    from broker.client.agent import AgentClient

log = logging.getLogger(__name__)

PENDING_APPROVAL = "PENDING_APPROVAL"
# Renew no sooner than this before expiry, whatever the margin says.
_MIN_LEAD = 1.0
_RETRY_DELAY = 1.0
_HAS_SECRET = "secret" in pb.ExchangeResponse.DESCRIPTOR.fields_by_name

ApprovalCallback = Callable[[str, Mapping[str, Any]], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Secret:
    """A dynamic secret a backend issued with the lease (e.g. database login); dies with it."""

    backend: str
    fields: Mapping[str, str] = field(repr=False)
    expires_at: float


@dataclass(frozen=True, slots=True)
class Grant:
    """One token of a lease, as the broker answered."""

    token: str = field(repr=False)
    lease_id: str
    expires_at: float
    scope: tuple[str, ...]
    ttl_capped_by: str
    received_at: float
    secret: Secret | None = None

    @classmethod
    def of(cls, answer: pb.ExchangeResponse, *, now: float) -> Grant:
        return cls(
            token=answer.access_token, lease_id=answer.lease_id,
            expires_at=answer.expires_at.seconds + answer.expires_at.nanos / 1e9, scope=tuple(answer.scope),
            ttl_capped_by=answer.ttl_capped_by, received_at=now, secret=_secret(answer),
        )


def _secret(answer: pb.ExchangeResponse) -> Secret | None:
    # `ExchangeResponse.secret` arrives with the dynamic-secret backends; older brokers lack it.
    if not _HAS_SECRET or not answer.HasField("secret"):
        return None
    s = answer.secret
    exp = s.expires_at  # a Timestamp, or seconds
    expires = exp.seconds + exp.nanos / 1e9 if hasattr(exp, "seconds") else float(exp)
    return Secret(backend=s.backend, fields=MappingProxyType(dict(s.fields)), expires_at=expires)


class Credential:
    """A task-scoped credential; `token` and `expires_at` follow renewals."""

    def __init__(self, grant: Grant, *, audience: str, resource: str, delegated: bool) -> None:
        self._grant = grant
        self.audience = audience
        self.resource = resource
        self.delegated = delegated
        self.error: BrokerClientError | None = None  # why renewal stopped, once it has
        self.renewals = 0
        self._changed: asyncio.Condition | None = None

    async def wait_renewed(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until the credential has been renewed `count` times (or renewal stopped)."""
        self._changed = self._changed or asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.renewals >= count or self.error is not None), timeout)
            except TimeoutError:
                return False
        return self.renewals >= count

    async def _renewed(self, grant: Grant) -> None:
        self._grant = grant
        self.renewals += 1
        await self._notify()

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    token = property(lambda self: self._grant.token, doc="the current access token; never log it")
    lease_id = property(lambda self: self._grant.lease_id)
    expires_at = property(lambda self: self._grant.expires_at, doc="POSIX seconds")
    scope = property(lambda self: self._grant.scope)
    ttl_capped_by = property(lambda self: self._grant.ttl_capped_by)
    secret = property(lambda self: self._grant.secret, doc="the backend's secret, when one was issued")

    def __repr__(self) -> str:
        return f"Credential(lease_id={self.lease_id!r}, scope={self.scope!r}, expires_at={self.expires_at})"


def _key(audience: str, actions: Sequence[str], resource: str, subject_token: str) -> tuple:
    parent = hashlib.sha256(subject_token.encode()).hexdigest() if subject_token else ""
    return (audience, tuple(sorted(set(actions))), resource, parent)


class Task:
    """Credentials for one task of one agent (see `AgentClient.task`)."""

    def __init__(
        self,
        client: AgentClient,
        task_id: str,
        *,
        on_approval: ApprovalCallback | None,
        approval_timeout: float,
        complete_on_exit: bool | None,
    ) -> None:
        self.client = client
        self.task_id = task_id
        self._on_approval = on_approval
        self._approval_timeout = approval_timeout
        self._complete = complete_on_exit
        self._owns = False
        self._cache: dict[tuple, Credential] = {}
        self._locks: dict[tuple, asyncio.Lock] = {}
        self._renewers: dict[str, asyncio.Task] = {}
        self.completed: int | None = None  # leases revoked by completion, once completed

    async def __aenter__(self) -> Task:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Shielded: a cancelled agent still completes its task, so nothing it held outlives it.
        try:
            await asyncio.shield(self.close())
        except BrokerClientError:
            if exc is None:
                raise
            log.warning("task completion failed", extra={"task_id": self.task_id}, exc_info=True)

    async def close(self) -> None:
        """Stop renewing, then complete the task (when this agent opened a credential of its own)."""
        for renewer in self._renewers.values():
            renewer.cancel()
        for renewer in self._renewers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        self._renewers.clear()
        self._cache.clear()
        if self._complete or (self._complete is None and self._owns):
            self.completed = await self.client.complete_task(self.task_id)

    async def credential(
        self,
        *,
        actions: Sequence[str],
        audience: str = "",
        resource: str = "",
        ttl: float | None = None,
        context: Mapping[str, str] | None = None,
        subject_token: str = "",
    ) -> Credential:
        """A credential for `actions` on `resource` at `audience`, reused while it lives.

        With `subject_token` (a parent's token) the credential is a delegation: it inherits the
        parent's audience and resource. A credential that needs approval waits for it.

        Raises:
            PolicyDenied: policy refused it. ApprovalDenied / ApprovalTimeout: the human said no,
            or did not answer in time. Unauthenticated, InvalidRequest, Unavailable, ...
        """
        key = _key(audience, actions, resource, subject_token)
        async with self._locks.setdefault(key, asyncio.Lock()):
            cached = self._cache.get(key)
            if cached is not None and cached.error is None and cached.expires_at > self.client.clock.now():
                return cached
            answer = await self.client.exchange(
                task_id=self.task_id, audience=audience, actions=actions, resource=resource, ttl=ttl,
                context=context, subject_token=subject_token,
            )
            if answer.state == PENDING_APPROVAL:
                answer = await self._wait_for_approval(answer.approval_id, audience, actions, resource)
            credential = Credential(Grant.of(answer, now=self.client.clock.now()), audience=audience, resource=resource,
                                    delegated=bool(subject_token))
            self._owns = self._owns or not subject_token
            self._cache[key] = credential
            self._renewers[credential.lease_id] = asyncio.create_task(
                self._renew_loop(key, credential, ttl), name=f"renew {credential.lease_id}"
            )
            return credential

    async def _wait_for_approval(
        self, approval_id: str, audience: str, actions: Sequence[str], resource: str
    ) -> pb.ExchangeResponse:
        if self._on_approval is not None:
            request = {"task_id": self.task_id, "audience": audience, "actions": list(actions), "resource": resource}
            waiting = self._on_approval(approval_id, request)
            if asyncio.iscoroutine(waiting):
                await waiting
        return await self.client.await_approval(approval_id, timeout=self._approval_timeout)

    def _renew_at(self, grant: Grant) -> float:
        # From the lifetime the broker granted, not what is left now: the loop may start late.
        lifetime = max(0.0, grant.expires_at - grant.received_at)
        lead = max(_MIN_LEAD, lifetime * self.client.renew_margin)
        jitter = random.uniform(0, lifetime * self.client.renew_jitter)
        return max(grant.received_at, grant.expires_at - lead - jitter)

    async def _renew_loop(self, key: tuple, credential: Credential, ttl: float | None) -> None:
        clock = self.client.clock
        while True:
            await clock.sleep_until(self._renew_at(credential._grant))
            try:
                answer = await self.client.renew(credential.lease_id, ttl)
            except Unavailable:
                if clock.now() + _RETRY_DELAY >= credential.expires_at:
                    self._drop(key, credential, Unavailable("broker unreachable until the credential expired"))
                    return
                await clock.sleep_until(clock.now() + _RETRY_DELAY)
                continue
            except (FailedPrecondition, PermissionDenied, NotFound) as e:
                self._drop(key, credential, e)
                await credential._notify()
                return
            grant = Grant.of(answer, now=clock.now())
            extended = grant.expires_at > credential.expires_at + _MIN_LEAD
            await credential._renewed(grant)
            log.debug("credential renewed", extra={"lease_id": credential.lease_id})
            if not extended:  # a cap (task deadline, parent lease) holds: renewing again gains nothing
                return

    def _drop(self, key: tuple, credential: Credential, error: BrokerClientError) -> None:
        credential.error = error
        if self._cache.get(key) is credential:
            del self._cache[key]
        self._renewers.pop(credential.lease_id, None)
        log.info("credential not renewed", extra={"lease_id": credential.lease_id, "reason": error.reason})
