"""Identity value objects: SPIFFE IDs, trust domains, and the verified caller.

One strict parser follows the SPIFFE-ID specification to the letter; after parsing, a
`SpiffeId` travels, not a `str`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from broker.domain.errors import InvalidSpiffeId

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID 2.3: the URI host is at most 255 characters
_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_trust_domain(name: str) -> None:
    if not name:
        raise InvalidSpiffeId("trust domain is missing")
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    bad = sorted(set(name) - _TD_CHARS)
    if bad:
        raise InvalidSpiffeId(f"trust domain has a character outside [a-z0-9.-_]: {bad[0]!r}")


def _check_path(path: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeId("path must start with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise InvalidSpiffeId("path has an empty segment or a trailing slash")
        if segment in (".", ".."):
            raise InvalidSpiffeId("path has a dot segment")
        bad = sorted(set(segment) - _SEGMENT_CHARS)
        if bad:
            raise InvalidSpiffeId(f"path has a character outside [A-Za-z0-9.-_]: {bad[0]!r}")


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name, e.g. `example.org`."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a bare trust domain name or a `spiffe://td` id.

        Raises:
            InvalidSpiffeId: the text is not a valid trust domain.
        """
        if text.startswith(SCHEME):
            sid = SpiffeId.parse(text)
            if sid.path:
                raise InvalidSpiffeId("a trust domain id has no path")
            return sid.trust_domain
        return cls(text)

    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, `spiffe://<name>`."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID: `spiffe://<trust domain><path>`."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        _check_path(self.path)
        if len(str(self).encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"longer than {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse `text` under the SPIFFE-ID specification.

        Raises:
            InvalidSpiffeId: with the rule the text breaks.
        """
        if not isinstance(text, str):
            raise InvalidSpiffeId("not a string")
        if not text:
            raise InvalidSpiffeId("empty")
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME):
            raise InvalidSpiffeId("scheme must be 'spiffe://' in lower case")
        rest = text[len(SCHEME) :]
        slash = rest.find("/")
        name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        _check_trust_domain(name)
        return cls(TrustDomain(name), path)

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain.name}{self.path}"


def matches_any(principal: str, patterns: tuple[str, ...]) -> bool:
    """True when `principal` matches one of the glob `patterns` (`*` spans path segments)."""
    return any(fnmatch.fnmatchcase(principal, p) for p in patterns)


class AuthKind(StrEnum):
    """How a caller or subject proved its identity; also the policy context's `auth`."""

    X509_SVID = "x509-svid"
    JWT_SVID = "jwt-svid"
    OIDC = "oidc"


def _frozen(claims: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(claims))


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified workload identity.

    `principal` is the policy principal id: the SPIFFE ID, or the mapped OIDC id.
    `trust_domain` is set for SVIDs, `issuer` for OIDC tokens. `expires_at` is the
    credential's own expiry (POSIX seconds). `x5t_s256` is the base64url SHA-256 of the
    mTLS leaf certificate (RFC 8705), set only for X.509-SVIDs.
    """

    principal: str
    kind: AuthKind
    expires_at: float
    trust_domain: str | None = None
    issuer: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    x5t_s256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "claims", _frozen(self.claims))
