"""The agent SDK's errors: one class per meaning, never a raw `grpc.RpcError`.

`from_rpc_error` is the one table from the broker's status codes to these classes. The
broker's reason (a short, token-free text) is kept as `reason`; the status name as `code`.
"""

from __future__ import annotations

import grpc


class BrokerClientError(Exception):
    """Base of every error the agent SDK raises."""

    def __init__(self, reason: str, *, code: str = "") -> None:
        super().__init__(f"{code.lower()}: {reason}" if code else reason)
        self.reason = reason
        self.code = code


class Unauthenticated(BrokerClientError):
    """The broker did not accept the agent's identity (SVID or bearer token)."""


class PermissionDenied(BrokerClientError):
    """The agent is who it says, but may not do this (not its task, lease or audience)."""


class PolicyDenied(PermissionDenied):
    """Policy refused the credential asked for."""


class ApprovalDenied(PermissionDenied):
    """An operator denied the approval this credential waited for."""


class InvalidRequest(BrokerClientError):
    """The request was malformed; `reason` names the field."""


class NotFound(BrokerClientError):
    """No such lease, task or approval for this agent."""


class FailedPrecondition(BrokerClientError):
    """The lease is revoked or expired, an approval was already used, or no lifetime is left."""


class RateLimited(BrokerClientError):
    """Too many requests, streams or pending approvals."""


class Unavailable(BrokerClientError):
    """The broker (or an issuer it needs) cannot be reached."""


class DeadlineExceeded(BrokerClientError):
    """A call's deadline passed."""


class ApprovalTimeout(DeadlineExceeded):
    """No operator decided before the wait's deadline, or the approval expired."""


class IdentityUnavailable(BrokerClientError):
    """The agent's own identity (files, Workload API, token provider) cannot be had."""


_BY_CODE: dict[grpc.StatusCode, type[BrokerClientError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}

# Where one status means something narrower for one RPC.
_BY_RPC: dict[tuple[str, grpc.StatusCode], type[BrokerClientError]] = {
    ("Exchange", grpc.StatusCode.PERMISSION_DENIED): PolicyDenied,
    ("Renew", grpc.StatusCode.PERMISSION_DENIED): PolicyDenied,
    ("AwaitApproval", grpc.StatusCode.PERMISSION_DENIED): ApprovalDenied,
    ("AwaitApproval", grpc.StatusCode.DEADLINE_EXCEEDED): ApprovalTimeout,
}


def from_rpc_error(error: grpc.RpcError, *, rpc: str) -> BrokerClientError:
    """The SDK error for a failed call of `rpc`; unknown statuses become the base class."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else ""
    cls = _BY_RPC.get((rpc, code)) or _BY_CODE.get(code, BrokerClientError)
    return cls(details or code.name.lower(), code=code.name)


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
