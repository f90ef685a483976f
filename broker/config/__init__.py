"""Loading and validating `broker.toml` into frozen settings.

May import `broker.domain` only.
"""
