"""Internal channels spread calls over every address of their target (round_robin), so
two replicas behind one name both get traffic from one client."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channels import aio_channel


class CountingHealth(health.aio.HealthServicer):  # type: ignore[name-defined,misc]
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_one_channel_reaches_every_replica() -> None:
    servers, servicers, ports = [], [], []
    for _ in range(2):
        server = grpc.aio.server()
        servicer = CountingHealth()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
        servicers.append(servicer)
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        async with aio_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            await ch.channel_ready()
            failures = 0
            for _ in range(40):
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.RpcError:
                    failures += 1
        assert failures == 0
        calls = [s.calls for s in servicers]
        assert sum(calls) == 40
        # per call, not per connection: both replicas take a fair share
        assert min(calls) >= 15, calls
    finally:
        for server in servers:
            await server.stop(None)
