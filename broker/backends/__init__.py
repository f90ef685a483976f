"""Dynamic secrets: downstream logins (PostgreSQL roles) that live and die with their lease.

May import `broker.ops`, `broker.leases`, `broker.config` and `broker.domain`, and psycopg; no gRPC.
"""
