"""gRPC server of the ranking service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from mercato.v1 import ranking_pb2, ranking_pb2_grpc
from services.common.server import BaseService, run_service
from services.ranking.settings import RankingSettings


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """RPC handlers; not yet implemented ones answer UNIMPLEMENTED."""


class RankingService(BaseService):
    """The ranking service as the runtime runs it."""

    name = "ranking"

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(
            RankingServicer(),  # type: ignore[abstract]  # RPCs land with the service's issue
            server,
        )
        return [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name]


def main() -> None:
    """Run the ranking service until SIGTERM."""
    run_service(RankingService, RankingSettings())


if __name__ == "__main__":
    main()
