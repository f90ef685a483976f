"""Loading and validating `broker.toml`.

The file is read once into frozen dataclasses. Every error is a `ConfigError` whose `key`
names the offending key in dotted form (`tokens.default_ttl`, `trust_domains[1].bundle`),
so an operator can find it. Relative paths resolve against the config file's folder.
The table reader and the checks of single values live in `broker.config.reader`.
"""

from __future__ import annotations

import os
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.config.backends import BackendConfig, backend, check_backends
from broker.config.reader import (
    Table,
    check_issuer_url,
    check_listen,
    check_spiffe_pattern,
    check_url,
    resolve_path,
)
from broker.config.reader import parse_duration as parse_duration  # re-exported: part of this module's API
from broker.domain.errors import ConfigError, InvalidSpiffeId
from broker.domain.identity import SCHEME, SpiffeId, TrustDomain

ALGORITHMS = ("ES256", "EdDSA")
MAX_DEPTH = 10  # tokens.max_delegation_depth
# A generous skew hides broken clocks and stretches every token's life: keep it bounded.
MAX_CLOCK_SKEW = 300.0
DEFAULT_SUBJECT_TEMPLATE = "oidc:{iss}#{sub}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str
    token_listen: str | None
    http_listen: str | None
    cert: Path
    key: Path
    spiffe_id: SpiffeId
    reuse_port: bool = False


@dataclass(frozen=True, slots=True)
class TrustDomainConfig:
    name: TrustDomain
    bundle: Path
    jwt_bundle: Path | None = None


@dataclass(frozen=True, slots=True)
class OidcIssuerConfig:
    """One OIDC issuer; with neither `jwks_file` nor `jwks_uri`, keys come from discovery."""

    issuer: str
    audience: str
    jwks_file: Path | None = None
    jwks_uri: str | None = None
    subject_template: str = DEFAULT_SUBJECT_TEMPLATE


@dataclass(frozen=True, slots=True)
class TokensConfig:
    signing_key: Path | None = None
    algorithm: str = "ES256"
    default_ttl: float = 300
    max_ttl: float = 3600
    max_task_lifetime: float = 28800
    max_delegation_depth: int = 3
    clock_skew: float = 30
    # The https issuer URL: `iss` of minted tokens and of the discovery document. None: the
    # broker's SPIFFE ID is `iss`, and no discovery document is served.
    issuer: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    file: Path
    entities: Path | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    spiffe_ids: tuple[str, ...] = ()
    introspectors: tuple[str, ...] = ()


AUDIT_ON_FAILURE = ("refuse", "continue")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = "-"  # "-" is stdout, else an absolute file path
    # "refuse": no issuance, renewal or approval that cannot be recorded; "continue": log and go on.
    on_failure: str = "refuse"


@dataclass(frozen=True, slots=True)
class ApprovalsConfig:
    ttl: float = 900


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_context_entries: int = 32
    max_context_bytes: int = 4096
    max_actions: int = 16
    # Per calling principal: a token bucket refilled at `rate_per_second`, holding `rate_burst`.
    rate_per_second: int = 50
    rate_burst: int = 100
    # Recent end events kept for watchers (shared by all): a watcher is cut off, and a resume
    # refused, once events it has not read have left this window.
    watch_buffer: int = 65536
    # Open WatchRevocations streams one watcher principal may hold at once.
    max_streams_per_watcher: int = 8
    # Unary calls running at once across the listeners; one more is RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 1000
    # Tasks one principal may own at once (open, or closed but remembered until their deadline).
    max_tasks_per_principal: int = 1000


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where leases, tasks and keys live: this process's memory, or PostgreSQL shared by replicas."""

    backend: str = "memory"
    dsn: str = field(default="", repr=False)  # may hold a password: never printed
    replica_id: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    trust_domains: tuple[TrustDomainConfig, ...]
    oidc_issuers: tuple[OidcIssuerConfig, ...]
    tokens: TokensConfig
    policy: PolicyConfig
    admin: AdminConfig
    audit: AuditConfig
    approvals: ApprovalsConfig
    limits: LimitsConfig
    source: Path
    store: StoreConfig = StoreConfig()
    backends: tuple[BackendConfig, ...] = ()

    def trust_domain(self, name: str | TrustDomain) -> TrustDomainConfig | None:
        """The configured trust domain called `name`, or None."""
        wanted = name.name if isinstance(name, TrustDomain) else name
        return next((td for td in self.trust_domains if td.name.name == wanted), None)


def _server(t: Table) -> ServerConfig:
    t.allow("listen", "token_listen", "http_listen", "cert", "key", "spiffe_id", "reuse_port")
    listen = check_listen(t.string("listen"), t.sub("listen"))
    token_listen = check_listen(t.string("token_listen", None), t.sub("token_listen"))
    http_listen = check_listen(t.string("http_listen", None), t.sub("http_listen"))
    seen: dict[str, str] = {}
    for name, address in (("listen", listen), ("token_listen", token_listen), ("http_listen", http_listen)):
        # Port 0 asks the system for a free port, so equal ":0" addresses never clash.
        if address is not None and not address.endswith(":0"):
            if address in seen:
                raise ConfigError(t.sub(name), f"same address as {t.sub(seen[address])}")
            seen[address] = name
    try:
        spiffe_id = SpiffeId.parse(t.string("spiffe_id"))
    except InvalidSpiffeId as e:
        raise ConfigError(t.sub("spiffe_id"), e.reason) from e
    return ServerConfig(
        listen=str(listen),
        token_listen=token_listen,
        http_listen=http_listen,
        cert=t.path("cert"),
        key=t.path("key"),
        spiffe_id=spiffe_id,
        reuse_port=t.boolean("reuse_port", False),
    )


def _trust_domain(t: Table) -> TrustDomainConfig:
    t.allow("name", "bundle", "jwt_bundle")
    try:
        name = TrustDomain.parse(t.string("name"))
    except InvalidSpiffeId as e:
        raise ConfigError(t.sub("name"), e.reason) from e
    return TrustDomainConfig(name=name, bundle=t.path("bundle"), jwt_bundle=t.path("jwt_bundle", None))


TEMPLATE_FIELDS = frozenset({"iss", "sub"})


def check_subject_template(value: str, key: str = "oidc_issuers.subject_template") -> str:
    """Return `value` if it names only `{iss}` and `{sub}`, plainly.

    Raises:
        ConfigError: any other field, an attribute or index access, a conversion or a format spec
            (`{sub.__class__}` would let a token's claims reach into objects).
    """
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as e:
        raise ConfigError(key, f"not a format template: {e}") from e
    fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    if not fields or any(name not in TEMPLATE_FIELDS or spec or conv for name, spec, conv in fields):
        raise ConfigError(key, 'may only use {iss} and {sub}, e.g. "oidc:{iss}#{sub}"')
    return value


def _oidc_issuer(t: Table) -> OidcIssuerConfig:
    t.allow("issuer", "audience", "jwks_file", "jwks_uri", "subject_template")
    if "jwks_file" in t.data and "jwks_uri" in t.data:
        raise ConfigError(t.sub("jwks_uri"), "set only one of jwks_file and jwks_uri")
    jwks_uri = t.string("jwks_uri", None)
    template = t.string("subject_template", DEFAULT_SUBJECT_TEMPLATE)
    return OidcIssuerConfig(
        issuer=check_url(t.string("issuer"), t.sub("issuer")),
        audience=t.string("audience"),
        jwks_file=t.path("jwks_file", None),
        jwks_uri=None if jwks_uri is None else check_url(jwks_uri, t.sub("jwks_uri")),
        subject_template=check_subject_template(template, t.sub("subject_template")),
    )


def _tokens(t: Table) -> TokensConfig:
    t.allow(
        "signing_key",
        "algorithm",
        "default_ttl",
        "max_ttl",
        "max_task_lifetime",
        "max_delegation_depth",
        "clock_skew",
        "issuer",
    )
    issuer = t.string("issuer", None)
    d = TokensConfig()
    algorithm = t.string("algorithm", d.algorithm)
    if algorithm not in ALGORITHMS:
        raise ConfigError(t.sub("algorithm"), f"must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    tokens = TokensConfig(
        signing_key=t.path("signing_key", None),
        algorithm=algorithm,
        default_ttl=t.duration("default_ttl", d.default_ttl),
        max_ttl=t.duration("max_ttl", d.max_ttl),
        max_task_lifetime=t.duration("max_task_lifetime", d.max_task_lifetime),
        max_delegation_depth=t.integer("max_delegation_depth", d.max_delegation_depth, 0, MAX_DEPTH),
        clock_skew=t.duration("clock_skew", d.clock_skew),
        issuer=None if issuer is None else check_issuer_url(issuer, t.sub("issuer")),
    )
    if tokens.default_ttl > tokens.max_ttl:
        raise ConfigError(t.sub("default_ttl"), "must not exceed tokens.max_ttl")
    if tokens.clock_skew > MAX_CLOCK_SKEW:
        raise ConfigError(t.sub("clock_skew"), f"must be at most {MAX_CLOCK_SKEW:g} seconds")
    return tokens


def _policy(t: Table) -> PolicyConfig:
    t.allow("file", "entities")
    return PolicyConfig(file=t.path("file"), entities=t.path("entities", None))


def _admin(t: Table) -> AdminConfig:
    t.allow("spiffe_ids", "introspectors")
    ids = t.strings("spiffe_ids")
    for i, value in enumerate(ids):
        check_spiffe_pattern(value, f"{t.sub('spiffe_ids')}[{i}]")
    introspectors = t.strings("introspectors")
    for i, value in enumerate(introspectors):
        # Introspectors may be OIDC principals too; what claims to be a SPIFFE ID must be one.
        if value.startswith(SCHEME):
            check_spiffe_pattern(value, f"{t.sub('introspectors')}[{i}]")
    return AdminConfig(spiffe_ids=ids, introspectors=introspectors)


def _audit(t: Table) -> AuditConfig:
    t.allow("path", "on_failure")
    on_failure = t.string("on_failure", AuditConfig().on_failure)
    if on_failure not in AUDIT_ON_FAILURE:
        raise ConfigError(t.sub("on_failure"), f"must be one of {', '.join(AUDIT_ON_FAILURE)}, not {on_failure!r}")
    value = t.string("path", "-")
    if value == "-":
        return AuditConfig(on_failure=on_failure)
    resolved = resolve_path(t.base, value)
    if not resolved.parent.is_dir():
        raise ConfigError(t.sub("path"), f"folder not found: {resolved.parent}")
    return AuditConfig(path=str(resolved), on_failure=on_failure)


def _approvals(t: Table) -> ApprovalsConfig:
    t.allow("ttl")
    return ApprovalsConfig(ttl=t.duration("ttl", ApprovalsConfig().ttl))


def _limits(t: Table) -> LimitsConfig:
    t.allow(
        "max_context_entries",
        "max_context_bytes",
        "max_actions",
        "rate_per_second",
        "rate_burst",
        "watch_buffer",
        "max_concurrent_rpcs",
        "max_streams_per_watcher",
        "max_tasks_per_principal",
    )
    d = LimitsConfig()
    return LimitsConfig(
        max_context_entries=t.integer("max_context_entries", d.max_context_entries, 1),
        max_context_bytes=t.integer("max_context_bytes", d.max_context_bytes, 1),
        max_actions=t.integer("max_actions", d.max_actions, 1),
        rate_per_second=t.integer("rate_per_second", d.rate_per_second, 1),
        rate_burst=t.integer("rate_burst", d.rate_burst, 1),
        max_concurrent_rpcs=t.integer("max_concurrent_rpcs", d.max_concurrent_rpcs, 1, 1_000_000),
        watch_buffer=t.integer("watch_buffer", d.watch_buffer, 1, 10_000_000),
        max_streams_per_watcher=t.integer("max_streams_per_watcher", d.max_streams_per_watcher, 1, 10_000),
        max_tasks_per_principal=t.integer("max_tasks_per_principal", d.max_tasks_per_principal, 1, 10_000_000),
    )


STORE_BACKENDS = ("memory", "postgres")


def _store(t: Table) -> StoreConfig:
    t.allow("backend", "dsn", "dsn_file", "replica_id")
    backend = t.string("backend", "memory")
    if backend not in STORE_BACKENDS:
        raise ConfigError(t.sub("backend"), f'must be "memory" or "postgres", not {backend!r}')
    if "dsn" in t.data and "dsn_file" in t.data:
        raise ConfigError(t.sub("dsn_file"), "set only one of dsn and dsn_file")
    dsn = t.string("dsn", "")
    dsn_file = t.path("dsn_file", None)
    if dsn_file is not None:
        try:
            dsn = dsn_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(t.sub("dsn_file"), f"cannot read {dsn_file}") from e
        if not dsn:
            raise ConfigError(t.sub("dsn_file"), f"{dsn_file} is empty")
    if backend == "postgres" and not dsn:
        raise ConfigError(t.sub("dsn"), "the postgres store needs store.dsn or store.dsn_file")
    if backend == "memory" and dsn:
        raise ConfigError(t.sub("backend"), 'a dsn is set: say backend = "postgres"')
    replica_id = t.string("replica_id", "")
    if len(replica_id) > 128 or not replica_id.isprintable():
        raise ConfigError(t.sub("replica_id"), "must be at most 128 printable characters")
    return StoreConfig(backend=backend, dsn=dsn, replica_id=replica_id)


def _section(root: Table, name: str, *, required: bool = False) -> Table:
    if name not in root.data and required:
        raise ConfigError(name, "section is missing")
    return Table(root.data.get(name, {}), name, root.base)


def _array(root: Table, name: str) -> list[Table]:
    items = root.data.get(name, [])
    if not isinstance(items, list):
        raise ConfigError(name, f"must be an array of tables ([[{name}]])")
    return [Table(item, f"{name}[{i}]", root.base) for i, item in enumerate(items)]


def _unique(items: list[Any], attr: str, key: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        value = str(getattr(item, attr))
        if value in seen:
            raise ConfigError(f"{key}[{i}].{attr}", f"duplicate {value!r}")
        seen.add(value)


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"not valid toml: {e}") from e


def load_config(path: Path) -> Config:
    """Read and validate the config file at `path`.

    Raises:
        ConfigError: the file cannot be read or parsed (key: the file path), or a key is
            missing, unknown or invalid (key: its dotted name).
    """
    source = Path(os.path.abspath(path))
    root = Table(_read(source), "", source.parent)
    sections = (
        "server", "trust_domains", "oidc_issuers", "tokens", "policy", "admin", "audit", "approvals", "limits",
        "backends", "store",
    )  # fmt: skip
    unknown = sorted(set(root.data) - set(sections))
    if unknown:
        raise ConfigError(unknown[0], "unknown section")
    server = _server(_section(root, "server", required=True))
    store = _store(_section(root, "store"))
    if server.reuse_port and store.backend != "postgres":
        # Replicas sharing a port must share their state too, or a call lands on a stranger.
        raise ConfigError("server.reuse_port", 'needs the postgres store ([store] backend = "postgres")')
    if "trust_domains" not in root.data or not root.data["trust_domains"]:
        raise ConfigError("trust_domains", "at least one [[trust_domains]] is required")
    trust_domains = [_trust_domain(t) for t in _array(root, "trust_domains")]
    _unique(trust_domains, "name", "trust_domains")
    oidc_issuers = [_oidc_issuer(t) for t in _array(root, "oidc_issuers")]
    _unique(oidc_issuers, "issuer", "oidc_issuers")
    backends = [backend(t) for t in _array(root, "backends")]
    check_backends(backends)
    return Config(
        server=server,
        trust_domains=tuple(trust_domains),
        oidc_issuers=tuple(oidc_issuers),
        tokens=_tokens(_section(root, "tokens")),
        policy=_policy(_section(root, "policy", required=True)),
        admin=_admin(_section(root, "admin")),
        audit=_audit(_section(root, "audit")),
        approvals=_approvals(_section(root, "approvals")),
        limits=_limits(_section(root, "limits")),
        source=source,
        store=store,
        backends=tuple(backends),
    )
