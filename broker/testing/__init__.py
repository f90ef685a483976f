"""Test kit shipped with the broker: a mock SPIFFE/OIDC issuer, a fake clock,
a mock SPIFFE Workload API, an in-process broker and an ASGI server for users' integration tests.

Importable by users' own tests and may import anything; nothing in the product imports it.
"""
