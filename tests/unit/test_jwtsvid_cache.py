"""Verified JWT-SVIDs are remembered by hash until `exp`: never past it, never across verifiers."""

from __future__ import annotations

import asyncio

import pytest

from broker.domain.errors import CredentialRejected
from broker.testing.jwt_issuer import JwtSvidIssuer
from broker.verify import JwtSvidVerifier, Verifiers, X509SvidVerifier, jwtsvid

T0 = 1_750_000_000
TD = "example.org"
AGENT = f"spiffe://{TD}/agent/planner"
BROKER = f"spiffe://{TD}/broker"


@pytest.fixture(scope="module")
def issuer() -> JwtSvidIssuer:
    return JwtSvidIssuer(TD)


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts full verifications (signature and claims) by wrapping the JWS layer's entry point."""
    calls: list[str] = []
    real = jwtsvid.verify_token

    def counted(parsed, *args, **kwargs):
        calls.append(parsed.token)
        return real(parsed, *args, **kwargs)

    monkeypatch.setattr(jwtsvid, "verify_token", counted)
    return calls


def test_the_same_token_is_verified_once_and_proves_the_same_identity(
    issuer: JwtSvidIssuer, verifications: list[str]
) -> None:
    verifier = JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER)
    token = issuer.jwt_svid(AGENT, BROKER, ttl=300, now=T0)
    first = verifier.verify(token, now=T0)
    again = verifier.verify(token, now=T0 + 299)
    assert again == first and again.principal == AGENT
    assert len(verifications) == 1


def test_a_remembered_token_is_refused_from_its_exp_on(issuer: JwtSvidIssuer) -> None:
    verifier = JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER, clock_skew=30)
    token = issuer.jwt_svid(AGENT, BROKER, ttl=300, now=T0)
    verifier.verify(token, now=T0)
    assert verifier.remembered(token, now=T0 + 300) is None
    # Within the skew it still verifies in full, but is not remembered past exp ...
    assert verifier.verify(token, now=T0 + 310).principal == AGENT
    assert verifier.remembered(token, now=T0 + 310) is None
    # ... and past the skew it is refused, as it would be with no memory at all.
    with pytest.raises(CredentialRejected, match="expired"):
        verifier.verify(token, now=T0 + 331)


def test_a_token_remembered_by_one_verifier_is_not_accepted_by_another_audience(issuer: JwtSvidIssuer) -> None:
    ours = JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER)
    other = JwtSvidVerifier({TD: issuer.jwks()}, audience=f"spiffe://{TD}/other-broker")
    token = issuer.jwt_svid(AGENT, BROKER, now=T0)
    ours.verify(token, now=T0)
    assert other.remembered(token, now=T0) is None
    with pytest.raises(CredentialRejected, match="audience"):
        other.verify(token, now=T0)


def test_a_token_remembered_under_one_bundle_is_not_accepted_under_another(issuer: JwtSvidIssuer) -> None:
    stranger = JwtSvidIssuer(TD)  # same trust domain name, other keys
    token = issuer.jwt_svid(AGENT, BROKER, now=T0)
    JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER).verify(token, now=T0)
    with pytest.raises(CredentialRejected):
        JwtSvidVerifier({TD: stranger.jwks()}, audience=BROKER).verify(token, now=T0)


def test_a_refused_token_is_not_remembered(issuer: JwtSvidIssuer, verifications: list[str]) -> None:
    verifier = JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER)
    token = issuer.jwt_svid(AGENT, "someone-else", now=T0)
    for _ in range(2):
        with pytest.raises(CredentialRejected):
            verifier.verify(token, now=T0)
    assert verifier.remembered(token, now=T0) is None
    assert len(verifications) == 2


def test_memory_is_bounded_and_forgets_the_least_recently_used(
    issuer: JwtSvidIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jwtsvid, "CACHE_SIZE", 3)
    verifier = JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER)
    tokens = [issuer.jwt_svid(f"{AGENT}-{i}", BROKER, now=T0) for i in range(4)]
    for token in tokens[:3]:
        verifier.verify(token, now=T0)
    verifier.verify(tokens[0], now=T0)  # used again: now the most recent
    verifier.verify(tokens[3], now=T0)
    assert [verifier.remembered(t, now=T0) is not None for t in tokens] == [True, False, True, True]


def test_the_facade_answers_a_remembered_bearer_token_without_oidc_routing(
    issuer: JwtSvidIssuer, verifications: list[str]
) -> None:
    verifiers = Verifiers(
        x509=X509SvidVerifier({}), jwt_svid=JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER), oidc=[]
    )
    token = issuer.jwt_svid(AGENT, BROKER, now=T0)
    first = asyncio.run(verifiers.verify_token(token, now=T0))
    assert asyncio.run(verifiers.verify_token(token, now=T0 + 1)) == first
    assert len(verifications) == 1
