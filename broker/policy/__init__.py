"""The Cedar policy engine: one PolicySet swapped atomically, decisions with obligations.

May import `broker.domain` only; no gRPC.
"""
