"""The audit log's RFC 3339 stamps equal datetime's own formatting, for any time it can represent."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from broker.ops.audit import rfc3339
from tests.support.properties import bounded


def _by_datetime(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@bounded(2000)
@given(
    st.floats(min_value=-2e9, max_value=3e10, allow_nan=False)
    | st.integers(0, 4 * 10**9).map(lambda s: s + 0.9999995)
    | st.integers(0, 4 * 10**9).map(lambda s: s + 0.0005)
)
def test_rfc3339_equals_datetime_isoformat_in_milliseconds(t: float) -> None:
    assert rfc3339(t) == _by_datetime(t)


def test_rfc3339_rounds_to_the_next_second_as_datetime_does() -> None:
    assert rfc3339(1_750_000_000.9999996) == _by_datetime(1_750_000_000.9999996) == "2025-06-15T15:06:41.000Z"
