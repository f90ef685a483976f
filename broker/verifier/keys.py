"""The broker's public keys for a verifier: fetched from a JWKS URL or the broker, cached.

An unknown `kid` triggers one refetch, at most every `min_interval` seconds, so a stream of
forged kids cannot turn the verifier into a load generator against the broker.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Awaitable, Callable

from broker.domain.clock import Clock
from broker.jose.keys import KeySet
from broker.verifier.errors import TokenRejected

_MAX_JWKS_BYTES = 256 * 1024


def url_fetcher(url: str, *, timeout: float = 5.0) -> Callable[[], Awaitable[str]]:
    """Fetch a JWKS document over HTTP(S) with the standard library, off the event loop."""
    if not url.startswith(("https://", "http://")):
        raise ValueError("jwks_url must be an http(s) URL")

    def get() -> str:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - scheme checked above
            return answer.read(_MAX_JWKS_BYTES + 1).decode()

    async def fetch() -> str:
        return await asyncio.to_thread(get)

    return fetch


class KeyCache:
    """The current `KeySet`, refetched on an unknown kid (rate-limited)."""

    def __init__(self, fetch: Callable[[], Awaitable[str]], clock: Clock, *, min_interval: float = 30.0) -> None:
        self._fetch = fetch
        self._clock = clock
        self._min_interval = min_interval
        self._keys: KeySet | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def keys_for(self, kid: str | None) -> KeySet:
        """A key set that holds `kid` if the broker has it. Raises: TokenRejected when keys cannot be had."""
        keys = self._keys
        if keys is not None and (kid is None or kid in keys):
            return keys
        async with self._lock:
            keys = self._keys
            if keys is not None and (kid is None or kid in keys):
                return keys
            if keys is not None and self._clock.now() - self._fetched_at < self._min_interval:
                return keys  # refetched recently: the kid is unknown, and stays so for now
            return await self._refresh()

    async def _refresh(self) -> KeySet:
        self._fetched_at = self._clock.now()
        try:
            document = await self._fetch()
            if len(document) > _MAX_JWKS_BYTES:
                raise ValueError("jwks document too large")
            self._keys = KeySet.from_jwks(json.loads(document))
        except Exception as e:  # any failure to get keys: fail closed, keep the old set if any
            if self._keys is None:
                raise TokenRejected("broker keys unavailable") from e
        return self._keys
