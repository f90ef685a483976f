"""Human approvals: the approval records, the events that change them, and the rules for each change.

May import `broker.domain` only; no gRPC. The lease table holds the approvals its log built.
"""
