"""A real broker on loopback ports, its mock issuer and fake clock, and clients for tests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from broker._proto import broker_pb2_grpc as pb_grpc
from broker.app.server import BrokerApp, build_app
from broker.config.settings import load_config
from broker.testing.broker import shutdown_loop
from broker.testing.clock import FakeClock
from broker.testing.mock_issuer import MockIssuer
from broker.testing.x509_ca import X509Svid

TD = "example.org"
OTHER_TD = "other.org"
BROKER_ID = f"spiffe://{TD}/broker"
OPERATOR_ID = f"spiffe://{TD}/operator/alice"
RESOURCE_SERVER_ID = f"spiffe://{TD}/service/repo"
INTROSPECTOR_ID = f"spiffe://{TD}/service/gateway"
PLANNER = f"spiffe://{TD}/agent/planner"
WORKER = f"spiffe://{TD}/agent/worker"
HELPER = f"spiffe://{TD}/agent/helper"
OUTSIDER = f"spiffe://{TD}/agent/outsider"

POLICY = """\
@id("agents-use-repo")
@max_ttl("1800")
permit (principal in Team::"agents", action in [Action::"repo:read", Action::"repo:write"],
        resource == Resource::"repo:org/app");

@id("oidc-users-read")
permit (principal, action == Action::"repo:read", resource == Resource::"repo:org/app")
when { context.auth == "oidc" && context.claims has email };

@id("jwt-svid-agents")
permit (principal in Team::"agents", action == Action::"repo:read", resource == Resource::"repo:org/docs")
when { context.auth == "jwt-svid" };

@id("migrate-needs-ticket")
permit (principal in Team::"agents", action == Action::"db:migrate", resource == Resource::"db:prod")
when { context.request has ticket };

@id("admin-is-short")
@max_ttl("60")
permit (principal in Team::"agents", action == Action::"repo:admin", resource == Resource::"repo:org/app");

@id("deploy-needs-approval")
@approval("required")
@max_ttl("600")
permit (principal in Team::"agents", action == Action::"deploy:prod", resource == Resource::"service:app");

@id("no-secrets")
forbid (principal, action, resource)
when { resource has sensitivity && resource.sensitivity == "secret" };

@id("helper-reads-only")
forbid (principal, action, resource)
when { context.delegated && context.actor == "spiffe://example.org/agent/helper" && action != Action::"repo:read" };
"""


def entities() -> list[dict]:
    team = {"type": "Team", "id": "agents"}
    rows: list[dict] = [{"uid": team, "attrs": {}, "parents": []}]
    for agent in (PLANNER, WORKER, HELPER):
        rows.append({"uid": {"type": "Workload", "id": agent}, "attrs": {}, "parents": [team]})
    rows.append({"uid": {"type": "Resource", "id": "vault:prod"}, "attrs": {"sensitivity": "secret"}, "parents": []})
    return rows


@dataclass
class Material:
    """Certificates, keys and files made once per test session."""

    issuer: MockIssuer
    folder: Path
    roots_pem: bytes
    svids: dict[str, X509Svid] = field(default_factory=dict)

    def svid(self, spiffe_id: str) -> X509Svid:
        if spiffe_id not in self.svids:
            td = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
            self.svids[spiffe_id] = self.issuer.ca(td).x509_svid(spiffe_id, ttl=86400)
        return self.svids[spiffe_id]


def make_material(folder: Path) -> Material:
    issuer = MockIssuer()
    ca = issuer.ca(TD)
    other = issuer.ca(OTHER_TD)
    (folder / "example.bundle.pem").write_bytes(ca.bundle_pem())
    (folder / "other.bundle.pem").write_bytes(other.bundle_pem())
    (folder / "example.jwks.json").write_text(issuer.jwt(TD).jwks_json())
    (folder / "other.jwks.json").write_text(issuer.jwt(OTHER_TD).jwks_json())
    ca.server_svid(BROKER_ID).write(folder, "broker")
    (folder / "policy.cedar").write_text(POLICY)
    (folder / "entities.json").write_text(json.dumps(entities()))
    return Material(issuer=issuer, folder=folder, roots_pem=ca.bundle_pem())


def write_config(
    material: Material,
    folder: Path,
    *,
    extra: str = "",
    http: bool = False,
    tokens_extra: str = "",
    audit_path: str | None = None,
) -> Path:
    oidc = material.issuer.oidc()
    m = material.folder
    config = folder / "broker.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:0"
token_listen = "127.0.0.1:0"
{'http_listen = "127.0.0.1:0"' if http else ''}
cert = "{m / 'broker.pem'}"
key = "{m / 'broker-key.pem'}"
spiffe_id = "{BROKER_ID}"

[[trust_domains]]
name = "{TD}"
bundle = "{m / 'example.bundle.pem'}"
jwt_bundle = "{m / 'example.jwks.json'}"

[[trust_domains]]
name = "{OTHER_TD}"
bundle = "{m / 'other.bundle.pem'}"
jwt_bundle = "{m / 'other.jwks.json'}"

[[oidc_issuers]]
issuer = "{oidc.issuer}"
audience = "{BROKER_ID}"
jwks_uri = "{oidc.jwks_uri}"

[tokens]
default_ttl = "5m"
max_ttl = "1h"
max_task_lifetime = "2h"
max_delegation_depth = 3
clock_skew = "30s"
{tokens_extra}

[policy]
file = "{folder / 'policy.cedar'}"
entities = "{m / 'entities.json'}"

[admin]
spiffe_ids = ["spiffe://{TD}/operator/*"]
introspectors = ["{INTROSPECTOR_ID}"]

[audit]
path = "{audit_path or folder / 'audit.jsonl'}"
{extra}
""")
    (folder / "policy.cedar").write_text(POLICY)
    return config


class RunningBroker:
    """A broker app served from its own event loop thread, as `broker serve` would."""

    def __init__(self, config_path: Path, clock: FakeClock) -> None:
        self.clock = clock
        self.config_path = config_path
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="broker-loop", daemon=True)
        self._thread.start()
        self.app: BrokerApp = self.call(self._build())
        self.call(self.app.start())

    async def _build(self) -> BrokerApp:
        return build_app(load_config(self.config_path), clock=self.clock)

    def call(self, coro, timeout: float = 10.0):
        """Run `coro` on the broker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn, *args, **kwargs):
        """Run a plain function on the broker's loop (where the core's state lives)."""
        async def run():
            return fn(*args, **kwargs)
        return self.call(run())

    def until(self, predicate, timeout: float = 10.0) -> None:
        """Wait until `predicate()`, evaluated on the broker's loop, holds; AssertionError after `timeout`."""

        async def watch() -> None:
            deadline = self.loop.time() + timeout
            while not predicate():
                if self.loop.time() > deadline:
                    raise AssertionError("condition not reached in time")
                await asyncio.sleep(0.005)

        self.call(watch(), timeout=timeout + 5)

    def settle(self) -> None:
        """Let the loop run everything already scheduled (e.g. the reaper after a clock advance)."""
        for _ in range(3):
            self.call(asyncio.sleep(0.01))

    def wait_until(self, predicate, timeout: float = 10.0) -> None:
        """Let the loop run until `predicate()` holds (e.g. the reaper has recorded an expiry)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            self.settle()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.app.stop(grace=0.2))
        shutdown_loop(self.loop, self._thread)

    def kill(self) -> None:
        """Die as a SIGKILLed process would: calls are cut off and no step of the app's stop runs
        (no drain, no role dropped, nothing appended); what runs on the loop is cancelled."""
        if self.loop.is_closed():
            return

        async def cut() -> None:
            await asyncio.gather(*(server.stop(None) for server in self.app.servers.values()))

        self.call(cut())
        shutdown_loop(self.loop, self._thread)

    @property
    def mtls_port(self) -> int:
        return self.app.ports["mtls"]

    @property
    def token_port(self) -> int:
        return self.app.ports["token"]


def channel_options() -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", "localhost")]


@dataclass
class Harness:
    """What an integration test needs: the broker, its material, and ways to call it."""

    broker: RunningBroker
    material: Material
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def clock(self) -> FakeClock:
        return self.broker.clock

    @property
    def issuer(self) -> MockIssuer:
        return self.material.issuer

    def mtls_channel(self, svid: X509Svid | str) -> grpc.Channel:
        if isinstance(svid, str):
            svid = self.material.svid(svid)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.material.roots_pem, private_key=svid.key_pem(), certificate_chain=svid.chain_pem()
        )
        channel = grpc.secure_channel(f"127.0.0.1:{self.broker.mtls_port}", creds, options=channel_options())
        self.channels.append(channel)
        return channel

    def token_channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.material.roots_pem)
        channel = grpc.secure_channel(f"127.0.0.1:{self.broker.token_port}", creds, options=channel_options())
        self.channels.append(channel)
        return channel

    def agent(self, svid: X509Svid | str) -> pb_grpc.CredentialBrokerStub:
        return pb_grpc.CredentialBrokerStub(self.mtls_channel(svid))

    def token_agent(self) -> pb_grpc.CredentialBrokerStub:
        return pb_grpc.CredentialBrokerStub(self.token_channel())

    def operator(self, spiffe_id: str = OPERATOR_ID) -> pb_grpc.BrokerAdminStub:
        return pb_grpc.BrokerAdminStub(self.mtls_channel(spiffe_id))

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def postgres_store(dsn: str, replica_id: str) -> str:
    """The `[store]` section of a replica sharing the database at `dsn`."""
    return f'\n[store]\nbackend = "postgres"\ndsn = "{dsn}"\nreplica_id = "{replica_id}"\n'


def run_harness(material: Material, folder: Path, **kw) -> Iterator[Harness]:
    config = write_config(material, folder, **kw)
    broker = RunningBroker(config, FakeClock())
    harness = Harness(broker=broker, material=material)
    try:
        yield harness
    finally:
        harness.close()
        broker.stop()
