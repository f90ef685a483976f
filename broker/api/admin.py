"""`BrokerAdmin`: the operators' service. Every call first checks the operator identity."""

from __future__ import annotations

from grpc import aio

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.api import convert
from broker.api.auth import Authenticator
from broker.api.status import rpc
from broker.domain.errors import InvalidRequest
from broker.leases.events import Lease
from broker.usecases.operations import Admin

MAX_NOTE = 1024


def _note(text: str) -> str:
    if len(text) > MAX_NOTE:
        raise InvalidRequest(f"note is longer than {MAX_NOTE} characters")
    return text


class BrokerAdminServicer(pb_grpc.BrokerAdminServicer):
    """Thin handlers over `broker.admin.Admin`."""

    def __init__(self, *, auth: Authenticator, admin: Admin) -> None:
        self._auth = auth
        self._admin = admin

    @rpc
    async def ListLeases(self, request: pb.ListLeasesRequest, context: aio.ServicerContext) -> pb.ListLeasesResponse:
        await self._auth.admin(context)
        page = await self._admin.list_leases(
            convert.lease_filter(request), page_size=request.page_size, page_token=request.page_token
        )
        leases = [self._lease(lease) for lease in page.leases]
        return pb.ListLeasesResponse(leases=leases, next_page_token=page.next_page_token)

    @rpc
    async def GetLease(self, request: pb.GetLeaseRequest, context: aio.ServicerContext) -> pb.Lease:
        await self._auth.admin(context)
        return self._lease(await self._admin.get_lease(request.lease_id))

    def _lease(self, lease: Lease) -> pb.Lease:
        return convert.lease(lease, self._admin.children(lease.id), self._admin.revocation(lease.id))

    @rpc
    async def Revoke(self, request: pb.RevokeRequest, context: aio.ServicerContext) -> pb.RevokeResponse:
        operator = await self._auth.admin(context)
        note = _note(request.reason)
        which = request.WhichOneof("selector")
        if which == "lease_id":
            count = await self._admin.revoke_lease(operator, request.lease_id, note)
        elif which == "task_id":
            count = await self._admin.revoke_task(operator, request.task_id, note)
        elif which == "subject":
            count = await self._admin.revoke_subject(operator, request.subject, note)
        elif which == "all" and request.all:
            count = await self._admin.revoke_all(operator, note)
        else:
            raise InvalidRequest("exactly one of lease_id, task_id, subject or all is required")
        return pb.RevokeResponse(revoked_count=count)

    @rpc
    async def CheckPolicy(self, request: pb.CheckPolicyRequest, context: aio.ServicerContext) -> pb.CheckPolicyResponse:
        await self._auth.admin(context)
        decision = self._admin.check_policy(request.principal, request.action, request.resource, dict(request.context))
        return convert.check_policy_response(decision)

    @rpc
    async def ReloadPolicy(
        self, request: pb.ReloadPolicyRequest, context: aio.ServicerContext
    ) -> pb.ReloadPolicyResponse:
        operator = await self._auth.admin(context)
        version, others = await self._admin.reload_policy(operator)
        replicas = [
            pb.ReplicaReload(
                replica_id=o.replica_id,
                reloaded=o.reloaded,
                policy_version=o.detail if o.reloaded else "",
                error="" if o.reloaded else o.detail,
            )
            for o in others
        ]
        return pb.ReloadPolicyResponse(policy_version=version, replicas=replicas)

    @rpc
    async def ListApprovals(
        self, request: pb.ListApprovalsRequest, context: aio.ServicerContext
    ) -> pb.ListApprovalsResponse:
        await self._auth.admin(context)
        approvals = await self._admin.list_approvals(include_decided=request.include_decided)
        return pb.ListApprovalsResponse(approvals=[convert.approval(a) for a in approvals])

    @rpc
    async def Approve(self, request: pb.ApproveRequest, context: aio.ServicerContext) -> pb.Approval:
        operator = await self._auth.admin(context)
        return convert.approval(await self._admin.approve(operator, request.approval_id, _note(request.note)))

    @rpc
    async def Deny(self, request: pb.DenyRequest, context: aio.ServicerContext) -> pb.Approval:
        operator = await self._auth.admin(context)
        return convert.approval(await self._admin.deny(operator, request.approval_id, _note(request.note)))
