"""The composition root: the one place the broker's objects are built and wired together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.api.admin import BrokerAdminServicer
from broker.api.auth import Authenticator, Listener
from broker.api.guard import CallGuard, Slots
from broker.api.http import HttpListener
from broker.api.servicers import CredentialBrokerServicer
from broker.approvals.store import ApprovalStore
from broker.backends.base import BackendStatus
from broker.backends.manager import Backends
from broker.backends.postgres import PostgresBackend
from broker.config.settings import Config
from broker.domain.clock import Clock, SystemClock
from broker.domain.errors import ConfigError
from broker.domain.intent import Limits
from broker.jose.keys import SigningKey
from broker.leases.feed import RevocationFeed
from broker.leases.table import LeaseTable
from broker.ops.audit import AuditLog
from broker.ops.ratelimit import RateLimiter
from broker.policy.engine import PolicyEngine
from broker.store.base import LeaseStore, MemoryStore
from broker.tokens.minter import TokenMinter
from broker.usecases.exchange import Exchange
from broker.usecases.issuance import Issuer, Settings
from broker.usecases.lifecycle import Leasing
from broker.usecases.operations import Admin
from broker.usecases.reaper import Reaper
from broker.verify import JwksFetcher, JwtSvidVerifier, OidcVerifier, Verifiers, X509SvidVerifier
from broker.verify.x509 import load_bundle

log = logging.getLogger(__name__)

# Requests are small; anything larger is refused by gRPC itself with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 64 * 1024
# A 16 KiB bearer token must reach our own size check rather than gRPC's default 8 KiB limit.
MAX_METADATA_BYTES = 32 * 1024
# Ended leases stay visible (Introspect "inactive", Renew FAILED_PRECONDITION, ListLeases --all)
# this long after their last token's exp, then are forgotten: memory stays bounded under churn.
TOMBSTONE_GRACE_SECONDS = 300.0
PENDING_QUEUE_FLOOR = 10_000
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["CredentialBroker"].full_name,
    pb.DESCRIPTOR.services_by_name["BrokerAdmin"].full_name,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from e


def build_verifiers(config: Config, clock: Clock) -> Verifiers:
    """Raises: ConfigError when a bundle or JWKS file cannot be loaded."""
    bundles = {}
    jwt_bundles = {}
    for i, td in enumerate(config.trust_domains):
        try:
            bundles[td.name.name] = load_bundle(td.bundle)
            if td.jwt_bundle is not None:
                jwt_bundles[td.name.name] = json.loads(td.jwt_bundle.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"trust_domains[{i}]", str(e)) from e
    skew = config.tokens.clock_skew
    fetcher = JwksFetcher(clock=clock)
    audience = str(config.server.spiffe_id)
    return Verifiers(
        x509=X509SvidVerifier(bundles, clock_skew=skew),
        jwt_svid=JwtSvidVerifier(jwt_bundles, audience=audience, clock_skew=skew) if jwt_bundles else None,
        oidc=[OidcVerifier(issuer, clock_skew=skew, fetcher=fetcher) for issuer in config.oidc_issuers],
    )


def build_signing_key(config: Config) -> SigningKey:
    """Raises: ConfigError when the configured key cannot be used."""
    tokens = config.tokens
    if tokens.signing_key is None:
        return SigningKey.generate(tokens.algorithm)
    try:
        return SigningKey.load(tokens.signing_key, tokens.algorithm)
    except (OSError, ValueError) as e:
        raise ConfigError("tokens.signing_key", str(e)) from e


@dataclass
class BrokerApp:
    """A built broker: its core objects, its servers, and the tasks it runs."""

    config: Config
    clock: Clock
    leases: LeaseTable
    store: LeaseStore
    approvals: ApprovalStore
    minter: TokenMinter
    policy: PolicyEngine
    audit: AuditLog
    exchange: Exchange
    leasing: Leasing
    admin: Admin
    feed: RevocationFeed
    reaper: Reaper
    verifiers: Verifiers
    limiter: RateLimiter
    backends: Backends
    slots: Slots | None = None
    servers: dict[Listener, aio.Server] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    http: HttpListener | None = None
    health: health.aio.HealthServicer | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def start(self) -> None:
        """Connect the store, bind every listener and start serving; `ports` then holds the bound ports.

        Raises:
            ConfigError: a listener cannot bind, or the store's schema is newer than this broker.
            StoreUnavailable: the store cannot be reached at start.
        """
        cfg = self.config.server
        await self.store.start()
        self.feed.epoch = self.store.epoch  # cursors name the store they index
        cert_chain = _read(cfg.cert, "server.cert")
        key = _read(cfg.key, "server.key")
        roots = b"".join(
            _read(td.bundle, f"trust_domains[{i}].bundle") for i, td in enumerate(self.config.trust_domains)
        )
        self.health = health.aio.HealthServicer()
        # Shared by both listeners: the concurrency limit is the process's, not a port's.
        self.slots = Slots(self.config.limits.max_concurrent_rpcs)
        mtls = grpc.ssl_server_credentials([(key, cert_chain)], root_certificates=roots, require_client_auth=True)
        self.ports["mtls"] = await self._serve(Listener.MTLS, cfg.listen, mtls)
        if cfg.token_listen:
            tls = grpc.ssl_server_credentials([(key, cert_chain)], require_client_auth=False)
            self.ports["token"] = await self._serve(Listener.TOKEN, cfg.token_listen, tls)
        if cfg.http_listen:
            self.http = HttpListener(
                cfg.http_listen,
                minter=self.minter,
                leases=self.leases,
                issuer=self.config.tokens.issuer,
                algorithm=self.config.tokens.algorithm,
                backends=self.backends,
            )
            try:
                self.ports["http"] = self.http.start()
            except OSError as e:
                raise ConfigError("server.http_listen", f"cannot listen on {cfg.http_listen}: {e.strerror}") from e
        await self._set_health(self.store.healthy)
        self.store.on_health(lambda healthy: self._tasks.append(asyncio.ensure_future(self._set_health(healthy))))
        await self._watch_backends()
        self._tasks.append(asyncio.create_task(self.reaper.run(), name="reaper"))
        log.info("broker serving", extra={"ports": dict(self.ports), "issuer": issuer_of(self.config)})

    async def _watch_backends(self) -> None:
        """Health service `backend:<name>` per backend: NOT_SERVING until it answers, and while it is down."""
        health_servicer = self.health
        assert health_servicer is not None

        def on_status(name: str, status: BackendStatus) -> None:
            code = health_pb2.HealthCheckResponse.SERVING if status.up else health_pb2.HealthCheckResponse.NOT_SERVING
            self._tasks.append(asyncio.ensure_future(health_servicer.set(f"backend:{name}", code)))

        for name in self.backends.names():
            await health_servicer.set(f"backend:{name}", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.backends.on_status(on_status)
        await self.backends.start()

    async def _set_health(self, healthy: bool) -> None:
        # NOT_SERVING while the store is out of reach: the calls that need it fail closed.
        if self.health is None:
            return
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in (*SERVICE_NAMES[:2], ""):
            await self.health.set(name, status)

    async def _serve(self, listener: Listener, address: str, creds: grpc.ServerCredentials) -> int:
        server = aio.server(
            interceptors=[CallGuard(self.slots)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.so_reuseport", 1 if self.config.server.reuse_port else 0),
                # gRPC core cancels calls that wait unmatched beyond its pending queue (1,000 by
                # default): a burst would end as CANCELLED before the guard could refuse it with
                # a reason. A deeper queue lets every call reach the guard (or its deadline).
                ("grpc.server.max_pending_requests", self._pending_limit()),
                ("grpc.server.max_pending_requests_hard_limit", self._pending_limit()),
            ]
        )
        auth = Authenticator(
            self.verifiers,
            self.clock,
            listener=listener,
            admin_ids=self.config.admin.spiffe_ids,
            limiter=self.limiter,
        )
        pb_grpc.add_CredentialBrokerServicer_to_server(
            CredentialBrokerServicer(
                auth=auth,
                exchange=self.exchange,
                leasing=self.leasing,
                minter=self.minter,
                feed=self.feed,
                clock=self.clock,
                limits=_limits(self.config),
            ),
            server,
        )
        pb_grpc.add_BrokerAdminServicer_to_server(BrokerAdminServicer(auth=auth, admin=self.admin), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        key = f"server.{'listen' if listener is Listener.MTLS else 'token_listen'}"
        try:
            port = server.add_secure_port(address, creds)
        except (RuntimeError, OSError) as e:  # this grpcio raises where older ones returned 0
            raise ConfigError(key, f"cannot listen on {address} (in use, or not a local address)") from e
        if port == 0:
            raise ConfigError(key, f"cannot listen on {address}")
        await server.start()
        self.servers[listener] = server
        return port

    def _pending_limit(self) -> int:
        return max(PENDING_QUEUE_FLOOR, 10 * self.config.limits.max_concurrent_rpcs)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, let running ones finish for `grace` seconds, stop the loops."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(server.stop(grace) for server in self.servers.values()))
        await self.backends.close()
        if self.http is not None:
            self.http.stop()
        await self.store.close()
        self.audit.close()
        log.info("broker stopped")

    def reload_policy(self) -> None:
        """SIGHUP: reload the policy; a bad file is logged and audited, and the old policy stays."""
        try:
            version = self.policy.reload()
        except Exception as e:
            log.error("policy reload refused", extra={"reason": str(e)[:300]})
            self.audit.record("policy.reload_failed", operator="signal:SIGHUP", reason=str(e)[:300])
            return
        log.info("policy reloaded", extra={"policy_version": version})
        self.audit.record("policy.reloaded", operator="signal:SIGHUP", policy_version=version)


def _peer_reloader(policy: PolicyEngine, audit: AuditLog):
    """How this replica reloads its own policy file when another replica's ReloadPolicy asks."""

    def reload() -> tuple[bool, str]:
        try:
            version = policy.reload()
        except Exception as e:
            audit.record("policy.reload_failed", operator="replica", reason=str(e)[:300])
            return False, str(e)[:300]
        audit.record("policy.reloaded", operator="replica", policy_version=version)
        return True, version

    return reload


def build_store(config: Config, table: LeaseTable, *, minter: TokenMinter, clock: Clock) -> LeaseStore:
    """The lease store `[store]` names; nothing connects until `start()`."""
    store = config.store
    if store.backend == "memory":
        return MemoryStore(table, minter=minter)
    from broker.store.postgres import HOUSEKEEPING_SECONDS, PostgresStore  # psycopg only when asked for

    tokens = config.tokens
    return PostgresStore(
        table,
        dsn=store.dsn,
        replica_id=store.replica_id or f"{socket.gethostname()}-{os.getpid()}",
        minter=minter,
        clock=clock,
        # A replica heartbeats its key; a token it signed lives at most max_ttl past its last beat.
        key_lifetime=tokens.max_ttl + tokens.clock_skew + 2 * HOUSEKEEPING_SECONDS,
        event_retention=tokens.max_task_lifetime + TOMBSTONE_GRACE_SECONDS + tokens.clock_skew + 60,
    )


def issuer_of(config: Config) -> str:
    """`iss` of minted tokens: `tokens.issuer` when set, else the broker's SPIFFE ID."""
    return config.tokens.issuer or str(config.server.spiffe_id)


def _limits(config: Config) -> Limits:
    lim = config.limits
    return Limits(
        max_actions=lim.max_actions,
        max_context_entries=lim.max_context_entries,
        max_context_bytes=lim.max_context_bytes,
    )


def build_app(config: Config, *, clock: Clock | None = None) -> BrokerApp:
    """Build every object of a broker from `config`; nothing listens until `start()`.

    Raises:
        ConfigError: a file named by the config cannot be used.
        PolicyError: the policy file does not parse.
    """
    # What reads a file is built here, before anything is wired: a bad config fails early.
    clock = clock or SystemClock()
    minter = TokenMinter(issuer_of(config), build_signing_key(config))
    policy = PolicyEngine.from_files(config.policy.file, config.policy.entities)
    audit = _open_audit(config, clock)
    verifiers = build_verifiers(config, clock)
    return _wire(config, clock, minter=minter, policy=policy, audit=audit, verifiers=verifiers)


def _open_audit(config: Config, clock: Clock) -> AuditLog:
    """Raises: ConfigError when the audit log cannot be opened."""
    try:
        return AuditLog.open(config.audit.path, clock=clock, on_failure=config.audit.on_failure)
    except OSError as e:
        raise ConfigError("audit.path", f"cannot open {config.audit.path}: {e.strerror}") from e


def _settings(config: Config) -> Settings:
    tokens = config.tokens
    return Settings(
        issuer=issuer_of(config),
        default_ttl=tokens.default_ttl,
        max_ttl=tokens.max_ttl,
        max_task_lifetime=tokens.max_task_lifetime,
        max_delegation_depth=tokens.max_delegation_depth,
        approval_ttl=config.approvals.ttl,
        max_tasks_per_principal=config.limits.max_tasks_per_principal,
        introspectors=config.admin.introspectors,
        limits=_limits(config),
    )


def _wire(
    config: Config, clock: Clock, *, minter: TokenMinter, policy: PolicyEngine, audit: AuditLog, verifiers: Verifiers
) -> BrokerApp:
    """The lease table, the use cases and the loops around the built parts, as a `BrokerApp`."""
    # Construction order is subscription order: lease events reach the feed, then the reaper.
    # The audit log and the secret backends read the batches this broker committed, so each
    # change is audited (and each ended lease's role dropped) once, by the replica that made it;
    # the backends read the table too, to know which roles another replica's leases hold.
    leases = LeaseTable(tombstone_grace=TOMBSTONE_GRACE_SECONDS)
    store = build_store(config, leases, minter=minter, clock=clock)
    store.on_committed(audit.on_event)
    store.on_reload(_peer_reloader(policy, audit))
    backends = Backends(
        [PostgresBackend(b) for b in config.backends],
        clock=clock,
        audit=audit,
        leases=store,
        clock_skew=config.tokens.clock_skew,
    )
    store.on_committed(backends.on_event)
    approvals = leases.approvals
    settings = _settings(config)
    issuer = Issuer(store=store, minter=minter, audit=audit, clock=clock, settings=settings, backends=backends)
    exchange = Exchange(
        verifiers=verifiers,
        policy=policy,
        store=store,
        minter=minter,
        issuer=issuer,
        audit=audit,
        clock=clock,
        settings=settings,
        backends=backends,
    )
    leasing = Leasing(
        policy=policy,
        store=store,
        minter=minter,
        issuer=issuer,
        audit=audit,
        clock=clock,
        settings=settings,
        backends=backends,
    )
    admin = Admin(store=store, policy=policy, minter=minter, audit=audit, clock=clock, backends=backends)
    return BrokerApp(
        config=config,
        clock=clock,
        leases=leases,
        store=store,
        approvals=approvals,
        minter=minter,
        policy=policy,
        audit=audit,
        exchange=exchange,
        leasing=leasing,
        admin=admin,
        feed=RevocationFeed(
            leases,
            window=config.limits.watch_buffer,
            max_streams_per_watcher=config.limits.max_streams_per_watcher,
            epoch=store.epoch,
            history=store.ended_after if store.durable else None,
        ),
        reaper=Reaper(store=store, minter=minter, clock=clock),
        verifiers=verifiers,
        limiter=RateLimiter(rate=config.limits.rate_per_second, burst=config.limits.rate_burst),
        backends=backends,
    )
