"""The rules every incoming JWT obeys, whoever issued it (DESIGN.md, Identity, "Always").

A token is parsed strictly before any key is looked at: at most 16 KiB, a compact JWS of three
base64url parts without padding, JSON objects without duplicate members. The header's `alg`
must be an asymmetric algorithm the selected key's type allows (never `none`, never HMAC);
`kid` selects the key; `jku`, `x5u`, `jwk` and `x5c` are never read, so a token cannot bring
its own key; `crit` is refused. PyJWT checks the signature, `aud` and `iss`; this module checks
`exp`/`nbf`/`iat` itself against the `now` passed in, because PyJWT reads the wall clock and
accepts numeric strings ("123") where JSON numbers are required.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from broker.errors import CredentialRejected

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHM_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
OKP_CURVES = frozenset({"Ed25519", "Ed448"})
ALLOWED_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHM_BY_CURVE.values()) | {"EdDSA"}
# Names safe to repeat in an error message; anything else the caller sent is not echoed.
_KNOWN_ALGORITHMS = ALLOWED_ALGORITHMS | {"HS256", "HS384", "HS512", "ES256K"}
# Public members only: a JWK set that leaks a private key must not turn into a signing key here.
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _reject(rule: str) -> CredentialRejected:
    return CredentialRejected(f"jwt: {rule}")


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    """A token that passed the structural and header rules; nothing in it is trusted yet."""

    token: str
    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    alg: str
    kid: str | None


def parse_token(token: str) -> UnverifiedToken:
    """Parse `token` under the structural and header rules, without verifying anything.

    Raises:
        CredentialRejected: the token is oversized, malformed, or its header breaks a rule.
    """
    if not isinstance(token, str) or not token:
        raise _reject("token is empty")
    if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
        raise _reject(f"token larger than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise _reject("malformed token (expected three dot-separated parts)")
    header = _json_object(_b64decode(parts[0]), "header")
    payload = _json_object(_b64decode(parts[1]), "payload")
    _b64decode(parts[2])
    alg, kid = _check_header(header)
    return UnverifiedToken(token=token, header=header, payload=payload, alg=alg, kid=kid)


def _b64decode(part: str) -> bytes:
    # Compact JWS uses unpadded base64url; a non-canonical encoding is a second spelling of the
    # same token, so it is refused rather than normalised.
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise _reject("malformed token (bad base64url)")
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as e:
        raise _reject("malformed token (bad base64url)") from e
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != part:
        raise _reject("malformed token (bad base64url)")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise _reject(f"malformed token ({part} is not valid json)") from e
    if not isinstance(value, dict):
        raise _reject(f"malformed token ({part} is not a json object)")
    return value


def _check_header(header: Mapping[str, Any]) -> tuple[str, str | None]:
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise _reject("alg is missing")
    if alg.lower() == "none":
        raise _reject("alg none is not allowed")
    if alg not in ALLOWED_ALGORITHMS:
        shown = f" {alg}" if alg in _KNOWN_ALGORITHMS else ""
        raise _reject(f"alg{shown} is not allowed")
    if "crit" in header:
        raise _reject("crit header is not supported")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _reject("kid must be a string")
    return alg, kid


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


# Most specific first: InvalidSignatureError is a DecodeError, most others InvalidTokenErrors.
_PYJWT_RULES: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAudienceError, "audience mismatch"),
    (jwt.InvalidIssuerError, "issuer mismatch"),
    (jwt.InvalidAlgorithmError, "alg does not match the key"),
    (jwt.InvalidKeyError, "key is not acceptable"),
    (jwt.exceptions.InvalidSubjectError, "sub must be a string"),
    (jwt.exceptions.InvalidJTIError, "jti must be a string"),
    (jwt.DecodeError, "malformed token"),
)


def _pyjwt_rule(error: jwt.PyJWTError) -> str:
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"{error.claim} is required"
    for cls, rule in _PYJWT_RULES:
        if isinstance(error, cls):
            return rule
    return "invalid token"


def _decode(
    parsed: UnverifiedToken, key: jwt.PyJWK, *, audience: str, issuer: str | None, require: Sequence[str]
) -> dict[str, Any]:
    options = {
        "require": sorted({"exp", "aud", *require}),
        # Time is checked by `check_times` against the `now` passed in: PyJWT reads the wall clock.
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_aud": True,
        "verify_iss": issuer is not None,
        "enforce_minimum_key_length": True,
    }
    try:
        return jwt.decode(
            parsed.token, key, algorithms=[key.algorithm_name], options=options, audience=audience, issuer=issuer
        )
    except jwt.PyJWTError as e:
        raise _reject(_pyjwt_rule(e)) from e


def verify_token(
    parsed: UnverifiedToken,
    keys: KeySet,
    *,
    audience: str,
    now: float,
    leeway: float,
    issuer: str | None = None,
    require: Sequence[str] = (),
) -> dict[str, Any]:
    """Verify the signature and the claims every token must satisfy; return the claims.

    `exp` and `aud` are always required; `require` names further claims. `iss` must equal
    `issuer` when one is given.

    Raises:
        CredentialRejected: with the rule the token breaks, e.g. "jwt: token expired".
    """
    key = keys.select(parsed.kid, parsed.alg)
    claims = _decode(parsed, key, audience=audience, issuer=issuer, require=require)
    check_times(claims, now=now, leeway=leeway)
    return claims


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int in Python, and PyJWT's own check would take "123" or true for a time.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _reject(f"{name} must be a number")
    try:
        number = float(value)
    except OverflowError as e:
        raise _reject(f"{name} is out of range") from e
    if not math.isfinite(number):
        raise _reject(f"{name} is out of range")
    return number


def check_times(claims: Mapping[str, Any], *, now: float, leeway: float) -> None:
    """Check `exp` (required), `nbf` and `iat` as JSON numbers against `now` within `leeway`.

    Raises:
        CredentialRejected: a time claim is missing, not a number, or out of its window.
    """
    exp = _number(claims, "exp")
    if exp is None:
        raise _reject("exp is required")
    nbf, iat = _number(claims, "nbf"), _number(claims, "iat")
    if now >= exp + leeway:
        raise _reject("token expired")
    if nbf is not None and nbf > now + leeway:
        raise _reject("token not yet valid")
    if iat is not None and iat > now + leeway:
        raise _reject("iat is in the future")
