"""The broker's error tree.

The core raises these; only `broker.api.status` turns them into gRPC status codes.
Every error carries a short, lower-case reason that is safe to show to the caller:
it never contains a token, a key or a stack trace.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidRequest(BrokerError):
    """The request is malformed: a missing, oversized or ill-formed field."""


class InvalidSpiffeId(InvalidRequest):
    """A string is not a SPIFFE ID under the SPIFFE-ID specification."""


class CredentialRejected(BrokerError):
    """A presented identity (SVID, JWT, OIDC token, broker token) failed verification.

    `reason` names the rule that was broken, e.g. "jwt: exp is required".
    """


class IssuerUnavailable(BrokerError):
    """An OIDC issuer's keys could not be fetched."""


class AuditUnavailable(BrokerError):
    """The audit trail cannot record this request, and `audit.on_failure` is "refuse"."""


class BackendUnavailable(BrokerError):
    """A dynamic-secret backend (a database) cannot be reached or refused the change; `reason` names it."""


class PermissionDenied(BrokerError):
    """The caller is authenticated but may not do this (not an admin, not the audience)."""


class PolicyDenied(PermissionDenied):
    """The policy engine said no."""

    def __init__(self, reason: str, policies: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.policies = policies


class TaskConflict(PermissionDenied):
    """The task id belongs to another principal, or is closed."""


class LeaseNotFound(BrokerError):
    """No such lease for this caller (also for someone else's lease, so ids cannot be probed)."""


class LeaseInactive(BrokerError):
    """The lease is revoked or expired, so it cannot be renewed or delegated from."""


class TaskNotFound(BrokerError):
    """No such task for this caller."""


class LifetimeExhausted(BrokerError):
    """No whole second of lifetime is left under some TTL cap; `reason` names the cap."""


class InvalidTransition(BrokerError):
    """A state change does not fit the current state (duplicate id, an expiry already past,
    a child outliving its parent): a command raced another, or a caller broke an invariant."""


class ApprovalNotFound(BrokerError):
    """No such approval for this caller."""


class ApprovalDenied(PermissionDenied):
    """An operator denied the approval."""


class ApprovalExpired(BrokerError):
    """The approval expired before an operator decided."""


class ApprovalNotPending(BrokerError):
    """The approval was already decided or used."""


class RateLimited(BrokerError):
    """Too many requests; try again later."""


class QuotaExceeded(BrokerError):
    """A principal holds as many of something (tasks, pending approvals, streams) as it may."""


class WatcherTooSlow(BrokerError):
    """A revocation stream fell further behind than its buffer and was cut off."""


class CursorTooOld(BrokerError):
    """A watcher asked to resume after events the broker no longer remembers."""


class PolicyError(BrokerError):
    """A policy or entities file does not parse; the running policy stays in force."""


class ConfigError(BrokerError):
    """The configuration is invalid; `key` names the offending key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
