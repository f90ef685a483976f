"""`SyncAgentClient`: the agent SDK for code without an event loop, same shape as `AgentClient`.

It runs an `AgentClient` on a private event loop in a daemon thread; every method submits a
coroutine there and waits for its answer, so renewals keep running between calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from broker._proto import broker_pb2 as pb
from broker.client.agent import AgentClient
from broker.client.identity import Identity
from broker.client.task import ApprovalCallback, Credential, Task

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="broker-agent-sdk", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class SyncAgentClient:
    """Blocking twin of `AgentClient`; takes the same arguments."""

    def __init__(self, target: str, identity: Identity, **kw: Any) -> None:
        self._loop = _Loop()
        self._client: AgentClient = self._loop.run(self._build(target, identity, kw))

    @staticmethod
    async def _build(target: str, identity: Identity, kw: dict[str, Any]) -> AgentClient:
        return AgentClient(target, identity, **kw)

    def __enter__(self) -> SyncAgentClient:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def client(self) -> AgentClient:
        return self._client

    def start(self) -> None:
        self._loop.run(self._client.start())

    def close(self) -> None:
        try:
            self._loop.run(self._client.close(), timeout=10)
        finally:
            self._loop.stop()

    def task(
        self,
        task_id: str,
        *,
        on_approval: ApprovalCallback | None = None,
        approval_timeout: float = 900.0,
        complete_on_exit: bool | None = None,
    ) -> SyncTask:
        task = self._client.task(task_id, on_approval=on_approval, approval_timeout=approval_timeout,
                                 complete_on_exit=complete_on_exit)
        return SyncTask(self._loop, task)

    def complete_task(self, task_id: str) -> int:
        return self._loop.run(self._client.complete_task(task_id))

    def introspect(self, token: str) -> pb.IntrospectResponse:
        return self._loop.run(self._client.introspect(token))

    def jwks(self) -> str:
        return self._loop.run(self._client.jwks())


class SyncTask:
    """Blocking twin of `Task`: `with client.task("T-42") as task: task.credential(...)`."""

    def __init__(self, loop: _Loop, task: Task) -> None:
        self._loop = loop
        self.task = task
        self.task_id = task.task_id

    def __enter__(self) -> SyncTask:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._loop.run(self.task.__aexit__(exc_type, exc, tb))

    def credential(
        self,
        *,
        actions: Sequence[str],
        audience: str = "",
        resource: str = "",
        ttl: float | None = None,
        context: Mapping[str, str] | None = None,
        subject_token: str = "",
    ) -> Credential:
        """As `Task.credential`, blocking."""
        return self._loop.run(self.task.credential(
            actions=actions, audience=audience, resource=resource, ttl=ttl, context=context,
            subject_token=subject_token,
        ))

    @property
    def completed(self) -> int | None:
        return self.task.completed
