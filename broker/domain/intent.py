"""What an agent asks for, validated once: one task, one audience, actions on one resource.

Also the TTL rule: the lifetime is the smallest of every cap, and the answer names the cap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from broker.domain.errors import InvalidRequest, InvalidSpiffeId
from broker.domain.identity import MAX_ID_BYTES, SCHEME, SpiffeId

_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
# No "*": a granted scope must never read as a wildcard to a resource server.
_ACTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
# C0 and C1 control characters: never part of a principal id an operator must be able to type.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTEXT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_AUDIENCE = 512
MAX_RESOURCE = 512
MAX_TTL_SECONDS = 366 * 24 * 3600
MAX_PRINCIPAL = MAX_ID_BYTES
MAX_LEASE_ID = 256

TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = (TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_ACCESS_TOKEN)


@dataclass(frozen=True, slots=True)
class Limits:
    """Request size limits (config section `[limits]`)."""

    max_actions: int = 16
    max_context_entries: int = 32
    max_context_bytes: int = 4096


def _printable(value: str, name: str, limit: int) -> str:
    if not value:
        raise InvalidRequest(f"{name} is required")
    if len(value) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} characters")
    # The only printable whitespace is " " (checked over all of Unicode), so whole-string tests suffice.
    if not value.isprintable() or " " in value or '"' in value or "\\" in value:
        raise InvalidRequest(f"{name} must not contain spaces, quotes, backslashes or control characters")
    return value


def check_resource(resource: str) -> str:
    """Raises: InvalidRequest when `resource` is empty, oversized or has spaces, quotes or controls."""
    return _printable(resource, "resource", MAX_RESOURCE)


def check_principal(principal: str, name: str = "principal") -> str:
    """A principal id as policy and leases know it: a SPIFFE ID, or a mapped OIDC id.

    Raises:
        InvalidRequest: empty, longer than 2048 bytes, a control character, or a `spiffe://`
            id that breaks the SPIFFE-ID rules (the error names `name`).
    """
    if not principal:
        raise InvalidRequest(f"{name} is required")
    if len(principal) > MAX_PRINCIPAL or len(principal.encode("utf-8", "surrogatepass")) > MAX_PRINCIPAL:
        raise InvalidRequest(f"{name} is longer than {MAX_PRINCIPAL} bytes")
    if CONTROL_CHARS.search(principal):
        raise InvalidRequest(f"{name} must not contain control characters")
    if principal.startswith(SCHEME):
        try:
            SpiffeId.parse(principal)
        except InvalidSpiffeId as e:
            raise InvalidRequest(f"{name} is not a valid SPIFFE ID: {e.reason}") from e
    return principal


def check_lease_id(lease_id: str) -> str:
    """Raises: InvalidRequest when `lease_id` is empty or longer than 256 characters."""
    if not lease_id:
        raise InvalidRequest("lease_id is required")
    if len(lease_id) > MAX_LEASE_ID:
        raise InvalidRequest(f"lease_id is longer than {MAX_LEASE_ID} characters")
    return lease_id


def check_task_id(task_id: str) -> str:
    """Raises: InvalidRequest when `task_id` is empty or ill-formed."""
    if not task_id:
        raise InvalidRequest("task_id is required")
    if not _TASK_ID.fullmatch(task_id):
        raise InvalidRequest("task_id must be 1-128 characters of [A-Za-z0-9._:@/-], starting alphanumeric")
    return task_id


def check_actions(actions: Sequence[str], limits: Limits) -> tuple[str, ...]:
    """Raises: InvalidRequest for no actions, too many, a duplicate or an ill-formed one."""
    if not actions:
        raise InvalidRequest("actions: at least one action is required")
    if len(actions) > limits.max_actions:
        raise InvalidRequest(f"actions: at most {limits.max_actions} actions per request")
    seen: set[str] = set()
    for action in actions:
        if not _ACTION.fullmatch(action):
            raise InvalidRequest(f"actions: {action[:64]!r} is not a valid action name")
        if action in seen:
            raise InvalidRequest(f"actions: {action!r} is repeated")
        seen.add(action)
    return tuple(actions)


def check_context(context: Mapping[str, str], limits: Limits) -> Mapping[str, str]:
    """Raises: InvalidRequest when the context map is too large or has a bad key."""
    if len(context) > limits.max_context_entries:
        raise InvalidRequest(f"context: at most {limits.max_context_entries} entries")
    size = 0
    for key, value in context.items():
        if not _CONTEXT_KEY.fullmatch(key):
            raise InvalidRequest(f"context: key {key[:64]!r} must match [A-Za-z_][A-Za-z0-9_.-]{{0,63}}")
        size += len(key.encode()) + len(value.encode())
    if size > limits.max_context_bytes:
        raise InvalidRequest(f"context: larger than {limits.max_context_bytes} bytes")
    return MappingProxyType(dict(sorted(context.items())))


@dataclass(frozen=True, slots=True)
class Intent:
    """One validated exchange request.

    For a delegation (`subject_token_type` is the access-token URN), `task_id`, `audience`
    and `resource` may be empty: they then default to the parent lease's.
    """

    task_id: str
    audience: str
    actions: tuple[str, ...]
    resource: str
    ttl_seconds: int = 0
    context: Mapping[str, str] = field(default_factory=dict)
    subject_token: str = ""
    subject_token_type: str = ""

    @property
    def delegated(self) -> bool:
        return self.subject_token_type == TOKEN_TYPE_ACCESS_TOKEN

    @classmethod
    def parse(
        cls,
        *,
        task_id: str,
        audience: str,
        actions: Sequence[str],
        resource: str,
        ttl_seconds: int,
        context: Mapping[str, str],
        subject_token: str = "",
        subject_token_type: str = "",
        limits: Limits = Limits(),
    ) -> Intent:
        """Validate every field of an exchange request.

        Raises:
            InvalidRequest: naming the first field that is wrong.
        """
        if subject_token and subject_token_type not in SUBJECT_TOKEN_TYPES:
            raise InvalidRequest(f"subject_token_type must be one of {', '.join(SUBJECT_TOKEN_TYPES)}")
        if subject_token_type and not subject_token:
            raise InvalidRequest("subject_token_type given without subject_token")
        delegated = subject_token_type == TOKEN_TYPE_ACCESS_TOKEN
        if task_id or not delegated:
            check_task_id(task_id)
        if audience or not delegated:
            _printable(audience, "audience", MAX_AUDIENCE)
        if resource or not delegated:
            check_resource(resource)
        if ttl_seconds < 0 or ttl_seconds > MAX_TTL_SECONDS:
            raise InvalidRequest(f"ttl_seconds must be between 0 and {MAX_TTL_SECONDS}")
        return cls(
            task_id=task_id,
            audience=audience,
            actions=check_actions(actions, limits),
            resource=resource,
            ttl_seconds=int(ttl_seconds),
            context=check_context(context, limits),
            subject_token=subject_token,
            subject_token_type=subject_token_type,
        )


@dataclass(frozen=True, slots=True)
class Lifetime:
    """The outcome of the TTL rule: an absolute expiry and the cap that set it."""

    expires_at: int
    capped_by: str


def cap_ttl(now: float, first: tuple[str, float], caps: Sequence[tuple[str, float | None]]) -> Lifetime:
    """Apply the TTL rule.

    `first` is ("requested", seconds) or ("default", seconds); each cap is (name, seconds
    left) or (name, None) when it does not apply. A cap wins only when strictly smaller, so
    a caller who asked for exactly the maximum is told "requested". The expiry is whole
    seconds (a JWT `exp`), never later than any cap.
    """
    name, seconds = first
    for cap_name, cap in caps:
        if cap is not None and cap < seconds:
            name, seconds = cap_name, cap
    return Lifetime(expires_at=math.floor(now + seconds), capped_by=name)
