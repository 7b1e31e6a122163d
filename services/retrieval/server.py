"""gRPC server of the retrieval service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from mercato.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.server import BaseService, run_service
from services.retrieval.settings import RetrievalSettings


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """RPC handlers; not yet implemented ones answer UNIMPLEMENTED."""


class RetrievalService(BaseService):
    """The retrieval service as the runtime runs it."""

    name = "retrieval"

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(
            RetrievalServicer(),  # type: ignore[abstract]  # RPCs land with the service's issue
            server,
        )
        return [retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name]


def main() -> None:
    """Run the retrieval service until SIGTERM."""
    run_service(RetrievalService, RetrievalSettings())


if __name__ == "__main__":
    main()
