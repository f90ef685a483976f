"""OIDC ID token verification, with the issuer's keys from a file, a JWKS URL or discovery.

Fetched keys are cached. A token naming an unknown `kid` triggers a refetch (the issuer may
have rotated), at most once per `min_interval` so a stream of forged kids cannot turn the
broker into a load generator against the issuer. Keys older than `max_age` are refreshed on
the next use; if that refresh fails the cached keys keep serving. A failed fetch backs off,
and a slow issuer holds at most one thread, until the fetch's total deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

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


_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3


def _hang_up(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """At the deadline: shut the socket, so a read blocked on a trickling server returns at once."""
    expired.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            # socket.socket's own shutdown, not SSLSocket's (which would tear down TLS state
            # under the reading thread): the blocked recv sees EOF either way.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _get_once(url: str, deadline: float, max_bytes: int) -> tuple[int, str | None, bytes]:
    """One GET, within `deadline` (time.monotonic) in total: connect, headers and body together."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _FetchError("no answer within the deadline")
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=remaining)
    expired = threading.Event()
    # A per-read timeout alone lets a server trickling a byte at a time hold the thread forever.
    watchdog = threading.Timer(remaining, _hang_up, args=(conn, expired))
    watchdog.daemon = True
    watchdog.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(max_bytes + 1) if response.status == 200 else b""
        if expired.is_set():
            raise _FetchError("no answer within the deadline")
        return response.status, response.getheader("Location"), body
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set():
            raise _FetchError("no answer within the deadline") from e
        raise
    finally:
        watchdog.cancel()
        conn.close()


def _http_get_json(url: str, timeout: float, max_bytes: int) -> Any:
    """GET `url` as JSON within `timeout` seconds in total, following safe redirects.

    Name resolution is the one step the deadline does not bound (the resolver has no timeout).
    """
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _get_once(url, deadline, max_bytes)
        if status in _REDIRECT_CODES and location:
            target = urljoin(url, location)
            # Only to URLs we would have fetched in the first place, and never from https down to http.
            if not usable_url(target) or (url.startswith("https:") and target.startswith("http:")):
                raise _FetchError(f"http status {status} to an unusable url")
            url = target
            continue
        if status != 200:
            raise _FetchError(f"http status {status}")
        if len(body) > max_bytes:
            raise _FetchError(f"response larger than {max_bytes} bytes")
        return json.loads(body)
    raise _FetchError("too many redirects")


@dataclass(slots=True)
class _Entry:
    """Cache state of one key source."""

    keys: KeySet | None = None
    fetched_at: float = 0.0
    attempted_at: float = 0.0
    failures: int = 0  # consecutive failed attempts
    retry_at: float = 0.0  # no new attempt before this after a failure, keys or not
    error: IssuerUnavailable | None = None  # why the last attempt failed, if it did
    discovered_uri: str | None = None
    inflight: asyncio.Future[None] | None = None  # the one fetch running now, shared by every caller


class JwksFetcher:
    """Fetches and caches the JWK sets of OIDC issuers over HTTP(S).

    One fetcher may serve every issuer; each (issuer, jwks_uri) has its own cache entry.
    Per entry at most one fetch is in flight, and every caller that needs it waits on that one.
    A fetch has a total deadline (`timeout`, connect to last byte) and runs on the fetcher's
    own bounded pool of threads, never the event loop's default executor. After a failure the
    entry backs off (`retry_after`, doubling per failure up to `max_backoff`), whether or not
    keys were ever fetched, so a flood of tokens naming a dead issuer costs one GET.
    `clock` measures intervals, key age and backoff, so tests drive it with a FakeClock.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        min_interval: float = 30.0,
        max_age: float = 300.0,
        timeout: float = 5.0,
        max_bytes: int = MAX_RESPONSE_BYTES,
        retry_after: float = 5.0,
        max_backoff: float = 300.0,
        max_workers: int = 4,
    ) -> None:
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._min_interval = min_interval
        self._max_age = max_age
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._retry_after = retry_after
        self._max_backoff = max_backoff
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jwks-fetch")
        self._entries: dict[tuple[str, str | None], _Entry] = {}

    async def key_set(self, issuer: str, jwks_uri: str | None = None, *, kid: str | None = None) -> KeySet:
        """The keys of `issuer`, fetched when not cached, stale, or lacking `kid` (rate-limited).

        Raises:
            IssuerUnavailable: no keys could be fetched, or `kid` is unknown and the refetch failed.
        """
        entry = self._entries.setdefault((issuer, jwks_uri), _Entry())
        if entry.inflight is None and self._due(entry, kid):
            entry.inflight = asyncio.ensure_future(self._refresh(entry, issuer, jwks_uri))
        if entry.inflight is not None:
            # Shielded: a caller that gives up (its own deadline) leaves the fetch to the others.
            await asyncio.shield(entry.inflight)
        error = entry.error
        if entry.keys is None or (error is not None and kid is not None and kid not in entry.keys):
            reason = error.reason if error is not None else f"oidc: keys of {issuer} unreachable"
            raise IssuerUnavailable(reason) from error
        return entry.keys

    def _due(self, entry: _Entry, kid: str | None) -> bool:
        now = self._clock.now()
        if entry.error is not None and now < entry.retry_at:
            return False
        if entry.keys is None:
            return True
        if now - entry.attempted_at < self._min_interval:
            return False
        return (kid is not None and kid not in entry.keys) or now - entry.fetched_at >= self._max_age

    async def _refresh(self, entry: _Entry, issuer: str, jwks_uri: str | None) -> None:
        entry.attempted_at = self._clock.now()
        try:
            keys = await self._fetch(entry, issuer, jwks_uri)
        except IssuerUnavailable as e:
            entry.error, entry.discovered_uri = e, None  # rediscover next time: the document may have moved
            entry.failures += 1
            backoff = min(self._retry_after * 2 ** (entry.failures - 1), self._max_backoff)
            entry.retry_at = entry.attempted_at + backoff
            log.warning("oidc keys not refreshed", extra={"issuer": issuer, "reason": e.reason, "retry_in": backoff})
        else:
            entry.keys, entry.fetched_at, entry.error, entry.failures = keys, self._clock.now(), None, 0
            log.info("oidc keys fetched", extra={"issuer": issuer, "keys": len(keys)})
        finally:
            entry.inflight = None

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
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, _http_get_json, url, self._timeout, self._max_bytes)
        try:
            # The thread ends at its own deadline; this wait only covers a queue behind a full pool.
            return await asyncio.wait_for(work, self._timeout + 1)
        except (OSError, ValueError, http.client.HTTPException, _FetchError, TimeoutError) as e:
            # OSError covers refused connections, resets and TLS failures.
            log.warning("oidc fetch failed", extra={"issuer": issuer, "url": url, "error": str(e) or type(e).__name__})
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
