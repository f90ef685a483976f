"""Identity verifiers: X.509-SVIDs, JWT-SVIDs and OIDC ID tokens, behind one facade.

May import `broker.jose`, `broker.config` and `broker.domain`; no gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.domain.errors import CredentialRejected, InvalidRequest
from broker.domain.identity import Identity
from broker.domain.intent import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT
from broker.jose.jws import parse_token
from broker.verify.jwtsvid import JwtSvidVerifier
from broker.verify.oidc import JwksFetcher, OidcVerifier
from broker.verify.x509 import X509SvidVerifier

__all__ = [
    "TOKEN_TYPE_ACCESS_TOKEN",
    "TOKEN_TYPE_ID_TOKEN",
    "TOKEN_TYPE_JWT",
    "JwksFetcher",
    "JwtSvidVerifier",
    "OidcVerifier",
    "Verifiers",
    "X509SvidVerifier",
]


class Verifiers:
    """Every configured verifier, and the choice of which one looks at a credential."""

    def __init__(
        self, *, x509: X509SvidVerifier, jwt_svid: JwtSvidVerifier | None, oidc: Sequence[OidcVerifier]
    ) -> None:
        self._x509 = x509
        self._jwt_svid = jwt_svid
        self._oidc = {v.issuer: v for v in oidc}
        if len(self._oidc) != len(oidc):
            raise ValueError("two oidc verifiers for the same issuer")

    def verify_peer(self, leaf_pem: bytes, chain_pem: Sequence[bytes], *, now: float) -> Identity:
        """Verify an mTLS peer's X.509-SVID chain.

        Raises:
            CredentialRejected: the chain breaks a rule; the reason names it.
        """
        return self._x509.verify(leaf_pem, chain_pem, now=now)

    async def verify_token(self, token: str, *, now: float, token_type: str | None = None) -> Identity:
        """Verify a bearer or subject token: a JWT-SVID or an ID token of a configured issuer.

        With no `token_type`, the unverified `iss` picks the verifier: a configured OIDC issuer,
        else JWT-SVID. The chosen verifier then checks everything, `iss` included.

        Raises:
            InvalidRequest: `token_type` is not one verified here.
            CredentialRejected: the token breaks a rule, or no verifier is configured for it.
            IssuerUnavailable: an OIDC issuer's keys could not be fetched.
        """
        if token_type not in (None, TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN):
            raise InvalidRequest("subject_token_type is not supported here")
        routed_to_jwt_svid = token_type == TOKEN_TYPE_JWT or (token_type is None and not self._oidc)
        if routed_to_jwt_svid and self._jwt_svid is not None:
            # Skips even parsing the token when the JWT-SVID verifier remembers it (until its exp).
            known = self._jwt_svid.remembered(token, now=now)
            if known is not None:
                return known
        if token_type != TOKEN_TYPE_JWT:
            iss = parse_token(token).payload.get("iss")
            oidc = self._oidc.get(iss) if isinstance(iss, str) else None
            if oidc is not None:
                return await oidc.verify(token, now=now)
            if token_type == TOKEN_TYPE_ID_TOKEN:
                raise CredentialRejected("oidc: issuer is not configured")
        if self._jwt_svid is None:
            raise CredentialRejected("jwt-svid: no trust domain has a jwt bundle")
        return self._jwt_svid.verify(token, now=now)
