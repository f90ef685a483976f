"""Lease, task and approval state: events, the table they build, its indexes and the revocation feed.

May import `broker.domain` and `broker.approvals` only; no gRPC.
"""
