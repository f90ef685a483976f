"""The broker's own access tokens: minting, keys, rotation and verification of its own tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm

from broker.domain.errors import CredentialRejected
from broker.jose.jws import MAX_TOKEN_BYTES
from broker.jose.keys import SigningKey, jwk_thumbprint
from broker.testing.clock import FakeClock
from broker.tokens.minter import TokenMinter

ISSUER = "spiffe://broker.example/broker"
T0 = 1_800_000_000.0
ALGORITHMS = ["ES256", "EdDSA"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def claims(now: float = T0, **overrides: Any) -> dict[str, Any]:
    base = {
        "iss": ISSUER,
        "sub": "spiffe://example.org/agent/7",
        "aud": "https://api.example",
        "exp": int(now) + 300,
        "iat": int(now),
        "nbf": int(now),
        "jti": "lease-1",
        "client_id": "spiffe://example.org/agent/7",
        "scope": "repo:read repo:merge",
        "resource": "repo:org/app",
        "txn": "task-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def forge(key: SigningKey, payload: bytes | dict[str, Any], **header: Any) -> str:
    """Sign arbitrary header fields and payload bytes with `key`, as an attacker with the key could."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    merged = {"typ": "at+jwt", "kid": key.kid, **header}
    # a None typ makes PyJWS leave typ out; a None anything else is left out here
    headers = {k: v for k, v in merged.items() if v is not None or k == "typ"}
    return jwt.PyJWS().encode(raw, key.private_key, algorithm=header.get("alg", key.algorithm), headers=headers)


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    h = b64url(json.dumps(header).encode())
    p = b64url(json.dumps(payload).encode())
    return f"{h}.{p}.{b64url(signature)}"


@pytest.fixture(params=ALGORITHMS)
def key(request: pytest.FixtureRequest) -> SigningKey:
    return SigningKey.generate(request.param)


@pytest.fixture
def es_key() -> SigningKey:
    return SigningKey.generate("ES256")


@pytest.fixture
def minter(es_key: SigningKey) -> TokenMinter:
    return TokenMinter(ISSUER, es_key)


# --- minting and keys -------------------------------------------------------------------


def test_mint_then_verify_round_trips(key: SigningKey) -> None:
    minter = TokenMinter(ISSUER, key)
    assert minter.verify(minter.mint(claims()), now=T0) == claims()


def test_header_is_at_jwt_with_kid_and_the_key_alg(key: SigningKey) -> None:
    token = TokenMinter(ISSUER, key).mint(claims())
    assert jwt.get_unverified_header(token) == {"alg": key.algorithm, "kid": key.kid, "typ": "at+jwt"}


def test_mint_keeps_claims_as_given(minter: TokenMinter) -> None:
    given = claims(act={"sub": "spiffe://example.org/sub-agent"}, cnf={"x5t#S256": "abc"})
    payload = json.loads(b64url_decode(minter.mint(given).split(".")[1]))
    assert payload == given


def test_mint_refuses_a_non_standard_json_claim(minter: TokenMinter) -> None:
    with pytest.raises(ValueError):
        minter.mint(claims(exp=float("nan")))


def test_jwks_holds_the_current_public_key(key: SigningKey) -> None:
    jwks = TokenMinter(ISSUER, key).jwks()
    expected = {"kty", "crv", "x", "kid", "alg", "use"} | ({"y"} if key.algorithm == "ES256" else set())
    assert [set(k) for k in jwks["keys"]] == [expected]
    assert jwks["keys"][0]["kid"] == key.kid
    assert jwks["keys"][0]["alg"] == key.algorithm
    assert jwks["keys"][0]["use"] == "sig"


def test_jwks_has_no_private_member_anywhere(key: SigningKey) -> None:
    minter = TokenMinter(ISSUER, key)
    minter.rotate(keep_previous_until=T0 + 60)
    published = json.loads(minter.jwks_json())
    assert all("d" not in k for k in published["keys"])
    assert '"d"' not in minter.jwks_json()


def test_jwks_json_equals_jwks(minter: TokenMinter) -> None:
    assert json.loads(minter.jwks_json()) == minter.jwks()


def test_a_relying_party_verifies_tokens_with_the_published_jwk(key: SigningKey) -> None:
    minter = TokenMinter(ISSUER, key)
    published = jwt.PyJWK(minter.jwks()["keys"][0])
    decoded = jwt.decode(
        minter.mint(claims()),
        published,
        algorithms=[key.algorithm],
        audience="https://api.example",
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert decoded["jti"] == "lease-1"


def test_jwk_thumbprint_matches_the_rfc7638_example() -> None:
    # RFC 7638 section 3.1
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZ"
        "CiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7"
        "d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-c"
        "sFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_ed25519_kid_matches_the_rfc8037_example() -> None:
    # RFC 8037 appendix A.1 (private key) and A.3 (its thumbprint)
    d = b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
    key = SigningKey.from_private_key(ed25519.Ed25519PrivateKey.from_private_bytes(d), "EdDSA")
    assert key.public_jwk()["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert key.kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_ec_kid_hashes_the_required_members_in_order(es_key: SigningKey) -> None:
    ref = json.loads(ECAlgorithm.to_jwk(es_key.private_key.public_key()))
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{ref["x"]}","y":"{ref["y"]}"}}'
    assert es_key.kid == b64url(hashlib.sha256(canonical.encode()).digest())


def test_ec_coordinates_keep_their_leading_zero_bytes() -> None:
    # about one key in 128 has a coordinate below 2**248; its JWK member must still be 32 bytes
    for _ in range(5000):
        private = ec.generate_private_key(ec.SECP256R1())
        numbers = private.public_key().public_numbers()
        if numbers.x < 2**248 or numbers.y < 2**248:
            break
    else:
        raise AssertionError("no key with a short coordinate in 5000 tries")
    jwk = SigningKey.from_private_key(private).public_jwk()
    ref = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    assert (len(b64url_decode(jwk["x"])), len(b64url_decode(jwk["y"]))) == (32, 32)
    assert (jwk["x"], jwk["y"]) == (ref["x"], ref["y"])


def test_signing_key_refuses_a_kid_that_is_not_its_thumbprint(es_key: SigningKey) -> None:
    with pytest.raises(ValueError, match="thumbprint"):
        SigningKey(kid="k1", algorithm="ES256", private_key=es_key.private_key)


def test_generate_refuses_an_unsupported_algorithm() -> None:
    with pytest.raises(ValueError, match="unsupported signing algorithm 'RS256'"):
        SigningKey.generate("RS256")


def test_signing_key_repr_shows_no_key_material(es_key: SigningKey) -> None:
    assert "private" not in repr(es_key).lower()


# --- verification: what is refused -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ctx:
    key: SigningKey
    minter: TokenMinter


@dataclass(frozen=True, slots=True)
class Refusal:
    id: str
    token: Callable[[Ctx], str]
    rule: str


def _other_key_same_kid(c: Ctx) -> str:
    return forge(SigningKey.generate("ES256"), claims(), kid=c.key.kid)


def _hs256_with_public_key(c: Ctx) -> str:
    secret = c.key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": c.key.kid}
    signing_input = unsigned(header, claims()).rsplit(".", 1)[0]
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def _tampered(c: Ctx) -> str:
    header, _, signature = c.minter.mint(claims()).split(".")
    return f"{header}.{b64url(json.dumps(claims(sub='spiffe://example.org/admin')).encode())}.{signature}"


def _non_canonical_signature(c: Ctx) -> str:
    head, signature = c.minter.mint(claims()).rsplit(".", 1)
    raw = b64url_decode(signature)
    for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_":
        variant = signature[:-1] + ch
        if variant != signature and b64url_decode(variant) == raw:
            return f"{head}.{variant}"
    raise AssertionError("no alias for the last character")


MALFORMED_PARTS = "malformed token (expected three dot-separated parts)"

REFUSALS = [
    Refusal("other-key", lambda c: TokenMinter(ISSUER, SigningKey.generate()).mint(claims()), "unknown kid"),
    Refusal("other-key-same-kid", _other_key_same_kid, "bad signature"),
    Refusal("tampered-claims", _tampered, "bad signature"),
    Refusal(
        "alg-none",
        lambda c: unsigned({"alg": "none", "typ": "at+jwt", "kid": c.key.kid}, claims()),
        "alg none is not allowed",
    ),
    Refusal("hs256-with-public-key", _hs256_with_public_key, "alg HS256 is not allowed"),
    Refusal(
        "eddsa-signed-with-es256-kid",
        lambda c: forge(SigningKey.generate("EdDSA"), claims(), kid=c.key.kid),
        "alg must be ES256",
    ),
    Refusal("unknown-kid", lambda c: forge(c.key, claims(), kid="no-such-kid"), "unknown kid"),
    Refusal("no-kid", lambda c: forge(c.key, claims(), kid=None), "kid is required"),
    Refusal(
        "kid-not-string",
        lambda c: unsigned({"alg": "ES256", "typ": "at+jwt", "kid": 7}, claims()),
        "kid must be a string",
    ),
    Refusal("empty-signature", lambda c: c.minter.mint(claims()).rsplit(".", 1)[0] + ".", "bad signature"),
    Refusal("typ-jwt", lambda c: forge(c.key, claims(), typ="JWT"), "typ must be at+jwt"),
    Refusal("no-typ", lambda c: forge(c.key, claims(), typ=None), "typ must be at+jwt"),
    Refusal("crit", lambda c: forge(c.key, claims(), crit=["exp"]), "crit header is not supported"),
    Refusal("wrong-iss", lambda c: c.minter.mint(claims(iss="https://evil.example")), "iss does not match"),
    Refusal("no-iss", lambda c: c.minter.mint(claims(iss=None)), "iss is required"),
    Refusal("no-exp", lambda c: c.minter.mint(claims(exp=None)), "exp is required"),
    Refusal("exp-string", lambda c: c.minter.mint(claims(exp=str(int(T0) + 300))), "exp must be a number"),
    Refusal("exp-bool", lambda c: c.minter.mint(claims(exp=True)), "exp must be a number"),
    Refusal(
        "exp-overflows-to-infinity",
        lambda c: forge(c.key, json.dumps(claims(exp=0)).replace('"exp": 0', '"exp": 1e400').encode()),
        "exp is out of range",
    ),
    Refusal(
        "exp-nan",
        lambda c: forge(c.key, json.dumps(claims(exp=0)).replace('"exp": 0', '"exp": NaN').encode()),
        "malformed token (payload is not valid json)",
    ),
    Refusal("nbf-string", lambda c: c.minter.mint(claims(nbf=str(int(T0)))), "nbf must be a number"),
    Refusal("no-iat", lambda c: c.minter.mint(claims(iat=None)), "iat is required"),
    Refusal("no-jti", lambda c: c.minter.mint(claims(jti=None)), "jti is required"),
    Refusal("no-sub", lambda c: c.minter.mint(claims(sub=None)), "sub is required"),
    Refusal("empty-sub", lambda c: c.minter.mint(claims(sub="")), "sub must be a non-empty string"),
    Refusal("no-aud", lambda c: c.minter.mint(claims(aud=None)), "aud is required"),
    Refusal("aud-number", lambda c: c.minter.mint(claims(aud=7)), "aud must be a string or a list of strings"),
    Refusal("claims-not-object", lambda c: forge(c.key, b"[1, 2]"), "malformed token (payload is not a json object)"),
    Refusal(
        "oversized",
        lambda c: c.minter.mint(claims(pad="x" * MAX_TOKEN_BYTES)),
        f"token larger than {MAX_TOKEN_BYTES} bytes",
    ),
    Refusal("garbage", lambda c: "not a token", MALFORMED_PARTS),
    Refusal("empty", lambda c: "", "token is empty"),
    Refusal("two-segments", lambda c: c.minter.mint(claims()).rsplit(".", 1)[0], MALFORMED_PARTS),
    Refusal("four-segments", lambda c: c.minter.mint(claims()) + ".AAAA", MALFORMED_PARTS),
    Refusal("non-ascii", lambda c: c.minter.mint(claims()) + "é", "malformed token (bad base64url)"),
    Refusal(
        "header-not-json",
        lambda c: "bm90IGpzb24." + c.minter.mint(claims()).split(".", 1)[1],
        "malformed token (header is not valid json)",
    ),
    Refusal("non-canonical-base64", _non_canonical_signature, "malformed token (bad base64url)"),
    # One JWS layer for incoming and own tokens: a duplicate member is a second reading of the claims.
    Refusal(
        "duplicate-member",
        lambda c: forge(c.key, json.dumps(claims())[:-1].encode() + b', "sub": "spiffe://example.org/admin"}'),
        "malformed token (payload is not valid json)",
    ),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_verify_refuses(case: Refusal, es_key: SigningKey, minter: TokenMinter) -> None:
    token = case.token(Ctx(es_key, minter))
    with pytest.raises(CredentialRejected) as info:
        minter.verify(token, now=T0)
    assert info.value.reason == f"broker token: {case.rule}"


def test_verify_refuses_a_non_string() -> None:
    minter = TokenMinter(ISSUER, SigningKey.generate())
    with pytest.raises(CredentialRejected, match="malformed"):
        minter.verify(b"a.b.c", now=T0)  # type: ignore[arg-type]


def test_a_token_at_the_size_cap_still_verifies(minter: TokenMinter) -> None:
    base = len(minter.mint(claims(pad="")))
    # each 3 bytes of padding claim add 4 base64url characters
    token = minter.mint(claims(pad="x" * ((MAX_TOKEN_BYTES - base) // 4 * 3)))
    assert len(token) <= MAX_TOKEN_BYTES
    assert minter.verify(token, now=T0)["jti"] == "lease-1"


# --- verification: time -------------------------------------------------------------------


def test_token_expires_at_exp(minter: TokenMinter) -> None:
    clock = FakeClock(start=T0)
    token = minter.mint(claims(clock.now(), exp=int(T0) + 60))
    assert minter.verify(token, now=clock.advance(59))["jti"] == "lease-1"
    with pytest.raises(CredentialRejected, match="broker token: token expired"):
        minter.verify(token, now=clock.advance(1))


def test_leeway_extends_past_exp(minter: TokenMinter) -> None:
    clock = FakeClock(start=T0)
    token = minter.mint(claims(exp=int(T0) + 60))
    clock.advance(70)
    assert minter.verify(token, now=clock.now(), leeway=30)["jti"] == "lease-1"
    with pytest.raises(CredentialRejected, match="expired"):
        minter.verify(token, now=clock.now(), leeway=5)


def test_future_nbf_is_not_yet_valid(minter: TokenMinter) -> None:
    token = minter.mint(claims(nbf=int(T0) + 120))
    with pytest.raises(CredentialRejected, match="broker token: token not yet valid"):
        minter.verify(token, now=T0)


def test_leeway_accepts_nbf_within_skew(minter: TokenMinter) -> None:
    token = minter.mint(claims(nbf=int(T0) + 20))
    assert minter.verify(token, now=T0, leeway=30)["jti"] == "lease-1"


def test_verify_reads_time_only_from_now(minter: TokenMinter) -> None:
    # a token that expired decades ago by the wall clock verifies at a `now` before its exp
    token = minter.mint(claims(now=1_000_000_000.0))
    assert minter.verify(token, now=1_000_000_100.0)["jti"] == "lease-1"


# --- rotation -----------------------------------------------------------------------------


def test_rotate_puts_the_new_key_first_and_keeps_the_old_one(minter: TokenMinter, es_key: SigningKey) -> None:
    new_kid = minter.rotate(keep_previous_until=T0 + 600)
    assert minter.current_kid == new_kid != es_key.kid
    assert [k["kid"] for k in minter.jwks()["keys"]] == [new_kid, es_key.kid]


def test_tokens_after_rotation_carry_the_new_kid(minter: TokenMinter) -> None:
    new_kid = minter.rotate(keep_previous_until=T0 + 600)
    assert jwt.get_unverified_header(minter.mint(claims()))["kid"] == new_kid


def test_old_key_verifies_until_keep_previous_until(minter: TokenMinter) -> None:
    clock = FakeClock(start=T0)
    old = minter.mint(claims(exp=int(T0) + 3600))
    minter.rotate(keep_previous_until=T0 + 600)
    assert minter.verify(old, now=clock.advance(599))["jti"] == "lease-1"
    with pytest.raises(CredentialRejected, match="unknown kid"):
        minter.verify(old, now=clock.advance(1))


def test_prune_drops_the_old_key_after_its_keep_time(minter: TokenMinter, es_key: SigningKey) -> None:
    minter.rotate(keep_previous_until=T0 + 600)
    minter.prune(now=T0 + 599)
    assert es_key.kid in [k["kid"] for k in minter.jwks()["keys"]]
    minter.prune(now=T0 + 600)
    assert [k["kid"] for k in minter.jwks()["keys"]] == [minter.current_kid]


def test_rotate_without_keep_time_stops_every_earlier_token_at_once(minter: TokenMinter) -> None:
    first = minter.mint(claims())
    minter.rotate(keep_previous_until=T0 + 600)
    second = minter.mint(claims())
    minter.rotate(keep_previous_until=None)
    assert [k["kid"] for k in minter.jwks()["keys"]] == [minter.current_kid]
    for token in (first, second):
        with pytest.raises(CredentialRejected, match="unknown kid"):
            minter.verify(token, now=T0)


def test_rotate_to_a_given_key_of_another_algorithm() -> None:
    minter = TokenMinter(ISSUER, SigningKey.generate("ES256"))
    new = SigningKey.generate("EdDSA")
    assert minter.rotate(new, keep_previous_until=T0 + 60) == new.kid
    assert jwt.get_unverified_header(minter.mint(claims()))["alg"] == "EdDSA"
    assert minter.verify(minter.mint(claims()), now=T0)["jti"] == "lease-1"


def test_rotate_generates_a_key_of_the_current_algorithm() -> None:
    minter = TokenMinter(ISSUER, SigningKey.generate("EdDSA"))
    minter.rotate()
    assert minter.jwks()["keys"][0]["alg"] == "EdDSA"


def test_rotate_refuses_a_key_already_in_use(minter: TokenMinter, es_key: SigningKey) -> None:
    with pytest.raises(ValueError, match="already in use"):
        minter.rotate(es_key)


# --- loading keys ---------------------------------------------------------------------------


def _pem(
    private: Any, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8, password: bytes | None = None
) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return private.private_bytes(serialization.Encoding.PEM, fmt, encryption)


@dataclass(frozen=True, slots=True)
class LoadOk:
    id: str
    pem: Callable[[], tuple[bytes, Any]]  # (file content, the private key)
    algorithm: str


def _p256_pkcs8() -> tuple[bytes, Any]:
    k = ec.generate_private_key(ec.SECP256R1())
    return _pem(k), k


def _p256_traditional() -> tuple[bytes, Any]:
    k = ec.generate_private_key(ec.SECP256R1())
    return _pem(k, serialization.PrivateFormat.TraditionalOpenSSL), k


def _ed25519() -> tuple[bytes, Any]:
    k = ed25519.Ed25519PrivateKey.generate()
    return _pem(k), k


LOADS_OK = [
    LoadOk("p256-pkcs8-es256", _p256_pkcs8, "ES256"),
    LoadOk("p256-traditional-es256", _p256_traditional, "ES256"),
    LoadOk("ed25519-pkcs8-eddsa", _ed25519, "EdDSA"),
]


@pytest.mark.parametrize("case", LOADS_OK, ids=[c.id for c in LOADS_OK])
def test_load_reads_a_pem_key(case: LoadOk, tmp_path: Path) -> None:
    content, private = case.pem()
    path = tmp_path / "signing.pem"
    path.write_bytes(content)
    loaded = SigningKey.load(path, case.algorithm)
    assert loaded.kid == SigningKey.from_private_key(private, case.algorithm).kid
    assert loaded.algorithm == case.algorithm


def test_a_loaded_key_signs_tokens_that_verify(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    path.write_bytes(_p256_pkcs8()[0])
    minter = TokenMinter(ISSUER, SigningKey.load(path))
    assert minter.verify(minter.mint(claims()), now=T0)["jti"] == "lease-1"


@dataclass(frozen=True, slots=True)
class LoadRefused:
    id: str
    content: Callable[[], bytes]
    algorithm: str
    message: str


LOADS_REFUSED = [
    LoadRefused(
        "rsa-for-es256",
        lambda: _pem(rsa.generate_private_key(65537, 2048)),
        "ES256",
        "ES256 needs an EC P-256 private key, got RSA",
    ),
    LoadRefused(
        "p384-for-es256",
        lambda: _pem(ec.generate_private_key(ec.SECP384R1())),
        "ES256",
        "ES256 needs an EC P-256 private key, got EC secp384r1",
    ),
    LoadRefused("ed25519-for-es256", lambda: _ed25519()[0], "ES256", "ES256 needs an EC P-256 private key"),
    LoadRefused("p256-for-eddsa", lambda: _p256_pkcs8()[0], "EdDSA", "EdDSA needs an Ed25519 private key"),
    LoadRefused(
        "encrypted", lambda: _pem(ec.generate_private_key(ec.SECP256R1()), password=b"pw"), "ES256", "is encrypted"
    ),
    LoadRefused(
        "public-key",
        lambda: (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
        "ES256",
        "is not a PEM private key",
    ),
    LoadRefused("garbage", lambda: b"not a key\n", "ES256", "is not a PEM private key"),
    LoadRefused("unsupported-algorithm", lambda: _p256_pkcs8()[0], "RS256", "unsupported signing algorithm"),
]


@pytest.mark.parametrize("case", LOADS_REFUSED, ids=[c.id for c in LOADS_REFUSED])
def test_load_refuses(case: LoadRefused, tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    path.write_bytes(case.content())
    with pytest.raises(ValueError, match=case.message):
        SigningKey.load(path, case.algorithm)


def test_load_of_a_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read signing key"):
        SigningKey.load(tmp_path / "absent.pem")
