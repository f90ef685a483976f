"""The broker's own credentials: RFC 9068 JWT access tokens, minted and verified here.

Tokens are signed with ES256 (P-256, the default) or EdDSA (Ed25519) through PyJWT. The
`kid` is the RFC 7638 thumbprint of the public key, so it names the key and nothing else.
Key objects are prepared once per key, not per call: minting happens on every Exchange.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import Algorithm

from broker.errors import CredentialRejected

TOKEN_TYP = "at+jwt"
MAX_TOKEN_BYTES = 16 * 1024
ALGORITHMS = ("ES256", "EdDSA")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_SEGMENTS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")

# RFC 7638 section 3.2 (EC, RSA) and RFC 8037 section 2 (OKP): the required members.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of a public JWK.

    Raises:
        ValueError: the key type is not EC, OKP or RSA, or a required member is missing.
    """
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError(f"no thumbprint rule for key type {jwk.get('kty')!r}")
    missing = [m for m in members if m not in jwk]
    if missing:
        raise ValueError(f"jwk is missing {missing[0]!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _public_members(public_key: PublicKey) -> dict[str, str]:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"


def _check_fit(algorithm: str, private_key: object) -> None:
    if algorithm == "ES256":
        if not (isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.name == "secp256r1"):
            raise ValueError(f"ES256 needs an EC P-256 private key, got {_describe(private_key)}")
    elif algorithm == "EdDSA":
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"EdDSA needs an Ed25519 private key, got {_describe(private_key)}")
    else:
        raise ValueError(f"unsupported signing algorithm {algorithm!r}: use ES256 or EdDSA")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private signing key, its algorithm and its `kid` (the RFC 7638 thumbprint)."""

    kid: str
    algorithm: str
    private_key: PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_fit(self.algorithm, self.private_key)
        if self.kid != jwk_thumbprint(_public_members(self.private_key.public_key())):
            raise ValueError("kid must be the RFC 7638 thumbprint of the public key")

    @classmethod
    def from_private_key(cls, private_key: PrivateKey, algorithm: str = "ES256") -> SigningKey:
        """Wrap a key object, computing its `kid`.

        Raises:
            ValueError: the key does not fit the algorithm, or the algorithm is unsupported.
        """
        _check_fit(algorithm, private_key)
        kid = jwk_thumbprint(_public_members(private_key.public_key()))
        return cls(kid=kid, algorithm=algorithm, private_key=private_key)

    @classmethod
    def generate(cls, algorithm: str = "ES256") -> SigningKey:
        """A fresh ephemeral key for `algorithm` ("ES256" or "EdDSA").

        Raises:
            ValueError: the algorithm is unsupported.
        """
        if algorithm == "EdDSA":
            return cls.from_private_key(ed25519.Ed25519PrivateKey.generate(), algorithm)
        if algorithm == "ES256":
            return cls.from_private_key(ec.generate_private_key(ec.SECP256R1()), algorithm)
        raise ValueError(f"unsupported signing algorithm {algorithm!r}: use ES256 or EdDSA")

    @classmethod
    def load(cls, path: Path, algorithm: str = "ES256") -> SigningKey:
        """Read an unencrypted PEM private key (PKCS8, or traditional for EC).

        Raises:
            ValueError: the file cannot be read, is not a PEM private key, is encrypted, or
                holds a key that does not fit the algorithm.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read signing key {path}: {e.strerror or e}") from e
        try:
            private_key = serialization.load_pem_private_key(data, password=None)
        except TypeError as e:
            raise ValueError(f"signing key {path} is encrypted: give an unencrypted PEM key") from e
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError(f"signing key {path} is not a PEM private key") from e
        try:
            return cls.from_private_key(private_key, algorithm)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"signing key {path}: {e}") from e

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK: kty, crv, x, (y), kid, alg, use "sig"."""
        members = _public_members(self.private_key.public_key())
        return {**members, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


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
    signer: Algorithm
    verifying: tuple[_VerifyingKey, ...]  # current first, then previous still kept
    by_kid: Mapping[str, _VerifyingKey]

    @classmethod
    def build(cls, current: SigningKey, previous: tuple[_VerifyingKey, ...] = ()) -> _KeyRing:
        verifying = (_VerifyingKey.of(current), *previous)
        header = {"alg": current.algorithm, "kid": current.kid, "typ": TOKEN_TYP}
        segment = _b64url(json.dumps(header, separators=(",", ":")).encode()).encode("ascii")
        signer = verifying[0].pyjwk.Algorithm
        return cls(current, segment, signer, verifying, {v.kid: v for v in verifying})


def _rejected(rule: str) -> CredentialRejected:
    return CredentialRejected(f"broker token: {rule}")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _b64decode(segment: str) -> bytes:
    """Strict base64url: the alphabet is checked by `_SEGMENTS`; padding bits must be zero."""
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as e:
        raise _rejected("malformed") from e
    if _b64url(data) != segment:
        raise _rejected("malformed")
    return data


def _json_object(data: bytes, part: str) -> dict[str, Any]:
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise _rejected(f"{part} is not JSON") from e
    if not isinstance(value, dict):
        raise _rejected(f"{part} is not a JSON object")
    return value


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int in Python; "123" is not a NumericDate (RFC 7519 section 2); 1e400 parses as inf
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _rejected(f"{name} must be a number")
    return float(value)


def _required_number(claims: Mapping[str, Any], name: str) -> float:
    value = _number(claims, name)
    if value is None:
        raise _rejected(f"{name} is required")
    return value


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

    @property
    def current_kid(self) -> str:
        return self._ring.current.kid

    def mint(self, claims: Mapping[str, Any]) -> str:
        """Sign `claims` as given, with header {"alg", "typ": "at+jwt", "kid"}.

        Raises:
            ValueError: a claim is not JSON-serialisable as standard JSON (e.g. NaN).
        """
        ring = self._ring
        payload = json.dumps(dict(claims), separators=(",", ":"), allow_nan=False).encode()
        signing_input = ring.header_segment + b"." + _b64url(payload).encode("ascii")
        signature = ring.signer.sign(signing_input, ring.current.private_key)
        return f"{signing_input.decode('ascii')}.{_b64url(signature)}"

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
        self._ring = _KeyRing.build(new_key, previous)
        return new_key.kid

    def prune(self, *, now: float) -> None:
        """Drop previous keys whose keep time has passed."""
        ring = self._ring
        kept = tuple(v for v in ring.verifying[1:] if v.until is not None and now < v.until)
        if len(kept) != len(ring.verifying) - 1:
            self._ring = _KeyRing.build(ring.current, kept)

    def verify(self, token: str, *, now: float, leeway: float = 0) -> dict[str, Any]:
        """Verify one of the broker's own tokens (Introspect, delegation) and return its claims.

        Raises:
            CredentialRejected: "broker token: <rule>" naming the rule the token breaks.
        """
        if not isinstance(token, str):
            raise _rejected("malformed")
        if len(token) > MAX_TOKEN_BYTES:
            raise _rejected(f"larger than {MAX_TOKEN_BYTES} bytes")
        if not token.isascii():
            raise _rejected("malformed")
        match = _SEGMENTS.fullmatch(token)
        if match is None:
            raise _rejected("malformed")
        header_segment, payload_segment, signature_segment = match.groups()
        key = self._key_for(_json_object(_b64decode(header_segment), "header"), now)
        signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
        if not key.signature_ok(signing_input, _b64decode(signature_segment)):
            raise _rejected("bad signature")
        claims = _json_object(_b64decode(payload_segment), "claims set")
        self._check_claims(claims, now, leeway)
        return claims

    def _key_for(self, header: Mapping[str, Any], now: float) -> _VerifyingKey:
        if header.get("typ") != TOKEN_TYP:
            raise _rejected(f"typ must be {TOKEN_TYP}")
        if "crit" in header:
            raise _rejected("crit header is not supported")
        kid = header.get("kid")
        if kid is None:
            raise _rejected("kid is required")
        if not isinstance(kid, str):
            raise _rejected("kid must be a string")
        key = self._ring.by_kid.get(kid)
        if key is None or (key.until is not None and now >= key.until):
            raise _rejected("unknown kid")
        # only the algorithm of the key the kid names: never `none`, never HMAC with a public key
        if header.get("alg") != key.algorithm:
            raise _rejected(f"alg must be {key.algorithm}")
        return key

    def _check_claims(self, claims: Mapping[str, Any], now: float, leeway: float) -> None:
        if "iss" not in claims:
            raise _rejected("iss is required")
        if claims["iss"] != self.issuer:
            raise _rejected("iss does not match")
        if now >= _required_number(claims, "exp") + leeway:
            raise _rejected("expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise _rejected("not yet valid")
        _required_number(claims, "iat")
        _string(claims, "jti")
        _string(claims, "sub")
        _check_audience(claims.get("aud"))


def token_hash(token: str) -> str:
    """A stable, non-reversible handle for a token in logs: "sha256:" + 32 hex chars."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:32]
