"""The use cases: exchange, issuance, renewal and completion, operator operations and the reaper.

May import every core package below it (verify, policy, leases, approvals, tokens, ops); no gRPC.
"""
