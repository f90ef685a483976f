"""The broker's own RFC 9068 access tokens: minted, served as a JWKS and verified here.

May import `broker.jose` and `broker.domain`; no gRPC.
"""
