"""Strict JWS parsing, JWK sets and signing keys: one layer for incoming tokens and the broker's own.

May import `broker.domain` only; no gRPC.
"""
