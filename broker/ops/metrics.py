"""The broker's Prometheus metrics: defined once here, updated by the layers that observe them."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RPCS = Counter("broker_rpc", "RPCs answered, by method and status code", ["method", "code"])
RPC_LATENCY = Histogram(
    "broker_rpc_seconds",
    "RPC latency by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
RPC_MALFORMED = Counter(
    "broker_rpc_malformed", "Requests refused before any servicer ran because they did not parse", ["method"]
)
RPC_OVERLOADED = Counter(
    "broker_rpc_overloaded", "Calls refused with RESOURCE_EXHAUSTED because too many were in flight", ["method"]
)
AUDIT_FAILED_WRITES = Counter("broker_audit_failed_writes", "Audit records that could not be written")
BACKEND_OPS = Counter(
    "broker_backend_ops",
    "Operations on dynamic-secret backends, by backend, op (provision, renew, revoke, reconcile) and result",
    ["backend", "op", "result"],
)
