"""Lease stores: where the events of every command are checked and appended before the table applies them.

The memory store (one broker) and the PostgreSQL store (replicas sharing one event log), the
event codec, and the schema. May import the core below `usecases` (leases, approvals, policy,
tokens, jose, config, domain) and psycopg; no gRPC.
"""
