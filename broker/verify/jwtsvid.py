"""JWT-SVID verification against the JWT bundles of the configured trust domains.

The trust domain is read from the unverified `sub` only to choose which bundle verifies the
token; a token signed by another domain's key then fails on the key, so `sub` always names a
SPIFFE ID of the domain whose bundle verified it.

A verified token is remembered by its SHA-256 until its `exp` (never past it, and never with
the clock skew added), so an agent that sends the same JWT-SVID on every call pays for the
signature check once. The memory belongs to one verifier, i.e. one audience and one set of
bundles: a token verified for another audience or by another bundle is never found in it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from broker.domain.errors import CredentialRejected, InvalidSpiffeId
from broker.domain.identity import AuthKind, Identity, SpiffeId, TrustDomain
from broker.jose.jws import parse_token, verify_token
from broker.jose.keys import KeySet

# Verified JWT-SVIDs remembered at once; the least recently used is forgotten first.
CACHE_SIZE = 4096

# JWT-SVID 2.3: `typ`, when present, is one of these. Anything else (an RFC 9068 "at+jwt" access
# token above all) is some other kind of token and must not pass as a workload's identity document.
TYPES = frozenset({"JWT", "JOSE"})


def _check_type(header: Mapping[str, Any]) -> None:
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ not in TYPES:
        raise CredentialRejected("jwt-svid: typ must be JWT or JOSE")


def _subject(payload: Mapping[str, Any]) -> SpiffeId:
    sub = payload.get("sub")
    if sub is None:
        raise CredentialRejected("jwt: sub is required")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except InvalidSpiffeId as e:
        raise CredentialRejected("jwt-svid: sub is not a spiffe id") from e
    if not spiffe_id.path:
        # As for X.509-SVIDs: spiffe://<td> alone names the trust domain, never a workload.
        raise CredentialRejected("jwt-svid: sub must be a workload's spiffe id (with a path)")
    return spiffe_id


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class JwtSvidVerifier:
    """Verifies JWT-SVIDs: signed by the bundle of `sub`'s trust domain, `aud` holding ours."""

    def __init__(self, bundles: Mapping[str, Mapping[str, Any]], *, audience: str, clock_skew: float = 30) -> None:
        """`bundles` maps a trust domain name to its JWT bundle (a JWK set document).

        Raises:
            ValueError: a bundle is not a JWK set, or the clock skew is negative.
            InvalidSpiffeId: a key of `bundles` is not a trust domain name.
        """
        if clock_skew < 0:
            raise ValueError("clock skew must not be negative")
        self._keys = {TrustDomain(name).name: KeySet.from_jwks(jwks) for name, jwks in bundles.items()}
        self._audience = audience
        self._leeway = clock_skew
        self._verified: OrderedDict[bytes, Identity] = OrderedDict()

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def verify(self, token: str, *, now: float) -> Identity:
        """Verify a JWT-SVID and return the workload it proves.

        Raises:
            CredentialRejected: the token breaks a rule; the reason names it.
        """
        key = _digest(token)
        known = self._recall(key, now)
        if known is not None:
            return known
        identity = self._verify(token, now=now)
        if now < identity.expires_at:
            self._verified[key] = identity
            if len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
        return identity

    def remembered(self, token: str, *, now: float) -> Identity | None:
        """The identity `token` proved when it was verified, if it is remembered and before its `exp`."""
        return self._recall(_digest(token), now) if self._verified else None

    def _recall(self, key: bytes, now: float) -> Identity | None:
        known = self._verified.get(key)
        if known is None:
            return None
        if now < known.expires_at:
            self._verified.move_to_end(key)
            return known
        del self._verified[key]
        return None

    def _verify(self, token: str, *, now: float) -> Identity:
        parsed = parse_token(token)
        _check_type(parsed.header)
        spiffe_id = _subject(parsed.payload)
        domain = spiffe_id.trust_domain.name
        keys = self._keys.get(domain)
        if keys is None:
            raise CredentialRejected("jwt-svid: no jwt bundle for the trust domain of sub")
        claims = verify_token(parsed, keys, audience=self._audience, now=now, leeway=self._leeway, require=("sub",))
        return Identity(
            principal=str(spiffe_id),
            kind=AuthKind.JWT_SVID,
            expires_at=float(claims["exp"]),
            trust_domain=domain,
            claims=claims,
        )
