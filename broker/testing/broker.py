"""A real broker in your test process: loopback port 0, the mock issuer, the policy you give.

    with InProcessBroker(policy=POLICY, entities=ENTITIES) as broker:
        async with broker.agent("spiffe://example.org/agent/planner") as agent:
            async with agent.task("T-1") as task:
                cred = await task.credential(audience=..., actions=["repo:read"], resource="repo:org/app")

It serves on its own event loop thread, over real TLS and mTLS, with the mock issuer's CA as
the trust domain and an audit log in its folder. `stop()` and `start()` take it away and bring
it back on the same ports (with a new signing key, as a real restart would).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from broker.app.server import BrokerApp, build_app
from broker.client.agent import AgentClient
from broker.client.identity import PemIdentity
from broker.config.settings import load_config
from broker.domain.clock import Clock
from broker.pki.x509_ca import X509Svid
from broker.testing.mock_issuer import MockIssuer
from broker.testing.workload_api import MockWorkloadApi

T = TypeVar("T")
TRUST_DOMAIN = "example.org"
BROKER_ID = f"spiffe://{TRUST_DOMAIN}/broker"
OPERATOR_ID = f"spiffe://{TRUST_DOMAIN}/operator/test"

_CONFIG = """\
[server]
listen = "127.0.0.1:{mtls}"
token_listen = "127.0.0.1:{token}"
http_listen = "127.0.0.1:{http}"
cert = "broker.pem"
key = "broker-key.pem"
spiffe_id = "{broker_id}"

[[trust_domains]]
name = "{td}"
bundle = "bundle.pem"
jwt_bundle = "jwks.json"

[tokens]
default_ttl = "{default_ttl}"
max_ttl = "1h"
max_task_lifetime = "8h"

[policy]
file = "policy.cedar"
entities = "entities.json"

[admin]
spiffe_ids = ["spiffe://{td}/operator/*"]
introspectors = {introspectors}

[audit]
path = "audit.jsonl"
{extra}
"""


async def _cancel_remaining(timeout: float) -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


def shutdown_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread | None, timeout: float = 10.0) -> None:
    """Stop a loop served by `thread` as `asyncio.run` would: cancel and await what is still running
    (a store's tailer, a stream), then stop and close it, so no task is left to be garbage-collected
    half-way through its cleanup."""
    asyncio.run_coroutine_threadsafe(_cancel_remaining(timeout), loop).result(timeout + 5)
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(5)
    loop.close()


class InProcessBroker:
    """A broker for integration tests. `issuer` defaults to a new `MockIssuer`; `clock` to the wall clock."""

    def __init__(
        self,
        *,
        policy: str,
        entities: Sequence[dict] = (),
        issuer: MockIssuer | None = None,
        clock: Clock | None = None,
        default_ttl: str = "5m",
        introspectors: Sequence[str] = (),
        extra_config: str = "",
        folder: str | Path | None = None,
    ) -> None:
        self.issuer = issuer or MockIssuer()
        self._owns_issuer = issuer is None
        self.clock = clock
        self._owned = folder is None
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="broker-"))
        self._settings = {"default_ttl": default_ttl, "introspectors": json.dumps(list(introspectors)),
                          "extra": extra_config}
        self._svids: dict[str, X509Svid] = {}
        self.ports: dict[str, int] = {"mtls": 0, "token": 0, "http": 0}
        self._write_material(policy, list(entities))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.app: BrokerApp | None = None

    def _write_material(self, policy: str, entities: list[dict]) -> None:
        ca = self.issuer.ca(TRUST_DOMAIN)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "bundle.pem").write_bytes(ca.bundle_pem())
        (self.folder / "jwks.json").write_text(self.issuer.jwt(TRUST_DOMAIN).jwks_json())
        ca.server_svid(BROKER_ID).write(self.folder, "broker")
        (self.folder / "policy.cedar").write_text(policy)
        (self.folder / "entities.json").write_text(json.dumps(entities))

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> InProcessBroker:
        """Serve (again, on the ports of the first start). Raises: ConfigError, PolicyError."""
        config = self.folder / "broker.toml"
        config.write_text(_CONFIG.format(broker_id=BROKER_ID, td=TRUST_DOMAIN, **self.ports, **self._settings))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="in-process-broker", daemon=True)
        self._thread.start()
        self.app = self.call(self._build(config))
        self.call(self.app.start())
        self.ports = dict(self.app.ports)
        return self

    async def _build(self, config: Path) -> BrokerApp:
        return build_app(load_config(config), clock=self.clock)

    def stop(self) -> None:
        """Stop serving (calls in flight are cut off); `start()` brings it back."""
        if self.app is None or self._loop is None:
            return
        self.call(self.app.stop(grace=0.2))
        shutdown_loop(self._loop, self._thread)
        self.app = self._loop = self._thread = None

    def close(self) -> None:
        self.stop()
        if self._owns_issuer:
            self.issuer.close()
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> InProcessBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the broker's loop (where its state lives) and return its result."""
        if self._loop is None:
            raise RuntimeError("the broker is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- what tests talk to -------------------------------------------------------------------

    @property
    def mtls_address(self) -> str:
        return f"127.0.0.1:{self.ports['mtls']}"

    @property
    def token_address(self) -> str:
        return f"127.0.0.1:{self.ports['token']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def jwks_url(self) -> str:
        return self.http_url + "/.well-known/jwks.json"

    @property
    def spiffe_id(self) -> str:
        """The broker's SPIFFE ID: the `iss` of its tokens."""
        return BROKER_ID

    @property
    def roots_pem(self) -> bytes:
        return self.issuer.ca(TRUST_DOMAIN).bundle_pem()

    def svid(self, spiffe_id: str) -> X509Svid:
        """An X.509-SVID for `spiffe_id` from the trust domain's CA (one per id, made once)."""
        if spiffe_id not in self._svids:
            self._svids[spiffe_id] = self.issuer.x509_svid(spiffe_id, ttl=86400)
        return self._svids[spiffe_id]

    def identity(self, spiffe_id: str) -> PemIdentity:
        svid = self.svid(spiffe_id)
        return PemIdentity(svid.chain_pem(), svid.key_pem(), self.roots_pem)

    def agent(self, spiffe_id: str, **kw: Any) -> AgentClient:
        """An `AgentClient` holding an SVID for `spiffe_id`, on the mTLS listener."""
        kw.setdefault("clock", self.clock)
        return AgentClient(self.mtls_address, self.identity(spiffe_id), **kw)

    def workload_api(self, spiffe_id: str, **kw: Any) -> MockWorkloadApi:
        """A (not yet started) mock Workload API serving SVIDs for `spiffe_id` from this trust domain."""
        return MockWorkloadApi.for_issuer(self.issuer, spiffe_id, **kw)

    def audit(self) -> list[dict]:
        """The audit records written so far."""
        path = self.folder / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
