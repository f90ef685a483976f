"""Loading `broker.toml`: a good file gives typed values; every bad one names its key."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.config.settings import (
    AdminConfig,
    ApprovalsConfig,
    AuditConfig,
    Config,
    LimitsConfig,
    TokensConfig,
    load_config,
    parse_duration,
)
from broker.domain.errors import ConfigError
from broker.domain.identity import SpiffeId, TrustDomain

FILES = (
    "certs/broker.pem",
    "certs/broker-key.pem",
    "certs/example.org.bundle.pem",
    "certs/example.org.jwks.json",
    "certs/other.org.bundle.pem",
    "certs/issuer.jwks.json",
    "certs/signing-key.pem",
    "policy/broker.cedar",
    "policy/entities.json",
)

GOOD: dict[str, Any] = {
    "server": {
        "listen": "127.0.0.1:8443",
        "token_listen": "127.0.0.1:8444",
        "http_listen": "127.0.0.1:8080",
        "cert": "certs/broker.pem",
        "key": "certs/broker-key.pem",
        "spiffe_id": "spiffe://example.org/broker",
    },
    "trust_domains": [
        {"name": "example.org", "bundle": "certs/example.org.bundle.pem", "jwt_bundle": "certs/example.org.jwks.json"},
        {"name": "spiffe://other.org", "bundle": "certs/other.org.bundle.pem"},
    ],
    "oidc_issuers": [
        {
            "issuer": "https://issuer.test",
            "audience": "spiffe://example.org/broker",
            "jwks_file": "certs/issuer.jwks.json",
            "subject_template": "gh:{sub}",
        },
        {"issuer": "http://127.0.0.1:9000", "audience": "broker", "jwks_uri": "http://127.0.0.1:9000/jwks"},
        {"issuer": "https://accounts.example.com", "audience": "broker"},
    ],
    "tokens": {
        "signing_key": "certs/signing-key.pem",
        "algorithm": "EdDSA",
        "default_ttl": "5m",
        "max_ttl": "1h",
        "max_task_lifetime": "8h",
        "max_delegation_depth": 2,
        "clock_skew": "45s",
    },
    "policy": {"file": "policy/broker.cedar", "entities": "policy/entities.json"},
    "admin": {
        "spiffe_ids": ["spiffe://example.org/operator/*", "spiffe://example.org/root"],
        "introspectors": ["spiffe://example.org/api", "oidc:https://issuer.test#svc"],
    },
    "audit": {"path": "logs/audit.jsonl"},
    "approvals": {"ttl": "15m"},
    "limits": {
        "max_context_entries": 8,
        "max_context_bytes": 1024,
        "max_actions": 4,
        "max_streams_per_watcher": 3,
        "max_tasks_per_principal": 50,
    },
}

MINIMAL: dict[str, Any] = {
    "server": {k: GOOD["server"][k] for k in ("listen", "cert", "key", "spiffe_id")},
    "trust_domains": [{"name": "example.org", "bundle": "certs/example.org.bundle.pem"}],
    "policy": {"file": "policy/broker.cedar"},
}


def _toml(doc: dict[str, Any]) -> str:
    """Enough of a TOML writer for these tests (JSON strings and arrays are valid TOML)."""

    def is_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)

    lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if not isinstance(v, dict) and not is_tables(v)]
    for name, value in doc.items():
        tables = (
            [(f"[{name}]", value)]
            if isinstance(value, dict)
            else [(f"[[{name}]]", v) for v in value]
            if is_tables(value)
            else []
        )
        for header, table in tables:
            lines += ["", header, *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("placeholder\n")
    (tmp_path / "logs").mkdir()
    return tmp_path


def _write(folder: Path, doc: dict[str, Any], name: str = "broker.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_toml(doc))
    return path


def test_good_file_loads_every_value(folder: Path) -> None:
    config = load_config(_write(folder, GOOD))
    assert config.source == folder / "broker.toml"
    assert config.server.listen == "127.0.0.1:8443"
    assert config.server.token_listen == "127.0.0.1:8444"
    assert config.server.http_listen == "127.0.0.1:8080"
    assert config.server.spiffe_id == SpiffeId.parse("spiffe://example.org/broker")
    assert [td.name for td in config.trust_domains] == [TrustDomain("example.org"), TrustDomain("other.org")]
    assert config.trust_domains[1].jwt_bundle is None
    assert config.tokens == TokensConfig(
        signing_key=folder / "certs/signing-key.pem",
        algorithm="EdDSA",
        default_ttl=300,
        max_ttl=3600,
        max_task_lifetime=8 * 3600,
        max_delegation_depth=2,
        clock_skew=45,
    )
    assert config.admin == AdminConfig(
        spiffe_ids=tuple(GOOD["admin"]["spiffe_ids"]), introspectors=tuple(GOOD["admin"]["introspectors"])
    )
    assert config.approvals == ApprovalsConfig(ttl=900)
    assert config.limits == LimitsConfig(
        max_context_entries=8, max_context_bytes=1024, max_actions=4, max_streams_per_watcher=3,
        max_tasks_per_principal=50,
    )


def test_oidc_issuers_keep_their_key_source(folder: Path) -> None:
    file_keys, uri_keys, discovery = load_config(_write(folder, GOOD)).oidc_issuers
    assert (file_keys.issuer, file_keys.audience) == ("https://issuer.test", "spiffe://example.org/broker")
    assert (file_keys.jwks_file, file_keys.jwks_uri) == (folder / "certs/issuer.jwks.json", None)
    assert file_keys.subject_template == "gh:{sub}"
    assert (uri_keys.jwks_file, uri_keys.jwks_uri) == (None, "http://127.0.0.1:9000/jwks")
    assert (discovery.jwks_file, discovery.jwks_uri) == (None, None)
    assert discovery.subject_template == "oidc:{iss}#{sub}"


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = _write(folder, GOOD)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(path)
    assert config.server.cert == folder / "certs/broker.pem"
    assert config.policy.file == folder / "policy/broker.cedar"


def test_relative_paths_may_climb_out_of_the_config_folder(folder: Path) -> None:
    doc = copy.deepcopy(MINIMAL)
    for section, key in (("server", "cert"), ("server", "key"), ("policy", "file")):
        doc[section][key] = "../" + doc[section][key]
    doc["trust_domains"][0]["bundle"] = "../" + doc["trust_domains"][0]["bundle"]
    doc["audit"] = {"path": "../logs/audit.jsonl"}
    config = load_config(_write(folder, doc, name="etc/broker.toml"))
    assert config.server.cert == folder / "certs/broker.pem"
    assert config.trust_domains[0].bundle == folder / "certs/example.org.bundle.pem"
    assert config.audit.path == str(folder / "logs/audit.jsonl")


def test_paths_are_absolute_and_normalised(folder: Path) -> None:
    doc = copy.deepcopy(GOOD)
    doc["server"]["key"] = str(folder / "certs" / ".." / "certs" / "broker-key.pem")
    config = load_config(_write(folder, doc))
    assert config.server.key == folder / "certs/broker-key.pem"
    assert config.server.cert == folder / "certs/broker.pem"
    assert config.trust_domains[0].bundle == folder / "certs/example.org.bundle.pem"
    assert config.trust_domains[0].jwt_bundle == folder / "certs/example.org.jwks.json"
    assert config.policy.file == folder / "policy/broker.cedar"
    assert config.policy.entities == folder / "policy/entities.json"
    assert config.audit.path == str(folder / "logs/audit.jsonl")


def test_relative_config_path_gives_absolute_source(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(folder, GOOD)
    monkeypatch.chdir(folder)
    config = load_config(Path("broker.toml"))
    assert config.source == folder / "broker.toml"
    assert config.server.cert == folder / "certs/broker.pem"


def test_new_keys_load_their_values(folder: Path) -> None:
    doc = copy.deepcopy(GOOD)
    doc["tokens"]["issuer"] = "https://broker.example.org/tenant-1"
    doc["audit"]["on_failure"] = "continue"
    doc["limits"]["max_concurrent_rpcs"] = 64
    config = load_config(_write(folder, doc))
    assert config.tokens.issuer == "https://broker.example.org/tenant-1"
    assert config.audit.on_failure == "continue"
    assert config.limits.max_concurrent_rpcs == 64


def test_new_keys_default_to_the_spiffe_issuer_refusing_audit_and_a_bounded_limit(folder: Path) -> None:
    config = load_config(_write(folder, MINIMAL))
    assert config.tokens.issuer is None
    assert config.audit.on_failure == "refuse"
    assert config.limits.max_concurrent_rpcs == 1000


def test_minimal_file_takes_the_defaults(folder: Path) -> None:
    config = load_config(_write(folder, MINIMAL))
    assert config.server.token_listen is None and config.server.http_listen is None
    assert config.oidc_issuers == ()
    assert config.tokens == TokensConfig()
    assert config.tokens.algorithm == "ES256" and config.tokens.signing_key is None
    assert (config.tokens.default_ttl, config.tokens.max_ttl) == (300, 3600)
    assert config.policy.entities is None
    assert config.admin == AdminConfig()
    assert config.audit == AuditConfig(path="-")
    assert config.approvals == ApprovalsConfig()
    assert config.limits == LimitsConfig()
    assert (config.limits.max_streams_per_watcher, config.limits.watch_buffer) == (8, 65536)
    assert config.limits.max_tasks_per_principal == 1000


def test_the_postgres_store_reads_its_dsn_from_a_file_and_allows_reuse_port(folder: Path) -> None:
    (folder / "store.dsn").write_text("host=db.internal dbname=broker password=s3cret\n")
    doc = _edit(_edit(GOOD, ("store",), {"backend": "postgres", "dsn_file": "store.dsn", "replica_id": "a"}),
                ("server", "reuse_port"), True)  # fmt: skip
    config = load_config(_write(folder, doc))
    assert (config.store.backend, config.store.replica_id, config.server.reuse_port) == ("postgres", "a", True)
    assert config.store.dsn == "host=db.internal dbname=broker password=s3cret"
    assert "s3cret" not in repr(config)


def test_trust_domain_lookup(folder: Path) -> None:
    config: Config = load_config(_write(folder, GOOD))
    found = config.trust_domain("other.org")
    assert found is not None and found.bundle == folder / "certs/other.org.bundle.pem"
    assert config.trust_domain(TrustDomain("example.org")) is config.trust_domains[0]
    assert config.trust_domain("unknown.org") is None


def test_config_is_immutable(folder: Path) -> None:
    config = load_config(_write(folder, GOOD))
    with pytest.raises(AttributeError):
        config.tokens.max_ttl = 1  # type: ignore[misc]


DELETE = object()


@dataclass(frozen=True, slots=True)
class Bad:
    id: str
    at: tuple[str | int, ...]  # where to change GOOD: section, [index], key
    value: Any  # DELETE removes the key
    key: str  # ConfigError.key expected


def _edit(doc: dict[str, Any], at: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    parent: Any = doc
    for step in at[:-1]:
        parent = parent[step]
    last = at[-1]
    if value is DELETE:
        del parent[last]
    elif isinstance(parent, list) and last == len(parent):
        parent.append(value)
    else:
        parent[last] = value
    return doc


TD1 = ("trust_domains", 1)
OIDC0 = ("oidc_issuers", 0)

BAD = [
    # sections
    Bad("missing-server-section", ("server",), DELETE, "server"),
    Bad("missing-policy-section", ("policy",), DELETE, "policy"),
    Bad("missing-trust-domains", ("trust_domains",), DELETE, "trust_domains"),
    Bad("empty-trust-domains", ("trust_domains",), [], "trust_domains"),
    Bad("trust-domains-not-an-array", ("trust_domains",), {"name": "example.org"}, "trust_domains"),
    Bad("unknown-section", ("bogus",), {"x": 1}, "bogus"),
    Bad("section-not-a-table", ("tokens",), "fast", "tokens"),
    # server
    Bad("missing-listen", ("server", "listen"), DELETE, "server.listen"),
    Bad("missing-cert", ("server", "cert"), DELETE, "server.cert"),
    Bad("missing-spiffe-id", ("server", "spiffe_id"), DELETE, "server.spiffe_id"),
    Bad("unknown-server-key", ("server", "port"), 8443, "server.port"),
    Bad("listen-no-port", ("server", "listen"), "127.0.0.1", "server.listen"),
    Bad("listen-port-too-big", ("server", "listen"), "127.0.0.1:65536", "server.listen"),
    Bad("listen-port-not-a-number", ("server", "listen"), "127.0.0.1:https", "server.listen"),
    Bad("listen-negative-port", ("server", "listen"), "127.0.0.1:-1", "server.listen"),
    Bad("listen-no-host", ("server", "listen"), ":8443", "server.listen"),
    Bad("listen-ipv6-without-brackets", ("server", "listen"), "::1:8443", "server.listen"),
    Bad("listen-a-number", ("server", "listen"), 8443, "server.listen"),
    Bad("listen-empty", ("server", "listen"), "", "server.listen"),
    Bad("token-listen-bad", ("server", "token_listen"), "localhost", "server.token_listen"),
    Bad("http-listen-bad", ("server", "http_listen"), "localhost:99999", "server.http_listen"),
    Bad("token-listen-same-as-listen", ("server", "token_listen"), "127.0.0.1:8443", "server.token_listen"),
    Bad("spiffe-id-upper-case-domain", ("server", "spiffe_id"), "spiffe://Example.org/broker", "server.spiffe_id"),
    Bad("spiffe-id-https", ("server", "spiffe_id"), "https://example.org/broker", "server.spiffe_id"),
    Bad("spiffe-id-trailing-slash", ("server", "spiffe_id"), "spiffe://example.org/broker/", "server.spiffe_id"),
    Bad("cert-file-missing", ("server", "cert"), "certs/nope.pem", "server.cert"),
    Bad("key-is-a-folder", ("server", "key"), "certs", "server.key"),
    # trust domains
    Bad("td-name-upper-case", ("trust_domains", 0, "name"), "Example.org", "trust_domains[0].name"),
    Bad("td-name-with-path", ("trust_domains", 0, "name"), "spiffe://example.org/x", "trust_domains[0].name"),
    Bad("td-name-missing", ("trust_domains", 0, "name"), DELETE, "trust_domains[0].name"),
    Bad("td-bundle-file-missing", (*TD1, "bundle"), "certs/missing.pem", "trust_domains[1].bundle"),
    Bad("td-bundle-missing", (*TD1, "bundle"), DELETE, "trust_domains[1].bundle"),
    Bad("td-jwt-bundle-file-missing", ("trust_domains", 0, "jwt_bundle"), "nope.json", "trust_domains[0].jwt_bundle"),
    Bad("td-unknown-key", (*TD1, "federates_with"), ["x"], "trust_domains[1].federates_with"),
    Bad("td-duplicate", (*TD1, "name"), "example.org", "trust_domains[1].name"),
    Bad("td-duplicate-in-spiffe-form", (*TD1, "name"), "spiffe://example.org", "trust_domains[1].name"),
    # oidc issuers
    Bad("oidc-both-jwks-file-and-uri", (*OIDC0, "jwks_uri"), "https://issuer.test/jwks", "oidc_issuers[0].jwks_uri"),
    Bad("oidc-issuer-plain-http", (*OIDC0, "issuer"), "http://issuer.test", "oidc_issuers[0].issuer"),
    Bad(
        "oidc-issuer-http-lookalike-loopback",
        (*OIDC0, "issuer"),
        "http://localhost.evil.test",
        "oidc_issuers[0].issuer",
    ),
    Bad("oidc-issuer-not-a-url", (*OIDC0, "issuer"), "issuer.test", "oidc_issuers[0].issuer"),
    Bad("oidc-issuer-with-query", (*OIDC0, "issuer"), "https://issuer.test/?x=1", "oidc_issuers[0].issuer"),
    Bad("oidc-issuer-bad-port", (*OIDC0, "issuer"), "https://issuer.test:port", "oidc_issuers[0].issuer"),
    Bad("oidc-issuer-missing", (*OIDC0, "issuer"), DELETE, "oidc_issuers[0].issuer"),
    Bad("oidc-audience-missing", (*OIDC0, "audience"), DELETE, "oidc_issuers[0].audience"),
    Bad(
        "oidc-jwks-uri-plain-http", ("oidc_issuers", 1, "jwks_uri"), "http://keys.test/jwks", "oidc_issuers[1].jwks_uri"
    ),
    Bad("oidc-jwks-file-missing", (*OIDC0, "jwks_file"), "certs/none.json", "oidc_issuers[0].jwks_file"),
    Bad(
        "oidc-template-attribute-access",
        (*OIDC0, "subject_template"),
        "{sub.__class__}",
        "oidc_issuers[0].subject_template",
    ),
    Bad("oidc-template-no-field", (*OIDC0, "subject_template"), "everyone", "oidc_issuers[0].subject_template"),
    Bad("oidc-template-unbalanced", (*OIDC0, "subject_template"), "oidc:{sub", "oidc_issuers[0].subject_template"),
    Bad("oidc-duplicate-issuer", ("oidc_issuers", 2, "issuer"), "https://issuer.test", "oidc_issuers[2].issuer"),
    Bad("oidc-unknown-key", (*OIDC0, "client_secret"), "x", "oidc_issuers[0].client_secret"),
    # tokens
    Bad("bad-duration", ("tokens", "default_ttl"), "5 minutes", "tokens.default_ttl"),
    Bad("duration-unknown-unit", ("tokens", "max_task_lifetime"), "1d", "tokens.max_task_lifetime"),
    Bad("negative-duration", ("tokens", "max_ttl"), -60, "tokens.max_ttl"),
    Bad("negative-duration-string", ("tokens", "max_ttl"), "-60s", "tokens.max_ttl"),
    Bad("zero-duration", ("tokens", "clock_skew"), "0s", "tokens.clock_skew"),
    Bad("duration-bool", ("tokens", "default_ttl"), True, "tokens.default_ttl"),
    Bad("duration-list", ("tokens", "default_ttl"), ["5m"], "tokens.default_ttl"),
    Bad("default-ttl-over-max-ttl", ("tokens", "default_ttl"), "2h", "tokens.default_ttl"),
    Bad("clock-skew-unbounded", ("tokens", "clock_skew"), "1h", "tokens.clock_skew"),
    Bad("bad-algorithm", ("tokens", "algorithm"), "RS256", "tokens.algorithm"),
    Bad("algorithm-none", ("tokens", "algorithm"), "none", "tokens.algorithm"),
    Bad("algorithm-wrong-case", ("tokens", "algorithm"), "es256", "tokens.algorithm"),
    Bad("depth-over-10", ("tokens", "max_delegation_depth"), 11, "tokens.max_delegation_depth"),
    Bad("depth-negative", ("tokens", "max_delegation_depth"), -1, "tokens.max_delegation_depth"),
    Bad("depth-string", ("tokens", "max_delegation_depth"), "3", "tokens.max_delegation_depth"),
    Bad("depth-float", ("tokens", "max_delegation_depth"), 3.0, "tokens.max_delegation_depth"),
    Bad("depth-bool", ("tokens", "max_delegation_depth"), True, "tokens.max_delegation_depth"),
    Bad("signing-key-file-missing", ("tokens", "signing_key"), "keys/none.pem", "tokens.signing_key"),
    Bad("unknown-tokens-key", ("tokens", "default_tll"), "5m", "tokens.default_tll"),
    # policy
    Bad("policy-file-missing-key", ("policy", "file"), DELETE, "policy.file"),
    Bad("policy-file-not-found", ("policy", "file"), "policy/none.cedar", "policy.file"),
    Bad("entities-file-not-found", ("policy", "entities"), "policy/none.json", "policy.entities"),
    # admin
    Bad("admin-id-not-spiffe", ("admin", "spiffe_ids"), ["operator"], "admin.spiffe_ids[0]"),
    Bad("admin-glob-without-scheme", ("admin", "spiffe_ids"), ["*/operator/*"], "admin.spiffe_ids[0]"),
    Bad("admin-id-trailing-slash", ("admin", "spiffe_ids"), ["spiffe://example.org/operator/"], "admin.spiffe_ids[0]"),
    Bad("admin-glob-bad-char", ("admin", "spiffe_ids"), ["spiffe://example.org/op?/*"], "admin.spiffe_ids[0]"),
    Bad(
        "admin-second-entry-bad",
        ("admin", "spiffe_ids"),
        ["spiffe://example.org/a", "spiffe://EX.org/*"],
        "admin.spiffe_ids[1]",
    ),
    Bad("admin-glob-in-trust-domain", ("admin", "spiffe_ids"), ["spiffe://example.org*/ops"], "admin.spiffe_ids[0]"),
    Bad("admin-glob-any-trust-domain", ("admin", "spiffe_ids"), ["spiffe://*/operator/*"], "admin.spiffe_ids[0]"),
    Bad("admin-ids-not-a-list", ("admin", "spiffe_ids"), "spiffe://example.org/a", "admin.spiffe_ids"),
    Bad("admin-ids-empty-string", ("admin", "spiffe_ids"), [""], "admin.spiffe_ids"),
    Bad(
        "introspector-bad-spiffe-id", ("admin", "introspectors"), ["spiffe://example.org/a/"], "admin.introspectors[0]"
    ),
    # audit, approvals, limits
    Bad("audit-folder-missing", ("audit", "path"), "nope/audit.jsonl", "audit.path"),
    Bad("audit-path-empty", ("audit", "path"), "", "audit.path"),
    Bad("approvals-ttl-bad", ("approvals", "ttl"), "soon", "approvals.ttl"),
    Bad("limits-zero", ("limits", "max_actions"), 0, "limits.max_actions"),
    Bad("limits-unknown-key", ("limits", "max_tokens"), 3, "limits.max_tokens"),
    Bad("concurrency-limit-zero", ("limits", "max_concurrent_rpcs"), 0, "limits.max_concurrent_rpcs"),
    Bad("concurrency-limit-string", ("limits", "max_concurrent_rpcs"), "100", "limits.max_concurrent_rpcs"),
    Bad("issuer-plain-http", ("tokens", "issuer"), "http://broker.example.org", "tokens.issuer"),
    Bad("issuer-spiffe-id", ("tokens", "issuer"), "spiffe://example.org/broker", "tokens.issuer"),
    Bad("issuer-not-a-url", ("tokens", "issuer"), "broker.example.org", "tokens.issuer"),
    Bad("issuer-with-query", ("tokens", "issuer"), "https://broker.example.org/?x=1", "tokens.issuer"),
    Bad("issuer-with-fragment", ("tokens", "issuer"), "https://broker.example.org/#f", "tokens.issuer"),
    Bad("issuer-not-a-string", ("tokens", "issuer"), 42, "tokens.issuer"),
    Bad("audit-on-failure-unknown", ("audit", "on_failure"), "ignore", "audit.on_failure"),
    Bad("limits-streams-zero", ("limits", "max_streams_per_watcher"), 0, "limits.max_streams_per_watcher"),
    Bad("limits-tasks-zero", ("limits", "max_tasks_per_principal"), 0, "limits.max_tasks_per_principal"),
    # store
    Bad("reuse-port-with-memory-store", ("server", "reuse_port"), True, "server.reuse_port"),
    Bad("reuse-port-not-a-bool", ("server", "reuse_port"), "yes", "server.reuse_port"),
    Bad("store-unknown-backend", ("store",), {"backend": "etcd"}, "store.backend"),
    Bad("store-postgres-without-dsn", ("store",), {"backend": "postgres"}, "store.dsn"),
    Bad("store-dsn-and-dsn-file", ("store",), {"backend": "postgres", "dsn": "x", "dsn_file": "y"}, "store.dsn_file"),
    Bad("store-dsn-file-missing", ("store",), {"backend": "postgres", "dsn_file": "nope.dsn"}, "store.dsn_file"),
    Bad("store-dsn-with-memory", ("store",), {"dsn": "host=db"}, "store.backend"),
    Bad("store-unknown-key", ("store",), {"backend": "postgres", "dsn": "x", "pool": 3}, "store.pool"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_file_names_the_offending_key(folder: Path, case: Bad) -> None:
    path = _write(folder, _edit(GOOD, case.at, case.value))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == case.key
    assert str(info.value).startswith(f"{case.key}: ")
    assert not info.value.reason.endswith(".")


def test_bad_table_ids_are_unique() -> None:
    assert len({c.id for c in BAD}) == len(BAD)


def test_toml_syntax_error_names_the_file(folder: Path) -> None:
    path = folder / "broker.toml"
    path.write_text(_toml(GOOD) + "[tokens\nalgorithm = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == str(path)
    assert "toml" in info.value.reason


def test_missing_config_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == str(path)


@dataclass(frozen=True, slots=True)
class Duration:
    id: str
    value: Any
    seconds: float | None  # None: refused


DURATIONS = [
    Duration("seconds", "90s", 90),
    Duration("minutes", "5m", 300),
    Duration("hours", "1h", 3600),
    Duration("hours-minutes", "1h30m", 5400),
    Duration("hours-minutes-seconds", "2h30m15s", 9015),
    Duration("int-seconds", 45, 45),
    Duration("float-seconds", 1.5, 1.5),
    Duration("empty", "", None),
    Duration("bare-digits-string", "90", None),
    Duration("unit-only", "m", None),
    Duration("space-inside", "1h 30m", None),
    Duration("upper-case-unit", "5M", None),
    Duration("days", "1d", None),
    Duration("wrong-order", "30m1h", None),
    Duration("fraction-in-string", "1.5h", None),
    Duration("zero-int", 0, None),
    Duration("zero-string", "0h0m0s", None),
    Duration("negative", -1, None),
    Duration("nan", float("nan"), None),
    Duration("infinity", float("inf"), None),
    Duration("bool", True, None),
    Duration("none", None, None),
]


@pytest.mark.parametrize("case", DURATIONS, ids=lambda c: c.id)
def test_parse_duration(case: Duration) -> None:
    if case.seconds is None:
        with pytest.raises(ConfigError) as info:
            parse_duration(case.value, "approvals.ttl")
        assert info.value.key == "approvals.ttl"
    else:
        assert parse_duration(case.value, "approvals.ttl") == case.seconds
