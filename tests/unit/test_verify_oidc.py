"""OIDC ID token verification against a real OIDC provider on 127.0.0.1, and the Verifiers facade."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from broker.config.settings import OidcIssuerConfig
from broker.domain.errors import ConfigError, CredentialRejected, InvalidRequest, IssuerUnavailable
from broker.domain.identity import AuthKind
from broker.jose.jws import MAX_TOKEN_BYTES
from broker.testing.clock import FakeClock
from broker.testing.jwt_issuer import JwtSvidIssuer, OidcProvider
from broker.testing.x509_ca import SpiffeCA
from broker.verify import (
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT,
    JwksFetcher,
    JwtSvidVerifier,
    OidcVerifier,
    Verifiers,
    X509SvidVerifier,
)

NOW = 1_800_000_000.0
AUD = "spiffe://example.org/broker"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=NOW)


@pytest.fixture
def provider() -> Iterator[OidcProvider]:
    with OidcProvider() as p:
        yield p


@pytest.fixture(scope="module")
def shared_provider() -> Iterator[OidcProvider]:
    """For tests that only read: never rotated, never taken down."""
    with OidcProvider() as p:
        yield p


@pytest.fixture(scope="module")
def attacker() -> Iterator[OidcProvider]:
    with OidcProvider() as p:
        yield p


def config(p: OidcProvider, **changes: object) -> OidcIssuerConfig:
    return replace(OidcIssuerConfig(issuer=p.issuer, audience=AUD), **changes)  # type: ignore[arg-type]


def verifier(p: OidcProvider, clock: FakeClock, **changes: object) -> OidcVerifier:
    return OidcVerifier(config(p, **changes), clock_skew=30, fetcher=JwksFetcher(clock=clock))


def verify(v: OidcVerifier, token: str, now: float = NOW):  # type: ignore[no-untyped-def]
    return asyncio.run(v.verify(token, now=now))


# --- key sources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    id: str
    changes: Callable[[OidcProvider, Path], dict]
    requests: int   # JWKS GETs the provider sees for one verification


SOURCES = [
    Source("discovery", lambda p, tmp: {}, 1),
    Source("jwks-uri", lambda p, tmp: {"jwks_uri": p.jwks_uri}, 1),
    Source("jwks-file", lambda p, tmp: {"jwks_file": _write_jwks(p, tmp)}, 0),
]


def _write_jwks(p: OidcProvider, folder: Path) -> Path:
    path = folder / "issuer.jwks.json"
    path.write_text(json.dumps(p.jwks()))
    return path


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.id)
def test_id_token_verifies_from_each_key_source(source: Source, provider: OidcProvider, clock: FakeClock,
                                                tmp_path: Path) -> None:
    v = verifier(provider, clock, **source.changes(provider, tmp_path))
    token = provider.id_token("alice", AUD, now=NOW, ttl=300, claims={"groups": ["ci"]})

    identity = verify(v, token)

    assert identity.principal == f"oidc:{provider.issuer}#alice"
    assert identity.kind is AuthKind.OIDC
    assert identity.issuer == provider.issuer
    assert identity.expires_at == NOW + 300
    assert identity.claims["groups"] == ["ci"]
    assert provider.jwks_requests == source.requests


@pytest.mark.parametrize("template,expected", [
    ("oidc:{iss}#{sub}", "oidc:{iss}#bob"),
    ("{sub}", "bob"),
    ("github:{sub}", "github:bob"),
    ("{sub}@{iss}", "bob@{iss}"),
], ids=["default", "sub-only", "prefix", "sub-at-iss"])
def test_subject_template_maps_the_principal(template: str, expected: str, shared_provider: OidcProvider,
                                             clock: FakeClock) -> None:
    v = verifier(shared_provider, clock, subject_template=template)
    identity = verify(v, shared_provider.id_token("bob", AUD, now=NOW))
    assert identity.principal == expected.format(iss=shared_provider.issuer)


@pytest.mark.parametrize("template", [
    "oidc:{email}", "{sub.__class__}", "{sub[0]}", "{sub!r}", "{sub:>40}", "{}", "{0}", "static", "{sub",
])
def test_subject_template_with_anything_but_iss_and_sub_is_refused(template: str, shared_provider: OidcProvider,
                                                                   clock: FakeClock) -> None:
    with pytest.raises(ConfigError) as caught:
        verifier(shared_provider, clock, subject_template=template)
    assert caught.value.key == "oidc_issuers.subject_template"


# --- accepted and rejected tokens --------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    mint: Callable[[OidcProvider, OidcProvider], str]   # (issuer, attacker) -> token
    reason: str | None                                   # None: accepted


def _attack(a: OidcProvider, p: OidcProvider, **headers: object) -> str:
    return a.id_token("alice", AUD, now=NOW, claims={"iss": p.issuer}, headers=headers)


CASES = [
    Case("valid", lambda p, a: p.id_token("alice", AUD, now=NOW), None),
    Case("aud-list-holding-ours-with-our-azp",
         lambda p, a: p.id_token("alice", ["other", AUD], now=NOW, claims={"azp": AUD}), None),
    # OIDC Core errata set 2 dropped the azp rules, and the broker is an STS, not the token's client:
    # workload-identity tokens for several audiences carry no azp, and Google's service-account ID
    # tokens name the requesting account in azp.
    Case("aud-list-without-azp", lambda p, a: p.id_token("alice", ["other", AUD], now=NOW), None),
    Case("azp-of-another-client", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"azp": "other"}), None),
    Case("google-style-azp-is-the-requesting-account",
         lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"azp": "1234567890", "email": "sa@p.iam"}), None),
    Case("azp-ours", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"azp": AUD}), None),
    Case("expired-within-skew", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"exp": NOW - 29}), None),
    Case("alg-none", lambda p, a: p.id_token("alice", AUD, now=NOW, alg="none"), "jwt: alg none is not allowed"),
    Case("hs256-keyed-with-public-key", lambda p, a: p.id_token("alice", AUD, now=NOW, alg="HS256"),
         "jwt: alg HS256 is not allowed"),
    Case("rs256-key-with-alg-es256", lambda p, a: p.id_token("alice", AUD, now=NOW, headers={"alg": "ES256"}),
         "jwt: alg ES256 does not match the key"),
    Case("rs256-jwk-with-ps256", lambda p, a: p.id_token("alice", AUD, now=NOW, alg="PS256"),
         "jwt: alg PS256 does not match the key"),
    Case("embedded-jwk", lambda p, a: _attack(a, p, jwk=a.jwks()["keys"][0], kid=p.jwks()["keys"][0]["kid"]),
         "jwt: bad signature"),
    Case("jku-elsewhere", lambda p, a: _attack(a, p, jku=a.jwks_uri, kid=p.jwks()["keys"][0]["kid"]),
         "jwt: bad signature"),
    Case("attacker-kid", lambda p, a: _attack(a, p), "jwt: unknown kid"),
    Case("wrong-kid", lambda p, a: p.id_token("alice", AUD, now=NOW, kid="not-a-key"), "jwt: unknown kid"),
    Case("crit-header", lambda p, a: p.id_token("alice", AUD, now=NOW, headers={"crit": ["x"], "x": 1}),
         "jwt: crit header is not supported"),
    Case("exp-missing", lambda p, a: p.id_token("alice", AUD, now=NOW, drop=["exp"]), "jwt: exp is required"),
    Case("exp-numeric-string", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"exp": "9999999999"}),
         "jwt: exp must be a number"),
    Case("expired-beyond-skew", lambda p, a: p.id_token("alice", AUD, now=NOW - 400, ttl=300), "jwt: token expired"),
    Case("nbf-in-future", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"nbf": NOW + 120}),
         "jwt: token not yet valid"),
    Case("aud-missing", lambda p, a: p.id_token("alice", AUD, now=NOW, drop=["aud"]), "jwt: aud is required"),
    Case("aud-wrong", lambda p, a: p.id_token("alice", "someone-else", now=NOW), "jwt: audience mismatch"),
    Case("aud-list-without-ours", lambda p, a: p.id_token("alice", ["x", "y"], now=NOW), "jwt: audience mismatch"),
    Case("iss-wrong", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"iss": "https://evil.test"}),
         "jwt: issuer mismatch"),
    Case("iss-trailing-slash", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"iss": p.issuer + "/"}),
         "jwt: issuer mismatch"),
    Case("iss-missing", lambda p, a: p.id_token("alice", AUD, now=NOW, drop=["iss"]), "jwt: iss is required"),
    Case("sub-missing", lambda p, a: p.id_token("alice", AUD, now=NOW, drop=["sub"]), "jwt: sub is required"),
    Case("sub-empty", lambda p, a: p.id_token("", AUD, now=NOW), "oidc: sub must be a non-empty string"),
    Case("sub-with-nul", lambda p, a: p.id_token("ali\x00ce", AUD, now=NOW),
         "oidc: sub must not contain control characters"),
    Case("sub-with-newline", lambda p, a: p.id_token("alice\nbob", AUD, now=NOW),
         "oidc: sub must not contain control characters"),
    Case("sub-not-a-string", lambda p, a: p.id_token("x", AUD, now=NOW, claims={"sub": 42}),
         "jwt: sub must be a string"),
    Case("oversized", lambda p, a: p.id_token("alice", AUD, now=NOW, claims={"pad": "x" * MAX_TOKEN_BYTES}),
         f"jwt: token larger than {MAX_TOKEN_BYTES} bytes"),
    Case("garbage", lambda p, a: "garbage", "jwt: malformed token (expected three dot-separated parts)"),
    Case("bad-base64", lambda p, a: "e30.!!.e30", "jwt: malformed token (bad base64url)"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_id_token(case: Case, shared_provider: OidcProvider, attacker: OidcProvider, clock: FakeClock) -> None:
    v = verifier(shared_provider, clock)
    token = case.mint(shared_provider, attacker)
    if case.reason is None:
        assert verify(v, token).principal == f"oidc:{shared_provider.issuer}#alice"
        return
    with pytest.raises(CredentialRejected) as caught:
        verify(v, token)
    assert caught.value.reason == case.reason


def test_token_of_another_issuer_causes_no_fetch(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    with pytest.raises(CredentialRejected, match="jwt: issuer mismatch"):
        verify(v, provider.id_token("alice", AUD, now=NOW, claims={"iss": "https://evil.test"}))
    assert provider.jwks_requests == 0


def test_alg_none_causes_no_fetch(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    with pytest.raises(CredentialRejected, match="alg none"):
        verify(v, provider.id_token("alice", AUD, now=NOW, alg="none", kid="fresh-kid"))
    assert provider.jwks_requests == 0


# --- fetching, caching, rotation ------------------------------------------------------------


def test_keys_are_fetched_once_and_cached(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    for _ in range(3):
        verify(v, provider.id_token("alice", AUD, now=NOW))
    assert provider.jwks_requests == 1


def test_concurrent_first_verifications_share_one_fetch(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    token = provider.id_token("alice", AUD, now=NOW)

    async def many() -> list:
        return await asyncio.gather(*(v.verify(token, now=NOW) for _ in range(5)))

    assert len(asyncio.run(many())) == 5
    assert provider.jwks_requests == 1


def test_concurrent_verifications_while_the_issuer_is_down_share_one_attempt(provider: OidcProvider,
                                                                              clock: FakeClock) -> None:
    v = verifier(provider, clock, jwks_uri=provider.jwks_uri)
    token = provider.id_token("alice", AUD, now=NOW)
    provider.set_available(False)

    async def many() -> list:
        return await asyncio.gather(*(v.verify(token, now=NOW) for _ in range(5)), return_exceptions=True)

    results = asyncio.run(many())
    assert all(isinstance(r, IssuerUnavailable) for r in results)
    assert provider.jwks_requests == 1


def test_unknown_kid_after_rotation_refetches(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    verify(v, provider.id_token("alice", AUD, now=NOW))
    clock.advance(31)
    provider.rotate_key()

    identity = verify(v, provider.id_token("alice", AUD, now=clock.now()), now=clock.now())

    assert identity.principal.endswith("#alice")
    assert provider.jwks_requests == 2


def test_unknown_kid_refetch_is_rate_limited(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    verify(v, provider.id_token("alice", AUD, now=NOW))
    provider.rotate_key()
    rotated = provider.id_token("alice", AUD, now=NOW)

    for _ in range(2):   # within the interval: refused from the cache, the issuer is not asked again
        with pytest.raises(CredentialRejected, match="jwt: unknown kid"):
            verify(v, rotated)
    assert provider.jwks_requests == 1

    clock.advance(30)
    assert verify(v, rotated, now=clock.now()).principal.endswith("#alice")
    assert provider.jwks_requests == 2

    with pytest.raises(CredentialRejected, match="jwt: unknown kid"):   # a forged kid right after
        verify(v, provider.id_token("alice", AUD, now=NOW, kid="forged"), now=clock.now())
    assert provider.jwks_requests == 2


def test_stale_keys_are_refreshed_and_a_dropped_key_stops_verifying(provider: OidcProvider,
                                                                     clock: FakeClock) -> None:
    v = verifier(provider, clock)
    old = provider.id_token("alice", AUD, now=NOW, ttl=3600)
    verify(v, old)
    provider.rotate_key(keep_old=False)
    clock.advance(301)

    with pytest.raises(CredentialRejected, match="jwt: unknown kid"):
        verify(v, old, now=clock.now())
    assert provider.jwks_requests == 2


# --- issuer unavailable -----------------------------------------------------------------------


def test_issuer_answering_503_is_unavailable(provider: OidcProvider, clock: FakeClock) -> None:
    provider.set_available(False)
    with pytest.raises(IssuerUnavailable) as caught:
        verify(verifier(provider, clock), provider.id_token("alice", AUD, now=NOW))
    assert caught.value.reason == f"oidc: keys of {provider.issuer} unreachable"


def test_issuer_recovers_after_an_outage(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock, jwks_uri=provider.jwks_uri)
    token = provider.id_token("alice", AUD, now=NOW)
    provider.set_available(False)
    with pytest.raises(IssuerUnavailable):
        verify(v, token)

    provider.set_available(True)
    clock.advance(5)   # past the first backoff

    assert verify(v, token, now=clock.now()).principal.endswith("#alice")


def test_cached_keys_keep_serving_while_the_issuer_is_down(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    token = provider.id_token("alice", AUD, now=NOW, ttl=3600)
    verify(v, token)
    provider.set_available(False)
    clock.advance(301)

    assert verify(v, token, now=clock.now()).principal.endswith("#alice")
    assert provider.jwks_requests == 2   # the refresh was tried, and failed


def test_unknown_kid_while_the_issuer_is_down_is_unavailable(provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(provider, clock)
    verify(v, provider.id_token("alice", AUD, now=NOW))
    provider.rotate_key()
    provider.set_available(False)
    clock.advance(31)

    with pytest.raises(IssuerUnavailable):
        verify(v, provider.id_token("alice", AUD, now=NOW), now=clock.now())


def test_closed_port_is_unavailable(shared_provider: OidcProvider, clock: FakeClock) -> None:
    # Bound but never listening, and held for the test: connections are refused, and no other
    # process can take the port meanwhile (a released port could be anyone's by the time we connect).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        issuer = f"http://127.0.0.1:{closed.getsockname()[1]}"
        v = OidcVerifier(OidcIssuerConfig(issuer=issuer, audience=AUD), fetcher=JwksFetcher(clock=clock))
        token = shared_provider.id_token("alice", AUD, now=NOW, claims={"iss": issuer})
        with pytest.raises(IssuerUnavailable):
            verify(v, token)


def test_jwks_uri_not_found_is_unavailable(shared_provider: OidcProvider, clock: FakeClock) -> None:
    v = verifier(shared_provider, clock, jwks_uri=shared_provider.issuer + "/nothing-here")
    with pytest.raises(IssuerUnavailable):
        verify(v, shared_provider.id_token("alice", AUD, now=NOW))


def test_jwks_uri_serving_json_that_is_no_jwk_set_is_unavailable(shared_provider: OidcProvider,
                                                                 clock: FakeClock) -> None:
    v = verifier(shared_provider, clock, jwks_uri=shared_provider.discovery_uri)
    with pytest.raises(IssuerUnavailable):
        verify(v, shared_provider.id_token("alice", AUD, now=NOW))


@pytest.mark.parametrize("issuer_of", [
    lambda p: p.issuer + "/",
    lambda p: p.issuer.replace("127.0.0.1", "localhost"),
], ids=["trailing-slash", "localhost-for-127.0.0.1"])
def test_discovery_naming_another_issuer_is_refused(issuer_of: Callable[[OidcProvider], str],
                                                     shared_provider: OidcProvider, clock: FakeClock) -> None:
    issuer = issuer_of(shared_provider)
    v = OidcVerifier(OidcIssuerConfig(issuer=issuer, audience=AUD), fetcher=JwksFetcher(clock=clock))
    token = shared_provider.id_token("alice", AUD, now=NOW, claims={"iss": issuer})
    with pytest.raises(IssuerUnavailable) as caught:
        verify(v, token)
    assert caught.value.reason == f"oidc: discovery document of {issuer} names another issuer"


class RawServer:
    """An HTTP server answering every GET with the body a test sets, or never answering at all."""

    def __init__(self) -> None:
        self.body = b""
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if owner.body is None:
                    owner.release.wait(10)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.close()


def _fetch(raw: RawServer, clock: FakeClock, **fetcher_kw: object) -> None:
    fetcher = JwksFetcher(clock=clock, **fetcher_kw)  # type: ignore[arg-type]
    asyncio.run(fetcher.key_set("https://issuer.test", raw.url))


@pytest.mark.parametrize("body", [b"not json", b"{", b"[1, 2]", b"x" * (1024 * 1024 + 1)],
                         ids=["garbage", "truncated", "not-an-object", "over-1-mib"])
def test_unusable_jwks_response_is_unavailable(body: bytes, raw: RawServer, clock: FakeClock) -> None:
    raw.body = body
    with pytest.raises(IssuerUnavailable):
        _fetch(raw, clock)


def test_issuer_that_never_answers_times_out(raw: RawServer, clock: FakeClock) -> None:
    raw.body = None  # type: ignore[assignment]
    started = time.monotonic()
    with pytest.raises(IssuerUnavailable):
        _fetch(raw, clock, timeout=0.2)
    assert time.monotonic() - started < 5


# --- configuration ----------------------------------------------------------------------------


def test_jwks_file_that_is_not_a_jwk_set_is_a_config_error(shared_provider: OidcProvider,
                                                          clock: FakeClock, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[]")
    with pytest.raises(ConfigError):
        verifier(shared_provider, clock, jwks_file=path)


def test_plain_http_jwks_uri_off_loopback_is_a_config_error(shared_provider: OidcProvider,
                                                           clock: FakeClock) -> None:
    with pytest.raises(ConfigError):
        verifier(shared_provider, clock, jwks_uri="http://keys.example.com/jwks")


# --- the Verifiers facade -----------------------------------------------------------------------

SVID_ID = "spiffe://example.org/agent"


@dataclass(frozen=True)
class Stack:
    verifiers: Verifiers
    oidc: OidcProvider
    svids: JwtSvidIssuer
    ca: SpiffeCA


@pytest.fixture(scope="module")
def stack(shared_provider: OidcProvider) -> Stack:
    ca = SpiffeCA("example.org")
    svids = JwtSvidIssuer("example.org")
    oidc = OidcVerifier(OidcIssuerConfig(issuer=shared_provider.issuer, audience=AUD),
                        fetcher=JwksFetcher(clock=FakeClock(start=NOW)))
    verifiers = Verifiers(
        x509=X509SvidVerifier({"example.org": [ca.root]}),
        jwt_svid=JwtSvidVerifier({"example.org": svids.jwks()}, audience=AUD),
        oidc=[oidc],
    )
    return Stack(verifiers, shared_provider, svids, ca)


def _token(s: Stack, kind: str) -> str:
    if kind == "oidc":
        return s.oidc.id_token("alice", AUD, now=NOW)
    return s.svids.jwt_svid(SVID_ID, AUD, now=NOW)


@pytest.mark.parametrize("kind,token_type,principal", [
    ("oidc", None, "oidc:{iss}#alice"),
    ("svid", None, SVID_ID),
    ("oidc", TOKEN_TYPE_ID_TOKEN, "oidc:{iss}#alice"),
    ("svid", TOKEN_TYPE_JWT, SVID_ID),
], ids=["oidc-by-iss", "svid-by-default", "oidc-typed", "svid-typed"])
def test_verify_token_dispatches(kind: str, token_type: str | None, principal: str, stack: Stack) -> None:
    identity = asyncio.run(stack.verifiers.verify_token(_token(stack, kind), now=NOW, token_type=token_type))
    assert identity.principal == principal.format(iss=stack.oidc.issuer)


@pytest.mark.parametrize("kind,token_type,reason", [
    ("oidc", TOKEN_TYPE_JWT, "jwt-svid: sub is not a spiffe id"),
    ("svid", TOKEN_TYPE_ID_TOKEN, "oidc: issuer is not configured"),
], ids=["id-token-as-jwt-svid", "jwt-svid-as-id-token"])
def test_verify_token_of_the_wrong_type_is_rejected(kind: str, token_type: str, reason: str, stack: Stack) -> None:
    with pytest.raises(CredentialRejected) as caught:
        asyncio.run(stack.verifiers.verify_token(_token(stack, kind), now=NOW, token_type=token_type))
    assert caught.value.reason == reason


@pytest.mark.parametrize("token_type", [TOKEN_TYPE_ACCESS_TOKEN, "urn:ietf:params:oauth:token-type:saml2", ""])
def test_verify_token_of_another_token_type_is_invalid_request(token_type: str, stack: Stack) -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(stack.verifiers.verify_token(_token(stack, "svid"), now=NOW, token_type=token_type))


def test_jwt_svid_without_bundles_is_rejected(stack: Stack) -> None:
    verifiers = Verifiers(x509=X509SvidVerifier({}), jwt_svid=None, oidc=[])
    with pytest.raises(CredentialRejected, match="jwt-svid: no trust domain has a jwt bundle"):
        asyncio.run(verifiers.verify_token(_token(stack, "svid"), now=NOW))


def test_verify_peer_delegates_to_the_x509_verifier(stack: Stack) -> None:
    svid = stack.ca.x509_svid(SVID_ID, now=NOW)
    identity = stack.verifiers.verify_peer(svid.cert_pem(), [svid.chain_pem()], now=NOW + 1)
    assert identity.principal == SVID_ID
    assert identity.kind is AuthKind.X509_SVID
