"""Who is calling: the mTLS peer's X.509-SVID, or a bearer token on the token listener.

gRPC's TLS layer has already checked the client chain against all bundles together on the
mTLS listener; the broker then re-verifies it with the SPIFFE rules, per trust domain.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from enum import StrEnum

from grpc import aio

from broker.domain.clock import Clock
from broker.domain.errors import CredentialRejected, PermissionDenied
from broker.domain.identity import AuthKind, Identity, matches_any
from broker.ops.ratelimit import RateLimiter
from broker.verify import Verifiers

# A verified chain is remembered briefly so a busy agent does not pay for path building on
# every call; never past the leaf's own expiry.
_CACHE_SECONDS = 60.0
_CACHE_SIZE = 4096


class Listener(StrEnum):
    """Which port a call came in on."""

    MTLS = "mtls"
    TOKEN = "token"


class Authenticator:
    """Turns a call's transport credentials into a verified `Identity`."""

    def __init__(
        self,
        verifiers: Verifiers,
        clock: Clock,
        *,
        listener: Listener,
        admin_ids: tuple[str, ...] = (),
        limiter: RateLimiter | None = None,
    ) -> None:
        self._verifiers = verifiers
        self._limiter = limiter
        self._clock = clock
        self.listener = listener
        self._admin_ids = admin_ids
        self._cache: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()

    async def caller(self, context: aio.ServicerContext) -> Identity:
        """The verified identity of the caller.

        Raises:
            CredentialRejected: no credential, or one that fails verification.
            IssuerUnavailable: an OIDC issuer's keys cannot be fetched.
        """
        if self.listener is Listener.MTLS:
            return self._peer(context)
        token = bearer_token(context)
        if token is None:
            raise CredentialRejected("bearer token required: send 'authorization: Bearer <token>'")
        return await self._verifiers.verify_token(token, now=self._clock.now())

    async def issuing_caller(self, context: aio.ServicerContext) -> Identity:
        """The caller of an RPC that issues credentials, after its rate limit.

        Raises:
            CredentialRejected: as for `caller`.
            RateLimited: the caller's bucket is empty.
        """
        identity = await self.caller(context)
        if self._limiter is not None:
            self._limiter.check(identity.principal, now=self._clock.now())
        return identity

    async def optional_caller(self, context: aio.ServicerContext) -> Identity | None:
        """The caller if it presented a credential; a bad credential is still refused."""
        if self.listener is Listener.TOKEN and bearer_token(context) is None:
            return None
        return await self.caller(context)

    async def admin(self, context: aio.ServicerContext) -> Identity:
        """The caller, who must be an operator: an mTLS SVID matching `admin.spiffe_ids`.

        Raises:
            CredentialRejected: as for `caller`.
            PermissionDenied: the caller is not an operator.
        """
        identity = await self.caller(context)
        if identity.kind is not AuthKind.X509_SVID or not matches_any(identity.principal, self._admin_ids):
            raise PermissionDenied("operator identity required (mTLS SVID listed in admin.spiffe_ids)")
        return identity

    def is_admin(self, identity: Identity) -> bool:
        return identity.kind is AuthKind.X509_SVID and matches_any(identity.principal, self._admin_ids)

    def _peer(self, context: aio.ServicerContext) -> Identity:
        auth = context.auth_context()
        leaves = auth.get("x509_pem_cert") or []
        if not leaves:
            raise CredentialRejected("x509: client certificate required")
        chain = list(auth.get("x509_pem_cert_chain") or [])
        key = hashlib.sha256(b"\0".join([leaves[0], *chain])).digest()
        now = self._clock.now()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            return hit[1]
        identity = self._verifiers.verify_peer(leaves[0], chain, now=now)
        self._cache[key] = (min(identity.expires_at, now + _CACHE_SECONDS), identity)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return identity


def bearer_token(context: aio.ServicerContext) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any.

    Raises:
        CredentialRejected: the header is present but not a bearer credential, or repeated.
    """
    values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise CredentialRejected("more than one authorization header")
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CredentialRejected("authorization must be 'Bearer <token>'")
    return token.strip()
