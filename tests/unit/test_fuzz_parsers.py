"""Fuzzing the parsers that see untrusted input: only the documented error classes may come out.

The SPIFFE ID parser must answer `InvalidSpiffeId` or a value that prints back to its input;
token parsing (`parse_token`), the minter's `verify` and the identity verifiers must answer
`CredentialRejected` (or an `Identity` / claims) for any text and for any header and claims
signed with a trusted key, never another exception.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from broker.config.settings import OidcIssuerConfig
from broker.domain.errors import CredentialRejected, InvalidSpiffeId
from broker.domain.identity import SpiffeId, TrustDomain
from broker.jose.jws import MAX_TOKEN_BYTES, parse_token
from broker.jose.keys import SigningKey
from broker.testing.jwt_issuer import JwtSvidIssuer, public_jwk, sign_compact
from broker.testing.x509_ca import SpiffeCA
from broker.tokens.minter import TokenMinter
from broker.verify import JwtSvidVerifier, OidcVerifier, Verifiers, X509SvidVerifier
from tests.support.properties import bounded

T0 = 1_750_000_000
TD = "example.org"
AUDIENCE = f"spiffe://{TD}/broker"
OIDC_ISSUER = "https://idp.example.com"

# -- strategies ----------------------------------------------------------------------------

_SPIFFE_ALPHABET = st.sampled_from("abcz09.-_/:%@AZ \x00é\U0001f600\ud800")
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_CLAIM_NAMES = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "azp", "scope", "client_id", "txn", "act", "cnf")
_HEADER_NAMES = ("alg", "kid", "typ", "crit", "jku", "x5u", "jwk", "cty", "b64")
_ALGS = ("ES256", "RS256", "EdDSA", "HS256", "none", "NONE", "ES384", "", "PS256")


def _overrides(names: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        st.sampled_from(names) | st.text(max_size=4), json_values | st.sampled_from(_ALGS), max_size=4
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def spiffe_like(draw: st.DrawFn) -> str:
    """Text near the grammar: a scheme (often right), a trust domain and path made of edge characters."""
    scheme = draw(st.sampled_from(["spiffe://", "SPIFFE://", "spiffe:/", "", "spiffe://spiffe://"]))
    body = draw(st.text(alphabet=_SPIFFE_ALPHABET, max_size=40))
    return scheme + body


@st.composite
def json_segments(draw: st.DrawFn) -> str:
    """Three base64url segments of which the first two are often JSON (objects or not)."""
    parts = []
    for _ in range(2):
        raw = draw(
            st.one_of(
                json_values.map(lambda v: json.dumps(v).encode()),
                st.binary(max_size=30),
                st.just(b'{"alg":"ES256","alg":"none"}'),
                st.just(b'{"exp": NaN}'),
            )
        )
        parts.append(_b64(raw))
    parts.append(draw(st.text(alphabet="ABCabc019-_=+/.", max_size=20)))
    return ".".join(parts)


tokens_of_any_shape = st.one_of(
    st.text(max_size=60),
    json_segments(),
    st.text(alphabet="ab.=-_", max_size=30),
    st.just("a" * (MAX_TOKEN_BYTES + 1)),
)

# -- the SPIFFE ID parser ------------------------------------------------------------------


@bounded(400)
@given(st.one_of(spiffe_like(), st.text(max_size=50)))
def test_spiffe_id_parse_refuses_with_invalid_spiffe_id_or_round_trips(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeId as e:
        assert e.reason
        return
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed


@bounded(200)
@given(st.one_of(spiffe_like(), st.text(max_size=50)))
def test_trust_domain_parse_refuses_with_invalid_spiffe_id_or_round_trips(text: str) -> None:
    try:
        domain = TrustDomain.parse(text)
    except InvalidSpiffeId:
        return
    assert text in (domain.name, str(domain.id()))


@pytest.mark.parametrize("value", [None, b"spiffe://example.org/a", 7, ["spiffe://example.org/a"]], ids=repr)
def test_spiffe_id_parse_of_a_non_string_is_invalid_spiffe_id(value: Any) -> None:
    with pytest.raises(InvalidSpiffeId, match="not a string"):
        SpiffeId.parse(value)


# -- token parsing -------------------------------------------------------------------------


@bounded(400)
@given(tokens_of_any_shape)
def test_parse_token_refuses_with_credential_rejected_only(token: str) -> None:
    try:
        parsed = parse_token(token)
    except CredentialRejected as e:
        assert e.reason.startswith("jwt: ")
        return
    assert isinstance(parsed.header, dict) and isinstance(parsed.payload, dict)
    assert isinstance(parsed.alg, str)


@pytest.fixture(scope="module")
def signers() -> dict[str, Any]:
    """One JWT-SVID issuer, one OIDC signing key, one minter key: made once (keys are slow)."""
    svid = JwtSvidIssuer(TD)
    minter_key = SigningKey.generate()
    return {"svid": svid, "minter_key": minter_key, "minter": TokenMinter(AUDIENCE, minter_key)}


@pytest.fixture(scope="module")
def verifiers(signers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Verifiers:
    svid: JwtSvidIssuer = signers["svid"]
    folder: Path = tmp_path_factory.mktemp("fuzz")
    jwks_file = folder / "oidc.jwks"
    # The OIDC issuer trusts the same key, so tokens built for it reach every claim check.
    jwks_file.write_text(json.dumps(svid.jwks()))
    oidc = OidcVerifier(OidcIssuerConfig(issuer=OIDC_ISSUER, audience=AUDIENCE, jwks_file=jwks_file))
    ca = SpiffeCA(TD, now=T0)
    return Verifiers(
        x509=X509SvidVerifier({TD: [ca.root]}),
        jwt_svid=JwtSvidVerifier({TD: svid.jwks()}, audience=AUDIENCE, clock_skew=30),
        oidc=[oidc],
    )


def _svid_private_key(svid: JwtSvidIssuer) -> Any:
    return svid._ring.current.private_key  # the test kit keeps it; tests sign odd headers with it


@st.composite
def signed_tokens(draw: st.DrawFn, kid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A header and claims that start valid and have some members replaced by arbitrary JSON."""
    iss = draw(st.sampled_from([OIDC_ISSUER, "", "https://other.example", AUDIENCE]))
    claims: dict[str, Any] = {
        "iss": iss,
        "sub": draw(st.sampled_from([f"spiffe://{TD}/agent/a", f"spiffe://{TD}", "spiffe://other.org/x", "alice"])),
        "aud": draw(st.sampled_from([AUDIENCE, [AUDIENCE, "x"], "other"])),
        "exp": T0 + 300,
        "iat": T0,
    }
    claims.update(draw(_overrides(_CLAIM_NAMES)))
    header: dict[str, Any] = {"alg": "ES256", "kid": kid, "typ": draw(st.sampled_from(["JWT", "at+jwt", "JOSE"]))}
    header.update(draw(_overrides(_HEADER_NAMES)))
    return header, claims


@bounded(300)
@given(data=st.data())
def test_verifiers_refuse_any_signed_header_and_claims_with_credential_rejected_only(
    data: st.DataObject, signers: dict[str, Any], verifiers: Verifiers
) -> None:
    svid: JwtSvidIssuer = signers["svid"]
    header, claims = data.draw(signed_tokens(svid.current_kid))
    try:
        token = sign_compact(header, claims, alg="ES256", key=_svid_private_key(svid))
    except (TypeError, ValueError):
        return  # not serialisable as JSON: nobody can send it
    try:
        identity = asyncio.run(verifiers.verify_token(token, now=T0))
    except CredentialRejected as e:
        assert e.reason and token not in e.reason
        event(e.reason)
        return
    event("accepted")
    assert identity.expires_at > T0 - 30
    assert claims["aud"] == AUDIENCE or AUDIENCE in claims["aud"]


@bounded(300)
@given(data=st.data())
def test_minter_verify_refuses_any_signed_header_and_claims_with_credential_rejected_only(
    data: st.DataObject, signers: dict[str, Any]
) -> None:
    key: SigningKey = signers["minter_key"]
    minter: TokenMinter = signers["minter"]
    header, claims = data.draw(signed_tokens(key.kid))
    # Mostly what the minter itself writes, so the later claim checks are reached too.
    if data.draw(st.booleans()):
        header.setdefault("typ", "at+jwt")
        header["typ"] = data.draw(st.sampled_from(["at+jwt", header["typ"]]))
        claims = {"iss": AUDIENCE, "jti": "lse_1", "sub": f"spiffe://{TD}/agent/a", **claims}
        claims["iss"] = data.draw(st.sampled_from([AUDIENCE, claims["iss"]]))
    try:
        token = sign_compact(header, claims, alg="ES256", key=key.private_key)
    except (TypeError, ValueError):
        return
    try:
        verified = minter.verify(token, now=T0)
    except CredentialRejected as e:
        assert e.reason.startswith("broker token: ")
        event(e.reason)
        return
    event("accepted")
    assert verified["iss"] == AUDIENCE
    assert header["typ"] == "at+jwt"


@bounded(300)
@given(token=tokens_of_any_shape)
def test_minter_and_verifiers_refuse_unsigned_text_with_credential_rejected_only(
    token: str, signers: dict[str, Any], verifiers: Verifiers
) -> None:
    with pytest.raises(CredentialRejected):
        signers["minter"].verify(token, now=T0)
    with pytest.raises(CredentialRejected):
        asyncio.run(verifiers.verify_token(token, now=T0))


def test_a_public_jwk_of_the_fuzzing_key_is_what_the_bundle_serves(signers: dict[str, Any]) -> None:
    # Guards the fixture: the fuzzed tokens are signed with the key the verifiers trust, so
    # the claim checks (not only the signature check) are what the fuzzing reaches.
    svid: JwtSvidIssuer = signers["svid"]
    assert public_jwk(_svid_private_key(svid), "ES256") in svid.jwks()["keys"]
    good = svid.jwt_svid(f"spiffe://{TD}/agent/a", AUDIENCE, now=T0)
    verifiers_ok = JwtSvidVerifier({TD: svid.jwks()}, audience=AUDIENCE)
    assert verifiers_ok.verify(good, now=T0).principal == f"spiffe://{TD}/agent/a"


# -- request field checks ------------------------------------------------------------------


@bounded(400)
@given(st.text(alphabet=st.characters(codec=None), min_size=1, max_size=20))
def test_the_printable_field_check_refuses_exactly_what_the_per_character_rule_refuses(value: str) -> None:
    from broker.domain.errors import InvalidRequest
    from broker.domain.intent import _printable

    refused_by_rule = any(c.isspace() or not c.isprintable() or c in '"\\' for c in value)
    try:
        _printable(value, "audience", 1000)
    except InvalidRequest:
        assert refused_by_rule
        return
    assert not refused_by_rule
