"""ServiceApp's readiness hook: health follows it (NOT_SERVING until ready, and back when not)."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import ServerConfig
from services.common.grpc_server import ServiceApp

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _status_becomes(stub: health_pb2_grpc.HealthStub, want: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status == want:
            return True
        await asyncio.sleep(0.1)
    return False


def test_health_is_not_serving_until_the_readiness_check_passes_and_follows_it() -> None:
    ready = {"now": False}

    async def scenario() -> None:
        app = ServiceApp("sample", ServerConfig(grpc_port=0, metrics_port=0), [], readiness=lambda: ready["now"])
        task = asyncio.create_task(app.run_until_signal())
        while not app.port:
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status == NOT_SERVING
            await asyncio.sleep(1.5)  # a few checks later: still not ready, still NOT_SERVING
            assert (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status == NOT_SERVING
            ready["now"] = True
            assert await _status_becomes(stub, SERVING)
            ready["now"] = False
            assert await _status_becomes(stub, NOT_SERVING)
        app.request_stop()
        assert await task == 0

    asyncio.run(scenario())
