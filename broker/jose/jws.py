"""The rules every JWT obeys, whoever issued it (DESIGN.md, Identity, "Always").

One parser serves incoming tokens and the broker's own (`label` names which in a refusal).
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
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from broker.domain.errors import CredentialRejected
from broker.jose.keys import ALLOWED_ALGORITHMS, KeySet

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024

# Names safe to repeat in an error message; anything else the caller sent is not echoed.
_KNOWN_ALGORITHMS = ALLOWED_ALGORITHMS | {"HS256", "HS384", "HS512", "ES256K"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _reject(rule: str, label: str = "jwt") -> CredentialRejected:
    return CredentialRejected(f"{label}: {rule}")


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    """A token that passed the structural and header rules; nothing in it is trusted yet."""

    token: str
    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    alg: str
    kid: str | None
    signing_input: bytes
    signature: bytes


def parse_token(token: str, *, label: str = "jwt") -> UnverifiedToken:
    """Parse `token` under the structural and header rules, without verifying anything.

    `label` starts every refusal's reason ("jwt: ...", "broker token: ...").

    Raises:
        CredentialRejected: the token is oversized, malformed, or its header breaks a rule.
    """
    if not isinstance(token, str):
        raise _reject("malformed token (not a string)", label)
    if not token:
        raise _reject("token is empty", label)
    if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
        raise _reject(f"token larger than {MAX_TOKEN_BYTES} bytes", label)
    parts = token.split(".")
    if len(parts) != 3:
        raise _reject("malformed token (expected three dot-separated parts)", label)
    header = _json_object(_b64decode(parts[0], label), "header", label)
    payload = _json_object(_b64decode(parts[1], label), "payload", label)
    signature = _b64decode(parts[2], label)
    alg, kid = _check_header(header, label)
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    return UnverifiedToken(token, header, payload, alg, kid, signing_input, signature)


def _b64decode(part: str, label: str) -> bytes:
    # Compact JWS uses unpadded base64url; a non-canonical encoding is a second spelling of the
    # same token, so it is refused rather than normalised.
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise _reject("malformed token (bad base64url)", label)
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as e:
        raise _reject("malformed token (bad base64url)", label) from e
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != part:
        raise _reject("malformed token (bad base64url)", label)
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes, part: str, label: str) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise _reject(f"malformed token ({part} is not valid json)", label) from e
    if not isinstance(value, dict):
        raise _reject(f"malformed token ({part} is not a json object)", label)
    return value


def _check_header(header: Mapping[str, Any], label: str) -> tuple[str, str | None]:
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise _reject("alg is missing", label)
    if alg.lower() == "none":
        raise _reject("alg none is not allowed", label)
    if alg not in ALLOWED_ALGORITHMS:
        shown = f" {alg}" if alg in _KNOWN_ALGORITHMS else ""
        raise _reject(f"alg{shown} is not allowed", label)
    if "crit" in header:
        raise _reject("crit header is not supported", label)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _reject("kid must be a string", label)
    return alg, kid


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


def _number(claims: Mapping[str, Any], name: str, label: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int in Python, and PyJWT's own check would take "123" or true for a time.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _reject(f"{name} must be a number", label)
    try:
        number = float(value)
    except OverflowError as e:
        raise _reject(f"{name} is out of range", label) from e
    if not math.isfinite(number):
        raise _reject(f"{name} is out of range", label)
    return number


def check_times(claims: Mapping[str, Any], *, now: float, leeway: float, label: str = "jwt") -> None:
    """Check `exp` (required), `nbf` and `iat` as JSON numbers against `now` within `leeway`.

    Raises:
        CredentialRejected: a time claim is missing, not a number, or out of its window.
    """
    exp = _number(claims, "exp", label)
    if exp is None:
        raise _reject("exp is required", label)
    nbf, iat = _number(claims, "nbf", label), _number(claims, "iat", label)
    if now >= exp + leeway:
        raise _reject("token expired", label)
    if nbf is not None and nbf > now + leeway:
        raise _reject("token not yet valid", label)
    if iat is not None and iat > now + leeway:
        raise _reject("iat is in the future", label)


def token_hash(token: str) -> str:
    """A stable, non-reversible handle for a token in logs: "sha256:" + 32 hex chars."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:32]
