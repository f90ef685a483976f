"""Hypothesis settings shared by the property tests: bounded, deterministic, no example database.

`derandomize` makes every run draw the same examples, so CI sees what a developer saw;
`database=None` keeps runs from depending on examples saved by earlier ones. Deadlines are
off because two shared cores make per-example timing meaningless.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def bounded(max_examples: int, **extra: object) -> settings:
    """Settings for one property: at most `max_examples`, derandomized, database-less."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **extra,
    )
