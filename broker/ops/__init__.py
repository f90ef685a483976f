"""Operational concerns: the audit log, rate limits and Prometheus metrics.

May import `broker.leases` events and `broker.domain`; no gRPC.
"""
