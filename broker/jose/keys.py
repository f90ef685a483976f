"""JWK sets and signing keys: what verifies a JWS, and what signs the broker's own.

`KeySet` holds the usable public keys of a JWK set, each bound to the algorithms its type
allows; `SigningKey` is a private key with its algorithm and RFC 7638 `kid`. Both the
incoming-token verifiers and the broker's minter use these, so key rules live in one place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from broker.domain.errors import CredentialRejected

log = logging.getLogger(__name__)

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHM_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
OKP_CURVES = frozenset({"Ed25519", "Ed448"})
ALLOWED_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHM_BY_CURVE.values()) | {"EdDSA"}
SIGNING_ALGORITHMS = ("ES256", "EdDSA")
# Public members only: a JWK set that leaks a private key must not turn into a signing key here.
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def _reject(rule: str) -> CredentialRejected:
    return CredentialRejected(f"jwt: {rule}")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key of a JWK set, bound to each algorithm its type (and its `alg`) allows."""

    kid: str | None
    kty: str
    by_alg: Mapping[str, jwt.PyJWK]


def _algorithms_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        allowed = RSA_ALGORITHMS
    elif kty == "EC" and crv in EC_ALGORITHM_BY_CURVE:
        allowed = frozenset({EC_ALGORITHM_BY_CURVE[crv]})
    elif kty == "OKP" and crv in OKP_CURVES:
        allowed = frozenset({"EdDSA"})
    else:
        return frozenset()
    declared = jwk.get("alg")
    return allowed if declared is None else allowed & {declared}


def _usable_key(jwk: Any) -> VerificationKey | None:
    if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
        return None
    kid, algorithms = jwk.get("kid"), _algorithms_for(jwk)
    if (kid is not None and not isinstance(kid, str)) or not algorithms:
        return None
    kty = jwk["kty"]
    public = {"kty": kty, **{m: jwk[m] for m in _PUBLIC_MEMBERS[kty] if m in jwk}}
    try:
        by_alg = {alg: jwt.PyJWK(public, algorithm=alg) for alg in sorted(algorithms)}
    except jwt.PyJWTError:
        return None
    return VerificationKey(kid=kid, kty=kty, by_alg=by_alg)


class KeySet:
    """The usable verification keys of one JWK set; keys of other types or uses are skipped."""

    def __init__(self, keys: Sequence[VerificationKey]) -> None:
        self._keys = tuple(keys)

    @classmethod
    def from_jwks(cls, jwks: Any) -> KeySet:
        """Build from a JWK set document `{"keys": [...]}`.

        Raises:
            ValueError: the document is not a JWK set.
        """
        if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
            raise ValueError("not a jwk set: expected an object with a list of keys")
        keys = []
        for jwk in jwks["keys"]:
            key = _usable_key(jwk)
            if key is None:
                kid = jwk.get("kid") if isinstance(jwk, Mapping) else None
                log.info("jwk skipped: not a usable signature verification key", extra={"kid": kid})
            else:
                keys.append(key)
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return any(k.kid == kid for k in self._keys)

    def select(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key named by `kid` (or the only key when there is no kid), bound to `alg`.

        Raises:
            CredentialRejected: no such key, or `alg` does not fit the key's type.
        """
        if kid is None:
            if len(self._keys) != 1:
                raise _reject("kid is required" if self._keys else "no verification keys")
            candidates = self._keys
        else:
            candidates = tuple(k for k in self._keys if k.kid == kid)
            if not candidates:
                raise _reject("unknown kid")
        for key in candidates:
            if alg in key.by_alg:
                return key.by_alg[alg]
        raise _reject(f"alg {alg} does not match the key")


# RFC 7638 section 3.2 (EC, RSA) and RFC 8037 section 2 (OKP): the required members.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
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
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _public_members(public_key: PublicKey) -> dict[str, str]:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
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
