"""`TokenVerifier`: is this broker token good for this call, right now?

Checks, in order: the revocation view is fresh enough (strict mode); the token parses under
the strict JOSE rules; `typ` is `at+jwt`; the signature verifies with the broker's key named by
`kid`; `iss`, `aud`, `exp`, `nbf`, `iat`; the lease is not revoked (followed, introspected, or
not checked); the resource matches; the scope holds every action asked for; and, when the token
is bound (`cnf.x5t#S256`), the caller presented that very certificate.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio

from broker.client.agent import AgentClient
from broker.domain.clock import Clock, SystemClock
from broker.domain.errors import CredentialRejected
from broker.jose.jws import parse_token, verify_token
from broker.verifier.errors import InsufficientScope, TokenRejected
from broker.verifier.keys import KeyCache, url_fetcher
from broker.verifier.revocations import Follower, introspect_active

Revocations = Literal["follow", "introspect", "none"]
TYPES = ("at+jwt", "application/at+jwt")

_current: contextvars.ContextVar[VerifiedToken | None] = contextvars.ContextVar("broker_token", default=None)


def current_token() -> VerifiedToken | None:
    """The token the gRPC interceptor or ASGI middleware verified for the call being served."""
    return _current.get()


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What a verified token says."""

    subject: str
    client_id: str
    scope: tuple[str, ...]
    task_id: str
    lease_id: str
    actor_chain: tuple[str, ...]  # the current actor first; empty unless delegated
    expires_at: float
    audience: tuple[str, ...]
    resource: str
    bound: bool
    claims: Mapping[str, Any] = field(repr=False)


def _actor_chain(claims: Mapping[str, Any]) -> tuple[str, ...]:
    chain: list[str] = []
    act = claims.get("act")
    while isinstance(act, Mapping) and isinstance(act.get("sub"), str) and len(chain) < 16:
        chain.append(act["sub"])
        act = act.get("act")
    return tuple(chain)


def thumbprint(cert: bytes | x509.Certificate) -> str:
    """RFC 8705 `x5t#S256` of a certificate (PEM, DER or parsed)."""
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----") else \
            x509.load_der_x509_certificate(cert)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class TokenVerifier:
    """Verifies the broker's access tokens for one resource server (one `audience`).

    Keys come from `jwks_url` or the `broker` connection (an `AgentClient` holding the resource
    server's own SVID, or a `grpc.aio` channel to the broker built with it). `revocations`:
    "follow" keeps a revocation set from `WatchRevocations`, "introspect" asks the broker on
    every call, "none" trusts `exp` alone. `strict` fails closed:
    every token is refused while the revocation view is older than `max_staleness` seconds, or
    while the broker cannot be asked.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        broker: AgentClient | aio.Channel | None = None,
        revocations: Revocations = "follow",
        strict: bool = True,
        max_staleness: float = 30.0,
        leeway: float = 5.0,
        clock: Clock | None = None,
        jwks_min_interval: float = 30.0,
    ) -> None:
        if revocations not in ("follow", "introspect", "none"):
            raise ValueError("revocations must be 'follow', 'introspect' or 'none'")
        if revocations != "none" and broker is None:
            raise ValueError(f"revocations={revocations!r} needs a broker connection")
        if jwks_url is None and broker is None:
            raise ValueError("give jwks_url or a broker connection")
        if isinstance(broker, aio.Channel):
            broker = AgentClient(broker)
        self.issuer = issuer
        self.audience = audience
        self.revocations = revocations
        self.strict = strict
        self.max_staleness = max_staleness
        self._leeway = leeway
        self._broker = broker
        self._clock = clock or SystemClock()
        fetch = url_fetcher(jwks_url) if jwks_url else broker.jwks  # type: ignore[union-attr]
        self._keys = KeyCache(fetch, self._clock, min_interval=jwks_min_interval)
        self.follower = Follower(broker, audience, self._clock) if revocations == "follow" and broker else None

    async def start(self) -> None:
        """Start following revocations (does not wait for the stream; see `wait_ready`)."""
        if self.follower is not None:
            self.follower.start()

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the revocation view is being fed (always true without following)."""
        if self.follower is None:
            return True
        follower = self.follower
        return await follower.wait_for(lambda: follower.connected, timeout)

    async def close(self) -> None:
        if self.follower is not None:
            await self.follower.close()

    async def __aenter__(self) -> TokenVerifier:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def verify(
        self,
        token: str,
        *,
        actions: Sequence[str] = (),
        resource: str | None = None,
        peer_cert: bytes | x509.Certificate | None = None,
    ) -> VerifiedToken:
        """The token's facts, if it is good for `actions` on `resource` from this caller.

        Raises:
            TokenRejected: with the rule broken; InsufficientScope when only the scope falls short.
        """
        now = self._clock.now()
        self._check_fresh(now)
        claims = await self._verified_claims(token, now)
        verified = _facts(claims)
        await self._check_revocation(token, verified, claims, now)
        if resource is not None and verified.resource != resource:
            raise TokenRejected("resource mismatch")
        _check_binding(claims, peer_cert)
        missing = [a for a in actions if a not in verified.scope]
        if missing:
            raise InsufficientScope(missing)
        return verified

    def _check_fresh(self, now: float) -> None:
        if self.strict and self.follower is not None and self.follower.staleness(now) > self.max_staleness:
            raise TokenRejected("revocation view is stale (broker unreachable)")

    async def _verified_claims(self, token: str, now: float) -> dict[str, Any]:
        try:
            parsed = parse_token(token, label="token")
            if parsed.header.get("typ") not in TYPES:
                raise TokenRejected("typ must be at+jwt")
            keys = await self._keys.keys_for(parsed.kid)
            claims = verify_token(parsed, keys, audience=self.audience, now=now, leeway=self._leeway,
                                  issuer=self.issuer, require=("iat", "jti", "sub"))
        except CredentialRejected as e:
            raise TokenRejected(e.reason.removeprefix("jwt: ").removeprefix("token: ")) from None
        if not isinstance(claims.get("scope", ""), str):
            raise TokenRejected("scope must be a string")
        return claims

    async def _check_revocation(self, token: str, verified: VerifiedToken, claims: Mapping[str, Any],
                                now: float) -> None:
        if self.revocations == "none":
            return
        if self.follower is not None:
            if verified.lease_id in self.follower.revoked:
                raise TokenRejected("token revoked")
            if not self.follower.needs_check(verified.lease_id, float(claims["iat"])):
                return
        active = await introspect_active(self._broker, token)  # type: ignore[arg-type]
        if active is None:
            if self.strict:
                raise TokenRejected("revocation state unknown (broker unreachable)")
            return
        if not active:
            raise TokenRejected("token revoked or expired")
        if self.follower is not None:
            self.follower.checked(verified.lease_id, verified.expires_at)


def _facts(claims: Mapping[str, Any]) -> VerifiedToken:
    aud = claims["aud"]
    return VerifiedToken(
        subject=claims["sub"], client_id=str(claims.get("client_id", "")), scope=tuple(claims.get("scope", "").split()),
        task_id=str(claims.get("txn", "")), lease_id=claims["jti"], actor_chain=_actor_chain(claims),
        expires_at=float(claims["exp"]), audience=(aud,) if isinstance(aud, str) else tuple(aud),
        resource=str(claims.get("resource", "")), bound=isinstance(claims.get("cnf"), Mapping),
        claims=MappingProxyType(dict(claims)),
    )


def _check_binding(claims: Mapping[str, Any], peer_cert: bytes | x509.Certificate | None) -> None:
    cnf = claims.get("cnf")
    if cnf is None:
        return
    expected = cnf.get("x5t#S256") if isinstance(cnf, Mapping) else None
    if not isinstance(expected, str):
        raise TokenRejected("cnf must carry x5t#S256")
    if peer_cert is None:
        raise TokenRejected("token is bound to a certificate: present it over mTLS")
    try:
        presented = thumbprint(peer_cert)
    except ValueError as e:
        raise TokenRejected("peer certificate unreadable") from e
    if presented != expected:
        raise TokenRejected("cnf mismatch: token is bound to another certificate")
