"""Per-principal rate limiting: one token bucket per caller, bounded in number."""

from __future__ import annotations

from collections import OrderedDict

from broker.domain.errors import RateLimited

# Buckets of callers not seen for a while are dropped first; a full bucket is the same as none.
MAX_BUCKETS = 100_000


class RateLimiter:
    """Allows `burst` calls at once and `rate` calls per second sustained, per key."""

    def __init__(self, *, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key: str, *, now: float) -> None:
        """Take one token from `key`'s bucket.

        Raises:
            RateLimited: the bucket is empty.
        """
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            wait = (1 - tokens) / self._rate
            raise RateLimited(f"rate limit of {self._rate:g}/s exceeded; retry in {wait:.1f}s")
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
