"""gRPC server of the gateway: Mercato's one public API."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from mercato.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.channels import aio_channel
from services.common.server import BaseService, run_service
from services.common.settings import ClientTlsSettings
from services.gateway.auth import ApiKeyAuthenticator
from services.gateway.experiments import load_experiments
from services.gateway.exposures import ExposureLog
from services.gateway.pipeline import Pipeline
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Public RPCs; composition lives in :class:`Pipeline`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        return await self.pipeline.recommend(request, context)

    async def GetRelatedItems(
        self, request: gateway_pb2.GetRelatedItemsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetRelatedItemsResponse:
        return await self.pipeline.related(request, context)

    async def GetCartRecommendations(
        self,
        request: gateway_pb2.GetCartRecommendationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> gateway_pb2.GetCartRecommendationsResponse:
        return await self.pipeline.cart(request, context)

    async def TrackEvents(
        self, request: gateway_pb2.TrackEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.TrackEventsResponse:
        return await self.pipeline.track(request, context)


class GatewayService(BaseService):
    """The gateway as the runtime runs it."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.gs = settings
        if settings.api_keys_file:
            self.authenticator = ApiKeyAuthenticator.from_file(settings.api_keys_file)
        else:
            log.warning("no API keys configured (MERCATO_GATEWAY_API_KEYS_FILE): calls are open")
        tls = ClientTlsSettings()
        self.channels = {
            "profile": aio_channel(settings.profile_target, tls, settings.max_message_bytes),
            "retrieval": aio_channel(settings.retrieval_target, tls, settings.max_message_bytes),
            "ranking": aio_channel(settings.ranking_target, tls, settings.max_message_bytes),
        }
        self.exposures = ExposureLog(
            self.channels["profile"],
            max_queue=settings.exposure_queue_size,
            batch_size=settings.exposure_batch_size,
            flush_interval=settings.exposure_flush_ms / 1000,
            timeout=settings.track_timeout_ms / 1000,
            enabled=settings.exposures_enabled,
        )
        self.pipeline = Pipeline(
            settings,
            self.channels,
            load_experiments(settings.experiments_file),
            exposures=self.exposures,
        )

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(self.pipeline), server
        )
        return [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]

    async def stop(self) -> None:
        # In-flight calls have drained: send the exposures they queued, then close.
        await self.exposures.close(timeout=max(1.0, self.gs.track_timeout_ms / 1000 * 2))
        for ch in self.channels.values():
            await ch.close()


def main() -> None:
    """Run the gateway until SIGTERM."""
    run_service(GatewayService, GatewaySettings())  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
