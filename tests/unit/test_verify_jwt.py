"""JWT-SVID verification and the rules every incoming JWT obeys (broker.jose.jws)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.domain.errors import CredentialRejected
from broker.domain.identity import AuthKind
from broker.jose.jws import MAX_TOKEN_BYTES, parse_token
from broker.jose.keys import KeySet
from broker.testing.clock import FakeClock
from broker.testing.jwt_issuer import ALGORITHMS, JwtSvidIssuer, public_jwk
from broker.verify.jwtsvid import JwtSvidVerifier

NOW = 1_800_000_000.0
AUD = "spiffe://example.org/broker"
AGENT = "spiffe://example.org/agent/7"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Issuers:
    home: JwtSvidIssuer        # example.org, rotated once: its bundle holds two keys
    other: JwtSvidIssuer       # other.org, also trusted
    attacker: JwtSvidIssuer    # claims example.org, but its keys are in no bundle
    pre_rotation_token: str    # signed by example.org's previous key

    def verifier(self) -> JwtSvidVerifier:
        bundles = {"example.org": self.home.jwks(), "other.org": self.other.jwks()}
        return JwtSvidVerifier(bundles, audience=AUD, clock_skew=30)

    def svid(self, spiffe_id: str = AGENT, audience: str | list[str] = AUD, **kw: object) -> str:
        return self.home.jwt_svid(spiffe_id, audience, now=NOW, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def issuers() -> Issuers:
    home = JwtSvidIssuer("example.org")
    old = home.jwt_svid(AGENT, AUD, now=NOW)
    home.rotate()
    return Issuers(home, JwtSvidIssuer("other.org"), JwtSvidIssuer("example.org"), old)


def replace_part(token: str, index: int, part: str) -> str:
    parts = token.split(".")
    parts[index] = part
    return ".".join(parts)


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_verifies_and_gives_the_workload(algorithm: str) -> None:
    issuer = JwtSvidIssuer("example.org", algorithm=algorithm)
    verifier = JwtSvidVerifier({"example.org": issuer.jwks()}, audience=AUD)

    identity = verifier.verify(issuer.jwt_svid(AGENT, AUD, now=NOW, ttl=300), now=NOW)

    assert identity.principal == AGENT
    assert identity.kind is AuthKind.JWT_SVID
    assert identity.trust_domain == "example.org"
    assert identity.expires_at == NOW + 300
    assert identity.claims["sub"] == AGENT


@dataclass(frozen=True)
class Accept:
    id: str
    mint: Callable[[Issuers], str]


ACCEPTED = [
    Accept("aud-list-holding-ours", lambda i: i.svid(audience=["spiffe://x.org/a", AUD])),
    Accept("expired-within-skew", lambda i: i.svid(claims={"exp": NOW - 29})),
    Accept("nbf-within-skew", lambda i: i.svid(claims={"nbf": NOW + 29})),
    Accept("iat-within-skew", lambda i: i.svid(claims={"iat": NOW + 29})),
    Accept("fractional-exp", lambda i: i.svid(claims={"exp": NOW + 0.5})),
    Accept("old-key-still-in-bundle", lambda i: i.pre_rotation_token),
    Accept("other-trust-domain-own-bundle", lambda i: i.other.jwt_svid("spiffe://other.org/a", AUD, now=NOW)),
    Accept("typ-JWT", lambda i: i.svid(headers={"typ": "JWT"})),
    Accept("typ-JOSE", lambda i: i.svid(headers={"typ": "JOSE"})),
    Accept("typ-absent", lambda i: i.svid(headers={"typ": None})),
    Accept("jku-x5u-ignored", lambda i: i.svid(headers={"jku": "https://evil.test/k", "x5u": "https://evil.test/c"})),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.id)
def test_accepted(case: Accept, issuers: Issuers) -> None:
    identity = issuers.verifier().verify(case.mint(issuers), now=NOW)
    assert identity.principal.startswith("spiffe://")
    assert identity.kind is AuthKind.JWT_SVID


# --- rejected ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reject:
    id: str
    mint: Callable[[Issuers], str]
    reason: str


def _attacker_jwk(i: Issuers) -> dict:
    return i.attacker.jwks()["keys"][0]


REJECTED = [
    # algorithm and key confusion
    Reject("alg-none", lambda i: i.svid(alg="none"), "jwt: alg none is not allowed"),
    Reject("alg-None-spelled-otherwise", lambda i: i.svid(alg="none", headers={"alg": "NoNe"}),
           "jwt: alg none is not allowed"),
    Reject("hs256-keyed-with-public-key", lambda i: i.svid(alg="HS256"), "jwt: alg HS256 is not allowed"),
    Reject("alg-missing", lambda i: i.svid(headers={"alg": None}), "jwt: alg is missing"),
    Reject("alg-unknown-not-echoed", lambda i: i.svid(headers={"alg": "<script>"}), "jwt: alg is not allowed"),
    Reject("es256-token-with-alg-rs256", lambda i: i.svid(headers={"alg": "RS256"}),
           "jwt: alg RS256 does not match the key"),
    Reject("es256-key-with-alg-es384", lambda i: i.svid(headers={"alg": "ES384"}),
           "jwt: alg ES384 does not match the key"),
    # a token cannot bring its own key
    Reject("embedded-jwk-attacker-kid", lambda i: i.attacker.jwt_svid(AGENT, AUD, now=NOW,
           headers={"jwk": _attacker_jwk(i)}), "jwt: unknown kid"),
    Reject("embedded-jwk-victim-kid", lambda i: i.attacker.jwt_svid(AGENT, AUD, now=NOW,
           headers={"jwk": _attacker_jwk(i), "kid": i.home.current_kid}), "jwt: bad signature"),
    Reject("jku-elsewhere", lambda i: i.attacker.jwt_svid(AGENT, AUD, now=NOW,
           headers={"jku": "https://attacker.test/jwks.json", "kid": i.home.current_kid}), "jwt: bad signature"),
    Reject("x5c-attacker", lambda i: i.attacker.jwt_svid(AGENT, AUD, now=NOW,
           headers={"x5c": ["MIIB"], "kid": i.home.current_kid}), "jwt: bad signature"),
    # key selection
    Reject("wrong-kid", lambda i: i.svid(headers={"kid": i.other.current_kid}), "jwt: unknown kid"),
    Reject("kid-missing-with-two-keys", lambda i: i.svid(headers={"kid": None}), "jwt: kid is required"),
    Reject("kid-not-a-string", lambda i: i.svid(headers={"kid": 7}), "jwt: kid must be a string"),
    Reject("crit-header", lambda i: i.svid(headers={"crit": ["exp"], "exp": 1}), "jwt: crit header is not supported"),
    Reject("crit-b64", lambda i: i.svid(headers={"crit": ["b64"], "b64": True}), "jwt: crit header is not supported"),
    # JWT-SVID 2.3: typ, when present, is JWT or JOSE; an access token cannot pose as an identity
    Reject("typ-at+jwt", lambda i: i.svid(headers={"typ": "at+jwt"}), "jwt-svid: typ must be JWT or JOSE"),
    Reject("typ-lower-case-jwt", lambda i: i.svid(headers={"typ": "jwt"}), "jwt-svid: typ must be JWT or JOSE"),
    Reject("typ-not-a-string", lambda i: i.svid(headers={"typ": 1}), "jwt-svid: typ must be JWT or JOSE"),
    Reject("typ-a-list", lambda i: i.svid(headers={"typ": ["JWT"]}), "jwt-svid: typ must be JWT or JOSE"),
    # subject and trust domain
    Reject("sub-not-spiffe", lambda i: i.svid("user@example.org"), "jwt-svid: sub is not a spiffe id"),
    Reject("sub-not-a-string", lambda i: i.svid(claims={"sub": 42}), "jwt-svid: sub is not a spiffe id"),
    Reject("sub-is-the-trust-domain", lambda i: i.svid("spiffe://example.org"),
           "jwt-svid: sub must be a workload's spiffe id (with a path)"),
    Reject("sub-missing", lambda i: i.svid(drop=["sub"]), "jwt: sub is required"),
    Reject("sub-of-untrusted-domain", lambda i: i.svid("spiffe://nowhere.org/a"),
           "jwt-svid: no jwt bundle for the trust domain of sub"),
    Reject("signed-by-other-domain", lambda i: i.other.jwt_svid(AGENT, AUD, now=NOW), "jwt: unknown kid"),
    Reject("signed-by-other-domain-victim-kid", lambda i: i.other.jwt_svid(AGENT, AUD, now=NOW,
           headers={"kid": i.home.current_kid}), "jwt: bad signature"),
    # time
    Reject("exp-missing", lambda i: i.svid(drop=["exp"]), "jwt: exp is required"),
    Reject("exp-null", lambda i: i.svid(claims={"exp": None}), "jwt: exp is required"),
    Reject("exp-numeric-string", lambda i: i.svid(claims={"exp": "9999999999"}), "jwt: exp must be a number"),
    Reject("exp-bool", lambda i: i.svid(claims={"exp": True}), "jwt: exp must be a number"),
    Reject("exp-huge", lambda i: i.svid(claims={"exp": 10**400}), "jwt: exp is out of range"),
    Reject("nbf-numeric-string", lambda i: i.svid(claims={"nbf": "1"}), "jwt: nbf must be a number"),
    Reject("iat-numeric-string", lambda i: i.svid(claims={"iat": "1"}), "jwt: iat must be a number"),
    Reject("expired-beyond-skew", lambda i: i.svid(claims={"exp": NOW - 31}), "jwt: token expired"),
    Reject("expired-at-skew", lambda i: i.svid(claims={"exp": NOW - 30}), "jwt: token expired"),
    Reject("nbf-in-future", lambda i: i.svid(claims={"nbf": NOW + 60}), "jwt: token not yet valid"),
    Reject("iat-in-future", lambda i: i.svid(claims={"iat": NOW + 3600}), "jwt: iat is in the future"),
    # audience
    Reject("aud-missing", lambda i: i.svid(drop=["aud"]), "jwt: aud is required"),
    Reject("aud-empty-list", lambda i: i.svid(audience=[]), "jwt: aud is required"),
    Reject("aud-wrong", lambda i: i.svid(audience="spiffe://example.org/other"), "jwt: audience mismatch"),
    Reject("aud-list-without-ours", lambda i: i.svid(audience=["spiffe://a.org/x", "spiffe://b.org/y"]),
           "jwt: audience mismatch"),
    Reject("aud-prefix-of-ours", lambda i: i.svid(audience=AUD[:-1]), "jwt: audience mismatch"),
    # shape
    Reject("oversized", lambda i: i.svid(claims={"pad": "x" * MAX_TOKEN_BYTES}),
           f"jwt: token larger than {MAX_TOKEN_BYTES} bytes"),
    Reject("empty", lambda i: "", "jwt: token is empty"),
    Reject("garbage", lambda i: "not a token", "jwt: malformed token (expected three dot-separated parts)"),
    Reject("two-parts", lambda i: ".".join(i.svid().split(".")[:2]),
           "jwt: malformed token (expected three dot-separated parts)"),
    Reject("four-parts", lambda i: i.svid() + ".x", "jwt: malformed token (expected three dot-separated parts)"),
    Reject("bad-base64", lambda i: replace_part(i.svid(), 1, "!!!!"), "jwt: malformed token (bad base64url)"),
    Reject("padded-base64", lambda i: replace_part(i.svid(), 0, i.svid().split(".")[0] + "="),
           "jwt: malformed token (bad base64url)"),
    Reject("payload-not-json", lambda i: replace_part(i.svid(), 1, b64(b"nope")),
           "jwt: malformed token (payload is not valid json)"),
    Reject("payload-array", lambda i: replace_part(i.svid(), 1, b64(b"[1]")),
           "jwt: malformed token (payload is not a json object)"),
    Reject("payload-duplicate-claim", lambda i: replace_part(i.svid(), 1, b64(
           b'{"sub":"spiffe://example.org/a","sub":"spiffe://example.org/b"}')),
           "jwt: malformed token (payload is not valid json)"),
    Reject("payload-nan", lambda i: replace_part(i.svid(), 1, b64(b'{"exp":NaN}')),
           "jwt: malformed token (payload is not valid json)"),
    Reject("header-not-json", lambda i: replace_part(i.svid(), 0, b64(b"{")),
           "jwt: malformed token (header is not valid json)"),
    Reject("tampered-payload", lambda i: replace_part(i.svid(), 1, i.svid("spiffe://example.org/admin").split(".")[1]),
           "jwt: bad signature"),
    Reject("signature-stripped", lambda i: replace_part(i.svid(), 2, ""), "jwt: bad signature"),
]


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.id)
def test_rejected(case: Reject, issuers: Issuers) -> None:
    token = case.mint(issuers)
    with pytest.raises(CredentialRejected) as caught:
        issuers.verifier().verify(token, now=NOW)
    assert caught.value.reason == case.reason


def test_rejection_reason_never_contains_the_token(issuers: Issuers) -> None:
    token = issuers.svid(claims={"exp": NOW - 3600})
    with pytest.raises(CredentialRejected) as caught:
        issuers.verifier().verify(token, now=NOW)
    assert token not in str(caught.value)
    assert token.split(".")[2] not in str(caught.value)


# --- time passed in -------------------------------------------------------------------------


def test_fake_clock_drives_expiry_without_sleeping(issuers: Issuers) -> None:
    clock = FakeClock(start=NOW)
    token = issuers.home.jwt_svid(AGENT, AUD, now=clock.now(), ttl=60)
    verifier = issuers.verifier()
    assert verifier.verify(token, now=clock.now()).principal == AGENT

    clock.advance(60 + 30)

    with pytest.raises(CredentialRejected, match="jwt: token expired"):
        verifier.verify(token, now=clock.now())


# --- key sets ---------------------------------------------------------------------------------


def _rsa_issuer_bundle(**jwk_changes: object) -> tuple[JwtSvidIssuer, dict]:
    issuer = JwtSvidIssuer("example.org", algorithm="RS256")
    jwk = {k: v for k, v in issuer.jwks()["keys"][0].items() if k not in jwk_changes}
    jwk.update({k: v for k, v in jwk_changes.items() if v is not None})
    return issuer, {"keys": [jwk]}


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_rsa_key_without_alg_accepts_every_rsa_algorithm(alg: str) -> None:
    issuer, bundle = _rsa_issuer_bundle(alg=None)
    verifier = JwtSvidVerifier({"example.org": bundle}, audience=AUD)
    assert verifier.verify(issuer.jwt_svid(AGENT, AUD, now=NOW, alg=alg), now=NOW).principal == AGENT


def test_jwk_alg_restricts_the_key_to_that_algorithm() -> None:
    issuer, bundle = _rsa_issuer_bundle(alg="RS256")
    verifier = JwtSvidVerifier({"example.org": bundle}, audience=AUD)
    with pytest.raises(CredentialRejected, match="jwt: alg PS256 does not match the key"):
        verifier.verify(issuer.jwt_svid(AGENT, AUD, now=NOW, alg="PS256"), now=NOW)


def test_single_key_without_kid_verifies_a_token_without_kid() -> None:
    issuer = JwtSvidIssuer("example.org")
    bundle = {"keys": [{k: v for k, v in issuer.jwks()["keys"][0].items() if k != "kid"}]}
    verifier = JwtSvidVerifier({"example.org": bundle}, audience=AUD)
    token = issuer.jwt_svid(AGENT, AUD, now=NOW, headers={"kid": None})
    assert verifier.verify(token, now=NOW).principal == AGENT


def test_key_set_keeps_only_public_signature_keys() -> None:
    issuer = JwtSvidIssuer("example.org")
    good = issuer.jwks()["keys"][0]
    jwks = {"keys": [
        {"kty": "oct", "k": b64(b"secret" * 8), "kid": "hmac"},
        {**good, "kid": "enc", "use": "enc"},
        {"kty": "EC", "crv": "P-256", "kid": "broken", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": good["x"]},
        "not an object",
        good,
    ]}
    keys = KeySet.from_jwks(jwks)
    assert len(keys) == 1
    assert good["kid"] in keys
    assert "hmac" not in keys


def test_private_members_of_a_jwk_are_ignored() -> None:
    issuer = JwtSvidIssuer("example.org")
    leaked = {**issuer.jwks()["keys"][0], "d": b64(b"\x01" * 32)}
    verifier = JwtSvidVerifier({"example.org": {"keys": [leaked]}}, audience=AUD)
    assert verifier.verify(issuer.jwt_svid(AGENT, AUD, now=NOW), now=NOW).principal == AGENT


@pytest.mark.parametrize("document", [[], {"keys": "x"}, {"nokeys": []}, "text"], ids=repr)
def test_a_bundle_that_is_not_a_jwk_set_is_refused(document: object) -> None:
    with pytest.raises(ValueError, match="not a jwk set"):
        JwtSvidVerifier({"example.org": document}, audience=AUD)  # type: ignore[dict-item]


def test_parse_token_reads_header_without_trusting_it(issuers: Issuers) -> None:
    parsed = parse_token(issuers.svid())
    assert parsed.alg == "ES256"
    assert parsed.kid == issuers.home.current_kid
    assert parsed.payload["sub"] == AGENT


def test_rsa_key_below_2048_bits_is_not_acceptable() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwk = public_jwk(weak, "RS256")
    issuer = JwtSvidIssuer("example.org", algorithm="RS256")
    verifier = JwtSvidVerifier({"example.org": {"keys": [jwk]}}, audience=AUD)
    token = issuer.jwt_svid(AGENT, AUD, now=NOW, key=weak, headers={"kid": jwk["kid"]})
    with pytest.raises(CredentialRejected, match="jwt: key is not acceptable"):
        verifier.verify(token, now=NOW)
