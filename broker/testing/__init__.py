"""Test kit shipped with the broker: a mock SPIFFE/OIDC issuer and a fake clock.

Importable by users' own tests and may import anything; nothing in the product imports it.
"""
