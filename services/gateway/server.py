"""gRPC server of the gateway service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from mercato.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.server import BaseService, run_service
from services.gateway.settings import GatewaySettings


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """RPC handlers; not yet implemented ones answer UNIMPLEMENTED."""


class GatewayService(BaseService):
    """The gateway service as the runtime runs it."""

    name = "gateway"

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(),  # type: ignore[abstract]  # RPCs land with the service's issue
            server,
        )
        return [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]


def main() -> None:
    """Run the gateway service until SIGTERM."""
    run_service(GatewayService, GatewaySettings())


if __name__ == "__main__":
    main()
