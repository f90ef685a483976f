"""The broker's own credentials: RFC 9068 JWT access tokens, minted and verified here.

Tokens are signed with ES256 (P-256, the default) or EdDSA (Ed25519) straight on
`cryptography`, and verified through PyJWT's algorithm objects. The `kid` is the RFC 7638
thumbprint of the public key, so it names the key and nothing else. Key objects are prepared
once per key, not per call: minting happens on every Exchange.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from broker.domain.errors import CredentialRejected
from broker.jose.jws import UnverifiedToken, check_times, parse_token
from broker.jose.keys import SIGNING_ALGORITHMS, SigningKey, b64url

TOKEN_TYP = "at+jwt"
ALGORITHMS = SIGNING_ALGORITHMS
LABEL = "broker token"
_ES256 = ec.ECDSA(hashes.SHA256())
_P256_BYTES = 32
# The claims as compact JSON, standard JSON only (no NaN): one encoder, built once.
_CLAIMS_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _signer(key: SigningKey) -> Callable[[bytes], bytes]:
    """The JWS signature function of `key`: raw r||s for ES256 (RFC 7518 3.4), the bytes for EdDSA.

    Straight on `cryptography`, with the ECDSA parameters made once: minting runs on every Exchange.
    """
    private_key = key.private_key
    if key.algorithm == "ES256":  # SigningKey checked that the key fits its algorithm

        def sign_es256(data: bytes) -> bytes:
            r, s = decode_dss_signature(private_key.sign(data, _ES256))
            return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")

        return sign_es256
    return private_key.sign  # type: ignore[return-value]  # Ed25519: already the raw 64 bytes


@dataclass(frozen=True, slots=True)
class _VerifyingKey:
    kid: str
    algorithm: str
    pyjwk: jwt.PyJWK  # PyJWT's algorithm object and the public key, prepared once
    jwk: Mapping[str, str]
    until: float | None  # None: the current key; else it verifies while now < until

    @classmethod
    def of(cls, key: SigningKey) -> _VerifyingKey:
        jwk = key.public_jwk()
        return cls(key.kid, key.algorithm, jwt.PyJWK(dict(jwk), key.algorithm), jwk, None)

    @classmethod
    def peer(cls, jwk: Mapping[str, str], until: float) -> _VerifyingKey:
        """Another replica's published public key, verifying while now < `until`.

        Raises:
            ValueError: not a public key of an algorithm the broker signs with.
        """
        algorithm = jwk.get("alg", "")
        kid = jwk.get("kid", "")
        if algorithm not in ALGORITHMS or not kid:
            raise ValueError("a peer key needs a kid and alg ES256 or EdDSA")
        public = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "kid", "alg", "use")}
        try:
            return cls(kid, algorithm, jwt.PyJWK(dict(public), algorithm), public, until)
        except jwt.PyJWTError as e:
            raise ValueError(f"peer key {kid}: {e}") from e

    def retired(self, until: float) -> _VerifyingKey:
        return _VerifyingKey(self.kid, self.algorithm, self.pyjwk, self.jwk, until)

    def signature_ok(self, signing_input: bytes, signature: bytes) -> bool:
        try:
            return bool(self.pyjwk.Algorithm.verify(signing_input, self.pyjwk.key, signature))
        except (ValueError, InvalidSignature, jwt.PyJWTError):
            return False


@dataclass(frozen=True, slots=True)
class _KeyRing:
    """Everything mint and verify need, swapped as one value on rotation."""

    current: SigningKey
    header_segment: bytes  # the header is the same for every token of a key: encode it once
    sign: Callable[[bytes], bytes]
    verifying: tuple[_VerifyingKey, ...]  # current first, then previous still kept
    by_kid: Mapping[str, _VerifyingKey]

    @classmethod
    def build(cls, current: SigningKey, previous: tuple[_VerifyingKey, ...] = ()) -> _KeyRing:
        verifying = (_VerifyingKey.of(current), *previous)
        header = {"alg": current.algorithm, "kid": current.kid, "typ": TOKEN_TYP}
        segment = b64url(json.dumps(header, separators=(",", ":")).encode()).encode("ascii")
        return cls(current, segment, _signer(current), verifying, {v.kid: v for v in verifying})


def _rejected(rule: str) -> CredentialRejected:
    return CredentialRejected(f"{LABEL}: {rule}")


def _string(claims: Mapping[str, Any], name: str) -> None:
    value = claims.get(name)
    if value is None:
        raise _rejected(f"{name} is required")
    if not isinstance(value, str) or not value:
        raise _rejected(f"{name} must be a non-empty string")


def _check_audience(aud: Any) -> None:
    if aud is None:
        raise _rejected("aud is required")
    if isinstance(aud, str) and aud:
        return
    if isinstance(aud, list) and aud and all(isinstance(a, str) and a for a in aud):
        return
    raise _rejected("aud must be a string or a list of strings")


class TokenMinter:
    """Mints the broker's access tokens, serves their public keys, and verifies its own tokens."""

    def __init__(self, issuer: str, key: SigningKey) -> None:
        self.issuer = issuer
        self._ring = _KeyRing.build(key)
        self._own_previous: set[str] = set()  # this minter's retired keys (peers' keys are not)

    @property
    def current_kid(self) -> str:
        return self._ring.current.kid

    def public_jwk(self) -> dict[str, str]:
        """The current signing key's public JWK (what replicas publish to one another)."""
        return dict(self._ring.verifying[0].jwk)

    def mint(self, claims: Mapping[str, Any]) -> str:
        """Sign `claims` as given, with header {"alg", "typ": "at+jwt", "kid"}.

        Raises:
            ValueError: a claim is not JSON-serialisable as standard JSON (e.g. NaN).
        """
        ring = self._ring
        payload = _CLAIMS_ENCODER.encode(dict(claims)).encode()
        signing_input = ring.header_segment + b"." + b64url(payload).encode("ascii")
        signature = ring.sign(signing_input)
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """{"keys": [current, then previous keys still kept]}: public members only."""
        return {"keys": [dict(v.jwk) for v in self._ring.verifying]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), separators=(",", ":"))

    def rotate(self, new_key: SigningKey | None = None, *, keep_previous_until: float | None = None) -> str:
        """Make `new_key` (or a fresh key of the current algorithm) the signing key; return its kid.

        The old key keeps verifying until `keep_previous_until` (POSIX seconds). None drops it
        and every other previous key at once, as `Revoke all` needs: no earlier token verifies.

        Raises:
            ValueError: `new_key` is already one of this minter's keys.
        """
        ring = self._ring
        new_key = new_key or SigningKey.generate(ring.current.algorithm)
        if new_key.kid in ring.by_kid:
            raise ValueError("the new signing key is already in use")
        previous: tuple[_VerifyingKey, ...] = ()
        if keep_previous_until is not None:
            previous = (ring.verifying[0].retired(keep_previous_until), *ring.verifying[1:])
            self._own_previous.add(ring.current.kid)
        else:
            self._own_previous.clear()
        self._ring = _KeyRing.build(new_key, previous)
        return new_key.kid

    def set_peers(self, peers: list[tuple[Mapping[str, str], float]]) -> None:
        """Verify (and serve in the JWKS) these other replicas' keys, each until its time.

        Replaces the peers set before; this minter's own current and previous keys stay.
        A key that does not parse is skipped.
        """
        ring = self._ring
        own = {ring.current.kid} | {v.kid for v in ring.verifying[1:] if v.kid in self._own_previous}
        kept = tuple(v for v in ring.verifying[1:] if v.kid in own)
        found: list[_VerifyingKey] = []
        for jwk, until in peers:
            if jwk.get("kid") in own:
                continue
            try:
                found.append(_VerifyingKey.peer(jwk, until))
            except ValueError:
                continue
        self._ring = _KeyRing.build(ring.current, (*kept, *found))

    def prune(self, *, now: float) -> None:
        """Drop previous keys whose keep time has passed."""
        ring = self._ring
        kept = tuple(v for v in ring.verifying[1:] if v.until is not None and now < v.until)
        if len(kept) != len(ring.verifying) - 1:
            self._ring = _KeyRing.build(ring.current, kept)

    def verify(self, token: str, *, now: float, leeway: float = 0) -> dict[str, Any]:
        """Verify one of the broker's own tokens (Introspect, delegation) and return its claims.

        The token is parsed by the same strict JWS layer as incoming tokens, then checked
        against this minter's own keys with their prepared verifiers.

        Raises:
            CredentialRejected: "broker token: <rule>" naming the rule the token breaks.
        """
        parsed = parse_token(token, label=LABEL)
        key = self._key_for(parsed, now)
        if not key.signature_ok(parsed.signing_input, parsed.signature):
            raise _rejected("bad signature")
        claims = dict(parsed.payload)
        self._check_claims(claims, now, leeway)
        return claims

    def _key_for(self, parsed: UnverifiedToken, now: float) -> _VerifyingKey:
        if parsed.header.get("typ") != TOKEN_TYP:
            raise _rejected(f"typ must be {TOKEN_TYP}")
        if parsed.kid is None:
            raise _rejected("kid is required")
        key = self._ring.by_kid.get(parsed.kid)
        if key is None or (key.until is not None and now >= key.until):
            raise _rejected("unknown kid")
        # only the algorithm of the key the kid names: never `none`, never HMAC with a public key
        if parsed.alg != key.algorithm:
            raise _rejected(f"alg must be {key.algorithm}")
        return key

    def _check_claims(self, claims: Mapping[str, Any], now: float, leeway: float) -> None:
        if "iss" not in claims:
            raise _rejected("iss is required")
        if claims["iss"] != self.issuer:
            raise _rejected("iss does not match")
        check_times(claims, now=now, leeway=leeway, label=LABEL)
        if "iat" not in claims:
            raise _rejected("iat is required")
        _string(claims, "jti")
        _string(claims, "sub")
        _check_audience(claims.get("aud"))
