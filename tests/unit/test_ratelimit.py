"""The per-principal token bucket."""

from __future__ import annotations

import pytest

from broker.domain.errors import RateLimited
from broker.ops.ratelimit import RateLimiter


def test_burst_is_allowed_then_refused() -> None:
    limiter = RateLimiter(rate=1, burst=3)
    for _ in range(3):
        limiter.check("a", now=100.0)
    with pytest.raises(RateLimited, match=r"retry in 1\.0s"):
        limiter.check("a", now=100.0)


def test_bucket_refills_at_the_rate() -> None:
    limiter = RateLimiter(rate=2, burst=1)
    limiter.check("a", now=100.0)
    with pytest.raises(RateLimited):
        limiter.check("a", now=100.2)
    limiter.check("a", now=100.5)


def test_principals_have_separate_buckets() -> None:
    limiter = RateLimiter(rate=1, burst=1)
    limiter.check("a", now=100.0)
    limiter.check("b", now=100.0)
    with pytest.raises(RateLimited):
        limiter.check("a", now=100.0)


def test_refill_never_exceeds_the_burst() -> None:
    limiter = RateLimiter(rate=10, burst=2)
    limiter.check("a", now=0.0)
    for _ in range(2):
        limiter.check("a", now=1000.0)
    with pytest.raises(RateLimited):
        limiter.check("a", now=1000.0)
