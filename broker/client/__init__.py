"""The agent SDK: identity in, task-scoped credentials out, renewed and completed for you.

May import `broker.domain`, `broker.jose` and the generated `broker._proto`, grpc and py-spiffe;
never the server's parts (policy, use cases, api, app, ops), so it installs without them.
"""

from broker.client.agent import AgentClient, Credential, Task
from broker.client.errors import (
    ApprovalDenied,
    ApprovalTimeout,
    BrokerClientError,
    DeadlineExceeded,
    FailedPrecondition,
    IdentityUnavailable,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PolicyDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from broker.client.identity import (
    BearerIdentity,
    FileIdentity,
    Identity,
    PemIdentity,
    WorkloadApiIdentity,
    workload_api_jwt_svid,
)
from broker.client.sync import SyncAgentClient, SyncTask

__all__ = [
    "AgentClient",
    "ApprovalDenied",
    "ApprovalTimeout",
    "BearerIdentity",
    "BrokerClientError",
    "Credential",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FileIdentity",
    "Identity",
    "IdentityUnavailable",
    "InvalidRequest",
    "NotFound",
    "PemIdentity",
    "PermissionDenied",
    "PolicyDenied",
    "RateLimited",
    "SyncAgentClient",
    "SyncTask",
    "Task",
    "Unauthenticated",
    "Unavailable",
    "WorkloadApiIdentity",
    "workload_api_jwt_svid",
]
