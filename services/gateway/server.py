"""gRPC server of the gateway: Mercato's one public API."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar, cast

import grpc
from prometheus_client import Counter, Gauge, Histogram

from mercato.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.channels import aio_channel
from services.common.errors import ResourceExhausted
from services.common.server import BaseService, run_on_loop, run_service
from services.common.settings import ClientTlsSettings
from services.gateway.admission import AdaptiveLimit, watch_loop_lag
from services.gateway.auth import ApiKeyAuthenticator
from services.gateway.experiments import load_experiments
from services.gateway.exposures import ExposureLog
from services.gateway.pipeline import Pipeline
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")


SHED = Counter(
    "mercato_gateway_shed_total",
    "Calls answered at once because the admission bound was reached, by answer.",
    ["method", "answer"],
)
DEADLINE_LEFT = Histogram(
    "mercato_gateway_deadline_left_seconds",
    "Time left of the caller's deadline when the gateway starts on a Recommend (what "
    "queueing before the handler took shows as a shorter budget).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 2.0, 5.0),
)
LOOP_LAG = Histogram(
    "mercato_gateway_loop_lag_seconds",
    "How much later than asked a 5 ms ticker on the gateway's event loop woke (the "
    "time calls and callbacks queue before the loop gets to them; ADMIT_LAG_MS > 0).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
ADMISSION_LIMIT = Gauge(
    "mercato_gateway_admission_limit",
    "The bound on recommendation calls in progress now (MAX_IN_FLIGHT when fixed).",
)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Public RPCs; composition lives in :class:`Pipeline`. Recommendation calls past
    the admission bound (adaptive, at most ``max_in_flight``: :mod:`.admission`) are
    shed at once (a fast degraded answer or RESOURCE_EXHAUSTED), so under overload the
    answers given stay fast instead of every answer queueing."""

    def __init__(self, pipeline: Pipeline, settings: GatewaySettings | None = None) -> None:
        self.pipeline = pipeline
        s = settings or pipeline.s
        self.max_in_flight = s.max_in_flight
        self.degrade_on_overload = s.overload_answer == "degraded"
        self.in_flight = 0
        # None: the fixed bound (or none); else the adaptive one, at most max_in_flight
        self.limiter = (
            AdaptiveLimit(
                s.max_in_flight,
                s.admit_target_ms / 1000,
                min_limit=min(s.admit_min_in_flight, s.max_in_flight),
                lag_target_s=s.admit_lag_ms / 1000,
            )
            if s.admission == "adaptive" and s.max_in_flight > 0
            else None
        )
        if self.limiter is not None:
            for hop in (pipeline.profile, pipeline.retrieval, pipeline.ranking):
                hop.on_timeout = self.limiter.timed_out
        self._limit_seen = s.max_in_flight
        self.late_s = s.admit_late_ms / 1000
        ADMISSION_LIMIT.set(s.max_in_flight)
        self._shed_exhausted = {
            m: SHED.labels(m, "resource_exhausted")
            for m in ("Recommend", "GetRelatedItems", "GetCartRecommendations")
        }
        self._shed_degraded = SHED.labels("Recommend", "degraded")
        self._deadline_left = DEADLINE_LEFT
        self._lock = threading.Lock()
        # the event loop the synchronous twins hand admitted calls to (and the
        # pipeline's background fetches of the popular list go to)
        self.loop = _running_loop()
        self.pipeline.loop = self.loop

    def start_lag_watch(self) -> asyncio.Task[None] | None:
        """With the adaptive bound and ADMIT_LAG_MS set: the ticker that feeds it the
        event loop's lag (:func:`~services.gateway.admission.watch_loop_lag`)."""
        if self.limiter is None or self.limiter.lag_target_s <= 0:
            return None
        return asyncio.create_task(watch_loop_lag(self.limiter, LOOP_LAG.observe))

    def _full(self) -> bool:
        if self.limiter is not None:
            return not self.limiter.admit(self.in_flight)
        return 0 < self.max_in_flight <= self.in_flight

    def _limit(self) -> int:
        return self.limiter.limit if self.limiter is not None else self.max_in_flight

    def _refuse(self, method: str) -> NoReturn:
        self._shed_exhausted[method].inc()
        raise ResourceExhausted(
            f"the gateway is at its limit of {self._limit()} calls in progress; retry with backoff"
        )

    def _enter(self, context: grpc.ServicerContext | None) -> tuple[bool, bool]:
        """Whether a recommendation call may start now (it is then counted in progress)
        and whether half the bound is in use. With ``context`` (Recommend): near the
        bound, a call that arrives with less than ADMIT_LATE_MS of its deadline left
        waited that long before the handler (the gateway is behind), so it is shed like
        a call past the bound, and the bound learns of the backlog. Under a lock: the
        synchronous server decides on its pool threads."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            self._deadline_left.observe(remaining)
        with self._lock:
            busy = self.max_in_flight > 0 and 2 * self.in_flight >= self._limit()
            late = busy and remaining is not None and remaining < self.late_s
            if late and self.limiter is not None:
                self.limiter.timed_out()
            if late or self._full():
                return False, busy
            self.in_flight += 1
            return True, busy

    def _leave(self, started: float) -> None:
        """An admitted call ended."""
        with self._lock:
            self.in_flight -= 1
            if self.limiter is not None:
                self.limiter.done(time.monotonic() - started)
                if self.limiter.limit != self._limit_seen:
                    self._limit_seen = self.limiter.limit
                    ADMISSION_LIMIT.set(self._limit_seen)

    def _shed_recommend(
        self, request: gateway_pb2.RecommendRequest
    ) -> gateway_pb2.RecommendResponse:
        """The answer to a Recommend past the bound: the cached popular items named
        degraded (OVERLOAD_ANSWER=degraded, once cached), else RESOURCE_EXHAUSTED."""
        if self.degrade_on_overload:
            resp = self.pipeline.overloaded_recommend(request)
            if resp is not None:
                self._shed_degraded.inc()
                return resp
        self._refuse("Recommend")

    async def _admitted(self, run: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        try:
            return await run()
        finally:
            self._leave(started)

    async def _admit(self, method: str, run: Callable[[], Awaitable[T]]) -> T:
        """Run ``run`` as one of the bounded calls in progress, or refuse at once."""
        if not self._enter(None)[0]:
            self._refuse(method)
        return await self._admitted(run)

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        admitted, busy = self._enter(context)
        if not admitted:
            return self._shed_recommend(request)
        if busy:  # near the bound: have the popular list ready
            self.pipeline.keep_popular_cached()
        return await self._admitted(lambda: self.pipeline.recommend(request, context))

    async def GetRelatedItems(
        self, request: gateway_pb2.GetRelatedItemsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetRelatedItemsResponse:
        return await self._admit("GetRelatedItems", lambda: self.pipeline.related(request, context))

    async def GetCartRecommendations(
        self,
        request: gateway_pb2.GetCartRecommendationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> gateway_pb2.GetCartRecommendationsResponse:
        return await self._admit(
            "GetCartRecommendations", lambda: self.pipeline.cart(request, context)
        )

    async def TrackEvents(
        self, request: gateway_pb2.TrackEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.TrackEventsResponse:
        return await self.pipeline.track(request, context)

    # The synchronous server's twins (SERVER_MODE=sync): the admission decision and the
    # shed answer on the pool thread, without the event loop, whose backlog (the
    # admitted calls' downstream callbacks) then does not delay them; admitted calls run
    # on the loop as above. grpcio's synchronous server takes new calls from the core
    # on its own polling thread, where grpc.aio takes them on the event loop.

    def _on_loop(
        self, fn: Callable[[Any, Any], Awaitable[T]], request: Any, context: grpc.ServicerContext
    ) -> T:
        started = time.monotonic()
        try:
            return cast(T, run_on_loop(self._bound_loop(), fn, request, context))
        finally:
            self._leave(started)

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            raise RuntimeError("the gateway's synchronous twins need its event loop")
        return self.loop

    def _admit_sync(
        self,
        method: str,
        fn: Callable[[Any, Any], Awaitable[T]],
        request: Any,
        context: grpc.ServicerContext,
    ) -> T:
        if not self._enter(None)[0]:
            self._refuse(method)
        return self._on_loop(fn, request, context)

    def Recommend_sync(
        self, request: gateway_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        admitted, busy = self._enter(context)
        if not admitted:
            return self._shed_recommend(request)
        if busy:  # the fetch itself is handed to the loop (Pipeline._warm_popular)
            self.pipeline.keep_popular_cached()
        return self._on_loop(self.pipeline.recommend, request, context)

    def GetRelatedItems_sync(
        self, request: gateway_pb2.GetRelatedItemsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetRelatedItemsResponse:
        return self._admit_sync("GetRelatedItems", self.pipeline.related, request, context)

    def GetCartRecommendations_sync(
        self, request: gateway_pb2.GetCartRecommendationsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetCartRecommendationsResponse:
        return self._admit_sync("GetCartRecommendations", self.pipeline.cart, request, context)


class GatewayService(BaseService):
    """The gateway as the runtime runs it."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.gs = settings
        self._lag_watch: asyncio.Task[None] | None = None
        if settings.server_mode == "sync" and settings.server_threads <= settings.max_in_flight:
            log.warning(
                "SERVER_THREADS <= MAX_IN_FLIGHT: admitted calls can hold every pool thread "
                "and calls past the bound then wait instead of being shed at once",
                extra={"threads": settings.server_threads, "max_in_flight": settings.max_in_flight},
            )
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
        self.servicer = GatewayServicer(self.pipeline)
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.servicer, server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]

    async def start(self) -> None:
        self._lag_watch = self.servicer.start_lag_watch()
        await super().start()

    async def stop(self) -> None:
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        # In-flight calls have drained: send the exposures they queued, then close.
        await self.exposures.close(timeout=max(1.0, self.gs.track_timeout_ms / 1000 * 2))
        for ch in self.channels.values():
            await ch.close()


def main() -> None:
    """Run the gateway until SIGTERM."""
    run_service(GatewayService, GatewaySettings())  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
