"""gRPC server of the profile service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from mercato.v1 import profile_pb2, profile_pb2_grpc
from services.common.server import BaseService, run_service
from services.profile.settings import ProfileSettings


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    """RPC handlers; not yet implemented ones answer UNIMPLEMENTED."""


class ProfileService(BaseService):
    """The profile service as the runtime runs it."""

    name = "profile"

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(
            ProfileServicer(),  # type: ignore[abstract]  # RPCs land with the service's issue
            server,
        )
        return [profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name]


def main() -> None:
    """Run the profile service until SIGTERM."""
    run_service(ProfileService, ProfileSettings())


if __name__ == "__main__":
    main()
