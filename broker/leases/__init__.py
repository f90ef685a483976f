"""Lease and task state: events, the table they build, its indexes and the revocation feed.

May import `broker.domain` only; no gRPC.
"""
