"""The decorator every RPC wears counts each answer by its status code and observes its latency."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio
from prometheus_client import REGISTRY

from broker.api.status import rpc
from broker.domain.errors import PolicyDenied


class _Context:
    """Just what `rpc` uses of a servicer context: abort raises as gRPC's does."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise aio.AbortError(details)


class _Servicer:
    @rpc
    async def MetricsProbe(self, request: Any, context: Any) -> str:
        if request == "deny":
            raise PolicyDenied("no policy permits it")
        return "answer"


def _count(code: str) -> float:
    return REGISTRY.get_sample_value("broker_rpc_total", {"method": "MetricsProbe", "code": code}) or 0.0


def _observed() -> float:
    return REGISTRY.get_sample_value("broker_rpc_seconds_count", {"method": "MetricsProbe"}) or 0.0


def test_each_answer_is_counted_under_its_code_and_timed() -> None:
    ok, denied, timed = _count("OK"), _count("PERMISSION_DENIED"), _observed()
    servicer = _Servicer()

    async def calls() -> None:
        assert await servicer.MetricsProbe("read", _Context()) == "answer"
        assert await servicer.MetricsProbe("read", _Context()) == "answer"
        context = _Context()
        with pytest.raises(aio.AbortError):
            await servicer.MetricsProbe("deny", context)
        assert context.code is grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(calls())
    assert (_count("OK") - ok, _count("PERMISSION_DENIED") - denied, _observed() - timed) == (2, 1, 3)
