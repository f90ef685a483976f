"""`AgentClient`: the broker's `CredentialBroker` RPCs for an agent, with typed errors and retries.

One channel per identity version: when the identity rotates (a new SVID from the Workload
API, rewritten files) the next call builds a new channel and the old one is closed after its
calls finish. Only calls that are safe to repeat (`Renew`, `CompleteTask`, `Introspect`,
`GetJWKS`) are retried, with backoff, and only when the broker was unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc import aio

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.client.errors import RETRYABLE, BrokerClientError, from_rpc_error
from broker.client.identity import ChannelIdentity, Identity, Material, bearer_token
from broker.client.task import ApprovalCallback, Credential, Task
from broker.domain.clock import Clock, SystemClock

log = logging.getLogger(__name__)

ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
_OLD_CHANNEL_GRACE = 30.0


class AgentClient:
    """An agent's connection to the broker.

    `target` is `host:port` of the listener that fits `identity` (the mTLS listener for an
    X.509-SVID, the token listener for a bearer identity), or a `grpc.aio` channel built
    elsewhere with its credentials in it (then `identity` may be omitted, and the channel is
    the caller's to close). `server_name` overrides the TLS name
    checked in the broker's certificate. `timeout` bounds each call; `retries` is how many times
    a safe call is repeated when the broker is unreachable.
    """

    def __init__(
        self,
        target: str | aio.Channel,
        identity: Identity | None = None,
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        clock: Clock | None = None,
        renew_margin: float = 0.25,
        renew_jitter: float = 0.1,
    ) -> None:
        self._given = target if isinstance(target, aio.Channel) else None
        self.target = "" if self._given is not None else str(target)
        if identity is None and self._given is None:
            raise ValueError("an identity is needed to connect to a broker address")
        self.identity: Identity = identity or ChannelIdentity()
        self.clock = clock or SystemClock()
        self.renew_margin = renew_margin
        self.renew_jitter = renew_jitter
        self._server_name = server_name
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._channel: aio.Channel | None = None
        self._version = -1
        self._stub: pb_grpc.CredentialBrokerStub | None = None
        self._closing: set[asyncio.Task] = set()

    async def __aenter__(self) -> AgentClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the identity source (e.g. the first SVID from the Workload API).

        Raises:
            IdentityUnavailable: the identity cannot be had.
        """
        await self.identity.start()

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
        for task in list(self._closing):
            task.cancel()
        self.identity.close()

    def task(
        self,
        task_id: str,
        *,
        on_approval: ApprovalCallback | None = None,
        approval_timeout: float = 900.0,
        complete_on_exit: bool | None = None,
    ) -> Task:
        """A task scope: `async with client.task("T-42") as task: cred = await task.credential(...)`.

        `on_approval(approval_id, request)` is called when a credential waits for a human, so the
        agent can tell its user; the wait ends after `approval_timeout` seconds. The task is
        completed on exit when it obtained a credential of its own (not only delegations), or
        as `complete_on_exit` says.
        """
        return Task(self, task_id, on_approval=on_approval, approval_timeout=approval_timeout,
                    complete_on_exit=complete_on_exit)

    # --- the RPCs ------------------------------------------------------------------------------

    async def exchange(
        self,
        *,
        task_id: str,
        audience: str,
        actions: Sequence[str],
        resource: str,
        ttl: float | None = None,
        context: Mapping[str, str] | None = None,
        subject_token: str = "",
        subject_token_type: str = "",
    ) -> pb.ExchangeResponse:
        """One `Exchange` (not retried: it creates a lease). Raises: BrokerClientError subclasses."""
        if subject_token and not subject_token_type:
            subject_token_type = ACCESS_TOKEN
        request = pb.ExchangeRequest(
            task_id=task_id, audience=audience, actions=list(actions), resource=resource,
            ttl_seconds=int(ttl or 0), context=dict(context or {}), subject_token=subject_token,
            subject_token_type=subject_token_type,
        )
        return await self._call("Exchange", request, retry=False)

    async def renew(self, lease_id: str, ttl: float | None = None) -> pb.ExchangeResponse:
        return await self._call("Renew", pb.RenewRequest(lease_id=lease_id, ttl_seconds=int(ttl or 0)), retry=True)

    async def complete_task(self, task_id: str) -> int:
        """Revoke every lease of the task; returns how many changed state."""
        answer = await self._call("CompleteTask", pb.CompleteTaskRequest(task_id=task_id), retry=True)
        return int(answer.revoked_count)

    async def await_approval(self, approval_id: str, *, timeout: float) -> pb.ExchangeResponse:
        request = pb.AwaitApprovalRequest(approval_id=approval_id)
        return await self._call("AwaitApproval", request, retry=False, timeout=timeout)

    async def introspect(self, token: str) -> pb.IntrospectResponse:
        return await self._call("Introspect", pb.IntrospectRequest(token=token), retry=True)

    async def jwks(self) -> str:
        return (await self._call("GetJWKS", pb.GetJWKSRequest(), retry=True)).jwks_json

    async def watch_revocations(self, request: pb.WatchRevocationsRequest) -> aio.UnaryStreamCall:
        """The raw `WatchRevocations` stream (the verifier SDK follows it; its errors are the caller's)."""
        metadata = await self._metadata()
        return self._current_stub().WatchRevocations(request, metadata=metadata)

    # --- plumbing ------------------------------------------------------------------------------

    async def _call(self, rpc: str, request: Any, *, retry: bool, timeout: float | None = None) -> Any:
        attempts = 1 + (self._retries if retry else 0)
        for attempt in range(attempts):
            stub = self._current_stub()
            metadata = await self._metadata()
            try:
                return await getattr(stub, rpc)(request, timeout=timeout or self._timeout, metadata=metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e, rpc=rpc)
                if attempt + 1 >= attempts or e.code() not in RETRYABLE:
                    raise error from None
                delay = self._backoff * (2**attempt) * (0.5 + random.random())
                log.info("broker call retried", extra={"rpc": rpc, "code": error.code, "delay": round(delay, 3)})
                await asyncio.sleep(delay)
        raise BrokerClientError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.identity.bearer is None:
            return None
        return (("authorization", f"Bearer {await bearer_token(self.identity.bearer)}"),)

    def _current_stub(self) -> pb_grpc.CredentialBrokerStub:
        if self._given is not None:
            self._stub = self._stub or pb_grpc.CredentialBrokerStub(self._given)
            return self._stub
        material = self.identity.material()
        if self._stub is None or material.version != self._version:
            old = self._channel
            self._channel = self._new_channel(material)
            self._stub = pb_grpc.CredentialBrokerStub(self._channel)
            self._version = material.version
            if old is not None:
                self._close_later(old)
        return self._stub

    def _new_channel(self, material: Material) -> aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=material.roots_pem, private_key=material.key_pem,
            certificate_chain=material.cert_chain_pem,
        )
        options = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else []
        return aio.secure_channel(self.target, creds, options=options)

    def _close_later(self, channel: aio.Channel) -> None:
        task = asyncio.ensure_future(channel.close(grace=_OLD_CHANNEL_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


__all__ = ["AgentClient", "Credential", "Task"]
