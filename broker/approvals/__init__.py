"""Human approvals: pending requests, operator decisions and their expiry.

May import `broker.domain` only; no gRPC.
"""
