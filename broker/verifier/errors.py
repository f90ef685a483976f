"""Why a token was refused: `TokenRejected(reason)`, and its narrower `InsufficientScope`."""

from __future__ import annotations

from collections.abc import Sequence


class TokenRejected(Exception):
    """The token must not be honoured; `reason` names the rule it broke (never the token)."""

    error = "invalid_token"  # the RFC 6750 error code for a challenge

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InsufficientScope(TokenRejected):
    """The token is valid but lacks an action this call needs; `required` lists them."""

    error = "insufficient_scope"

    def __init__(self, required: Sequence[str]) -> None:
        super().__init__(f"insufficient scope: needs {' '.join(required)}")
        self.required = tuple(required)
