"""OIDC ID token verification, with the issuer's keys from a file, a JWKS URL or discovery.

Fetched keys are cached. A token naming an unknown `kid` triggers a refetch (the issuer may
have rotated), at most once per `min_interval` so a stream of forged kids cannot turn the
broker into a load generator against the issuer. Keys older than `max_age` are refreshed on
the next use; if that refresh fails the cached keys keep serving.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from broker.config.settings import check_subject_template
from broker.domain.clock import Clock, SystemClock
from broker.domain.errors import ConfigError, CredentialRejected, IssuerUnavailable
from broker.domain.identity import AuthKind, Identity
from broker.domain.intent import CONTROL_CHARS
from broker.jose.jws import UnverifiedToken, parse_token, verify_token
from broker.jose.keys import KeySet

if TYPE_CHECKING:
    from broker.config.settings import OidcIssuerConfig

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_RESPONSE_BYTES = 1024 * 1024
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def usable_url(url: str) -> bool:
    """https, or plain http to a loopback host (local issuers and tests)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme == "https":
        return bool(parts.hostname)
    return parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS


class _FetchError(Exception):
    pass


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs we would have fetched in the first place."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not usable_url(newurl) or (req.full_url.startswith("https:") and newurl.startswith("http:")):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SafeRedirects)


def _http_get_json(url: str, timeout: float, max_bytes: int) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 (scheme checked)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            if response.status != 200:
                raise _FetchError(f"http status {response.status}")
            body = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        e.close()
        raise _FetchError(f"http status {e.code}") from None
    if len(body) > max_bytes:
        raise _FetchError(f"response larger than {max_bytes} bytes")
    return json.loads(body)


@dataclass(slots=True)
class _Entry:
    """Cache state of one key source; only touched while holding `lock`."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keys: KeySet | None = None
    fetched_at: float = 0.0
    attempted_at: float = 0.0
    attempts: int = 0
    error: IssuerUnavailable | None = None  # why the last attempt failed, if it did
    discovered_uri: str | None = None


class JwksFetcher:
    """Fetches and caches the JWK sets of OIDC issuers over HTTP(S).

    One fetcher may serve every issuer; each (issuer, jwks_uri) has its own cache entry.
    `clock` measures the refetch interval and key age, so tests drive it with a FakeClock.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        min_interval: float = 30.0,
        max_age: float = 300.0,
        timeout: float = 5.0,
        max_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._min_interval = min_interval
        self._max_age = max_age
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._entries: dict[tuple[str, str | None], _Entry] = {}

    async def key_set(self, issuer: str, jwks_uri: str | None = None, *, kid: str | None = None) -> KeySet:
        """The keys of `issuer`, fetched when not cached, stale, or lacking `kid` (rate-limited).

        Raises:
            IssuerUnavailable: no keys could be fetched, or `kid` is unknown and the refetch failed.
        """
        entry = self._entries.setdefault((issuer, jwks_uri), _Entry())
        seen = entry.attempts
        async with entry.lock:
            # Whoever held the lock just fetched: share that answer instead of asking again.
            if entry.attempts == seen and self._due(entry, kid):
                await self._refresh(entry, issuer, jwks_uri)
            error = entry.error
            if entry.keys is None or (error is not None and kid is not None and kid not in entry.keys):
                reason = error.reason if error is not None else f"oidc: keys of {issuer} unreachable"
                raise IssuerUnavailable(reason) from error
            return entry.keys

    def _due(self, entry: _Entry, kid: str | None) -> bool:
        if entry.keys is None:
            return True
        now = self._clock.now()
        if now - entry.attempted_at < self._min_interval:
            return False
        return (kid is not None and kid not in entry.keys) or now - entry.fetched_at >= self._max_age

    async def _refresh(self, entry: _Entry, issuer: str, jwks_uri: str | None) -> None:
        entry.attempted_at = self._clock.now()
        try:
            keys = await self._fetch(entry, issuer, jwks_uri)
        except IssuerUnavailable as e:
            entry.error, entry.discovered_uri = e, None  # rediscover next time: the document may have moved
            log.warning("oidc keys not refreshed", extra={"issuer": issuer, "reason": e.reason})
        else:
            entry.keys, entry.fetched_at, entry.error = keys, self._clock.now(), None
            log.info("oidc keys fetched", extra={"issuer": issuer, "keys": len(keys)})
        finally:
            # Counted when done, so that callers queued behind this attempt share its outcome.
            entry.attempts += 1

    async def _fetch(self, entry: _Entry, issuer: str, jwks_uri: str | None) -> KeySet:
        uri = jwks_uri or entry.discovered_uri or await self._discover(issuer)
        if jwks_uri is None:
            entry.discovered_uri = uri
        try:
            return KeySet.from_jwks(await self._get_json(uri, issuer))
        except ValueError as e:
            raise IssuerUnavailable(f"oidc: keys of {issuer} are not a jwk set") from e

    async def _discover(self, issuer: str) -> str:
        document = await self._get_json(issuer.rstrip("/") + DISCOVERY_PATH, issuer)
        if not isinstance(document, dict):
            raise IssuerUnavailable(f"oidc: discovery document of {issuer} is not a json object")
        if document.get("issuer") != issuer:
            raise IssuerUnavailable(f"oidc: discovery document of {issuer} names another issuer")
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not usable_url(uri):
            raise IssuerUnavailable(f"oidc: discovery document of {issuer} has no usable jwks_uri")
        return uri

    async def _get_json(self, url: str, issuer: str) -> Any:
        if not usable_url(url):
            raise IssuerUnavailable(f"oidc: keys of {issuer} unreachable")
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(_http_get_json, url, self._timeout, self._max_bytes), self._timeout + 1
            )
        except (OSError, ValueError, http.client.HTTPException, _FetchError) as e:
            # OSError covers URLError, HTTPError (non-2xx), refused connections and timeouts.
            log.warning("oidc fetch failed", extra={"issuer": issuer, "url": url, "error": str(e)})
            raise IssuerUnavailable(f"oidc: keys of {issuer} unreachable") from e


def _load_jwks_file(path: Path) -> KeySet:
    try:
        return KeySet.from_jwks(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise ConfigError("oidc_issuers.jwks_file", f"{path}: {e}") from e


class OidcVerifier:
    """Verifies ID tokens of one configured OIDC issuer."""

    def __init__(self, config: OidcIssuerConfig, *, clock_skew: float = 30, fetcher: JwksFetcher | None = None) -> None:
        """Set up from config; a `jwks_file` is read now, remote keys on first use.

        Raises:
            ConfigError: the subject template, the jwks_uri or the jwks_file is unusable.
        """
        if clock_skew < 0:
            raise ValueError("clock skew must not be negative")
        if config.jwks_uri is not None and not usable_url(config.jwks_uri):
            raise ConfigError("oidc_issuers.jwks_uri", "must be an https:// url (http:// only for loopback)")
        self.issuer = config.issuer
        self._audience = config.audience
        self._jwks_uri = config.jwks_uri
        self._template = check_subject_template(config.subject_template)
        self._static = _load_jwks_file(config.jwks_file) if config.jwks_file is not None else None
        self._fetcher = fetcher if fetcher is not None else JwksFetcher()
        self._leeway = clock_skew

    async def _keys(self, parsed: UnverifiedToken) -> KeySet:
        if self._static is not None:
            return self._static
        return await self._fetcher.key_set(self.issuer, self._jwks_uri, kid=parsed.kid)

    async def verify(self, token: str, *, now: float) -> Identity:
        """Verify an ID token of this issuer and return the identity it proves.

        `aud` must contain the configured audience; `azp` is not a rule here (OIDC Core errata
        set 2 dropped its MUSTs, and the broker is a token exchange, not the token's client).

        Raises:
            CredentialRejected: the token breaks a rule; the reason names it.
            IssuerUnavailable: the issuer's keys could not be fetched.
        """
        parsed = parse_token(token)
        # A token of another issuer is refused before it can cause a fetch.
        iss = parsed.payload.get("iss")
        if iss != self.issuer:
            raise CredentialRejected("jwt: iss is required" if iss is None else "jwt: issuer mismatch")
        claims = verify_token(
            parsed,
            await self._keys(parsed),
            audience=self._audience,
            now=now,
            leeway=self._leeway,
            issuer=self.issuer,
            require=("iss", "sub"),
        )
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise CredentialRejected("oidc: sub must be a non-empty string")
        if CONTROL_CHARS.search(sub):
            # The principal must stay nameable: an operator revokes by subject, and CheckPolicy,
            # like Revoke, refuses control characters in a principal id.
            raise CredentialRejected("oidc: sub must not contain control characters")
        return Identity(
            principal=self._template.format(iss=self.issuer, sub=sub),
            kind=AuthKind.OIDC,
            expires_at=float(claims["exp"]),
            issuer=self.issuer,
            claims=claims,
        )
