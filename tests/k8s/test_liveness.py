"""The health name that Kubernetes liveness probes ask for.

Readiness probes ask for the service's own name, which stays NOT_SERVING until a model is
loaded; liveness must not, or a pod waiting for its first model would be restarted forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import LIVENESS_SERVICE, BaseService, serve
from services.common.settings import ServiceSettings
from tests.procs import free_port


class _WaitingService(BaseService):
    """A service that never becomes ready, like retrieval before a model exists."""

    name = "retrieval"

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        return []

    async def start(self) -> None:
        """Stay NOT_SERVING."""


async def _status(target: str, service: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


async def test_liveness_serving_while_not_ready() -> None:
    port = free_port()
    settings = ServiceSettings(host="127.0.0.1", port=port, metrics_port=0)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(_WaitingService(settings), stop_event=stop))
    target = f"127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                live = await _status(target, LIVENESS_SERVICE)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("server did not start")
        assert live == "SERVING"
        assert await _status(target, "") == "NOT_SERVING"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
