"""gRPC server bootstrap shared by the four services (asyncio, or synchronous with a
thread pool: ``server_mode``).

A service is a :class:`BaseService` subclass that registers its servicers and may load
state in :meth:`BaseService.start`. :func:`run_service` does the rest: logging, thread
limits, message-size limits, the runtime interceptor, health checking (NOT_SERVING until
the service says it is ready), reflection (v1 and v1alpha), the diagnostics echo,
Prometheus metrics, TLS when configured, and graceful shutdown on SIGTERM/SIGINT that
drains in-flight calls.

``server_mode=sync`` serves the same servicers from a ``grpc.server`` with a thread
pool and :class:`~services.common.interceptors.SyncRuntimeInterceptor` (the same request
ids, auth, metrics, logs and status mapping; sync health and reflection). A servicer
method ``X`` with a synchronous twin ``X_sync`` runs it on the pool thread (no event
loop per call: the cheaper path, see ``bench/server_mode.py``); any other method runs
on the service's event loop, which keeps running the background tasks (model watchers,
catalogue follower) as in asyncio mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mercato import __version__
from mercato.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from services.common.errors import Cancelled, InvalidArgument
from services.common.interceptors import (
    Authenticator,
    RuntimeInterceptor,
    SyncRuntimeInterceptor,
)
from services.common.logs import request_id_var, setup_logging
from services.common.metrics import SERVICE_INFO, start_metrics_server
from services.common.reflection import enable_reflection
from services.common.settings import ServiceSettings
from services.common.threads import configure_threads

log = logging.getLogger("mercato.server")

DIAGNOSTICS_SERVICE = diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
# Health-check name that is SERVING while the process runs (until shutdown starts), whatever
# the readiness of the service: what a liveness probe asks. Readiness probes ask for the
# service's own name (or ""), which stays NOT_SERVING until a model is loaded.
LIVENESS_SERVICE = "liveness"
MAX_ECHO_DELAY_MS = 60_000


class BaseService:
    """What a Mercato service provides to the runtime.

    Subclasses set ``name``, implement :meth:`register` and may override :meth:`start`
    (load models, open stores) and :meth:`stop`. Health starts NOT_SERVING; the default
    :meth:`start` marks the service SERVING. Services that need a model call
    :meth:`set_serving` once it is loaded.
    """

    name: str = "service"

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.health: Any = (
            health.HealthServicer()
            if settings.server_mode == "sync"
            else health.aio.HealthServicer()
        )
        self.service_names: list[str] = []
        self.authenticator: Authenticator | None = None

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        """Add servicers to ``server``; return their full service names."""
        raise NotImplementedError

    async def start(self) -> None:
        """Called after the port is bound, before the service is announced SERVING."""
        await self.set_serving(True)

    async def stop(self) -> None:
        """Called after in-flight calls drained (close stores, stop pollers)."""

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING / NOT_SERVING for the service and the server as a whole."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in [*self.service_names, ""]:
            await _maybe_await(self.health.set(name, status))


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class DiagnosticsServicer(diagnostics_pb2_grpc.DiagnosticsServiceServicer):
    """Echo through the full runtime: the latency floor of every benchmark."""

    def __init__(self, service: str) -> None:
        self.service = service

    def _check(self, request: diagnostics_pb2.EchoRequest) -> None:
        if not 0 <= request.delay_ms <= MAX_ECHO_DELAY_MS:
            raise InvalidArgument(
                f"delay_ms must be between 0 and {MAX_ECHO_DELAY_MS}, got {request.delay_ms}"
            )

    def _answer(self, request: diagnostics_pb2.EchoRequest) -> diagnostics_pb2.EchoResponse:
        return diagnostics_pb2.EchoResponse(
            payload=request.payload, service=self.service, request_id=request_id_var.get()
        )

    async def Echo(
        self, request: diagnostics_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> diagnostics_pb2.EchoResponse:
        self._check(request)
        if request.delay_ms:
            await asyncio.sleep(request.delay_ms / 1000)
        return self._answer(request)

    def Echo_sync(
        self, request: diagnostics_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> diagnostics_pb2.EchoResponse:
        self._check(request)
        if request.delay_ms:
            time.sleep(request.delay_ms / 1000)
        return self._answer(request)


class _SyncRegistrar:
    """What ``add_XServicer_to_server`` sees in sync mode: it registers on the
    synchronous server, each method replaced by its ``_sync`` twin when the servicer has
    one, else by a call that runs the coroutine on the service's event loop."""

    def __init__(self, server: grpc.Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    def _behavior(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(fn):
            return fn
        twin = getattr(getattr(fn, "__self__", None), f"{fn.__name__}_sync", None)
        if twin is not None:
            return twin  # type: ignore[no-any-return]
        loop = self.loop

        def on_loop(request: Any, context: grpc.ServicerContext) -> Any:
            return run_on_loop(loop, fn, request, context)

        return on_loop

    def _handler(self, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._behavior(h.unary_unary),
                request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer,
            )
        return h  # streaming methods: health and reflection, registered natively

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers([_Converting(h, self._handler) for h in handlers])

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """The generated code registers each service twice (generic, then registered):
        the generic registration is enough."""


class _Converting(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are converted once per method."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        convert: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> None:
        self.inner = inner
        self.convert = convert
        self.cache: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        if method not in self.cache:
            found = self.inner.service(details)
            self.cache[method] = self.convert(found) if found is not None else None
        return self.cache[method]


def run_on_loop(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[..., Any],
    request: Any,
    context: grpc.ServicerContext,
) -> Any:
    """From a pool thread of the synchronous server: run the async handler ``fn`` on
    ``loop`` with the call's request id and wait for its answer. When the call ends
    first (the caller cancelled, or its deadline passed) the handler's task is
    cancelled, as grpc.aio cancels a handler: no downstream work for nobody."""
    future = asyncio.run_coroutine_threadsafe(
        _with_request_id(request_id_var.get(), fn, request, context), loop
    )
    context.add_callback(future.cancel)  # a no-op once the answer is in
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        raise Cancelled("the call ended before its answer") from None


async def _with_request_id(
    rid: str, fn: Callable[..., Any], request: Any, context: grpc.ServicerContext
) -> Any:
    """Run an async handler on the loop with the call's request id (logs, outgoing
    calls); it gets the synchronous context (``time_remaining`` and the like)."""
    request_id_var.set(rid)
    return await fn(request, context)


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel options of every Mercato server."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Refuse to share a port with another process: a second server on the same port
        # must fail loudly, not split traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if settings.max_connection_age_seconds > 0:
        # GOAWAY after this age: clients (the gateway) reconnect through the Service and
        # land on replicas added since; in-flight calls get the grace period to finish.
        age_ms = int(settings.max_connection_age_seconds * 1000)
        options += [
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", max(int(settings.grace_seconds * 1000), 1000)),
        ]
    return options


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured (mTLS with a client CA)."""
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def serve(service: BaseService, stop_event: asyncio.Event | None = None) -> None:
    """Run ``service`` until SIGTERM/SIGINT (or ``stop_event``), then drain and stop."""
    settings = service.settings
    sync = settings.server_mode == "sync"
    loop = asyncio.get_running_loop()
    server: Any
    if sync:
        server = grpc.server(
            ThreadPoolExecutor(
                max_workers=settings.server_threads, thread_name_prefix=f"{service.name}-grpc"
            ),
            interceptors=[SyncRuntimeInterceptor(service.name, service.authenticator)],
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        registrar: Any = _SyncRegistrar(server, loop)
    else:
        server = registrar = grpc.aio.server(
            interceptors=[RuntimeInterceptor(service.name, service.authenticator)],
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
    names = list(service.register(registrar))
    service.service_names = names
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(
        DiagnosticsServicer(service.name), registrar
    )
    health_pb2_grpc.add_HealthServicer_to_server(service.health, server)
    all_names = [*names, DIAGNOSTICS_SERVICE]
    enable_reflection([*all_names, health.SERVICE_NAME], server, sync=sync)
    service.service_names = all_names
    await service.set_serving(False)
    await _maybe_await(service.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING))

    address = f"{settings.host}:{settings.resolved_port(service.name)}"
    credentials = server_credentials(settings)
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise RuntimeError(f"could not bind {address}")
    start_metrics_server(settings.resolved_metrics_port(service.name), settings.metrics_host)
    SERVICE_INFO.labels(service.name, __version__).set(1)

    stop = stop_event or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    await _maybe_await(server.start())
    log.info(
        "listening",
        extra={
            "address": f"{settings.host}:{bound}",
            "tls": credentials is not None,
            "server_mode": settings.server_mode,
        },
    )
    try:
        await service.start()
        await stop.wait()
    finally:
        log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
        await _maybe_await(service.health.enter_graceful_shutdown())
        if sync:  # the loop keeps running while the pool drains: handlers may need it
            drained = server.stop(settings.grace_seconds)
            await loop.run_in_executor(None, drained.wait)
        else:
            await server.stop(settings.grace_seconds)
        await service.stop()
        log.info("stopped")


def run_service(service_factory: type[BaseService], settings: ServiceSettings) -> None:
    """Process entry point: configure the process, build the service and serve it."""
    configure_threads(settings.threads)
    if settings.switch_interval_ms > 0:
        sys.setswitchinterval(settings.switch_interval_ms / 1000)
    setup_logging(service_factory.name, settings.log_level, settings.log_json)

    async def main() -> None:
        # Built inside the event loop: services may create asyncio channels and stores.
        await serve(service_factory(settings))

    asyncio.run(main())
